"""Layout and configuration of a self-hosted control plane (one directory on disk).

Why one directory: the operator (or an Ansible role) needs a single thing to create, back up and
point tools at. Everything the plane's programs need is derived from it (see
docs/decisions/0003-plane-layout.md):

    <plane>/plane.json     this configuration (paths inside are relative to <plane>)
    <plane>/tls/           CA (ca.pem, ca.key) + server certificate (noports.keys.ca)
    <plane>/directory.db   atDirectory store (default; or any store spec, e.g. redis://)
    <plane>/atserver/      atserver state directory (hosted atSigns, keystores)
    <plane>/run.json       written by `noports plane up` while it runs (pids, addresses)
"""

from __future__ import annotations

import ipaddress
import json
import os
import tempfile
import urllib.parse
from dataclasses import asdict, dataclass, field
from pathlib import Path

from noports.keys.ca import TlsFiles, ensure_plane_tls

CONFIG_FILE = "plane.json"
STORE_PASSWORD_FILE = "redis.password"
RUN_FILE = "run.json"
CONFIG_VERSION = 1
DEFAULT_DIRECTORY_PORT = 6464


class PlaneError(RuntimeError):
    """The plane directory is missing, not initialised, or inconsistent (one-line message)."""


def _default_bind(host: str) -> str:
    """Bind where we advertise when that is an address we can bind; all interfaces otherwise."""
    if host == "localhost":
        return "127.0.0.1"
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        return "0.0.0.0"


@dataclass
class PlaneConfig:
    """Everything `noports plane up` and `noports atsign ...` need to know about a plane."""

    directory: Path
    host: str = "127.0.0.1"
    directory_bind: str = "127.0.0.1"
    directory_port: int = DEFAULT_DIRECTORY_PORT
    directory_store: str | None = None  # None: sqlite:///<abs plane>/directory.db
    atserver_bind: str = "127.0.0.1"
    atserver_state_dir: str = "atserver"
    tls_dir: str = "tls"
    extra_names: list[str] = field(default_factory=list)

    # -- derived ---------------------------------------------------------------------------
    def _path(self, p: str) -> Path:
        return (self.directory / p).resolve()

    @property
    def config_path(self) -> Path:
        return self.directory / CONFIG_FILE

    @property
    def run_path(self) -> Path:
        return self.directory / RUN_FILE

    @property
    def tls(self) -> TlsFiles:
        return TlsFiles(self._path(self.tls_dir))

    @property
    def ca_file(self) -> Path:
        return self.tls.ca_cert

    @property
    def state_dir(self) -> Path:
        return self._path(self.atserver_state_dir)

    @property
    def store_spec(self) -> str:
        return self.directory_store or f"sqlite://{self._path('directory.db')}"

    @property
    def store_password_file(self) -> Path:
        return self.directory / STORE_PASSWORD_FILE

    @property
    def store_password(self) -> str | None:
        """The Redis password, kept in a 0600 file, never in plane.json or argv."""
        try:
            return self.store_password_file.read_text(encoding="utf-8").strip() or None
        except FileNotFoundError:
            return None

    @property
    def root(self) -> tuple[str, int]:
        """Where clients (and our atservers) reach the directory."""
        return self.host, self.directory_port

    @property
    def root_address(self) -> str:
        return f"{self.host}:{self.directory_port}"

    @property
    def tls_names(self) -> list[str]:
        """SANs of the server certificate: every name clients or peers may dial."""
        names = [self.host, "localhost", "127.0.0.1", *self.extra_names,
                 self.directory_bind, self.atserver_bind]
        return [n for n in dict.fromkeys(names) if n and n not in ("0.0.0.0", "::")]

    # -- persistence -----------------------------------------------------------------------
    def to_json(self) -> dict:
        data = asdict(self)
        data.pop("directory")
        return {"version": CONFIG_VERSION, **data}

    def save(self) -> Path:
        """Write plane.json atomically (it holds no secrets; mode 0644)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.to_json(), indent=2, ensure_ascii=False) + "\n"
        fd, tmp = tempfile.mkstemp(prefix=".plane-", dir=self.directory)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, self.config_path)
        return self.config_path

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> PlaneConfig:
        d = Path(directory).expanduser().resolve()
        path = d / CONFIG_FILE
        if not path.exists():
            hint = "" if d.exists() else " (directory does not exist)"
            raise PlaneError(f"{d} is not an initialised plane{hint}: run "
                             f"`noports plane init --dir {d}` first")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PlaneError(f"{path}: unreadable plane config: {exc}") from None
        if not isinstance(data, dict):
            raise PlaneError(f"{path}: plane config must be a JSON object")
        version = data.pop("version", CONFIG_VERSION)
        if version != CONFIG_VERSION:
            raise PlaneError(f"{path}: unsupported plane config version {version!r}")
        known = {f for f in cls.__dataclass_fields__ if f != "directory"}
        unknown = set(data) - known
        if unknown:
            raise PlaneError(f"{path}: unknown setting(s) {', '.join(sorted(unknown))}")
        try:
            cfg = cls(directory=d, **data)
            cfg.directory_port = int(cfg.directory_port)
        except (TypeError, ValueError) as exc:
            raise PlaneError(f"{path}: bad plane config: {exc}") from None
        return cfg

    def read_run_state(self) -> dict | None:
        """What a running `noports plane up` recorded, or None."""
        try:
            return json.loads(self.run_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None


def split_store_password(spec: str | None) -> tuple[str | None, str | None]:
    """`redis://:pw@host:port/db` -> (`redis://host:port/db`, `pw`): the password goes to a
    0600 file, the rest to plane.json (0644) and the children's argv."""
    if not spec or "://" not in spec or "@" not in spec.split("://", 1)[1].split("/", 1)[0]:
        return spec, None
    u = urllib.parse.urlsplit(spec)
    if u.password is None:
        return spec, None
    host = u.hostname or ""
    netloc = (f"{u.username}@" if u.username else "") + host + (f":{u.port}" if u.port else "")
    return urllib.parse.urlunsplit((u.scheme, netloc, u.path, u.query, u.fragment)), \
        urllib.parse.unquote(u.password)


def init_plane(directory: str | os.PathLike[str], host: str = "127.0.0.1",
               directory_port: int = DEFAULT_DIRECTORY_PORT, store_spec: str | None = None,
               extra_names: tuple[str, ...] | list[str] = (), directory_bind: str | None = None,
               atserver_bind: str | None = None, force: bool = False) -> PlaneConfig:
    """Create (idempotently) a plane: CA + server certificate, state dir, plane.json.

    Re-running with the same settings is a no-op that keeps the CA (clients keep trusting it).
    Changing settings of an existing plane needs `force` (the CA is still kept; the server
    certificate is re-issued if names were added).
    """
    d = Path(directory).expanduser().resolve()
    store_spec, password = split_store_password(store_spec)
    if not 0 < int(directory_port) < 65536:
        raise PlaneError(f"directory port out of range: {directory_port}")
    cfg = PlaneConfig(directory=d, host=host,
                      directory_bind=directory_bind or _default_bind(host),
                      directory_port=int(directory_port), directory_store=store_spec,
                      atserver_bind=atserver_bind or _default_bind(host),
                      extra_names=list(dict.fromkeys(extra_names)))
    if (d / CONFIG_FILE).exists():
        old = PlaneConfig.load(d)
        if old.to_json() != cfg.to_json() and not force:
            raise PlaneError(f"{d} is already initialised with different settings "
                             f"(host {old.host}, directory port {old.directory_port}); "
                             "use --force to change them")
    try:
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        ensure_plane_tls(cfg.tls.directory, cfg.tls_names)
        if password is not None:
            fd = os.open(cfg.store_password_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(password + "\n")
        cfg.save()
    except OSError as exc:
        raise PlaneError(f"cannot initialise plane in {d}: {exc.strerror or exc}") from None
    return cfg
