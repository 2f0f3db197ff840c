"""Pure (socket-free) parts of the asyncio atProtocol client: key names, commands, crypto, parsing.

Why separate from `aio.py`: everything that decides whether another client can read what we
send (and we theirs) lives here, so it can be unit-tested byte for byte against the official
Python SDK (`at_client`) without a server. Conventions (docs/reference/atprotocol.md#notification-verbs, docs/reference/atprotocol.md#cryptographic-primitives, docs/reference/atprotocol.md#client-data-conventions,
docs/reference/atprotocol.md#monitor-line-json, docs/reference/atprotocol.md#commands-the-python-sdk-sends):

* a value shared by @alice with @bob is AES-256-CTR(+PKCS#7) under one AES key per (sender,
  recipient) pair, with a fresh random 16-byte IV sent as metadata ``ivNonce``;
* the sender keeps that AES key RSA-encrypted for itself as ``shared_key.bob@alice`` and for the
  recipient as ``@bob:shared_key@alice`` (what ``lookup:shared_key@alice`` returns to @bob);
* metadata fragments follow the at_commons ``VerbSyntax`` order (ttl, ttb, ttr, ccd,
  dataSignature, isBinary, isEncrypted, ..., ivNonce) because the server regexes are ordered.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric import padding as asym_padding
from cryptography.hazmat.primitives.asymmetric import rsa

from noports import crypto
from noports.atprotocol.atsign import InvalidAtSign, normalize_atsign
from noports.atprotocol.metadata import update_fragment
from noports.atprotocol.wire import strip_prompt

# How long a recipient's server may cache the shared key before re-fetching (SDK: 24 h).
SHARED_KEY_TTR_MS = 24 * 60 * 60 * 1000
STATS_NOTIFICATION_ID = "-1"

_KEY_NAME = re.compile(r"^[^:@\s]+$")


class E2EError(ValueError):
    """An argument cannot be expressed on the wire (bad key name, newline in a value, ...)."""


# --- names ------------------------------------------------------------------------------------

def fix_atsign(atsign: str) -> str:
    """'Bob' / '@bob ' -> '@bob': the one atSign rule (:mod:`noports.atprotocol.atsign`)."""
    try:
        return normalize_atsign(atsign)
    except InvalidAtSign as exc:
        raise E2EError(str(exc)) from None


def full_key_name(name: str, namespace: str | None = None) -> str:
    """'request' + 'sshnp' -> 'request.sshnp' (the SDK's fully qualified name, no atSign)."""
    name = name or ""
    if namespace:
        name = f"{name}.{namespace.strip().lstrip('.')}"
    if not _KEY_NAME.fullmatch(name):
        raise E2EError(f"not a valid key name (no ':', '@' or whitespace): {name!r}")
    return name


def shared_key_self_name(me: str, other: str) -> str:
    """Our own RSA-wrapped copy of the AES key we share with `other`: ``shared_key.bob@alice``."""
    return f"shared_key.{fix_atsign(other)[1:]}{fix_atsign(me)}"


def shared_key_for_other_name(me: str, other: str) -> str:
    """The copy `other` reads (wrapped with their public key): ``@bob:shared_key@alice``."""
    return f"{fix_atsign(other)}:shared_key{fix_atsign(me)}"


def public_key_str(name: str, me: str, namespace: str | None = None) -> str:
    return f"public:{full_key_name(name, namespace)}{fix_atsign(me)}"


def self_key_str(name: str, me: str, namespace: str | None = None) -> str:
    return f"{full_key_name(name, namespace)}{fix_atsign(me)}"


def shared_key_str(name: str, shared_with: str, shared_by: str,
                   namespace: str | None = None) -> str:
    return f"{fix_atsign(shared_with)}:{full_key_name(name, namespace)}{fix_atsign(shared_by)}"


# --- metadata and commands --------------------------------------------------------------------

def metadata_fragment(*, ttl_ms: int | None = None, ttb_ms: int | None = None,
                      ttr_ms: int | None = None, ccd: bool | None = None,
                      data_signature: str | None = None, is_encrypted: bool | None = None,
                      iv_nonce: str | None = None) -> str:
    """``:ttl:..:ttr:..:isEncrypted:true:ivNonce:..`` in VerbSyntax order ('' when empty)."""
    return update_fragment({"ttl": ttl_ms, "ttb": ttb_ms, "ttr": ttr_ms, "ccd": ccd,
                            "dataSignature": data_signature, "isEncrypted": is_encrypted,
                            "ivNonce": iv_nonce})


def _one_line(value: str, what: str) -> str:
    if "\n" in value or "\r" in value:
        raise E2EError(f"{what} cannot contain newlines (atProtocol commands are one line)")
    return value


def update_command(atkey: str, value: str, fragment: str = "") -> str:
    """``update<fragment>:<atKey> <value>`` — the SDK's UpdateVerbBuilder layout."""
    return f"update{fragment}:{atkey} {_one_line(value, 'a value')}"


def notify_command(*, notification_id: str, to: str, key: str, me: str, value: str,
                   iv_nonce: str | None, ttln_ms: int | None = 60_000,
                   ttl_ms: int | None = None, is_encrypted: bool = True,
                   operation: str = "update") -> str:
    """``notify:id:<id>:update:messageType:key:ttln:..:[ttl:..:]isEncrypted:true:ivNonce:..:@to:key@me:<v>``.

    Field order is that of the server's notify regex (ttln before the metadata block), which is
    also what Dart's NotifyVerbBuilder emits; the SDK emits a subset of it.
    """
    if operation not in ("update", "delete"):
        raise E2EError(f"operation must be update or delete, not {operation!r}")
    if not re.fullmatch(r"[\w\-]+", notification_id):
        raise E2EError(f"notification id must be [A-Za-z0-9_-]+, not {notification_id!r}")
    cmd = f"notify:id:{notification_id}:{operation}:messageType:key"
    if ttln_ms is not None:
        cmd += f":ttln:{int(ttln_ms)}"
    cmd += metadata_fragment(ttl_ms=ttl_ms, is_encrypted=is_encrypted,
                             iv_nonce=iv_nonce if is_encrypted else None)
    cmd += f":{fix_atsign(to)}:{full_key_name(key)}{fix_atsign(me)}"
    if value is not None and operation == "update":
        cmd += ":" + _one_line(value, "a notification value")
    return cmd


# --- crypto -----------------------------------------------------------------------------------

def encrypt_value(aes_key_b64: str, plaintext: str) -> tuple[str, str]:
    """Encrypt under a fresh random IV: ``(ciphertext_b64, iv_nonce_b64)``.

    A fresh IV per value is mandatory: CTR mode with a reused (key, IV) leaks the XOR of the
    plaintexts, and one AES key serves every message between two atSigns.
    """
    iv = crypto.generate_iv()
    return crypto.aes_encrypt(aes_key_b64, plaintext, iv), iv


def decrypt_value(aes_key_b64: str, ciphertext_b64: str, iv_nonce_b64: str | None) -> str:
    """Inverse of encrypt_value; no ivNonce means the legacy all-zero IV (older writers)."""
    return crypto.aes_decrypt(aes_key_b64, ciphertext_b64, iv_nonce_b64 or None)


# Parsing a PKCS#8 RSA key with full validation costs ~35 ms (CPython + OpenSSL 3): more than
# the whole connect on a LAN. Our own private keys come from our own .atKeys file, so they are
# loaded once per process, without the (pointless for trusted keys) validation, and reused.


def _private_key(private_b64: str) -> rsa.RSAPrivateKey:
    return crypto.load_private_key(private_b64)  # parsed once per process, see crypto


def sign(private_b64: str, message: str) -> str:
    """RSASSA-PKCS1-v1_5/SHA-256, base64 (PKAM, dataSignature): ``crypto.sign`` itself."""
    return crypto.sign(private_b64, message)


def rsa_unwrap(private_b64: str, wrapped_b64: str) -> str:
    """RSA PKCS#1 v1.5 decrypt of a wrapped shared key (``shared_key`` records)."""
    try:
        out = _private_key(private_b64).decrypt(crypto.unb64(wrapped_b64.strip()),
                                                asym_padding.PKCS1v15())
        return out.decode("utf-8")
    except ValueError as exc:
        raise crypto.CryptoError(f"RSA decryption failed: {exc}") from None


def new_uuid() -> str:
    """A random (version 4) UUID string, without importing `uuid` (start-up time)."""
    b = bytearray(os.urandom(16))
    b[6] = (b[6] & 0x0F) | 0x40
    b[8] = (b[8] & 0x3F) | 0x80
    h = b.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def new_shared_key(my_public_b64: str, their_public_b64: str) -> tuple[str, str, str]:
    """A fresh AES key and its two RSA-wrapped copies: ``(aes_key, for_me, for_them)``."""
    aes = crypto.generate_aes_key()
    return aes, crypto.rsa_encrypt(my_public_b64, aes), crypto.rsa_encrypt(their_public_b64, aes)


def parse_lookup_all(text: str) -> tuple[str | None, dict[str, Any]]:
    """``llookup:all``/``lookup:all`` reply JSON -> ``(data, metaData)``."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise E2EError(f"lookup:all reply is not JSON: {exc}") from None
    except RecursionError:
        raise E2EError("lookup:all reply is JSON nested too deeply") from None
    if not isinstance(obj, dict):
        raise E2EError("lookup:all reply is not a JSON object")
    meta = obj.get("metaData") or obj.get("metadata") or {}
    data = obj.get("data")
    return (None if data is None else str(data)), (meta if isinstance(meta, dict) else {})


# --- monitor lines ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Notification:
    """One notification as a NoPorts daemon needs it.

    `value` is the plaintext (decrypted when it was encrypted) or None (delete, text message,
    or it could not be decrypted, in which case `error` says why); `raw_value` is what the
    server sent. `metadata` is the monitor line's metadata object as received.
    """

    id: str
    from_atsign: str
    to_atsign: str
    key: str
    value: str | None
    epoch_millis: int
    operation: str = "update"
    is_encrypted: bool = False
    message_type: str = "key"
    metadata: dict[str, Any] = field(default_factory=dict)
    raw_value: str | None = field(default=None, repr=False)
    error: str | None = None

    @property
    def is_stats(self) -> bool:
        return self.id == STATS_NOTIFICATION_ID

    @property
    def iv_nonce(self) -> str | None:
        iv = self.metadata.get("ivNonce") if self.metadata else None
        return iv if isinstance(iv, str) and iv and iv != "null" else None

    def __repr__(self) -> str:  # never leak values into logs
        return (f"Notification(id={self.id!r}, from={self.from_atsign!r}, to={self.to_atsign!r}, "
                f"key={self.key!r}, op={self.operation!r}, epoch={self.epoch_millis})")


def parse_notification(obj: dict[str, Any]) -> Notification:
    """Monitor JSON (docs/reference/atprotocol.md#monitor-line-json) -> Notification with `value` = the raw value if it was not
    encrypted (the caller decrypts encrypted ones)."""
    if not isinstance(obj, dict) or "id" not in obj:
        raise E2EError("notification JSON has no id")
    raw = obj.get("value")
    raw = None if raw is None else str(raw)
    enc = obj.get("isEncrypted")
    is_enc = enc is True or (isinstance(enc, str) and enc.lower() == "true")
    mt = str(obj.get("messageType") or "key")
    mt = mt.rsplit(".", 1)[-1].lower()  # "MessageType.key" -> "key"
    meta = obj.get("metadata")
    try:
        epoch = int(obj.get("epochMillis") or 0)
    except (TypeError, ValueError):
        epoch = 0
    return Notification(
        id=str(obj["id"]), from_atsign=str(obj.get("from") or ""),
        to_atsign=str(obj.get("to") or ""), key=str(obj.get("key") or ""),
        value=None if is_enc else raw, epoch_millis=epoch,
        operation=str(obj.get("operation") or "update").lower(), is_encrypted=is_enc,
        message_type=mt, metadata=meta if isinstance(meta, dict) else {}, raw_value=raw)


@dataclass(frozen=True)
class MonitorLine:
    """One classified line of a monitor connection."""

    kind: str  # "notification" | "heartbeat" | "error" | "data" | "empty" | "other"
    notification: Notification | None = None
    text: str = ""


def parse_monitor_line(line: str) -> MonitorLine:
    """Classify a monitor-connection line, tolerating a prompt glued to its front.

    A reference (Dart) server answers `noop:0` on a monitor connection with `data:ok\\n@alice@`,
    so the next line arrives as `@alice@notification: {...}` (docs/reference/atprotocol.md#python-sdk-quirks).
    """
    line = strip_prompt(line.strip("\r\n"))
    if not line.strip() or re.fullmatch(r"@[^@\s]*@?", line.strip()):
        return MonitorLine("empty")
    if line.startswith("notification:"):
        try:
            obj = json.loads(line[len("notification:"):].strip())
            return MonitorLine("notification", parse_notification(obj))
        except (ValueError, RecursionError):  # E2EError is a ValueError; deep JSON recurses
            return MonitorLine("other", text="unparsable notification")
    if line.startswith("data:ok") or line == "@ok":
        return MonitorLine("heartbeat")
    if line.startswith("error:"):
        return MonitorLine("error", text=line[len("error:"):])
    if line.startswith("data:"):
        return MonitorLine("data", text=line[len("data:"):])
    return MonitorLine("other", text=line[:80])


def is_key_share(n: Notification, me: str) -> bool:
    """`@me:shared_key@other`: the other side (re)created the AES key it shares with us."""
    return n.operation == "update" and n.key.lower().startswith(fix_atsign(me) + ":shared_key@")


def monitor_command(regex: str | None, since_ms: int | None,
                    self_notifications: bool = False) -> str:
    """``monitor[:selfNotifications][:<epochMillis>][ <regex>]`` (replay is strictly after)."""
    cmd = "monitor"
    if self_notifications:
        cmd += ":selfNotifications"
    if since_ms is not None:
        cmd += f":{max(int(since_ms), 0)}"
    if regex:
        cmd += " " + _one_line(regex, "a monitor regex")
    return cmd
