"""ESCR relay authentication ("Encrypted Signed Challenge-Response"), sans-IO.

Today's official relay and srv (noports_core ``srv/relay_authenticators.dart``,
``srvd/relay_auth_verifiers.dart``; docs/reference/noports-protocol.md#newer-protocol-versions,
docs/decisions/0025-single-port-relay-and-escr.md) authenticate each socket like this:

1. the relay writes a fresh challenge line: base64 of 32 random bytes, ``\\n``;
2. the connector answers ``<sessionId>:<base64(JSON {"iv": b64, "e": b64})>\\n`` where ``e`` is
   the atProtocol AES (AES-256-CTR over PKCS#7, base64) of ``base64(JSON envelope)`` under the
   session's ``relayAuthAesKey`` and ``iv``; the envelope is
   ``{"p": {"sid", "c", "side": "a"|"b"}, "s": sig, "ha": "sha256", "sa": "rsa2048",
   "sk": "public:_apsk.<enrollment>.a.__e@<atSign>"}`` and ``s`` signs Dart's ``jsonEncode(p)``
   with the key published at ``sk`` (the enrollment's APKAM key);
3. the relay answers ``ok\\n`` and splices, or ``Socket auth failed\\n`` and closes.

Why it matters: the challenge is fresh per socket (a recorded line is useless), the response
is encrypted with a key only the two parties have (a stranger who knows a session id learns
nothing and cannot make the relay fetch anything), and the side is signed, so one port can
carry both sides of many sessions (single-port mode).

Split here: :func:`escr_response` (connector), :func:`open_response` (relay: parse, decrypt,
check session/challenge/side, no key needed) and :func:`verify_claim` (relay: the signature,
once the key named by ``sk`` has been fetched). Nothing raises anything but
:class:`ProtocolError` for bad input.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import dataclass
from typing import Any

from .. import crypto
from .dartjson import dart_json_decode, dart_json_encode
from .errors import ProtocolError

#: bytes the relay reads before the response line must have ended (official maxAuthBufferLength)
MAX_RESPONSE_LINE = 4096
OK = b"ok"
FAILED = b"Socket auth failed"
PER_ENROLLMENT_APPROVED = "a.__e"  # at_commons EnrollmentConstants.perEnrollmentApproved
PRIMARY_ENROLLMENT = "primary"
MODES = ("payload", "escr")


def new_challenge() -> str:
    """What the relay sends: base64 of 32 random bytes (``generateSymmetricKey(aes256)``)."""
    return base64.b64encode(os.urandom(32)).decode("ascii")


def new_relay_auth_key() -> str:
    """The session's ``relayAuthAesKey``: an AES-256 key, base64 (made by the client)."""
    return crypto.generate_aes_key()


def valid_relay_auth_key(key: object) -> bool:
    """True for base64 text of exactly 32 bytes."""
    if not isinstance(key, str) or len(key) > 64:
        return False
    try:
        return len(base64.b64decode(key, validate=True)) == 32
    except (binascii.Error, ValueError):
        return False


def apsk_uri(atsign: str, enrollment_id: str | None = None) -> str:
    """Where an enrollment advertises its signing key (at_client ``apskUri``)."""
    return f"public:_apsk.{enrollment_id or PRIMARY_ENROLLMENT}.{PER_ENROLLMENT_APPROVED}{atsign}"


def apsk_name(enrollment_id: str | None = None) -> str:
    """The key name of :func:`apsk_uri` without ``public:`` and the atSign (for a put)."""
    return f"_apsk.{enrollment_id or PRIMARY_ENROLLMENT}.{PER_ENROLLMENT_APPROVED}"


# --- connector side ------------------------------------------------------------------------------

def escr_response(session_id: str, challenge: str, *, side_a: bool, relay_auth_key: str,
                  signing_private_key: str, signing_key_uri: str, iv: bytes | None = None) -> str:
    """The response line (without ``\\n``) a connector writes after reading ``challenge``."""
    p = {"sid": session_id, "c": challenge, "side": "a" if side_a else "b"}
    sig = crypto.sign(signing_private_key, dart_json_encode(p).encode("utf-8"), "sha256")
    envelope = {"p": p, "s": sig, "ha": "sha256", "sa": "rsa2048", "sk": signing_key_uri}
    envelope64 = base64.b64encode(dart_json_encode(envelope).encode("utf-8")).decode("ascii")
    iv = iv if iv is not None else os.urandom(16)
    encrypted = crypto.aes_encrypt(relay_auth_key, envelope64, iv)
    outer = dart_json_encode({"iv": base64.b64encode(iv).decode("ascii"), "e": encrypted})
    return f"{session_id}:{base64.b64encode(outer.encode('utf-8')).decode('ascii')}"


@dataclass(frozen=True)
class EscrAuth:
    """How a connector answers an ESCR relay (single-port mode).

    ``signing_private_key`` is the enrollment's APKAM (pkam) private key; its public half is
    published at ``signing_key_uri`` (``public:_apsk.<enrollment>.a.__e@<atSign>``).
    """

    session_id: str
    relay_auth_key: str
    side_a: bool
    signing_private_key: str
    signing_key_uri: str

    def __repr__(self) -> str:  # never log keys
        return f"EscrAuth({self.session_id}, side {'a' if self.side_a else 'b'})"

    def respond(self, challenge: str) -> bytes:
        """The response line, ``\\n`` included, for the relay's ``challenge``."""
        return escr_response(
            self.session_id, challenge, side_a=self.side_a, relay_auth_key=self.relay_auth_key,
            signing_private_key=self.signing_private_key,
            signing_key_uri=self.signing_key_uri).encode("ascii") + b"\n"


def escr_auth_for(keys: Any, session_id: str, relay_auth_key: str, *,
                  side_a: bool) -> EscrAuth:
    """The ESCR answers of the holder of ``keys`` (an AtKeys: its APKAM key) for a session."""
    return EscrAuth(session_id, relay_auth_key, side_a, keys.pkam_private,
                    apsk_uri(keys.atsign, keys.enrollment_id))


# --- relay side ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class EscrClaim:
    """A decrypted, well-formed response: who claims to be which side of which session.

    Nothing here is proven until :func:`verify_claim` checks ``signature`` with the key
    published at ``key_uri`` (owned by ``atsign``).
    """

    session_id: str
    side_a: bool
    atsign: str
    key_uri: str
    signed_text: str  # Dart's jsonEncode of the decoded ``p``, what ``s`` must sign
    signature: str
    hashing_algo: str
    signing_algo: str


def split_response(line: bytes) -> tuple[str, str]:
    """``<sid>:<payload64>`` -> (sid, payload64); printable ASCII only, exactly one colon."""
    if len(line) > MAX_RESPONSE_LINE:
        raise ProtocolError(f"response longer than {MAX_RESPONSE_LINE} bytes")
    text = line.strip()
    if any(b < 0x20 or b > 0x7E for b in text):
        raise ProtocolError("response has unprintable bytes")
    parts = text.decode("ascii").split(":")
    if len(parts) != 2 or not parts[0] or not parts[1]:
        raise ProtocolError("expected <sessionId>:<payload>")
    return parts[0], parts[1]


def _b64(text: object, what: str) -> bytes:
    if not isinstance(text, str):
        raise ProtocolError(f"{what} is missing or not a string")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ProtocolError(f"{what} is not base64") from exc


def _object(text: bytes | str, what: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"{what} is not JSON") from exc
    if not isinstance(value, dict):
        raise ProtocolError(f"{what} is not a JSON object")
    return value


def open_response(session_id: str, payload64: str, *, relay_auth_key: str,
                  challenge: str) -> EscrClaim:
    """Decrypt and check a response for a session the relay knows (its key and challenge).

    Checks everything that needs no network: the envelope decrypts under the session's key,
    names this session and this socket's challenge, a side, and a signing key in the
    per-enrollment namespace of some atSign. Raises :class:`ProtocolError` otherwise.
    """
    outer = _object(_b64(payload64, "payload"), "payload")
    iv = _b64(outer.get("iv"), "iv")
    if len(iv) != 16:
        raise ProtocolError("iv is not 16 bytes")
    if not isinstance(outer.get("e"), str):
        raise ProtocolError("no encrypted envelope ('e')")
    try:
        envelope64 = crypto.aes_decrypt(relay_auth_key, outer["e"], iv)
    except crypto.CryptoError as exc:
        raise ProtocolError("envelope does not decrypt with the session's key") from exc
    try:
        envelope = dart_json_decode(_b64(envelope64, "envelope").decode("utf-8"))
    except (ProtocolError, UnicodeDecodeError) as exc:
        raise ProtocolError("decrypted envelope is not JSON") from exc
    if not isinstance(envelope, dict) or not isinstance(envelope.get("p"), dict):
        raise ProtocolError("envelope has no signed payload ('p')")
    p = envelope["p"]
    side = str(p.get("side") or "").lower()
    if side not in ("a", "b"):
        raise ProtocolError("signed payload names no side ('a' or 'b')")
    if p.get("sid") != session_id:
        raise ProtocolError("signed payload names another session")
    if p.get("c") != challenge:
        raise ProtocolError("signed payload answers another challenge")
    for name in ("s", "ha", "sa", "sk"):
        if not isinstance(envelope.get(name), str):
            raise ProtocolError(f"envelope field {name!r} is missing")
    uri = envelope["sk"]
    at = uri.rfind("@")
    if at <= 0 or not uri[:at].endswith("." + PER_ENROLLMENT_APPROVED) \
            or not uri.startswith("public:"):
        raise ProtocolError(f"signing key {uri[:120]!r} is not in the per-enrollment namespace")
    if envelope["sa"] != "rsa2048" or envelope["ha"] not in ("sha256", "sha512"):
        raise ProtocolError(f"unsupported signing {envelope['sa']}/{envelope['ha']}")
    try:
        signed_text = dart_json_encode(p)
    except ProtocolError as exc:
        raise ProtocolError("signed payload cannot be re-encoded") from exc
    return EscrClaim(session_id, side == "a", uri[at:].lower(), uri, signed_text,
                     envelope["s"], envelope["ha"], envelope["sa"])


def key_lookup_name(claim: EscrClaim) -> str:
    """The name to ``plookup`` (``public:`` and ``@atSign`` stripped)."""
    return claim.key_uri[len("public:"):claim.key_uri.rfind("@")]


def apsk_public_keys(value: str) -> list[str]:
    """The RSA public keys an ``_apsk`` record offers: the bare base64 key (one active
    rsa2048 key), or the active rsa2048 entries of the JSON advertisement (a fresh
    challenge is only ever signed with a key in service)."""
    value = value.strip()
    if not value.startswith(("{", "[")):
        return [value] if value else []
    try:
        data = json.loads(value)
    except ValueError:
        return []
    entries = data.get("keys", []) if isinstance(data, dict) else data
    out = []
    for e in entries if isinstance(entries, list) else []:
        if isinstance(e, dict) and e.get("alg") == "rsa2048" and isinstance(e.get("pub"), str) \
                and str(e.get("status", "active")) == "active":
            out.append(e["pub"])
    return out


def verify_claim(claim: EscrClaim, apsk_value: str) -> bool:
    """True iff one of the keys published at ``claim.key_uri`` made ``claim.signature``."""
    return any(crypto.verify(k, claim.signed_text.encode("utf-8"), claim.signature,
                             claim.hashing_algo) for k in apsk_public_keys(apsk_value))
