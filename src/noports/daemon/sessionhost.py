"""sshnpd's session host: the process that carries sessions, so they outlive the daemon.

Why: restarting or upgrading sshnpd must not cut live sessions, as restarting sshd does not
(docs/decisions/0024-sessions-outlive-daemon.md). Each daemon starts one host (``python -m
noports.daemon.sessionhost``) in a session and process group of its own, and hands it every
accepted session as a :class:`.sessionorder.SessionOrder` on its stdin; the host reports each
session's fate on its stdout. When the daemon goes away (its pipe ends: stop, restart,
upgrade, crash) the host takes no more orders and exits once its last session ended; the new
daemon starts a host of its own (running the new code) for new sessions.

The host removes a session's ephemeral key line at the key's ttl or when the session ends,
whichever comes first, and on SIGTERM/SIGINT it closes every session, removes their keys and
exits (``systemctl kill sshnpd``, or the runner's whole-group stop). Nothing here decides
anything about the protocol: every decision was made by :mod:`.handler` in the daemon.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional  # noqa: UP035 (3.8)

from noports import trace
from noports.compat import to_thread
from noports.npproto.errors import IntegrityError
from noports.npproto.streamcipher import new_session_cipher
from noports.relay.pump import cipher_transforms, connect_relay
from noports.relay.splice import Splice, splice_sockets

from .authorized_keys import AuthorizedKeys, AuthorizedKeysError
from .sessionorder import MAX_LINE, HostEvent, OrderError, SessionOrder

log = logging.getLogger("noports.sshnpd")

CONNECT_TIMEOUT_S = 10.0
IDLE_CHECK_MAX_S = 5.0  # how often an idle host checks whether to announce ``idle``
CLIENT_WAIT_S = 60.0  # close a session whose client never reached the relay
SWEEP_GRACE_S = 60  # an ephemeral line is "expired" for any daemon ttl + this after writing
KEY_REMOVAL_MARGIN_S = 0.5  # removal starts this long before the ttl ends


@dataclass
class _Session:
    order: SessionOrder
    started: float
    splice: Optional[Splice] = None  # noqa: UP045 (3.8)
    timers: List[asyncio.TimerHandle] = field(default_factory=list)  # noqa: UP006


class SessionHost:
    """Runs the sessions it is ordered to; ``emit`` reports each one's fate."""

    def __init__(self, emit: Callable[[HostEvent], None]) -> None:
        self._emit = emit
        self._sessions: Dict[str, _Session] = {}  # noqa: UP006
        self._key_timers: Dict[str, asyncio.TimerHandle] = {}  # noqa: UP006
        self._tasks: set[asyncio.Task[Any]] = set()
        self.changed = asyncio.Event()  # something ended: the main loop re-checks idle()
        self.active_at = time.monotonic()  # last order or finished task (idle announcement)

    def idle(self) -> bool:
        return not (self._sessions or self._key_timers or self._tasks)

    @property
    def live(self) -> int:
        return len(self._sessions)

    def order(self, order: SessionOrder) -> None:
        self.active_at = time.monotonic()
        self._spawn(self._start(order), f"session {order.session_id}")

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._tasks.discard(t)
            self.active_at = time.monotonic()
            if not t.cancelled() and t.exception() is not None:
                log.error("%s: %s", name, t.exception())
            self.changed.set()
        task.add_done_callback(done)

    # -- one session --------------------------------------------------------------------------

    async def _start(self, o: SessionOrder) -> None:
        sid = o.session_id
        ctx = {"sender": o.client, "session": sid}
        loop = asyncio.get_running_loop()
        ak = AuthorizedKeys(o.authorized_keys)
        sess = _Session(o, loop.time())
        self._sessions[sid] = sess
        trace.mark("host.order", sid)
        written_at = loop.time()  # the line may be visible from here on
        # The three set-up steps run at once (the key write's fsyncs take longest); nothing
        # reaches sshd before the splice starts below, after all three, so no client can
        # try the key before it is written. A failure is reported as before, key first.
        key_t = asyncio.ensure_future(to_thread(functools.partial(
            ak.add_ephemeral, o.public_line, sid, o.local_sshd_port, o.permissions,
            owner=o.owner, until=int(time.time() + o.key_ttl + SWEEP_GRACE_S),
            holder=os.getpid())))
        local_t = asyncio.ensure_future(_open_local(o.local_sshd_port))
        relay_t = asyncio.ensure_future(connect_relay(o.relay_host, o.relay_port,
                                                      o.auth_line, timeout=CONNECT_TIMEOUT_S))
        steps = (key_t, local_t, relay_t)
        try:
            # the key write and the local connect always end (bounded, and reported first);
            # if either failed, the relay dial is not waited for
            await asyncio.wait((key_t, local_t))
            if key_t.exception() is not None or local_t.exception() is not None:
                relay_t.cancel()
            await asyncio.wait(steps)
        except BaseException:  # cancelled: the key write ends by itself, then is undone
            local_t.cancel()
            relay_t.cancel()
            raise
        socks = [t.result() for t in (local_t, relay_t)
                 if not t.cancelled() and t.exception() is None]
        key_exc = key_t.exception()
        if key_exc is not None:
            for s in socks:
                s.close()
            self._sessions.pop(sid, None)
            if not isinstance(key_exc, (OSError, AuthorizedKeysError)):
                raise key_exc
            log.error("cannot authorize the ephemeral key of session %s: %s", sid, key_exc,
                      extra={"event": "session_failed", **ctx})
            self._emit(HostEvent("failed", sid, "cannot authorize session key"))
            return
        # "gone within ttl": start the removal early enough to cover the locked rewrite + fsync
        trace.mark("host.key_written", sid)
        remove_in = max(0.0, o.key_ttl - KEY_REMOVAL_MARGIN_S - (loop.time() - written_at))
        self._key_timers[sid] = loop.call_later(remove_in, self._expire_key, o)
        err = _step_error(local_t, f"cannot connect to the local sshd on port "
                          f"{o.local_sshd_port}") or _step_error(
            relay_t, f"cannot connect to the socket rendezvous {o.relay_host}:{o.relay_port}")
        if err is not None:
            for s in socks:
                s.close()
            await self._fail(sess, err)
            return
        local, relay = local_t.result(), relay_t.result()
        trace.mark("host.relay_connected", sid)
        sess.splice = await self._splice(sess, local, relay)
        sess.timers.append(loop.call_later(CLIENT_WAIT_S, self._check_client_arrived, sid))
        log.info("session %s for %s: relay %s:%d, cipher %s", sid, o.client, o.relay_host,
                 o.relay_port, o.cipher_id or "none (plain)",
                 extra={"event": "session_started", **ctx})
        trace.mark("host.started", sid)
        self._emit(HostEvent("started", sid))

    async def _splice(self, sess: _Session, local: socket.socket,
                      relay: socket.socket) -> Splice:
        o = sess.order
        holder: list[Splice] = []
        to_relay = from_relay = None
        if o.cipher_id is not None:
            assert o.key is not None and o.iv is not None
            d2c = None if o.key_d2c is None or o.iv_d2c is None else (o.key_d2c, o.iv_d2c)
            cipher = new_session_cipher(o.cipher_id, o.key, o.iv, is_client=False, d2c=d2c)

            def decrypt(data: bytes) -> bytes:
                try:
                    return cipher.decrypt(data)
                except IntegrityError as exc:
                    log.warning("session %s: %s; closing", o.session_id, exc,
                                extra={"event": "integrity_failure",
                                       "session": o.session_id})
                    if holder:
                        asyncio.get_running_loop().call_soon(holder[0].close,
                                                             "integrity failure")
                    return b""

            to_relay, from_relay = cipher_transforms(cipher, decrypt)
        sp = await splice_sockets(local, relay, transform_ab=to_relay, transform_ba=from_relay,
                                  on_close=lambda s: self._session_closed(o, s))
        holder.append(sp)
        return sp

    def _session_closed(self, o: SessionOrder, sp: Splice) -> None:
        sess = self._sessions.pop(o.session_id, None)
        if sess is None:
            return
        for t in sess.timers:
            t.cancel()
        # "clean": both ends sent and checked their end-of-stream frames; "aborted: ...":
        # a real cut (relay or client gone mid-stream), worth a warning
        level = logging.WARNING if sp.close_reason.startswith("aborted") else logging.INFO
        log.log(level, "session %s ended (%s): %d bytes to the client, %d from it",
                o.session_id, sp.close_reason, sp.bytes_ab, sp.bytes_ba,
                extra={"event": "session_ended", "session": o.session_id})
        self._emit(HostEvent("ended", o.session_id))
        timer = self._key_timers.pop(o.session_id, None)
        if timer is not None:  # the session is over: its key need not wait for the ttl
            timer.cancel()
            self._spawn(self._remove_key(o), f"remove {o.session_id}")
        self.changed.set()

    async def _fail(self, sess: _Session, err: str) -> None:
        o = sess.order
        self._sessions.pop(o.session_id, None)
        for t in sess.timers:
            t.cancel()
        timer = self._key_timers.pop(o.session_id, None)
        if timer is not None:
            timer.cancel()
        log.warning("session %s failed: %s", o.session_id, err,
                    extra={"event": "session_failed", "session": o.session_id,
                           "sender": o.client})
        with contextlib.suppress(OSError, ValueError):
            await to_thread(AuthorizedKeys(o.authorized_keys).remove_session, o.session_id)
        self._emit(HostEvent("failed", o.session_id, err))

    def _expire_key(self, o: SessionOrder) -> None:
        self._key_timers.pop(o.session_id, None)
        self._spawn(self._remove_key(o), f"expire {o.session_id}")

    async def _remove_key(self, o: SessionOrder) -> None:
        sid = o.session_id
        try:
            n = await to_thread(AuthorizedKeys(o.authorized_keys).remove_session, sid)
        except (OSError, ValueError) as exc:
            log.error("could not remove the ephemeral key of session %s: %s", sid, exc,
                      extra={"event": "key_removal_failed", "session": sid})
            return
        if n:
            log.info("ephemeral key of session %s removed (%d line)", sid, n,
                     extra={"event": "key_removed", "session": sid})

    def _check_client_arrived(self, sid: str) -> None:
        sess = self._sessions.get(sid)
        if sess is not None and sess.splice is not None and sess.splice.bytes_ba == 0:
            sess.splice.close("the client never connected")

    async def close_all(self, reason: str) -> None:
        """SIGTERM: end every session now and remove every key we wrote."""
        orders = [s.order for s in self._sessions.values()]
        for t in self._key_timers.values():
            t.cancel()
        self._key_timers.clear()
        for sess in list(self._sessions.values()):
            for t in sess.timers:
                t.cancel()
            if sess.splice is not None:
                sess.splice.close(reason)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5.0)
        for o in orders:
            with contextlib.suppress(OSError, ValueError):
                await to_thread(AuthorizedKeys(o.authorized_keys).remove_session, o.session_id)


def _step_error(task: asyncio.Future[Any], what: str) -> str | None:
    """``what: <cause>`` if a set-up step failed (a cancelled one: the other failed first)."""
    if task.cancelled():
        return None
    exc = task.exception()
    if exc is None:
        return None
    if isinstance(exc, OSError):
        return f"{what}: {exc.strerror or exc}"
    raise exc


async def _open_local(port: int) -> socket.socket:
    """Connect to the local sshd on 127.0.0.1, then ::1 (it may listen on only one)."""
    loop = asyncio.get_running_loop()
    last: OSError | None = None
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, (host, port)), CONNECT_TIMEOUT_S)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        except (OSError, asyncio.TimeoutError) as exc:
            sock.close()
            last = exc if isinstance(exc, OSError) else TimeoutError("timed out")
    assert last is not None
    raise last


# --- the process ---------------------------------------------------------------------------

class _Out:
    """Events to the daemon on fd 1; once the daemon is gone, writes are dropped."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.open = True

    def __call__(self, ev: HostEvent) -> None:
        if not self.open:
            return
        try:
            os.write(self.fd, ev.to_line())
        except OSError:  # EPIPE: the daemon exited; its successor has a host of its own
            self.open = False


async def announce_idle(host: SessionHost, out: Callable[[HostEvent], None],
                        idle_after: float) -> None:
    """Say ``idle`` once per idle spell of ``idle_after`` seconds (no session, key or task):
    the daemon may then let this host go and start a fresh one, a bare interpreter until its
    first order (docs/decisions/0032-sshnpd-idle-memory.md)."""
    said = False
    while True:
        await asyncio.sleep(min(IDLE_CHECK_MAX_S, idle_after / 2))
        quiet = host.idle() and time.monotonic() - host.active_at >= idle_after
        if quiet and not said:
            out(HostEvent("idle"))
        said = quiet


async def serve(order_fd: int = 0, event_fd: int = 1, pending: bytes | None = None,
                idle_after: float = 0.0) -> int:
    """Take orders until the daemon's pipe ends, then exit when the last session ends.

    ``pending``: what :mod:`.sessionhost_start` already read from the pipe (it announced
    ``ready`` itself, so this does not). ``idle_after`` > 0: announce idle spells."""
    loop = asyncio.get_running_loop()
    out = _Out(event_fd)
    host = SessionHost(out)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    with contextlib.suppress(ValueError, OSError):
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    reader = asyncio.StreamReader(limit=MAX_LINE + 1)
    if pending:
        reader.feed_data(pending)  # ahead of anything the pipe brings next
    transport, _protocol = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(order_fd, "rb", 0))
    if pending is None:
        out(HostEvent("ready", pid=os.getpid()))
    log.debug("session host %d ready", os.getpid(), extra={"event": "session_host_ready"})

    async def orders() -> None:
        while True:
            try:
                line = await reader.readline()
            except (ValueError, asyncio.LimitOverrunError):
                log.error("session host: order line too long; ignoring the daemon from now on")
                return
            if not line:
                return
            try:
                host.order(SessionOrder.from_line(line))
            except OrderError as exc:
                log.error("session host: %s", exc)

    reading = asyncio.ensure_future(orders())
    stopping = asyncio.ensure_future(stop.wait())
    idler = asyncio.ensure_future(announce_idle(host, out, idle_after) if idle_after > 0
                                  else asyncio.sleep(0))
    await asyncio.wait({reading, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if not stop.is_set():
        out.open = False
        if host.live:
            log.info("sshnpd is gone: %d session(s) continue in session host %d until they "
                     "end", host.live, os.getpid(), extra={"event": "sessions_continue"})
        while not host.idle() and not stop.is_set():
            host.changed.clear()
            changed = asyncio.ensure_future(host.changed.wait())
            await asyncio.wait({changed, stopping}, return_when=asyncio.FIRST_COMPLETED)
            changed.cancel()
    if stop.is_set():
        log.info("session host %d stopping: closing %d session(s)", os.getpid(), host.live,
                 extra={"event": "session_host_stop"})
        await host.close_all("session host stopped")
    reading.cancel()
    stopping.cancel()
    idler.cancel()
    transport.close()
    return 0


def main(argv: Sequence[str] | None = None, pending: bytes | None = None) -> int:
    p = argparse.ArgumentParser(prog="sshnpd-sessions",
                                description="sshnpd's session host (started by sshnpd only)")
    p.add_argument("--log-format", choices=("text", "json"), default="text")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--for", dest="owner", default="",
                   help="the daemon's atSign/device (shown in ps)")
    p.add_argument("--authorized-keys", default="", help="shown in ps")
    p.add_argument("--idle", type=float, default=0.0, metavar="SECONDS",
                   help="say 'idle' after this long without sessions (0: never)")
    args = p.parse_args(argv)
    from .cli import setup_logging
    setup_logging(args.log_format, args.verbose)
    try:
        return asyncio.run(serve(pending=pending, idle_after=args.idle))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
