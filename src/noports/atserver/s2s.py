"""Server-to-server edge: atDirectory resolution, outbound TLS connections, from/pol.

Why it looks like this (docs/reference/atprotocol.md#server-to-server): an atServer reaches another atSign's server by asking
the atDirectory for host:port, connecting over TLS while presenting its own server certificate
as a client certificate, and (for anything but public data) proving its identity with the
from/pol handshake: the remote issues a proof, we sign the uuid with our server signing key and
publish the signature at `public:_<sid>@me` (ttl 60 s) where the remote looks it up over its own
connection. One handshaked connection per (me, other) pair is kept and reused, one request in
flight at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from noports.atprotocol.errors import RemoteError
from noports.atprotocol.wire import FramingError, Reply, ReplyFramer

from .wire import RemoteReply, parse_proof, to_remote

__all__ = ["Outbound", "OutboundConnection", "RemoteError", "Resolver"]  # RemoteError: re-export

log = logging.getLogger("noports.atserver.s2s")

CONNECT_TIMEOUT = 5.0
COMMAND_TIMEOUT = 10.0


# --- directory --------------------------------------------------------------------------------

@dataclass
class Resolver:
    """atSign → (host, port) via the atDirectory, with a short cache
    (docs/reference/atprotocol.md#directory-wire-protocol,
    docs/reference/atprotocol.md#finding-another-atserver).

    `static` entries (tests, or a `proxy:`-style fixed mapping) win over the directory.
    """

    root_host: str | None
    root_port: int
    ssl_ctx: ssl.SSLContext | None
    static: dict[str, tuple[str, int]] = field(default_factory=dict)
    hit_ttl: float = 5.0
    miss_ttl: float = 1.0
    _cache: dict[str, tuple[float, tuple[str, int] | None]] = field(default_factory=dict)

    def forget(self, atsign: str) -> None:
        self._cache.pop(atsign.lower(), None)

    async def resolve(self, atsign: str) -> tuple[str, int]:
        at = atsign.lower()
        if at in self.static:
            return self.static[at]
        hit = self._cache.get(at)
        if hit is not None and hit[0] > time.monotonic():
            if hit[1] is None:
                raise RemoteError("AT0007", f"Secondary server not found for {at}")
            return hit[1]
        if self.root_host is None:
            raise RemoteError("AT0007", f"Secondary server not found for {at} (no root)")
        try:
            addr = await asyncio.wait_for(self._ask_root(at), CONNECT_TIMEOUT + 5)
        except (OSError, asyncio.TimeoutError, ssl.SSLError) as exc:
            raise RemoteError("AT0021", f"Unable to connect to root server: {exc}") from exc
        self._cache[at] = (time.monotonic() + (self.hit_ttl if addr else self.miss_ttl), addr)
        if addr is None:
            raise RemoteError("AT0007", f"Secondary server not found for {at}")
        return addr

    async def _ask_root(self, at: str) -> tuple[str, int] | None:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(self.root_host, self.root_port, ssl=self.ssl_ctx,
                                    server_hostname=self.root_host if self.ssl_ctx else None),
            CONNECT_TIMEOUT)
        framer = ReplyFramer(MAX_REPLY)
        replies: deque[Reply] = deque()
        try:
            writer.write(at.lstrip("@").encode("utf-8") + b"\n")  # the greeting comes first
            await writer.drain()
            await _next_reply(reader, framer, replies, prompt_ok=True)  # the `@` greeting
            answer = (await _next_reply(reader, framer, replies)).line.strip()
            with contextlib.suppress(OSError):
                writer.write(b"@exit\n")
            if answer == "null" or ":" not in answer:
                return None
            host, _sep, port = answer.rpartition(":")
            return host, int(port)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1)


MAX_REPLY = 10_240_000  # the reference server's inbound buffer: no reply is longer


async def _next_reply(reader: asyncio.StreamReader, framer: ReplyFramer, replies: deque[Reply],
                      *, prompt_ok: bool = False, named_prompt_ok: bool = False) -> Reply:
    """Read until the framer yields a reply (prompts only if asked); moves bytes, no parsing.

    ``prompt_ok``: any prompt counts (a greeting; a lone trailing ``@`` is taken as one).
    ``named_prompt_ok``: ``@bob@`` counts (the answer to ``pol``).
    """
    while True:
        while replies:
            r = replies.popleft()
            if r.kind != "prompt" or prompt_ok or (named_prompt_ok and r.text != "@"):
                return r
        if prompt_ok:
            flushed = framer.flush_prompt()
            if flushed is not None:
                return flushed
        chunk = await reader.read(65536)
        if not chunk:
            raise ConnectionError("connection closed by peer")
        try:
            replies.extend(framer.feed(chunk))
        except FramingError as exc:
            raise ConnectionError(str(exc)) from None


# --- one outbound connection ------------------------------------------------------------------

class OutboundConnection:
    """A TLS connection to another atServer; one command at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 label: str) -> None:
        self._reader = reader
        self._writer = writer
        self._lock = asyncio.Lock()
        self.label = label
        self.last_used = time.monotonic()
        self.closed = False
        self._framer = ReplyFramer(MAX_REPLY)
        self._replies: deque[Reply] = deque()

    @classmethod
    async def open(cls, host: str, port: int, ctx: ssl.SSLContext | None,
                   label: str) -> OutboundConnection:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, ssl=ctx,
                                        server_hostname=host if ctx else None,
                                        limit=16 * 1024 * 1024),
                CONNECT_TIMEOUT)
        except (OSError, asyncio.TimeoutError, ssl.SSLError) as exc:
            raise RemoteError("AT0021", f"Unable to connect to secondary {host}:{port}: {exc}"
                              ) from exc
        conn = cls(reader, writer, label)
        try:
            await asyncio.wait_for(_next_reply(reader, conn._framer, conn._replies,
                                               prompt_ok=True), COMMAND_TIMEOUT)
        except (OSError, ConnectionError, asyncio.TimeoutError) as exc:
            conn.close()
            raise RemoteError("AT0021", f"no prompt from {host}:{port}: {exc}") from exc
        return conn

    async def command(self, line: str, timeout: float = COMMAND_TIMEOUT) -> RemoteReply:
        """Send one command, return its reply; any I/O problem closes the connection."""
        async with self._lock:
            if self.closed:
                raise RemoteError("AT0021", f"connection to {self.label} is closed")
            # prompts still queued belong to earlier replies
            while self._replies and self._replies[0].kind == "prompt":
                self._replies.popleft()
            try:
                self._writer.write(line.encode("utf-8") + b"\n")
                await self._writer.drain()
                reply = await asyncio.wait_for(
                    _next_reply(self._reader, self._framer, self._replies,
                                named_prompt_ok=line.strip() == "pol"), timeout)
            except (OSError, ConnectionError, asyncio.TimeoutError, ssl.SSLError) as exc:
                self.close()
                raise RemoteError("AT0021", f"{self.label}: {type(exc).__name__} {exc}") from exc
            self.last_used = time.monotonic()
            return to_remote(reply, reply.line)

    @property
    def busy(self) -> bool:
        return self._lock.locked()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            with contextlib.suppress(Exception):
                self._writer.close()


# --- the pool / handshake ---------------------------------------------------------------------

ProofStore = Callable[[str, str, str], Awaitable[None] | None]
SigningKey = Callable[[str], str | None]


class Outbound:
    """Pool of outbound connections plus the client side of the from/pol handshake."""

    def __init__(self, resolver: Resolver, ssl_ctx: ssl.SSLContext | None,
                 signing_key: SigningKey, store_proof: ProofStore,
                 idle_timeout: float = 300.0) -> None:
        self.resolver = resolver
        self.ssl_ctx = ssl_ctx
        self._signing_key = signing_key
        self._store_proof = store_proof
        self._pool: dict[tuple[str, str, bool], OutboundConnection] = {}
        self._opening: dict[tuple[str, str, bool], asyncio.Lock] = {}
        self.idle_timeout = idle_timeout

    async def connection(self, me: str, other: str, handshake: bool) -> OutboundConnection:
        """A live (and, if asked, pol-authenticated as `me`) connection to `other`'s server."""
        k = (me, other, handshake)
        lock = self._opening.setdefault(k, asyncio.Lock())
        async with lock:
            conn = self._pool.get(k)
            if conn is not None and not conn.closed:
                return conn
            host, port = await self.resolver.resolve(other)
            try:
                conn = await OutboundConnection.open(host, port, self.ssl_ctx,
                                                     f"{other}@{host}:{port}")
            except RemoteError:
                self.resolver.forget(other)
                raise
            try:
                if handshake:
                    await self._handshake(conn, me, other)
            except BaseException:
                conn.close()
                raise
            self._pool[k] = conn
            return conn

    async def _handshake(self, conn: OutboundConnection, me: str, other: str) -> None:
        await conn.command(f"lookup:all:publickey{other}")  # as the reference does (docs/reference/atprotocol.md#outbound-connections)
        r = await conn.command(f"from:{me}")
        if not r.ok or r.data is None:
            raise RemoteError("AT0008", f"from:{me} refused by {other}: {r.code} {r.message}")
        try:
            cookie, proof = parse_proof(r.data)
        except ValueError as exc:
            raise RemoteError("AT0008", str(exc)) from exc
        priv = self._signing_key(me)
        if not priv:
            raise RemoteError("AT0008", f"no signing key for {me}")
        from noports.crypto import sign  # local import: keeps module import light

        sig = sign(priv, proof)
        res = self._store_proof(me, "public:" + cookie.lower(), sig)
        if asyncio.iscoroutine(res):
            await res
        r = await conn.command("pol")
        if not (r.ok and r.data and r.data.startswith(me + "@")):
            raise RemoteError("AT0008", f"pol refused by {other}: {r.code} {r.message}")

    def idle(self, me: str, other: str, *, handshake: bool) -> bool:
        """Whether a pooled connection to `other` is open and has no command in flight
        (a command started now writes at once, without waiting)."""
        k = (me, other, handshake)
        conn = self._pool.get(k)
        lock = self._opening.get(k)
        return (conn is not None and not conn.closed and not conn.busy
                and (lock is None or not lock.locked()))

    async def request(self, me: str, other: str, line: str, *, handshake: bool,
                      timeout: float = COMMAND_TIMEOUT) -> RemoteReply:
        """Run one command on `other`'s server (retrying once on a stale pooled connection)."""
        for attempt in (0, 1):
            conn = await self.connection(me, other, handshake)
            try:
                return await conn.command(line, timeout)
            except RemoteError:
                self._pool.pop((me, other, handshake), None)
                if attempt:
                    raise
        raise AssertionError("unreachable")

    async def fetch_public(self, me: str, other: str, key: str) -> RemoteReply:
        """Unauthenticated lookup on a fresh connection (used by pol verification)."""
        host, port = await self.resolver.resolve(other)
        conn = await OutboundConnection.open(host, port, self.ssl_ctx, f"{other}@{host}:{port}")
        try:
            return await conn.command(f"lookup:{key}")
        finally:
            conn.close()

    async def verify_pol(self, me: str, from_atsign: str, cookie: str, proof: str) -> bool:
        """Receiving side of pol: fetch the caller's signed proof and signing key, verify."""
        from noports.crypto import verify

        host, port = await self.resolver.resolve(from_atsign)
        conn = await OutboundConnection.open(host, port, self.ssl_ctx,
                                             f"{from_atsign}@{host}:{port}")
        try:
            sig = await conn.command(f"lookup:{cookie}")
            pub = await conn.command(f"lookup:signing_publickey{from_atsign}")
        finally:
            conn.close()
        if not (sig.ok and pub.ok and sig.data and pub.data):
            return False
        return verify(pub.data, proof, sig.data, "sha256")

    def drop(self, me: str, other: str) -> None:
        for h in (True, False):
            conn = self._pool.pop((me, other, h), None)
            if conn:
                conn.close()

    def reap_idle(self) -> None:
        now = time.monotonic()
        for k, conn in list(self._pool.items()):
            if conn.closed or now - conn.last_used > self.idle_timeout:
                conn.close()
                self._pool.pop(k, None)

    def close_all(self) -> None:
        for conn in self._pool.values():
            conn.close()
        self._pool.clear()
