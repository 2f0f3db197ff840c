"""asyncio TLS driver for :mod:`noports.directory.protocol`.

Why asyncio streams: each connection is a tiny request/reply loop, and anti-enumeration delays
must not hold a thread. Store calls that may block on the network (Redis) run in a worker thread;
SQLite point reads take microseconds, so they run inline (see docs/directory.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import ssl
from dataclasses import dataclass

from noports.netlimits import (
    Admission,
    MemoryReleaser,
    RateLimitedLog,
    aclose_writer,
    linger_close,
    make_idle_tls_cheap,
    mark_proven,
    start_guarded_server,
)

from .protocol import (
    DEFAULT_MAX_LINE_BYTES,
    DEFAULT_MAX_PENDING_BYTES,
    PROMPT,
    Close,
    DirectorySession,
    Lookup,
    MissLimiter,
    MissPolicy,
    Write,
    error_reply,
)
from .store import DirectoryStore, DirectoryStoreError, InvalidAtSignError, normalise_atsign

log = logging.getLogger(__name__)

READ_CHUNK = 4096


@dataclass(frozen=True)
class ServerConfig:
    """Runtime knobs of the atDirectory server (each is an ``atdirectory serve`` flag).

    Connections are counted from TCP accept, before TLS (``noports.netlimits``), so sockets
    that never start TLS count too. Sizing of the defaults: docs/directory.md, "Limits".
    """

    host: str = "127.0.0.1"
    port: int = 64
    max_connections: int = 4096
    max_connections_per_ip: int = 512
    handshake_timeout: float = 10.0
    request_timeout: float = 10.0
    idle_timeout: float = 0.0  # 0 = never; the Python SDK keeps one connection per process
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
    max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES
    shutdown_grace: float = 5.0

    def __post_init__(self) -> None:
        for name in ("max_connections", "max_connections_per_ip", "max_line_bytes",
                     "max_pending_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.handshake_timeout <= 0 or self.request_timeout <= 0 or self.idle_timeout < 0:
            raise ValueError("handshake and request timeouts must be > 0, idle timeout >= 0")
        if self.max_line_bytes < 2:
            raise ValueError("max_line_bytes must be at least 2")


def refusal_for(reason: str) -> tuple[bytes, bytes]:
    """What a peer refused at accept sees: the prompt, then one ``error:`` line (two writes).

    The prompt first, so a client that waits for ``@`` before reading a reply (all of them)
    reads the error line as the reply to its lookup.
    """
    return PROMPT, error_reply(reason)


class DirectoryServer:
    """Serves lookups from a :class:`DirectoryStore` over TLS."""

    def __init__(self, store: DirectoryStore, ssl_context: ssl.SSLContext,
                 config: ServerConfig | None = None, policy: MissPolicy | None = None,
                 limiter: MissLimiter | None = None) -> None:
        self.store = store
        self.ssl_context = ssl_context
        self.config = config or ServerConfig()
        self.limiter = limiter or MissLimiter(policy)
        self.admission = Admission(self.config.max_connections,
                                   self.config.max_connections_per_ip,
                                   total_name="--max-connections",
                                   per_source_name="--max-connections-per-ip",
                                   unproven="not yet answered")
        self.releaser = MemoryReleaser()
        self._close_log = RateLimitedLog(log)
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._store_blocks = bool(getattr(store, "may_block", True))

    @property
    def sockets(self) -> list[tuple[str, int]]:
        """Bound (host, port) pairs; useful with port 0."""
        if self._server is None:
            return []
        return [s.getsockname()[:2] for s in self._server.sockets]

    async def start(self) -> None:
        make_idle_tls_cheap()
        self._server = await start_guarded_server(
            self._handle, self.config.host, self.config.port, ssl=self.ssl_context,
            admission=self.admission, handshake_timeout=self.config.handshake_timeout,
            refusal=refusal_for, eviction=error_reply, releaser=self.releaser,
            reuse_address=True)

    async def stop(self) -> None:
        """Stop accepting, then cancel open connections (idle clients never end on their own).

        Connections get 50 ms to finish a reply already being written; cancellation then closes
        them, waiting at most ``shutdown_grace`` seconds for the TLS close.
        """
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        if self._tasks:
            _done, pending = await asyncio.wait(set(self._tasks), timeout=0.05)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=self.config.shutdown_grace)
        log.info("atdirectory stopped; connections at peak: %d open, %d from one source "
                 "(limits --max-connections %d, --max-connections-per-ip %d); %d evicted to "
                 "make room", self.admission.peak_total, self.admission.peak_per_source,
                 self.config.max_connections, self.config.max_connections_per_ip,
                 self.admission.evictions)

    async def _lookup(self, atsign: str) -> str | None:
        """The address, or None: a name that is no atSign is answered like an unknown one."""
        try:
            normalise_atsign(atsign)
        except InvalidAtSignError:
            return None
        if self._store_blocks:
            return await asyncio.to_thread(self.store.get, atsign)
        return self.store.get(atsign)

    def _deadline(self, session: DirectorySession, since: float) -> tuple[float, str] | None:
        """(absolute loop time, error text) of the deadline now running, or None."""
        cfg = self.config
        if session.expecting_line:
            return (since + cfg.request_timeout,
                    f"no complete request line within {cfg.request_timeout:g} s: "
                    f"limit --request-timeout {cfg.request_timeout:g}")
        if cfg.idle_timeout > 0:
            return (since + cfg.idle_timeout,
                    f"idle for {cfg.idle_timeout:g} s: limit --idle-timeout {cfg.idle_timeout:g}")
        return None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        peername = writer.get_extra_info("peername")
        peer = str(peername[0]) if peername else None
        loop = asyncio.get_running_loop()
        try:
            log.debug("connection from %s", peer)
            session = DirectorySession(self.limiter, peer=peer,
                                       max_line_bytes=self.config.max_line_bytes,
                                       max_pending_bytes=self.config.max_pending_bytes)
            await self._run(session, session.start(), writer)
            # a deadline runs from the moment the session's state last changed: waiting for a
            # (next) request line, or idle after an answer
            state, since = (session.expecting_line, session.lookups), loop.time()
            proven = False  # answered once: a client, never evicted to make room
            received = False
            while not session.closed:
                if not proven and session.lookups:
                    proven = mark_proven(writer) or True
                if (session.expecting_line, session.lookups) != state:
                    state, since = (session.expecting_line, session.lookups), loop.time()
                deadline = self._deadline(session, since)
                try:
                    if deadline is None:
                        data = await reader.read(READ_CHUNK)
                    else:
                        data = await asyncio.wait_for(reader.read(READ_CHUNK),
                                                      max(0.0, deadline[0] - loop.time()))
                except asyncio.TimeoutError:
                    assert deadline is not None
                    await self._run(session, session.expire(deadline[1]), writer)
                    break
                received = received or bool(data)
                actions = session.receive(data) if data else session.eof()
                await self._run(session, actions, writer)
            if session.closed and session.errored and received:
                # the peer may still be sending (the rest of a long line): an immediate close
                # would answer with an RST, which drops the error line on the peer's side.
                # A peer that never sent a byte (idle past the deadline) gets no linger.
                await linger_close(reader, writer)
        except (ConnectionError, ssl.SSLError, OSError, asyncio.TimeoutError) as exc:
            log.debug("connection from %s ended: %s", peer, exc or type(exc).__name__)
        except asyncio.CancelledError:
            log.debug("connection from %s cancelled (shutdown)", peer)
        except Exception:
            log.exception("unexpected error on connection from %s", peer)
        finally:
            await aclose_writer(writer)
            self._tasks.discard(task)

    async def _run(self, session: DirectorySession, actions: list, writer: asyncio.StreamWriter
                   ) -> None:
        """Execute actions in order; lookups feed their results back into the session."""
        queue = list(actions)
        while queue:
            action = queue.pop(0)
            if isinstance(action, Write):
                if action.delay > 0:
                    log.debug("delaying miss reply to %s by %.2fs", session.peer, action.delay)
                    await asyncio.sleep(action.delay)
                writer.write(action.data)
                # A peer that does not read must not hold the connection forever.
                await asyncio.wait_for(writer.drain(), self.config.request_timeout)
            elif isinstance(action, Lookup):
                try:
                    address = await self._lookup(action.atsign)
                except DirectoryStoreError as exc:
                    log.error("lookup failed: %s", exc)
                    queue = session.failed(str(exc)) + queue
                    continue
                queue = session.resolved(address) + queue
            elif isinstance(action, Close):
                if action.reason in ("@exit", "peer closed"):
                    log.debug("closing connection from %s: %s", session.peer, action.reason)
                else:  # a flood of hostile peers must not cost a log line each
                    self._close_log.log(logging.INFO, "closing connection from %s: %s",
                                        session.peer, action.reason)
                return


async def serve(store: DirectoryStore, ssl_context: ssl.SSLContext, config: ServerConfig,
                policy: MissPolicy | None = None, on_listening=None) -> None:  # type: ignore[no-untyped-def]
    """Run until SIGTERM/SIGINT, then shut down gracefully."""
    server = DirectoryServer(store, ssl_context, config, policy)
    await server.start()
    if on_listening is not None:
        on_listening(server.sockets)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        log.info("signal received, shutting down")
    finally:
        await server.stop()
