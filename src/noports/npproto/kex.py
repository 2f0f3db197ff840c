"""X25519 session key exchange: our addition to the session request and response.

Why: the protocol has the client make a fresh RSA-2048 pair per session for the device to
encrypt the session key with (docs/reference/noports-protocol.md#session-step-by-step, step 2),
~0.1 s of client CPU each, most of the agent's cost per tunnel. An X25519 pair costs ~0.1 ms.
The client adds its per-session X25519 public key in a field official daemons ignore; our
daemon then makes its own per-session X25519 pair, derives a wrapping key with ECDH + HKDF and
seals the session secrets with ChaCha20-Poly1305, answering in fields of its own (and no RSA
ciphertexts). Both sides' keys live for one session, so each session keeps forward secrecy;
both messages are signed envelopes, so neither key can be swapped or stripped on the way
(decision 0029). An official daemon, or ours with ``--test-official-reply``, ignores the
field and answers with RSA as before.

Wire (all values standard base64):

* request: ``"npX25519": <32-byte client public key>`` beside ``clientEphemeralPK``;
* response: ``"npX25519": <32-byte daemon public key>``, ``"npSessionKeys": <sealed>``, with
  ``sessionAESKey``/``sessionIV`` null and no twin-key fields; sealed plaintext is
  ``key(32) || iv(16)`` or, with twin keys, ``|| d2c key(32) || d2c iv(16)``.

Key schedule: ``HKDF-SHA256(ikm = X25519(d, c), salt = client_pk || daemon_pk,
info = INFO || sessionId)`` gives a 32-byte key and a 12-byte nonce (single-use key); the AEAD's
associated data is the session id.

cryptography is imported inside the functions: the daemon's idle footprint and the
connector's start-up import this module without paying for it.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from .errors import ProtocolError

FIELD_PK = "npX25519"  # request: the client's public key; response: the daemon's
FIELD_SEALED = "npSessionKeys"
KEX_X25519 = "x25519"
KEX_RSA = "rsa2048"
PK_LEN = 32
KEY_LEN, IV_LEN = 32, 16
INFO = b"noports-py npSessionKeys v1 "
TAG_LEN = 16


class KexError(ProtocolError):
    """A key exchange field is malformed or does not open; the text says which."""


def _b64(value: object, name: str, size: int | None = None) -> bytes:
    if not isinstance(value, str):
        raise KexError(f"{name} must be a base64 string, got {type(value).__name__}")
    if len(value) > 4096:
        raise KexError(f"{name} is too long ({len(value)} characters)")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise KexError(f"{name} is not valid base64") from None
    if size is not None and len(raw) != size:
        raise KexError(f"{name} must be {size} bytes, got {len(raw)}")
    return raw


def new_client_key() -> tuple[Any, str]:
    """(private key object, base64 public key) for one session's request."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    priv = X25519PrivateKey.generate()
    return priv, base64.b64encode(_raw_public(priv)).decode("ascii")


def _raw_public(priv: Any) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
    return bytes(priv.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))


def offered(request_extra: dict[str, Any]) -> bytes | None:
    """The client's X25519 public key from a request's extra fields; None when absent.
    KexError when present but unusable (the daemon refuses, naming the field)."""
    if FIELD_PK not in request_extra:
        return None
    return _b64(request_extra[FIELD_PK], FIELD_PK, PK_LEN)


def _derive(shared: bytes, client_pk: bytes, daemon_pk: bytes, session_id: str
            ) -> tuple[bytes, bytes]:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF
    okm = HKDF(algorithm=hashes.SHA256(), length=32 + 12, salt=client_pk + daemon_pk,
               info=INFO + session_id.encode("utf-8")).derive(shared)
    return okm[:32], okm[32:]


def seal(client_pk: bytes, session_id: str, secrets: bytes) -> dict[str, str]:
    """Daemon side: the response fields carrying ``secrets`` for this client key.
    KexError if the key is not a usable X25519 point (e.g. a low-order one)."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import (
        X25519PrivateKey,
        X25519PublicKey,
    )
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
    mine = X25519PrivateKey.generate()
    try:
        shared = mine.exchange(X25519PublicKey.from_public_bytes(client_pk))
    except ValueError as exc:
        raise KexError(f"{FIELD_PK} is not a usable X25519 key ({exc})") from None
    daemon_pk = _raw_public(mine)
    key, nonce = _derive(shared, client_pk, daemon_pk, session_id)
    sealed = ChaCha20Poly1305(key).encrypt(nonce, secrets, session_id.encode("utf-8"))
    return {FIELD_PK: base64.b64encode(daemon_pk).decode("ascii"),
            FIELD_SEALED: base64.b64encode(sealed).decode("ascii")}


def in_response(extra: dict[str, Any]) -> bool:
    """Whether a response uses the X25519 exchange (either of its fields is there)."""
    return FIELD_PK in extra or FIELD_SEALED in extra


def open_sealed(client_priv: Any, session_id: str, extra: dict[str, Any]) -> bytes:
    """Client side: the secrets sealed in a response's fields; KexError says what is wrong
    (a field missing or malformed, a key that does not agree, a seal that does not open)."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
    for name in (FIELD_PK, FIELD_SEALED):
        if name not in extra:
            raise KexError(f"the answer has no {name}")
    daemon_pk = _b64(extra[FIELD_PK], FIELD_PK, PK_LEN)
    sealed = _b64(extra[FIELD_SEALED], FIELD_SEALED)
    if len(sealed) not in (KEY_LEN + IV_LEN + TAG_LEN, 2 * (KEY_LEN + IV_LEN) + TAG_LEN):
        raise KexError(f"{FIELD_SEALED} has a wrong length ({len(sealed)} bytes)")
    try:
        shared = client_priv.exchange(X25519PublicKey.from_public_bytes(daemon_pk))
    except ValueError as exc:
        raise KexError(f"the device's {FIELD_PK} is not a usable X25519 key ({exc})") from None
    key, nonce = _derive(shared, _raw_public(client_priv), daemon_pk, session_id)
    try:
        return bytes(ChaCha20Poly1305(key).decrypt(nonce, sealed, session_id.encode("utf-8")))
    except InvalidTag:
        raise KexError(f"{FIELD_SEALED} does not open with this session's key (altered, or "
                       "made for another session)") from None


def pack(key: bytes, iv: bytes, d2c: tuple[bytes, bytes] | None = None) -> bytes:
    """The sealed plaintext: key || iv [|| d2c key || d2c iv]."""
    out = key + iv + (d2c[0] + d2c[1] if d2c is not None else b"")
    if len(key) != KEY_LEN or len(iv) != IV_LEN or len(out) not in (48, 96):
        raise ValueError("session secrets of the wrong length")
    return out


def unpack(secrets: bytes) -> tuple[bytes, bytes, tuple[bytes, bytes] | None]:
    """(key, iv, d2c key and IV or None) from the opened plaintext."""
    n = KEY_LEN + IV_LEN
    if len(secrets) not in (n, 2 * n):
        raise KexError(f"the sealed session secrets have a wrong length ({len(secrets)})")
    d2c = ((secrets[n:n + KEY_LEN], secrets[n + KEY_LEN:]) if len(secrets) == 2 * n
           else None)
    return secrets[:KEY_LEN], secrets[KEY_LEN:n], d2c


__all__ = ["FIELD_PK", "FIELD_SEALED", "KEX_RSA", "KEX_X25519", "KexError", "in_response",
           "new_client_key", "offered", "open_sealed", "pack", "seal", "unpack"]
