"""The agent's asyncio edge: accept on the private unix socket, check the peer, read one
bounded request, set the tunnel up with :func:`noports.client.flow.open_session` over the
shared plane, hand the connector one end of a socket pair and pump the other end.

Why the decisions live elsewhere: framing and validation are ``protocol`` (pure), who may
connect is the directory (``paths``) plus the SO_PEERCRED uid check here, and every session
decision is the client's own (``noports.client.flow`` / ``checks``), so a tunnel through the
agent is checked exactly like one through ``sshnp --stdio``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import struct
import time
from pathlib import Path
from typing import Any

from noports.client.errors import EXIT_FAILURE, EXIT_USAGE, SshnpError, UsageError
from noports.client.progress import Progress

from . import paths
from . import protocol as proto
from .keypool import KeyPool
from .plane import DEFAULT_CACHE_TTL_S, PlanePool

log = logging.getLogger("noports.agent")

REQUEST_TIMEOUT_S = 10.0  # a connector sends its request at once; a slow one is dropped
SEND_TIMEOUT_S = 10.0
MAX_CONNECTIONS = 4096  # requests being read or set up at once (tunnels not counted)


def _install_key_pool() -> KeyPool:
    """aes sessions take the RSA pair from one pool reused for a bounded time (keypool.py,
    decision 0029); our daemons use the session's X25519 key instead."""
    from noports.client import flow
    pool = KeyPool(flow._session_keypair)
    flow.SESSION_KEY_SOURCE[:] = [pool.take]
    pool.warm()  # the first pair, made while the agent waits for its first request
    return pool


def peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


class _RemoteProgress(Progress):
    """The session's progress lines and warnings, sent to the connector as they happen."""

    def __init__(self, conn: socket.socket, quiet: bool) -> None:
        super().__init__(quiet=quiet)
        self.conn = conn
        self.pending = bytearray()

    def _write(self, line: str) -> None:
        prefix = "sshnp: warning: "
        frame = (proto.encode_warning(line[len(prefix):]) if line.startswith(prefix)
                 else proto.encode_progress(line))
        self.pending += frame
        with contextlib.suppress(BlockingIOError, InterruptedError):
            try:
                n = self.conn.send(self.pending)
            except OSError:  # the connector went away: the set-up goes on, ssh will see EOF
                self.pending.clear()
                return
            del self.pending[:n]

    async def flush(self) -> None:
        if self.pending:
            data, self.pending = bytes(self.pending), bytearray()
            await asyncio.wait_for(asyncio.get_running_loop().sock_sendall(self.conn, data),
                                   SEND_TIMEOUT_S)


def _resolve(params: Any, cwd: str) -> None:
    """Relative file options are relative to the connector's directory, not the agent's."""
    for name in ("key_file", "ca_file", "identity_file", "known_hosts_file", "cache_dir"):
        value = getattr(params, name, None)
        if value is not None and not Path(value).is_absolute():
            setattr(params, name, Path(cwd) / value)


class Agent:
    def __init__(self, directory: str, idle_s: float = paths.DEFAULT_IDLE_S,
                 cache_ttl: float = DEFAULT_CACHE_TTL_S) -> None:
        self.dir = directory
        self.idle_s = idle_s
        self.pool = PlanePool(cache_ttl)
        self.connections = 0
        self.tunnels = 0
        self.sessions = 0
        self.failures = 0
        self.refused = 0
        self.last_active = time.monotonic()
        self.stopping: asyncio.Event | None = None
        self.tasks: set[asyncio.Task[Any]] = set()
        self.setup_s: list[float] = []
        self.keys: KeyPool | None = None
        self.key_exchanges: dict[str, int] = {}  # aes sessions by how the key came

    # -- life cycle ----------------------------------------------------------------------------

    def bind(self) -> socket.socket | None:
        """Listen on the socket, or None when another agent already answers there."""
        from .connect import socket_address, try_connect
        other = try_connect(self.dir)
        if other is not None:
            other.close()
            return None
        addr = socket_address(self.dir)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(addr)  # stale: nobody answered on it
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            s.bind(addr)
        finally:
            os.umask(old)
        s.listen(256)
        s.setblocking(False)
        return s

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self.stopping = asyncio.Event()
        listener = self.bind()
        if listener is None:
            log.info("another agent already serves %s; exiting", self.dir)
            return 0
        ino = os.stat(os.path.join(self.dir, paths.SOCKET)).st_ino
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        log.info("sshnp agent %d serving %s (idle exit after %gs)", os.getpid(), self.dir,
                 self.idle_s)
        self.keys = _install_key_pool()
        accept = loop.create_task(self.accept_loop(listener))
        idle = loop.create_task(self.idle_watch())
        try:
            await self.stopping.wait()
        finally:
            accept.cancel()
            idle.cancel()
            listener.close()
            with contextlib.suppress(OSError):
                if os.stat(os.path.join(self.dir, paths.SOCKET)).st_ino == ino:
                    os.unlink(os.path.join(self.dir, paths.SOCKET))
            for t in list(self.tasks):
                t.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)
            await self.pool.aclose()
        log.info("sshnp agent %d exiting (%d sessions served)", os.getpid(), self.sessions)
        return 0

    async def idle_watch(self) -> None:
        assert self.stopping is not None
        while True:
            await asyncio.sleep(min(1.0, max(self.idle_s / 4, 0.05)))
            if self.keys is not None:
                self.keys.drop_expired()
            busy = self.connections or self.tunnels
            if busy:
                self.last_active = time.monotonic()
            elif time.monotonic() - self.last_active >= self.idle_s:
                log.info("idle for %gs with no tunnel; exiting", self.idle_s)
                self.stopping.set()
                return

    async def accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _addr = await loop.sock_accept(listener)
            if self.connections >= MAX_CONNECTIONS:
                conn.close()
                continue
            t = loop.create_task(self.handle(conn))
            self.tasks.add(t)
            t.add_done_callback(self.tasks.discard)

    # -- one connection ------------------------------------------------------------------------

    async def handle(self, conn: socket.socket) -> None:
        self.connections += 1
        self.last_active = time.monotonic()
        try:
            conn.setblocking(False)
            if peer_uid(conn) != os.getuid():  # the directory is 0700; this is the second lock
                self.refused += 1
                log.warning("refused a connection from uid %d", peer_uid(conn))
                return
            try:
                req = proto.parse_request(await self.read_request(conn))
            except (proto.ProtocolError, asyncio.TimeoutError) as exc:
                self.failures += 1
                why = "no request within the time limit" if isinstance(
                    exc, asyncio.TimeoutError) else str(exc)
                log.warning("bad request: %s", why)
                await self.send(conn, proto.encode_error(f"agent: bad request: {why}",
                                                         EXIT_USAGE))
                return
            if req.op == "stats":
                await self.send(conn, proto.encode_ok(**self.stats()))
                return
            await self.open(conn, req)
        except (OSError, asyncio.TimeoutError) as exc:
            log.info("connection ended: %s", exc)
        finally:
            self.connections -= 1
            self.last_active = time.monotonic()
            with contextlib.suppress(OSError):
                conn.close()

    async def read_request(self, conn: socket.socket) -> bytes:
        loop = asyncio.get_running_loop()
        buf = proto.LineBuffer()
        deadline = loop.time() + REQUEST_TIMEOUT_S
        while True:
            data = await asyncio.wait_for(loop.sock_recv(conn, 65536),
                                          max(deadline - loop.time(), 0.001))
            if not data:
                raise proto.ProtocolError("connection closed before a complete request")
            lines = buf.feed(data)
            if lines:
                return lines[0]

    async def send(self, conn: socket.socket, data: bytes) -> None:
        await asyncio.wait_for(asyncio.get_running_loop().sock_sendall(conn, data),
                               SEND_TIMEOUT_S)

    def stats(self) -> dict[str, Any]:
        setups = sorted(self.setup_s)
        return {"pid": os.getpid(), "tunnels": self.tunnels, "sessions": self.sessions,
                "failures": self.failures, "refused": self.refused,
                "connections": self.connections - 1, "planes": len(self.pool.clients),
                "logins": self.pool.logins,
                "setup_p50_s": setups[len(setups) // 2] if setups else None,
                "key_exchanges": dict(self.key_exchanges),
                **(self.keys.stats() if self.keys is not None else {})}

    async def open(self, conn: socket.socket, req: proto.Request) -> None:
        from noports.client.cli import parse_args
        from noports.client.flow import open_session
        progress: _RemoteProgress | None = None
        t0 = time.monotonic()
        try:
            try:
                opts = parse_args(["--stdio", *req.argv])
            except SystemExit:  # argparse's -h: it would end the agent for everyone
                raise UsageError("-h/--help is answered by sshnp-connect --help, not the "
                                 "agent") from None
            params = opts.params
            assert params is not None
            _resolve(params, req.cwd)
            progress = _RemoteProgress(conn, opts.quiet)
            shared = self.pool.get(params)
            session = await open_session(params, progress=progress, client=shared)
        except SshnpError as exc:
            self.failures += 1
            log.info("set-up failed: %s", exc)
            if progress is not None:
                await progress.flush()
            await self.send(conn, proto.encode_error(str(exc), exc.exit_code))
            return
        except Exception as exc:  # a bug: say so, keep serving the others
            self.failures += 1
            log.exception("unexpected error during set-up")
            await self.send(conn, proto.encode_error(
                f"agent: unexpected error ({type(exc).__name__}: {exc}); please report it; "
                f"the agent log is {os.path.join(self.dir, paths.LOG)}", EXIT_FAILURE))
            return
        took = time.monotonic() - t0
        self.setup_s.append(took)
        del self.setup_s[:-1000]
        self.sessions += 1
        if session.key_exchange:
            self.key_exchanges[session.key_exchange] = (
                self.key_exchanges.get(session.key_exchange, 0) + 1)
        mine, theirs = socket.socketpair()
        try:
            await progress.flush()
            ok = proto.encode_ok(setup_s=round(took, 4), steps=session.timings)
            socket.send_fds(conn, [ok], [theirs.fileno()])
        except (OSError, asyncio.TimeoutError) as exc:
            log.info("connector went away before taking the tunnel: %s", exc)
            mine.close()
            session.close()
            return
        finally:
            theirs.close()
        log.info("tunnel to %s%s via %s ready in %.3fs", params.device, params.device_atsign,
                 session.relay_atsign, took)
        conn.close()
        self.connections -= 1
        self.tunnels += 1
        try:
            await session.tunnel.serve_socket(mine)
        except Exception as exc:  # one tunnel's failure is its own
            log.info("tunnel to %s%s ended: %s", params.device, params.device_atsign, exc)
        finally:
            session.close()
            with contextlib.suppress(OSError):
                mine.close()
            self.tunnels -= 1
            self.connections += 1  # balanced by handle()'s finally
