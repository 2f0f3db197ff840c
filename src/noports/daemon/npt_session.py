"""The daemon side of npt sessions (multi mode): the asyncio edge that only moves bytes.

Decisions (signature, freshness, permit-open, cipher) were taken by
:meth:`.handler.DaemonHandler.on_npt_request`; the control stream's messages are parsed by
:mod:`noports.npproto.nptcontrol`. Here: one control socket to relay port B per session,
and for each ``connect:`` line one more socket to port B (auth line first) and one to the
permitted target, spliced with that line's key
(docs/reference/noports-protocol.md#single-and-multi-mode). As the Dart daemon: the relay
socket is opened before the target, and closed if the target cannot be reached, so the
relay's FIFO pairing stays aligned with the client's sockets.

Kept apart from :mod:`.service` on purpose: the service only hands a plan over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from typing import Any, Callable  # noqa: UP035 (3.8)

from noports.npproto.errors import IntegrityError, ProtocolError
from noports.npproto.nptcontrol import Connect, ControlParser, Heartbeat, error_line
from noports.npproto.streamcipher import new_session_cipher
from noports.relay.pump import cipher_transforms, connect_relay
from noports.relay.splice import Splice, splice_sockets

from .handler import NptPlan

log = logging.getLogger("noports.sshnpd")

CONNECT_TIMEOUT_S = 10.0
#: before the first connection a session waits at least this long, whatever -T says
FIRST_CONNECTION_MIN_S = 10.0
#: connections open at once in one npt session (a browser opens ~6 per host)
MAX_CONNECTIONS = 64
READ_SIZE = 4096


async def open_target(host: str, port: int, timeout: float = CONNECT_TIMEOUT_S) -> socket.socket:
    """Connect the permitted target; ``localhost`` tries 127.0.0.1 then ::1 (a service may
    listen on only one of them)."""
    loop = asyncio.get_running_loop()
    if host == "localhost":
        candidates = [(socket.AF_INET, ("127.0.0.1", port)), (socket.AF_INET6, ("::1", port))]
    else:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        candidates = [(fam, addr) for fam, _t, _p, _c, addr in infos]
    last: OSError | None = None
    for family, addr in candidates:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, addr), timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        except (OSError, asyncio.TimeoutError) as exc:
            sock.close()
            if isinstance(exc, OSError) and exc.errno:  # asyncio's text names the address
                last = OSError(exc.errno, os.strerror(exc.errno))
            else:
                last = TimeoutError(f"no answer within {timeout:g}s")
    raise last or OSError(f"cannot resolve {host}")


class NptSession:
    """One running npt session on the device."""

    def __init__(self, plan: NptPlan, control: socket.socket,
                 on_end: Callable[[NptSession, str], None]) -> None:
        self.plan = plan
        self.control = control
        self._on_end = on_end
        self._cipher = new_session_cipher(plan.cipher_id, plan.key, plan.iv, is_client=False)
        self._parser = ControlParser()
        self.splices: set[Splice] = set()
        self.connections_total = 0
        self.failed_total = 0
        self._idle: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[Any] | None = None
        self.ended = False

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())
        self._arm_idle(max(FIRST_CONNECTION_MIN_S, self.plan.idle_timeout))

    def _arm_idle(self, delay: float) -> None:
        if self._idle is not None:
            self._idle.cancel()
        self._idle = asyncio.get_running_loop().call_later(
            delay, lambda: self.close(f"no connection for {delay:g}s"))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        reason = "the client closed the control connection"
        try:
            while True:
                data = await loop.sock_recv(self.control, READ_SIZE)
                if not data:
                    break
                for msg in self._parser.feed(self._cipher.decrypt(data)):
                    if isinstance(msg, Connect):
                        await self._connect(msg)  # in order: the relay pairs FIFO
                    elif isinstance(msg, Heartbeat):
                        log.debug("npt session %s: %s", self.plan.session_id, msg.text)
                    else:
                        log.info("npt session %s: ignoring control line %r",
                                 self.plan.session_id, msg.text)
        except asyncio.CancelledError:
            raise
        except (IntegrityError, ProtocolError) as exc:
            reason = f"bad control stream: {exc}"
        except OSError as exc:
            reason = f"control connection lost: {exc.strerror or exc}"
        finally:
            with contextlib.suppress(OSError):
                self.control.close()
        self.close(reason)

    async def _connect(self, msg: Connect) -> None:
        p = self.plan
        ctx = {"session": p.session_id, "sender": p.client}
        try:
            relay = await connect_relay(p.relay_host, p.relay_port, p.auth_line,
                                        timeout=CONNECT_TIMEOUT_S)
        except OSError as exc:
            self.failed_total += 1
            log.warning("npt session %s: cannot reach the relay %s:%d: %s", p.session_id,
                        p.relay_host, p.relay_port, exc,
                        extra={"event": "npt_relay_failed", **ctx})
            return
        if msg.key is None or msg.iv is None:  # connect:no:encrypt
            relay.close()  # opened anyway: the relay pairs FIFO, the next one must match
            self.failed_total += 1
            log.warning("npt session %s: refusing an unencrypted connection", p.session_id,
                        extra={"event": "npt_plain_refused", **ctx})
            await self._tell("connection refused by the device: it carries npt connections "
                             "encrypted only")
            return
        if len(self.splices) >= MAX_CONNECTIONS:
            relay.close()  # its partner on the client side sees a closed connection
            self.failed_total += 1
            log.warning("npt session %s: refusing a connection: %d open (limit %d)",
                        p.session_id, len(self.splices), MAX_CONNECTIONS,
                        extra={"event": "npt_limit", **ctx})
            await self._tell(f"connection refused by the device: {MAX_CONNECTIONS} "
                             "connections are open in this session (its limit)")
            return
        try:
            target = await open_target(p.target_host, p.target_port)
        except asyncio.CancelledError:  # the session ended meanwhile
            relay.close()
            raise
        except OSError as exc:
            relay.close()
            self.failed_total += 1
            log.warning("npt session %s: cannot connect %s:%d: %s", p.session_id,
                        p.target_host, p.target_port, exc.strerror or exc,
                        extra={"event": "npt_target_failed", **ctx})
            await self._tell(f"the device cannot connect {p.target_host}:{p.target_port}: "
                             f"{exc.strerror or exc}; is the service running on the device?")
            return
        cipher = new_session_cipher(p.cipher_id, msg.key, msg.iv, is_client=False)
        to_relay, from_relay = cipher_transforms(cipher)
        self.connections_total += 1
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        sp = await splice_sockets(target, relay, transform_ab=to_relay, transform_ba=from_relay,
                                  on_close=self._spliced_closed)
        if not sp.closed:
            self.splices.add(sp)

    async def _tell(self, text: str) -> None:
        """Say why on the control stream (our client prints it; official ones log it)."""
        with contextlib.suppress(OSError):
            await asyncio.get_running_loop().sock_sendall(
                self.control, self._cipher.encrypt(error_line(text)))

    def _spliced_closed(self, sp: Splice) -> None:
        self.splices.discard(sp)
        if not self.splices and not self.ended:
            self._arm_idle(self.plan.idle_timeout)

    def close(self, reason: str) -> None:
        if self.ended:
            return
        self.ended = True
        if self._idle is not None:
            self._idle.cancel()
        for sp in list(self.splices):
            sp.close(reason)
        self.splices.clear()
        task = self._task
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()  # its finally closes the control socket, once off the loop
        self._on_end(self, reason)


__all__ = ["MAX_CONNECTIONS", "NptSession", "open_target"]
