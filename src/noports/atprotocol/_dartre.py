"""Compile Dart (JavaScript-flavoured) regexes with the PyPI ``regex`` module.

Dart's ``\\w``/``\\d`` are ASCII-only while ``\\s`` is Unicode, and ``$`` only matches at the
very end. Rather than the global ``ASCII`` flag (which would also make ``\\s`` ASCII-only)
we rewrite those escapes so the port keeps Dart's exact character classes.
"""

from __future__ import annotations

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
