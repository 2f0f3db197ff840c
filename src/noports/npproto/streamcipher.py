"""Data-plane ciphers for the relayed byte stream.

``CtrStream`` is the official NoPorts v5 cipher (docs/reference/noports-protocol.md#session-cipher), replicated for compatibility:
AES-256-CTR, 32-byte key, the 16-byte IV is the initial counter block, the whole block is
incremented big-endian, no MAC, no framing, and both directions use the same key and IV.
That last point reuses keystream across directions and CTR has no integrity at all, so when
both ends are ours we negotiate ``AeadStream`` instead (docs/decisions/0004-session-cipher.md):
ChaCha20-Poly1305 frames with per-direction HKDF keys and counter nonces.

Both are sans-IO: feed bytes in whatever chunks the socket gives, get bytes out.
"""

from __future__ import annotations

import base64
import struct
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import IntegrityError, ProtocolError
from .messages import CIPHER_AES_CTR, CIPHER_CHACHA20_POLY1305

KEY_LEN = 32
IV_LEN = 16


def _check_key_iv(key: bytes, iv: bytes) -> None:
    if len(key) != KEY_LEN:
        raise ProtocolError(f"session key must be {KEY_LEN} bytes, got {len(key)}")
    if len(iv) != IV_LEN:
        raise ProtocolError(f"session IV must be {IV_LEN} bytes, got {len(iv)}")


def decode_session_secrets(key_b64: str, iv_b64: str) -> tuple[bytes, bytes]:
    """``RV_AES``/``RV_IV`` (or decrypted sessionAESKey/sessionIV) base64 -> checked bytes."""
    try:
        key, iv = base64.b64decode(key_b64, validate=True), base64.b64decode(iv_b64, validate=True)
    except (ValueError, TypeError) as exc:
        raise ProtocolError(f"session key/IV is not valid base64: {exc}") from exc
    _check_key_iv(key, iv)
    return key, iv


# --- official AES-256-CTR ----------------------------------------------------------------------

class CtrStream:
    """One direction of the official cipher; encrypt and decrypt are the same operation."""

    def __init__(self, key: bytes, iv: bytes) -> None:
        _check_key_iv(key, iv)
        # OpenSSL's CTR increments the full 128-bit block big-endian, like Dart and mbedTLS.
        self._ctx = Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor()

    def process(self, data: bytes) -> bytes:
        """Transform the next ``data`` bytes; the keystream continues across calls."""
        return self._ctx.update(data) if data else b""


# --- our AEAD framing --------------------------------------------------------------------------

MAX_FRAME_PLAINTEXT = 16 * 1024
TAG_LEN = 16
_HEADER = struct.Struct(">BH")  # frame type, ciphertext length (incl. tag)
_TYPE_DATA = 0
_TYPE_END = 1
_HKDF_INFO = b"noports np-aead v1 "
LABEL_CLIENT_TO_DAEMON = b"client->daemon"
LABEL_DAEMON_TO_CLIENT = b"daemon->client"


def derive_direction_key(key: bytes, iv: bytes, label: bytes) -> bytes:
    """HKDF-SHA256(ikm=session key, salt=IV, info=version+direction) -> 32-byte key."""
    _check_key_iv(key, iv)
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=iv,
                info=_HKDF_INFO + label).derive(key)


def _nonce(counter: int) -> bytes:
    if counter >= 2**64:
        raise IntegrityError("frame counter exhausted; start a new session")
    return b"\x00\x00\x00\x00" + counter.to_bytes(8, "big")


class AeadEncoder:
    """Plaintext -> frames ``type(1) | len(2) | ChaCha20-Poly1305(ct+tag)``, header as AAD."""

    def __init__(self, direction_key: bytes) -> None:
        self._aead = ChaCha20Poly1305(direction_key)
        self._counter = 0
        self._closed = False

    def _frame(self, ftype: int, chunk: bytes) -> bytes:
        header = _HEADER.pack(ftype, len(chunk) + TAG_LEN)
        ct = self._aead.encrypt(_nonce(self._counter), chunk, header)
        self._counter += 1
        return header + ct

    def encode(self, data: bytes) -> bytes:
        if self._closed:
            raise ProtocolError("stream already closed")
        view = memoryview(data)
        return b"".join(self._frame(_TYPE_DATA, bytes(view[i:i + MAX_FRAME_PLAINTEXT]))
                        for i in range(0, len(view), MAX_FRAME_PLAINTEXT))

    def close(self) -> bytes:
        """The authenticated end-of-stream frame; lets the peer tell EOF from truncation."""
        if self._closed:
            return b""
        self._closed = True
        return self._frame(_TYPE_END, b"")


class AeadDecoder:
    """Frames in arbitrary chunks -> plaintext; any tamper/reorder/truncation -> IntegrityError."""

    def __init__(self, direction_key: bytes) -> None:
        self._aead = ChaCha20Poly1305(direction_key)
        self._counter = 0
        self._buf = bytearray()
        self._ended = False
        self._failed = False

    @property
    def ended(self) -> bool:
        return self._ended

    def _fail(self, msg: str) -> IntegrityError:
        self._failed = True
        return IntegrityError(msg)

    def decode(self, data: bytes) -> bytes:
        if self._failed:
            raise IntegrityError("stream already failed integrity checks")
        if self._ended:
            if data:
                raise self._fail("data after the end-of-stream frame")
            return b""
        self._buf += data
        out = bytearray()
        while len(self._buf) >= _HEADER.size:
            ftype, length = _HEADER.unpack_from(self._buf)
            if ftype not in (_TYPE_DATA, _TYPE_END) or not (
                    TAG_LEN <= length <= MAX_FRAME_PLAINTEXT + TAG_LEN):
                raise self._fail(f"bad frame header (type {ftype}, length {length})")
            end = _HEADER.size + length
            if len(self._buf) < end:
                break
            header = bytes(self._buf[:_HEADER.size])
            try:
                pt = self._aead.decrypt(_nonce(self._counter), bytes(self._buf[_HEADER.size:end]),
                                        header)
            except InvalidTag:
                raise self._fail(f"frame {self._counter} failed authentication "
                                 "(tampered, reordered or wrong key)") from None
            self._counter += 1
            del self._buf[:end]
            if ftype == _TYPE_END:
                if pt or self._buf:
                    raise self._fail("data after the end-of-stream frame")
                self._ended = True
                break
            out += pt
        return bytes(out)

    def finish(self) -> None:
        """Call at transport EOF: raises IntegrityError unless the end frame arrived."""
        if not self._ended:
            raise self._fail("stream truncated: connection closed before the end-of-stream frame")


class AeadStream:
    """Both directions of one endpoint; the client's send key is the daemon's receive key."""

    def __init__(self, key: bytes, iv: bytes, *, is_client: bool) -> None:
        c2d = derive_direction_key(key, iv, LABEL_CLIENT_TO_DAEMON)
        d2c = derive_direction_key(key, iv, LABEL_DAEMON_TO_CLIENT)
        self._enc = AeadEncoder(c2d if is_client else d2c)
        self._dec = AeadDecoder(d2c if is_client else c2d)

    @property
    def ended(self) -> bool:
        """True once the peer's authenticated end-of-stream frame arrived."""
        return self._dec.ended

    def encrypt(self, data: bytes) -> bytes:
        return self._enc.encode(data)

    def decrypt(self, data: bytes) -> bytes:
        return self._dec.decode(data)

    def close(self) -> bytes:
        return self._enc.close()

    def finish(self) -> None:
        self._dec.finish()


# --- one interface for the pump ----------------------------------------------------------------

class SessionCipher(Protocol):
    """What a byte pump needs: encrypt outgoing, decrypt incoming, end-of-stream handling."""

    def encrypt(self, data: bytes) -> bytes: ...
    def decrypt(self, data: bytes) -> bytes: ...
    def close(self) -> bytes: ...
    def finish(self) -> None: ...


class CtrDuplex:
    """The official two-way setup: one CtrStream per direction, same key and IV for both
    unless twin keys give the incoming direction its own (``in_key``/``in_iv``)."""

    def __init__(self, key: bytes, iv: bytes, in_key: bytes | None = None,
                 in_iv: bytes | None = None) -> None:
        self._out = CtrStream(key, iv)
        self._in = CtrStream(key if in_key is None else in_key, iv if in_iv is None else in_iv)

    def encrypt(self, data: bytes) -> bytes:
        return self._out.process(data)

    def decrypt(self, data: bytes) -> bytes:
        return self._in.process(data)

    def close(self) -> bytes:
        return b""  # no end marker in the official protocol

    def finish(self) -> None:
        return None  # CTR cannot detect truncation


def new_session_cipher(cipher_id: str, key: bytes, iv: bytes, *, is_client: bool,
                       d2c: tuple[bytes, bytes] | None = None) -> SessionCipher:
    """Build the negotiated cipher (``npCipher`` of M5; absent = :data:`CIPHER_AES_CTR`).

    ``key``/``iv`` are the client-to-daemon secrets; ``d2c`` the daemon-to-client ones when
    twin keys were agreed (AES-CTR only: the AEAD cipher derives its own per direction)."""
    if cipher_id == CIPHER_AES_CTR:
        from .twinkeys import ctr_directions
        (ok, oiv), (ik, iiv) = ctr_directions((key, iv), d2c, is_client=is_client)
        return CtrDuplex(ok, oiv, ik, iiv)
    if cipher_id == CIPHER_CHACHA20_POLY1305:
        return AeadStream(key, iv, is_client=is_client)
    raise ProtocolError(f"unknown session cipher {cipher_id!r}")


SUPPORTED_CIPHERS = (CIPHER_CHACHA20_POLY1305, CIPHER_AES_CTR)
