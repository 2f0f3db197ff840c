"""The asyncio edges of sshnpd: atServer connection, monitor, session hand-over, shutdown.

Why sessions live elsewhere: a restart or upgrade of sshnpd must not cut live sessions, as a
restart of sshd does not (docs/decisions/0024-sessions-outlive-daemon.md). The daemon keeps
every decision and the replay memory; each accepted session is handed to its *session host*
(:mod:`.sessionhost`, one process per daemon, in a session of its own, so hundreds of
concurrent sessions still cost one process), which outlives the daemon until its last session
ended. Decisions come from :class:`.handler.DaemonHandler`;
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
import ssl
import time
from collections.abc import Awaitable
from typing import Any, Callable  # noqa: UP035 (3.8: abc generics are not subscriptable)
from typing import Awaitable as _TypingAwaitable  # noqa: UP035

from noports import trace
from noports.atclient.aio import (
    AtClient,
    AtClientError,
    AtConnectError,
    AtProtocolError,
    AtSecondaryNotFound,
    AtTimeoutError,
    Notification,
)
from noports.cliargs import pid_alive as cliargs_pid_alive
from noports.compat import to_thread
from noports.keys.apsk import ensure_signing_key_published
from noports.keys.atkeys import AtKeys
from noports.npproto.keys import daemon_subscription_regex

from .authorized_keys import AuthorizedKeys, AuthorizedKeysError
from .config import DaemonConfig
from .handler import (
    AddClientKey,
    DaemonHandler,
    Ignore,
    Inbound,
    NptPlan,
    Reply,
    Request,
    SessionPlan,
)
from .handoff import HostError, HostLink, host_argv
from .liveness import (
    CHECK_INTERVAL_S,
    MONITOR_HEARTBEAT_TIMEOUT_S,
    PROBE_TIMEOUT_S,
    RECONNECT_BACKOFF_BASE_S,
    RECONNECT_BACKOFF_MAX_S,
    LivenessRule,
    RevocationGate,
    Sample,
    backoff_delay,
    revoked_message,
    sd_notify,
    watchdog_interval,
)
from .seen import SeenRequests, SeenStoreError
from .sessionorder import SessionOrder
from .sshkeys import load_host_keys

log = logging.getLogger("noports.sshnpd")

SHARE_INTERVAL_S = 3600.0  # username/device_info refresh (official: hourly)
PUBLIC_KEY_CACHE_S = 3600.0
CONNECT_TIMEOUT_S = 10.0
SWEEP_INTERVAL_S = 60.0


class DaemonError(RuntimeError):
    """The daemon cannot run (bad keys, atSign unknown...): exit, do not retry."""


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a session host holding an authorized_keys line);
    unlike :func:`noports.cliargs.pid_alive`, a zombie (ended, not yet reaped) is not."""
    if not cliargs_pid_alive(pid) or pid <= 1:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[-1].split()[:1] != [b"Z"]
    except OSError:
        return True


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
        self.handler = DaemonHandler(config, keys.encrypt_private, escr_keys=keys)
        self.authorized_keys = AuthorizedKeys(config.authorized_keys)
        self.owner = f"{config.atsign}/{config.device}"  # tag on our ephemeral lines
        self.client: AtClient | None = None
        self.host_keys: list[str] = []
        self.host = HostLink(host_argv(config.log_format, config.verbose, self.owner,
                                       str(config.authorized_keys), config.session_host_idle))
        self.host.on_lost = self._host_lost
        self.host.on_idle = self._retire_host
        self._host_spawn: asyncio.Future[int] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.revocation = RevocationGate()  # our key refused as revoked: log in rarely
        self._pk_cache: dict[str, tuple[str, float]] = {}
        self._sem = asyncio.Semaphore(max(4, config.max_sessions))
        self._stop: asyncio.Event | None = None
        self._npt: dict[str, Any] = {}  # sid -> npt_session.NptSession

    # -- life cycle -----------------------------------------------------------------------------

    async def _publish_signing_key(self) -> None:
        assert self.client is not None
        try:
            uri = await ensure_signing_key_published(self.client, self.keys)
            log.info("ESCR signing key published at %s", uri)
        except Exception as exc:  # only single-port relays need it: never fatal
            log.warning("cannot publish the ESCR signing key (single-port relays will "
                        "refuse this device): %s", exc)

    async def run(self, stop: asyncio.Event) -> int:
        """Run until ``stop`` is set; returns the exit status."""
        self._stop = stop
        c = self.config
        try:
            removed = await to_thread(functools.partial(
                self.authorized_keys.remove_all_ephemeral, self.owner, alive=pid_alive))
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
        self._host_spawn = asyncio.ensure_future(self._spawn_host())
        # systemd: started and configured (a config/keys error has exited already); an
        # unreachable atServer must not block `systemctl start` (nor Ansible's service task)
        sd_notify(f"READY=1\nSTATUS=connecting {c.atsign} to its atServer")
        client = await self._connect()
        if client is None:
            return 0  # stopped while waiting for the atServer
        self.client = client
        publish = asyncio.create_task(self._publish_signing_key())  # ESCR (single port)
        self._tasks.add(publish)
        publish.add_done_callback(self._tasks.discard)
        beat = c.monitor_heartbeat
        monitor = client.monitor(
            daemon_subscription_regex(c.device), heartbeat_s=beat,
            heartbeat_timeout_s=min(MONITOR_HEARTBEAT_TIMEOUT_S, max(1.0, beat / 2)),
            backoff_base_s=RECONNECT_BACKOFF_BASE_S, backoff_max_s=RECONNECT_BACKOFF_MAX_S,
            on_refused=self._refused)
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
        """Let the session host go (its sessions continue), close the atServer connections."""
        log.info("shutting down: %d session(s) open", len(self.host.live),
                 extra={"event": "shutdown"})
        # npt sessions still run in this process (only ssh sessions have the session host):
        # they end with the daemon
        for npt in list(self._npt.values()):
            npt.close("daemon shutting down")
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5.0)
        if self._host_spawn is not None and not self._host_spawn.done():
            self._host_spawn.cancel()
        self.host.close()
        with contextlib.suppress(Exception):
            await monitor.aclose()
        if self.client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.client.close(), 5.0)

    async def _spawn_host(self) -> int:
        try:
            return await self.host.spawn()
        except HostError as exc:
            log.error("%s", exc, extra={"event": "session_host_failed"})
            return 0

    def _host_lost(self, sids: set[str]) -> None:
        """The host died under live sessions: their keys are ours to remove now."""
        async def clean() -> None:
            for sid in sids:
                with contextlib.suppress(OSError, ValueError):
                    await to_thread(self.authorized_keys.remove_session, sid)
        self._spawn(clean(), "clean after the session host")

    def _retire_host(self) -> None:
        """The host had no session for --session-host-idle seconds and nothing is in flight:
        let it go (it exits) and start a fresh one, a bare interpreter until its first order
        (memory: docs/decisions/0032-sshnpd-idle-memory.md)."""
        old = self.host
        if self._stop is not None and self._stop.is_set():
            return
        log.info("session host %d idle for %gs: replacing it by a fresh one", old.pid,
                 self.config.session_host_idle, extra={"event": "session_host_retired"})
        self.host = HostLink(old.argv)
        self.host.on_lost = self._host_lost
        self.host.on_idle = self._retire_host
        old.close()
        self._host_spawn = asyncio.ensure_future(self._spawn_host())
        self._spawn(self._reap(old), "reap the retired session host")

    @staticmethod
    async def _reap(old: HostLink) -> None:
        for _attempt in range(120):  # it exits as soon as it sees the end of its pipe
            if old.proc is None or old.proc.poll() is not None:
                return
            await asyncio.sleep(0.5)

    async def _ensure_host(self) -> bool:
        """The host is up (started at run(), started again if it died since)."""
        if self._host_spawn is not None and not self._host_spawn.done():
            await asyncio.shield(self._host_spawn)
        if not self.host.running:
            self.host = HostLink(self.host.argv)
            self.host.on_lost = self._host_lost
            self.host.on_idle = self._retire_host
            self._host_spawn = asyncio.ensure_future(self._spawn_host())
            await asyncio.shield(self._host_spawn)
        return self.host.running

    async def _connect(self) -> AtClient | None:
        """Connect and authenticate, retrying network failures with capped backoff."""
        c = self.config
        attempt = 0
        while self._stop is None or not self._stop.is_set():
            try:
                client = await self._client_factory(c.atsign, self.keys, c.root, self.ssl_ctx)
                self.revocation.cleared()
                return client
            except AtProtocolError as exc:
                delay = self._refused(exc)
                if delay is None:
                    raise DaemonError(f"cannot authenticate {c.atsign}: {exc}") from None
                if watchdog_interval():
                    sd_notify("WATCHDOG=1")
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

    def _refused(self, exc: AtProtocolError) -> float | None:
        """The atServer refused our login: a revoked key waits long (one error logged per
        revocation); other refusals keep their caller's behaviour (None)."""
        delay = self.revocation.refused(exc.code, time.monotonic())
        if delay is not None and self.revocation.first_refusal:
            log.error("%s", revoked_message(self.config.atsign, self.keys.enrollment_id,
                                            str(exc)), extra={"event": "revoked"})
            sd_notify(f"STATUS=enrollment revoked; retrying every {delay:.0f}s")
        return delay

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
        if bool(ready is not None and ready.is_set()) and self.revocation.cleared():
            log.info("%s logged in again: its enrollment is valid again", self.config.atsign,
                     extra={"event": "reinstated"})
        try:
            assert self.client is not None
            if not self.revocation.may_try(time.monotonic()):
                raise AtClientError("enrollment revoked: not logging in before the retry")
            # every step has its own timeout (lookup, TLS, from, pkam, noop); only a probe
            # outliving all of them, plus a command ahead of it, counts as hung
            bound = 6 * self.client.timeout + PROBE_TIMEOUT_S
            await asyncio.wait_for(self.client.command("noop:0", timeout=PROBE_TIMEOUT_S),
                                   bound)
        except asyncio.TimeoutError:
            probe = "hung"
        except AtProtocolError as exc:
            self._refused(exc)
            probe = "network"  # refused, not wedged: restarting would not help
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
            trace.mark("sshnpd.in", n.key)
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
            await self._npt_request(req)

    async def _send(self, reply: Reply) -> None:
        assert self.client is not None
        trace.mark("sshnpd.reply_out", reply.key_name)
        await self.client.notify(reply.to, reply.key_name, reply.value, ttl_ms=reply.ttl_ms)
        trace.mark("sshnpd.reply_acked", reply.key_name)
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
        trace.mark("sshnpd.ssh_request", req.sender)
        pk = await self._client_public_key(req.sender)
        if pk is None:
            return
        self.host_keys = load_host_keys(self.config.sshd_host_keys) or self.host_keys
        trace.mark("sshnpd.pk_ready", req.sender)
        # in a thread: the replay memory fsyncs (slow on SD cards) and keys are made here
        result = await to_thread(self.handler.on_ssh_request, req, pk, self.host_keys)
        trace.mark("sshnpd.planned", req.sender)
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

    # -- npt sessions (the runtime is npt_session.py) -----------------------------------------

    async def _npt_request(self, req: Request) -> None:
        pk = await self._client_public_key(req.sender)
        if pk is None:
            return
        result = await to_thread(self.handler.on_npt_request, req, pk)
        if isinstance(result, Reply) and result.value.startswith("Signature not verified"):
            fresh = await self._client_public_key(req.sender, refresh=True)
            if fresh is not None and fresh != pk:  # the client re-keyed: try once more
                result = await to_thread(self.handler.on_npt_request, req, fresh)
        if isinstance(result, Ignore):
            self._ignore(result)
        elif isinstance(result, Reply):
            log.warning("refusing npt session %s from %s: %s", result.session_id, req.sender,
                        result.value, extra={"event": "session_refused", "sender": req.sender,
                                             "session": result.session_id})
            await self._send(result)
        else:
            await self._start_npt(result)

    async def _start_npt(self, plan: NptPlan) -> None:
        from noports.relay.pump import connect_relay  # relay code loads with the first session

        from .npt_session import CONNECT_TIMEOUT_S as NPT_CONNECT_S
        from .npt_session import NptSession
        ctx = {"sender": plan.client, "session": plan.session_id}
        if self.host.busy + len(self._npt) >= self.config.max_sessions:
            await self._send(self.handler.npt_failed(plan, "too many sessions"))
            return
        try:
            control = await connect_relay(plan.relay_host, plan.relay_port, plan.auth_line,
                                          timeout=NPT_CONNECT_S)
        except OSError as exc:
            err = (f"cannot connect to the socket rendezvous {plan.relay_host}:"
                   f"{plan.relay_port}: {exc.strerror or exc}")
            log.warning("npt session %s failed: %s", plan.session_id, err,
                        extra={"event": "session_failed", **ctx})
            await self._send(self.handler.npt_failed(plan, err))
            return

        def ended(sess: NptSession, reason: str) -> None:
            self._npt.pop(plan.session_id, None)
            log.info("npt session %s ended (%s): %d connection(s), %d failed",
                     plan.session_id, reason, sess.connections_total, sess.failed_total,
                     extra={"event": "session_ended", "session": plan.session_id})

        sess = NptSession(plan, control, ended)
        self._npt[plan.session_id] = sess
        sess.start()
        log.info("npt session %s for %s: target %s:%d, relay %s:%d, cipher %s",
                 plan.session_id, plan.client, plan.target_host, plan.target_port,
                 plan.relay_host, plan.relay_port, plan.cipher_id,
                 extra={"event": "session_started", **ctx})
        await self._send(plan.response)

    # -- sessions -------------------------------------------------------------------------------

    async def _start_session(self, plan: SessionPlan) -> None:
        """Hand the session to the session host; answer the client once it runs there."""
        c = self.config
        sid = plan.session_id
        ctx = {"sender": plan.client, "session": sid}
        if not await self._ensure_host():
            await self._send(self.handler.tunnel_failed(plan, "the session host is not running"))
            return
        if self.host.busy >= c.max_sessions:
            log.warning("refusing session %s: %d sessions open", sid, self.host.busy,
                        extra={"event": "session_refused", **ctx})
            await self._send(self.handler.tunnel_failed(plan, "too many sessions"))
            return
        order = SessionOrder(
            session_id=sid, client=plan.client, relay_host=plan.relay_host,
            relay_port=plan.relay_port, auth_line=plan.auth_line, cipher_id=plan.cipher_id,
            key=plan.key, iv=plan.iv, public_line=plan.ephemeral.public_line,
            authorized_keys=str(self.authorized_keys.path),
            local_sshd_port=c.local_sshd_port, permissions=c.ephemeral_permissions,
            owner=self.owner, key_ttl=c.ephemeral_key_ttl,
            key_d2c=plan.d2c[0] if plan.d2c else None, iv_d2c=plan.d2c[1] if plan.d2c else None)
        if plan.d2c is not None:
            log.info("session %s: twin keys (a separate AES-CTR key per direction)", sid,
                     extra={"event": "twin_keys", "session": sid, "sender": plan.client})
        trace.mark("sshnpd.host_order", sid)
        err = await self.host.start(order)
        trace.mark("sshnpd.host_started", sid)
        if err:
            await self._send(self.handler.tunnel_failed(plan, err))
            return
        await self._send(plan.response)

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


__all__ = ["AtConnectError", "Daemon", "DaemonError"]
