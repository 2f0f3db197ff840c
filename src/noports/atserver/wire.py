"""Replies from another atServer as seen by the *outbound* (server-to-server) side.

The framing itself is :mod:`noports.atprotocol.wire` (shared with both clients); this module
only turns its :class:`~noports.atprotocol.wire.Reply` values into :class:`RemoteReply`, the
shape the session and delivery logic work with, and parses the ``from`` proof (docs/reference/atprotocol.md#pol-handshake).
"""

from __future__ import annotations

from dataclasses import dataclass

from noports.atprotocol.wire import FramingError, Reply, ReplyFramer, strip_prompt
from noports.atprotocol.wire import parse_error as _parse_error


@dataclass(frozen=True)
class RemoteReply:
    """One reply from a remote atServer: either data or an error code + message.

    ``code`` is ``''`` for an error without a code (callers relaying it pick AT0011).
    """

    data: str | None = None
    code: str | None = None
    message: str = ""
    raw: str = ""

    @property
    def ok(self) -> bool:
        return self.code is None


def _frame_all(buf: str) -> tuple[list[Reply], bytes]:
    framer = ReplyFramer()
    try:
        replies = framer.feed(buf.encode("utf-8", "surrogatepass"))
    except FramingError:
        return [], b""
    flushed = framer.flush_prompt()
    if flushed is not None:
        replies.append(flushed)
    return replies, framer.pending


def reply_complete(buf: str) -> bool:
    """True once `buf` holds one whole reply: `<body>\\n<prompt>` or a bare pol reply."""
    replies, pending = _frame_all(buf)
    if pending or not replies or replies[-1].kind != "prompt":
        return False
    return replies[-1].text != "@" or any(r.kind != "prompt" for r in replies)


def strip_prompt_prefix(text: str) -> str:
    """Drop a stray prompt (e.g. the rest of `@alice@` split off a previous reply)."""
    return strip_prompt(text)


def to_remote(reply: Reply, raw: str = "") -> RemoteReply:
    """A framed reply as a :class:`RemoteReply` (a prompt here is ``pol``'s ``@bob@``)."""
    if reply.kind == "prompt":
        return RemoteReply(data=reply.text, raw=raw)
    body = reply.line.strip()
    if body.startswith("data:"):
        return RemoteReply(data=body[5:].lstrip(" ") if body.startswith("data: ") else body[5:],
                           raw=raw)
    if body.startswith("error:"):
        return parse_error(body[6:], raw)
    return RemoteReply(code="AT0014", message=f"unexpected reply: {body[:200]}", raw=raw)


def parse_reply(buf: str) -> RemoteReply:
    """Turn one complete reply into data / error (legacy `AT0015-…` or JSON error form)."""
    replies, _pending = _frame_all(buf)
    for reply in replies:
        if reply.kind != "prompt":
            return to_remote(reply, buf)
    named = [r for r in replies if r.text != "@"]
    if named:
        return to_remote(named[-1], buf)  # the pol reply `@alice@`
    return RemoteReply(code="AT0014", message=f"unexpected reply: {buf.strip()[:200]}", raw=buf)


def parse_error(text: str, raw: str = "") -> RemoteReply:
    """What follows ``error:`` as a RemoteReply (:func:`noports.atprotocol.wire.parse_error`)."""
    err = _parse_error(text)
    return RemoteReply(code=err.code, message=err.message, raw=raw)


def parse_proof(data: str) -> tuple[str, str]:
    """`proof:_<sid>@alice:<uuid>` → (`_<sid>@alice`, `<uuid>`) (docs/reference/atprotocol.md#pol-handshake)."""
    parts = data.split(":")
    if len(parts) != 3 or parts[0] != "proof":
        raise ValueError(f"not a from-proof: {data[:100]}")
    return parts[1], parts[2]
