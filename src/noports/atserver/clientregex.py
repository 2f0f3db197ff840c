"""Regexes supplied by clients (scan, monitor, notify:list, sync).

Why RE2 (docs/decisions/0009): a client pattern runs on the server's event loop; with a
backtracking engine one line such as `scan (.+)+(.+)+X` froze the whole atServer for 26 s.
RE2 matches in time linear in the text and bounds the memory a pattern may take, so every
client pattern is safe to run inline. What RE2 cannot take (backreferences, lookaround,
repetition counts over 1000, patterns over the memory budget) is refused with AT0022 naming
the problem.

Dart semantics kept (the reference server uses Dart's `RegExp(pattern)`): case-sensitive,
`$` matches only at the very end (RE2's default), `\\w`/`\\d` ASCII-only (RE2's default), and
`\\s` outside a character class is widened to Dart's Unicode whitespace.
"""

from __future__ import annotations

from typing import Any

import re2

from noports.atprotocol.errors import illegal_argument

MAX_PROGRAM_MEM = 1 << 21  # 2 MiB for one compiled client pattern

# Dart's (JavaScript's) \s; RE2's \s is ASCII [\t\n\f\r ].
_DART_SPACE = (r"\t\n\x0b\f\r \x{a0}\x{1680}\x{2000}-\x{200a}\x{2028}\x{2029}\x{202f}"
               r"\x{205f}\x{3000}\x{feff}")

_OPTIONS = re2.Options()
_OPTIONS.log_errors = False
_OPTIONS.max_mem = MAX_PROGRAM_MEM


def translate(pattern: str) -> str:
    """Rewrite `\\s`/`\\S` outside character classes to Dart's Unicode whitespace."""
    out: list[str] = []
    in_class = False
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "\\" and i + 1 < n:
            e = pattern[i + 1]
            if not in_class and e == "s":
                out.append(f"[{_DART_SPACE}]")
            elif not in_class and e == "S":
                out.append(f"[^{_DART_SPACE}]")
            else:
                out.append(c + e)
            i += 2
            continue
        if in_class and c == "]":
            in_class = False
        elif not in_class and c == "[":
            in_class = True
            out.append(c)
            i += 1
            if i < n and pattern[i] == "^":  # '[^]...' / '[]...': first ']' is literal
                out.append("^")
                i += 1
            if i < n and pattern[i] == "]":
                out.append("\\]")
                i += 1
            continue
        out.append(c)
        i += 1
    return "".join(out)


def _why(message: str) -> str:
    m = message.lower()
    if "invalid perl operator: (?=" in m or "(?!" in m or "(?<=" in m or "(?<!" in m:
        return "lookahead/lookbehind is not supported (RE2 syntax)"
    if "invalid escape sequence: \\" in m and any(ch.isdigit() for ch in m.rsplit("\\", 1)[-1]):
        return "backreferences are not supported (RE2 syntax)"
    if "repetition" in m:
        return "repetition counts above 1000 are not supported"
    if "too large" in m or "out of memory" in m:
        return f"pattern too large (over {MAX_PROGRAM_MEM} bytes compiled)"
    return "not a valid regular expression"


def compile_client(text: str) -> Any:
    """Compile a client pattern for RE2 or raise AT0022 saying what is wrong with it."""
    try:
        return re2.compile(translate(text), _OPTIONS)
    except re2.error as exc:
        msg = exc.args[0].decode("utf-8", "replace") if exc.args and isinstance(
            exc.args[0], bytes) else str(exc)
        shown = text if len(text) <= 100 else text[:100] + "..."
        raise illegal_argument(f"regex {shown!r} rejected: {_why(msg)} ({msg})") from None
    except (TypeError, ValueError, OverflowError) as exc:
        raise illegal_argument(f"regex rejected: {type(exc).__name__}") from None


def search(rx: Any, text: str) -> bool:
    try:
        return rx.search(text) is not None
    except (re2.error, ValueError):
        return False
