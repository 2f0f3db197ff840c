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
