"""The client side of an npt session in multi mode: a local port, many TCP connections.

Why multi mode: one session (one control-plane round trip) serves every connection an
application opens (a browser, an HTTP client, ``uri`` tasks), as the official npt does
(docs/reference/noports-protocol.md#single-and-multi-mode). For each accepted local
connection: one more socket to relay port A with the auth line, a fresh key and IV, and the
``connect:`` line on the control stream - written in ONE write (the C daemon parses each
read on its own) and in the same order as the relay sockets (the relay pairs them FIFO with
the device's), hence the lock. The cipher is the session's: our AEAD when the daemon chose
it, else the official AES-256-CTR.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from typing import Any, Callable  # noqa: UP035 (3.8)

from noports.npproto.errors import IntegrityError, ProtocolError
from noports.npproto.nptcontrol import ControlParser, DeviceError, connect_line
from noports.npproto.streamcipher import IV_LEN, KEY_LEN, new_session_cipher
from noports.relay.pump import cipher_transforms, connect_relay, pump_socket

from .npt_flow import NptSession
from .progress import NullProgress, Progress

log = logging.getLogger(__name__)

#: before the first connection the session waits at least this long, whatever -T says
FIRST_CONNECTION_MIN_S = 10.0
#: the device ends an idle session; the client gives it this long to do so first
IDLE_SLACK_S = 2.0


class MultiTunnel:
    """Serve an npt session on a listening socket until the session ends."""

    def __init__(self, session: NptSession, *, progress: Progress | None = None,
                 connect_timeout: float = 10.0,
                 randbytes: Callable[[int], bytes] = os.urandom) -> None:
        self.session = session
        self.progress = progress or NullProgress()
        self.connect_timeout = connect_timeout
        self._randbytes = randbytes
        self._control_cipher = new_session_cipher(session.cipher, session.key, session.iv,
                                                  is_client=True)
        self._order = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._idle: asyncio.TimerHandle | None = None
        self._done: asyncio.Future[str] | None = None
        self.active = 0
        self.connections_total = 0

    def _end(self, reason: str) -> None:
        if self._done is not None and not self._done.done():
            self._done.set_result(reason)

    def _arm_idle(self, delay: float) -> None:
        if self._idle is not None:
            self._idle.cancel()
        self._idle = asyncio.get_running_loop().call_later(
            delay, self._end, f"no connection for {delay - IDLE_SLACK_S:g}s")

    async def serve(self, listener: socket.socket) -> str:
        """Accept on ``listener`` (left open for a next session) until the session ends;
        returns why it ended."""
        loop = asyncio.get_running_loop()
        self._done = loop.create_future()
        timeout = self.session.target.timeout_s
        self._arm_idle(max(timeout, FIRST_CONNECTION_MIN_S) + IDLE_SLACK_S)
        reader = loop.create_task(self._read_control())
        acceptor = loop.create_task(self._accept_loop(listener))
        try:
            return await self._done
        finally:
            if self._idle is not None:
                self._idle.cancel()
            for t in (reader, acceptor, *self._tasks):
                t.cancel()
            await asyncio.gather(reader, acceptor, *self._tasks, return_exceptions=True)
            self.session.close()

    async def _read_control(self) -> None:
        """What the device says (ours: why a connection failed); its end is the session's."""
        loop = asyncio.get_running_loop()
        parser = ControlParser()
        try:
            while data := await loop.sock_recv(self.session.control, 4096):
                for msg in parser.feed(self._control_cipher.decrypt(data)):
                    if isinstance(msg, DeviceError):
                        self.progress.warning(msg.text)
            self._end("the device closed the session")
        except OSError as exc:
            self._end(f"control connection lost: {exc.strerror or exc}")
        except (IntegrityError, ProtocolError) as exc:
            self._end(f"bad control stream from the device: {exc}")

    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _addr = await loop.sock_accept(listener)
            task = loop.create_task(self._serve_one(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _serve_one(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        s = self.session
        try:
            async with self._order:  # relay sockets and connect: lines in the same order
                try:
                    relay = await connect_relay(s.relay.host, s.relay.port_a, s.auth_line,
                                                timeout=self.connect_timeout)
                except OSError as exc:
                    self.progress.warning(f"npt: cannot reach the relay at {s.relay.host}:"
                                          f"{s.relay.port_a} for a new connection: {exc}")
                    conn.close()
                    return
                key, iv = self._randbytes(KEY_LEN), self._randbytes(IV_LEN)
                line = self._control_cipher.encrypt(connect_line(key, iv))
                try:
                    await loop.sock_sendall(s.control, line)  # one write per line
                except OSError as exc:
                    relay.close()
                    conn.close()
                    self._end(f"control connection lost: {exc.strerror or exc}")
                    return
        except asyncio.CancelledError:
            conn.close()
            raise
        cipher = new_session_cipher(s.cipher, key, iv, is_client=True)
        to_relay, from_relay = cipher_transforms(cipher)
        self.active += 1
        self.connections_total += 1
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        try:
            with contextlib.suppress(OSError):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            stats = await pump_socket(conn, relay, to_relay=to_relay, from_relay=from_relay)
            log.debug("npt connection ended: %s", stats)
        finally:
            self.active -= 1
            if self.active == 0 and self._done is not None and not self._done.done():
                self._arm_idle(s.target.timeout_s + IDLE_SLACK_S)


def bind_local(port: int, host: str = "127.0.0.1", backlog: int = 64) -> socket.socket:
    """A local listening socket for npt and sshnp's local port (loopback only: the official
    npt binds all interfaces)."""
    from .errors import TunnelError
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        # a fixed port can be re-bound while a closed connection on it is in TIME_WAIT (sshnp
        # restarts ssh on it; Linux never lets two sockets listen on it at once anyway)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        s.listen(backlog)
    except OSError as exc:
        s.close()
        raise TunnelError(f"cannot listen on {host}:{port}: {exc.strerror or exc}",
                          step="local port", hint="choose another -l/--local-port") from None
    s.setblocking(False)
    return s


__all__ = ["MultiTunnel", "bind_local"]
