"""Sans-IO atDirectory (root server) session and the anti-enumeration miss policy.

Why sans-IO: the wire rules (prompt, framing, lower-casing, overflow, `@exit`, one write per
reply) and the timing policy are the parts that must match the official root and the client
parsers exactly (docs/reference/atprotocol.md#directory-wire-protocol, docs/reference/atprotocol.md#how-clients-use-the-directory). Keeping them free of sockets and clocks lets the unit
tests drive every edge case (split reads, pipelined lines, emoji atSigns, delays) directly.

The driver (server.py) feeds received bytes with :meth:`DirectorySession.receive`, performs the
:class:`Lookup` actions it gets back, reports results with :meth:`DirectorySession.resolved`,
and executes :class:`Write` (after its ``delay``) and :class:`Close` actions in order.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

PROMPT = b"@"
NULL_REPLY = b"null\r\n@"
EXIT_COMMAND = "@exit"
DEFAULT_MAX_LINE_BYTES = 255
DEFAULT_MAX_PENDING_BYTES = 8192


def error_reply(text: str) -> bytes:
    """The reply sent before the server closes a connection: ``error:<text>``, CRLF, ``@``.

    The official root destroys the socket without a word; a client (or operator) then cannot
    tell an overflow from a crash. The usual reply framing is kept (one write, CRLF, prompt)
    so every client's reply reader returns the text: the Python SDK puts it in its "malformed
    response" error, our clients print it. The connection closes right after.
    """
    clean = text.replace("\r", " ").replace("\n", " ")
    return b"error:" + clean.encode("utf-8", "replace") + b"\r\n@"


def reply_for(address: str | None) -> bytes:
    """The complete reply for one lookup: answer, CRLF and the next prompt (one write)."""
    if address is None:
        return NULL_REPLY
    return address.encode("utf-8") + b"\r\n@"


# --------------------------------------------------------------------------- actions


@dataclass(frozen=True)
class Write:
    """Send ``data`` in one write, after sleeping ``delay`` seconds (anti-enumeration)."""

    data: bytes
    delay: float = 0.0


@dataclass(frozen=True)
class Lookup:
    """Ask the store for ``atsign`` (normalised: no '@', lower-case), then call ``resolved``."""

    atsign: str


@dataclass(frozen=True)
class Close:
    """Close the connection; ``reason`` is for logs only."""

    reason: str


Action = Write | Lookup | Close


# --------------------------------------------------------------------------- miss policy


@dataclass(frozen=True)
class MissPolicy:
    """Thresholds of the anti-enumeration policy (see docs/decisions/0002).

    Misses (lookups answered ``null``) draw from two token buckets: one per connection and one
    per peer IP. While a bucket has tokens, misses are answered at once. Each miss beyond the
    bucket's tokens is delayed ``base_delay * 2**(deficit-1)`` seconds, capped at
    ``max_delay``. Buckets refill continuously, so a client that stops missing recovers.
    Connections are never closed because of misses.
    """

    conn_burst: float = 5.0
    conn_refill_per_s: float = 0.2
    ip_burst: float = 20.0
    ip_refill_per_s: float = 1.0
    base_delay: float = 0.25
    max_delay: float = 3.0

    def __post_init__(self) -> None:
        for name in ("conn_burst", "ip_burst", "conn_refill_per_s", "ip_refill_per_s",
                     "base_delay", "max_delay"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"miss policy {name} must be a finite number >= 0, got {value!r}")
        if self.base_delay > self.max_delay:
            raise ValueError("miss policy base_delay must not exceed max_delay")

    def delay_for_deficit(self, deficit: int) -> float:
        """Delay for a miss that leaves a bucket ``deficit`` tokens short (0 → no delay)."""
        if deficit <= 0 or self.max_delay == 0:
            return 0.0
        # 2**60 is plenty; avoids float overflow for absurd deficits.
        return min(self.max_delay, self.base_delay * 2.0 ** min(deficit - 1, 60))

    def max_useful_deficit(self) -> int:
        """Deficit at which the delay reaches the cap; debt beyond it only slows recovery."""
        if self.base_delay <= 0 or self.max_delay <= 0:
            return 1
        return max(1, math.ceil(math.log2(self.max_delay / self.base_delay)) + 1)


@dataclass
class TokenBucket:
    """A refilling bucket whose level may go negative (the deficit drives the delay)."""

    capacity: float
    refill_per_s: float
    floor: float
    tokens: float
    updated: float

    def refill(self, now: float) -> None:
        elapsed = max(0.0, now - self.updated)
        self.tokens = min(self.capacity, self.tokens + elapsed * self.refill_per_s)
        self.updated = now

    def take(self, now: float) -> int:
        """Take one token; return the deficit (whole tokens missing, 0 when covered)."""
        self.refill(now)
        self.tokens = max(self.floor, self.tokens - 1.0)
        return 0 if self.tokens >= 0 else math.ceil(-self.tokens)

    def is_full(self, now: float) -> bool:
        elapsed = max(0.0, now - self.updated)
        return self.tokens + elapsed * self.refill_per_s >= self.capacity


class MissLimiter:
    """Shared per-IP buckets plus a factory for per-connection buckets.

    One instance per server; the clock is injectable so tests need not sleep.
    """

    PRUNE_EVERY = 1024

    def __init__(self, policy: MissPolicy | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy or MissPolicy()
        self.clock = clock
        self._ip_buckets: dict[str, TokenBucket] = {}
        self._calls = 0
        self._floor = -float(self.policy.max_useful_deficit())

    def _bucket(self, capacity: float, refill: float) -> TokenBucket:
        return TokenBucket(capacity=capacity, refill_per_s=refill, floor=self._floor,
                           tokens=capacity, updated=self.clock())

    def connection_bucket(self) -> TokenBucket:
        return self._bucket(self.policy.conn_burst, self.policy.conn_refill_per_s)

    def on_miss(self, peer: str | None, conn_bucket: TokenBucket) -> float:
        """Account one miss; return how long to delay its reply (seconds)."""
        now = self.clock()
        deficit = conn_bucket.take(now)
        if peer is not None:
            ip_bucket = self._ip_buckets.get(peer)
            if ip_bucket is None:
                ip_bucket = self._ip_buckets[peer] = self._bucket(self.policy.ip_burst,
                                                                  self.policy.ip_refill_per_s)
            deficit = max(deficit, ip_bucket.take(now))
        self._calls += 1
        if self._calls % self.PRUNE_EVERY == 0:
            self.prune(now)
        return self.policy.delay_for_deficit(deficit)

    def prune(self, now: float | None = None) -> None:
        """Forget peers whose buckets have refilled (bounded memory under many peers)."""
        now = self.clock() if now is None else now
        for peer in [p for p, b in self._ip_buckets.items() if b.is_full(now)]:
            del self._ip_buckets[peer]

    def tracked_peers(self) -> int:
        return len(self._ip_buckets)


# --------------------------------------------------------------------------- session


def normalise_lookup(line: str) -> str | None:
    """The store key for a received line, or None when it cannot be an atSign.

    Mirrors the official root (trim, lower-case) and also tolerates a leading '@'.
    """
    key = line.strip().lower()
    if key.startswith("@"):
        key = key[1:]
    if not key or any(ch.isspace() or ch in ":@" for ch in key):
        return None
    return key


@dataclass
class DirectorySession:
    """One client connection's protocol state (no I/O)."""

    limiter: MissLimiter
    peer: str | None = None
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
    max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES
    #: How the operator sets each limit (named in the error line the peer gets).
    line_limit_name: str = "--max-line-bytes"
    pending_limit_name: str = "--max-pending-bytes"
    _buffer: bytearray = field(default_factory=bytearray, init=False)
    _lines: list[bytes] = field(default_factory=list, init=False)
    _in_flight: str | None = field(default=None, init=False)
    _closed: bool = field(default=False, init=False)
    _bucket: TokenBucket | None = field(default=None, init=False)
    lookups: int = field(default=0, init=False)
    misses: int = field(default=0, init=False)
    #: True once the session closed with an ``error:`` reply (the driver lingers then).
    errored: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self._bucket = self.limiter.connection_bucket()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def awaiting_lookup(self) -> bool:
        return self._in_flight is not None

    @property
    def expecting_line(self) -> bool:
        """True while a request is due: before the first line, or inside a partial line.

        The driver applies its request deadline then, and its idle deadline otherwise (between
        answered requests with nothing buffered).
        """
        if self._closed:
            return False
        return bool(self._buffer) or (self.lookups == 0 and not self._lines
                                      and self._in_flight is None)

    def expire(self, text: str) -> list[Action]:
        """A deadline of the driver passed: tell the peer ``text`` and close."""
        return [] if self._closed else self._refuse(text)

    def start(self) -> list[Action]:
        """Actions on accept: the bare prompt, as the official root sends."""
        return [Write(PROMPT)]

    def receive(self, data: bytes) -> list[Action]:
        """Feed bytes read from the socket; returns what to do next."""
        if self._closed:
            return []
        self._buffer += data
        while True:
            nl = self._buffer.find(b"\n")
            if nl < 0:
                break
            if nl + 1 > self.max_line_bytes:
                return self._overflow()
            self._lines.append(bytes(self._buffer[:nl]))
            del self._buffer[: nl + 1]
        if len(self._buffer) >= self.max_line_bytes:
            return self._overflow()
        if len(self._buffer) + sum(len(x) + 1 for x in self._lines) > self.max_pending_bytes:
            return self._refuse(f"too many pipelined requests: limit {self.pending_limit_name} "
                                f"{self.max_pending_bytes} bytes")
        return self._advance()

    def resolved(self, address: str | None) -> list[Action]:
        """Report the store's answer for the outstanding :class:`Lookup`."""
        if self._in_flight is None:
            raise RuntimeError("resolved() without an outstanding lookup")
        self._in_flight = None
        if self._closed:
            return []
        out: list[Action] = [self._answer(address)]
        out.extend(self._advance())
        return out

    def failed(self, reason: str) -> list[Action]:
        """The store could not answer; close rather than claim the atSign does not exist."""
        self._in_flight = None
        return self._close(f"store error: {reason}")

    def eof(self) -> list[Action]:
        """The peer closed its side."""
        return self._close("peer closed") if not self._closed else []

    # ------------------------------------------------------------------ internals

    def _overflow(self) -> list[Action]:
        return self._refuse(f"request line longer than {self.max_line_bytes} bytes: "
                            f"limit {self.line_limit_name} {self.max_line_bytes}")

    def _refuse(self, text: str) -> list[Action]:
        """Answer ``error:<text>`` (pending replies are dropped), then close."""
        self.errored = True
        return [Write(error_reply(text)), *self._close(text)]

    def _close(self, reason: str) -> list[Action]:
        self._closed = True
        self._buffer.clear()
        self._lines.clear()
        return [Close(reason)]

    def _answer(self, address: str | None) -> Write:
        self.lookups += 1
        if address is not None:
            return Write(reply_for(address))
        self.misses += 1
        assert self._bucket is not None
        return Write(NULL_REPLY, self.limiter.on_miss(self.peer, self._bucket))

    def _advance(self) -> list[Action]:
        """Process queued lines until one needs the store (one lookup in flight at a time)."""
        out: list[Action] = []
        while self._lines and self._in_flight is None and not self._closed:
            raw = self._lines.pop(0)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                out.append(self._answer(None))
                continue
            stripped = text.strip()
            if stripped.lower() == EXIT_COMMAND:
                out.extend(self._close("@exit"))
                break
            if not stripped:
                # An empty line is not a probe for an atSign: answer, but do not count a miss.
                out.append(Write(NULL_REPLY))
                continue
            key = normalise_lookup(stripped)
            if key is None:
                out.append(self._answer(None))
                continue
            self._in_flight = key
            out.append(Lookup(key))
        return out
