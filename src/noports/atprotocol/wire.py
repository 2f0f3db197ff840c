"""The atProtocol as bytes: cutting a server's reply stream into replies (sans-IO).

Every atProtocol peer (atServer, atDirectory) answers ``<body>\\n<prompt>`` (docs/reference/atprotocol.md#reply-framing-and-prompts):
the prompt is ``@`` before authentication, ``@alice@`` after, and it has no newline, so it
arrives glued to the front of the *next* reply. Two answers break that shape: ``pol``'s bare
``@bob@`` (no body, no newline) and ``monitor``'s ``notification: <json>\\n`` lines (no prompts
at all). TLS may split any of it anywhere, a multi-byte character included.

:class:`ReplyFramer` is the one place that knows this; it works like h11: the connection edge
(blocking :mod:`noports.atclient.connection`, asyncio :mod:`noports.atclient.aio`, the atServer's
outbound :mod:`noports.atserver.s2s`) reads bytes, ``feed()``s them and acts on the
:class:`Reply` values that come out. The framer never does I/O, never blocks and, whatever the
bytes, never raises anything but :class:`FramingError` (a reply longer than its bound).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import NamedTuple

#: Longest reply we buffer (a large value or monitor line); beyond it the peer is refused.
MAX_REPLY_BYTES = 32 * 1024 * 1024
#: Longest prompt name we wait for: 55 characters of up to 4 UTF-8 bytes each.
_MAX_PROMPT_NAME = 55 * 4
# Bytes that cannot be part of an atSign: after `@` they prove the prompt was the bare `@`.
_PROMPT_STOP = re.compile(rb"[@:\r\n \t]")
_AT = 0x40

_CODED_ERROR = re.compile(r"^(AT\d{4})(?:\s*[-:]\s*|\s+|$)(.*)$", re.DOTALL)

KINDS = ("prompt", "data", "error", "notification", "other")


class FramingError(ValueError):
    """The peer sent more than the framer's bound without finishing a reply.

    The stream is out of step after this; the connection must be closed.
    """


class Reply(NamedTuple):
    """One framed unit of a server's stream.

    ``kind`` is one of :data:`KINDS`. ``text`` is what follows ``data:`` / ``error:`` /
    ``notification:`` (verbatim: ``stats`` answers ``data: <json>`` with a space), the prompt
    itself for ``prompt`` (``@``, ``@alice@``, or ``pol``'s ``@bob@``) and the whole line for
    ``other`` (e.g. the atDirectory's ``host:port`` or ``null``). ``line`` is the whole line
    with any stray prompt removed.
    """

    kind: str
    text: str
    line: str


@dataclass(frozen=True)
class WireError:
    """An ``error:`` body taken apart: ``code`` is ``''`` when the peer sent none."""

    code: str
    message: str


def strip_prompt(body: str) -> str:
    """Drop a stray prompt glued to the front of a line (``@alice@data:x`` -> ``data:x``).

    Dart's at_lookup ``_stripPrompt`` rule: everything up to the last ``@`` in the part before
    the first ``:``.
    """
    colon = body.find(":")
    head = body if colon < 0 else body[:colon]
    at = head.rfind("@")
    if colon >= 0 and at >= 0:
        return body[at + 1:]
    return body


_PREFIXES = (("data", "data:"), ("error", "error:"), ("notification", "notification:"))


def classify(line: str) -> Reply:
    """A complete line (no newline, prompt residue allowed in front) as a :class:`Reply`."""
    if "@" in line:
        line = strip_prompt(line)
    for kind, prefix in _PREFIXES:
        if line.startswith(prefix):
            return Reply(kind, line[len(prefix):], line)
    return Reply("other", line, line)


def parse_error(text: str) -> WireError:
    """What follows ``error:``, in any of the three forms servers send (docs/reference/atprotocol.md#error-replies-and-codes).

    ``AT0015-key not found : ...`` (legacy), ``AT0026:message`` (handlers) and
    ``{"errorCode": .., "errorDescription": ..}`` (JSON, newer servers). The code is ``''``
    when the peer sent none: this function never invents one; a layer that must pass the
    error on with a code (the atServer relaying a remote error) picks its own.
    """
    text = text.strip()
    if text.startswith("{"):
        try:
            obj = json.loads(text)
        except (ValueError, RecursionError):  # a hostile body must not crash the reader
            obj = None
        if isinstance(obj, dict):
            return WireError(str(obj.get("errorCode") or ""),
                             str(obj.get("errorDescription") or ""))
    m = _CODED_ERROR.match(text)
    if m:
        return WireError(m.group(1), m.group(2).strip())
    return WireError("", text)


class ReplyFramer:
    """Cuts a server's byte stream into :class:`Reply` values (see the module docstring).

    A prompt is reported once it is unambiguous: ``@alice@`` when its closing ``@`` arrives,
    ``@`` when the next byte cannot continue an atSign. A lone trailing ``@`` therefore stays
    in :attr:`pending` until more bytes come; an edge that knows nothing else is coming (the
    greeting, a wait that timed out) calls :meth:`flush_prompt`.
    """

    def __init__(self, max_reply: int = MAX_REPLY_BYTES) -> None:
        self.max_reply = max_reply
        self._buf = bytearray()
        self._scanned = 0  # bytes of an unfinished line already searched for `\n`
        self._broken = False

    @property
    def pending(self) -> bytes:
        """Bytes received but not yet part of a reported reply."""
        return bytes(self._buf)

    def feed(self, data: bytes) -> list[Reply]:
        """Add bytes; return every reply they complete, in order."""
        if self._broken:
            raise FramingError("the stream is out of step after an earlier framing error")
        self._buf += data
        out: list[Reply] = []
        while True:
            reply = self._next()
            if reply is None:
                break
            out.append(reply)
        if len(self._buf) > self.max_reply:
            self._broken = True
            self._buf.clear()
            self._scanned = 0
            raise FramingError(f"reply longer than {self.max_reply} bytes")
        return out

    def flush_prompt(self) -> Reply | None:
        """Report a pending lone ``@`` as the prompt (nothing else is coming for it)."""
        if self._buf == b"@":
            del self._buf[:1]
            return Reply("prompt", "@", "@")
        return None

    def _next(self) -> Reply | None:
        buf = self._buf
        while buf:
            if buf[0] == _AT:
                return self._prompt()
            nl = buf.find(b"\n", self._scanned)
            if nl < 0:
                self._scanned = len(buf)  # a long line arriving in pieces is searched once
                return None
            self._scanned = 0
            raw = bytes(buf[:nl])
            del buf[:nl + 1]
            line = raw.decode("utf-8", "replace").rstrip("\r")
            if line.strip():  # blank lines carry nothing
                return classify(line)
        return None

    def _prompt(self) -> Reply | None:
        buf = self._buf
        end = min(len(buf), 2 + _MAX_PROMPT_NAME)
        stop = _PROMPT_STOP.search(buf, 1, end)
        if stop is None:
            if len(buf) < 2 + _MAX_PROMPT_NAME:
                return None  # `@al...` still arriving (or a lone `@`)
        elif buf[stop.start()] == _AT and stop.start() > 1:
            j = stop.start()
            text = bytes(buf[:j + 1]).decode("utf-8", "replace")
            del buf[:j + 1]
            return Reply("prompt", text, text)
        # a byte that cannot be in an atSign, `@@` (a bare `@`, then the next prompt), or a
        # name longer than any atSign: the prompt was the bare `@`
        del buf[:1]
        return Reply("prompt", "@", "@")
