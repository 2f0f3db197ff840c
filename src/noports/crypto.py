"""Cryptographic primitives of the atProtocol, in the exact encodings the official clients use.

Why one module: every part (atServer PKAM checks, .atKeys files, onboarding, server-to-server
signing, end-to-end encrypted notifications) must agree byte for byte with the Dart and Python
SDKs, so the encodings live in one place (docs/reference/atprotocol.md#cryptographic-primitives):

* RSA-2048, e=65537; public keys are base64 DER SubjectPublicKeyInfo, private keys base64 DER
  PKCS#8.
* RSA encryption is PKCS#1 v1.5; signatures are RSASSA-PKCS1-v1_5 with SHA-256 (or SHA-512).
* AES-256 keys are 32 random bytes, base64; the "AES" of the atProtocol is AES-256-CTR with
  PKCS#7 padding applied before CTR, ciphertext base64, IV 16 zero bytes unless an ivNonce is
  given.
* CRAM is sha512_hex(secret + challenge).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import os

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, padding, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric import padding as asym_padding
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

LEGACY_IV = b"\x00" * 16

_HASHES = {"sha256": hashes.SHA256, "sha512": hashes.SHA512}


class CryptoError(ValueError):
    """A key or ciphertext could not be decoded; the message says which."""


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=False)
    except (ValueError, TypeError) as exc:
        raise CryptoError(f"not valid base64: {exc}") from exc


# --- RSA keys ---------------------------------------------------------------------------------

def generate_rsa_keypair() -> tuple[str, str]:
    """Return (public_b64, private_b64) of a fresh RSA-2048 pair in atProtocol encoding."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return public_key_b64(key.public_key()), private_key_b64(key)


def public_key_b64(key: rsa.RSAPublicKey) -> str:
    return b64(key.public_bytes(serialization.Encoding.DER,
                                serialization.PublicFormat.SubjectPublicKeyInfo))


def private_key_b64(key: rsa.RSAPrivateKey) -> str:
    return b64(key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption()))


def load_public_key(b64_der: str):
    """Load a base64 SPKI DER public key (RSA or EC)."""
    try:
        return serialization.load_der_public_key(unb64(b64_der.strip()))
    except (ValueError, TypeError) as exc:
        raise CryptoError(f"not a base64 DER public key: {exc}") from exc


def load_private_key(b64_der: str) -> rsa.RSAPrivateKey:
    """Parse (once per process) one of OUR OWN private keys.

    Why cached and without OpenSSL's RSA consistency check: the check costs ~35 ms per parse
    and held the GIL on every PKAM and envelope signature, which dominated session set-up.
    Private keys only ever come from our own 0600 .atKeys files or were generated here, so
    the check protects against nothing an attacker could reach; .atKeys loading still checks
    that each public key matches its private key.
    """
    return _parse_private_key(b64_der.strip())


@functools.lru_cache(maxsize=64)
def _parse_private_key(b64_der: str) -> rsa.RSAPrivateKey:
    der = unb64(b64_der)
    try:
        try:
            key = serialization.load_der_private_key(der, password=None,
                                                     unsafe_skip_rsa_key_validation=True)
        except TypeError:  # cryptography < 39 (e.g. Debian 12's python3-cryptography 38)
            key = serialization.load_der_private_key(der, password=None)
    except (ValueError, TypeError) as exc:
        raise CryptoError(f"not a base64 DER PKCS#8 private key: {exc}") from exc
    if not isinstance(key, rsa.RSAPrivateKey):
        raise CryptoError("private key is not RSA")
    return key


# --- signatures -------------------------------------------------------------------------------

def sign(private_b64: str, message: str | bytes, hash_name: str = "sha256") -> str:
    """RSASSA-PKCS1-v1_5 signature, base64 (PKAM, pol proofs, dataSignature)."""
    data = message.encode("utf-8") if isinstance(message, str) else message
    sig = load_private_key(private_b64).sign(data, asym_padding.PKCS1v15(), _HASHES[hash_name]())
    return b64(sig)


def verify(public_b64: str, message: str | bytes, signature_b64: str,
           hash_name: str = "sha256", algo: str = "rsa2048") -> bool:
    """Check an atProtocol signature; never raises for bad input, returns False instead."""
    data = message.encode("utf-8") if isinstance(message, str) else message
    try:
        sig = unb64(signature_b64)
        if algo == "ecc_secp256r1":
            return _verify_ecc(public_b64, data, sig)
        key = load_public_key(public_b64)
        if not isinstance(key, rsa.RSAPublicKey):
            return False
        key.verify(sig, data, asym_padding.PKCS1v15(), _HASHES[hash_name]())
        return True
    except (InvalidSignature, CryptoError, ValueError, KeyError, TypeError):
        return False


def _verify_ecc(public_hex_or_b64: str, data: bytes, sig: bytes) -> bool:
    """ECDSA P-256 as at_chops does it: hex public key, signature = ASCII hex of r||s."""
    try:
        raw = bytes.fromhex(public_hex_or_b64)
        key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), raw)
    except ValueError:
        key = load_public_key(public_hex_or_b64)
    rs = bytes.fromhex(sig.decode("ascii"))
    half = len(rs) // 2
    der = encode_dss_signature(int.from_bytes(rs[:half], "big"), int.from_bytes(rs[half:], "big"))
    key.verify(der, data, ec.ECDSA(hashes.SHA256()))
    return True


# --- RSA encryption ---------------------------------------------------------------------------

def rsa_encrypt(public_b64: str, plaintext: str) -> str:
    key = load_public_key(public_b64)
    return b64(key.encrypt(plaintext.encode("utf-8"), asym_padding.PKCS1v15()))


def rsa_decrypt(private_b64: str, ciphertext_b64: str) -> str:
    try:
        out = load_private_key(private_b64).decrypt(unb64(ciphertext_b64), asym_padding.PKCS1v15())
    except ValueError as exc:
        raise CryptoError(f"RSA decryption failed: {exc}") from exc
    return out.decode("utf-8")


# --- AES (atProtocol flavour) -----------------------------------------------------------------

def generate_aes_key() -> str:
    return b64(os.urandom(32))


def generate_iv() -> str:
    return b64(os.urandom(16))


def aes_encrypt(key_b64: str, plaintext: str, iv: bytes | str | None = None) -> str:
    """AES-256-CTR over PKCS#7-padded UTF-8, base64 out (what every SDK calls 'AES')."""
    iv_bytes = _iv(iv)
    padder = padding.PKCS7(128).padder()
    padded = padder.update(plaintext.encode("utf-8")) + padder.finalize()
    enc = Cipher(algorithms.AES(unb64(key_b64)), modes.CTR(iv_bytes)).encryptor()
    return b64(enc.update(padded) + enc.finalize())


def aes_decrypt(key_b64: str, ciphertext_b64: str, iv: bytes | str | None = None) -> str:
    iv_bytes = _iv(iv)
    try:
        dec = Cipher(algorithms.AES(unb64(key_b64)), modes.CTR(iv_bytes)).decryptor()
        padded = dec.update(unb64(ciphertext_b64)) + dec.finalize()
        unpadder = padding.PKCS7(128).unpadder()
        return (unpadder.update(padded) + unpadder.finalize()).decode("utf-8")
    except ValueError as exc:  # bad key length, bad padding, bad UTF-8
        raise CryptoError(f"AES decryption failed (wrong key or corrupt data): {exc}") from exc


def _iv(iv: bytes | str | None) -> bytes:
    if iv is None:
        return LEGACY_IV
    if isinstance(iv, str):
        iv = unb64(iv)
    if len(iv) != 16:
        raise CryptoError(f"IV must be 16 bytes, got {len(iv)}")
    return iv


# --- CRAM -------------------------------------------------------------------------------------

def cram_digest(secret: str, challenge: str) -> str:
    return hashlib.sha512((secret + challenge).encode("utf-8")).hexdigest()


def cram_matches(secret: str, challenge: str, digest: str) -> bool:
    """Constant-time check; any input (even non-ASCII garbage) gives a bool, never raises."""
    expected = cram_digest(secret, challenge).encode("ascii")
    return hmac.compare_digest(expected, digest.strip().lower().encode("utf-8", "replace"))


def generate_cram_secret() -> str:
    """128 hex chars, the shape of the official CRAM secrets."""
    return os.urandom(64).hex()
