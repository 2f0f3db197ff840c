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
from collections import Counter
from dataclasses import dataclass

from .protocol import Close, DirectorySession, Lookup, MissLimiter, MissPolicy, Write
from .store import DirectoryStore, DirectoryStoreError

log = logging.getLogger(__name__)

READ_CHUNK = 4096


@dataclass(frozen=True)
class ServerConfig:
    """Runtime knobs of the atDirectory server."""

    host: str = "127.0.0.1"
    port: int = 64
    max_connections_per_ip: int = 64
    idle_timeout: float = 0.0  # 0 = never; the Python SDK keeps one connection per process
    handshake_timeout: float = 30.0
    shutdown_grace: float = 5.0


class DirectoryServer:
    """Serves lookups from a :class:`DirectoryStore` over TLS."""

    def __init__(self, store: DirectoryStore, ssl_context: ssl.SSLContext,
                 config: ServerConfig | None = None, policy: MissPolicy | None = None,
                 limiter: MissLimiter | None = None) -> None:
        self.store = store
        self.ssl_context = ssl_context
        self.config = config or ServerConfig()
        self.limiter = limiter or MissLimiter(policy)
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._per_ip: Counter[str] = Counter()
        self._store_blocks = bool(getattr(store, "may_block", True))

    @property
    def sockets(self) -> list[tuple[str, int]]:
        """Bound (host, port) pairs; useful with port 0."""
        if self._server is None:
            return []
        return [s.getsockname()[:2] for s in self._server.sockets]

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, host=self.config.host, port=self.config.port, ssl=self.ssl_context,
            ssl_handshake_timeout=self.config.handshake_timeout, reuse_address=True)

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
        log.info("atdirectory stopped")

    async def _lookup(self, atsign: str) -> str | None:
        if self._store_blocks:
            return await asyncio.to_thread(self.store.get, atsign)
        return self.store.get(atsign)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        peername = writer.get_extra_info("peername")
        peer = str(peername[0]) if peername else None
        counted = peer is not None
        try:
            if counted:
                self._per_ip[peer] += 1
                if self._per_ip[peer] > self.config.max_connections_per_ip:
                    log.warning("refusing connection from %s: more than %d open", peer,
                                self.config.max_connections_per_ip)
                    return
            log.debug("connection from %s", peer)
            session = DirectorySession(self.limiter, peer=peer)
            await self._run(session, session.start(), writer)
            while not session.closed:
                try:
                    if self.config.idle_timeout > 0:
                        data = await asyncio.wait_for(reader.read(READ_CHUNK),
                                                      self.config.idle_timeout)
                    else:
                        data = await reader.read(READ_CHUNK)
                except asyncio.TimeoutError:
                    log.debug("closing idle connection from %s", peer)
                    break
                actions = session.receive(data) if data else session.eof()
                await self._run(session, actions, writer)
        except (ConnectionError, ssl.SSLError, OSError) as exc:
            log.debug("connection from %s ended: %s", peer, exc)
        except asyncio.CancelledError:
            log.debug("connection from %s cancelled (shutdown)", peer)
        except Exception:
            log.exception("unexpected error on connection from %s", peer)
        finally:
            if counted:
                self._per_ip[peer] -= 1
                if self._per_ip[peer] <= 0:
                    del self._per_ip[peer]
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)
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
                await writer.drain()
            elif isinstance(action, Lookup):
                try:
                    address = await self._lookup(action.atsign)
                except DirectoryStoreError as exc:
                    log.error("lookup failed: %s", exc)
                    queue = session.failed(str(exc)) + queue
                    continue
                queue = session.resolved(address) + queue
            elif isinstance(action, Close):
                log.debug("closing connection from %s: %s", session.peer, action.reason)
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
