"""Connector <-> agent protocol, pure (sans-IO): one JSON object per line, both ways.

Why JSON lines and not something binary: the messages are few and small (a request with the
connector's sshnp arguments, progress lines, one final answer), and a line with a hard length
bound is easy to cut without trusting the peer. The connector's side (``encode_request``,
``parse_reply``) uses the C parts of ``json`` (``_json``) directly: importing the ``json``
package (and ``re`` with it) was a sixth of the connector's start-up, paid once per host
(decision 0029); anything unusual (an error, no ``_json``) goes through ``json`` itself.

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


class Request(tuple):  # a namedtuple without importing collections (connector start-up)
    """op: str, argv: list[str], cwd: str"""

    __slots__ = ()

    def __new__(cls, op: str, argv: list[str], cwd: str) -> Request:
        return tuple.__new__(cls, (op, argv, cwd))

    op = property(lambda self: self[0])
    argv = property(lambda self: self[1])
    cwd = property(lambda self: self[2])


class Reply(tuple):
    """kind: str, text: str, exit_code: int, info: dict[str, Any]"""

    __slots__ = ()

    def __new__(cls, kind: str, text: str, exit_code: int, info: dict[str, Any]) -> Reply:
        return tuple.__new__(cls, (kind, text, exit_code, info))

    kind = property(lambda self: self[0])
    text = property(lambda self: self[1])
    exit_code = property(lambda self: self[2])
    info = property(lambda self: self[3])


class _ScanContext:
    """What ``_json.make_scanner`` reads from a JSONDecoder (json.loads' defaults)."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = {"NaN": float("nan"), "Infinity": float("inf"),
                      "-Infinity": float("-inf")}.__getitem__


_SCAN: list[Any] = []


def _fast_loads(text: str) -> Any:
    """``json.loads`` by the C scanner alone; anything unusual goes to ``json.loads``."""
    if not _SCAN:
        try:
            import _json
            _SCAN.append(_json.make_scanner(_ScanContext()))
        except (ImportError, AttributeError, TypeError):
            _SCAN.append(None)
    scan = _SCAN[0]
    stripped = text.strip(" \t\n\r")
    if scan is not None and stripped:
        try:
            obj, end = scan(stripped, 0)
            if end == len(stripped):
                return obj
        except (StopIteration, ValueError):
            pass
    import json
    return json.loads(text)  # the same result, or json's own error message


def _quote(text: str) -> str:
    try:
        from _json import encode_basestring_ascii
    except ImportError:
        import json
        return json.dumps(text)
    return str(encode_basestring_ascii(text))


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
        obj = _fast_loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"not a JSON line: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("not a JSON object")
    return obj


def _dump(obj: dict[str, Any]) -> bytes:
    import json
    return _bounded(json.dumps(obj, separators=(",", ":")).encode("utf-8") + b"\n")


def _bounded(data: bytes) -> bytes:
    if len(data) > MAX_LINE:
        raise ProtocolError(f"message longer than {MAX_LINE} bytes")
    return data


# --- requests ----------------------------------------------------------------------------------

def encode_request(op: str, argv: list[str] | None = None, cwd: str = "/") -> bytes:
    """The bytes ``json.dumps({"v", "op", "argv", "cwd"}, separators=(",", ":"))`` makes."""
    args = ",".join(_quote(a) for a in (argv or []))
    return _bounded((f'{{"v":{VERSION:d},"op":{_quote(op)},"argv":[{args}],'
                     f'"cwd":{_quote(cwd)}}}\n').encode())


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
