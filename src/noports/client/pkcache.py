"""Cached public encryption keys of peers, like the official client (docs/reference/noports-protocol.md#atprotocol-substrate).

Why: verifying the device's signed response needs the device atSign's public key; fetching it
costs a round trip through two atServers. The official client keeps them in
``~/.atsign/sshnp/cached_pks/<atsign without @>``; we use the same place and format (the
base64 SPKI text). A signature that does not verify with the cached key is retried once with
a freshly fetched key (the device may have been re-keyed), see ``flow.py``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)


def _path(cache_dir: Path, atsign: str) -> Path:
    return cache_dir / "cached_pks" / atsign.lower().lstrip("@")


def load_cached_pk(cache_dir: Path, atsign: str) -> str | None:
    try:
        text = _path(cache_dir, atsign).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text or None


def store_cached_pk(cache_dir: Path, atsign: str, public_key_b64: str) -> None:
    """Atomic write (unique temp + replace): concurrent sshnp runs never see half a key."""
    target = _path(cache_dir, atsign)
    try:
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(prefix=".pk.", dir=target.parent)
        try:
            with os.fdopen(fd, "w", encoding="ascii") as fh:
                fh.write(public_key_b64.strip())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
    except OSError as exc:  # a cache: never fatal
        log.debug("cannot cache the public key of %s: %s", atsign, exc)
