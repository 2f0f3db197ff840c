"""Session ids sshnpd has acted on, kept on disk until their requests could no longer pass the
freshness check - so a replayed ``ssh_request`` is refused even after a restart or kill -9.

Why this shape: an append-only file of one short line per accepted request, written
(``O_APPEND``, ``flock``, ``fsync``) *before* the daemon acts on the request. A crash can only
leave a torn last line, which loading skips; a recorded id is never lost once :meth:`add`
returned. Expired lines are dropped by a compaction (rewrite to a temporary file, fsync,
rename, fsync the directory) when dead lines outnumber live ones, so the file stays bounded by
what the freshness window lets in. Each append opens the file anew under the lock, so a
compaction by another process sharing the path (a misconfiguration, but possible) loses nothing.

Line format: ``v1 <expiry, integer unix seconds> <session id>``.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)

FILE_NAME = "seen_requests"
MAX_ENTRIES = 10_000  # live ids; a window of 60 s makes this ~80 requests a second
_LINE_RE = re.compile(r"v1 (\d{1,12}) ([0-9a-f-]{1,64})")


class SeenStoreError(OSError):
    """The store cannot be read or written; the daemon refuses requests rather than risk a
    replay."""


class SeenRequests:
    """Remember session ids until an expiry time; ``path=None`` keeps them in memory only."""

    def __init__(self, path: Path | None = None, *, max_entries: int = MAX_ENTRIES,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.max_entries = max_entries
        self._clock = clock
        self._seen: dict[str, int] = {}
        self._lines = 0  # lines in the file, dead ones included
        self._adds = 0
        self._lock = threading.Lock()  # add() is check-then-record: one caller at a time

    def __len__(self) -> int:
        return len(self._seen)

    def __contains__(self, sid: object) -> bool:
        exp = self._seen.get(sid) if isinstance(sid, str) else None
        return exp is not None and exp >= self._clock()

    @classmethod
    def open(cls, directory: Path, **kw: object) -> SeenRequests:
        """Create ``directory`` (0700) if needed and load its store file."""
        try:
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise SeenStoreError(f"cannot create the storage directory {directory}: "
                                 f"{exc.strerror or exc}") from None
        store = cls(directory / FILE_NAME, **kw)  # type: ignore[arg-type]
        store.load()
        return store

    def load(self) -> int:
        """Read the file (torn or foreign lines are skipped); returns the live ids loaded."""
        if self.path is None:
            return 0
        now = self._clock()
        try:
            with self._locked(os.O_RDWR | os.O_CREAT) as fd:
                data = _read_all(fd)
                if data and not data.endswith(b"\n"):  # torn by a crash: end that line so
                    os.lseek(fd, 0, os.SEEK_END)      # the next append starts a fresh one
                    os.write(fd, b"\n")
                    os.fsync(fd)
        except OSError as exc:
            raise SeenStoreError(f"cannot read {self.path}: {exc.strerror or exc}") from None
        self._lines = 0
        for raw in data.split(b"\n"):
            self._lines += 1
            m = _LINE_RE.fullmatch(raw.decode("ascii", "replace"))
            if m is None:
                continue
            exp = int(m[1])
            if exp >= now and exp > self._seen.get(m[2], -1):
                self._seen[m[2]] = exp
        return len(self._seen)

    def add(self, sid: str, expires: float) -> bool:
        """Record ``sid`` until ``expires``; False if it is already recorded (a replay).

        Raises :class:`SeenStoreError` when the id cannot be made durable or the store is
        full: the caller must then refuse the request. Thread-safe.
        """
        with self._lock:
            return self._add(sid, expires)

    def _add(self, sid: str, expires: float) -> bool:
        now = self._clock()
        if sid in self:
            return False
        if not _LINE_RE.fullmatch(f"v1 0 {sid}"):
            raise SeenStoreError(f"session id {sid!r} cannot be stored")
        if len(self._seen) >= self.max_entries:
            self._prune(now)
            if len(self._seen) >= self.max_entries:
                raise SeenStoreError(f"{len(self._seen)} requests within the freshness "
                                     "window: the replay memory is full")
        exp = int(expires) + 1  # whole seconds, rounded up: never expires early
        if self.path is not None:
            self._append(f"v1 {exp} {sid}\n".encode("ascii"))
        self._seen[sid] = exp
        self._adds += 1
        if self._adds % 64 == 0:  # forget expired ids now and then: memory follows the window
            self._prune(now)
        if self.path is not None and self._lines > 2 * len(self._seen) + 64:
            try:
                self.compact()
            except OSError as exc:  # the id is durable already; compaction can wait
                log.warning("cannot compact %s: %s", self.path, exc)
        return True

    def _prune(self, now: float) -> None:
        for k in [k for k, e in self._seen.items() if e < now]:
            del self._seen[k]

    def _append(self, line: bytes) -> None:
        try:
            with self._locked(os.O_WRONLY | os.O_APPEND | os.O_CREAT) as fd:
                os.write(fd, line)  # < PIPE_BUF and O_APPEND: one write, never interleaved
                os.fsync(fd)
        except OSError as exc:
            raise SeenStoreError(f"cannot record the request in {self.path}: "
                                 f"{exc.strerror or exc}") from None
        self._lines += 1

    def compact(self) -> None:
        """Rewrite the file with only live ids (ours and any another process appended)."""
        assert self.path is not None
        now = self._clock()
        tmp = self.path.with_name(self.path.name + ".tmp")
        with self._locked(os.O_RDONLY | os.O_CREAT) as fd:
            merged = dict(self._seen)
            for raw in _read_all(fd).split(b"\n"):
                m = _LINE_RE.fullmatch(raw.decode("ascii", "replace"))
                if m is not None:
                    merged[m[2]] = max(int(m[1]), merged.get(m[2], 0))
            live = {k: e for k, e in merged.items() if e >= now}
            body = "".join(f"v1 {e} {k}\n" for k, e in live.items()).encode("ascii")
            tfd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(tfd, body)
                os.fsync(tfd)
            finally:
                os.close(tfd)
            os.replace(tmp, self.path)  # under the old file's lock: appenders wait for it
            _fsync_dir(self.path.parent)
        self._seen = {k: e for k, e in live.items() if k in self._seen}
        self._lines = len(live) + 1

    @contextlib.contextmanager
    def _locked(self, flags: int) -> Iterator[int]:
        """Open the store file and hold an exclusive flock; retried if it was replaced."""
        assert self.path is not None
        while True:
            fd = os.open(self.path, flags, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                # a compaction may have renamed a new file over the one we opened
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    break
            except FileNotFoundError:
                pass
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        try:
            yield fd
        finally:
            os.close(fd)


def _read_all(fd: int) -> bytes:
    chunks = []
    os.lseek(fd, 0, os.SEEK_SET)
    while True:
        b = os.read(fd, 1 << 16)
        if not b:
            return b"".join(chunks)
        chunks.append(b)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = ["FILE_NAME", "SeenRequests", "SeenStoreError"]
