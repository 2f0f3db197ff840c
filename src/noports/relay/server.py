"""The socket rendezvous data plane: many sessions, one event loop (docs/reference/noports-protocol.md#socket-rendezvous).

:class:`Rendezvous` opens two OS-chosen ports per session, accepts and authenticates
sockets on them, FIFO-pairs authenticated sides (rules in
:class:`~noports.relay.session.RelaySession`) and splices each pair
(:mod:`noports.relay.splice`). The control side (``request_ports`` notifications) calls
:meth:`Rendezvous.open_session` and replies with the ports.

Why no ``asyncio.Server``/streams during authentication: an idle session must stay tiny
(it is only two listening sockets and a timer), and the first line must be read with a
hard size cap before any transport exists, so that the splice can then take the raw
socket in whichever mode is fastest.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import socket
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from noports import trace

from .session import (
    Action,
    AuthLineReader,
    AuthLineTooLong,
    CloseSession,
    Drop,
    Pair,
    RelaySession,
    SessionPolicy,
    Side,
    SideAuthenticator,
)
from .singleport import EscrGate, EscrSession, KeyLookup
from .splice import HIGH_WATER, Splice, SpliceMode, splice_sockets

log = logging.getLogger(__name__)


class RelayCapacityError(RuntimeError):
    """The relay refuses a new session (``max_sessions`` reached or shutting down)."""


@dataclass(frozen=True)
class RelayConfig:
    """Relay-wide settings. ``policy`` holds the per-session timers and limits."""

    bind_host: str = "0.0.0.0"  # official srvd binds all IPv4 addresses
    policy: SessionPolicy = field(default_factory=SessionPolicy)
    max_sessions: int = 10_000
    splice_mode: SpliceMode | None = None  # None: splice.DEFAULT_MODE
    idle_timeout: float | None = 3600.0  # close a pair that relayed nothing for this long
    keepalive: tuple[int, int, int] | None = (30, 10, 3)  # TCP_KEEPIDLE/INTVL/CNT seconds
    high_water: int = HIGH_WATER  # per-direction write buffer bound (protocol mode)
    sock_buf: int | None = None  # SO_RCVBUF/SO_SNDBUF; None keeps kernel autotuning
    max_pending_head: int = 64 * 1024  # bytes buffered from a side waiting for its peer
    linger: float = 10.0  # seconds to flush a closing pair before aborting it
    backlog: int = 128  # per port: a burst of squatters must not fill the accept queue
    max_unauth_total: int = 4096  # unauthenticated sockets relay-wide; oldest evicted beyond
    accept_pause: float = 0.5  # stop accepting on a port this long after EMFILE & co


@dataclass(frozen=True)
class SessionSummary:
    """What is logged (and reported to ``on_session_closed``) when a session ends."""

    session_id: str
    port_a: int
    port_b: int
    duration: float
    pairs: int
    bytes_ab: int
    bytes_ba: int
    reason: str


class _Conn:
    """An accepted socket, from accept until it is spliced or dropped."""

    __slots__ = ("id", "side", "sock", "reader", "head", "state")

    def __init__(self, cid: int, side: Side, sock: socket.socket,
                 reader: AuthLineReader | None) -> None:
        self.id = cid
        self.side = side
        self.sock = sock
        self.reader = reader
        self.head = b""
        self.state = "auth" if reader is not None else "pending"  # -> pairing -> spliced


class _Session:
    """Binds a :class:`RelaySession` to sockets, timers and splices."""

    __slots__ = ("rv", "sm", "auth_a", "auth_b", "lsocks", "ports", "conns", "splices",
                 "timer", "timer_at", "opened", "bytes_ab", "bytes_ba")

    def __init__(self, rv: Rendezvous, sm: RelaySession, auth_a: SideAuthenticator | None,
                 auth_b: SideAuthenticator | None,
                 lsocks: tuple[socket.socket, socket.socket] | None,
                 ports: tuple[int, int] | None = None):
        self.rv = rv
        self.sm = sm
        self.auth_a = auth_a
        self.auth_b = auth_b
        self.lsocks = lsocks  # None: single-port session, sockets arrive via Rendezvous.adopt
        self.ports = ports or (lsocks[0].getsockname()[1], lsocks[1].getsockname()[1])
        self.conns: dict[int, _Conn] = {}
        self.splices: dict[Splice, list[float]] | None = None  # splice -> [activity, since]
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at: float | None = None
        self.opened = time.monotonic()
        self.bytes_ab = 0
        self.bytes_ba = 0

    # ------------------------------------------------------------------- plumbing
    def start(self) -> None:
        loop = self.rv._loop
        if self.lsocks is not None:
            loop.add_reader(self.lsocks[0].fileno(), self._on_accept, Side.A)
            loop.add_reader(self.lsocks[1].fileno(), self._on_accept, Side.B)
        self._reschedule()

    def _run(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Pair):
                self._pair(action.a, action.b)
            elif isinstance(action, Drop):
                self._drop(action.conn, action.reason)
            elif isinstance(action, CloseSession):
                self._closed(action.reason)
        if not self.sm.closed:
            self._reschedule()

    def _reschedule(self) -> None:
        deadline = self.sm.next_deadline()
        if deadline == self.timer_at:
            return
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.timer_at = deadline
        if deadline is not None:
            self.timer = self.rv._loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        now = max(self.rv._loop.time(), self.timer_at or 0.0)
        self.timer = None
        self.timer_at = None
        self._run(self.sm.tick(now))

    # -------------------------------------------------------------------- sockets
    def _on_accept(self, side: Side) -> None:
        assert self.lsocks is not None
        lsock = self.lsocks[0 if side is Side.A else 1]
        for _attempt in range(32):
            try:
                sock, peer = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE & co: leave it in the backlog for a while
                log.warning("session %s: accept on side %s failed: %s; pausing it %gs",
                            self.sm.session_id, side.value, exc, self.rv.config.accept_pause)
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._pause_accept(side)
                return
            self._accepted(side, sock, peer)
            if self.sm.closed:
                return

    def _pause_accept(self, side: Side) -> None:
        """Out of descriptors: a readable listener would spin the loop; retry later."""
        assert self.lsocks is not None
        lsock = self.lsocks[0 if side is Side.A else 1]
        loop = self.rv._loop
        loop.remove_reader(lsock.fileno())
        self.rv.evict_oldest_unauth("relay out of file descriptors")

        def resume() -> None:
            if not self.sm.closed and lsock.fileno() >= 0:
                loop.add_reader(lsock.fileno(), self._on_accept, side)

        loop.call_later(self.rv.config.accept_pause, resume)

    def adopt(self, side: Side, sock: socket.socket, head: bytes) -> None:
        """A socket the ESCR gate authenticated as ``side``: straight to pairing."""
        cid = self.rv._next_id()
        conn = _Conn(cid, side, sock, None)
        conn.head = head
        self.conns[cid] = conn
        self.rv._loop.add_reader(sock.fileno(), self._on_readable, conn)
        self._run(self.sm.accept(side, cid, self.rv._loop.time(), needs_auth=False))

    def _accepted(self, side: Side, sock: socket.socket, peer: object) -> None:
        trace.mark("relay.accept", f"{self.sm.session_id} {side.value}")
        self.rv._configure(sock)
        auth = self.auth_a if side is Side.A else self.auth_b
        cid = self.rv._next_id()
        conn = _Conn(cid, side, sock,
                     AuthLineReader(self.sm.policy.max_auth_line) if auth else None)
        self.conns[cid] = conn
        log.debug("session %s: conn %d on side %s from %s", self.sm.session_id, cid,
                  side.value, peer)
        self.rv._loop.add_reader(sock.fileno(), self._on_readable, conn)
        if auth is not None:
            self.rv._track_unauth(cid, self)
        self._run(self.sm.accept(side, cid, self.rv._loop.time(), needs_auth=auth is not None))
        if auth is not None and self.conns.get(cid) is conn and conn.reader is not None:
            self._on_readable(conn)  # a real party's auth line is usually there already

    def _on_readable(self, conn: _Conn) -> None:
        """Read the auth line; afterwards keep a bounded head while waiting for a peer."""
        try:
            data = conn.sock.recv(self.sm.policy.max_auth_line if conn.reader else 65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._gone(conn, f"socket error before pairing: {exc}")
            return
        if not data:
            self._gone(conn, "closed before pairing")
            return
        if conn.reader is None:
            conn.head += data
            if len(conn.head) >= self.rv.config.max_pending_head:
                self.rv._loop.remove_reader(conn.sock.fileno())  # kernel buffers the rest
            return
        now = self.rv._loop.time()
        try:
            done = conn.reader.feed(data)
        except AuthLineTooLong as exc:
            self._run(self.sm.auth_result(conn.id, False, now,
                                          f"side {conn.side.value} auth line rejected: {exc}"))
            return
        if done is None:
            return
        line, conn.head = done
        conn.reader = None
        conn.state = "pending"
        self.rv._unauth.pop(conn.id, None)
        auth = self.auth_a if conn.side is Side.A else self.auth_b
        try:
            ok = bool(auth(line)) if auth is not None else True
        except Exception as exc:  # a verifier crash is a refusal, not a relay crash
            log.warning("session %s: side %s authenticator raised %r", self.sm.session_id,
                        conn.side.value, exc)
            ok = False
        trace.mark("relay.auth", f"{self.sm.session_id} {conn.side.value} {ok}")
        self._run(self.sm.auth_result(conn.id, ok, now,
                                      f"side {conn.side.value} failed authentication"))

    def _gone(self, conn: _Conn, reason: str) -> None:
        self.conns.pop(conn.id, None)
        self._close_raw(conn)
        log.debug("session %s: conn %d (side %s) %s", self.sm.session_id, conn.id,
                  conn.side.value, reason)
        self._run(self.sm.conn_closed(conn.id, self.rv._loop.time()))

    def _close_raw(self, conn: _Conn) -> None:
        self.rv._unauth.pop(conn.id, None)
        fd = conn.sock.fileno()
        if fd >= 0:
            self.rv._loop.remove_reader(fd)
        conn.sock.close()

    def _drop(self, cid: int, reason: str) -> None:
        conn = self.conns.pop(cid, None)
        if conn is None:
            return
        level = logging.INFO if "authenticat" in reason or "too many" in reason else logging.DEBUG
        log.log(level, "session %s: dropping conn %d (side %s): %s", self.sm.session_id,
                cid, conn.side.value, reason)
        if conn.state == "pairing":
            conn.state = "dropped"  # _start_pair closes it once the splice exists
        elif conn.state != "spliced":
            self._close_raw(conn)

    # ---------------------------------------------------------------------- pairs
    def _pair(self, a: int, b: int) -> None:
        ca, cb = self.conns[a], self.conns[b]
        loop = self.rv._loop
        for c in (ca, cb):
            loop.remove_reader(c.sock.fileno())
            c.state = "pairing"
        log.debug("session %s: pairing conn %d (A) with conn %d (B)", self.sm.session_id, a, b)
        task = loop.create_task(self._start_pair(ca, cb))
        self.rv._tasks.add(task)
        task.add_done_callback(self.rv._tasks.discard)

    async def _start_pair(self, ca: _Conn, cb: _Conn) -> None:
        cfg = self.rv.config
        head_ab, head_ba = ca.head, cb.head
        ca.head = cb.head = b""
        sp = await splice_sockets(
            ca.sock, cb.sock, mode=cfg.splice_mode, head_ab=head_ab, head_ba=head_ba,
            high_water=cfg.high_water, linger=cfg.linger,
            on_close=functools.partial(self._pair_closed, ca.id, cb.id))
        if sp.closed:
            return
        trace.mark("relay.spliced", self.sm.session_id)
        if self.splices is None:
            self.splices = {}
        self.splices[sp] = [sp.activity(), self.rv._loop.time()]
        dropped = ca.state == "dropped" or cb.state == "dropped"
        ca.state = cb.state = "spliced"
        if dropped:
            sp.close("dropped while pairing")

    def _pair_closed(self, a: int, b: int, sp: Splice) -> None:
        self.conns.pop(a, None)
        self.conns.pop(b, None)
        if self.splices is not None:
            self.splices.pop(sp, None)
        self.bytes_ab += sp.bytes_ab
        self.bytes_ba += sp.bytes_ba
        log.debug("session %s: pair %d/%d closed (%s): A->B %d B->A %d bytes in %.1fs",
                  self.sm.session_id, a, b, sp.close_reason, sp.bytes_ab, sp.bytes_ba,
                  (sp.ended_at or time.monotonic()) - sp.started_at)
        now = self.rv._loop.time()
        self._run(self.sm.conn_closed(a, now) + self.sm.conn_closed(b, now))

    def sweep_idle(self, now: float, idle: float) -> None:
        if not self.splices:
            return
        for sp, mark in list(self.splices.items()):
            act = sp.activity()
            if act != mark[0]:
                mark[0], mark[1] = act, now
            elif now - mark[1] >= idle:
                sp.close(f"idle for {idle:g}s")

    def live_splices(self) -> list[Splice]:
        return list(self.splices or ())

    # -------------------------------------------------------------------- closing
    def close(self, reason: str) -> None:
        self._run(self.sm.close(reason))

    def _closed(self, reason: str) -> None:
        loop = self.rv._loop
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        for lsock in self.lsocks or ():
            if lsock.fileno() >= 0:
                loop.remove_reader(lsock.fileno())
            lsock.close()
        self.rv._escr.pop(self.sm.session_id, None)
        for sp in list(self.splices or ()):
            sp.close("session closed")
        for conn in list(self.conns.values()):
            self._drop(conn.id, "session closed")
        self.rv._sessions.pop(self.sm.session_id, None)
        summary = SessionSummary(self.sm.session_id, self.ports[0], self.ports[1],
                                 time.monotonic() - self.opened, self.sm.pairs_total,
                                 self.bytes_ab, self.bytes_ba, reason)
        log.info("session %s closed (%s): %d pair(s), A->B %d B->A %d bytes, %.1fs",
                 summary.session_id, reason, summary.pairs, summary.bytes_ab, summary.bytes_ba,
                 summary.duration)
        if self.rv._on_session_closed is not None:
            try:
                self.rv._on_session_closed(summary)
            except Exception:
                log.exception("on_session_closed callback failed")


class Rendezvous:
    """Socket rendezvous for many sessions in the running event loop.

    Use as ``async with Rendezvous(cfg) as rv: port_a, port_b = await rv.open_session(...)``
    or call :meth:`aclose` yourself.
    """

    def __init__(self, config: RelayConfig | None = None, *,
                 on_session_closed: Callable[[SessionSummary], None] | None = None) -> None:
        self.config = config or RelayConfig()
        self._on_session_closed = on_session_closed
        self._sessions: dict[str, _Session] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._ids = 0
        self._loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self._sweeper: asyncio.TimerHandle | None = None
        self._closing = False
        # unauthenticated connections relay-wide, oldest first: conn id -> its session
        self._unauth: OrderedDict[int, _Session] = OrderedDict()
        self._escr: dict[str, EscrSession] = {}  # single-port (ESCR) sessions
        self._gate: EscrGate | None = None
        #: fetches signing keys for ESCR (srvd sets it to a plookup through its atClient)
        self.key_lookup: KeyLookup | None = None

    async def __aenter__(self) -> Rendezvous:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ------------------------------------------------------------------ public API
    async def open_session(self, session_id: str, auth_a: SideAuthenticator | None,
                           auth_b: SideAuthenticator | None) -> tuple[int, int]:
        """Bind ports A (client) and B (device) for ``session_id``; return them.

        ``auth_a``/``auth_b`` judge each side's first line; None means that side sends
        no auth line (legacy, unauthenticated relay mode) and its bytes are relayed as is.
        """
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        if self._closing:
            raise RelayCapacityError("relay is shutting down")
        if session_id in self._sessions:
            raise ValueError(f"session {session_id!r} already open")
        if len(self._sessions) >= self.config.max_sessions:
            log.warning("refusing session %s: %d sessions open (max_sessions)", session_id,
                        len(self._sessions))
            raise RelayCapacityError(f"the relay is full: {len(self._sessions)} sessions open "
                                     f"(max {self.config.max_sessions}; srvd --max-sessions)")
        lsocks = (self._listen(), self._listen())
        sm = RelaySession(session_id, self.config.policy, self._loop.time())
        sess = _Session(self, sm, auth_a, auth_b, lsocks)
        self._sessions[session_id] = sess
        sess.start()
        self._ensure_sweeper()
        log.info("session %s opened on %s: port A %d, port B %d", session_id,
                 self.config.bind_host, *sess.ports)
        return sess.ports

    async def open_escr_session(self, escr_session: EscrSession,
                                ports: tuple[int, int]) -> tuple[int, int]:
        """Register a single-port session: no ports of its own; its sockets come through
        the single port's ESCR gate (:meth:`adopt`). ``ports`` is what the reply advertises."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        sid = escr_session.session_id
        if self._closing:
            raise RelayCapacityError("relay is shutting down")
        if sid in self._sessions:
            raise ValueError(f"session {sid!r} already open")
        if len(self._sessions) >= self.config.max_sessions:
            raise RelayCapacityError(f"the relay is full: {len(self._sessions)} sessions open "
                                     f"(max {self.config.max_sessions}; srvd --max-sessions)")
        sm = RelaySession(sid, self.config.policy, self._loop.time())
        sess = _Session(self, sm, None, None, None, ports)
        self._sessions[sid] = sess
        self._escr[sid] = escr_session
        sess.start()
        self._ensure_sweeper()
        log.info("session %s opened on the single port (ESCR)", sid)
        return ports

    def escr_session(self, session_id: str) -> EscrSession | None:
        return self._escr.get(session_id)

    def escr_gate(self) -> EscrGate:
        if self._gate is None:
            self._gate = EscrGate(self, self.key_lookup)
        return self._gate

    def adopt(self, session_id: str, side: Side, sock: socket.socket, head: bytes) -> bool:
        """Hand an ESCR-authenticated socket to its session; False if the session is gone."""
        sess = self._sessions.get(session_id)
        if sess is None or sess.sm.closed:
            return False
        sess.adopt(side, sock, head)
        return True

    def close_session(self, session_id: str, reason: str = "closed by relay") -> bool:
        """Close a session now; False if it is not open."""
        sess = self._sessions.get(session_id)
        if sess is None:
            return False
        sess.close(reason)
        return True

    def session_ports(self, session_id: str) -> tuple[int, int] | None:
        sess = self._sessions.get(session_id)
        return sess.ports if sess else None

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._sessions

    def __len__(self) -> int:
        return len(self._sessions)

    def stats(self) -> dict[str, int]:
        """Cheap counters for monitoring and tests."""
        splices = [sp for s in self._sessions.values() for sp in s.live_splices()]
        return {
            "sessions": len(self._sessions),
            "pairs": len(splices),
            "pending": sum(len(s.conns) for s in self._sessions.values()) - 2 * len(splices),
            "unauthenticated": len(self._unauth) + (len(self._gate) if self._gate else 0),
            "buffered_bytes": sum(sp.buffered_bytes() for sp in splices),
        }

    async def aclose(self, timeout: float = 5.0) -> None:
        """Close every session and wait (bounded) for their pairs to finish closing."""
        self._closing = True
        splices = [sp for s in self._sessions.values() for sp in s.live_splices()]
        for sid in list(self._sessions):
            self.close_session(sid, "relay shutting down")
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for task in list(self._tasks):
            task.cancel()
        if self._gate is not None:
            self._gate.close()
        if splices:
            await asyncio.wait([asyncio.ensure_future(sp.wait_closed()) for sp in splices],
                               timeout=timeout)

    def evict_oldest_unauth(self, why: str) -> bool:
        """Drop the relay's oldest unauthenticated connection (False if there is none)."""
        if not self._unauth:
            return False
        cid, sess = self._unauth.popitem(last=False)
        sess._run(sess.sm.auth_result(cid, False, self._loop.time(), f"evicted: {why}"))
        if cid in sess.conns:  # the session no longer knew it: close it here
            sess._close_raw(sess.conns.pop(cid))
        return True

    # --------------------------------------------------------------- internals
    def _track_unauth(self, cid: int, sess: _Session) -> None:
        self._unauth[cid] = sess
        while len(self._unauth) > self.config.max_unauth_total:
            self.evict_oldest_unauth(f"more than {self.config.max_unauth_total} "
                                     "unauthenticated connections relay-wide")

    def _next_id(self) -> int:
        self._ids += 1
        return self._ids

    def _listen(self) -> socket.socket:
        host = self.config.bind_host
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, 0))
            sock.listen(self.config.backlog)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return sock

    def _configure(self, sock: socket.socket) -> None:
        """Keepalive + user timeout so a vanished peer cannot pin a pair forever."""
        sock.setblocking(False)
        cfg = self.config
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # ssh is interactive
            if cfg.keepalive is not None:
                idle, intvl, cnt = cfg.keepalive
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                if hasattr(socket, "TCP_KEEPIDLE"):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, intvl)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, cnt)
                if hasattr(socket, "TCP_USER_TIMEOUT"):  # also bounds unacked/zero-window data
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT,
                                    (idle + intvl * cnt) * 1000)
            if cfg.sock_buf:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, cfg.sock_buf)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, cfg.sock_buf)
        except OSError as exc:  # socket already reset by the peer: it will fail on read
            log.debug("socket options not applied: %s", exc)

    def _ensure_sweeper(self) -> None:
        idle = self.config.idle_timeout
        if idle is None or self._sweeper is not None:
            return
        self._sweeper = self._loop.call_later(min(idle / 4, 30.0), self._sweep)

    def _sweep(self) -> None:
        idle = self.config.idle_timeout
        assert idle is not None
        self._sweeper = None
        now = self._loop.time()
        for sess in list(self._sessions.values()):
            sess.sweep_idle(now, idle)
        if self._sessions and not self._closing:
            self._ensure_sweeper()
