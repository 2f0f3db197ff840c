"""Sans-IO state machine of one socket-rendezvous session (NoPorts srvd, docs/reference/noports-protocol.md#relay-allocation-and-pairing).

Why sans-IO: the pairing and lifetime rules (5 s auth deadline, FIFO pairing, 30 s
"never paired" grace, close-when-last-connection-ends) are the part that must match the
official relay exactly, and they are far easier to test with an injected clock than
through real sockets. The asyncio edge (:mod:`noports.relay.server`) feeds events in and
executes the returned actions.

Why unauthenticated sockets have their own budget (issue 9): the session's ports are
visible to a port scan, so anybody may connect to them. A connection that has not
authenticated must never take a place a session's real party needs: every socket is
authenticated on its own (concurrently), the first to authenticate on each side is paired,
and unauthenticated ones are bounded per side (``max_unauth_per_side``; a new one beyond it
evicts the *oldest* unauthenticated one, which a real party, that sends its auth line at
once, never is) and each has its own deadline (``auth_timeout``). Only authenticated
connections count against ``max_pending_per_side``.

Connections are identified by opaque integer ids chosen by the caller.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import Enum
from typing import Callable, Union  # noqa: UP035 (3.8: abc generics are not subscriptable)

log = logging.getLogger(__name__)

#: Checks the first line a side sends (without its trailing ``\n``). Must be cheap and
#: synchronous: it runs inside the event loop. Returns True to accept the side.
SideAuthenticator = Callable[[bytes], bool]


class Side(str, Enum):
    """Which listening port a connection arrived on (A = client, B = device)."""

    A = "A"
    B = "B"


@dataclass(frozen=True)
class SessionPolicy:
    """Timers and limits of a session. Defaults are the official relay's values."""

    auth_timeout: float = 5.0  # per inbound socket, to deliver its auth line
    unpaired_timeout: float = 30.0  # grace after creation; session dies if nothing is paired then
    max_auth_line: int = 4096  # bytes, including the terminating newline
    max_pending_per_side: int = 16  # authenticated but unpaired, per port
    max_unauth_per_side: int = 64  # not yet authenticated, per port; oldest evicted beyond
    max_pairs: int = 256  # concurrently spliced pairs per session (npt --multi)


# ---------------------------------------------------------------------------- actions


@dataclass(frozen=True)
class Pair:
    """Splice connection ``a`` (port A) with connection ``b`` (port B)."""

    a: int
    b: int


@dataclass(frozen=True)
class Drop:
    """Close a connection (whatever state it is in) for ``reason``."""

    conn: int
    reason: str


@dataclass(frozen=True)
class CloseSession:
    """Close the listeners and every remaining connection; the session is over."""

    reason: str


Action = Union[Pair, Drop, CloseSession]  # noqa: UP007 (runtime alias: `|` on classes needs 3.10)


# --------------------------------------------------------------------- auth line reader


class AuthLineTooLong(ValueError):
    """The first line exceeded :attr:`SessionPolicy.max_auth_line` bytes."""


class AuthLineReader:
    """Accumulates bytes until the first ``\\n``; bounded so a peer cannot grow it."""

    __slots__ = ("_buf", "_limit")

    def __init__(self, limit: int = 4096) -> None:
        self._buf = bytearray()
        self._limit = limit

    def feed(self, data: bytes) -> tuple[bytes, bytes] | None:
        """Return ``(line_without_newline, rest)`` once complete, else None.

        Raises :class:`AuthLineTooLong` when no newline arrives within the limit.
        """
        start = len(self._buf)
        self._buf += data
        nl = self._buf.find(b"\n", start)
        if nl < 0:
            if len(self._buf) >= self._limit:
                raise AuthLineTooLong(f"no newline in first {self._limit} bytes")
            return None
        if nl + 1 > self._limit:
            raise AuthLineTooLong(f"auth line longer than {self._limit} bytes")
        line, rest = bytes(self._buf[:nl]), bytes(self._buf[nl + 1 :])
        self._buf = bytearray()
        return line, rest


# --------------------------------------------------------------------------- session


class RelaySession:
    """Pairing and lifetime rules of one session; all times are caller-supplied seconds.

    Lifetime (as the official ``SocketConnector``): ``unpaired_timeout`` after creation
    the session closes unless a pair is active; after that grace period it closes as
    soon as its last pair ends. Before the grace ends, pairs may come and go.
    """

    __slots__ = (
        "session_id",
        "policy",
        "created_at",
        "grace_over",
        "closed",
        "close_reason",
        "pairs_total",
        "_authing",
        "_pending_a",
        "_pending_b",
        "_peer",
    )

    def __init__(self, session_id: str, policy: SessionPolicy, now: float) -> None:
        self.session_id = session_id
        self.policy = policy
        self.created_at = now
        self.grace_over = False
        self.closed = False
        self.close_reason = ""
        self.pairs_total = 0
        # conn id -> (side, auth deadline); insertion order == deadline order
        self._authing: dict[int, tuple[Side, float]] = {}
        self._pending_a: list[int] = []
        self._pending_b: list[int] = []
        self._peer: dict[int, int] = {}  # both directions of every active pair

    # ------------------------------------------------------------------ queries
    @property
    def active_pairs(self) -> int:
        return len(self._peer) // 2

    def pending(self, side: Side) -> list[int]:
        """Authenticated, unpaired connections of ``side`` in FIFO order (a copy)."""
        return list(self._pending_a if side is Side.A else self._pending_b)

    def authenticating(self) -> list[int]:
        return list(self._authing)

    def peer_of(self, conn: int) -> int | None:
        return self._peer.get(conn)

    def next_deadline(self) -> float | None:
        """Earliest time at which :meth:`tick` has something to do."""
        if self.closed:
            return None
        deadlines = []
        if not self.grace_over:
            deadlines.append(self.created_at + self.policy.unpaired_timeout)
        for _side, deadline in self._authing.values():
            deadlines.append(deadline)
            break  # dict is in deadline order
        return min(deadlines) if deadlines else None

    # ------------------------------------------------------------------- events
    def accept(self, side: Side, conn: int, now: float, *, needs_auth: bool = True) -> list[Action]:
        """A socket connected to ``side``'s port."""
        if self.closed:
            return [Drop(conn, "session closed")]
        queue = self._pending_a if side is Side.A else self._pending_b
        if not needs_auth:
            if len(queue) >= self.policy.max_pending_per_side:
                return [Drop(conn, f"too many pending connections on side {side.value} "
                                   f"(max {self.policy.max_pending_per_side})")]
            queue.append(conn)
            return self._try_pair()
        actions: list[Action] = []
        mine = [c for c, (s, _d) in self._authing.items() if s is side]  # oldest first
        for old in mine[:max(0, len(mine) - self.policy.max_unauth_per_side + 1)]:
            del self._authing[old]
            actions.append(Drop(old, f"evicted: oldest of more than "
                                     f"{self.policy.max_unauth_per_side} unauthenticated "
                                     f"connections on side {side.value}"))
        self._authing[conn] = (side, now + self.policy.auth_timeout)
        return actions

    def auth_result(self, conn: int, ok: bool, now: float, reason: str = "") -> list[Action]:
        """The authenticator ruled on ``conn``'s first line (or reading it failed)."""
        entry = self._authing.pop(conn, None)
        if entry is None:
            return []
        side, _deadline = entry
        if not ok:
            return [Drop(conn, reason or f"side {side.value} failed authentication")]
        queue = self._pending_a if side is Side.A else self._pending_b
        if len(queue) >= self.policy.max_pending_per_side:
            return [Drop(conn, f"too many authenticated connections waiting on side "
                               f"{side.value} (max {self.policy.max_pending_per_side})")]
        queue.append(conn)
        return self._try_pair()

    def conn_closed(self, conn: int, now: float) -> list[Action]:
        """``conn`` went away (EOF/error/closed by us). Its peer, if any, goes too."""
        actions: list[Action] = []
        if self._authing.pop(conn, None) is not None:
            return actions
        for queue in (self._pending_a, self._pending_b):
            if conn in queue:
                queue.remove(conn)
                return actions
        peer = self._peer.pop(conn, None)
        if peer is None:
            return actions
        self._peer.pop(peer, None)
        actions.append(Drop(peer, "peer closed"))
        if self.grace_over and not self._peer and not self.closed:
            actions.extend(self._close("last connection closed"))
        return actions

    def tick(self, now: float) -> list[Action]:
        """Fire every deadline that is due at ``now``."""
        actions: list[Action] = []
        if self.closed:
            return actions
        expired = [c for c, (_s, d) in self._authing.items() if d <= now]
        for conn in expired:
            side, _d = self._authing.pop(conn)
            actions.append(Drop(conn, f"side {side.value} did not authenticate within "
                                      f"{self.policy.auth_timeout:g}s"))
        if not self.grace_over and now >= self.created_at + self.policy.unpaired_timeout:
            self.grace_over = True
            if not self._peer:
                why = "never paired" if self.pairs_total == 0 else "no active connection"
                actions.extend(self._close(f"{why} within {self.policy.unpaired_timeout:g}s"))
        return actions

    def close(self, reason: str) -> list[Action]:
        """Close from outside (shutdown, operator)."""
        return [] if self.closed else self._close(reason)

    # ----------------------------------------------------------------- internals
    def _try_pair(self) -> list[Action]:
        actions: list[Action] = []
        while self._pending_a and self._pending_b:
            if self.active_pairs >= self.policy.max_pairs:
                # Over the cap: refuse the newest arrivals rather than break FIFO order.
                while self._pending_a and self._pending_b:
                    actions.append(Drop(self._pending_a.pop(), "too many active pairs"))
                    actions.append(Drop(self._pending_b.pop(), "too many active pairs"))
                break
            a = self._pending_a.pop(0)
            b = self._pending_b.pop(0)
            self._peer[a] = b
            self._peer[b] = a
            self.pairs_total += 1
            actions.append(Pair(a, b))
        return actions

    def _close(self, reason: str) -> list[Action]:
        self.closed = True
        self.close_reason = reason
        actions: list[Action] = [Drop(c, "session closed") for c in self._authing]
        actions += [Drop(c, "session closed") for c in self._pending_a + self._pending_b]
        actions += [Drop(c, "session closed") for c in self._peer]
        self._authing.clear()
        self._pending_a.clear()
        self._pending_b.clear()
        self._peer.clear()
        actions.append(CloseSession(reason))
        return actions
