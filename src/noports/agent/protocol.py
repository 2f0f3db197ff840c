"""Connector <-> agent protocol, pure (sans-IO): one JSON object per line, both ways.

Why JSON lines and not something binary: the messages are few and small (a request with the
connector's sshnp arguments, progress lines, one final answer), Python's ``json`` is already
fast to import, and a line with a hard length bound is easy to cut without trusting the peer.

Request (connector -> agent), exactly one per connection::

    {"v": 1, "op": "open", "argv": [sshnp --stdio arguments], "cwd": "/abs/dir"}
    {"v": 1, "op": "stats"}

Replies (agent -> connector), any number of ``progress`` / ``warning`` then one final
``ok`` (an ``open``'s ``ok`` carries the tunnel socket as SCM_RIGHTS ancillary data) or
``error``::

    {"t": "progress", "text": "..."}    {"t": "warning", "text": "..."}
    {"t": "ok", ...}                    {"t": "error", "text": "<step>: <cause>", "exit": 5}
"""

from __future__ import annotations

import json
from collections import namedtuple

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing is a third of our start-up
if TYPE_CHECKING:  # typing costs the connector's start-up more than all the rest
    from typing import Any

VERSION = 1
#: the longest line either side accepts (a request is a few hundred bytes of arguments)
MAX_LINE = 64 * 1024
MAX_ARGS = 256
MAX_ARG_LEN = 4096
OPS = ("open", "stats")
REPLY_KINDS = ("progress", "warning", "ok", "error")


class ProtocolError(Exception):
    """A frame or message the other side must not have sent; the text says what was wrong."""


#: op: str, argv: list[str], cwd: str
Request = namedtuple("Request", "op argv cwd")
#: kind: str, text: str, exit_code: int, info: dict[str, Any]
Reply = namedtuple("Reply", "kind text exit_code info")


class LineBuffer:
    """Cuts a byte stream into lines of at most ``limit`` bytes (without the newline)."""

    def __init__(self, limit: int = MAX_LINE) -> None:
        self.limit = limit
        self.buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self.buf += data
        out = []
        while True:
            nl = self.buf.find(b"\n")
            if nl < 0:
                break
            if nl > self.limit:
                raise ProtocolError(f"line longer than {self.limit} bytes")
            out.append(bytes(self.buf[:nl]))
            del self.buf[:nl + 1]
        if len(self.buf) > self.limit:
            raise ProtocolError(f"line longer than {self.limit} bytes")
        return out


def _load(line: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"not a JSON line: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("not a JSON object")
    return obj


def _dump(obj: dict[str, Any]) -> bytes:
    data = json.dumps(obj, separators=(",", ":")).encode("utf-8") + b"\n"
    if len(data) > MAX_LINE:
        raise ProtocolError(f"message longer than {MAX_LINE} bytes")
    return data


# --- requests ----------------------------------------------------------------------------------

def encode_request(op: str, argv: list[str] | None = None, cwd: str = "/") -> bytes:
    return _dump({"v": VERSION, "op": op, "argv": list(argv or []), "cwd": cwd})


def parse_request(line: bytes) -> Request:
    """Validate one request line; ProtocolError names the first thing wrong with it."""
    obj = _load(line)
    if obj.get("v") != VERSION:
        raise ProtocolError(f"unsupported protocol version {obj.get('v')!r} (want {VERSION})")
    op = obj.get("op")
    if op not in OPS:
        raise ProtocolError(f"unknown op {op!r}")
    argv = obj.get("argv", [])
    if not isinstance(argv, list) or len(argv) > MAX_ARGS:
        raise ProtocolError(f"argv must be a list of at most {MAX_ARGS} strings")
    for a in argv:
        if not isinstance(a, str) or len(a) > MAX_ARG_LEN or "\0" in a:
            raise ProtocolError(f"argv items must be strings of at most {MAX_ARG_LEN} "
                                "characters without NUL")
    cwd = obj.get("cwd", "/")
    if not isinstance(cwd, str) or not cwd.startswith("/") or "\0" in cwd \
            or len(cwd) > MAX_ARG_LEN:
        raise ProtocolError("cwd must be an absolute path")
    return Request(op, argv, cwd)


# --- replies -----------------------------------------------------------------------------------

def encode_progress(text: str) -> bytes:
    return _dump({"t": "progress", "text": text[:MAX_ARG_LEN]})


def encode_warning(text: str) -> bytes:
    return _dump({"t": "warning", "text": text[:MAX_ARG_LEN]})


def encode_error(text: str, exit_code: int) -> bytes:
    return _dump({"t": "error", "text": text[:MAX_ARG_LEN], "exit": int(exit_code)})


def encode_ok(**info: Any) -> bytes:
    return _dump({"t": "ok", **info})


def parse_reply(line: bytes) -> Reply:
    obj = _load(line)
    kind = obj.pop("t", None)
    if kind not in REPLY_KINDS:
        raise ProtocolError(f"unknown reply kind {kind!r}")
    text = obj.pop("text", "")
    code = obj.pop("exit", 0)
    if not isinstance(text, str) or not isinstance(code, int) or isinstance(code, bool):
        raise ProtocolError("reply text must be a string and exit an integer")
    if kind == "error" and not 0 < code < 256:
        raise ProtocolError(f"error reply with exit code {code}")
    return Reply(kind, text, code, obj)
