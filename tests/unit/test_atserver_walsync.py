"""walsync.WalSync: an acknowledged notification is on disk, and the loop never waits for it."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from noports.atserver import walsync
from noports.atserver.store import NotificationRow, Store


def test_each_caller_waits_for_an_fsync_that_started_after_its_write(tmp_path, monkeypatch):
    starts: list[int] = []
    written = [0]
    gate = threading.Event()

    def slow_fsync(path):
        starts.append(written[0])  # how many writes existed when this fsync began
        gate.wait(5)

    monkeypatch.setattr(walsync, "fsync_path", slow_fsync)

    async def main() -> None:
        sync = walsync.WalSync(tmp_path / "db-wal")

        async def writer(k: int) -> int:
            written[0] += 1
            await sync()
            return written[0]

        first = asyncio.ensure_future(writer(0))
        await asyncio.sleep(0.05)  # its fsync is running (and stuck)
        later = [asyncio.ensure_future(writer(k)) for k in range(1, 20)]
        ticks = 0
        while len(starts) < 1:
            await asyncio.sleep(0.01)
        for _ in range(10):  # the loop keeps running while the fsync blocks its thread
            await asyncio.sleep(0.005)
            ticks += 1
        assert ticks == 10 and not first.done() and not any(t.done() for t in later)
        gate.set()
        await asyncio.wait_for(asyncio.gather(first, *later), 10)
        # 20 writers, 2 fsyncs: the first (1 write) and one covering the 19 that came later
        assert starts == [1, 20]

    asyncio.run(main())


def test_a_failed_fsync_is_the_callers_error_and_the_next_one_syncs(tmp_path, monkeypatch):
    calls = []

    def flaky(path):
        calls.append(path)
        if len(calls) == 1:
            raise OSError(5, "Input/output error")

    monkeypatch.setattr(walsync, "fsync_path", flaky)

    async def main() -> None:
        sync = walsync.WalSync(tmp_path / "db-wal")
        with pytest.raises(OSError):
            await sync()
        await sync()
        assert len(calls) == 2

    asyncio.run(main())


def test_a_real_wal_is_synced_and_the_row_reads_back_after_reopen(tmp_path):
    store = Store(tmp_path / "atserver.db")
    row = NotificationRow("@a", "n1", "received", "@b", "@a", "@a:k@b", "delivered", 0, 0,
                          1, None, {"id": "n1", "key": "@a:k@b"})
    store.put_notification(row, durable=False)
    assert store.wal_path.exists()
    t0 = time.monotonic()
    asyncio.run(walsync.WalSync(store.wal_path)())
    assert time.monotonic() - t0 < 10
    store.close()
    assert Store(tmp_path / "atserver.db").get_notification("@a", "n1") is not None
    walsync.fsync_path(tmp_path / "absent-wal")  # no WAL (checkpointed away): nothing to do
