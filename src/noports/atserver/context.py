"""Per-connection state and reply framing shared by every verb family (no sockets, no verbs).

Why a module of its own: the verb families (verbs_*.py) and the session (session.py) all need
the connection state (who is authenticated, as what, the pending `from` challenge, monitor mode)
and the exact reply framing (`<body>\\n<prompt>`, docs/reference/atprotocol.md#reply-framing-and-prompts); keeping that here lets the
families import it without importing the session, so there is no import cycle.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from noports.atprotocol import keys as K
from noports.atprotocol import metadata as M
from noports.atprotocol.errors import AtError, error_reply, illegal_argument

from .host import Host
from .store import KeyRecord


@dataclass(frozen=True)
class Reply:
    """What to write (already framed, one write) and whether to close afterwards."""

    text: str | None
    close: bool = False


def dumps(obj: Any) -> str:
    """Compact JSON like Dart's jsonEncode (no spaces, non-ASCII kept)."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def remove_nulls(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: remove_nulls(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, list):
        return [remove_nulls(v) for v in obj]
    return obj


def ms_or_none(v: Any) -> int | None:
    """Epoch ms from an int / None (metadata dates are epoch ms in our Metadata)."""
    if v is None:
        return None
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


# Largest integer a client may pass where the server computes with it (epoch ms, durations,
# commit ids): SQLite stores signed 64-bit integers, and `now + ttl` must still fit.
MAX_CLIENT_INT = 2**62


def int_or_none(v: Any) -> int | None:
    if v is None or v == "" or v == "null":
        return None
    try:
        n = int(v) if len(str(v)) <= 20 else None
    except (TypeError, ValueError):
        return None
    return n if n is not None and abs(n) <= MAX_CLIENT_INT else None


def client_int(name: str, text: str, *, lo: int = -(2**62), hi: int = MAX_CLIENT_INT) -> int:
    """An integer request parameter in [lo, hi], or AT0022 naming the parameter and range."""
    t = text.strip()
    if len(t) > 20 or not t.lstrip("-").isdigit():
        raise illegal_argument(f"{name} must be an integer between {lo} and {hi}")
    v = int(t)
    if not lo <= v <= hi:
        raise illegal_argument(f"{name} {v} is out of range ({lo}..{hi})")
    return v


class Conn:
    """State of one inbound connection plus the helpers every verb family uses."""

    def __init__(self, host: Host, emit: Callable[[str], None] | None = None,
                 session_id: str | None = None) -> None:
        self.host = host
        self.me = host.atsign
        self.sid = session_id or "_" + str(uuid.uuid4())
        self.emit = emit or (lambda _line: None)
        self.authenticated = False
        self.auth_type: str | None = None  # cram | pkam
        self.enrollment_id: str | None = None
        self.enrollment_namespaces: dict[str, str] | None = None  # APKAM connections only
        self.bad_otps = 0  # wrong one-time codes sent on this connection
        self.revoked = False  # its enrollment was revoked: answer nothing more, close
        self.hangup: Callable[[], None] = lambda: None  # set by the asyncio edge
        self.pol_atsign: str | None = None
        self.json_errors = False
        self.closed = False
        self.requests = 0  # request lines handled on this connection
        # pending `from`: ("self", challenge, expires) or ("pol", atsign, cookie, proof, expires)
        self.pending: tuple[Any, ...] | None = None
        self.monitoring = False
        self.monitor_regex: Any = None  # a compiled client regex (see clientregex.py)
        self.monitor_self = False

    def revoke(self) -> None:
        """The enrollment this connection authenticated with was revoked: drop it now."""
        self.revoked = True
        self.authenticated = False
        self.monitoring = False
        self.host.monitors.discard(self)  # type: ignore[arg-type]
        self.hangup()

    async def handle(self, line: str) -> Reply:  # implemented by session.Session
        raise NotImplementedError

    # --- reply framing ------------------------------------------------------------------

    def prompt(self) -> str:
        if self.monitoring:
            return ""
        if self.authenticated:
            return f"{self.me}@"
        if self.pol_atsign:
            return f"{self.pol_atsign}@"
        return "@"

    def ok(self, body: str) -> Reply:
        return Reply(f"{body}\n{self.prompt()}")

    def data(self, value: Any) -> Reply:
        return self.ok(f"data:{'null' if value is None else value}")

    def error(self, err: AtError) -> Reply:
        body = error_reply(err, json_style=self.json_errors, authenticated=self.authenticated)
        prompt = "" if self.monitoring else (f"{self.me}@" if self.authenticated else "@")
        return Reply(f"{body}\n{prompt}", close=err.close)

    # --- keystore helpers ---------------------------------------------------------------

    def now(self) -> int:
        return self.host.now()

    def meta(self, rec: KeyRecord) -> Any:
        return M.from_storage(rec.meta) if rec.meta else M.apply_update(
            None, {}, now_ms=self.now(), atsign=self.me)

    def active(self, rec: KeyRecord) -> bool:
        return M.is_active(self.meta(rec), self.now())

    def put(self, key: str, value: str | None, meta: Any, op: str = "+") -> int:
        st = M.to_storage(meta)
        return self.host.store.put(self.me, key, value, st, commit=K.is_committed(key), op=op,
                                   expires_at=ms_or_none(getattr(meta, "expires_at", None)),
                                   available_at=ms_or_none(getattr(meta, "available_at", None)),
                                   ts=self.now())
