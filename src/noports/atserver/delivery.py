"""Outbound notification delivery (sender side, docs/reference/atprotocol.md#notification-delivery).

Why driven from the database: the queue *is* the `notifications` table (kind 'sent', status
queued/errored, next_attempt). Anything acknowledged to a client is already there, so after a
restart or `kill -9` the worker simply picks the rows up again. One task per (sender,
recipient) delivers in order over a pol-authenticated connection; failures back off
exponentially up to `retry_max_ms` and give up after `max_retries`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from noports import trace
from noports.atprotocol import notifications as N

from .host import ServerConfig
from .s2s import Outbound, RemoteError
from .store import NotificationRow, Store

log = logging.getLogger("noports.atserver.delivery")

NOTIFY_TIMEOUT = 10.0


class Deliverer:
    """Polls the sent-notification queue and pushes due rows to the recipients' servers."""

    def __init__(self, store: Store, outbound: Outbound, config: ServerConfig,
                 clock: Callable[[], int], hosted: Callable[[], set[str]],
                 tick_s: float = 0.5) -> None:
        self.store = store
        self.outbound = outbound
        self.config = config
        self.clock = clock
        self.hosted = hosted
        self.tick_s = tick_s
        self._wake = asyncio.Event()
        self._workers: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._stopping = False
        # (sender, recipient) pairs with rows waiting (queued, errored, backing off) as of
        # the last look at the queue; None until the first look (after a restart, old rows
        # may wait). Only a pair outside it may send early: order per pair is kept.
        self._waiting: set[tuple[str, str]] | None = None

    def nudge(self) -> None:
        self._wake.set()

    def send_early(self, row: NotificationRow) -> bool:
        """Start delivering ``row`` (not committed yet: the caller commits it right after
        one loop turn) on an idle pooled connection; False: the queue will deliver it.

        Only when nothing else is queued or in flight for the pair, so the order per
        (sender, recipient) holds; the row is taken from memory, not from the store.
        """
        k = (row.atsign, row.to_atsign)
        if self._stopping or self._waiting is None or k in self._waiting:
            return False
        t = self._workers.get(k)
        if t is not None and not t.done():
            return False
        if not self.outbound.idle(row.atsign, row.to_atsign, handshake=True):
            return False
        self._waiting.add(k)  # until the next look at the queue
        self._workers[k] = asyncio.create_task(self._deliver(k[0], k[1], [row], early=True),
                                               name=f"deliver {k[0]}->{k[1]} (early)")
        return True

    async def run(self) -> None:
        while not self._stopping:
            try:
                self._dispatch()
            except Exception:  # the loop must survive anything (e.g. a locked DB)
                log.exception("delivery dispatch failed")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.tick_s)
            self._wake.clear()

    def _dispatch(self) -> None:
        now = self.clock()
        hosted = self.hosted()
        due: dict[tuple[str, str], list[NotificationRow]] = {}
        pending = self.store.pending_sent()
        self._waiting = {(row.atsign, row.to_atsign) for row in pending}
        for row in pending:
            if row.atsign not in hosted or row.next_attempt > now:
                continue
            if row.expires_at is not None and row.expires_at < now:
                self.store.set_notification_status(row.atsign, row.id, "expired")
                continue
            if row.retry_count >= self.config.max_retries:
                continue
            due.setdefault((row.atsign, row.to_atsign), []).append(row)
        for k, rows in due.items():
            t = self._workers.get(k)
            if t is None or t.done():
                self._workers[k] = asyncio.create_task(self._deliver(k[0], k[1], rows),
                                                       name=f"deliver {k[0]}->{k[1]}")

    async def _deliver(self, me: str, to: str, rows: list[NotificationRow], *,
                       early: bool = False) -> None:
        try:
            await self._deliver_rows(me, to, rows, early=early)
        finally:
            # Rows queued for this recipient while we were busy were skipped by _dispatch
            # (one worker per pair keeps order); look again now instead of at the next tick.
            # A shared-key update followed by its first notify is exactly that case.
            if not self._stopping:
                self.nudge()

    async def _deliver_rows(self, me: str, to: str, rows: list[NotificationRow], *,
                            early: bool = False) -> None:
        for i, row in enumerate(rows):
            # early: the row is being committed while this runs; it is the one in hand
            current = row if early else self.store.get_notification(me, row.id)
            if current is None or current.status not in ("queued", "errored"):
                continue
            try:
                cmd = N.s2s_notify_command(N.from_storage(current.data))
                trace.mark("atserver.s2s_out", f"{me} {current.key}")
                r = await self.outbound.request(me, to, cmd, handshake=True,
                                                timeout=NOTIFY_TIMEOUT)
                trace.mark("atserver.s2s_ack", f"{me} {current.key}")
                ok = r.ok and (r.data or "").strip() == "success"
                why = "" if ok else f"{r.code} {r.message[:120]}"
            except RemoteError as err:
                ok, why = False, f"{err.code} {err.message[:160]}"
            except Exception as exc:  # noqa: BLE001 - keep the worker alive
                log.exception("delivering a notification %s -> %s", me, to)
                ok, why = False, type(exc).__name__
            if ok:
                # not fsynced: if this mark is lost (power cut), the row is delivered again
                # and the recipient drops the exact duplicate (verbs_notify._is_redelivery)
                self.store.set_notification_status(me, row.id, "delivered", durable=False)
                log.info("notification %s %s -> %s delivered", row.id, me, to)
                continue
            # failure: back off this one and everything after it (keeps order per recipient)
            retries = current.retry_count + 1
            delay = min(self.config.retry_base_ms * (2 ** min(retries - 1, 16)),
                        self.config.retry_max_ms)
            log.info("notification %s %s -> %s failed (%s), retry %d in %d ms",
                     row.id, me, to, why, retries, delay)
            if self._waiting is not None:
                self._waiting.add((me, to))  # no early send overtakes it
            self.store.set_notification_status(me, row.id, "errored", retry_count=retries,
                                               next_attempt=self.clock() + delay)
            for later in rows[i + 1:]:
                self.store.set_notification_status(me, later.id, later.status,
                                                   next_attempt=self.clock() + delay)
            self.outbound.drop(me, to)
            return

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        for t in self._workers.values():
            t.cancel()
        for t in self._workers.values():
            with contextlib.suppress(BaseException):
                await t
