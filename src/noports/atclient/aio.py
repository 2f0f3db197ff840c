"""asyncio atProtocol client for the NoPorts daemons (srvd, sshnpd) and the sshnp client.

Why not the official SDK at run time: it is blocking and thread-based, imports heavy
dependencies, reconnects its monitor by polling and can miss or duplicate notifications around
an atServer restart. This client keeps the SDK's wire conventions (so each side decrypts what
the other sends; see `e2e.py`) and adds what long-running services need:

* start-up in the minimum round trips: directory lookup (cached per process), TLS, ``from`` and
  ``pkam``; the first command is sent without waiting for the server's greeting;
* one request in flight per connection (an asyncio lock), lazy reconnect when the connection
  died between requests;
* ``monitor`` on its own connection with ``noop:0`` heartbeats, dead-connection detection and
  automatic reconnect with capped, jittered exponential backoff that resumes from the last seen
  ``epochMillis`` (overlapping by 1 ms, de-duplicated by id) so a notification is neither missed
  nor repeated across an atServer restart.

Logging never includes values, keys or command arguments.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import os
import random
import ssl
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from noports import crypto
from noports.atclient import e2e
from noports.atclient.connection import (
    AtClientError,
    AtConnectError,
    AtProtocolError,
    AtSecondaryNotFound,
    AtTimeoutError,
    parse_error,
)
from noports.atclient.e2e import Notification
from noports.atprotocol.wire import MAX_REPLY_BYTES, FramingError, Reply, ReplyFramer

if TYPE_CHECKING:  # only a type here; not importing it keeps start-up lean
    from noports.keys.atkeys import AtKeys

__all__ = [
    "AtClient",
    "AtClientError",
    "AtConnectError",
    "AtProtocolError",
    "AtSecondaryNotFound",
    "AtTimeoutError",
    "Monitor",
    "Notification",
    "lookup_secondary",
]

log = logging.getLogger(__name__)

DEFAULT_ROOT = ("root.atsign.org", 64)
DEFAULT_TIMEOUT = 10.0
STREAM_LIMIT = MAX_REPLY_BYTES  # longest line we accept (large values, big monitor lines)
DIRECTORY_CACHE_S = 600.0
CLOSE_ATTEMPTS = 50  # Monitor.aclose: cancel at most this often, CLOSE_RETRY_S apart
CLOSE_RETRY_S = 0.1

T = TypeVar("T")

_directory_cache: dict[tuple[str, int, str], tuple[str, int, float]] = {}


def _verb(cmd: str) -> str:
    """Verb only, for logs: arguments may be secret."""
    head = cmd.strip().split(" ", 1)[0]
    return head.split(":", 1)[0] or "?"


def _now_ms() -> int:
    return int(time.time() * 1000)


# --- one TLS stream ---------------------------------------------------------------------------

class _Stream:
    """A TLS stream whose bytes go through `wire.ReplyFramer`; only moves bytes.

    Every reply is ``<body>\\n<prompt>`` and the prompt has no newline, so instead of waiting
    for it we leave it to the framer: it is reported in front of the next reply and skipped
    (Dart's at_lookup does the same). That saves a wait per request.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 peer: str) -> None:
        self.reader = reader
        self.writer = writer
        self.peer = peer
        self.dead = False
        self.framer = ReplyFramer(STREAM_LIMIT)
        self._replies: deque[Reply] = deque()

    @classmethod
    async def open(cls, host: str, port: int, ssl_ctx: ssl.SSLContext | None,
                   timeout: float) -> _Stream:
        peer = f"{host}:{port}"
        ctx = ssl_ctx or ssl.create_default_context()
        try:
            reader, writer = await _bounded(
                asyncio.open_connection(host, port, ssl=ctx, server_hostname=host), timeout)
        except asyncio.TimeoutError:
            raise AtTimeoutError(f"cannot connect to {peer}: timed out after {timeout:g}s") \
                from None
        except ssl.SSLCertVerificationError as exc:
            raise AtConnectError(
                f"TLS certificate of {peer} is not trusted: {exc.verify_message}; trust the "
                "server's CA (--ca-file / ca_file, or export SSL_CERT_FILE=<plane>/tls/ca.pem)") from None
        except ConnectionRefusedError:
            raise AtConnectError(f"cannot connect to {peer}: connection refused") from None
        except (OSError, ssl.SSLError) as exc:
            raise AtConnectError(f"cannot connect to {peer}: {exc}") from None
        return cls(reader, writer, peer)

    def send_nowait(self, cmd: str) -> None:
        if "\n" in cmd or "\r" in cmd:
            raise ValueError("atProtocol commands cannot contain newlines")
        if self.dead or self.writer.is_closing():
            self.dead = True
            raise AtConnectError(f"connection to {self.peer} is closed")
        log.debug("%s -> %s", self.peer, _verb(cmd))
        self.writer.write(cmd.encode("utf-8") + b"\n")

    async def send(self, cmd: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Write one command; a peer that stops reading (full buffers) times out."""
        self.send_nowait(cmd)
        try:
            await _bounded(self.writer.drain(), timeout)
        except asyncio.TimeoutError:
            self.dead = True
            raise AtTimeoutError(f"{self.peer} is not reading (send timed out)") from None
        except (OSError, ssl.SSLError) as exc:
            self.dead = True
            raise AtConnectError(f"connection to {self.peer} failed: {exc}") from None

    async def _fill(self, timeout: float | None) -> None:
        """Read one chunk into the framer. EOF and TLS errors -> AtConnectError."""
        try:
            if timeout is None:
                chunk = await self.reader.read(65536)
            else:
                chunk = await _bounded(self.reader.read(65536), timeout)
        except asyncio.TimeoutError:
            raise AtTimeoutError(f"no reply from {self.peer} within {timeout:g}s") from None
        except (OSError, ssl.SSLError) as exc:
            self.dead = True
            raise AtConnectError(f"connection to {self.peer} failed: {exc}") from None
        if not chunk:
            self.dead = True
            raise AtConnectError(f"{self.peer} closed the connection")
        try:
            self._replies.extend(self.framer.feed(chunk))
        except FramingError as exc:
            self.dead = True
            raise AtProtocolError("", f"{self.peer} sent an over-long line: {exc}") from None

    async def read_reply(self, timeout: float | None, *, prompts: bool = False) -> Reply:
        """The next reply (prompts skipped unless `prompts`); `timeout` covers the whole wait."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            while self._replies:
                reply = self._replies.popleft()
                if prompts or reply.kind != "prompt":
                    return reply
            left = None if deadline is None else max(deadline - time.monotonic(), 0.001)
            await self._fill(left)

    async def read_line(self, timeout: float | None) -> str:
        """The next non-prompt line, prompt residue stripped (monitor streams)."""
        return (await self.read_reply(timeout)).line

    async def request(self, cmd: str, timeout: float) -> str:
        """Send one command, return the text after ``data:``; ``error:`` -> AtProtocolError.

        Any failure other than a clean ``error:`` reply leaves the stream out of step with the
        server (a late reply would answer the next command), so it is marked dead.
        """
        ok = False
        try:
            await self.send(cmd, timeout)
            reply = await self.read_reply(timeout)
            if reply.kind == "data":
                ok = True
                return reply.text
            if reply.kind == "error":
                err = parse_error(reply.text)
                log.debug("%s <- error %s to %s", self.peer, err.code, _verb(cmd))
                ok = True
                raise err
            raise AtProtocolError("", f"unexpected reply from {self.peer} to "
                                  f"{_verb(cmd)!r}: {reply.line[:80]!r}")
        except AtTimeoutError:
            raise AtTimeoutError(f"no reply from {self.peer} to {_verb(cmd)!r} within "
                                 f"{timeout:g}s") from None
        finally:
            if not ok:
                self.dead = True

    def close(self) -> None:
        """Best-effort ``@exit`` and close; never blocks."""
        self.dead = True
        with contextlib.suppress(Exception):
            if not self.writer.is_closing():
                self.writer.write(b"@exit\n")
            self.writer.close()

    async def aclose(self) -> None:
        self.close()
        with contextlib.suppress(Exception):
            await _bounded(self.writer.wait_closed(), 1.0)


async def lookup_secondary(root: tuple[str, int], atsign: str,
                           ssl_ctx: ssl.SSLContext | None = None,
                           timeout: float = DEFAULT_TIMEOUT, *, use_cache: bool = True
                           ) -> tuple[str, int]:
    """Ask the atDirectory at `root` where `atsign`'s atServer is (cached per process)."""
    atsign = e2e.fix_atsign(atsign)
    ck = (root[0], int(root[1]), atsign)
    hit = _directory_cache.get(ck)
    if use_cache and hit and hit[2] > time.monotonic():
        return hit[0], hit[1]
    stream = await _Stream.open(root[0], int(root[1]), ssl_ctx, timeout)
    peer = f"directory {stream.peer}"
    try:
        stream.send_nowait(atsign[1:])  # the directory's key: no '@'
        greeting = await stream.read_reply(timeout, prompts=True)
        if greeting.kind != "prompt":
            raise AtProtocolError("", f"{peer} did not greet with '@'")
        body = (await stream.read_reply(timeout)).line.strip()
    except AtTimeoutError:
        raise AtTimeoutError(f"no answer from {peer} for {atsign}") from None
    finally:
        stream.close()
    if body in ("null", "@null"):
        raise AtSecondaryNotFound(f"{atsign} is not registered in {peer}")
    if body.startswith("error:"):  # a limit of the directory, named in the text
        raise AtProtocolError("", f"{peer} refused the lookup of {atsign}: {body[6:200]}")
    host, sep, port = body.lstrip("@").rpartition(":")
    if not sep or not host or not port.isdigit():
        raise AtProtocolError("", f"{peer} returned a malformed address for {atsign}")
    _directory_cache[ck] = (host, int(port), time.monotonic() + DIRECTORY_CACHE_S)
    return host, int(port)


async def _bounded(aw: Awaitable[T], timeout: float) -> T:
    """``await aw`` for at most ``timeout`` s (asyncio.TimeoutError after).

    Why not asyncio.wait_for: before Python 3.12 it swallows a cancellation that arrives
    just as the awaited read completes (CPython gh-86296). Under load that race is hit: a
    monitor cancelled at shutdown kept reading (heartbeats keep it alive), and asyncio.run()
    waited for it forever, so sshnp hung with its two atServer connections open.
    asyncio.timeout (3.11+) does not lose it."""
    if hasattr(asyncio, "timeout"):
        async with asyncio.timeout(timeout):
            return await aw
    return await asyncio.wait_for(aw, timeout)  # Python 3.10


def _forget_secondary(root: tuple[str, int], atsign: str) -> None:
    _directory_cache.pop((root[0], int(root[1]), e2e.fix_atsign(atsign)), None)


# --- the client -------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _host_lock(name: str, timeout: float = 30.0) -> AsyncIterator[None]:
    """An exclusive lock shared by every process of this user on this host (flock).

    Best effort: without a writable lock directory it degrades to no lock (logged).
    """
    lock_dir = Path(os.environ.get("NOPORTS_LOCK_DIR") or Path.home() / ".atsign" / "locks")
    path = lock_dir / (hashlib.sha256(name.encode()).hexdigest()[:32] + ".lock")
    try:
        lock_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        log.debug("no host lock for %s (%s); continuing without", name, exc)
        yield
        return
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    log.warning("host lock %s still busy after %.0fs; continuing", name, timeout)
                    break
                await asyncio.sleep(0.02)
        yield
    finally:
        os.close(fd)  # releases the flock


class AtClient:
    """An authenticated atProtocol client for one atSign (create with `await AtClient.connect`)."""

    def __init__(self, atsign: str, keys: AtKeys, root: tuple[str, int] = DEFAULT_ROOT,
                 ssl_ctx: ssl.SSLContext | None = None, *,
                 secondary: tuple[str, int] | None = None,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        self.atsign = e2e.fix_atsign(atsign)
        if e2e.fix_atsign(keys.atsign) != self.atsign:
            raise ValueError(f"keys are for {keys.atsign}, not {self.atsign}")
        self.keys = keys
        self.root = (root[0], int(root[1]))
        self.ssl_ctx = ssl_ctx or ssl.create_default_context()
        self.secondary = (secondary[0], int(secondary[1])) if secondary else None
        self.timeout = timeout
        self._stream: _Stream | None = None
        self._lock = asyncio.Lock()
        self._closed = False
        self._monitors: set[Monitor] = set()
        # caches (AES keys in memory only; never logged)
        self._by_me: dict[str, str] = {}
        self._by_other: dict[str, str] = {}
        self._public_keys: dict[str, str] = {self.atsign: keys.encrypt_public}
        self._peer_locks: dict[str, asyncio.Lock] = {}
        self.last_connect_ms: float | None = None  # duration of the last connect+pkam

    # -- connection --------------------------------------------------------------------------

    @classmethod
    async def connect(cls, atsign: str, keys: AtKeys, root: tuple[str, int] = DEFAULT_ROOT,
                      ssl_ctx: ssl.SSLContext | None = None, *,
                      secondary: tuple[str, int] | None = None,
                      timeout: float = DEFAULT_TIMEOUT) -> AtClient:
        """Directory lookup (cached), TLS, ``from`` + ``pkam``; ready for commands."""
        client = cls(atsign, keys, root, ssl_ctx, secondary=secondary, timeout=timeout)
        client._stream = await client._open_authenticated()
        return client

    async def _address(self, fresh: bool = False) -> tuple[str, int]:
        if self.secondary:
            return self.secondary
        if fresh:
            _forget_secondary(self.root, self.atsign)
        return await lookup_secondary(self.root, self.atsign, self.ssl_ctx, self.timeout)

    async def _open_authenticated(self, fresh: bool = False) -> _Stream:
        """A new PKAM-authenticated stream (used by commands and by each monitor)."""
        t0 = time.perf_counter()
        host, port = await self._address(fresh)
        try:
            stream = await _Stream.open(host, port, self.ssl_ctx, self.timeout)
        except AtConnectError:
            _forget_secondary(self.root, self.atsign)  # it may have moved
            raise
        try:
            # No wait for the '@' greeting: the framer reports it before the reply.
            challenge = await stream.request(f"from:{self.atsign}", self.timeout)
            signature = e2e.sign(self.keys.pkam_private, challenge)
            eid = self.keys.enrollment_id
            cmd = (f"pkam:signingAlgo:rsa2048:hashingAlgo:sha256:enrollmentId:{eid}:{signature}"
                   if eid else f"pkam:{signature}")
            reply = await stream.request(cmd, self.timeout)
            if reply.strip() != "success":
                raise AtProtocolError("", f"pkam authentication as {self.atsign} failed")
        except BaseException:
            stream.close()
            raise
        self.last_connect_ms = (time.perf_counter() - t0) * 1000
        log.debug("%s: authenticated to %s in %.1f ms", self.atsign, stream.peer,
                  self.last_connect_ms)
        return stream

    async def command(self, cmd: str, *, timeout: float | None = None,
                      retry: bool = False) -> str:
        """Run one raw command; return the text after ``data:`` (errors -> AtProtocolError).

        Requests are serialised (one in flight per connection). A connection found dead is
        re-opened first; with `retry`, a command whose connection drops mid-way is re-sent once
        on a new connection (only for commands that are safe to repeat).
        """
        if self._closed:
            raise AtConnectError("client is closed")
        async with self._lock:
            for attempt in (0, 1):
                fresh = False
                if self._stream is None or self._stream.dead:
                    fresh = self._stream is not None
                    if self._stream is not None:
                        self._stream.close()
                        self._stream = None
                    log.info("%s: reconnecting to its atServer", self.atsign)
                    self._stream = await self._open_authenticated(fresh=fresh)
                try:
                    return await self._stream.request(cmd, timeout or self.timeout)
                except AtConnectError:
                    if not retry or attempt:
                        raise
                    log.info("%s: connection lost during %s; retrying once", self.atsign,
                             _verb(cmd))
            raise AssertionError("unreachable")

    async def close(self) -> None:
        """Stop monitors and close the connection."""
        self._closed = True
        for m in list(self._monitors):
            await m.aclose()
        if self._stream is not None:
            await self._stream.aclose()
            self._stream = None

    async def __aenter__(self) -> AtClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- keys ----------------------------------------------------------------------------------

    def _peer_lock(self, other: str) -> asyncio.Lock:
        return self._peer_locks.setdefault(other, asyncio.Lock())

    async def public_key(self, atsign: str) -> str:
        """Their encryption public key (``plookup:publickey@x``), cached."""
        atsign = e2e.fix_atsign(atsign)
        cached = self._public_keys.get(atsign)
        if cached:
            return cached
        value = (await self.command(f"plookup:publickey{atsign}", retry=True)).strip()
        if not value or value == "null":
            raise AtProtocolError("AT0015", f"{atsign} has no public encryption key "
                                  "(not activated yet?)")
        self._public_keys[atsign] = value
        return value

    async def shared_key_by_me(self, other: str, *, create: bool = True) -> str:
        """The AES key for what we send to `other`; created like the SDK when there is none."""
        other = e2e.fix_atsign(other)
        key = self._by_me.get(other)
        if key:
            return key
        async with self._peer_lock(other):
            key = self._by_me.get(other)
            if key:
                return key
            key = await self._stored_key_by_me(other)
            if key is None and not create:
                raise AtProtocolError("AT0015", f"no key shared with {other} yet")
            if key is None:
                # Several processes of one atSign (Ansible forks) may meet a new peer at once:
                # each would publish its own key and the peer would keep only the last one.
                # A host-wide lock serialises creation; the winner's key is then re-read.
                async with _host_lock(f"shared_key.{self.atsign}.{other}"):
                    key = await self._stored_key_by_me(other)
                    if key is None:
                        await self._create_shared_key(other)
                        key = await self._stored_key_by_me(other)
                        if key is None:
                            raise AtProtocolError("AT0015", f"the key shared with {other} "
                                                  "vanished right after it was written")
            self._by_me[other] = key
            return key

    async def _stored_key_by_me(self, other: str) -> str | None:
        """Our own copy of the key we share with `other`, or None when there is none."""
        try:
            wrapped = await self.command(
                f"llookup:{e2e.shared_key_self_name(self.atsign, other)}", retry=True)
        except AtProtocolError as exc:
            if exc.code != "AT0015":
                raise
            return None
        if not wrapped or wrapped.strip() == "null":
            return None
        return e2e.rsa_unwrap(self.keys.encrypt_private, wrapped)

    async def _create_shared_key(self, other: str) -> str:
        their_pub = await self.public_key(other)
        aes, for_me, for_them = e2e.new_shared_key(self.keys.encrypt_public, their_pub)
        # Their copy first: if we stop half-way, we never hold a key they cannot read.
        await self.command(e2e.update_command(
            e2e.shared_key_for_other_name(self.atsign, other), for_them,
            e2e.metadata_fragment(ttr_ms=e2e.SHARED_KEY_TTR_MS)), retry=True)
        await self.command(e2e.update_command(
            e2e.shared_key_self_name(self.atsign, other), for_me), retry=True)
        log.info("%s: created a new shared key for %s", self.atsign, other)
        return aes

    async def shared_key_by_other(self, other: str, *, refresh: bool = False) -> str:
        """The AES key `other` encrypts with for us (``lookup:shared_key@other``), cached."""
        other = e2e.fix_atsign(other)
        if other == self.atsign:
            return await self.shared_key_by_me(other)
        if not refresh:
            key = self._by_other.get(other)
            if key:
                return key
        async with self._peer_lock("<" + other):
            if not refresh and other in self._by_other:
                return self._by_other[other]
            wrapped = (await self.command(f"lookup:shared_key{other}", retry=True)).strip()
            if not wrapped or wrapped == "null":
                raise AtProtocolError("AT0015", f"{other} has not shared a key with "
                                      f"{self.atsign}")
            key = e2e.rsa_unwrap(self.keys.encrypt_private, wrapped)
            self._by_other[other] = key
            return key

    def _learn_key_share(self, n: Notification) -> None:
        """``@me:shared_key@other`` arrived: unwrap and cache it (the SDK does the same)."""
        if not n.raw_value:
            return
        try:
            self._by_other[e2e.fix_atsign(n.from_atsign)] = e2e.rsa_unwrap(
                self.keys.encrypt_private, n.raw_value)
        except (crypto.CryptoError, ValueError):
            log.warning("%s: could not unwrap the shared key from %s", self.atsign,
                        n.from_atsign)

    # -- put / get -----------------------------------------------------------------------------

    async def put_public(self, name: str, value: str, *, namespace: str | None = None,
                         ttl_ms: int | None = None, ttr_ms: int | None = None,
                         ccd: bool | None = None) -> str:
        """``public:name@me``, signed with our encryption key (dataSignature) like the SDK."""
        sig = e2e.sign(self.keys.encrypt_private, value)
        frag = e2e.metadata_fragment(ttl_ms=ttl_ms, ttr_ms=ttr_ms, ccd=ccd, data_signature=sig)
        return await self.command(e2e.update_command(
            e2e.public_key_str(name, self.atsign, namespace), value, frag), retry=True)

    async def put_self(self, name: str, value: str, *, namespace: str | None = None,
                       ttl_ms: int | None = None) -> str:
        """``name@me`` encrypted with our selfEncryptionKey and a random ivNonce."""
        sig = e2e.sign(self.keys.encrypt_private, value)
        ct, iv = e2e.encrypt_value(self.keys.self_encryption_key, value)
        frag = e2e.metadata_fragment(ttl_ms=ttl_ms, data_signature=sig, is_encrypted=True,
                                     iv_nonce=iv)
        return await self.command(e2e.update_command(
            e2e.self_key_str(name, self.atsign, namespace), ct, frag), retry=True)

    async def put_shared(self, shared_with: str, name: str, value: str, *,
                         namespace: str | None = None, ttl_ms: int | None = None,
                         ttr_ms: int | None = None, ccd: bool | None = None) -> str:
        """``@other:name@me`` encrypted with the key we share with `other`."""
        aes = await self.shared_key_by_me(shared_with)
        ct, iv = e2e.encrypt_value(aes, value)
        frag = e2e.metadata_fragment(ttl_ms=ttl_ms, ttr_ms=ttr_ms, ccd=ccd, is_encrypted=True,
                                     iv_nonce=iv)
        return await self.command(e2e.update_command(
            e2e.shared_key_str(name, shared_with, self.atsign, namespace), ct, frag), retry=True)

    async def get_public(self, name: str, atsign: str | None = None, *,
                         namespace: str | None = None) -> str | None:
        """Our own public value (``llookup``) or another atSign's (``plookup``)."""
        owner = e2e.fix_atsign(atsign or self.atsign)
        if owner == self.atsign:
            cmd = f"llookup:{e2e.public_key_str(name, owner, namespace)}"
        else:
            cmd = f"plookup:{e2e.self_key_str(name, owner, namespace)}"
        value = await self.command(cmd, retry=True)
        return None if value == "null" else value

    async def get_self(self, name: str, *, namespace: str | None = None) -> str | None:
        data, meta = e2e.parse_lookup_all(await self.command(
            f"llookup:all:{e2e.self_key_str(name, self.atsign, namespace)}", retry=True))
        if data is None:
            return None
        return e2e.decrypt_value(self.keys.self_encryption_key, data, meta.get("ivNonce"))

    async def get_shared(self, name: str, *, shared_by: str, shared_with: str | None = None,
                         namespace: str | None = None) -> str | None:
        """A value shared by another atSign with us, or one we shared (`shared_with` given)."""
        by = e2e.fix_atsign(shared_by)
        if by == self.atsign:
            if not shared_with:
                raise ValueError("shared_with is needed for a key we shared")
            aes = await self.shared_key_by_me(shared_with)
            cmd = f"llookup:all:{e2e.shared_key_str(name, shared_with, by, namespace)}"
        else:
            aes = await self.shared_key_by_other(by)
            cmd = f"lookup:all:{e2e.self_key_str(name, by, namespace)}"
        data, meta = e2e.parse_lookup_all(await self.command(cmd, retry=True))
        if data is None:
            return None
        return e2e.decrypt_value(aes, data, meta.get("ivNonce"))

    async def delete(self, atkey: str) -> str:
        """Raw ``delete:<atKey>`` (e.g. ``public:x@me``, ``@bob:x@me``)."""
        return await self.command(f"delete:{atkey}", retry=True)

    # -- notifications -------------------------------------------------------------------------

    async def notify(self, to: str, key_name: str, value: str, *, namespace: str | None = None,
                     ttl_ms: int | None = None, ttln_ms: int | None = 60_000,
                     encrypt: bool = True, notification_id: str | None = None) -> str:
        """Send ``@to:key_name[.namespace]@me`` with `value`; returns the notification id.

        Encrypted with the shared key (fresh ivNonce per call). The id makes a re-send after a
        dropped connection idempotent, so the command is retried once on a new connection.
        """
        to = e2e.fix_atsign(to)
        nid = notification_id or e2e.new_uuid()
        iv: str | None = None
        wire = value
        if encrypt:
            wire, iv = e2e.encrypt_value(await self.shared_key_by_me(to), value)
        cmd = e2e.notify_command(notification_id=nid, to=to,
                                 key=e2e.full_key_name(key_name, namespace), me=self.atsign,
                                 value=wire, iv_nonce=iv, ttln_ms=ttln_ms, ttl_ms=ttl_ms,
                                 is_encrypted=encrypt)
        reply = (await self.command(cmd, retry=True)).strip()
        return reply or nid

    async def decrypt_notification(self, n: Notification) -> Notification:
        """Fill in `value` of an encrypted notification (sender's shared key, cached).

        A stale cached key (the sender re-keyed) fails to decrypt; the key is then fetched
        again once. Connection errors propagate (the monitor replays in that case).
        """
        if not n.is_encrypted or n.raw_value is None or n.operation != "update":
            return n
        sender = e2e.fix_atsign(n.from_atsign)
        if sender == self.atsign:
            try:
                peer = e2e.fix_atsign(n.to_atsign)
            except e2e.E2EError:
                peer = sender
            try:
                aes = await self.shared_key_by_me(peer, create=False)  # a reader never writes
                return replace(n, value=e2e.decrypt_value(aes, n.raw_value, n.iv_nonce))
            except (AtProtocolError, crypto.CryptoError) as exc:
                return replace(n, error=f"cannot decrypt: {exc}")
        for refresh in (False, True):
            try:
                aes = await self.shared_key_by_other(sender, refresh=refresh)
            except AtProtocolError as exc:
                return replace(n, error=f"no shared key from {sender}: {exc}")
            except crypto.CryptoError as exc:
                return replace(n, error=f"cannot unwrap the shared key from {sender}: {exc}")
            try:
                return replace(n, value=e2e.decrypt_value(aes, n.raw_value, n.iv_nonce))
            except crypto.CryptoError as exc:
                if refresh:
                    return replace(n, error=f"cannot decrypt: {exc}")
                log.info("%s: decrypting a notification from %s failed; re-fetching the key",
                         self.atsign, sender)
        raise AssertionError("unreachable")

    def monitor(self, regex: str | None = ".*", since_ms: int | None = None, *,
                self_notifications: bool = False, heartbeat_s: float = 30.0,
                heartbeat_timeout_s: float = 10.0, backoff_base_s: float = 0.25,
                backoff_max_s: float = 30.0, queue_size: int = 1024,
                on_refused: Callable[[AtProtocolError], float | None] | None = None
                ) -> Monitor:
        """Notifications matching `regex`, on a separate connection; see `Monitor`.

        `since_ms=None` starts from now (NoPorts daemons do not want old requests); with an
        epoch, stored notifications newer than it are replayed first.
        """
        if self._closed:
            raise AtConnectError("client is closed")
        m = Monitor(self, regex, since_ms, self_notifications=self_notifications,
                    heartbeat_s=heartbeat_s, heartbeat_timeout_s=heartbeat_timeout_s,
                    backoff_base_s=backoff_base_s, backoff_max_s=backoff_max_s,
                    queue_size=queue_size, on_refused=on_refused)
        self._monitors.add(m)
        return m


class _Fatal(Exception):
    """Carries an error to the consumer of a monitor (raised from `__anext__`)."""

    def __init__(self, exc: BaseException) -> None:
        super().__init__(str(exc))
        self.exc = exc


class Monitor:
    """An async iterator of decrypted notifications that survives connection loss.

    A background task owns the monitor connection: it authenticates, sends ``monitor``, reads
    lines, answers nothing, sends ``noop:0`` every `heartbeat_s` and declares the connection
    dead when nothing comes back within `heartbeat_timeout_s`; then it reconnects with
    jittered exponential backoff and asks for a replay from the last seen ``epochMillis``.
    Cancelling a consumer waiting in ``__anext__`` does not hurt the monitor; `aclose()` (or
    ``async with``, or `AtClient.close`) stops it. `on_refused` sees each error reply after
    the first start (a revoked key...) and may return a longer delay than the back-off.
    """

    def __init__(self, client: AtClient, regex: str | None, since_ms: int | None, *,
                 self_notifications: bool, heartbeat_s: float, heartbeat_timeout_s: float,
                 backoff_base_s: float, backoff_max_s: float, queue_size: int,
                 on_refused: Callable[[AtProtocolError], float | None] | None = None
                 ) -> None:
        self.client = client
        self.regex = regex
        self.self_notifications = self_notifications
        self.heartbeat_s = heartbeat_s
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.on_refused = on_refused
        self._floor = since_ms  # never replay at or before this
        self._cursor: int | None = since_ms  # newest epochMillis (server clock) seen
        self._seen: OrderedDict[tuple[str, int], None] = OrderedDict()
        self._queue: asyncio.Queue[Notification | _Fatal] = asyncio.Queue(queue_size)
        self._task: asyncio.Task[None] | None = None
        self._stream: _Stream | None = None
        self._ready = asyncio.Event()
        self._closed = False
        self._started_ms: int | None = None
        self.connects = 0  # successful monitor starts (1 + reconnects)

    # -- public --------------------------------------------------------------------------------

    def start(self) -> Monitor:
        if self._task is None and not self._closed:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"monitor {self.client.atsign}")
        return self

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until the ``monitor`` command has been sent on an authenticated connection."""
        self.start()
        waiter = asyncio.ensure_future(self._ready.wait())
        task = self._task
        assert task is not None
        done, _pending = await asyncio.wait({waiter, task}, timeout=timeout,
                                            return_when=asyncio.FIRST_COMPLETED)
        if waiter not in done:
            waiter.cancel()
            if task in done and not self._queue.empty():
                item = self._queue.get_nowait()
                if isinstance(item, _Fatal):
                    raise item.exc
            raise AtTimeoutError("monitor did not start in time")

    @property
    def cursor(self) -> int | None:
        """Newest epochMillis seen; a replay after a reconnect starts just before it."""
        return self._cursor

    def __aiter__(self) -> AsyncIterator[Notification]:
        self.start()
        return self

    async def __anext__(self) -> Notification:
        self.start()
        if self._queue.empty() and (self._closed or (self._task and self._task.done())):
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, _Fatal):
            if isinstance(item.exc, StopAsyncIteration):
                raise StopAsyncIteration
            raise item.exc
        return item

    async def aclose(self) -> None:
        """Stop the background task and close the connection."""
        if self._closed:
            return
        self._closed = True
        self.client._monitors.discard(self)
        task = self._task
        if task is not None:
            # cancel until it has ended: a cancellation can be lost (see _bounded), and a
            # monitor left running keeps asyncio.run() from ever returning
            for _attempt in range(CLOSE_ATTEMPTS):
                if task.done():
                    break
                task.cancel()
                await asyncio.wait({task}, timeout=CLOSE_RETRY_S)
            if task.done() and not task.cancelled():
                task.exception()  # retrieved: no "never retrieved" noise at exit
            elif not task.done():
                log.warning("%s: monitor task did not stop", self.client.atsign)
        if self._stream is not None:
            await self._stream.aclose()
        with contextlib.suppress(asyncio.QueueFull):
            self._queue.put_nowait(_Fatal(StopAsyncIteration()))

    async def __aenter__(self) -> Monitor:
        return self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- background task -----------------------------------------------------------------------

    def _backoff(self, attempt: int) -> float:
        delay = min(self.backoff_max_s, self.backoff_base_s * (2 ** min(attempt, 20)))
        return delay * random.uniform(0.5, 1.0)

    def _replay_from(self) -> int | None:
        """Epoch for ``monitor:<epoch>``: 1 ms before the cursor (same-ms notifications)."""
        if self._cursor is None:
            return None
        since = self._cursor - 1
        if self._floor is not None:
            since = max(since, self._floor)
        return since

    async def _run(self) -> None:
        attempt = 0
        first = True
        try:
            while not self._closed:
                started = time.monotonic()
                override: float | None = None
                try:
                    await self._session(fresh=not first)
                except asyncio.CancelledError:
                    raise
                except (AtProtocolError, AtSecondaryNotFound, crypto.CryptoError) as exc:
                    if first:  # bad keys, unknown atSign: tell the consumer, do not spin
                        await self._queue.put(_Fatal(exc))
                        return
                    # the server's reason (e.g. "enrollment ... is revoked") is what the
                    # device's operator needs to read
                    log.warning("%s: monitor failed (%s: %s); reconnecting",
                                self.client.atsign, type(exc).__name__, exc)
                    if self.on_refused is not None and isinstance(exc, AtProtocolError):
                        override = self.on_refused(exc)
                except (AtClientError, OSError, ssl.SSLError) as exc:
                    log.warning("%s: monitor connection lost (%s)", self.client.atsign,
                                type(exc).__name__)
                except Exception:
                    log.exception("%s: monitor failed unexpectedly; reconnecting",
                                  self.client.atsign)
                finally:
                    self._ready.clear()
                    if self._stream is not None:
                        self._stream.close()
                        self._stream = None
                if self.connects:
                    first = False
                if time.monotonic() - started > 10.0:
                    attempt = 0  # it ran fine for a while: start the backoff afresh
                delay = self._backoff(attempt) if override is None else override
                attempt += 1
                log.info("%s: monitor reconnecting in %.2fs", self.client.atsign, delay)
                await asyncio.sleep(delay)
        except asyncio.CancelledError:
            pass

    async def _session(self, fresh: bool) -> None:
        """One monitor connection, from authentication until it fails."""
        self._stream = stream = await self.client._open_authenticated(fresh=fresh)
        if self._started_ms is None:
            self._started_ms = _now_ms()
        elif self._cursor is None:
            # lost before we learnt any server time (a stats line or a notification): resume
            # from when we first started, on our own clock
            self._cursor = self._started_ms
        since = self._replay_from()
        await stream.send(e2e.monitor_command(self.regex, since, self.self_notifications))
        self.connects += 1
        self._ready.set()
        log.info("%s: monitor started%s", self.client.atsign,
                 "" if since is None else " (replaying)")
        loop = asyncio.get_running_loop()
        next_beat = loop.time() + self.heartbeat_s
        ack_due: float | None = None
        while not self._closed:  # closed but still here: a cancellation was lost
            now = loop.time()
            if ack_due is not None and now >= ack_due:
                raise AtTimeoutError("monitor heartbeat not answered")
            wake = next_beat if ack_due is None else min(next_beat, ack_due)
            try:
                line = await stream.read_line(max(wake - now, 0.0))
            except AtTimeoutError:
                if loop.time() >= next_beat:
                    await stream.send("noop:0", self.heartbeat_timeout_s)
                    next_beat = loop.time() + self.heartbeat_s
                    if ack_due is None:
                        ack_due = loop.time() + self.heartbeat_timeout_s
                continue
            ack_due = None  # anything from the server proves the connection is alive
            parsed = e2e.parse_monitor_line(line)
            if parsed.kind == "notification" and parsed.notification is not None:
                await self._handle(parsed.notification)
                # time spent waiting on a slow consumer must not count against the server
                next_beat = max(next_beat, loop.time())
            elif parsed.kind == "error":
                raise parse_error(parsed.text)
            elif parsed.kind == "other":
                log.debug("%s: ignoring an unexpected monitor line", self.client.atsign)

    async def _handle(self, n: Notification) -> None:
        me = self.client.atsign
        if n.is_stats:
            # server clock: everything stored before it has already been sent to us
            if n.epoch_millis and (self._cursor is None or n.epoch_millis > self._cursor):
                self._cursor = n.epoch_millis
            return
        if self._floor is not None and n.epoch_millis and n.epoch_millis <= self._floor:
            return
        ident = (n.id, n.epoch_millis)
        if ident in self._seen:
            return  # replay overlap after a reconnect
        if e2e.is_key_share(n, me):
            self.client._learn_key_share(n)
        else:
            try:
                n = await self.client.decrypt_notification(n)
            except (AtConnectError, AtTimeoutError):
                raise  # not consumed: the reconnect replays it
            except Exception as exc:  # a bad notification must not stall the stream
                n = replace(n, error=f"cannot decrypt: {type(exc).__name__}")
            await self._queue.put(n)
        self._seen[ident] = None
        while len(self._seen) > 4096:
            self._seen.popitem(last=False)
        if n.epoch_millis and (self._cursor is None or n.epoch_millis > self._cursor):
            self._cursor = n.epoch_millis
