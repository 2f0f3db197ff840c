"""What sshnpd and its session host say to each other over their pipes (pure, no I/O).

Why a separate process at all: a session must outlive the daemon that accepted it, as an
OpenSSH connection outlives a restart of sshd (docs/decisions/0024-sessions-outlive-daemon.md).
The daemon keeps every decision (who may connect, replay memory, the signed response); the
session host only carries out *orders*: authorize the ephemeral key, dial the local sshd and
the relay, splice, remove the key. One JSON object per line each way:

* daemon -> host: ``{"op": "start", ...}`` (a :class:`SessionOrder`; it holds the session's
  secrets, so it travels over a pipe, never argv or the environment);
* host -> daemon: ``{"event": "ready", "pid": N}`` once, then per session ``started``,
  ``failed`` (with the error the client is told) and ``ended``; ``{"event": "idle"}`` when it
  has had no session and no key for a while (the daemon may then let it go and start a fresh,
  small one: docs/decisions/0032-sshnpd-idle-memory.md).

Both sides validate what they read: a line that is not one of these is an error, never a guess.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any, Optional, Union  # noqa: UP035 (3.8)

from noports.npproto.escr import EscrAuth
from noports.npproto.keys import validate_session_id

MAX_LINE = 64 * 1024  # an order is ~1 KiB; anything longer is not one of ours
HOST_EVENTS = ("ready", "started", "failed", "ended", "idle")


class OrderError(ValueError):
    """A line on the daemon/host pipe is not a valid message."""


@dataclass(frozen=True)
class SessionOrder:
    """One session for the host to run (secrets inside: never log it)."""

    session_id: str
    client: str
    relay_host: str
    relay_port: int
    # the v5 envelope line, or how to answer a single-port relay's ESCR challenge (its signing
    # key travels with the order: the host answers while the daemon may be restarting)
    auth_line: Union[bytes, EscrAuth, None]  # noqa: UP007 (3.8)
    cipher_id: Optional[str]  # noqa: UP045
    key: Optional[bytes]  # noqa: UP045
    iv: Optional[bytes]  # noqa: UP045
    public_line: str  # the ephemeral public key to authorize
    authorized_keys: str
    local_sshd_port: int
    permissions: str
    owner: str
    key_ttl: float
    # twin keys (AES-CTR): the daemon-to-client key and IV; absent in older orders, where
    # key/iv serve both directions
    key_d2c: Optional[bytes] = None  # noqa: UP045
    iv_d2c: Optional[bytes] = None  # noqa: UP045

    def __repr__(self) -> str:
        return (f"SessionOrder(session_id={self.session_id!r}, client={self.client!r}, "
                f"relay={self.relay_host}:{self.relay_port}, cipher={self.cipher_id!r})")

    def to_line(self) -> bytes:
        d: dict[str, Any] = {"op": "start"}
        for name in ("session_id", "client", "relay_host", "relay_port", "cipher_id",
                     "public_line", "authorized_keys", "local_sshd_port", "permissions",
                     "owner", "key_ttl"):
            d[name] = getattr(self, name)
        if isinstance(self.auth_line, EscrAuth):
            a = self.auth_line
            d["escr"] = {"session_id": a.session_id, "relay_auth_key": a.relay_auth_key,
                         "side_a": a.side_a, "signing_private_key": a.signing_private_key,
                         "signing_key_uri": a.signing_key_uri}
        for name in ("auth_line", "key", "iv"):
            raw = getattr(self, name)
            if isinstance(raw, EscrAuth):
                raw = None
            d[name] = None if raw is None else base64.b64encode(raw).decode("ascii")
        if self.key_d2c is not None and self.iv_d2c is not None:
            d["key_d2c"] = base64.b64encode(self.key_d2c).decode("ascii")
            d["iv_d2c"] = base64.b64encode(self.iv_d2c).decode("ascii")
        return json.dumps(d, separators=(",", ":")).encode() + b"\n"

    @classmethod
    def from_line(cls, line: bytes) -> SessionOrder:
        d = _load(line)
        if d.get("op") != "start":
            raise OrderError(f"unknown order {d.get('op')!r}")
        try:
            key_d2c, iv_d2c = _b64(d, "key_d2c"), _b64(d, "iv_d2c")
            if (key_d2c is None) != (iv_d2c is None):
                raise ValueError("key_d2c and iv_d2c go together")
            return cls(
                key_d2c=key_d2c, iv_d2c=iv_d2c,
                session_id=validate_session_id(_str(d, "session_id")),
                client=_str(d, "client"), relay_host=_str(d, "relay_host"),
                relay_port=_port(d, "relay_port"),
                auth_line=_escr(d) or _b64(d, "auth_line"), cipher_id=_opt_str(d, "cipher_id"),
                key=_b64(d, "key"), iv=_b64(d, "iv"), public_line=_str(d, "public_line"),
                authorized_keys=_str(d, "authorized_keys"),
                local_sshd_port=_port(d, "local_sshd_port"),
                permissions=_opt_str(d, "permissions") or "", owner=_str(d, "owner"),
                key_ttl=_num(d, "key_ttl"))
        except ValueError as exc:
            raise OrderError(f"bad order: {exc}") from None


@dataclass(frozen=True)
class HostEvent:
    """What the host reports: ``ready`` (with its pid), ``idle``, or a session's fate."""

    event: str
    session_id: str = ""
    error: str = ""
    pid: int = 0

    def to_line(self) -> bytes:
        d: dict[str, Any] = {"event": self.event}
        if self.session_id:
            d["session_id"] = self.session_id
        if self.error:
            d["error"] = self.error
        if self.pid:
            d["pid"] = self.pid
        return json.dumps(d, separators=(",", ":")).encode() + b"\n"

    @classmethod
    def from_line(cls, line: bytes) -> HostEvent:
        d = _load(line)
        event = d.get("event")
        if event not in HOST_EVENTS:
            raise OrderError(f"unknown host event {event!r}")
        try:
            if event == "ready":
                pid = d.get("pid")
                if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
                    raise ValueError("ready needs a pid")
                return cls("ready", pid=pid)
            if event == "idle":
                return cls("idle")
            sid = validate_session_id(_str(d, "session_id"))
            error = _opt_str(d, "error") or ""
        except ValueError as exc:
            raise OrderError(f"bad host event: {exc}") from None
        if event == "failed" and not error:
            raise OrderError("a failed session needs its error")
        return cls(event, session_id=sid, error=error)


def _load(line: bytes) -> dict[str, Any]:
    if len(line) > MAX_LINE:
        raise OrderError(f"line longer than {MAX_LINE} bytes")
    try:
        d = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        raise OrderError(f"not JSON: {exc}") from None
    if not isinstance(d, dict):
        raise OrderError("not a JSON object")
    return d


def _str(d: dict[str, Any], name: str) -> str:
    v = d.get(name)
    if not isinstance(v, str) or not v:
        raise ValueError(f"{name} must be a non-empty string")
    return v


def _opt_str(d: dict[str, Any], name: str) -> str | None:
    v = d.get(name)
    if v is not None and not isinstance(v, str):
        raise ValueError(f"{name} must be a string")
    return v


def _port(d: dict[str, Any], name: str) -> int:
    v = d.get(name)
    if not isinstance(v, int) or isinstance(v, bool) or not 0 < v < 65536:
        raise ValueError(f"{name} must be a port number")
    return v


def _num(d: dict[str, Any], name: str) -> float:
    v = d.get(name)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 < v < 86400:
        raise ValueError(f"{name} must be a number of seconds")
    return float(v)


def _escr(d: dict[str, Any]) -> EscrAuth | None:
    e = d.get("escr")
    if e is None:
        return None
    if not isinstance(e, dict) or not isinstance(e.get("side_a"), bool):
        raise ValueError("escr must be an object with side_a")
    return EscrAuth(_str(e, "session_id"), _str(e, "relay_auth_key"), e["side_a"],
                    _str(e, "signing_private_key"), _str(e, "signing_key_uri"))


def _b64(d: dict[str, Any], name: str) -> bytes | None:
    v = _opt_str(d, name)
    if v is None:
        return None
    try:
        return base64.b64decode(v, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{name} is not base64") from None


__all__ = ["HostEvent", "OrderError", "SessionOrder"]
