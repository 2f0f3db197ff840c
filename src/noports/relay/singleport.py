"""Single-port relay mode (official ``srvd --443``) and the ESCR gate every ESCR socket passes.

One listening port carries both sides of every single-port session: a socket says which
session and which side it is only inside its ESCR response
(docs/reference/noports-protocol.md#newer-protocol-versions,
docs/decisions/0025-single-port-relay-and-escr.md). The gate:

* writes a fresh challenge, reads one response line (at most 4096 bytes, within
  ``auth_timeout``), then decides with the pure :func:`judge` (the session exists, the response
  decrypts with *its* key, answers *this* challenge, and the signer is the atSign the request
  named for that side);
* only then fetches the signing key the response names (cached per session), checks the
  signature, answers ``ok`` and hands the socket to the session's pairing
  (:meth:`Rendezvous.adopt`), where only authenticated sockets ever count.

Why squatting cannot work here (issue 9): nothing a stranger sends reaches any session's
state. Without the session's ``relayAuthAesKey`` (sent end-to-end encrypted to the relay and
the device) a response cannot decrypt, so the stranger's socket is closed with the same
``Socket auth failed`` whatever was wrong, and the relay fetches nothing for it.
Unauthenticated sockets are bounded relay-wide (oldest evicted) and each has its own
deadline, so holding many idle ones costs the holder, not the real parties.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Awaitable, Callable  # noqa: UP035 (3.8: abc generics are not subscriptable)

from noports.npproto import escr
from noports.npproto.errors import ProtocolError

from .session import Side

if TYPE_CHECKING:
    from .server import Rendezvous

log = logging.getLogger(__name__)

MAX_KEYS_PER_SESSION = 8  # distinct signing-key URIs looked up for one session

#: fetch the public value ``name`` of ``atsign`` (srvd: ``plookup``); raises when it cannot
KeyLookup = Callable[[str, str], Awaitable[str]]


@dataclass
class EscrSession:
    """What the relay knows about one ESCR session from its (authenticated) request."""

    session_id: str
    relay_auth_key: str
    atsign_a: str
    atsign_b: str
    keys: dict[str, str] = field(default_factory=dict)  # key uri -> published value


def judge(claim: escr.EscrClaim, sess: EscrSession, port_side: Side | None) -> str | None:
    """Why ``claim`` may not join ``sess`` (None: it may, once its signature verifies).

    Stricter than the official relay, which accepts either atSign on either side: side A
    must be signed by the request's ``atSignA`` (its authenticated sender) and side B by
    ``atSignB``; on a per-session port the side must also be that port's.
    """
    want = sess.atsign_a if claim.side_a else sess.atsign_b
    side = Side.A if claim.side_a else Side.B
    if claim.atsign != want:
        return f"side {side.value} signed by {claim.atsign}, not {want}"
    if port_side is not None and port_side is not side:
        return f"side {side.value} response on the port of side {port_side.value}"
    return None


class EscrGate:
    """Runs ESCR handshakes on accepted sockets and hands the good ones to the rendezvous."""

    def __init__(self, rv: Rendezvous, lookup: KeyLookup | None, *,
                 key_timeout: float = 10.0) -> None:
        self.rv = rv
        self.lookup = lookup
        self.key_timeout = key_timeout
        self._pending: OrderedDict[int, tuple[asyncio.Task[None], socket.socket]] = OrderedDict()
        self._ids = 0
        self.refused = 0
        self.accepted = 0

    def __len__(self) -> int:
        return len(self._pending)

    def start(self, sock: socket.socket, peer: object, *, session_id: str | None = None,
              port_side: Side | None = None) -> None:
        """Authenticate ``sock`` in the background (bounded, oldest evicted beyond the cap)."""
        self._ids += 1
        hid = self._ids
        task = asyncio.get_running_loop().create_task(
            self._run(hid, sock, peer, session_id, port_side))
        self._pending[hid] = (task, sock)
        cap = self.rv.config.max_unauth_total
        while len(self._pending) > cap:
            _old, (old_task, old_sock) = self._pending.popitem(last=False)
            old_task.cancel()
            _close(old_sock)
            log.info("single port: evicted the oldest of more than %d unauthenticated "
                     "connections", cap)

    async def _run(self, hid: int, sock: socket.socket, peer: object,
                   session_id: str | None, port_side: Side | None) -> None:
        handed = False
        try:
            handed = await asyncio.wait_for(
                self._handshake(sock, peer, session_id, port_side),
                self.rv.config.policy.auth_timeout + self.key_timeout)
        except asyncio.TimeoutError:
            log.info("ESCR from %s: no valid response within %gs", peer,
                     self.rv.config.policy.auth_timeout)
        except asyncio.CancelledError:
            raise
        except OSError as exc:
            log.debug("ESCR from %s: %s", peer, exc)
        finally:
            self._pending.pop(hid, None)
            if not handed:
                _close(sock)

    async def _handshake(self, sock: socket.socket, peer: object, want_sid: str | None,
                         port_side: Side | None) -> bool:
        loop = asyncio.get_running_loop()
        challenge = escr.new_challenge()
        await loop.sock_sendall(sock, challenge.encode("ascii") + b"\n")
        deadline = time.monotonic() + self.rv.config.policy.auth_timeout
        buf = bytearray()
        while b"\n" not in buf:
            if len(buf) >= escr.MAX_RESPONSE_LINE:
                return await self._refuse(sock, peer, "no newline in 4096 bytes")
            left = deadline - time.monotonic()
            if left <= 0:
                return await self._refuse(sock, peer, "no response in time")
            data = await asyncio.wait_for(loop.sock_recv(sock, escr.MAX_RESPONSE_LINE), left)
            if not data:
                return False
            buf += data
        nl = buf.index(b"\n")
        line, head = bytes(buf[:nl]), bytes(buf[nl + 1:])
        try:
            sid, payload = escr.split_response(line)
            if want_sid is not None and sid != want_sid:
                raise ProtocolError("response names another session than this port's")
            sess = self.rv.escr_session(sid)
            if sess is None:
                raise ProtocolError("no such single-port session")
            claim = escr.open_response(sid, payload, relay_auth_key=sess.relay_auth_key,
                                       challenge=challenge)
        except ProtocolError as exc:
            return await self._refuse(sock, peer, str(exc))
        why = judge(claim, sess, port_side)
        if why is not None:
            return await self._refuse(sock, peer, f"session {sid}: {why}")
        value = sess.keys.get(claim.key_uri)
        if value is None:
            if len(sess.keys) >= MAX_KEYS_PER_SESSION:  # a party varying its key URI
                return await self._refuse(sock, peer, f"session {sid}: more than "
                                          f"{MAX_KEYS_PER_SESSION} signing keys named")
            if self.lookup is None:
                return await self._refuse(sock, peer, "relay cannot look up signing keys")
            try:
                value = await asyncio.wait_for(
                    self.lookup(claim.atsign, escr.key_lookup_name(claim)), self.key_timeout)
            except asyncio.TimeoutError:
                return await self._refuse(sock, peer, f"lookup of {claim.key_uri} timed out")
            except Exception as exc:  # an unknown key or atSign is a refusal, not a crash
                return await self._refuse(sock, peer, f"cannot fetch {claim.key_uri}: "
                                          f"{type(exc).__name__}")
            sess.keys[claim.key_uri] = value
        if not escr.verify_claim(claim, value):
            return await self._refuse(sock, peer, f"session {sid}: signature does not verify "
                                      f"with {claim.key_uri}")
        await loop.sock_sendall(sock, escr.OK + b"\n")
        side = Side.A if claim.side_a else Side.B
        if not self.rv.adopt(sid, side, sock, head):
            return False  # session ended meanwhile: the caller closes the socket
        self.accepted += 1
        log.debug("ESCR: %s joined session %s as side %s (%s)", peer, sid, side.value,
                  claim.atsign)
        return True

    async def _refuse(self, sock: socket.socket, peer: object, why: str) -> bool:
        self.refused += 1
        log.info("ESCR from %s refused: %s", peer, why)
        with contextlib.suppress(OSError):
            sock.send(escr.FAILED + b"\n")  # the same words whatever was wrong
        return False

    def close(self) -> None:
        for task, sock in self._pending.values():
            task.cancel()
            _close(sock)
        self._pending.clear()


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.close()


class SinglePortListener:
    """The one listening port of single-port mode; accepted sockets go to the gate."""

    def __init__(self, rv: Rendezvous, host: str, port: int, *, backlog: int = 1024) -> None:
        self.rv = rv
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind((host, port))
            self.sock.listen(backlog)
            self.sock.setblocking(False)
        except OSError:
            self.sock.close()
            raise
        self.port: int = self.sock.getsockname()[1]
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.sock.fileno(), self._on_accept)
        log.info("single-port relay listening on port %d (sessions found by ESCR)", self.port)

    def _on_accept(self) -> None:
        for _attempt in range(64):
            try:
                sock, peer = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("single port: accept failed: %s", exc)
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._pause()
                return
            self.rv._configure(sock)
            self.rv.escr_gate().start(sock, peer)

    def _pause(self) -> None:
        assert self._loop is not None
        self._loop.remove_reader(self.sock.fileno())
        self.rv.escr_gate().close()  # the oldest unauthenticated ones go first

        def resume() -> None:
            if self.sock.fileno() >= 0 and self._loop is not None:
                self._loop.add_reader(self.sock.fileno(), self._on_accept)

        self._loop.call_later(self.rv.config.accept_pause, resume)

    def close(self) -> None:
        if self.sock.fileno() >= 0:
            if self._loop is not None:
                self._loop.remove_reader(self.sock.fileno())
            self.sock.close()
