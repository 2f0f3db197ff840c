"""npt "multi" mode: the control stream's messages, and the npt time-out syntax (pure).

Why a module of its own: the daemon parses what a client (ours, Dart or anything else) writes
on the control pair, so that parser is hostile-input code and is tested without sockets
(docs/reference/noports-protocol.md#single-and-multi-mode). What flows on the control
stream, after each side's relay auth line and inside the session cipher:

* ``connect:<base64 32-byte key>:<base64 16-byte IV>\\n`` - the client opened one more
  socket to the relay; the daemon opens its partner (relay port B, then the target) and
  both splice it with that fresh key (``connect:no:encrypt`` = plain bytes);
* ``heartbeat:<n>\\n`` - newer Dart clients' keep-alive, nothing to do;
* ``error:<text>\\n`` - ours, from the daemon: why a connection could not be made (the
  target refused it...). The official client only logs what the daemon writes there.

The C daemon handles each ``recv()`` of the control socket on its own, so a client must
write each line in ONE write (:func:`connect_line` builds it). Clients before Dart 5.6.1 sent
no newline; their lines are exactly 77 bytes, which :class:`ControlParser` also accepts.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import Union

from .errors import ProtocolError

KEY_LEN = 32
IV_LEN = 16
#: the longest control line we accept: ``connect:`` + two base64 values is 77 bytes
MAX_CONTROL_LINE = 512
#: ``connect:`` + 44 + ``:`` + 24, what pre-5.6.1 Dart clients sent without a newline
LEGACY_LINE_LEN = 77
NO_ENCRYPT = "no:encrypt"


@dataclass(frozen=True)
class Connect:
    """Open one more relayed connection; ``key``/``iv`` None means no encryption."""

    key: bytes | None
    iv: bytes | None

    def __repr__(self) -> str:  # secrets: never in logs
        return f"Connect(encrypted={self.key is not None})"


@dataclass(frozen=True)
class Heartbeat:
    text: str


@dataclass(frozen=True)
class DeviceError:
    """The daemon could not make a connection; ``text`` says why (printable ASCII)."""

    text: str


@dataclass(frozen=True)
class Unknown:
    """A line we do not know (logged and ignored, as the official daemons do)."""

    text: str


ControlMessage = Union[Connect, Heartbeat, DeviceError, Unknown]  # noqa: UP007 (3.8 runtime alias)


def connect_line(key: bytes | None, iv: bytes | None) -> bytes:
    """The whole ``connect:`` line, to be written in one write (key/iv None: no encryption)."""
    if key is None or iv is None:
        return f"connect:{NO_ENCRYPT}\n".encode("ascii")
    if len(key) != KEY_LEN or len(iv) != IV_LEN:
        raise ProtocolError(f"connect: key must be {KEY_LEN} bytes and IV {IV_LEN}")
    return (b"connect:" + base64.b64encode(key) + b":" + base64.b64encode(iv) + b"\n")


MAX_ERROR_TEXT = 300


def error_line(text: str) -> bytes:
    """``error:<text>\\n``, the text made printable ASCII and bounded (one write)."""
    clean = "".join(c if 32 <= ord(c) < 127 else "?" for c in text)[:MAX_ERROR_TEXT]
    return f"error:{clean}\n".encode("ascii")


def parse_control_line(line: str) -> ControlMessage:
    """One control line (without its newline) -> a message; a bad ``connect`` raises."""
    text = line.strip()
    kind, _sep, rest = text.partition(":")
    if kind == "heartbeat":
        return Heartbeat(text[:64])
    if kind == "error":
        return DeviceError(rest[:MAX_ERROR_TEXT])
    if kind != "connect":
        return Unknown(text[:64])
    if rest == NO_ENCRYPT:
        return Connect(None, None)
    parts = rest.split(":")
    if len(parts) < 2:
        raise ProtocolError("control: connect needs <key>:<iv>")
    try:
        key = base64.b64decode(parts[0], validate=True)
        iv = base64.b64decode(parts[1], validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError("control: connect key/IV is not base64") from None
    if len(key) != KEY_LEN or len(iv) != IV_LEN:
        raise ProtocolError(f"control: connect key must be {KEY_LEN} bytes and IV {IV_LEN}, "
                            f"got {len(key)} and {len(iv)}")
    return Connect(key, iv)


class ControlParser:
    """Decrypted control-stream bytes in any chunks -> messages, bounded.

    Raises :class:`ProtocolError` for a line over :data:`MAX_CONTROL_LINE` bytes, a line that
    is not ASCII, or a malformed ``connect`` (the daemon then ends the session: a peer that
    sends those is not a client).
    """

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[ControlMessage]:
        self._buf += data
        out: list[ControlMessage] = []
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                break
            line = bytes(self._buf[:nl])
            del self._buf[:nl + 1]
            if line.strip():
                out.append(self._parse(line))
        if len(self._buf) > MAX_CONTROL_LINE:
            raise ProtocolError(f"control: a line longer than {MAX_CONTROL_LINE} bytes")
        buf = bytes(self._buf)
        if buf.startswith(b"connect:") and len(buf) % LEGACY_LINE_LEN == 0 and \
                re.fullmatch(rb"(connect:[A-Za-z0-9+/=]{44}:[A-Za-z0-9+/=]{24})+", buf):
            self._buf.clear()  # pre-5.6.1 clients: back-to-back lines without newlines
            for i in range(0, len(buf), LEGACY_LINE_LEN):
                out.append(self._parse(buf[i:i + LEGACY_LINE_LEN]))
        return out

    @staticmethod
    def _parse(line: bytes) -> ControlMessage:
        if len(line) > MAX_CONTROL_LINE:
            raise ProtocolError(f"control: a line longer than {MAX_CONTROL_LINE} bytes")
        try:
            text = line.decode("ascii")
        except UnicodeDecodeError:
            raise ProtocolError("control: a line that is not ASCII (wrong session key?)") \
                from None
        return parse_control_line(text)


# --- npt -T durations ------------------------------------------------------------------------

NEVER_S = 365 * 24 * 3600  # official: "-T 0" means a year
_UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1, "ms": 0.001}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|d|h|m|s)?")


def parse_duration(text: str) -> float:
    """``30s``, ``1h``, ``1h,14m,30s``, ``7d``, a bare number of seconds; ``0`` = a year."""
    raw = str(text).strip().lower()
    if raw == "0":
        return float(NEVER_S)
    total = 0.0
    parts = [p.strip() for p in raw.replace(" ", ",").split(",") if p.strip()]
    if not parts:
        raise ValueError(f"not a duration: {text!r}")
    for part in parts:
        m = _PART.fullmatch(part)
        if m is None:
            raise ValueError(f"not a duration: {text!r} (e.g. 30s, 1h, 1h,14m,30s, 7d)")
        total += float(m.group(1)) * _UNITS[m.group(2) or "s"]
    if total <= 0:
        raise ValueError(f"duration must be positive: {text!r}")
    return total


__all__ = ["Connect", "ControlMessage", "ControlParser", "DeviceError", "Heartbeat", "Unknown",
           "connect_line", "error_line", "parse_control_line", "parse_duration"]
