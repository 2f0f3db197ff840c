"""OpenSSH sshd for tests: one config writer, one host-key maker, one way to start it.

Every sshd of the harness (a device's, the relay's admin sshd, an impostor with other host keys,
the loopback ones of the per-file tests) is the real ``sshd -D -e`` on a throw-away config, so
it runs as root or as the current user on any port, reads the ``authorized_keys`` file the test
(or sshnpd) edits, and says on stderr when it listens.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.harness.plane import Proc, free_port, spawn

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def keygen(path: Path, comment: str = "np-test") -> Path:
    """An ed25519 key pair at ``path`` / ``path.pub`` (kept if it exists)."""
    if not path.exists():
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f",
                        str(path)], check=True, timeout=30)
    return path


def sshd_config(path: Path, *, listen: str, port: int, host_key: Path, authorized_keys: Path,
                pid_file: Path, extra: Sequence[str] = ()) -> Path:
    """A config for a test sshd: public keys only, forwarding on, sftp, verbose log."""
    path.write_text("\n".join([
        f"Port {port}", f"ListenAddress {listen}", f"HostKey {host_key}",
        f"AuthorizedKeysFile {authorized_keys}", f"PidFile {pid_file}", "StrictModes no",
        "UsePAM no", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
        "PubkeyAuthentication yes", "PermitRootLogin prohibit-password",
        "AllowTcpForwarding yes", "Subsystem sftp internal-sftp", "LogLevel VERBOSE",
        "MaxSessions 64", "MaxStartups 100:30:200", *extra, ""]))
    return path


def start_sshd(directory: Path, *, port: int, authorized_keys: Path, listen: str = "127.0.0.1",
               host_key: Path | None = None, spawner: Callable[[list[str]], Proc] = spawn,
               timeout: float = 15) -> tuple[Proc, Path]:
    """sshd with its config, pid file (and a fresh host key unless ``host_key``) in
    ``directory``; returns once it listens. ``spawner`` runs the argv (e.g. in a namespace).
    Returns (process, host key)."""
    directory.mkdir(parents=True, exist_ok=True)
    key = host_key or keygen(directory / "ssh_host_ed25519_key", directory.name)
    cfg = sshd_config(directory / "sshd_config", listen=listen, port=port, host_key=key,
                      authorized_keys=authorized_keys, pid_file=directory / "sshd.pid")
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation dir
    proc = spawner([SSHD, "-D", "-e", "-f", str(cfg)])
    proc.wait_for(rf"Server listening on {re.escape(listen)} port {port}", timeout=timeout)
    return proc, key


@dataclass
class LoopbackSshd:
    """An sshd on a free port of 127.0.0.1 (as whoever runs the tests) and the client key it
    accepts: what the loopback tests put behind sshnpd."""

    proc: Proc
    port: int
    identity: Path  # the client's private key
    authorized_keys: Path
    host_pub: Path  # the sshd's public host key (what sshnpd pins)


def loopback_sshd(base: Path, home: Path) -> LoopbackSshd:
    """Client key ``home/id_ed25519``, authorized in ``base/authorized_keys`` (0600), and an
    sshd with its files under ``base/sshd``."""
    identity = keygen(home / "id_ed25519")
    authorized = base / "authorized_keys"
    authorized.write_text(Path(f"{identity}.pub").read_text())
    authorized.chmod(0o600)
    port = free_port()
    proc, key = start_sshd(base / "sshd", port=port, authorized_keys=authorized)
    return LoopbackSshd(proc, port, identity, authorized, Path(f"{key}.pub"))
