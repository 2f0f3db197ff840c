"""sshnpd configuration: defaults < config file < command line, validated into one object.

Why a module of its own: the same settings arrive from argv, from a config file (what an
Ansible role templates) and from tests; one validator turns any of them into a frozen
:class:`DaemonConfig` or a :class:`ConfigError` whose one-line message names the setting.

Config files mirror the long flag names (``-`` or ``_``): ``.json`` (an object), ``.toml``
(top-level keys), anything else ``key = value`` lines with ``#`` comments. ``.yaml``/``.yml``
is the official daemon's layout (``/etc/noports/sshnpd.yaml``: sections atsign, access,
device, ssh, runtime), read by a small parser of the subset it uses. Lists may be given
as a comma-separated string or (JSON/TOML) as an array.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from noports.compat import TOMLDecodeError, toml_loads
from noports.npproto.errors import ProtocolError
from noports.npproto.keys import normalize_atsign, snakify_device_name, validate_device_name

from .liveness import MONITOR_HEARTBEAT_S
from .sshkeys import ALGORITHMS

DEFAULT_ROOT = ("root.atsign.org", 64)
DEFAULT_HOST_KEYS = "/etc/ssh/ssh_host_*_key.pub"
DEFAULT_DEVICE_GROUP = "__none__"
EPHEMERAL_KEY_TTL = 15.0  # seconds an ephemeral key stays authorized (official: 15 s)
REQUEST_WINDOW = 60.0  # seconds a request's timestamp may differ from the device clock
MAX_REQUEST_WINDOW = 3600.0
# a session host without sessions for this long is replaced by a fresh, small one (its session
# code loads again with the next session): docs/decisions/0032-sshnpd-idle-memory.md
SESSION_HOST_IDLE_S = 300.0


class ConfigError(ValueError):
    """Unusable configuration; the message is one line naming the setting."""


@dataclass(frozen=True)
class DaemonConfig:
    """Everything sshnpd needs to know, already validated."""

    atsign: str
    managers: tuple[str, ...]
    device: str = "default"
    permit_open: tuple[str, ...] = ("localhost:22",)
    local_sshd_port: int = 22
    accept_public_keys: bool = False
    sshpublickey_permissions: str = ""
    hide: bool = False
    key_file: Path | None = None
    root: tuple[str, int] = DEFAULT_ROOT
    ca_file: Path | None = None
    authorized_keys: Path = field(
        default_factory=lambda: Path(os.path.expanduser("~/.ssh/authorized_keys")))
    sshd_host_keys: str = DEFAULT_HOST_KEYS
    ephemeral_permissions: str = ""
    ssh_algorithm: str = "ssh-ed25519"
    device_group: str = DEFAULT_DEVICE_GROUP
    ephemeral_key_ttl: float = EPHEMERAL_KEY_TTL
    max_sessions: int = 64
    request_window: float = REQUEST_WINDOW
    any_client_timezone: bool = False
    storage_path: Path | None = None
    monitor_heartbeat: float = MONITOR_HEARTBEAT_S
    session_host_idle: float = SESSION_HOST_IDLE_S
    log_format: str = "text"
    verbose: bool = False
    # TEST ONLY (hidden --test-official-reply, never read from config files): answer session
    # requests as official daemons do, without hostKeys/npCipher, ephemeralPrivateKey null
    official_reply: bool = False

    @property
    def keys_path(self) -> Path:
        """The .atKeys file: ``-k`` or ``~/.atsign/keys/<@atsign>_key.atKeys``."""
        if self.key_file is not None:
            return self.key_file
        return Path(os.path.expanduser("~")) / ".atsign" / "keys" / f"{self.atsign}_key.atKeys"

    @property
    def storage_dir(self) -> Path:
        """Where state survives restarts: ``--storage-path`` or the official default
        ``~/.atsign/storage/<@atsign>/..sshnpd/<device>``."""
        if self.storage_path is not None:
            return self.storage_path
        return (Path(os.path.expanduser("~")) / ".atsign" / "storage" / self.atsign
                / "..sshnpd" / self.device)


# --- config files --------------------------------------------------------------------------

#: canonical setting name -> kind (str, bool, int, float, list)
SETTINGS: dict[str, str] = {
    "atsign": "str", "managers": "list", "device": "str", "permit_open": "list",
    "local_sshd_port": "int", "sshpublickey": "bool", "sshpublickey_permissions": "str",
    "hide": "bool", "key_file": "str", "root_domain": "str", "ca_file": "str",
    "authorized_keys": "str", "sshd_host_keys": "str", "ephemeral_permissions": "str",
    "ssh_algorithm": "str", "device_group": "str", "ephemeral_key_ttl": "float",
    "max_sessions": "int", "log_format": "str", "verbose": "bool", "storage_path": "str",
    "request_window": "float", "any_client_timezone": "bool", "monitor_heartbeat": "float",
    "session_host_idle": "float",
}
ALIASES = {"manager": "managers", "po": "permit_open", "dg": "device_group",
           "key": "key_file", "keys": "key_file", "un_hide": None, "username": None}


def canonical(name: str) -> str | None:
    """Setting name as used in SETTINGS ('permit-open' -> 'permit_open'); None = ignored."""
    key = name.strip().lower().replace("-", "_")
    if key in ALIASES:
        return ALIASES[key]
    if key not in SETTINGS:
        raise ConfigError(f"unknown setting {name!r}")
    return key


def _parse_bool(text: str, where: str) -> bool:
    t = text.strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{where}: expected true or false, got {text!r}")


def _coerce(kind: str, value: Any, where: str) -> Any:
    """Config-file value -> the type of the setting (strings from key=value files included)."""
    if kind == "list":
        if isinstance(value, str):
            return [v for v in (p.strip() for p in value.split(",")) if v]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return [v.strip() for v in value if v.strip()]
        raise ConfigError(f"{where}: expected a list of strings or a comma-separated string")
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str):
            return _parse_bool(value, where)
        raise ConfigError(f"{where}: expected true or false")
    if kind in ("int", "float"):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number")
        try:
            return int(value) if kind == "int" else float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise ConfigError(f"{where}: expected a string")


def parse_config_text(text: str, source: str = "<config>", fmt: str | None = None
                      ) -> dict[str, Any]:
    """Parse a config file's text; ``fmt`` is json, toml or kv (default: from ``source``)."""
    if fmt is None:
        suffix = Path(source).suffix.lower()
        fmt = {".json": "json", ".toml": "toml", ".yaml": "yaml", ".yml": "yaml"}.get(
            suffix, "kv")
    raw: dict[str, Any] = {}
    if fmt == "yaml":
        items = official_yaml_items(text, source)
    elif fmt == "json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{source}: not valid JSON: {exc.msg} at line {exc.lineno}") \
                from None
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object")
        items = [(k, v, f"{source}: {k}") for k, v in data.items()]
    elif fmt == "toml":
        try:
            data = toml_loads(text)
        except TOMLDecodeError as exc:
            raise ConfigError(f"{source}: not valid TOML: {exc}") from None
        items = [(k, v, f"{source}: {k}") for k, v in data.items()]
    else:
        items = []
        for n, line in enumerate(text.splitlines(), 1):
            s = line.strip()
            if not s or s.startswith(("#", ";")):
                continue
            k, sep, v = s.partition("=")
            if not sep or not k.strip():
                raise ConfigError(f"{source}:{n}: expected key = value")
            v = v.strip()
            if len(v) >= 2 and v[0] == v[-1] and v[0] in "\"'":
                v = v[1:-1]
            items.append((k.strip(), v, f"{source}:{n}"))
    for key, value, where in items:
        try:
            name = canonical(str(key))
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        if name is None:
            continue
        raw[name] = _coerce(SETTINGS[name], value, where)
    return raw


# --- the official daemon's YAML layout (/etc/noports/sshnpd.yaml) -------------------------

#: "section/key" of the official sshnpd.yaml -> our setting (None: accepted, has no effect)
OFFICIAL_YAML_KEYS: dict[str, str | None] = {
    "atsign/atsign": "atsign", "atsign/keys": "key_file", "atsign/root": "root_domain",
    "access/managers": "managers", "access/permitopen": "permit_open",
    "device/name": "device", "device/group": "device_group", "device/hide": "hide",
    "ssh/add-publickeys": "sshpublickey", "ssh/sshd-port": "local_sshd_port",
    "ssh/publickey-permissions": "sshpublickey_permissions",
    "ssh/ephemeral-permissions": "ephemeral_permissions", "ssh/algorithm": "ssh_algorithm",
    "ssh/client": None, "runtime/storage-path": "storage_path", "runtime/verbose": "verbose",
    "runtime/debug": "verbose", "runtime/strict": None, "runtime/clear-cached-pks": None,
}
_UNSUPPORTED_YAML = {"atsign/passphrase": "password-protected .atKeys are not supported",
                     "access/policy": "the NPA policy service is not supported; use managers"}


def _strip_comment(text: str) -> str:
    """Drop a trailing `` # comment`` that is not inside quotes."""
    quote = ""
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch == "#" and (i == 0 or text[i - 1] in " \t"):
            return text[:i].strip()
    return text.strip()


def _yaml_scalar(text: str, where: str) -> Any:
    t = _strip_comment(text)
    if len(t) >= 2 and t[0] == t[-1] and t[0] in "\"'":
        return t[1:-1]
    if t.lower() in ("true", "yes", "on"):
        return True
    if t.lower() in ("false", "no", "off"):
        return False
    if t in ("", "~", "null"):
        return None
    if re.fullmatch(r"-?\d+", t):
        return int(t)
    if t[:1] in "{&*!|>":
        raise ConfigError(f"{where}: YAML feature not supported here: {t[:20]!r}")
    return t


def _yaml_flow_list(text: str, where: str) -> list[Any]:
    inner = text.strip()[1:-1]
    return [_yaml_scalar(p, where) for p in inner.split(",") if p.strip()]


def parse_official_yaml(text: str, source: str = "<config>") -> dict[str, Any]:
    """The subset of YAML the official sshnpd.yaml uses: ``section:`` then indented
    ``key: scalar``, ``key: [a, b]`` or ``key:`` + ``- item`` lines; ``#`` comments.

    Why not PyYAML: it is not a runtime dependency, and this layout needs only this much;
    anything else (anchors, flow mappings, deeper nesting) is refused with the line number.
    Returns ``{"section/key": value}``.
    """
    out: dict[str, Any] = {}
    section: str | None = None
    list_key: str | None = None
    for n, line in enumerate(text.splitlines(), 1):
        where = f"{source}:{n}"
        body = line.split("#", 1)[0] if line.lstrip().startswith("#") else line
        if not body.strip() or body.strip() in ("---", "..."):
            continue
        if "\t" in body[: len(body) - len(body.lstrip())]:
            raise ConfigError(f"{where}: tabs are not allowed for indentation in YAML")
        indent = len(body) - len(body.lstrip(" "))
        s = body.strip()
        if s.startswith("- "):
            if list_key is None or indent == 0:
                raise ConfigError(f"{where}: list item outside a list")
            out[list_key].append(_yaml_scalar(s[2:], where))
            continue
        key, sep, value = s.partition(":")
        if not sep or not key or (value and not value.startswith(" ")):
            raise ConfigError(f"{where}: expected key: value")
        key = key.strip().strip("\"'")
        if indent == 0:
            if value.strip():
                raise ConfigError(f"{where}: expected a section (e.g. atsign:, access:) "
                                  "as in the official sshnpd.yaml")
            section, list_key = key, None
            continue
        if section is None:
            raise ConfigError(f"{where}: key {key!r} outside a section")
        full = f"{section}/{key}"
        v = _strip_comment(value)
        if not v:
            out[full] = []
            list_key = full
        elif v.startswith("["):
            if not v.endswith("]"):
                raise ConfigError(f"{where}: unterminated [list]")
            out[full], list_key = _yaml_flow_list(v, where), None
        else:
            out[full], list_key = _yaml_scalar(v, where), None
    return out


def official_yaml_items(text: str, source: str) -> list[tuple[str, Any, str]]:
    """The official YAML layout as (our setting, value, where) items."""
    items: list[tuple[str, Any, str]] = []
    for key, value in parse_official_yaml(text, source).items():
        where = f"{source}: {key.replace('/', '.')}"
        if key in _UNSUPPORTED_YAML:
            raise ConfigError(f"{where}: {_UNSUPPORTED_YAML[key]}")
        if key not in OFFICIAL_YAML_KEYS:
            raise ConfigError(f"{where}: unknown setting (the official sshnpd.yaml layout "
                              "has atsign:, access:, device:, ssh:, runtime: sections)")
        name = OFFICIAL_YAML_KEYS[key]
        if name is None or value is None:
            continue
        if name in ("sshpublickey_permissions", "ephemeral_permissions") \
                and isinstance(value, list):
            value = ",".join(str(v) for v in value)
        if name == "verbose" and value is False:
            continue  # runtime.debug: false must not undo runtime.verbose: true
        items.append((name, value, where))
    return items


def load_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(os.path.expanduser(os.fspath(path)))
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {p}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {p} is not UTF-8 text") from None
    return parse_config_text(text, str(p))


# --- validation ----------------------------------------------------------------------------

_PERMIT_RE = re.compile(r"(?P<host>\*|[A-Za-z0-9._\-]+|\[[0-9A-Fa-f:.]+\]):(?P<port>\*|\d{1,5})")


def parse_permit_open(items: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Validate ``host:port`` entries (``*`` allowed for either part)."""
    out: list[str] = []
    for raw in items:
        for item in (p.strip() for p in raw.split(",")):
            if not item:
                continue
            m = _PERMIT_RE.fullmatch(item)
            if not m or (m["port"] != "*" and not 0 < int(m["port"]) < 65536):
                raise ConfigError(f"--permit-open: expected host:port (or *), got {item!r}")
            if item not in out:
                out.append(item)
    if not out:
        raise ConfigError("--permit-open: at least one host:port is needed")
    return tuple(out)


def parse_root(text: str) -> tuple[str, int]:
    """``host[:port]`` of the atDirectory (port 64 by default)."""
    t = text.strip()
    if not t:
        raise ConfigError("--root-domain: empty")
    host, port = t, 64
    if t.startswith("["):
        end = t.find("]")
        if end < 0:
            raise ConfigError(f"--root-domain: bad address {text!r}")
        host, rest = t[1:end], t[end + 1:]
        if rest:
            if not rest.startswith(":"):
                raise ConfigError(f"--root-domain: bad address {text!r}")
            port = _port_of(rest[1:], text)
    elif t.count(":") == 1:
        host, p = t.split(":")
        port = _port_of(p, text)
    if not host or re.search(r"[\s/@]", host):
        raise ConfigError(f"--root-domain: bad host in {text!r}")
    return host, port


def _port_of(p: str, text: str) -> int:
    if not p.isdigit() or not 0 < int(p) < 65536:
        raise ConfigError(f"--root-domain: bad port in {text!r}")
    return int(p)


def build_config(settings: Mapping[str, Any]) -> DaemonConfig:
    """Validate merged settings (canonical names) into a DaemonConfig."""
    s = dict(settings)
    if not s.get("atsign"):
        raise ConfigError("-a/--atsign is required (the device's atSign)")
    try:
        atsign = normalize_atsign(str(s["atsign"]))
    except ProtocolError:
        raise ConfigError(f"-a/--atsign: not a valid atSign: {s['atsign']!r}") from None
    managers: list[str] = []
    for item in s.get("managers") or []:
        for m in (p.strip() for p in str(item).split(",")):
            if not m:
                continue
            try:
                norm = normalize_atsign(m)
            except ProtocolError:
                raise ConfigError(f"-m/--managers: not a valid atSign: {m!r}") from None
            if norm not in managers:
                managers.append(norm)
    if not managers:
        raise ConfigError("-m/--managers is required: at least one client atSign")
    try:
        device = validate_device_name(snakify_device_name(str(s.get("device") or "default")))
    except ProtocolError as exc:
        raise ConfigError(f"-d/--device: {exc}") from None
    port = int(s.get("local_sshd_port", 22))
    if not 0 < port < 65536:
        raise ConfigError(f"--local-sshd-port: out of range: {port}")
    algo = str(s.get("ssh_algorithm") or "ssh-ed25519")
    if algo not in ALGORITHMS:
        raise ConfigError(f"--ssh-algorithm: expected one of {', '.join(ALGORITHMS)}, "
                          f"got {algo!r}")
    log_format = str(s.get("log_format") or "text")
    if log_format not in ("text", "json"):
        raise ConfigError(f"--log-format: expected json or text, got {log_format!r}")
    ttl = float(s.get("ephemeral_key_ttl", EPHEMERAL_KEY_TTL))
    if not 0 < ttl <= 3600:
        raise ConfigError(f"--ephemeral-key-ttl: expected 0 < seconds <= 3600, got {ttl:g}")
    max_sessions = int(s.get("max_sessions", 64))
    if max_sessions < 1:
        raise ConfigError("--max-sessions: must be at least 1")
    window = float(s.get("request_window", REQUEST_WINDOW))
    if not 1 <= window <= MAX_REQUEST_WINDOW:
        raise ConfigError(f"--request-window: expected 1 <= seconds <= "
                          f"{MAX_REQUEST_WINDOW:g}, got {window:g}")
    for name in ("ephemeral_permissions", "sshpublickey_permissions"):
        v = str(s.get(name) or "")
        if "\n" in v or "\r" in v:
            raise ConfigError(f"--{name.replace('_', '-')}: must not contain newlines")
    group = str(s.get("device_group") or DEFAULT_DEVICE_GROUP)
    beat = float(s.get("monitor_heartbeat", MONITOR_HEARTBEAT_S))
    if not 1 <= beat <= 300:
        raise ConfigError(f"--monitor-heartbeat: expected 1 <= seconds <= 300, got {beat:g}")

    host_idle = float(s.get("session_host_idle", SESSION_HOST_IDLE_S))
    if not (host_idle == 0 or 1 <= host_idle <= 86400):
        raise ConfigError(f"--session-host-idle: expected 0 (keep it) or 1 <= seconds <= "
                          f"86400, got {host_idle:g}")

    def path(name: str) -> Path | None:
        v = s.get(name)
        return Path(os.path.expanduser(str(v))) if v else None

    return DaemonConfig(
        atsign=atsign, managers=tuple(managers), device=device,
        # default follows --local-sshd-port (the official default would refuse our own sshd)
        permit_open=parse_permit_open(list(s.get("permit_open") or [f"localhost:{port}"])),
        local_sshd_port=port, accept_public_keys=bool(s.get("sshpublickey", False)),
        sshpublickey_permissions=str(s.get("sshpublickey_permissions") or ""),
        hide=bool(s.get("hide", False)), key_file=path("key_file"),
        root=parse_root(str(s.get("root_domain") or f"{DEFAULT_ROOT[0]}:{DEFAULT_ROOT[1]}")),
        ca_file=path("ca_file"),
        authorized_keys=path("authorized_keys")
        or Path(os.path.expanduser("~/.ssh/authorized_keys")),
        sshd_host_keys=str(s.get("sshd_host_keys") or DEFAULT_HOST_KEYS),
        ephemeral_permissions=str(s.get("ephemeral_permissions") or ""),
        ssh_algorithm=algo, device_group=group, ephemeral_key_ttl=ttl,
        max_sessions=max_sessions, request_window=window,
        any_client_timezone=bool(s.get("any_client_timezone", False)),
        storage_path=path("storage_path"), monitor_heartbeat=beat,
        session_host_idle=host_idle, log_format=log_format,
        verbose=bool(s.get("verbose", False)))
