"""The agent's RSA session key: one pair reused for a bounded time, in memory only.

Why: the protocol has the client send an RSA-2048 public key with each aes session request
(docs/reference/noports-protocol.md#session-step-by-step, step 2); making one costs ~0.1 s of
CPU, twice the whole budget per tunnel. Our daemons now ignore it and seal the session key to
the session's own X25519 key (npproto/kex.py), so for them the RSA pair is never used; only an
official daemon encrypts to it. The agent therefore reuses one pair for at most
``REUSE_S`` seconds and ``REUSE_SESSIONS`` sessions, then makes a fresh one (in a thread,
started before the old one runs out). The trade-off, for official daemons only: whoever later
obtains that private key (from the agent's memory while it is in use) can read the recorded
sessions of its lifetime, not only the live ones (decision 0029, docs/security.md).

``take()`` hands the flow a ``concurrent.futures.Future`` of ``(base64 SPKI, key object)``,
as ``flow._take_prestarted`` expects.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Callable
from typing import Any

REUSE_S = 300.0
REUSE_SESSIONS = 256
RENEW_AT = 0.8  # start the next pair at this share of either limit


class KeyPool:
    """The current pair (a future), its age and use count, and the next one being made."""

    def __init__(self, make: Callable[[], tuple[str, Any]], *, reuse_s: float = REUSE_S,
                 reuse_sessions: int = REUSE_SESSIONS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.make = make
        self.reuse_s = reuse_s
        self.reuse_sessions = reuse_sessions
        self.clock = clock
        self.lock = threading.Lock()
        self.current: concurrent.futures.Future[tuple[str, Any]] | None = None
        self.born = 0.0
        self.uses = 0
        self.next: concurrent.futures.Future[tuple[str, Any]] | None = None
        self.made = 0  # pairs started so far (stats)

    def _start(self) -> concurrent.futures.Future[tuple[str, Any]]:
        fut: concurrent.futures.Future[tuple[str, Any]] = concurrent.futures.Future()

        def work() -> None:
            try:
                fut.set_result(self.make())
            except BaseException as exc:  # noqa: BLE001 - handed to the flow
                fut.set_exception(exc)

        self.made += 1
        threading.Thread(target=work, name="sshnp-session-key", daemon=True).start()
        return fut

    def _expired(self, now: float, share: float = 1.0) -> bool:
        return (now - self.born >= self.reuse_s * share
                or self.uses >= self.reuse_sessions * share)

    def take(self) -> concurrent.futures.Future[tuple[str, Any]]:
        """The pair for one session (maybe still being made)."""
        with self.lock:
            now = self.clock()
            failed = (self.current is not None and self.current.done()
                      and self.current.exception() is not None)
            if self.current is None or failed or self._expired(now):
                self.current = self.next if self.next is not None else self._start()
                self.next = None
                self.born, self.uses = now, 0
            self.uses += 1
            if self.next is None and self._expired(now, RENEW_AT):
                self.next = self._start()
            return self.current

    def warm(self) -> None:
        """Start the first pair before any session asks for it."""
        with self.lock:
            if self.current is None:
                self.current, self.born, self.uses = self._start(), self.clock(), 0

    def drop_expired(self) -> None:
        """Forget a pair past its lifetime now, not at the next session (idle agent)."""
        with self.lock:
            if self.current is not None and self._expired(self.clock()):
                self.current = None

    def stats(self) -> dict[str, int]:
        return {"rsa_pairs_made": self.made, "rsa_pair_uses": self.uses}


__all__ = ["REUSE_S", "REUSE_SESSIONS", "KeyPool"]
