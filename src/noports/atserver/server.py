"""asyncio edge of the atServer: TLS listeners (one port per hosted atSign) and jobs.

Why: sockets, timers and signals are the only I/O here; framing, line limits and every verb
are in Session/Host (sans-IO). Connections are counted from TCP accept, before TLS, in total
and per source address across all hosted atSigns (noports.netlimits), the TLS handshake and
the time to authenticate have deadlines, and idle TLS connections use small buffers
(docs/atserver.md "Limits"). One process
hosts many atSigns; the `hosted` table is polled every `poll_s` (0.5 s) so atSigns added or
removed with the admin API/CLI are picked up while running. A port of 0 means "let the OS
choose"; the chosen port is written back, so it stays stable across restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import ssl
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from noports import netlimits
from noports.keys import ca

from .delivery import Deliverer
from .host import Host, ServerConfig, fresh_meta_storage, wall_clock_ms
from .s2s import Outbound, Resolver
from .session import Reply, Session
from .store import Store
from .walsync import WalSync

log = logging.getLogger("noports.atserver")

MAX_PENDING_WRITE = 32 * 1024 * 1024
READ_CHUNK = 65536


@dataclass
class ServeOptions:
    state_dir: Path
    tls_dir: Path
    root: tuple[str, int] | None
    bind_host: str = "127.0.0.1"
    public_host: str | None = None
    config: ServerConfig = field(default_factory=ServerConfig)
    static_map: dict[str, tuple[str, int]] = field(default_factory=dict)
    poll_s: float = 0.5
    announce: Callable[[str, str, int], None] | None = None


class AtServer:
    """Hosts every atSign of one state directory."""

    def __init__(self, opts: ServeOptions) -> None:
        self.opts = opts
        self.public_host = opts.public_host or opts.bind_host
        self.store = Store.open_state_dir(opts.state_dir)
        names = [n for n in dict.fromkeys([self.public_host, opts.bind_host, "localhost"])
                 if n not in ("0.0.0.0", "::", "")]
        files = ca.TlsFiles(Path(opts.tls_dir))
        if files.cert.exists() and files.key.exists() and not files.ca_key.exists():
            self.tls = files  # operator-supplied certificate: use as is, never re-issue
        else:
            self.tls = ca.ensure_plane_tls(Path(opts.tls_dir), names)
        self.server_ctx = ca.server_context(self.tls)
        ca_file = self.tls.ca_cert if self.tls.ca_cert.exists() else None  # else system store
        self.client_ctx = ca.client_context(ca_file, self.tls)
        root_ctx = ca.client_context(ca_file)
        self.resolver = Resolver(opts.root[0] if opts.root else None,
                                 opts.root[1] if opts.root else 64, root_ctx,
                                 static=dict(opts.static_map))
        self.outbound = Outbound(self.resolver, self.client_ctx, self._signing_key,
                                 self._store_proof)
        self.hosts: dict[str, Host] = {}
        self.listeners: dict[str, asyncio.base_events.Server] = {}
        self._generation: dict[str, int] = {}  # hosted.created of each listener's row
        self.conns: dict[str, set[asyncio.StreamWriter]] = {}
        self._bind_failed: set[str] = set()
        self.walsync = WalSync(self.store.wal_path)
        self.deliverer = Deliverer(self.store, self.outbound, opts.config, wall_clock_ms,
                                   lambda: set(self.hosts))
        self._tasks: list[asyncio.Task[None]] = []
        self._stop = asyncio.Event()
        cfg = opts.config
        self.admission = netlimits.Admission(cfg.max_connections, cfg.max_connections_per_ip)
        self.releaser = netlimits.MemoryReleaser()
        self._close_log = netlimits.RateLimitedLog(log)  # one line/s when a flood times out

    # --- callbacks for s2s ----------------------------------------------------------------

    def _signing_key(self, me: str) -> str | None:
        h = self.hosts.get(me)
        return h.signing_private_key() if h else None

    def _store_proof(self, me: str, key: str, sig: str) -> None:
        now = wall_clock_ms()
        ttl = self.opts.config.pol_proof_ttl_ms
        meta = fresh_meta_storage(me, now, ttl=ttl, expires_at=now + ttl, is_encrypted=False)
        self.store.put(me, key, sig, meta, commit=False, expires_at=now + ttl)

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        netlimits.make_idle_tls_cheap()
        self.store.clear_listening()
        await self.sync_hosted()
        self._tasks.append(asyncio.create_task(self._poll_loop(), name="hosted-poll"))
        self._tasks.append(asyncio.create_task(self.deliverer.run(), name="delivery"))
        self._tasks.append(asyncio.create_task(self._jobs_loop(), name="jobs"))

    async def run_until_stopped(self) -> None:
        await self._stop.wait()
        await self.shutdown()

    def request_stop(self) -> None:
        self._stop.set()

    async def shutdown(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(BaseException):
                await t
        await self.deliverer.stop()
        for at in list(self.listeners):
            await self._stop_listener(at)
        self.outbound.close_all()
        with contextlib.suppress(Exception):
            self.store.clear_listening()
        self.store.close()

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(self.opts.poll_s)
            try:
                await self.sync_hosted()
            except Exception:
                log.exception("polling the hosted table failed")

    async def _jobs_loop(self) -> None:
        last_purge = 0.0
        loop = asyncio.get_running_loop()
        interval = self.opts.config.stats_interval_s
        while True:
            await asyncio.sleep(max(1.0, interval) if interval > 0 else 15.0)
            try:
                now = wall_clock_ms()
                if interval > 0:
                    for h in list(self.hosts.values()):
                        h.stats_changed()
                if loop.time() - last_purge > 60:
                    last_purge = loop.time()
                    k = self.store.purge_expired_keys(now)
                    n = self.store.purge_expired_notifications(now)
                    n += self.store.purge_expired_enrollment_data(now)
                    if k or n:
                        log.info("expiry job removed %d keys, %d notifications", k, n)
                self.outbound.reap_idle()
            except Exception:
                log.exception("periodic job failed")

    async def sync_hosted(self) -> None:
        """Start listeners for new hosted atSigns, stop those removed."""
        rows = self.store.hosted()
        for at in list(self.listeners):
            row = rows.get(at)
            if row is None or row.created != self._generation.get(at):
                # removed, or removed and re-added between two polls (new keys, new secret)
                log.info("%s is no longer hosted%s; closing its port", at,
                         "" if row is None else " as before (re-added)")
                await self._stop_listener(at)
                self.hosts.pop(at, None)
        for at, row in rows.items():
            if at in self.listeners:
                continue
            self._generation[at] = row.created
            if at not in self.hosts:
                host = Host(at, self.store, self.opts.config, remote=self.outbound,
                            nudge=self.deliverer.nudge, send_early=self.deliverer.send_early,
                            flush=self.walsync)
                host.ensure_startup_keys()
                self.hosts[at] = host
            await self._start_listener(at, row.port)

    async def _start_listener(self, at: str, port: int) -> None:
        host = self.hosts[at]

        async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self._serve_connection(host, reader, writer)

        try:
            srv = await netlimits.start_guarded_server(
                on_conn, self.opts.bind_host, port, ssl=self.server_ctx,
                admission=self.admission, limit=READ_CHUNK, releaser=self.releaser,
                handshake_timeout=self.opts.config.tls_handshake_timeout_s,
                refusal=_refusal_line)
        except OSError as exc:
            if at not in self._bind_failed:
                log.error("cannot listen for %s on %s:%s: %s", at, self.opts.bind_host, port, exc)
                self._bind_failed.add(at)
            return
        self._bind_failed.discard(at)
        bound = srv.sockets[0].getsockname()[1]
        self.listeners[at] = srv
        self.store.mark_listening(at, bound, os.getpid())
        if self.opts.announce:
            self.opts.announce(at, self.public_host, bound)
        log.info("%s listening on %s:%d", at, self.opts.bind_host, bound)

    async def _stop_listener(self, at: str) -> None:
        srv = self.listeners.pop(at, None)
        if srv is None:
            return
        srv.close()
        for w in list(self.conns.get(at, ())):
            with contextlib.suppress(Exception):
                w.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(srv.wait_closed(), 2)
        with contextlib.suppress(Exception):
            self.store.clear_listening(at)

    # --- one connection -------------------------------------------------------------------

    async def _serve_connection(self, host: Host, reader: asyncio.StreamReader,
                                writer: asyncio.StreamWriter) -> None:
        conns = self.conns.setdefault(host.atsign, set())
        conns.add(writer)

        def emit(line: str) -> None:
            if writer.is_closing():
                return
            if writer.transport.get_write_buffer_size() > MAX_PENDING_WRITE:
                log.warning("monitor client on %s is not reading; closing", host.atsign)
                writer.close()
                return
            writer.write(line.encode("utf-8"))

        session = Session(host, emit=emit)
        session.hangup = writer.close  # a revoked enrollment's connections end at once
        loop = asyncio.get_running_loop()
        auth_deadline = loop.time() + host.config.auth_timeout_s
        peer = writer.get_extra_info("peername")
        proven = False  # told the admission (never evicted once authenticated)
        try:
            writer.write(b"@")
            await writer.drain()
            while True:
                timeout = None
                if not (session.authenticated or session.pol_atsign):
                    timeout = max(0.0, auth_deadline - loop.time())
                try:
                    chunk = await asyncio.wait_for(reader.read(READ_CHUNK), timeout)
                except asyncio.TimeoutError:
                    self._close_log.log(
                        logging.INFO, "closing connection from %s to %s: not authenticated "
                        "within %g s (--auth-timeout), %d requests made", peer, host.atsign,
                        host.config.auth_timeout_s, session.requests)
                    await self._send(writer, session.auth_timed_out().text)
                    return
                if not chunk:
                    break
                session.feed(chunk)
                while (item := session.next_line()) is not None:
                    reply = item if isinstance(item, Reply) else await session.handle(item)
                    if not proven and (session.authenticated or session.pol_atsign):
                        proven = netlimits.mark_proven(writer) or True
                    if reply.text:
                        await self._send(writer, reply.text)
                    if reply.close:
                        if isinstance(item, Reply):
                            log.warning("closing connection from %s to %s: %s", peer,
                                        host.atsign, (reply.text or "").split("\n", 1)[0])
                        return
        except (ConnectionError, ssl.SSLError, OSError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("connection handler failed on %s", host.atsign)
        finally:
            session.close()
            conns.discard(writer)
            await netlimits.aclose_writer(writer)

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, text: str | None) -> None:
        if text:
            writer.write(text.encode("utf-8"))  # one write: `<body>\n<prompt>`
            await writer.drain()


def _refusal_line(reason: str) -> bytes:
    """What a peer refused at accept reads (then the connection closes)."""
    return f"error:AT0012-Inbound connection limit exceeded: {reason}\n".encode()


def install_signal_handlers(server: AtServer) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, server.request_stop)


def announce_stderr(at: str, host: str, port: int) -> None:
    print(f"atserver {at} listening on {host}:{port}", file=sys.stderr, flush=True)


async def serve(opts: ServeOptions) -> None:
    server = AtServer(opts)
    install_signal_handlers(server)
    await server.start()
    await server.run_until_stopped()
