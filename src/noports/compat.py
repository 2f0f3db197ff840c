"""Small shims so the device and relay side (sshnpd, srvd) run on Python 3.8 and 3.9.

Why: devices in the field run the distribution's Python (Ubuntu 20.04: 3.8, Debian 11: 3.9),
while the rest of the project needs 3.10+. Only what sshnpd/srvd reach is shimmed here; see
docs/decisions/0023-device-python-3.8.md.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import json
import re
import sys
from typing import Any, Callable, TypeVar  # noqa: UP035 (3.8: abc generics are not subscriptable)

T = TypeVar("T")


async def to_thread(func: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:  # noqa: UP006
    """``asyncio.to_thread`` (3.9+): run ``func`` in the default executor, context copied."""
    if sys.version_info >= (3, 9):  # noqa: UP036 (runs on 3.8 devices)
        return await asyncio.to_thread(func, *args, **kwargs)
    loop = asyncio.get_running_loop()
    ctx = contextvars.copy_context()
    return await loop.run_in_executor(None, functools.partial(ctx.run, func, *args, **kwargs))


class TOMLDecodeError(ValueError):
    """A TOML text the subset parser cannot read (or that is not valid TOML)."""


_KEY = r"[A-Za-z0-9_-]+"
_LINE = re.compile(rf"^\s*({_KEY}|\"[^\"\\]*\")\s*=\s*(.*?)\s*$")


def toml_loads(text: str) -> dict[str, Any]:
    """``tomllib.loads`` on 3.11+, else ``tomli`` if installed, else a flat-subset parser.

    The subset covers what a daemon config file needs (it mirrors the long flags):
    ``key = value`` lines with basic/literal strings, integers, floats, booleans and
    one-line arrays of those, plus comments. Tables and multi-line values are refused
    with a message naming the line, so nothing is silently misread.
    """
    if sys.version_info >= (3, 11):  # noqa: UP036
        import tomllib

        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise TOMLDecodeError(str(exc)) from None
    try:
        import tomli  # type: ignore[import-not-found]
    except ImportError:
        return _toml_subset(text)
    try:
        return tomli.loads(text)
    except tomli.TOMLDecodeError as exc:
        raise TOMLDecodeError(str(exc)) from None


def _toml_subset(text: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        if not m:
            raise TOMLDecodeError(
                f"line {n}: only flat `key = value` lines are supported without Python 3.11 "
                f"or the tomli package (install tomli, or use a .json/key=value file)")
        key = m.group(1).strip('"')
        if key in out:
            raise TOMLDecodeError(f"line {n}: duplicate key {key!r}")
        value, rest = _value(m.group(2), n)
        rest = rest.strip()
        if rest and not rest.startswith("#"):
            raise TOMLDecodeError(f"line {n}: unexpected text after the value: {rest!r}")
        out[key] = value
    return out


_BARE = re.compile(r"[+-]?[0-9][0-9_]*(\.[0-9_]+)?([eE][+-]?[0-9]+)?|true|false")


def _value(s: str, n: int) -> tuple[Any, str]:
    if s.startswith('"'):
        m = re.match(r'"((?:[^"\\]|\\.)*)"', s)
        if not m:
            raise TOMLDecodeError(f"line {n}: unterminated string")
        try:
            return json.loads('"' + m.group(1) + '"'), s[m.end():]
        except ValueError:
            raise TOMLDecodeError(f"line {n}: bad escape in string") from None
    if s.startswith("'"):
        end = s.find("'", 1)
        if end < 0:
            raise TOMLDecodeError(f"line {n}: unterminated string")
        return s[1:end], s[end + 1:]
    if s.startswith("["):
        items: list[Any] = []
        rest = s[1:].lstrip()
        while not rest.startswith("]"):
            if not rest:
                raise TOMLDecodeError(f"line {n}: unterminated array (arrays must fit on one line)")
            item, rest = _value(rest, n)
            items.append(item)
            rest = rest.lstrip()
            if rest.startswith(","):
                rest = rest[1:].lstrip()
            elif not rest.startswith("]"):
                raise TOMLDecodeError(f"line {n}: expected , or ] in array")
        return items, rest[1:]
    m = _BARE.match(s)
    if not m:
        raise TOMLDecodeError(f"line {n}: unsupported value {s!r}")
    tok = m.group(0)
    if tok in ("true", "false"):
        return tok == "true", s[m.end():]
    num = tok.replace("_", "")
    return (float(num) if m.group(1) or m.group(2) else int(num)), s[m.end():]
