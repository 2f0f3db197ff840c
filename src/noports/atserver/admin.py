"""Python API to manage which atSigns an atserver state directory hosts.

Why a separate API over the same SQLite file: onboarding tools add an atSign while the server
runs; the server polls the `hosted` table (every ~0.5 s) and starts a TLS listener for new
rows, so no signal or restart is needed. The CRAM secret is written straight into the
atSign's keystore (`privatekey:at_secret`), in the same transaction as the hosted row.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from noports.atprotocol.atsign import InvalidAtSign
from noports.atprotocol.atsign import normalize_atsign as _normalize_atsign
from noports.cliargs import pid_alive

from .store import Store, db_path


class AdminError(ValueError):
    """Bad input to an admin call (message is one line, safe to show)."""


def normalize_atsign(atsign: str) -> str:
    """`Alice`, `@alice` → `@alice` (the one atSign rule); reject what cannot be one."""
    try:
        return _normalize_atsign(atsign)
    except InvalidAtSign as exc:
        raise AdminError(str(exc)) from None


def add_atsign(state_dir: str | os.PathLike[str], atsign: str, cram_secret: str,
               port: int = 0) -> None:
    """Host `atsign` with this CRAM secret; port 0 = let the server pick one (then persisted)."""
    at = normalize_atsign(atsign)
    if not cram_secret or any(c.isspace() for c in cram_secret):
        raise AdminError("CRAM secret must be non-empty and contain no whitespace")
    if not 0 <= int(port) <= 65535:
        raise AdminError(f"port out of range: {port}")
    store = Store.open_state_dir(state_dir)
    try:
        store.add_hosted(at, int(port), cram_secret)
    finally:
        store.close()


def list_atsigns(state_dir: str | os.PathLike[str]) -> dict[str, int]:
    """atSign → port (0 until a server has bound an OS-chosen port)."""
    if not db_path(state_dir).exists():
        return {}
    store = Store.open_state_dir(state_dir)
    try:
        return {a: h.port for a, h in sorted(store.hosted().items())}
    finally:
        store.close()


def remove_atsign(state_dir: str | os.PathLike[str], atsign: str, purge: bool = True) -> bool:
    """Stop hosting `atsign` (a running server closes its port within ~0.5 s)."""
    at = normalize_atsign(atsign)
    if not db_path(state_dir).exists():
        return False
    store = Store.open_state_dir(state_dir)
    try:
        return store.remove_hosted(at, purge=purge)
    finally:
        store.close()


def wait_for_port(state_dir: str | os.PathLike[str], atsign: str, timeout: float = 30.0) -> int:
    """Block until a running server listens for `atsign`; return its port (TimeoutError else)."""
    at = normalize_atsign(atsign)
    deadline = time.monotonic() + timeout
    path = db_path(state_dir)
    while True:
        if path.exists():
            store = Store(Path(path))
            try:
                row = store.hosted().get(at)
            finally:
                store.close()
            if row is not None and row.listening and row.port and pid_alive(row.pid):
                return row.port
        if time.monotonic() >= deadline:
            raise TimeoutError(f"no running atserver is listening for {at} in {state_dir}")
        time.sleep(0.1)
