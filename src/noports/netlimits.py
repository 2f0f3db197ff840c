"""Connection limits shared by the TLS servers (atdirectory, atserver).

Why this module: ``asyncio.start_server(ssl=...)`` only calls the handler *after* the TLS
handshake, so a limit counted in the handler misses every connection that never starts TLS
(4,000 raw TCP opens took the directory to 1.4 GB). Here the count starts at TCP accept,
before TLS, and the slot is held until the socket closes, whatever happens in between.

Pieces (small on purpose; each is usable alone):

* :func:`source_of` maps a peer address to the key counted per source (IPv4 address,
  IPv6 /64).
* :class:`Admission` is pure bookkeeping: ``admit(source)`` returns ``None`` (counted) or the
  reason string naming the limit and its value; ``release(source)`` on close.
* :func:`start_guarded_server` is a drop-in for ``asyncio.start_server(ssl=...)``: it accepts
  plain TCP, asks the :class:`Admission`, runs the TLS handshake under a deadline and only
  then calls ``client_connected_cb(reader, writer)``. A refused peer is told why (one line,
  over TLS, when the caller gives ``refusal``) and closed.
* :func:`linger_close` closes after a last error line without the RST that would eat it.
* :func:`make_idle_tls_cheap` lowers asyncio's per-connection SSL read buffer (256 KiB by
  default) so an idle TLS connection costs tens of KiB; :func:`release_memory` and
  :class:`MemoryReleaser` give freed heap back to the OS (glibc keeps it otherwise).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import ipaddress
import logging
import os
import socket
import ssl
import time
import weakref
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

#: asyncio's default SSL read buffer per connection (``SSLProtocol.max_size``).
ASYNCIO_SSL_BUFFER = 256 * 1024
#: What :func:`make_idle_tls_cheap` sets by default: one full TLS record (16 KiB + overhead).
CHEAP_SSL_BUFFER = 20 * 1024
#: Longest a refused peer may take for the TLS handshake that carries the refusal line.
REFUSAL_HANDSHAKE_TIMEOUT = 5.0
#: Refusals told over TLS at the same time; beyond this, refused sockets are just closed.
MAX_REFUSALS_IN_FLIGHT = 32
#: At most one "refusing connection" log line per this many seconds (a flood would fill disks).
REFUSAL_LOG_INTERVAL = 1.0
#: How long a closing side keeps reading (and discarding) after its last words, so the peer's
#: in-flight bytes do not meet a closed socket, whose RST would discard the unread error line.
LINGER_SECONDS = 1.0
#: How long an evicted connection gets to flush its error line before the socket is cut.
EVICTED_CLOSE_GRACE = 1.0

ClientCallback = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
#: What ``refusal(reason)`` returns: bytes written in one write, a sequence of chunks written
#: one write (one TLS record) each, or None to close without a word.
Refusal = bytes | Sequence[bytes] | None


def source_of(peername: Any) -> str | None:
    """The per-source key of a socket peer name: the IPv4 address, or the IPv6 /64.

    One IPv6 host usually owns a whole /64, so counting single IPv6 addresses would not limit
    anybody. IPv4-mapped IPv6 addresses count as their IPv4 address. Unix sockets and unknown
    shapes give ``None`` (not counted per source, still counted in the total).
    """
    if not isinstance(peername, (tuple, list)) or not peername:
        return None
    try:
        addr = ipaddress.ip_address(str(peername[0]).split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        if addr.is_loopback:
            return str(addr)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)


@dataclass(frozen=True)
class Verdict:
    """What :meth:`Admission.open` decided for a new connection.

    ``refusal`` set: refused, nothing counted (the text names the limit and its value).
    Otherwise admitted; ``evict`` is then ``None``, or the key of an older unproven
    connection whose slot the new one took: the caller closes it, telling it ``eviction``.
    """

    refusal: str | None = None
    evict: Hashable | None = None
    eviction: str | None = None


class Admission:
    """Counts open connections in total and per source; pure, no sockets, no clock.

    ``total_name`` and ``per_source_name`` are how the operator sets the limits (CLI flags), so
    the refusal text tells the peer and the log which knob was hit.

    Connections counted with :meth:`open` (by a key) start *unproven*: not yet authenticated
    (atServer) or not yet answered (atDirectory). When the total is full, a new connection
    takes the slot of the oldest unproven one instead of being refused (OpenSSH's
    MaxStartups idea: whoever holds slots without proving anything pays, not the next
    client); :meth:`proven` exempts a connection for good. The per-source limit is checked
    first and never evicts. A new connection itself can be evicted only after ``max_total``
    newer unproven connections arrived, time enough to authenticate.
    """

    def __init__(self, max_total: int, max_per_source: int, *,
                 total_name: str = "--max-connections",
                 per_source_name: str = "--max-connections-per-ip",
                 unproven: str = "not yet authenticated", evict: bool = True) -> None:
        if max_total < 1 or max_per_source < 1:
            raise ValueError("connection limits must be at least 1")
        self.max_total = max_total
        self.max_per_source = max_per_source
        self.total_name = total_name
        self.per_source_name = per_source_name
        self.unproven_name = unproven
        self.evict_when_full = evict
        self._total = 0
        self._per_source: Counter[str] = Counter()
        self._keys: dict[Hashable, str | None] = {}
        #: Unproven connections, oldest first (insertion order): the eviction candidates.
        self._unproven: OrderedDict[Hashable, None] = OrderedDict()
        #: Highest number of connections ever open at once, in total and from one source.
        self.peak_total = 0
        self.peak_per_source = 0
        #: Connections closed to make room for a new one, since start.
        self.evictions = 0

    @property
    def open_total(self) -> int:
        return self._total

    @property
    def open_unproven(self) -> int:
        return len(self._unproven)

    def open_from(self, source: str | None) -> int:
        return self._per_source.get(source, 0) if source is not None else 0

    def sources(self) -> int:
        """Number of sources with at least one open connection (memory is bounded by it)."""
        return len(self._per_source)

    def _busy(self) -> str:
        return (f"server busy: {self._total} connections open, "
                f"limit {self.total_name} {self.max_total}")

    def _per_source_full(self, source: str | None) -> str | None:
        if source is not None and self._per_source[source] >= self.max_per_source:
            return (f"too many connections from {source}: "
                    f"limit {self.per_source_name} {self.max_per_source}")
        return None

    def _count(self, source: str | None) -> None:
        self._total += 1
        self.peak_total = max(self.peak_total, self._total)
        if source is not None:
            self._per_source[source] += 1
            self.peak_per_source = max(self.peak_per_source, self._per_source[source])

    def admit(self, source: str | None) -> str | None:
        """Count one new connection, or return why not (nothing is counted then).

        Untracked: such a connection is never evicted; release it with :meth:`release`.
        """
        if self._total >= self.max_total:
            return self._busy()
        reason = self._per_source_full(source)
        if reason is not None:
            return reason
        self._count(source)
        return None

    def release(self, source: str | None) -> None:
        """Forget one connection counted by :meth:`admit` (call exactly once per admit)."""
        self._total = max(0, self._total - 1)
        if source is not None and source in self._per_source:
            self._per_source[source] -= 1
            if self._per_source[source] <= 0:
                del self._per_source[source]

    def open(self, key: Hashable, source: str | None) -> Verdict:
        """Count connection ``key`` (unproven), evicting the oldest unproven one when full."""
        if key in self._keys:
            raise ValueError("connection key already open")
        reason = self._per_source_full(source)
        if reason is not None:
            return Verdict(refusal=reason)
        victim: Hashable | None = None
        eviction = None
        if self._total >= self.max_total:
            if not (self.evict_when_full and self._unproven):
                return Verdict(refusal=self._busy())
            eviction = (f"{self._busy()}; the oldest connection {self.unproven_name} "
                        "is closed to make room")
            victim = next(iter(self._unproven))
            self.close(victim)
            self.evictions += 1
        self._count(source)
        self._keys[key] = source
        self._unproven[key] = None
        return Verdict(evict=victim, eviction=eviction)

    def proven(self, key: Hashable) -> None:
        """Connection ``key`` authenticated (or was answered): never evict it."""
        self._unproven.pop(key, None)

    def is_open(self, key: Hashable) -> bool:
        return key in self._keys

    def close(self, key: Hashable) -> None:
        """Forget connection ``key`` (idempotent: an evicted key is already forgotten)."""
        if key not in self._keys:
            return
        source = self._keys.pop(key)
        self._unproven.pop(key, None)
        self.release(source)


# --------------------------------------------------------------------------- memory


def make_idle_tls_cheap(buffer_size: int = CHEAP_SSL_BUFFER) -> int:
    """Lower asyncio's per-connection SSL read buffer; returns the previous size.

    ``asyncio.sslproto.SSLProtocol`` allocates (and zero-fills) ``max_size`` bytes per TLS
    connection, 256 KiB by default: 1,000 idle clients then hold ~250 MB. It is a class
    attribute, so this is process-wide: call it once at server start. A TLS record carries at
    most 16 KiB (+ header and MAC), so 20 KiB costs bulk transfers more loop turns per MiB
    (one read per record) and nothing else.
    """
    from asyncio import sslproto

    if buffer_size < 17 * 1024:
        raise ValueError("the SSL buffer must hold one full TLS record (>= 17 KiB)")
    previous = int(sslproto.SSLProtocol.max_size)
    sslproto.SSLProtocol.max_size = buffer_size
    return previous


def _libc_malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_MALLOC_TRIM = _libc_malloc_trim()


def release_memory() -> bool:
    """Ask glibc to return free heap pages to the OS (``malloc_trim(0)``).

    Returns True when glibc released something, False when not or where glibc is absent.
    Many closed connections leave free but fragmented heap that glibc keeps otherwise.
    """
    if _MALLOC_TRIM is None:
        return False
    return bool(_MALLOC_TRIM(0))


class MemoryReleaser:
    """Decides when to call :func:`release_memory` after connections close (pure; no clock).

    A trim is worth it after a burst of closes, not after each: ``closed(now)`` counts a
    close; the trim is due once at least ``every`` closes are pending and closes have paused
    for ``quiet`` seconds (so the stragglers of a burst are included), or ``max_wait`` seconds
    after the first pending close while churn goes on. A trim of a large heap takes
    milliseconds, hence ``every``. ``next_check(now)`` says when to ask again; the server
    schedules the call.
    """

    def __init__(self, every: int = 256, quiet: float = 0.5, max_wait: float = 5.0,
                 trim: Callable[[], bool] = release_memory) -> None:
        self.every = every
        self.quiet = quiet
        self.max_wait = max_wait
        self.trim = trim
        self.pending = 0
        self.first = 0.0
        self.last_close = 0.0
        self.trims = 0

    def closed(self, now: float) -> None:
        if self.pending == 0:
            self.first = now
        self.pending += 1
        self.last_close = now

    def due(self, now: float) -> bool:
        return self.pending >= self.every and (now - self.last_close >= self.quiet
                                               or now - self.first >= self.max_wait)

    def next_check(self, now: float) -> float:
        """Seconds from ``now`` until :meth:`due` may turn true (0 when it is)."""
        return max(0.0, min(self.last_close + self.quiet, self.first + self.max_wait) - now)

    def run(self, now: float) -> bool:
        """Trim if due; returns whether it trimmed."""
        if not self.due(now):
            return False
        self.pending = 0
        self.trims += 1
        self.trim()
        return True


# --------------------------------------------------------------------------- server edge


def _break_transport_cycle(transport: asyncio.BaseTransport) -> None:
    if transport.is_closing() and getattr(transport, "_sock", None) is None:
        with contextlib.suppress(AttributeError):
            transport._read_ready_cb = None  # type: ignore[attr-defined]


class _Gate(asyncio.Protocol):
    """Per-socket protocol from TCP accept to close: admission, TLS, then the stream handler.

    After the handshake it stays the transport's protocol and forwards everything to a
    ``StreamReaderProtocol``, so it sees the close and releases the slot exactly once.
    """

    def __init__(self, guard: _Guard) -> None:
        self.guard = guard
        self.source: str | None = None
        self.admitted = False
        self.inner: asyncio.StreamReaderProtocol | None = None
        self.early: list[bytes] = []
        self.early_eof = False
        self.lost = False
        self.evicted = False
        self.task: asyncio.Task[None] | None = None
        self.tls: asyncio.Transport | None = None
        self._first_byte: asyncio.Future[None] | None = None

    # -- raw phase
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.raw = transport
        # Read nothing before the handshake: the bytes belong to TLS (see _wait_first_byte).
        transport.pause_reading()
        # Python <= 3.11.2 (Debian 12's python3) registers the reader after connection_made
        # even when it paused; undo that before the first read (public calls only: resume
        # re-registers, pause unregisters and cancels any read already queued).
        asyncio.get_running_loop().call_soon(self._repause)
        self.source = source_of(transport.get_extra_info("peername"))
        verdict = self.guard.admission.open(self, self.source)
        loop = asyncio.get_running_loop()
        if verdict.refusal is None:
            self.admitted = True
            self.task = loop.create_task(self._upgrade())
            if isinstance(verdict.evict, _Gate):
                self.guard.log_refusal(verdict.evict.source, verdict.eviction or "", "evicting")
                verdict.evict.evict(verdict.eviction or "")
        else:
            self.guard.log_refusal(self.source, verdict.refusal)
            self.task = loop.create_task(self._refuse(verdict.refusal))

    def evict(self, reason: str) -> None:
        """Close this connection to make room for a newer one (its slot is already reused).

        After TLS the peer reads ``reason`` in the server's error line (``eviction``, else
        ``refusal``); before, there is no channel for words and the socket is just closed.
        """
        self.evicted = True
        if self.admitted:  # the Admission already forgot it; this counts the close
            self.admitted = False
            self.guard.closed(self)
        self._wake_first_byte()
        tls = self.tls
        guard = self.guard
        words = guard.eviction or guard.refusal
        message = words(reason) if (tls is not None and words is not None) else None
        if tls is None or tls.is_closing() or message is None:
            self.raw.abort()
            return
        for chunk in [message] if isinstance(message, bytes) else message:
            tls.write(chunk)
        tls.close()  # flushes the line, then close_notify
        # a peer that never reads would keep the socket through the TLS shutdown timeout
        asyncio.get_running_loop().call_later(EVICTED_CLOSE_GRACE, self._abort_if_open)

    def _abort_if_open(self) -> None:
        if not self.lost:
            self.raw.abort()

    def _wake_first_byte(self) -> None:
        if self._first_byte is not None and not self._first_byte.done():
            self._first_byte.set_result(None)

    def _repause(self) -> None:
        if not self.raw.is_closing() and self.inner is None:
            self.raw.resume_reading()
            self.raw.pause_reading()

    async def _wait_first_byte(self, timeout: float) -> bool:
        """Wait until the peer sends its first byte (peeked, not read); False on EOF/timeout.

        A socket that never starts TLS then costs a transport and a future, not the TLS state
        (OpenSSL object, BIOs, asyncio's read buffer: about 60 KiB), and one closed before TLS
        costs no handshake. The transport owns the file descriptor, so the wait uses a
        duplicate of it.
        """
        loop = asyncio.get_running_loop()
        try:
            dup = socket.socket(fileno=os.dup(self.raw.get_extra_info("socket").fileno()))
        except (AttributeError, OSError, ValueError):
            return True  # cannot wait cheaply here: let the handshake do the waiting
        ready = self._first_byte = loop.create_future()
        try:
            dup.setblocking(False)
            loop.add_reader(dup.fileno(), lambda: ready.done() or ready.set_result(None))
        except (NotImplementedError, RuntimeError, OSError):
            dup.close()
            return True
        try:
            await asyncio.wait_for(ready, timeout)
            if self.lost or self.evicted:
                return False  # closed or evicted meanwhile
            return dup.recv(1, socket.MSG_PEEK) != b""
        except BlockingIOError:
            return True  # spurious wake-up: the handshake will wait
        except (asyncio.TimeoutError, OSError):
            return False
        finally:
            self._first_byte = None
            loop.remove_reader(dup.fileno())
            dup.close()

    async def _handshake(self, timeout: float) -> asyncio.Transport | None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        if not await self._wait_first_byte(timeout) or self.lost:
            if self.lost:
                return None
            log.debug("no TLS from %s (closed, or nothing within %gs)", self.source, timeout)
            self.raw.abort()
            return None
        left = max(0.1, timeout - (loop.time() - start))
        try:
            tls = await loop.start_tls(self.raw, self, self.guard.ssl, server_side=True,
                                       ssl_handshake_timeout=left)
        except (OSError, ssl.SSLError, asyncio.TimeoutError) as exc:
            log.debug("TLS handshake with %s failed: %s", self.source, exc)
            # The traceback holds start_tls's frame, which holds the future holding this
            # exception: a cycle that would keep the SSL object and its buffer until a full gc.
            exc.__traceback__ = None
            self.raw.abort()
            return None
        return tls

    async def _upgrade(self) -> None:
        try:
            tls = await self._handshake(self.guard.handshake_timeout)
            if tls is None or self.lost:
                return
            if self.evicted:  # during the handshake
                tls.abort()
                return
            self.tls = tls
            _GATES[tls] = self
            reader = asyncio.StreamReader(limit=self.guard.limit)
            self.inner = asyncio.StreamReaderProtocol(reader, self.guard.callback)
            self.inner.connection_made(tls)
            for data in self.early:
                self.inner.data_received(data)
            self.early.clear()
            if self.early_eof:
                self.inner.eof_received()
        finally:
            if self.inner is None:
                self._release()

    async def _refuse(self, reason: str) -> None:
        guard = self.guard
        message = guard.refusal(reason) if guard.refusal is not None else None
        if message is None or guard.refusing >= guard.max_refusals:
            self.raw.abort()
            return
        guard.refusing += 1
        try:
            tls = await self._handshake(min(guard.handshake_timeout, REFUSAL_HANDSHAKE_TIMEOUT))
            if tls is not None:
                for chunk in [message] if isinstance(message, bytes) else message:
                    tls.write(chunk)
                # Linger: the peer may still be sending its request (discarded in
                # data_received); closing now would answer it with an RST.
                for _tick in range(int(LINGER_SECONDS / 0.05)):
                    if self.lost:
                        break
                    await asyncio.sleep(0.05)
                tls.close()
        finally:
            guard.refusing -= 1

    # -- forwarded after the handshake
    def data_received(self, data: bytes) -> None:
        if self.inner is not None:
            self.inner.data_received(data)
        elif self.admitted:
            self.early.append(data)

    def eof_received(self) -> bool | None:
        if self.inner is not None:
            return self.inner.eof_received()
        self.early_eof = True
        return False  # under TLS a half-close cannot be kept open anyway

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost = True
        self._wake_first_byte()
        if self.tls is not None:
            _GATES.pop(self.tls, None)
            self.tls = None
        if exc is not None and not isinstance(exc, Exception):
            # seen under load: a CancelledError as the reason; handed on, it would cancel the
            # handler's wait_closed() and so the handler itself
            exc = ConnectionAbortedError(f"connection lost ({type(exc).__name__})")
        if self.inner is not None:
            self.inner.connection_lost(exc)  # type: ignore[arg-type]
        self._release()
        self.inner = None
        self.early.clear()
        # asyncio's socket transport keeps a bound method of itself (a reference cycle), so a
        # closed transport waits for a full gc; clear it once the socket is gone.
        loop = asyncio.get_running_loop()
        loop.call_soon(_break_transport_cycle, self.raw)

    def _release(self) -> None:
        if self.admitted:
            self.admitted = False
            self.guard.closed(self)


#: The gate of each TLS transport handed to a handler, so the handler can say "proven".
_GATES: weakref.WeakKeyDictionary[asyncio.BaseTransport, _Gate] = weakref.WeakKeyDictionary()


def mark_proven(writer: asyncio.StreamWriter) -> bool:
    """Tell the connection's admission that it authenticated (or was answered).

    A proven connection is never evicted to make room (see :class:`Admission`). Returns
    False for a writer that does not come from :func:`start_guarded_server`.
    """
    gate = _GATES.get(writer.transport)
    if gate is None or not gate.admitted:
        return False
    gate.guard.admission.proven(gate)
    return True


class RateLimitedLog:
    """At most one log line per ``interval`` seconds, with the count of lines left out.

    Why: a flood of hostile connections ends in a flood of closes; a line per close costs
    the event loop (and the disk) more than the close itself.
    """

    def __init__(self, logger: logging.Logger, interval: float = REFUSAL_LOG_INTERVAL) -> None:
        self.logger = logger
        self.interval = interval
        self._at = -float("inf")
        self._left_out = 0

    def log(self, level: int, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._at < self.interval:
            self._left_out += 1
            return
        if self._left_out:
            msg += f" (and {self._left_out} more such lines left out)"
        self.logger.log(level, msg, *args)
        self._at = now
        self._left_out = 0


class _Guard:
    """State shared by the gates of one listening server."""

    def __init__(self, callback: ClientCallback, ssl_context: ssl.SSLContext,
                 admission: Admission, handshake_timeout: float, limit: int,
                 refusal: Callable[[str], Refusal] | None,
                 releaser: MemoryReleaser | None, max_refusals: int,
                 eviction: Callable[[str], Refusal] | None = None) -> None:
        self.callback = callback
        self.ssl = ssl_context
        self.admission = admission
        self.handshake_timeout = handshake_timeout
        self.limit = limit
        self.refusal = refusal
        self.eviction = eviction
        self.releaser = releaser
        self.max_refusals = max_refusals
        self.refusing = 0
        self._trim_handle: asyncio.TimerHandle | None = None
        self._refusal_log_at = -float("inf")
        self._refusals_unlogged = 0

    def log_refusal(self, source: str | None, reason: str, what: str = "refusing") -> None:
        """One warning per second at most, with the count of refusals not logged since."""
        now = time.monotonic()
        if now - self._refusal_log_at < REFUSAL_LOG_INTERVAL:
            self._refusals_unlogged += 1
            return
        more = (f" (and {self._refusals_unlogged} more refusals or evictions since the last "
                "such line)" if self._refusals_unlogged else "")
        log.warning("%s connection from %s: %s%s", what, source, reason, more)
        self._refusal_log_at = now
        self._refusals_unlogged = 0

    def closed(self, gate: _Gate) -> None:
        self.admission.close(gate)
        if self.releaser is None:
            return
        loop = asyncio.get_running_loop()
        self.releaser.closed(loop.time())
        self._schedule_trim()

    def _schedule_trim(self) -> None:
        assert self.releaser is not None
        if self._trim_handle is None and self.releaser.pending >= self.releaser.every:
            loop = asyncio.get_running_loop()
            self._trim_handle = loop.call_later(self.releaser.next_check(loop.time()) + 0.01,
                                                self._trim)

    def _trim(self) -> None:
        self._trim_handle = None
        assert self.releaser is not None
        if self.releaser.run(asyncio.get_running_loop().time()):
            log.debug("released free heap to the OS after many closes")
        else:
            self._schedule_trim()


async def start_guarded_server(client_connected_cb: ClientCallback, host: str | None,
                               port: int, *, ssl: ssl.SSLContext, admission: Admission,
                               handshake_timeout: float = 10.0,
                               refusal: Callable[[str], Refusal] | None = None,
                               eviction: Callable[[str], Refusal] | None = None,
                               releaser: MemoryReleaser | None = None,
                               limit: int = 2 ** 16, backlog: int = 1024,
                               max_refusals: int = MAX_REFUSALS_IN_FLIGHT,
                               **kwargs: Any) -> asyncio.Server:
    """Like ``asyncio.start_server(cb, host, port, ssl=...)``, counted from TCP accept.

    * ``admission`` decides at accept, before TLS; its slot is freed when the socket closes.
    * ``handshake_timeout`` (seconds) bounds the TLS handshake; a peer that never sends a
      ClientHello holds its slot at most that long.
    * ``refusal(reason)`` returns what a refused peer is sent over TLS before the close: bytes,
      or a sequence of chunks each sent as its own write (``None``: close without a word). At
      most ``max_refusals`` such handshakes run at once; beyond that refused sockets are
      closed at once.
    * When the total is full, a new connection evicts the oldest one the handler has not
      called :func:`mark_proven` for (:class:`Admission`); after TLS the evicted peer is sent
      ``eviction(reason)`` (default: ``refusal(reason)``) before the close.
    * ``releaser`` (optional) trims the heap after many closes.
    * ``limit`` is the StreamReader buffer limit, as in ``start_server``; other keyword
      arguments go to ``loop.create_server`` (``reuse_address`` and the like).
    """
    if handshake_timeout <= 0:
        raise ValueError("handshake_timeout must be > 0")
    guard = _Guard(client_connected_cb, ssl, admission, handshake_timeout, limit, refusal,
                   releaser, max_refusals, eviction)
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: _Gate(guard), host, port, backlog=backlog,
                                    **kwargs)


async def aclose_writer(writer: asyncio.StreamWriter, timeout: float = 1.0) -> None:
    """Close a stream and wait at most ``timeout`` for the TLS close.

    Never raises, except CancelledError when the calling task itself is being cancelled.
    """
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), timeout)
    except asyncio.CancelledError:
        writer.transport.abort()
        task = asyncio.current_task()
        cancelling = getattr(task, "cancelling", None)
        if cancelling is None or cancelling():
            raise
    except Exception:  # closing is best effort; a peer that never answers the TLS close
        writer.transport.abort()  # would keep the socket for asyncio's 30 s shutdown timeout


async def linger_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       seconds: float = LINGER_SECONDS, max_bytes: int = 1 << 20) -> None:
    """Close after a last reply, reading and discarding what the peer still sends.

    Closing a socket with unread input makes the kernel send an RST, and an RST makes the
    peer's kernel drop data it has not read yet, such as the error line just written. So
    flush, then discard input until the peer closes, ``seconds`` pass or ``max_bytes`` came.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    with contextlib.suppress(Exception):
        await asyncio.wait_for(writer.drain(), seconds)
        got = 0
        while got < max_bytes:
            left = deadline - loop.time()
            if left <= 0:
                break
            chunk = await asyncio.wait_for(reader.read(65536), left)
            if not chunk:
                break
            got += len(chunk)
    await aclose_writer(writer)


__all__ = ["ASYNCIO_SSL_BUFFER", "CHEAP_SSL_BUFFER", "Admission", "MemoryReleaser", "RateLimitedLog",
           "Verdict",
           "aclose_writer", "linger_close", "make_idle_tls_cheap", "mark_proven",
           "release_memory", "source_of", "start_guarded_server"]
