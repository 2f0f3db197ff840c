"""Durable state of one atserver process: a single SQLite file (`<state_dir>/atserver.db`).

Why SQLite in WAL mode with synchronous=FULL: every acknowledged write (key update, commit id,
queued notification) must survive `kill -9` and power loss, and the admin API (another process)
must be able to add atSigns while the server runs. Each public method is one transaction that is
committed before it returns, so the caller can reply to the client only after the data is on
disk.

Tables (all partitioned by the hosted atSign, always stored as `@name`, lower-case):
* hosted(atsign, port, created, listening, pid) — which atSigns this process serves, on which port.
* keystore(atsign, key, value, meta, expires_at, available_at) — key lower-cased; meta is JSON.
* commits(atsign, commit_id, key, op, ts) — monotonic commit ids per atSign.
* notifications(atsign, id, kind, ...) — sent / received / self, with status, retries, expiry.
* enrollments(atsign, id, ...) — APKAM enrollments (device keys) and their approval state; kept
  out of the keystore so no key verb (update/delete) can approve or un-revoke one.
* otps(atsign, digest, expires_at) — one-time enrollment codes, stored as SHA-256 only.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DB_NAME = "atserver.db"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS hosted (
    atsign TEXT PRIMARY KEY,
    port INTEGER NOT NULL DEFAULT 0,
    created INTEGER NOT NULL,
    listening INTEGER NOT NULL DEFAULT 0,
    pid INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS keystore (
    atsign TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT,
    meta TEXT NOT NULL DEFAULT '{}',
    expires_at INTEGER,
    available_at INTEGER,
    PRIMARY KEY (atsign, key)
);
CREATE INDEX IF NOT EXISTS keystore_expiry ON keystore(expires_at) WHERE expires_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS commits (
    atsign TEXT NOT NULL,
    commit_id INTEGER NOT NULL,
    key TEXT NOT NULL,
    op TEXT NOT NULL,
    ts INTEGER NOT NULL,
    PRIMARY KEY (atsign, commit_id)
);
CREATE TABLE IF NOT EXISTS notifications (
    atsign TEXT NOT NULL,
    id TEXT NOT NULL,
    kind TEXT NOT NULL,
    from_atsign TEXT NOT NULL,
    to_atsign TEXT NOT NULL,
    key TEXT NOT NULL,
    status TEXT NOT NULL,
    retry_count INTEGER NOT NULL DEFAULT 0,
    next_attempt INTEGER NOT NULL DEFAULT 0,
    epoch_ms INTEGER NOT NULL,
    expires_at INTEGER,
    data TEXT NOT NULL,
    PRIMARY KEY (atsign, id)
);
CREATE INDEX IF NOT EXISTS notif_epoch ON notifications(atsign, kind, epoch_ms);
CREATE INDEX IF NOT EXISTS notif_queue ON notifications(kind, status, next_attempt);
CREATE TABLE IF NOT EXISTS enrollments (
    atsign TEXT NOT NULL,
    id TEXT NOT NULL,
    state TEXT NOT NULL,
    created INTEGER NOT NULL,
    updated INTEGER NOT NULL,
    expires_at INTEGER,
    data TEXT NOT NULL,
    PRIMARY KEY (atsign, id)
);
CREATE TABLE IF NOT EXISTS otps (
    atsign TEXT NOT NULL,
    digest TEXT NOT NULL,
    expires_at INTEGER NOT NULL,
    data TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (atsign, digest)
);
"""


def db_path(state_dir: str | os.PathLike[str]) -> Path:
    return Path(state_dir) / DB_NAME


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class KeyRecord:
    """One keystore row; `meta` is the storage dict of the key's metadata."""

    key: str
    value: str | None
    meta: dict[str, Any]
    expires_at: int | None = None
    available_at: int | None = None


@dataclass(frozen=True)
class NotificationRow:
    """One stored notification; `data` is the notification's storage dict."""

    atsign: str
    id: str
    kind: str  # sent | received | self
    from_atsign: str
    to_atsign: str
    key: str
    status: str
    retry_count: int
    next_attempt: int
    epoch_ms: int
    expires_at: int | None
    data: dict[str, Any]


@dataclass(frozen=True)
class HostedRow:
    atsign: str
    port: int
    listening: bool
    pid: int
    created: int = 0  # generation: a removed and re-added atSign gets a new one


class Store:
    """All persistent state, one connection, one transaction per call."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists()
        self._db = sqlite3.connect(str(self.path), isolation_level=None, timeout=10.0,
                                   check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=10000")
        # Deleted or overwritten rows (the CRAM secret after activation, purged private keys)
        # are zeroed on disk instead of lingering in free pages.
        self._db.execute("PRAGMA secure_delete=ON")
        self._db.executescript(_SCHEMA)
        if new:
            os.chmod(self.path, 0o600)

    @classmethod
    def open_state_dir(cls, state_dir: str | os.PathLike[str]) -> Store:
        Path(state_dir).mkdir(parents=True, exist_ok=True)
        return cls(db_path(state_dir))

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _tx(self, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """A write transaction, committed (and fsynced, synchronous=FULL) on exit.

        ``durable=False``: committed without the fsync (synchronous=NORMAL in WAL mode):
        it survives ``kill -9`` but maybe not a power cut, until the next durable commit
        fsyncs the log it is in. Only for marks whose loss is harmless.
        """
        if not durable:
            self._db.execute("PRAGMA synchronous=NORMAL")
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        finally:
            if not durable:
                self._db.execute("PRAGMA synchronous=FULL")

    # --- hosted atSigns -------------------------------------------------------------------

    def add_hosted(self, atsign: str, port: int = 0, cram_secret: str | None = None) -> None:
        """Register an atSign (idempotent on the port) and, if given, its CRAM secret."""
        with self._tx() as db:
            cur = db.execute("SELECT port FROM hosted WHERE atsign=?", (atsign,)).fetchone()
            if cur is None:
                db.execute("INSERT INTO hosted(atsign, port, created) VALUES (?,?,?)",
                           (atsign, port, now_ms()))
            elif port and cur["port"] != port:
                db.execute("UPDATE hosted SET port=?, listening=0 WHERE atsign=?", (port, atsign))
            if cram_secret is not None:
                db.execute("DELETE FROM keystore WHERE atsign=? AND key=?",
                           (atsign, "privatekey:at_secret_deleted"))
                db.execute(
                    "INSERT OR REPLACE INTO keystore(atsign, key, value, meta) VALUES (?,?,?,?)",
                    (atsign, "privatekey:at_secret", cram_secret, "{}"))

    def remove_hosted(self, atsign: str, purge: bool = True) -> bool:
        """Stop hosting an atSign; with purge, also drop its keys and notifications."""
        with self._tx() as db:
            n = db.execute("DELETE FROM hosted WHERE atsign=?", (atsign,)).rowcount
            if purge:
                for table in ("keystore", "commits", "notifications", "enrollments", "otps"):
                    db.execute(f"DELETE FROM {table} WHERE atsign=?", (atsign,))  # noqa: S608
        return n > 0

    def hosted(self) -> dict[str, HostedRow]:
        rows = self._db.execute(
            "SELECT atsign, port, listening, pid, created FROM hosted").fetchall()
        return {r["atsign"]: HostedRow(r["atsign"], r["port"], bool(r["listening"]), r["pid"],
                                       r["created"])
                for r in rows}

    def mark_listening(self, atsign: str, port: int, pid: int) -> None:
        with self._tx() as db:
            db.execute("UPDATE hosted SET port=?, listening=1, pid=? WHERE atsign=?",
                       (port, pid, atsign))

    def clear_listening(self, atsign: str | None = None) -> None:
        with self._tx() as db:
            if atsign is None:
                db.execute("UPDATE hosted SET listening=0")
            else:
                db.execute("UPDATE hosted SET listening=0 WHERE atsign=?", (atsign,))

    # --- keystore -------------------------------------------------------------------------

    def get(self, atsign: str, key: str) -> KeyRecord | None:
        r = self._db.execute(
            "SELECT key, value, meta, expires_at, available_at FROM keystore "
            "WHERE atsign=? AND key=?", (atsign, key)).fetchone()
        return _key_record(r) if r else None

    def all_keys(self, atsign: str) -> list[KeyRecord]:
        rows = self._db.execute(
            "SELECT key, value, meta, expires_at, available_at FROM keystore WHERE atsign=? "
            "ORDER BY key", (atsign,)).fetchall()
        return [_key_record(r) for r in rows]

    def put(self, atsign: str, key: str, value: str | None, meta: dict[str, Any], *,
            commit: bool, op: str = "+", expires_at: int | None = None,
            available_at: int | None = None, ts: int | None = None) -> int:
        """Upsert a key; returns its new commit id, or -1 when `commit` is False."""
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO keystore(atsign, key, value, meta, expires_at, available_at)"
                " VALUES (?,?,?,?,?,?)",
                (atsign, key, value, json.dumps(meta, separators=(",", ":")), expires_at,
                 available_at))
            return self._commit(db, atsign, key, op, ts) if commit else -1

    def delete(self, atsign: str, key: str, *, commit: bool, ts: int | None = None) -> int:
        """Delete a key (existing or not); returns the commit id or -1."""
        with self._tx() as db:
            db.execute("DELETE FROM keystore WHERE atsign=? AND key=?", (atsign, key))
            return self._commit(db, atsign, key, "-", ts) if commit else -1

    def scrub(self) -> None:
        """Copy the WAL into the database and truncate it, so the old copies of a deleted
        secret (pages written before its secure delete) leave the WAL file too; best effort
        while other connections read."""
        with suppress(sqlite3.Error):
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def _commit(self, db: sqlite3.Connection, atsign: str, key: str, op: str,
                ts: int | None) -> int:
        row = db.execute("SELECT MAX(commit_id) AS m FROM commits WHERE atsign=?",
                         (atsign,)).fetchone()
        cid = 0 if row["m"] is None else int(row["m"]) + 1
        db.execute("INSERT INTO commits(atsign, commit_id, key, op, ts) VALUES (?,?,?,?,?)",
                   (atsign, cid, key, op, ts if ts is not None else now_ms()))
        return cid

    def last_commit_id(self, atsign: str) -> int:
        row = self._db.execute("SELECT MAX(commit_id) AS m FROM commits WHERE atsign=?",
                               (atsign,)).fetchone()
        return -1 if row["m"] is None else int(row["m"])

    def commit_entries(self, atsign: str) -> list[tuple[int, str, str]]:
        rows = self._db.execute(
            "SELECT commit_id, key, op FROM commits WHERE atsign=? ORDER BY commit_id",
            (atsign,)).fetchall()
        return [(r["commit_id"], r["key"], r["op"]) for r in rows]

    def purge_expired_keys(self, now: int) -> int:
        """Remove keys whose ttl passed (the periodic expiry job); returns how many."""
        with self._tx() as db:
            return db.execute("DELETE FROM keystore WHERE expires_at IS NOT NULL AND expires_at<?",
                              (now,)).rowcount

    # --- notifications --------------------------------------------------------------------

    @property
    def wal_path(self) -> Path:
        return self.path.with_name(self.path.name + "-wal")

    def put_notification(self, row: NotificationRow, *, durable: bool = True) -> None:
        """Insert or overwrite (same id) a notification — committed before returning
        (``durable=False``: not fsynced yet; the caller syncs the WAL before replying)."""
        with self._tx(durable) as db:
            db.execute(
                "INSERT OR REPLACE INTO notifications(atsign, id, kind, from_atsign, to_atsign, "
                "key, status, retry_count, next_attempt, epoch_ms, expires_at, data) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (row.atsign, row.id, row.kind, row.from_atsign, row.to_atsign, row.key,
                 row.status, row.retry_count, row.next_attempt, row.epoch_ms, row.expires_at,
                 json.dumps(row.data, separators=(",", ":"))))

    def get_notification(self, atsign: str, nid: str) -> NotificationRow | None:
        r = self._db.execute("SELECT * FROM notifications WHERE atsign=? AND id=?",
                             (atsign, nid)).fetchone()
        return _notif(r) if r else None

    def notifications(self, atsign: str, kinds: Iterable[str], *, after_epoch: int = -1,
                      now: int | None = None, to_atsign: str | None = None
                      ) -> list[NotificationRow]:
        """Non-expired notifications of the given kinds, oldest first."""
        kinds = list(kinds)
        q = (f"SELECT * FROM notifications WHERE atsign=? AND kind IN ({','.join('?' * len(kinds))})"
             " AND epoch_ms>?")
        args: list[Any] = [atsign, *kinds, after_epoch]
        if now is not None:
            q += " AND (expires_at IS NULL OR expires_at>=?)"
            args.append(now)
        if to_atsign is not None:
            q += " AND to_atsign=?"
            args.append(to_atsign)
        q += " ORDER BY epoch_ms, rowid"
        return [_notif(r) for r in self._db.execute(q, args).fetchall()]

    def pending_sent(self) -> list[NotificationRow]:
        """Every sent notification not yet delivered or given up on (the delivery queue)."""
        rows = self._db.execute(
            "SELECT * FROM notifications WHERE kind='sent' AND status IN ('queued','errored') "
            "ORDER BY epoch_ms, rowid").fetchall()
        return [_notif(r) for r in rows]

    def set_notification_status(self, atsign: str, nid: str, status: str, *,
                                retry_count: int | None = None,
                                next_attempt: int | None = None,
                                durable: bool = True) -> None:
        with self._tx(durable) as db:
            sets, args = ["status=?"], [status]
            if retry_count is not None:
                sets.append("retry_count=?")
                args.append(retry_count)
            if next_attempt is not None:
                sets.append("next_attempt=?")
                args.append(next_attempt)
            db.execute(f"UPDATE notifications SET {', '.join(sets)} WHERE atsign=? AND id=?",
                       (*args, atsign, nid))

    def remove_notification(self, atsign: str, nid: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM notifications WHERE atsign=? AND id=?", (atsign, nid))

    def purge_expired_notifications(self, now: int) -> int:
        with self._tx() as db:
            return db.execute(
                "DELETE FROM notifications WHERE expires_at IS NOT NULL AND expires_at<?",
                (now,)).rowcount

    def max_epoch(self, atsign: str) -> int:
        row = self._db.execute("SELECT MAX(epoch_ms) AS m FROM notifications WHERE atsign=?",
                               (atsign,)).fetchone()
        return -1 if row["m"] is None else int(row["m"])

    def count_notifications(self, atsign: str) -> int:
        row = self._db.execute("SELECT COUNT(*) AS c FROM notifications WHERE atsign=?",
                               (atsign,)).fetchone()
        return int(row["c"])

    # --- enrollments and one-time codes (APKAM) -------------------------------------------

    def put_enrollment(self, row: EnrollmentRow) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO enrollments(atsign, id, state, created, updated, "
                "expires_at, data) VALUES (?,?,?,?,?,?,?)",
                (row.atsign, row.id, row.state, row.created, row.updated, row.expires_at,
                 json.dumps(row.data, separators=(",", ":"))))

    def get_enrollment(self, atsign: str, eid: str) -> EnrollmentRow | None:
        r = self._db.execute("SELECT * FROM enrollments WHERE atsign=? AND id=?",
                             (atsign, eid)).fetchone()
        return _enrollment(r) if r else None

    def enrollments(self, atsign: str) -> list[EnrollmentRow]:
        rows = self._db.execute("SELECT * FROM enrollments WHERE atsign=? ORDER BY created, id",
                                (atsign,)).fetchall()
        return [_enrollment(r) for r in rows]

    def count_enrollments(self, atsign: str, state: str, now: int) -> int:
        row = self._db.execute(
            "SELECT COUNT(*) AS c FROM enrollments WHERE atsign=? AND state=? AND "
            "(expires_at IS NULL OR expires_at>=?)", (atsign, state, now)).fetchone()
        return int(row["c"])

    def delete_enrollment(self, atsign: str, eid: str) -> bool:
        with self._tx() as db:
            return db.execute("DELETE FROM enrollments WHERE atsign=? AND id=?",
                              (atsign, eid)).rowcount > 0

    def put_otp(self, atsign: str, digest: str, expires_at: int, data: dict[str, Any]) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO otps(atsign, digest, expires_at, data) "
                       "VALUES (?,?,?,?)",
                       (atsign, digest, expires_at, json.dumps(data, separators=(",", ":"))))

    def consume_otp(self, atsign: str, digest: str, now: int) -> dict[str, Any] | None:
        """Delete a live code and return its data (None: unknown, used or expired). One
        transaction, so two connections racing with the same code cannot both succeed."""
        with self._tx() as db:
            r = db.execute("SELECT expires_at, data FROM otps WHERE atsign=? AND digest=?",
                           (atsign, digest)).fetchone()
            if r is None:
                return None
            db.execute("DELETE FROM otps WHERE atsign=? AND digest=?", (atsign, digest))
            if r["expires_at"] < now:
                return None
            return json.loads(r["data"])

    def count_otps(self, atsign: str, now: int) -> int:
        row = self._db.execute("SELECT COUNT(*) AS c FROM otps WHERE atsign=? AND expires_at>=?",
                               (atsign, now)).fetchone()
        return int(row["c"])

    def purge_expired_enrollment_data(self, now: int) -> int:
        """Expired codes and expired pending requests (the periodic expiry job)."""
        with self._tx() as db:
            n = db.execute("DELETE FROM otps WHERE expires_at<?", (now,)).rowcount
            return n + db.execute("DELETE FROM enrollments WHERE state='pending' AND "
                                  "expires_at IS NOT NULL AND expires_at<?", (now,)).rowcount


@dataclass(frozen=True)
class EnrollmentRow:
    """One APKAM enrollment; `data` holds appName, deviceName, namespaces, keys (JSON)."""

    atsign: str
    id: str
    state: str  # pending | approved | denied | revoked
    created: int
    updated: int
    expires_at: int | None
    data: dict[str, Any]


def _enrollment(r: sqlite3.Row) -> EnrollmentRow:
    return EnrollmentRow(r["atsign"], r["id"], r["state"], r["created"], r["updated"],
                         r["expires_at"], json.loads(r["data"]))


def _key_record(r: sqlite3.Row) -> KeyRecord:
    try:
        meta = json.loads(r["meta"]) if r["meta"] else {}
    except ValueError:
        meta = {}
    return KeyRecord(r["key"], r["value"], meta, r["expires_at"], r["available_at"])


def _notif(r: sqlite3.Row) -> NotificationRow:
    return NotificationRow(r["atsign"], r["id"], r["kind"], r["from_atsign"], r["to_atsign"],
                           r["key"], r["status"], r["retry_count"], r["next_attempt"],
                           r["epoch_ms"], r["expires_at"], json.loads(r["data"]))
