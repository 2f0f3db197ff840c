"""Compile Dart (JavaScript-flavoured) regexes with the PyPI ``regex`` module.

Dart's ``\\w``/``\\d`` are ASCII-only while ``\\s`` is Unicode, and ``$`` only matches at the
very end. Rather than the global ``ASCII`` flag (which would also make ``\\s`` ASCII-only)
we rewrite those escapes so the port keeps Dart's exact character classes.
"""

from __future__ import annotations

from typing import Any

import re2
import regex

_W_IN_CLASS = "a-zA-Z0-9_"
_D_IN_CLASS = "0-9"


def translate(pattern: str) -> str:
    """Rewrite ``\\w``, ``\\d``, ``\\W``, ``\\D`` and ``$`` to their Dart meaning."""
    out: list[str] = []
    in_class = False
    i = 0
    n = len(pattern)
    while i < n:
        c = pattern[i]
        if c == "\\" and i + 1 < n:
            e = pattern[i + 1]
            if e == "w":
                out.append(_W_IN_CLASS if in_class else f"[{_W_IN_CLASS}]")
            elif e == "d":
                out.append(_D_IN_CLASS if in_class else f"[{_D_IN_CLASS}]")
            elif e == "W" and not in_class:
                out.append(f"[^{_W_IN_CLASS}]")
            elif e == "D" and not in_class:
                out.append(f"[^{_D_IN_CLASS}]")
            else:
                out.append(c + e)
            i += 2
            continue
        if in_class:
            if c == "]":
                in_class = False
        elif c == "[":
            in_class = True
            out.append(c)
            i += 1
            # A ']' or '^]' right after '[' is literal in JS; keep it inside the class.
            if i < n and pattern[i] == "^":
                out.append("^")
                i += 1
            continue
        elif c == "$":
            out.append(r"\Z")
            i += 1
            continue
        out.append(c)
        i += 1
    return "".join(out)


def compile_dart(pattern: str) -> regex.Pattern:
    """Compile a Dart ``RegExp(pattern, caseSensitive: false)`` equivalent."""
    return regex.compile(translate(pattern), regex.IGNORECASE | regex.VERSION0)


# JavaScript's (so Dart's) \s: RE2's own \s is ASCII-only, the regex module's is Unicode but
# not quite JavaScript's set; spelling it out keeps the RE2 port on Dart's meaning.
_JS_SPACE = (r"\t\n\x0b\f\r \x{a0}\x{1680}\x{2000}-\x{200a}\x{2028}\x{2029}\x{202f}"
             r"\x{205f}\x{3000}\x{feff}")


def translate_re2(pattern: str) -> str | None:
    """The Dart pattern in RE2 syntax, or None where RE2 cannot say it the same way.

    On top of :func:`translate`: named groups as ``(?P<n>``, end of input as ``\\z``, ``\\s``
    spelt out, case-insensitive inline. Lookaround has no RE2 form: None.
    """
    out: list[str] = []
    text = translate(pattern)
    in_class = False
    i = 0
    n = len(text)
    while i < n:
        c = text[i]
        if c == "\\" and i + 1 < n:
            e = text[i + 1]
            if e == "Z":
                out.append(r"\z")
            elif e == "s":
                out.append(_JS_SPACE if in_class else f"[{_JS_SPACE}]")
            elif e == "S":
                if in_class:
                    return None
                out.append(f"[^{_JS_SPACE}]")
            else:
                out.append(c + e)
            i += 2
            continue
        if in_class:
            if c == "]":
                in_class = False
        elif c == "[":
            in_class = True
            out.append(c)
            i += 1
            if i < n and text[i] == "^":
                out.append("^")
                i += 1
            continue
        elif text.startswith(("(?=", "(?!", "(?<=", "(?<!"), i):
            return None
        elif text.startswith("(?<", i):
            out.append("(?P<")
            i += 3
            continue
        out.append(c)
        i += 1
    return "(?i)" + "".join(out)


def compile_linear(pattern: str) -> Any | None:
    """RE2 compile of a Dart pattern (linear time in the input), or None if RE2 cannot take it."""
    rx = translate_re2(pattern)
    if rx is None:
        return None
    options = re2.Options()
    options.log_errors = False
    try:
        return re2.compile(rx, options)
    except re2.error:
        return None
