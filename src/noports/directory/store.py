"""Where the atDirectory keeps atSign → ``host:port`` registrations.

Why two stores: SQLite is the zero-dependency default for a self-hosted plane (one file, WAL so
the CLI can register while the server reads). Redis uses exactly the official root's layout
(docs/reference/atprotocol.md#directory-storage: plain string keys, key = atSign without '@' lower-cased, value ``host:port``,
``ping`` = ``pong`` sanity key), so an existing official Redis can be served unchanged.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from pathlib import Path
from typing import Protocol, runtime_checkable
from urllib.parse import urlsplit, urlunsplit

from noports.atprotocol.atsign import InvalidAtSign, normalize_atsign

log = logging.getLogger(__name__)

MAX_ATSIGN_BYTES = 253  # the wire line limit is 255 bytes including '\r\n'
REDIS_SANITY_KEY = "ping"
REDIS_PASSWORD_ENV = "NOPORTS_REDIS_PASSWORD"  # keeps the password out of argv
REDIS_SANITY_VALUE = "pong"


class DirectoryStoreError(Exception):
    """The store cannot be opened or used (bad spec, unreachable Redis, unwritable file)."""


class InvalidAtSignError(ValueError):
    """An atSign that could never be looked up over the wire."""


class InvalidAddressError(ValueError):
    """An address that clients could not parse as ``host:port``."""


def normalise_atsign(atsign: str) -> str:
    """Store key for `atsign`: the one atSign rule (noports.atprotocol.atsign), no '@'."""
    try:
        return normalize_atsign(atsign)[1:]
    except InvalidAtSign as exc:
        raise InvalidAtSignError(f"invalid atSign {atsign!r}: {exc.reason}") from None


def validate_address(address: str) -> str:
    """``host:port`` with exactly one ':' (clients split on it) and a port in 1-65535."""
    if not isinstance(address, str):
        raise InvalidAddressError(f"address must be a string, got {type(address).__name__}")
    value = address.strip()
    if value.count(":") != 1:
        raise InvalidAddressError(
            f"invalid address {address!r}: expected HOST:PORT with exactly one ':' "
            "(IPv6 literals cannot be used; atProtocol clients split on ':')")
    host, port_text = value.split(":")
    if not host or any(ch.isspace() for ch in host) or "@" in host or "/" in host:
        raise InvalidAddressError(
            f"invalid address {address!r}: host must be a non-empty name or IPv4 address")
    if not port_text.isascii() or not port_text.isdigit():
        raise InvalidAddressError(f"invalid address {address!r}: port must be a number")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise InvalidAddressError(f"invalid address {address!r}: port must be 1-65535")
    return f"{host}:{port}"


@runtime_checkable
class DirectoryStore(Protocol):
    """atSign (any case, '@' optional) → ``host:port``."""

    #: True when calls may block on the network and should run off the event loop.
    may_block: bool

    def get(self, atsign: str) -> str | None: ...

    def set(self, atsign: str, address: str) -> None: ...

    def delete(self, atsign: str) -> bool: ...

    def list(self) -> dict[str, str]: ...

    def close(self) -> None: ...


# --------------------------------------------------------------------------- SQLite


class SqliteDirectoryStore:
    """Embedded store: one table, WAL mode, keys like the official Redis layout."""

    may_block = False

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(self.path), check_same_thread=False,
                                       isolation_level=None, timeout=10.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS directory ("
                             " atsign TEXT PRIMARY KEY NOT NULL,"
                             " address TEXT NOT NULL)")
        except (OSError, sqlite3.Error) as exc:
            raise DirectoryStoreError(f"cannot open SQLite store {self.path}: {exc}") from exc

    def __repr__(self) -> str:
        return f"SqliteDirectoryStore({str(self.path)!r})"

    def _run(self, sql: str, params: tuple[str, ...] = ()) -> sqlite3.Cursor:
        try:
            with self._lock:
                return self._db.execute(sql, params)
        except sqlite3.Error as exc:
            raise DirectoryStoreError(f"SQLite store {self.path}: {exc}") from exc

    def get(self, atsign: str) -> str | None:
        row = self._run("SELECT address FROM directory WHERE atsign = ?",
                        (normalise_atsign(atsign),)).fetchone()
        return row[0] if row else None

    def set(self, atsign: str, address: str) -> None:
        self._run("INSERT INTO directory(atsign, address) VALUES (?, ?) "
                  "ON CONFLICT(atsign) DO UPDATE SET address = excluded.address",
                  (normalise_atsign(atsign), validate_address(address)))

    def delete(self, atsign: str) -> bool:
        return self._run("DELETE FROM directory WHERE atsign = ?",
                         (normalise_atsign(atsign),)).rowcount > 0

    def list(self) -> dict[str, str]:
        rows = self._run("SELECT atsign, address FROM directory ORDER BY atsign").fetchall()
        return dict(rows)

    def close(self) -> None:
        with self._lock:
            self._db.close()


# --------------------------------------------------------------------------- Redis


def redact_url(url: str) -> str:
    """The URL without its password (safe for logs and error messages)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.hostname or ""
    if parts.port is not None:
        netloc = f"{netloc}:{parts.port}"
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit((parts.scheme, user + netloc, parts.path, parts.query, parts.fragment))


class RedisDirectoryStore:
    """The official root's Redis layout, via redis-py (optional dependency ``redis``)."""

    may_block = True

    def __init__(self, url: str, *, timeout: float = 5.0, password: str | None = None) -> None:
        self.url = url
        if password is None:
            password = os.environ.get(REDIS_PASSWORD_ENV) or None
        self.safe_url = redact_url(url)
        try:
            import redis
        except ImportError as exc:  # pragma: no cover - depends on the installation
            raise DirectoryStoreError(
                "Redis store needs the 'redis' package (pip install 'noports[redis]')") from exc
        self._redis_mod = redis
        try:
            extra = {"password": password} if password is not None else {}
            self._r = redis.Redis.from_url(url, decode_responses=True,
                                           socket_connect_timeout=timeout,
                                           socket_timeout=timeout, **extra)
            sanity = self._r.get(REDIS_SANITY_KEY)
            if sanity is None:
                self._r.set(REDIS_SANITY_KEY, REDIS_SANITY_VALUE)
                log.info("Redis store %s: set sanity key %s=%s", self.safe_url,
                         REDIS_SANITY_KEY, REDIS_SANITY_VALUE)
            elif sanity != REDIS_SANITY_VALUE:
                raise DirectoryStoreError(
                    f"Redis store {self.safe_url}: sanity check failed: GET {REDIS_SANITY_KEY} "
                    f"returned {sanity!r}, expected {REDIS_SANITY_VALUE!r} (wrong database?)")
        except (redis.RedisError, ValueError, OSError) as exc:
            raise DirectoryStoreError(f"cannot use Redis store {self.safe_url}: "
                                      f"{type(exc).__name__}: {exc}") from exc

    def __repr__(self) -> str:
        return f"RedisDirectoryStore({self.safe_url!r})"

    def _call(self, fn, *args):  # type: ignore[no-untyped-def]
        try:
            return fn(*args)
        except self._redis_mod.RedisError as exc:
            raise DirectoryStoreError(f"Redis store {self.safe_url}: "
                                      f"{type(exc).__name__}: {exc}") from exc

    @staticmethod
    def _key(atsign: str) -> str:
        key = normalise_atsign(atsign)
        if key == REDIS_SANITY_KEY:
            raise InvalidAtSignError(
                f"atSign {atsign!r} cannot be stored in Redis: the key {REDIS_SANITY_KEY!r} is "
                "the official root's sanity-check key")
        return key

    def get(self, atsign: str) -> str | None:
        key = normalise_atsign(atsign)
        if key == REDIS_SANITY_KEY:
            return None
        value = self._call(self._r.get, key)
        if value is None:
            return None
        try:
            return validate_address(value)
        except InvalidAddressError:
            log.warning("Redis store %s: ignoring malformed value under key %r",
                        self.safe_url, key)
            return None

    def set(self, atsign: str, address: str) -> None:
        self._call(self._r.set, self._key(atsign), validate_address(address))

    def delete(self, atsign: str) -> bool:
        return bool(self._call(self._r.delete, self._key(atsign)))

    def list(self) -> dict[str, str]:
        out: dict[str, str] = {}
        keys = [k for k in self._call(lambda: list(self._r.scan_iter(count=1000)))
                if k != REDIS_SANITY_KEY]
        if not keys:
            return out
        values = self._call(self._r.mget, keys)
        for key, value in zip(keys, values, strict=True):
            if value is None:
                continue
            try:
                out[key] = validate_address(value)
            except InvalidAddressError:
                continue
        return dict(sorted(out.items()))

    def close(self) -> None:
        self._r.close()


# --------------------------------------------------------------------------- spec


def open_store(spec: str, *, password: str | None = None) -> DirectoryStore:
    """Open a store from ``sqlite:///abs/path.db``, a bare path, or ``redis://...``.

    Redis specs: ``redis://[[user]:password@]host:port/db`` (or ``rediss://`` for TLS). Keep
    the password out of the URL (argv is world-readable): pass `password`, or set
    $NOPORTS_REDIS_PASSWORD.
    """
    if not spec or not spec.strip():
        raise DirectoryStoreError("empty store spec")
    spec = spec.strip()
    if "://" not in spec:
        return SqliteDirectoryStore(Path(spec).expanduser())
    scheme = spec.split("://", 1)[0].lower()
    if scheme == "sqlite":
        path = spec[len("sqlite://"):]
        if not path.startswith("/") or path == "/":
            raise DirectoryStoreError(
                f"bad store spec {spec!r}: use sqlite:///ABSOLUTE/PATH.db (three slashes)")
        return SqliteDirectoryStore(path)
    if scheme in ("redis", "rediss"):
        return RedisDirectoryStore(spec, password=password)
    raise DirectoryStoreError(
        f"bad store spec {redact_url(spec)!r}: unsupported scheme {scheme!r} "
        "(use sqlite:///PATH, a file path, or redis://[:PASSWORD@]HOST:PORT/DB)")
