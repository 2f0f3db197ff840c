"""Activating an atSign: legacy onboarding exactly as docs/reference/atprotocol.md#onboarding describes it.

Why legacy (CRAM -> install PKAM public key -> PKAM -> publish encryption key -> delete CRAM
secret) and not APKAM enrollment: it is what the Python SDK does, what every atServer
(reference and ours) accepts, and it leaves the PKAM key at `privatekey:at_pkam_publickey`, where
legacy-PKAM clients (the Python SDK) look for it.

Zero trust: only *public* keys and the one-time CRAM secret cross the wire. Keys are written to
disk (when a path is given) *before* the server is changed, so a crash mid-way never leaves an
activated atSign whose keys were lost.
"""

from __future__ import annotations

import dataclasses
import logging
import ssl
from pathlib import Path

from noports.atclient import AtConnection, AtProtocolError, find_secondary
from noports.atclient.connection import DEFAULT_TIMEOUT
from noports.keys.atkeys import AtKeys, generate_atkeys, normalise_atsign, save_atkeys

log = logging.getLogger(__name__)


class ActivationError(RuntimeError):
    """Activation did not complete; the message says at which step."""


def activate(atsign: str, cram_secret: str, root: tuple[str, int],
             ssl_ctx: ssl.SSLContext | None = None, keys: AtKeys | None = None,
             keys_path: str | Path | None = None,
             timeout: float = DEFAULT_TIMEOUT) -> AtKeys:
    """Activate `atsign` on its atServer (found through the directory at `root`).

    Generates keys unless `keys` is given. With `keys_path` the .atKeys file is saved (0600)
    right after the keys exist and before the server is touched, as the official tools do.
    Returns the keys. Raises ActivationError or an AtClientError subclass on failure.
    """
    atsign = normalise_atsign(atsign)
    if keys is None:
        keys = generate_atkeys(atsign)
    elif normalise_atsign(keys.atsign) != atsign:
        keys = dataclasses.replace(keys, atsign=atsign)
    host, port = find_secondary(root[0], int(root[1]), atsign, ssl_ctx, timeout=timeout)
    log.info("%s: atServer is %s:%d", atsign, host, port)
    with AtConnection(host, port, ssl_ctx, timeout=timeout) as conn:
        _step(atsign, "CRAM authentication", conn.authenticate_cram, atsign, cram_secret)
        log.info("%s: CRAM authentication ok", atsign)
        if keys_path is not None:
            save_atkeys(keys, keys_path)
            log.info("%s: keys saved to %s", atsign, keys_path)
        reply = _step(atsign, "installing the PKAM public key", conn.command,
                      f"update:privatekey:at_pkam_publickey {keys.pkam_public}")
        if reply.strip() != "-1":
            log.debug("%s: PKAM key update answered %r (reference answers -1)", atsign, reply)
        _step(atsign, "PKAM authentication with the new keys", conn.authenticate_pkam, atsign,
              keys.pkam_private)
        log.info("%s: PKAM authentication ok", atsign)
        _step(atsign, "publishing the encryption public key", conn.command,
              f"update:public:publickey{atsign} {keys.encrypt_public}")
        _step(atsign, "deleting the CRAM secret", conn.command, "delete:privatekey:at_secret")
        log.info("%s: activated; CRAM secret deleted", atsign)
    return keys


def import_atkeys(keys: AtKeys, cram_secret: str, root: tuple[str, int],
                  ssl_ctx: ssl.SSLContext | None = None, atsign: str | None = None,
                  timeout: float = DEFAULT_TIMEOUT) -> AtKeys:
    """Register an existing atSign's public keys on a fresh atServer (same flow, given keys).

    Used to bring keys made elsewhere (e.g. official .atKeys files) to our plane: the server is
    provisioned with a one-time CRAM secret, and this installs the file's PKAM and encryption
    public keys. Nothing private is sent.
    """
    return activate(atsign or keys.atsign, cram_secret, root, ssl_ctx, keys=keys,
                    timeout=timeout)


def _step(atsign: str, what: str, fn, *args):  # noqa: ANN001, ANN202 - thin wrapper
    """Run one activation step, re-raising protocol errors with the step's name."""
    try:
        return fn(*args)
    except AtProtocolError as exc:
        hint = ""
        if what == "CRAM authentication" and exc.code in {"AT0015", "AT0401"}:
            hint = " (wrong CRAM secret, or the atSign was already activated)"
        raise ActivationError(f"{atsign}: {what} failed: {exc}{hint}") from None
