"""Ephemeral SSH key pairs (generated in process) and the sshd host keys we pin.

Why in process: the official daemon runs ``ssh-keygen -a 100`` per session, which costs a
fork/exec plus 100 KDF rounds for a key that lives 15 seconds and is never written to disk by
us. ``cryptography`` makes the same OpenSSH-format key in microseconds.
"""

from __future__ import annotations

import glob
import logging
import os
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from noports.npproto.messages import is_openssh_public_key_line

log = logging.getLogger(__name__)

ALGORITHMS = ("ssh-ed25519", "ssh-rsa")
MAX_HOST_KEY_FILE = 16 * 1024


@dataclass(frozen=True)
class EphemeralKey:
    """One session's key pair: OpenSSH private key text and ``<type> <base64>`` public key."""

    private_openssh: str
    public_line: str

    def __repr__(self) -> str:  # never let the private key reach a log line
        return f"EphemeralKey(public={self.public_line.split(' ')[0]!r})"


def generate_ephemeral_key(algorithm: str = "ssh-ed25519") -> EphemeralKey:
    """A fresh key pair, private half in ``-----BEGIN OPENSSH PRIVATE KEY-----`` format."""
    if algorithm == "ssh-ed25519":
        key: ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey = ed25519.Ed25519PrivateKey.generate()
    elif algorithm == "ssh-rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=4096)
    else:
        raise ValueError(f"unsupported ssh algorithm {algorithm!r} (use {' or '.join(ALGORITHMS)})")
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption()).decode("ascii")
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH).decode("ascii")
    return EphemeralKey(private, public)


def load_host_keys(pattern: str) -> list[str]:
    """``<type> <base64>`` of each sshd host public key matching ``pattern`` (sorted, unique).

    Unreadable or malformed files are skipped with a warning: pinning is our addition, and a
    missing host key must not stop sessions (the client then falls back to its own checks).
    """
    out: list[str] = []
    for path in sorted(glob.glob(os.path.expanduser(pattern))):
        try:
            with open(path, encoding="ascii", errors="replace") as fh:
                text = fh.read(MAX_HOST_KEY_FILE)
        except OSError as exc:
            log.warning("cannot read sshd host key %s: %s", path, exc.strerror or exc)
            continue
        parts = text.strip().split()
        line = " ".join(parts[:2])
        if len(parts) < 2 or not is_openssh_public_key_line(line):
            log.warning("ignoring %s: not an OpenSSH public key", path)
            continue
        if line not in out:
            out.append(line)
    return out
