"""Twin keys: a separate AES-256-CTR key and IV per direction for official-format sessions.

Why: the official cipher (docs/reference/noports-protocol.md#session-cipher) uses one key and
IV both ways, so the two directions share a keystream. Today's official NoPorts (noports_core
6.x) lets the client offer ``"twinKeys": true`` in its request; a daemon that honours it makes
a second key and IV and answers with ``aesKeyC2D``/``ivC2D`` (instead of ``sessionAESKey``/
``sessionIV``) plus ``aesKeyD2C``/``ivD2C``, each RSA-encrypted for the client's ephemeral
key like the single key. The client encrypts with C2D and decrypts with D2C; the daemon the
reverse (srv's ``RV_AES_C2D``/``RV_IV_C2D`` and ``RV_AES_D2C``/``RV_IV_D2C``). A peer that
does not offer (or a daemon that does not answer) keeps the single key for both directions.
Decision 0025 records the sources. Our AEAD cipher already derives a key per direction, so
this only changes the AES-CTR path.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

OFFER = "twinKeys"
C2D_KEY, C2D_IV = "aesKeyC2D", "ivC2D"
D2C_KEY, D2C_IV = "aesKeyD2C", "ivD2C"


def offered(request_extra: Mapping[str, Any]) -> bool:
    """The client's request asks for twin keys (only a JSON ``true`` counts)."""
    return request_extra.get(OFFER) is True


def response_fields(c2d_key_ct: str, c2d_iv_ct: str, d2c_key_ct: str,
                    d2c_iv_ct: str) -> dict[str, str]:
    """The twin-key fields of a session response (encrypted values), official names."""
    return {C2D_KEY: c2d_key_ct, C2D_IV: c2d_iv_ct, D2C_KEY: d2c_key_ct, D2C_IV: d2c_iv_ct}


def response_secrets(session_aes_key: str | None, session_iv: str | None,
                     extra: Mapping[str, Any]
                     ) -> tuple[str | None, str | None, str | None, str | None]:
    """(C2D key, C2D IV, D2C key, D2C IV) ciphertexts of a response, as the official client
    reads them: ``sessionAESKey ?? aesKeyC2D``; D2C only when both its fields are strings."""
    def s(name: str) -> str | None:
        v = extra.get(name)
        return v if isinstance(v, str) and v else None

    key = session_aes_key or s(C2D_KEY)
    iv = session_iv or s(C2D_IV)
    d2c_key, d2c_iv = s(D2C_KEY), s(D2C_IV)
    if d2c_key is None or d2c_iv is None:
        d2c_key = d2c_iv = None
    return key, iv, d2c_key, d2c_iv


def ctr_directions(c2d: tuple[bytes, bytes], d2c: tuple[bytes, bytes] | None, *,
                   is_client: bool) -> tuple[tuple[bytes, bytes], tuple[bytes, bytes]]:
    """((key, iv) to encrypt with, (key, iv) to decrypt with) for one end of the session.
    Without ``d2c`` both directions use ``c2d`` (the single-key behaviour)."""
    other = c2d if d2c is None else d2c
    return (c2d, other) if is_client else (other, c2d)


__all__ = ["C2D_IV", "C2D_KEY", "D2C_IV", "D2C_KEY", "OFFER", "ctr_directions", "offered",
           "response_fields", "response_secrets"]
