"""What one sshnp session needs to know (pure data, no I/O).

Why separate from the CLI: the Ansible connection plugin and tests build ``SessionParams``
directly, and the CLI only maps flags and profiles onto it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from noports.atprotocol.atsign import InvalidAtSign, normalize_atsign

from .errors import UsageError

TUNNEL_MODES = ("aes", "ssh")
#: measured default (docs/decisions/0005-default-tunnel-mode.md)
DEFAULT_TUNNEL_MODE = "aes"
DEFAULT_ROOT = ("root.atsign.org", 64)
DEFAULT_RELAY_TIMEOUT = 20.0  # docs/reference/noports-protocol.md#timeouts: relay response wait
DEFAULT_DAEMON_TIMEOUT = 15.0  # docs/reference/noports-protocol.md#timeouts: daemon session response wait
DEFAULT_CONNECT_TIMEOUT = 10.0  # atServer / relay TCP+TLS connect
DEFAULT_IDLE_TIMEOUT = 30.0  # official srv: wait this long for the local ssh to connect
DEFAULT_CIPHERS = ("chacha20-poly1305-v1", "aes-256-ctr")


def norm_atsign(value: str, what: str) -> str:
    """'Alice' / '@alice' -> '@alice', or a UsageError naming the flag."""
    try:
        return normalize_atsign(value)
    except InvalidAtSign as exc:
        raise UsageError(f"{what}: {exc}") from None


def parse_root(value: str) -> tuple[str, int]:
    """``host[:port]`` (port 64 by default, like the official --root-domain)."""
    text = value.strip()
    if text.startswith("[") and "]" in text:  # [v6]:port
        host, _sep, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    else:
        host, sep, port = text.rpartition(":")
        if not sep or not port.isdigit():
            host, port = text, ""
    if not host:
        raise UsageError(f"--root-domain: no host in {value!r}")
    try:
        p = int(port) if port else DEFAULT_ROOT[1]
    except ValueError:
        raise UsageError(f"--root-domain: bad port in {value!r}") from None
    if not 0 < p < 65536:
        raise UsageError(f"--root-domain: bad port in {value!r}")
    return host, p


@dataclass
class SessionParams:
    """Inputs of :func:`noports.client.open_session` (see docs/sshnp.md for each field)."""

    client_atsign: str
    device_atsign: str
    relays: list[str]
    device: str = "default"
    remote_user: str | None = None
    key_file: Path | None = None  # default ~/.atsign/keys/<@client>_key.atKeys
    root: tuple[str, int] = DEFAULT_ROOT
    ca_file: Path | None = None  # None: system trust store (and SSL_CERT_FILE)
    tunnel_mode: str = DEFAULT_TUNNEL_MODE
    remote_sshd_port: int = 22
    identity_file: Path | None = None
    send_ssh_public_key: bool = False
    relay_timeout: float = DEFAULT_RELAY_TIMEOUT
    daemon_timeout: float = DEFAULT_DAEMON_TIMEOUT
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    ciphers: tuple[str, ...] = DEFAULT_CIPHERS
    need_remote_user: bool = True  # False: stdio+aes, where the caller's ssh has its own user
    cache_dir: Path | None = None  # default ~/.atsign/sshnp (cached_pks, known_hosts.d)
    known_hosts_file: Path | None = None  # default: a per-device file under cache_dir
    #: single-port relay (srvd --443): both sides reach the relay on one port, ESCR auth
    only443: bool = False
    relay_auth_mode: str = "payload"  # payload (v5 line) or escr (challenge-response)
    relay_select: str = "fastest"  # several -r relays: fastest (probe) or ordered
    extra: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.client_atsign = norm_atsign(self.client_atsign, "--from")
        self.device_atsign = norm_atsign(self.device_atsign, "--to")
        if not self.relays:
            raise UsageError("--srvd: at least one relay atSign is needed")
        self.relays = [norm_atsign(r, "--srvd") for r in self.relays]
        if self.relay_auth_mode not in ("payload", "escr"):
            raise UsageError(f"--relay-auth-mode must be payload or escr, not "
                             f"{self.relay_auth_mode!r}")
        if self.relay_select not in ("fastest", "ordered"):
            raise UsageError(f"--relay-select must be fastest or ordered, not "
                             f"{self.relay_select!r}")
        if self.tunnel_mode not in TUNNEL_MODES:
            raise UsageError(f"--tunnel-mode must be one of {', '.join(TUNNEL_MODES)}, "
                             f"not {self.tunnel_mode!r}")
        from noports.npproto.errors import ProtocolError
        from noports.npproto.keys import validate_device_name
        try:
            validate_device_name(self.device)
        except ProtocolError as exc:
            raise UsageError(f"--device: {exc}") from None
        if not 0 < int(self.remote_sshd_port) < 65536:
            raise UsageError(f"--remote-sshd-port: not a TCP port: {self.remote_sshd_port}")
        for name in ("relay_timeout", "daemon_timeout", "connect_timeout"):
            if getattr(self, name) <= 0:
                raise UsageError(f"--{name.replace('_', '-')} must be positive")

    @property
    def home_cache(self) -> Path:
        return self.cache_dir or Path.home() / ".atsign" / "sshnp"

    @property
    def keys_path(self) -> Path:
        if self.key_file is not None:
            return Path(self.key_file).expanduser()
        return Path.home() / ".atsign" / "keys" / f"{self.client_atsign}_key.atKeys"
