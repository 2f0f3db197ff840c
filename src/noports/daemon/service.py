"""The asyncio edges of sshnpd: atServer connection, monitor, sessions, timers, shutdown.

Why one event loop: a session costs two sockets and a splice, no process or thread (the
official daemon forks ``srv`` per session), so hundreds of concurrent sessions stay cheap and
shutdown can close every one of them. Decisions come from :class:`.handler.DaemonHandler`;
this module only performs them and keeps the daemon alive through bad input (every
notification is handled in its own task, any failure is logged and dropped) and through
atServer outages (the monitor reconnects and replays from its cursor; commands reconnect on
the next use).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import pwd
import random
import socket
import ssl
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, Callable  # noqa: UP035 (3.8: abc generics are not subscriptable)
from typing import Awaitable as _TypingAwaitable  # noqa: UP035

from noports.atclient.aio import (
    AtClient,
    AtClientError,
    AtConnectError,
    AtProtocolError,
    AtSecondaryNotFound,
    AtTimeoutError,
    Notification,
)
from noports.compat import to_thread
from noports.keys.atkeys import AtKeys
from noports.npproto.errors import IntegrityError
from noports.npproto.keys import daemon_subscription_regex
from noports.npproto.streamcipher import new_session_cipher
from noports.relay.pump import cipher_transforms, connect_relay
from noports.relay.splice import Splice, splice_sockets

from .authorized_keys import AuthorizedKeys, AuthorizedKeysError
from .config import DaemonConfig
from .handler import (
    AddClientKey,
    DaemonHandler,
    Ignore,
    Inbound,
    Reply,
    Request,
    SessionPlan,
)
from .liveness import (
    CHECK_INTERVAL_S,
    MONITOR_HEARTBEAT_TIMEOUT_S,
    PROBE_TIMEOUT_S,
    RECONNECT_BACKOFF_BASE_S,
    RECONNECT_BACKOFF_MAX_S,
    LivenessRule,
    Sample,
    backoff_delay,
    sd_notify,
    watchdog_interval,
)
from .seen import SeenRequests, SeenStoreError
from .sshkeys import load_host_keys

log = logging.getLogger("noports.sshnpd")

SHARE_INTERVAL_S = 3600.0  # username/device_info refresh (official: hourly)
PUBLIC_KEY_CACHE_S = 3600.0
CONNECT_TIMEOUT_S = 10.0
CLIENT_WAIT_S = 60.0  # close a session whose client never reached the relay
SWEEP_INTERVAL_S = 60.0
SWEEP_GRACE_S = 60  # an ephemeral line is "expired" for any daemon ttl + this after writing
KEY_REMOVAL_MARGIN_S = 0.5  # removal starts this long before the ttl ends


class DaemonError(RuntimeError):
    """The daemon cannot run (bad keys, atSign unknown...): exit, do not retry."""


@dataclass
class _Session:
    plan: SessionPlan
    started: float
    splice: Splice | None = None
    timers: list[asyncio.TimerHandle] = field(default_factory=list)


ClientFactory = Callable[..., _TypingAwaitable[AtClient]]


class Daemon:
    """One sshnpd: ``await Daemon(cfg, keys, ssl_ctx=...).run(stop_event)``."""

    def __init__(self, config: DaemonConfig, keys: AtKeys, *,
                 ssl_ctx: ssl.SSLContext | None = None,
                 client_factory: ClientFactory = AtClient.connect,
                 username: str | None = None) -> None:
        self.config = config
        self.keys = keys
        self.ssl_ctx = ssl_ctx
        self._client_factory = client_factory
        self.username = username or pwd.getpwuid(os.geteuid()).pw_name
        self.handler = DaemonHandler(config, keys.encrypt_private)
        self.authorized_keys = AuthorizedKeys(config.authorized_keys)
        self.owner = f"{config.atsign}/{config.device}"  # tag on our ephemeral lines
        self.client: AtClient | None = None
        self.host_keys: list[str] = []
        self._sessions: dict[str, _Session] = {}
        self._key_timers: dict[str, asyncio.TimerHandle] = {}  # sid -> key removal
        self._tasks: set[asyncio.Task[Any]] = set()
        self._pk_cache: dict[str, tuple[str, float]] = {}
        self._sem = asyncio.Semaphore(max(4, config.max_sessions))
        self._stop: asyncio.Event | None = None

    # -- life cycle -----------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> int:
        """Run until ``stop`` is set; returns the exit status."""
        self._stop = stop
        c = self.config
        try:
            removed = await to_thread(self.authorized_keys.remove_all_ephemeral,
                                      self.owner)
        except OSError as exc:
            raise DaemonError(f"cannot edit {c.authorized_keys}: {exc.strerror or exc}") \
                from None
        if removed:
            log.info("removed %d leftover ephemeral key line(s) from %s", removed,
                     c.authorized_keys, extra={"event": "leftovers_removed"})
        try:  # the replay memory must be durable before any request is acted on
            self.handler.seen = await to_thread(SeenRequests.open, c.storage_dir)
        except SeenStoreError as exc:
            raise DaemonError(f"{exc} (set --storage-path to a writable directory)") from None
        log.info("replay memory %s: %d request(s) still inside the %gs window",
                 self.handler.seen.path, len(self.handler.seen), c.request_window,
                 extra={"event": "replay_memory"})
        self.host_keys = load_host_keys(c.sshd_host_keys)
        if not self.host_keys:
            log.warning("no sshd host public keys match %s: responses carry no host keys "
                        "to pin", c.sshd_host_keys)
        # systemd: started and configured (a config/keys error has exited already); an
        # unreachable atServer must not block `systemctl start` (nor Ansible's service task)
        sd_notify(f"READY=1\nSTATUS=connecting {c.atsign} to its atServer")
        client = await self._connect()
        if client is None:
            return 0  # stopped while waiting for the atServer
        self.client = client
        beat = c.monitor_heartbeat
        monitor = client.monitor(
            daemon_subscription_regex(c.device), heartbeat_s=beat,
            heartbeat_timeout_s=min(MONITOR_HEARTBEAT_TIMEOUT_S, max(1.0, beat / 2)),
            backoff_base_s=RECONNECT_BACKOFF_BASE_S, backoff_max_s=RECONNECT_BACKOFF_MAX_S)
        consumer = asyncio.create_task(self._consume(monitor), name="sshnpd consume")
        sharer = asyncio.create_task(self._share_loop(), name="sshnpd share")
        sweeper = asyncio.create_task(self._sweep_loop(), name="sshnpd sweep")
        checker = asyncio.create_task(self._liveness_loop(monitor), name="sshnpd liveness")
        stopper = asyncio.create_task(stop.wait())
        status = 0
        try:
            try:
                await asyncio.wait_for(monitor.wait_ready(), 60.0)
            except (AtProtocolError, AtSecondaryNotFound) as exc:
                raise DaemonError(f"monitor failed: {exc}") from None
            except (asyncio.TimeoutError, AtTimeoutError):
                log.warning("monitor not ready after 60s; still trying")
            else:
                log.info("sshnpd %s ready: device %r, managers %s", c.atsign, c.device,
                         ",".join(c.managers), extra={"event": "ready"})
                sd_notify(f"STATUS=serving {c.atsign} device {c.device}")
            done, _pending = await asyncio.wait({consumer, stopper},
                                                return_when=asyncio.FIRST_COMPLETED)
            if consumer in done and not stop.is_set():
                exc = consumer.exception()
                if exc is not None:
                    raise DaemonError(f"monitor failed: {exc}")
                status = 1
        finally:
            sd_notify("STOPPING=1")
            for t in (consumer, sharer, sweeper, checker, stopper):
                t.cancel()
            await self._shutdown(monitor)
        return status

    async def _shutdown(self, monitor: Any) -> None:
        """Close sessions, drop our ephemeral keys, close the atServer connections."""
        log.info("shutting down: %d session(s) open", len(self._sessions),
                 extra={"event": "shutdown"})
        sids = set(self._sessions) | set(self._key_timers)
        for t in self._key_timers.values():
            t.cancel()
        self._key_timers.clear()
        for sess in list(self._sessions.values()):
            for t in sess.timers:
                t.cancel()
            if sess.splice is not None:
                sess.splice.close("daemon shutting down")
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5.0)
        for sid in sids:
            with contextlib.suppress(OSError, ValueError):
                await to_thread(self.authorized_keys.remove_session, sid)
        with contextlib.suppress(Exception):
            await monitor.aclose()
        if self.client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.client.close(), 5.0)

    async def _connect(self) -> AtClient | None:
        """Connect and authenticate, retrying network failures with capped backoff."""
        c = self.config
        attempt = 0
        while self._stop is None or not self._stop.is_set():
            try:
                return await self._client_factory(c.atsign, self.keys, c.root, self.ssl_ctx)
            except AtProtocolError as exc:
                raise DaemonError(f"cannot authenticate {c.atsign}: {exc}") from None
            except (AtClientError, OSError, ssl.SSLError) as exc:
                delay = backoff_delay(attempt, jitter=random.uniform(0.5, 1.0))
                attempt += 1
                log.warning("cannot reach the atServer of %s (%s); retrying in %.1fs",
                            c.atsign, exc, delay, extra={"event": "connect_retry"})
                if watchdog_interval():  # each attempt ended within its timeouts: alive
                    sd_notify("WATCHDOG=1")
                if self._stop is None:
                    await asyncio.sleep(delay)
                else:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._stop.wait(), delay)
        return None

    # -- liveness -------------------------------------------------------------------------------

    async def _liveness_loop(self, monitor: Any) -> None:
        """Sample the daemon; feed systemd's watchdog only while the check passes."""
        interval = watchdog_interval()
        period = min(interval, CHECK_INTERVAL_S) if interval else CHECK_INTERVAL_S
        rule = LivenessRule()
        last_ok = True
        while True:
            await asyncio.sleep(period)
            verdict = rule.decide(await self._sample(monitor))
            if verdict.ok:
                if interval:
                    sd_notify("WATCHDOG=1")
                if not last_ok:
                    log.info("liveness check passes again: %s", verdict.reason,
                             extra={"event": "liveness_ok"})
            else:
                log.error("liveness check failed: %s%s", verdict.reason,
                          "; not feeding the systemd watchdog" if interval else "",
                          extra={"event": "liveness_failed"})
            last_ok = verdict.ok

    async def _sample(self, monitor: Any) -> Sample:
        """One self-check: monitor state, a ``noop:0`` on the command connection (it
        reconnects that connection when it died), a worker-thread round trip."""
        task = getattr(monitor, "_task", None)
        ready = getattr(monitor, "_ready", None)
        probe = "ok"
        try:
            assert self.client is not None
            # every step has its own timeout (lookup, TLS, from, pkam, noop); only a probe
            # outliving all of them, plus a command ahead of it, counts as hung
            bound = 6 * self.client.timeout + PROBE_TIMEOUT_S
            await asyncio.wait_for(self.client.command("noop:0", timeout=PROBE_TIMEOUT_S),
                                   bound)
        except asyncio.TimeoutError:
            probe = "hung"
        except (AtClientError, OSError, ssl.SSLError):
            probe = "network"
        try:
            await asyncio.wait_for(to_thread(time.monotonic), PROBE_TIMEOUT_S)
            worker_ok = True
        except asyncio.TimeoutError:
            worker_ok = False
        return Sample(now=time.monotonic(),
                      monitor_task_alive=task is None or not task.done(),
                      monitor_connected=bool(ready is not None and ready.is_set()),
                      probe=probe, worker_ok=worker_ok)

    # -- notifications --------------------------------------------------------------------------

    async def _consume(self, monitor: Any) -> None:
        async for n in monitor:
            self._spawn(self._process(n), f"notification {n.id}")

    def _spawn(self, coro: Awaitable[Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _process(self, n: Notification) -> None:
        """Handle one notification; nothing it contains can crash the daemon."""
        async with self._sem:
            try:
                await self._dispatch(Inbound(n.id, n.from_atsign, n.key, n.value,
                                             n.operation, n.error))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.error("failed to handle notification %s from %s: %s", n.id,
                          n.from_atsign, type(exc).__name__, exc_info=self.config.verbose,
                          extra={"event": "handler_error", "sender": n.from_atsign})

    def _ignore(self, ign: Ignore) -> None:
        log.log(ign.level, "%s", ign.reason, extra={
            "event": ign.event, "sender": ign.sender, "session": ign.session_id})

    async def _dispatch(self, inbound: Inbound) -> None:
        routed = self.handler.route(inbound)
        if isinstance(routed, Ignore):
            self._ignore(routed)
            return
        req: Request = routed
        log.debug("%s from %s", req.kind, req.sender,
                  extra={"event": req.kind, "sender": req.sender})
        if req.kind == "ping":
            await self._send(self.handler.on_ping(req))
        elif req.kind == "sshpublickey":
            await self._add_client_key(self.handler.on_sshpublickey(req))
        elif req.kind == "ssh_request":
            await self._ssh_request(req)
        elif req.kind == "npt_request":
            pk = await self._client_public_key(req.sender)
            if pk is None:
                return
            result = await to_thread(self.handler.on_npt_request, req, pk)
            if isinstance(result, Ignore):
                self._ignore(result)
            else:
                await self._send(result)

    async def _send(self, reply: Reply) -> None:
        assert self.client is not None
        await self.client.notify(reply.to, reply.key_name, reply.value, ttl_ms=reply.ttl_ms)
        if reply.is_error:
            what = "error reply"
        elif reply.session_id is not None:
            what = "session response"
        else:
            what = reply.key_name.split(".", 1)[0]
        log.info("sent %s to %s", what, reply.to,
                 extra={"event": "reply", "sender": reply.to, "session": reply.session_id})

    async def _add_client_key(self, action: AddClientKey | Ignore) -> None:
        if isinstance(action, Ignore):
            self._ignore(action)
            return
        try:
            added = await to_thread(self.authorized_keys.add_client_key,
                                    action.public_key,
                                    self.config.sshpublickey_permissions)
        except (AuthorizedKeysError, OSError) as exc:
            log.warning("could not add the public key of %s: %s", action.sender, exc,
                        extra={"event": "publickey_failed", "sender": action.sender})
            return
        log.info("%s public key of %s", "added" if added else "already have the",
                 action.sender, extra={"event": "publickey_added", "sender": action.sender})

    async def _client_public_key(self, atsign: str, refresh: bool = False) -> str | None:
        """``public:publickey@<client>``, cached for an hour (re-fetched on a bad signature)."""
        hit = self._pk_cache.get(atsign)
        if hit and not refresh and hit[1] > time.monotonic():
            return hit[0]
        assert self.client is not None
        try:
            value = await self.client.get_public("publickey", atsign)
        except AtClientError as exc:
            log.warning("cannot fetch the public key of %s: %s", atsign, exc,
                        extra={"event": "publickey_lookup_failed", "sender": atsign})
            return hit[0] if hit else None
        if not value:
            log.warning("%s has no public encryption key", atsign,
                        extra={"event": "publickey_lookup_failed", "sender": atsign})
            return None
        value = value.strip()
        self._pk_cache[atsign] = (value, time.monotonic() + PUBLIC_KEY_CACHE_S)
        return value

    async def _ssh_request(self, req: Request) -> None:
        pk = await self._client_public_key(req.sender)
        if pk is None:
            return
        self.host_keys = load_host_keys(self.config.sshd_host_keys) or self.host_keys
        # in a thread: the replay memory fsyncs (slow on SD cards) and keys are made here
        result = await to_thread(self.handler.on_ssh_request, req, pk, self.host_keys)
        if isinstance(result, Ignore) and result.event == "bad_signature":
            fresh = await self._client_public_key(req.sender, refresh=True)
            if fresh is not None and fresh != pk:  # the client re-keyed: try once more
                result = await to_thread(self.handler.on_ssh_request, req, fresh,
                                         self.host_keys)
        if isinstance(result, Ignore):
            self._ignore(result)
        elif isinstance(result, Reply):
            log.warning("refusing session %s from %s: %s", result.session_id, req.sender,
                        result.value, extra={"event": "session_refused", "sender": req.sender,
                                             "session": result.session_id})
            await self._send(result)
        else:
            await self._start_session(result)

    # -- sessions -------------------------------------------------------------------------------

    async def _start_session(self, plan: SessionPlan) -> None:
        c = self.config
        sid = plan.session_id
        ctx = {"sender": plan.client, "session": sid}
        if len(self._sessions) >= c.max_sessions:
            log.warning("refusing session %s: %d sessions open", sid, len(self._sessions),
                        extra={"event": "session_refused", **ctx})
            await self._send(self.handler.tunnel_failed(plan, "too many sessions"))
            return
        loop = asyncio.get_running_loop()
        sess = _Session(plan, loop.time())
        self._sessions[sid] = sess
        written_at = loop.time()  # the line may be visible from here on
        try:
            await to_thread(
                functools.partial(self.authorized_keys.add_ephemeral,
                                  plan.ephemeral.public_line, sid, c.local_sshd_port,
                                  c.ephemeral_permissions, owner=self.owner,
                                  until=int(time.time() + c.ephemeral_key_ttl + SWEEP_GRACE_S)))
        except (OSError, AuthorizedKeysError) as exc:
            self._sessions.pop(sid, None)
            log.error("cannot authorize the ephemeral key of session %s: %s", sid, exc,
                      extra={"event": "session_failed", **ctx})
            await self._send(self.handler.tunnel_failed(plan, "cannot authorize session key"))
            return
        # "gone within ttl": start the removal early enough to cover the locked rewrite + fsync
        remove_in = max(0.0, c.ephemeral_key_ttl - KEY_REMOVAL_MARGIN_S
                        - (loop.time() - written_at))
        self._key_timers[sid] = loop.call_later(remove_in, self._expire_key, sid)
        try:
            local = await _open_local(c.local_sshd_port)
        except OSError as exc:
            await self._fail_session(sess, f"cannot connect to the local sshd on port "
                                     f"{c.local_sshd_port}: {exc.strerror or exc}")
            return
        try:
            relay = await connect_relay(plan.relay_host, plan.relay_port, plan.auth_line,
                                        timeout=CONNECT_TIMEOUT_S)
        except OSError as exc:
            local.close()
            await self._fail_session(sess, f"cannot connect to the socket rendezvous "
                                     f"{plan.relay_host}:{plan.relay_port}: "
                                     f"{exc.strerror or exc}")
            return
        sess.splice = await self._splice(sess, local, relay)
        sess.timers.append(loop.call_later(CLIENT_WAIT_S, self._check_client_arrived, sid))
        log.info("session %s for %s: relay %s:%d, cipher %s", sid, plan.client,
                 plan.relay_host, plan.relay_port, plan.cipher_id or "none (plain)",
                 extra={"event": "session_started", **ctx})
        await self._send(plan.response)

    async def _splice(self, sess: _Session, local: socket.socket,
                      relay: socket.socket) -> Splice:
        plan = sess.plan
        holder: list[Splice] = []
        to_relay = from_relay = None
        if plan.cipher_id is not None:
            assert plan.key is not None and plan.iv is not None
            cipher = new_session_cipher(plan.cipher_id, plan.key, plan.iv, is_client=False)

            def decrypt(data: bytes) -> bytes:
                try:
                    return cipher.decrypt(data)
                except IntegrityError as exc:
                    log.warning("session %s: %s; closing", plan.session_id, exc,
                                extra={"event": "integrity_failure",
                                       "session": plan.session_id})
                    if holder:
                        asyncio.get_running_loop().call_soon(holder[0].close,
                                                             "integrity failure")
                    return b""

            to_relay, from_relay = cipher_transforms(cipher, decrypt)
        sp = await splice_sockets(local, relay, transform_ab=to_relay, transform_ba=from_relay,
                                  on_close=lambda s: self._session_closed(plan.session_id, s))
        holder.append(sp)
        return sp

    def _session_closed(self, sid: str, sp: Splice) -> None:
        sess = self._sessions.pop(sid, None)
        if sess is None:
            return
        for t in sess.timers:  # the key-expiry timer is separate: it must still run
            t.cancel()
        # "clean": both ends sent and checked their end-of-stream frames; "aborted: ...":
        # a real cut (relay or client gone mid-stream), worth a warning
        level = logging.WARNING if sp.close_reason.startswith("aborted") else logging.INFO
        log.log(level, "session %s ended (%s): %d bytes to the client, %d from it", sid,
                sp.close_reason, sp.bytes_ab, sp.bytes_ba,
                extra={"event": "session_ended", "session": sid})

    async def _fail_session(self, sess: _Session, err: str) -> None:
        sid = sess.plan.session_id
        self._sessions.pop(sid, None)
        for t in sess.timers:
            t.cancel()
        timer = self._key_timers.pop(sid, None)
        if timer is not None:
            timer.cancel()
        log.warning("session %s failed: %s", sid, err,
                    extra={"event": "session_failed", "session": sid,
                           "sender": sess.plan.client})
        with contextlib.suppress(OSError, ValueError):
            await to_thread(self.authorized_keys.remove_session, sid)
        await self._send(self.handler.tunnel_failed(sess.plan, err))

    def _expire_key(self, sid: str) -> None:
        self._key_timers.pop(sid, None)
        self._spawn(self._remove_key(sid), f"expire {sid}")

    async def _remove_key(self, sid: str) -> None:
        try:
            n = await to_thread(self.authorized_keys.remove_session, sid)
        except (OSError, ValueError) as exc:
            log.error("could not remove the ephemeral key of session %s: %s", sid, exc,
                      extra={"event": "key_removal_failed", "session": sid})
            return
        log.info("ephemeral key of session %s removed (%d line)", sid, n,
                 extra={"event": "key_removed", "session": sid})

    def _check_client_arrived(self, sid: str) -> None:
        sess = self._sessions.get(sid)
        if sess is not None and sess.splice is not None and sess.splice.bytes_ba == 0:
            sess.splice.close("the client never connected")

    async def _sweep_loop(self) -> None:
        """Remove expired ephemeral lines (ours missed by a timer, or a dead daemon's)."""
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            try:
                n = await to_thread(self.authorized_keys.remove_expired)
            except OSError as exc:
                log.warning("expired-key sweep failed: %s", exc)
                continue
            if n:
                log.info("removed %d expired ephemeral key line(s)", n,
                         extra={"event": "expired_removed"})

    # -- shared records -------------------------------------------------------------------------

    async def _share_loop(self) -> None:
        while True:
            await self._share_once()
            await asyncio.sleep(SHARE_INTERVAL_S)

    async def _share_once(self) -> None:
        """K8/K9 per manager (or their deletion with --hide); failures retried next hour."""
        assert self.client is not None
        for rec in self.handler.share_records(self.username):
            try:
                if rec.value is None:
                    with contextlib.suppress(AtProtocolError):  # absent already: fine
                        await self.client.delete(rec.atkey)
                else:
                    await self.client.put_shared(rec.to, rec.key_name, rec.value,
                                                 ttl_ms=rec.ttl_ms, ttr_ms=-1, ccd=True)
            except (AtClientError, OSError) as exc:
                log.warning("could not %s %s for %s: %s",
                            "delete" if rec.value is None else "share",
                            rec.key_name.split(".", 1)[0], rec.to, exc,
                            extra={"event": "share_failed", "sender": rec.to})
        log.info("%s username/device_info for %d manager(s)",
                 "deleted" if self.config.hide else "shared", len(self.config.managers),
                 extra={"event": "shared"})


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


__all__ = ["AtConnectError", "Daemon", "DaemonError"]
