"""Byte-exact re-implementation of Dart's ``jsonEncode`` (dart:convert).

Why: NoPorts signs ``jsonEncode(payload)`` and verifiers *re-serialise* the decoded payload
before checking the signature (docs/reference/noports-protocol.md#message-catalogue). Any difference in spacing, key order or
escaping breaks interop with the Dart and C peers, so we never use ``json.dumps`` for signed
text. Dart's rules, reproduced here:

* compact, no spaces; map keys in insertion order; keys must be strings;
* strings escape only ``"``, ``\\``, control characters < 0x20 (``\\b \\f \\n \\r \\t`` short
  forms, otherwise ``\\u00xx`` with lower-case hex) and lone UTF-16 surrogates (``\\udxxx``);
  everything else, including ``/`` and non-ASCII, is written as is;
* ``true``/``false``/``null``, integers in decimal.

Floats are refused: Dart prints doubles differently from Python (``1.0`` vs ``1e+100``...) and
no NoPorts message uses them, so accepting one could only produce an unverifiable signature.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from .errors import DartJsonError, ProtocolError

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1
_SHORT_ESCAPES = {0x08: "\\b", 0x09: "\\t", 0x0A: "\\n", 0x0C: "\\f", 0x0D: "\\r"}


def _escape_char(ch: str) -> str:
    code = ord(ch)
    if code < 0x20:
        return _SHORT_ESCAPES.get(code, f"\\u{code:04x}")
    if ch == '"':
        return '\\"'
    if ch == "\\":
        return "\\\\"
    if 0xD800 <= code <= 0xDFFF:  # a lone surrogate (a valid pair is one code point in Python)
        return f"\\u{code:04x}"
    return ch


def _needs_escape(ch: str) -> bool:
    code = ord(ch)
    return code < 0x20 or ch in '"\\' or 0xD800 <= code <= 0xDFFF


def _encode_str(text: str) -> str:
    if not any(_needs_escape(ch) for ch in text):
        return '"' + text + '"'
    return '"' + "".join(_escape_char(ch) for ch in text) + '"'


def _encode(obj: Any, out: list[str], path: str) -> None:
    if obj is None:
        out.append("null")
    elif obj is True:
        out.append("true")
    elif obj is False:
        out.append("false")
    elif isinstance(obj, int):
        if not _INT64_MIN <= obj <= _INT64_MAX:
            raise DartJsonError(f"{path}: integer {obj} does not fit Dart's 64-bit int")
        out.append(str(int(obj)))
    elif isinstance(obj, float):
        raise DartJsonError(
            f"{path}: floats are not allowed in NoPorts JSON (got {obj!r}); Dart would print it "
            "differently and the signature would not verify - use an int")
    elif isinstance(obj, str):
        out.append(_encode_str(obj))
    elif isinstance(obj, Mapping):
        out.append("{")
        first = True
        for key, value in obj.items():
            if not isinstance(key, str):
                raise DartJsonError(f"{path}: map key {key!r} is not a string")
            if not first:
                out.append(",")
            first = False
            out.append(_encode_str(key))
            out.append(":")
            _encode(value, out, f"{path}.{key}")
        out.append("}")
    elif isinstance(obj, (list, tuple)):
        out.append("[")
        for i, value in enumerate(obj):
            if i:
                out.append(",")
            _encode(value, out, f"{path}[{i}]")
        out.append("]")
    else:
        raise DartJsonError(f"{path}: {type(obj).__name__} is not JSON-encodable")


def dart_json_encode(obj: Any) -> str:
    """Return exactly the string Dart's ``jsonEncode(obj)`` would produce."""
    out: list[str] = []
    _encode(obj, out, "$")
    return "".join(out)


def _no_float(text: str) -> Any:
    raise DartJsonError(f"floats are not allowed in NoPorts JSON (got {text})")


def _no_constant(text: str) -> Any:
    raise DartJsonError(f"{text} is not valid JSON")


def dart_json_decode(text: str | bytes) -> Any:
    """Parse JSON the way the NoPorts peers accept it: strict, no floats, no NaN/Infinity.

    Objects keep their key order (Dart's LinkedHashMap does too; a duplicate key keeps its
    first position and last value in both), so ``dart_json_encode(dart_json_decode(s))`` is
    what a Dart verifier re-serialises.
    """
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ProtocolError(f"JSON text is not UTF-8: {exc}") from exc
    try:
        return json.loads(text, parse_float=_no_float, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise ProtocolError(f"not valid JSON: {exc}") from exc
