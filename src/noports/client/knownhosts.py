"""known_hosts entries for the pinned device host keys (from the signed session response).

Why our own writer: the host keys arrive inside the device's signed response, so OpenSSH can
check them with ``StrictHostKeyChecking=yes`` if we write them under a stable
``HostKeyAlias`` (the device identity, not the random local port). Many Ansible forks may
update one file at once, so updates take a short ``flock`` on a side file, write a uniquely
named temp file in the same directory and ``os.replace`` it: readers see the old or the new
file, never half of one, and the lock is held for milliseconds only.

Why a rotation notice: a device whose sshd host key was rotated properly sends the new key in
its signed response, and the pin is replaced without any ssh prompt. That is correct, but a
silent change hides a rotation nobody planned (or a compromised daemon): the caller gets a
:class:`PinChange` naming the old and new SHA256 fingerprints (``ssh-keygen -l`` format) and
prints it as a warning.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import hashlib
import os
import re
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
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


def fingerprint(key_b64: str) -> str:
    """OpenSSH's ``SHA256:<unpadded base64 of sha256(blob)>`` (what ``ssh-keygen -l`` prints)."""
    try:
        blob = base64.b64decode(key_b64, validate=True)
    except (binascii.Error, ValueError):
        return "unreadable key"
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode("ascii").rstrip("=")
    return "SHA256:" + digest


def _described(lines: Iterable[str]) -> list[str]:
    """``<type> SHA256:...`` for known_hosts lines (``<host> <type> <base64>``), sorted."""
    out = []
    for line in lines:
        parts = line.split()
        if len(parts) >= 3:
            out.append(f"{parts[1]} {fingerprint(parts[2])}")
    return sorted(out)


@dataclass(frozen=True)
class PinChange:
    """The pinned host keys of ``alias`` in ``path`` were replaced (``old`` -> ``new``)."""

    alias: str
    path: Path
    old: list[str]  # "<type> SHA256:..." of the keys pinned before
    new: list[str]  # ... and of the keys pinned now

    def message(self) -> str:
        """One line for the user: both fingerprint sets and where the pin lives."""
        return (f"host key of {self.alias} changed: was {', '.join(self.old) or 'none'}; "
                f"now {', '.join(self.new) or 'none'} (new key signed by the device's "
                f"daemon; pin replaced in {self.path})")


def pin_change(old_lines: Iterable[str], alias: str, new_lines: Iterable[str],
               path: Path) -> PinChange | None:
    """A :class:`PinChange` when ``alias`` had keys pinned in ``old_lines`` and ``new_lines``
    pins a different set; None on first use (nothing pinned yet) or when nothing changed."""
    before = _described(ln for ln in old_lines if _host_field_matches(ln, alias))
    after = _described(new_lines)
    if not before or before == after:
        return None
    return PinChange(alias, path, before, after)


def update_known_hosts(path: str | os.PathLike[str], alias: str,
                       host_keys: Iterable[str],
                       on_change: Callable[[PinChange], None] | None = None) -> Path:
    """Replace every entry for ``alias`` in ``path`` with ``host_keys``; keep other lines.

    Creates the file (0600) and its directory (0700) when missing. Safe under concurrency.
    ``on_change`` is called (after the write) when keys already pinned for ``alias`` were
    replaced by different ones: see :class:`PinChange`.
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
        change = pin_change(old, alias, new_lines, target)
    finally:
        os.close(lock_fd)  # releases the flock
    if change is not None and on_change is not None:
        on_change(change)
    return target


def device_known_hosts_path(cache_dir: Path, alias: str) -> Path:
    """Per-device file under ``~/.atsign/sshnp/known_hosts.d/`` (no contention across devices)."""
    return cache_dir / "known_hosts.d" / alias.replace("/", "__")
