"""Delivery scheduling: order per recipient, and no tick-long wait behind a busy worker."""

from __future__ import annotations

import asyncio

from noports.atprotocol import notifications as N
from noports.atserver.delivery import Deliverer
from noports.atserver.host import ServerConfig
from noports.atserver.store import NotificationRow, Store
from noports.atserver.wire import RemoteReply


class RecordingRemote:
    """Stands in for the recipient's atServer; the first request waits until released."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.first_started = asyncio.Event()
        self.release_first = asyncio.Event()

    async def request(self, me: str, other: str, line: str, *, handshake: bool,
                      timeout: float = 10.0) -> RemoteReply:
        self.lines.append(line)
        if len(self.lines) == 1:
            self.first_started.set()
            await self.release_first.wait()
        return RemoteReply(data="success")

    def drop(self, me: str, other: str) -> None:
        pass


def _queue(store: Store, nid: str, epoch: int) -> None:
    n = N.Notification(id=nid, from_atsign="@a", to_atsign="@b", key=f"@b:{nid}@a",
                       value="v", epoch_millis=epoch)
    store.put_notification(NotificationRow("@a", nid, "sent", "@a", "@b", n.key, "queued", 0, 0,
                                           epoch, None, N.to_storage(n)))


def test_row_queued_while_worker_busy_is_sent_without_waiting_for_the_tick(tmp_path) -> None:
    async def main() -> None:
        store = Store(tmp_path / "db.sqlite")
        remote = RecordingRemote()
        # A tick of an hour: only the end-of-worker nudge can deliver the second row in time.
        d = Deliverer(store, remote, ServerConfig(), lambda: 10, lambda: {"@a"},  # type: ignore[arg-type]
                      tick_s=3600)
        _queue(store, "n1", 1)
        runner = asyncio.create_task(d.run())
        await asyncio.wait_for(remote.first_started.wait(), 5)
        _queue(store, "n2", 2)  # e.g. the notify that follows a shared-key update
        d.nudge()
        await asyncio.sleep(0.05)  # dispatch sees n2 but the pair's worker is busy
        remote.release_first.set()
        for _ in range(200):
            if store.get_notification("@a", "n2").status == "delivered":  # type: ignore[union-attr]
                break
            await asyncio.sleep(0.01)
        await d.stop()
        runner.cancel()
        assert [store.get_notification("@a", i).status for i in ("n1", "n2")] == [  # type: ignore[union-attr]
            "delivered", "delivered"]
        assert "n1" in remote.lines[0] and "n2" in remote.lines[1]

    asyncio.run(main())


# --- early send: the first write goes out before the commit ------------------------------------

class GatedRemote:
    """A recipient per atSign: answers ``success`` (or ``errors`` it) once its gate opens."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []
        self.gates: dict[str, asyncio.Event] = {}
        self.errors: set[str] = set()
        self.busy: set[str] = set()

    def gate(self, other: str) -> asyncio.Event:
        return self.gates.setdefault(other, asyncio.Event())

    def idle(self, me: str, other: str, *, handshake: bool) -> bool:
        return other not in self.busy

    async def request(self, me: str, other: str, line: str, *, handshake: bool,
                      timeout: float = 10.0) -> RemoteReply:
        self.lines.append((other, line))
        self.busy.add(other)
        try:
            await self.gate(other).wait()
        finally:
            self.busy.discard(other)
        if other in self.errors:
            return RemoteReply(code="AT0008", message="refused")
        return RemoteReply(data="success")

    def drop(self, me: str, other: str) -> None:
        pass


def _row(nid: str, epoch: int, to: str = "@b") -> NotificationRow:
    n = N.Notification(id=nid, from_atsign="@a", to_atsign=to, key=f"{to}:{nid}@a",
                       value="v", epoch_millis=epoch)
    return NotificationRow("@a", nid, "sent", "@a", to, n.key, "queued", 0, 0, epoch, None,
                           N.to_storage(n))


async def _until(pred, what: str) -> None:
    for _ in range(500):
        if pred():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(what)


def test_early_send_goes_out_before_the_commit_and_keeps_order(tmp_path) -> None:
    async def main() -> None:
        store = Store(tmp_path / "db.sqlite")
        remote = GatedRemote()
        d = Deliverer(store, remote, ServerConfig(), lambda: 10, lambda: {"@a"},  # type: ignore[arg-type]
                      tick_s=3600)
        assert not d.send_early(_row("n0", 1))  # the queue was never looked at (restart)
        runner = asyncio.create_task(d.run())
        await asyncio.sleep(0.01)
        r1 = _row("n1", 1)
        assert d.send_early(r1)
        await asyncio.sleep(0)
        # on the wire while the row is not stored yet (the caller commits it now)
        assert [x[1] for x in remote.lines if "n1" in x[1]] and store.get_notification(
            "@a", "n1") is None
        store.put_notification(r1)
        d.nudge()
        r2 = _row("n2", 2)  # n1 still in flight: n2 must wait its turn, not go early
        assert not d.send_early(r2)
        store.put_notification(r2)
        d.nudge()
        await asyncio.sleep(0.05)
        assert [x for x in remote.lines if "n2" in x[1]] == []
        remote.gate("@b").set()
        await _until(lambda: store.get_notification("@a", "n2").status == "delivered",  # type: ignore[union-attr]
                     "n2 delivered")
        assert store.get_notification("@a", "n1").status == "delivered"  # type: ignore[union-attr]
        assert ["n1" in x[1] for x in remote.lines] == [True, False]
        await d.stop()
        runner.cancel()

    asyncio.run(main())


def test_early_send_never_overtakes_a_failed_row_and_a_stuck_recipient_stalls_nobody(
        tmp_path) -> None:
    async def main() -> None:
        store = Store(tmp_path / "db.sqlite")
        remote = GatedRemote()
        cfg = ServerConfig()
        d = Deliverer(store, remote, cfg, lambda: 10, lambda: {"@a"},  # type: ignore[arg-type]
                      tick_s=3600)
        runner = asyncio.create_task(d.run())
        await asyncio.sleep(0.01)
        remote.errors.add("@b")
        remote.gate("@b").set()
        r1 = _row("n1", 1)
        assert d.send_early(r1)
        store.put_notification(r1)
        await _until(lambda: store.get_notification("@a", "n1").status == "errored",  # type: ignore[union-attr]
                     "n1 errored")
        # n1 waits for its retry: a new row for @b must queue behind it, not jump ahead
        assert not d.send_early(_row("n2", 2))
        # a recipient that never answers holds its own pair only
        remote.gate("@c")  # closed
        assert d.send_early(_row("c1", 3, to="@c"))
        await asyncio.sleep(0)
        assert d.send_early(_row("d1", 4, to="@d"))
        await asyncio.sleep(0)
        assert [o for o, line in remote.lines] == ["@b", "@c", "@d"]
        await d.stop()
        runner.cancel()

    asyncio.run(main())


def test_delivered_mark_without_fsync_keeps_the_store_durable(tmp_path) -> None:
    store = Store(tmp_path / "db.sqlite")
    store.put_notification(_row("n1", 1))
    store.set_notification_status("@a", "n1", "delivered", durable=False)
    assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL again
    store.close()
    again = Store(tmp_path / "db.sqlite")
    assert again.get_notification("@a", "n1").status == "delivered"  # type: ignore[union-attr]
