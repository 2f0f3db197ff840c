"""Client-side "SSHRV" pump: join a local socket (or stdin/stdout) to a relay port.

The relay expects, on every socket, one auth line (the signed envelope, plaintext) and then
raw bytes (docs/reference/noports-protocol.md#relay-authentication,
docs/reference/noports-protocol.md#session-cipher). Everything after the auth line can be
transformed
per direction - e.g. AES-256-CTR encryptor/decryptor objects' ``update`` methods - which the
relay never sees in clear. Backpressure is the same as the relay's protocol splice: a
destination over its high-water mark pauses the source.

stdio mode is what an OpenSSH ``ProxyCommand`` needs: ssh talks to our stdin/stdout.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from noports.npproto import escr
from noports.npproto.escr import EscrAuth

from .splice import HIGH_WATER, FlowTransform, Splice, Transform, splice_sockets, splice_stdio

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PumpStats:
    """Byte counts of one pump run (``to_relay`` counts bytes read from the local side).

    ``relay_failure`` is why the relay side ended badly (its stream stopped without the
    peer's end-of-stream frame, or its connection was reset), None after a clean end or when
    the local side was the one that failed (``local_failure``).
    """

    bytes_to_relay: int
    bytes_from_relay: int
    duration: float
    reason: str
    relay_failure: BaseException | None = None
    local_failure: BaseException | None = None


class RelayAuthRefused(ConnectionError):
    """The relay answered our ESCR response with something other than ``ok``."""


async def _read_line(loop: asyncio.AbstractEventLoop, sock: socket.socket, limit: int) -> bytes:
    """One line, byte by byte: nothing after its newline is consumed (that is session data)."""
    out = bytearray()
    while True:
        ch = await loop.sock_recv(sock, 1)
        if not ch:
            raise ConnectionError("relay closed the connection during authentication")
        if ch == b"\n":
            return bytes(out)
        out += ch
        if len(out) > limit:
            raise RelayAuthRefused(f"relay sent no newline within {limit} bytes")


async def escr_handshake(sock: socket.socket, auth: EscrAuth, timeout: float) -> None:
    """Read the relay's challenge, answer it, and require ``ok``."""
    loop = asyncio.get_running_loop()

    async def run() -> None:
        challenge = (await _read_line(loop, sock, escr.MAX_RESPONSE_LINE)).decode(
            "ascii", "replace").strip()
        await loop.sock_sendall(sock, auth.respond(challenge))
        answer = (await _read_line(loop, sock, 256)).strip()
        if answer != escr.OK:
            raise RelayAuthRefused(f"relay refused the authentication: "
                                   f"{answer.decode('ascii', 'replace')[:80]!r}")

    try:
        await asyncio.wait_for(run(), timeout)
    except asyncio.TimeoutError:
        raise TimeoutError(f"relay did not complete ESCR authentication within "
                           f"{timeout:g}s") from None


def _auth_bytes(auth_line: bytes | str | None) -> bytes:
    if auth_line is None:
        return b""
    data = auth_line.encode() if isinstance(auth_line, str) else bytes(auth_line)
    if b"\n" in data.rstrip(b"\n"):
        raise ValueError("auth line must not contain a newline")
    return data.rstrip(b"\n") + b"\n"


async def _resolve(host: str, port: int) -> list[Any]:
    """getaddrinfo; an IP address (what relays answer) is parsed here, not in a thread:
    ``loop.getaddrinfo`` always hops through the executor, a wait on a busy machine."""
    try:
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                  flags=socket.AI_NUMERICHOST)
    except (socket.gaierror, UnicodeError):
        return await asyncio.get_running_loop().getaddrinfo(host, port,
                                                            type=socket.SOCK_STREAM)


async def connect_relay(host: str, port: int, auth_line: bytes | str | EscrAuth | None, *,
                        timeout: float = 10.0,
                        keepalive: tuple[int, int, int] | None = (30, 10, 3)) -> socket.socket:
    """Connect to a relay port and send the auth line; return the non-blocking socket.

    ``auth_line`` is the envelope (a trailing ``\\n`` is added if missing); None sends
    nothing (unauthenticated relay sessions); an :class:`EscrAuth` answers the relay's
    challenge instead (single-port mode) and returns once the relay said ``ok``.
    """
    loop = asyncio.get_running_loop()
    escr_auth = auth_line if isinstance(auth_line, EscrAuth) else None
    line = b"" if escr_auth is not None else _auth_bytes(auth_line)  # type: ignore[arg-type]
    infos = await _resolve(host, port)
    last: OSError | None = None
    for family, type_, proto, _canon, addr in infos:
        sock = socket.socket(family, type_, proto)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, addr), timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if keepalive is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                if hasattr(socket, "TCP_KEEPIDLE"):
                    idle, intvl, cnt = keepalive
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, intvl)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, cnt)
            if line:
                await asyncio.wait_for(loop.sock_sendall(sock, line), timeout)
            if escr_auth is not None:
                await escr_handshake(sock, escr_auth, timeout)
            return sock
        except RelayAuthRefused:
            sock.close()
            raise
        except (OSError, asyncio.TimeoutError) as exc:
            sock.close()
            last = exc if isinstance(exc, OSError) else TimeoutError(
                f"relay {host}:{port} did not answer within {timeout:g}s")
    raise last or OSError(f"cannot resolve relay {host}:{port}")


class StreamCipher(Protocol):
    """What a session cipher offers (npproto.streamcipher.CtrDuplex / AeadStream)."""

    def encrypt(self, data: bytes) -> bytes: ...
    def decrypt(self, data: bytes) -> bytes: ...
    def close(self) -> bytes: ...
    def finish(self) -> None: ...


def cipher_transforms(cipher: StreamCipher,
                      decrypt: Transform | None = None) -> tuple[FlowTransform, FlowTransform]:
    """(towards the relay, from the relay) transforms of one endpoint of a session cipher.

    The outgoing side writes the cipher's end-of-stream frame before the half-close; the
    incoming side checks, at EOF, that the peer's end frame arrived (AEAD: a truncated stream
    aborts the splice instead of looking like a clean end). AES-CTR has neither, by design of
    the official protocol. ``decrypt`` replaces ``cipher.decrypt`` (e.g. to log failures).
    """
    def check_end() -> bytes:
        cipher.finish()
        return b""

    return (FlowTransform(cipher.encrypt, cipher.close),
            FlowTransform(decrypt or cipher.decrypt, check_end))


# relay socket -> the splice pumping it, so its owner can stop the pump before closing it
_RUNNING: weakref.WeakKeyDictionary[socket.socket, Splice] = weakref.WeakKeyDictionary()


def _stop(sp: Splice) -> None:
    abort = getattr(sp, "abort", None)  # ProtocolSplice; an OsSplice has no transports
    (abort or sp.close)()


def abort_pump(relay: socket.socket) -> bool:
    """Stop the pump running on ``relay`` now (True if there was one).

    Call it before closing a socket a pump owns: the pump's asyncio transports must not
    outlive the socket, or they keep claiming its fd number and the next connection of the
    loop that gets the same number fails ("File descriptor N is used by transport").
    """
    sp = _RUNNING.pop(relay, None)
    if sp is None:
        return False
    _stop(sp)
    return True


async def _finish(sp: Splice, relay: socket.socket) -> PumpStats:
    _RUNNING[relay] = sp
    try:
        await sp.wait_closed()
    except asyncio.CancelledError:
        _stop(sp)  # the caller gave up on the pump: drop its transports now (see abort_pump)
        raise
    finally:
        _RUNNING.pop(relay, None)
    end = sp.ended_at or time.monotonic()
    relay_side = sp.failed_end in ("b", None)  # the relay is B in both entry points
    stats = PumpStats(sp.bytes_ab, sp.bytes_ba, end - sp.started_at, sp.close_reason,
                      sp.failure if relay_side else None,
                      None if relay_side else sp.failure)
    log.info("pump finished (%s): to relay %d bytes, from relay %d bytes, %.1fs",
             stats.reason, stats.bytes_to_relay, stats.bytes_from_relay, stats.duration)
    return stats


async def pump_socket(local: socket.socket, relay: socket.socket, *,
                      to_relay: Transform | None = None, from_relay: Transform | None = None,
                      high_water: int = HIGH_WATER,
                      on_close: Callable[[Splice], None] | None = None) -> PumpStats:
    """Pump between two connected sockets until both directions end; owns both sockets.
    ``on_close`` as in :func:`pump_stdio` (the agent reports a failure before ssh sees the
    end)."""
    sp = await splice_sockets(local, relay, mode="protocol", transform_ab=to_relay,
                              transform_ba=from_relay, high_water=high_water,
                              on_close=on_close)
    return await _finish(sp, relay)


async def pump_stdio(relay: socket.socket, *, stdin_fd: int = 0, stdout_fd: int = 1,
                     to_relay: Transform | None = None, from_relay: Transform | None = None,
                     high_water: int = HIGH_WATER,
                     on_close: Callable[[Splice], None] | None = None) -> PumpStats:
    """Pump stdin -> relay and relay -> stdout (ProxyCommand mode); owns ``relay``.

    ``on_close`` runs as the pump stops, before stdout is actually closed: the place to
    report a failure so that it is written before ssh sees the end of the tunnel."""
    sp = await splice_stdio(relay, stdin_fd=stdin_fd, stdout_fd=stdout_fd,
                            transform_in=to_relay, transform_out=from_relay,
                            high_water=high_water, on_close=on_close)
    return await _finish(sp, relay)


async def run_sshrv(host: str, port: int, auth_line: bytes | str | None, *,
                    local: socket.socket | None = None, to_relay: Transform | None = None,
                    from_relay: Transform | None = None, connect_timeout: float = 10.0,
                    stdin_fd: int = 0, stdout_fd: int = 1) -> PumpStats:
    """Connect to the relay, authenticate, and pump to ``local`` (or stdio if None)."""
    relay = await connect_relay(host, port, auth_line, timeout=connect_timeout)
    if local is None:
        return await pump_stdio(relay, stdin_fd=stdin_fd, stdout_fd=stdout_fd,
                                to_relay=to_relay, from_relay=from_relay)
    return await pump_socket(local, relay, to_relay=to_relay, from_relay=from_relay)
