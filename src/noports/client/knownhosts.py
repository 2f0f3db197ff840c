"""known_hosts entries for the pinned device host keys (from the signed session response).

Why our own writer: the host keys arrive inside the device's signed response, so OpenSSH can
check them with ``StrictHostKeyChecking=yes`` if we write them under a stable
``HostKeyAlias`` (the device identity, not the random local port). Many Ansible forks may
update one file at once, so updates take a short ``flock`` on a side file, write a uniquely
named temp file in the same directory and ``os.replace`` it: readers see the old or the new
file, never half of one, and the lock is held for milliseconds only.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path

_SAFE = re.compile(r"[^A-Za-z0-9._+-]")


def host_key_alias(device_atsign: str, device: str) -> str:
    """``<atsign without @>/<device>``, e.g. ``alice_device/pi4``.

    A known_hosts line must not start with ``@`` (that marks ``@cert-authority``/``@revoked``)
    and patterns treat ``*?!,`` specially, so anything outside ``[A-Za-z0-9._+-]`` becomes
    ``_``. Used for HostKeyAlias, the known_hosts entry and (by the Ansible plugin) ControlPath.
    """
    at = device_atsign.strip().lower().lstrip("@")
    return f"{_SAFE.sub('_', at)}/{_SAFE.sub('_', device)}"


def known_hosts_lines(alias: str, host_keys: Iterable[str]) -> list[str]:
    """``<alias> <type> <base64>`` per key (comments dropped: they are the device's text)."""
    out = []
    for hk in host_keys:
        parts = hk.split()
        if len(parts) < 2 or "\n" in hk or "\r" in hk:
            raise ValueError(f"not an OpenSSH public key line: {hk[:60]!r}")
        out.append(f"{alias} {parts[0]} {parts[1]}")
    return out


def _host_field_matches(line: str, alias: str) -> bool:
    head = line.split(None, 1)[0] if line.strip() else ""
    return alias in head.split(",")


def update_known_hosts(path: str | os.PathLike[str], alias: str,
                       host_keys: Iterable[str]) -> Path:
    """Replace every entry for ``alias`` in ``path`` with ``host_keys``; keep other lines.

    Creates the file (0600) and its directory (0700) when missing. Safe under concurrency.
    """
    target = Path(path).expanduser()
    new_lines = known_hosts_lines(alias, host_keys)
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    lock_path = target.with_name(target.name + ".lock")
    lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        try:
            old = target.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            old = []
        kept = [ln for ln in old if not _host_field_matches(ln, alias)]
        if kept + new_lines == old:
            return target  # nothing changed: do not rewrite
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write("\n".join(kept + new_lines) + "\n")
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
    finally:
        os.close(lock_fd)  # releases the flock
    return target


def device_known_hosts_path(cache_dir: Path, alias: str) -> Path:
    """Per-device file under ``~/.atsign/sshnp/known_hosts.d/`` (no contention across devices)."""
    return cache_dir / "known_hosts.d" / alias.replace("/", "__")
