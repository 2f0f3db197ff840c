"""Official-format `.atKeys` files (docs/reference/atprotocol.md#the-atkeys-file).

Why our own reader/writer instead of the SDK's `KeysUtil`: the SDK prints to stdout, writes
world-readable files, drops the fields newer Dart tooling adds, gives tracebacks on corrupt files
and only knows `~/.atsign/keys`. The file format itself is unchanged, byte for byte:

* a JSON object of strings, written compactly the way Dart's `jsonEncode` does;
* `selfEncryptionKey` in clear, the four RSA keys (base64 SPKI / PKCS#8 strings) encrypted with it
  using the atProtocol "AES" (AES-256-CTR, PKCS#7, zero IV);
* newer files also hold `"<@atsign>": selfEncryptionKey`, `apkamSymmetricKey`, `enrollmentId`.

Files we write load in the Python SDK and the Dart clients, and theirs load here.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from noports import crypto
from noports.atprotocol.atsign import InvalidAtSign, normalize_atsign

KEYS_FILE_SUFFIX = "_key.atKeys"

PKAM_PUBLIC = "aesPkamPublicKey"
PKAM_PRIVATE = "aesPkamPrivateKey"
ENCRYPT_PUBLIC = "aesEncryptPublicKey"
ENCRYPT_PRIVATE = "aesEncryptPrivateKey"
SELF_ENCRYPTION = "selfEncryptionKey"
APKAM_SYMMETRIC = "apkamSymmetricKey"
ENROLLMENT_ID = "enrollmentId"

_ENCRYPTED_FIELDS = (PKAM_PUBLIC, PKAM_PRIVATE, ENCRYPT_PUBLIC, ENCRYPT_PRIVATE)
# Characters that can never be part of an atSign; several would also break file names.


class AtKeysError(ValueError):
    """An .atKeys file (or atSign) is unusable; the message names the file and the problem."""


@dataclass
class AtKeys:
    """The decrypted key material of one atSign (base64 strings, as on the wire)."""

    atsign: str
    pkam_public: str
    pkam_private: str
    encrypt_public: str
    encrypt_private: str
    self_encryption_key: str
    apkam_symmetric_key: str | None = None
    enrollment_id: str | None = None

    def __repr__(self) -> str:  # never let private keys leak into logs or tracebacks
        return f"AtKeys(atsign={self.atsign!r}, enrollment_id={self.enrollment_id!r})"


def normalise_atsign(atsign: str) -> str:
    """'Alice' / ' @alice ' -> '@alice': the one atSign rule (noports.atprotocol.atsign).

    Raises AtKeysError for strings that cannot be an atSign (empty, whitespace, ':', '/', ...),
    which also keeps them safe to use in file names.
    """
    try:
        return normalize_atsign(atsign)
    except InvalidAtSign as exc:
        raise AtKeysError(str(exc)) from None


def keys_file_name(atsign: str) -> str:
    """The file name the SDKs look for: '@alice_key.atKeys'."""
    return normalise_atsign(atsign) + KEYS_FILE_SUFFIX


def default_keys_dir() -> Path:
    """~/.atsign/keys, where the Python SDK (KeysUtil) and the Dart tools look first."""
    return Path(os.path.expanduser("~")) / ".atsign" / "keys"


def default_keys_path(atsign: str) -> Path:
    return default_keys_dir() / keys_file_name(atsign)


def generate_atkeys(atsign: str) -> AtKeys:
    """Fresh PKAM + encryption RSA-2048 pairs and a self-encryption AES-256 key."""
    pkam_pub, pkam_priv = crypto.generate_rsa_keypair()
    enc_pub, enc_priv = crypto.generate_rsa_keypair()
    return AtKeys(atsign=normalise_atsign(atsign), pkam_public=pkam_pub, pkam_private=pkam_priv,
                  encrypt_public=enc_pub, encrypt_private=enc_priv,
                  self_encryption_key=crypto.generate_aes_key())


def atkeys_to_json(keys: AtKeys) -> str:
    """Serialise exactly as Dart's at_onboarding_cli does (field order, compact, raw UTF-8)."""
    selfkey = keys.self_encryption_key
    data: dict[str, str] = {
        PKAM_PUBLIC: crypto.aes_encrypt(selfkey, keys.pkam_public),
        PKAM_PRIVATE: crypto.aes_encrypt(selfkey, keys.pkam_private),
        ENCRYPT_PUBLIC: crypto.aes_encrypt(selfkey, keys.encrypt_public),
        ENCRYPT_PRIVATE: crypto.aes_encrypt(selfkey, keys.encrypt_private),
        SELF_ENCRYPTION: selfkey,
        normalise_atsign(keys.atsign): selfkey,
    }
    if keys.apkam_symmetric_key is not None:
        data[APKAM_SYMMETRIC] = keys.apkam_symmetric_key
    if keys.enrollment_id is not None:
        data[ENROLLMENT_ID] = keys.enrollment_id
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


def save_atkeys(keys: AtKeys, path: str | os.PathLike[str]) -> Path:
    """Write `keys` to `path` atomically with mode 0600 (created 0600, never readable by others).

    The temp file lives in the target directory so the final rename is atomic; a crash leaves
    either the old file or the new one, never a truncated key file.
    """
    target = Path(path).expanduser()
    text = atkeys_to_json(keys)
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".atKeys", dir=target.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return target


def atsign_from_filename(path: str | os.PathLike[str]) -> str | None:
    """'@alice_key.atKeys' -> '@alice'; None when the name does not follow the convention."""
    name = Path(path).name
    if name.startswith("@") and name.endswith(KEYS_FILE_SUFFIX) and len(name) > len(
            KEYS_FILE_SUFFIX) + 1:
        try:
            return normalise_atsign(name[: -len(KEYS_FILE_SUFFIX)])
        except AtKeysError:
            return None
    return None


def load_atkeys(path: str | os.PathLike[str], atsign: str | None = None) -> AtKeys:
    """Read and decrypt an .atKeys file; every failure is an AtKeysError naming the problem.

    The atSign is `atsign` if given, else the file's `"<@atsign>"` field, else its file name.
    """
    p = Path(path).expanduser()
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise AtKeysError(f"{p}: no such file") from None
    except IsADirectoryError:
        raise AtKeysError(f"{p}: is a directory, expected an .atKeys file") from None
    except OSError as exc:
        raise AtKeysError(f"{p}: cannot read: {exc.strerror or exc}") from None
    return parse_atkeys(raw, source=str(p), atsign=atsign or atsign_from_filename(p),
                        atsign_given=atsign is not None)


def parse_atkeys(raw: bytes | str, source: str = "<atKeys>", atsign: str | None = None,
                 atsign_given: bool = False) -> AtKeys:
    """Parse .atKeys content (see load_atkeys); `source` is used in error messages."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        data = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AtKeysError(f"{source}: not an .atKeys file (not valid JSON: {exc})") from None
    if not isinstance(data, dict):
        raise AtKeysError(f"{source}: not an .atKeys file (expected a JSON object)")
    missing = [f for f in (*_ENCRYPTED_FIELDS, SELF_ENCRYPTION) if f not in data]
    if missing:
        hint = ""
        if missing == [PKAM_PRIVATE]:
            hint = " (a SIM/secure-element file: the PKAM private key is not in it)"
        raise AtKeysError(f"{source}: missing field(s) {', '.join(missing)}{hint}")
    for name, value in data.items():
        if not isinstance(value, str):
            raise AtKeysError(f"{source}: field {name!r} must be a string")

    selfkey = data[SELF_ENCRYPTION]
    try:
        key_len = len(crypto.unb64(selfkey))
    except crypto.CryptoError:
        key_len = -1
    if key_len != 32:
        raise AtKeysError(f"{source}: selfEncryptionKey is not a base64 AES-256 key")

    named = [k for k in data if k.startswith("@")]
    from_field = None
    if named:
        try:
            from_field = normalise_atsign(named[0])
        except AtKeysError:
            raise AtKeysError(f"{source}: field {named[0]!r} is not an atSign") from None
    if atsign is not None:
        atsign = normalise_atsign(atsign)
        if from_field and from_field != atsign and not atsign_given:
            raise AtKeysError(f"{source}: file name says {atsign} but the file is for "
                              f"{from_field}; rename it to {from_field}{KEYS_FILE_SUFFIX}")
    else:
        atsign = from_field
    if atsign is None:
        raise AtKeysError(f"{source}: cannot tell which atSign these keys are for; name the "
                          f"file @<atsign>{KEYS_FILE_SUFFIX}")

    plain: dict[str, str] = {}
    for field in _ENCRYPTED_FIELDS:
        try:
            plain[field] = crypto.aes_decrypt(selfkey, data[field])
        except crypto.CryptoError:
            raise AtKeysError(f"{source}: cannot decrypt {field} with selfEncryptionKey "
                              "(wrong key or corrupt file)") from None
    _check_keypair(source, "PKAM", plain[PKAM_PUBLIC], plain[PKAM_PRIVATE])
    _check_keypair(source, "encryption", plain[ENCRYPT_PUBLIC], plain[ENCRYPT_PRIVATE])
    return AtKeys(atsign=atsign, pkam_public=plain[PKAM_PUBLIC], pkam_private=plain[PKAM_PRIVATE],
                  encrypt_public=plain[ENCRYPT_PUBLIC], encrypt_private=plain[ENCRYPT_PRIVATE],
                  self_encryption_key=selfkey, apkam_symmetric_key=data.get(APKAM_SYMMETRIC),
                  enrollment_id=data.get(ENROLLMENT_ID))


def _check_keypair(source: str, what: str, public_b64: str, private_b64: str) -> None:
    """Catch files whose decrypted keys are garbage or mismatched before a server does."""
    try:
        private = crypto.load_private_key(private_b64)
        public = crypto.load_public_key(public_b64)
    except crypto.CryptoError:
        raise AtKeysError(f"{source}: the {what} key pair does not decode (wrong "
                          "selfEncryptionKey or corrupt file)") from None
    if public.public_numbers() != private.public_key().public_numbers():
        raise AtKeysError(f"{source}: the {what} public and private keys do not match")
