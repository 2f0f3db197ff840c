"""One hosted atSign: its keystore view, monitors, notification fan-out and clock.

Why a separate object: many connections (sessions) of the same atSign share state that is not
in SQLite — the set of live monitor connections, the delivery nudge, the monotonic notification
clock — and the server hosts many atSigns in one process. Sessions talk to storage and to the
outside world only through this object, so unit tests can build one over an in-memory store
with a fake clock and a fake remote.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from noports import crypto
from noports.atprotocol import metadata as M

from .store import KeyRecord, NotificationRow, Store
from .wire import RemoteReply

log = logging.getLogger("noports.atserver")

SERVER_VERSION = "3.0.52"


@dataclass
class ServerConfig:
    """Behaviour switches (docs/reference/atprotocol.md#atserver-transport,
    docs/reference/atprotocol.md#notification-delivery,
    docs/reference/atprotocol.md#notifications); defaults follow the reference server."""

    autonotify: bool = True
    notification_expiry_ms: int = 24 * 3600 * 1000
    max_retries: int = 30
    retry_base_ms: int = 500
    retry_max_ms: int = 5000
    noop_max_ms: int = 5000
    max_buffer: int = 10_240_000
    max_unauth_line: int = 8192  # longest line before cram/pkam/pol (pkam lines are < 1 KiB)
    # connection limits of the TLS edge (docs/atserver.md "Limits")
    max_connections: int = 2048
    max_connections_per_ip: int = 1024
    tls_handshake_timeout_s: float = 10.0
    auth_timeout_s: float = 60.0
    stats_interval_s: float = 15.0
    pol_proof_ttl_ms: int = 60_000
    plookup_refresh_ms: int = 60_000
    version: str = SERVER_VERSION


class Remote(Protocol):
    """What sessions need from the server-to-server edge (s2s.Outbound implements it)."""

    async def request(self, me: str, other: str, line: str, *, handshake: bool,
                      timeout: float = ...) -> RemoteReply: ...

    async def verify_pol(self, me: str, from_atsign: str, cookie: str, proof: str) -> bool: ...


class MonitorSink(Protocol):
    """A connection in monitor mode, as the host sees it (session.Session implements it)."""

    def deliver_notification(self, row: NotificationRow, notification: Any) -> None: ...

    def deliver_stats(self, last_commit_id: int, now: int) -> None: ...


def wall_clock_ms() -> int:
    return int(time.time() * 1000)


def fresh_meta_storage(atsign: str, now: int, **fields: Any) -> dict[str, Any]:
    """Storage form of brand-new metadata (used for server-written keys)."""
    meta = M.apply_update(None, {}, now_ms=now, atsign=atsign)
    for k, v in fields.items():
        setattr(meta, k, v)
    return M.to_storage(meta)


@dataclass
class Host:
    """State shared by all sessions of one hosted atSign."""

    atsign: str
    store: Store
    config: ServerConfig = field(default_factory=ServerConfig)
    clock: Callable[[], int] = wall_clock_ms
    remote: Remote | None = None
    nudge: Callable[[], None] = lambda: None
    #: start delivering a sent notification before its commit (delivery.Deliverer.send_early)
    send_early: Callable[[NotificationRow], bool] = lambda _row: False
    #: when set, notification rows commit without the fsync and this makes them durable
    #: off the event loop before the reply (walsync.WalSync); None: each commit fsyncs
    flush: Callable[[], Awaitable[None]] | None = None
    sleep: Callable[[float], Awaitable[None]] | None = None
    started_ms: int = 0
    monitors: set[MonitorSink] = field(default_factory=set)
    enroll_rt: Any = None  # enrollment.Runtime, created on first use (verbs_enroll)
    _last_epoch: int = -1
    _signing_private: str | None = None

    def __post_init__(self) -> None:
        self.started_ms = self.clock()
        self._last_epoch = self.store.max_epoch(self.atsign)

    # --- startup ------------------------------------------------------------------------

    def ensure_startup_keys(self) -> None:
        """Signing keypair and (unless deleted) nothing else; the CRAM secret comes from admin."""
        me = self.atsign
        priv = self.store.get(me, f"{me}:signing_privatekey{me}")
        pub = self.store.get(me, f"public:signing_publickey{me}")
        if priv is None or pub is None or not priv.value or not pub.value:
            pub_b64, priv_b64 = crypto.generate_rsa_keypair()
            now = self.clock()
            self.store.put(me, f"public:signing_publickey{me}", pub_b64,
                           fresh_meta_storage(me, now, is_encrypted=False), commit=True)
            self.store.put(me, f"{me}:signing_privatekey{me}", priv_b64,
                           fresh_meta_storage(me, now, is_encrypted=False), commit=True)
            self.store.put(me, "privatekey:signing_keypair_generated", "true", {}, commit=False)
            log.info("generated server signing keypair for %s", me)

    def signing_private_key(self) -> str | None:
        if self._signing_private is None:
            rec = self.store.get(self.atsign, f"{self.atsign}:signing_privatekey{self.atsign}")
            self._signing_private = rec.value if rec else None
        return self._signing_private

    # --- clock --------------------------------------------------------------------------

    def now(self) -> int:
        return self.clock()

    def next_epoch(self) -> int:
        """Strictly increasing notification timestamps, so `monitor:<epoch>` never skips one."""
        t = max(self.clock(), self._last_epoch + 1)
        self._last_epoch = t
        return t

    # --- keystore helpers -----------------------------------------------------------------

    def get(self, key: str) -> KeyRecord | None:
        return self.store.get(self.atsign, key)

    # --- monitors -----------------------------------------------------------------------

    def publish(self, row: NotificationRow, notification: Any) -> None:
        """Live delivery of a stored received/self notification to matching monitors."""
        for s in list(self.monitors):
            try:
                s.deliver_notification(row, notification)
            except Exception:  # a broken monitor must not stop the others
                log.exception("monitor delivery failed on %s", self.atsign)

    def stats_changed(self) -> None:
        """Tell monitors the commit id moved (statsNotification, docs/reference/atprotocol.md#stats-notifications)."""
        if not self.monitors:
            return
        last = self.store.last_commit_id(self.atsign)
        now = self.clock()
        for s in list(self.monitors):
            try:
                s.deliver_stats(last, now)
            except Exception:
                log.exception("stats notification failed on %s", self.atsign)
