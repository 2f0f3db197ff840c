"""Durable notification writes without stopping the event loop for the fsync.

Why: the store commits with ``synchronous=FULL``, so every commit fsyncs its WAL on the
event loop thread: milliseconds on an idle disk, tens on a busy one, during which one
atServer process serves nobody (a rendezvous crosses four notifications, each stored
twice). For the notification rows on that path the verbs commit with ``synchronous=NORMAL``
(written to the WAL, not fsynced) and then ``await WalSync()``, which fsyncs the WAL file in
a worker thread before the client or the sending server is answered. An acknowledgement
therefore still means "on disk" (SQLite replays a WAL's committed frames after a crash or
power cut; NORMAL still syncs the WAL header and checkpoints itself), and meanwhile the
loop serves everyone else. Concurrent waiters share fsyncs: one runs at a time, and a
caller waits for the first fsync that *started* after its own write.
"""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

_POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="atserver-fsync")


def fsync_path(path: Path) -> None:
    """fsync ``path`` (opened afresh: SQLite may have re-created it); absent: nothing."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return  # no WAL: the last checkpoint synced the database itself
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class WalSync:
    """``await sync()`` returns once every write made before the call is on disk."""

    def __init__(self, wal: Path) -> None:
        self.wal = wal
        self._written = 0  # bumped by every caller (one per write it wants durable)
        self._synced = 0  # every write numbered <= this is on disk
        self._running: asyncio.Future[None] | None = None

    async def __call__(self) -> None:
        self._written += 1
        mine = self._written
        while self._synced < mine:
            if self._running is None:
                covers = self._written
                loop = asyncio.get_running_loop()
                self._running = loop.run_in_executor(_POOL, fsync_path, self.wal)
                try:
                    await asyncio.shield(self._running)
                    self._synced = max(self._synced, covers)
                finally:
                    self._running = None
            else:
                # one in flight may have started before our write: wait, then look again
                await asyncio.wait({self._running})
