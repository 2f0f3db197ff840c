"""APKAM enrollment rules: one-time codes, request validation, state changes, throttling.

Why a module of its own (no sockets, no verbs): these are the security decisions of device
onboarding — who may ask for a key, how long a code lives, how fast codes may be guessed,
which state changes are allowed — and they must be testable without a server. verbs_enroll.py
applies them to the wire (docs/reference/atprotocol.md#enrollment `enroll`, `otp`).

* A code (`otp:get`) is 6 characters from a 32-symbol alphabet (2^30 values), single use,
  valid `ttl` ms (default 5 min, at most 1 h), stored as SHA-256 only.
* Wrong codes are throttled per connection (closed after :data:`MAX_BAD_OTP_PER_CONN`) and per
  atSign (:data:`MAX_BAD_OTP_PER_WINDOW` per :data:`BAD_OTP_WINDOW_MS`, then every code is
  refused until the window passes), so guessing a live code takes longer than it lives.
* At most :data:`MAX_PENDING` pending requests and :data:`MAX_LIVE_OTPS` live codes per atSign.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from noports.atprotocol.errors import AtError

OTP_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"  # no 0/O, 1/I: read aloud or typed
OTP_LEN = 6
OTP_DEFAULT_TTL_MS = 5 * 60_000
OTP_MAX_TTL_MS = 3600_000
PENDING_TTL_MS = 48 * 3600_000  # reference: a pending request expires after 48 h
MAX_BAD_OTP_PER_CONN = 3
MAX_BAD_OTP_PER_WINDOW = 10
BAD_OTP_WINDOW_MS = 60_000
MAX_PENDING = 256
MAX_LIVE_OTPS = 1024
MAX_NAME = 64
MAX_NAMESPACES = 16
MAX_KEY_FIELD = 4096  # base64 RSA-4096 public key ~740, RSA-encrypted AES key ~700
MANAGE = "__manage"
STATES = ("pending", "approved", "denied", "revoked")

_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_NS_RE = re.compile(r"^(\*|[A-Za-z0-9_.\-]{1,64})$")
_EID_RE = re.compile(r"^[A-Za-z0-9\-]{1,64}$")
_B64_RE = re.compile(r"^[A-Za-z0-9+/=\s]+$")


class ClosingError(AtError):
    """An error after which the server closes the connection (repeated wrong codes)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(code, message, close=True)


def new_otp() -> str:
    return "".join(secrets.choice(OTP_ALPHABET) for _i in range(OTP_LEN))


def otp_digest(otp: str) -> str:
    """What is stored and looked up: codes are case-insensitive and never kept in clear."""
    return hashlib.sha256(otp.strip().upper().encode("utf-8")).hexdigest()


def otp_ttl(text: str | None) -> int:
    """The code's lifetime from `otp:get[:ttl:<ms>]`; over an hour is refused, not clamped."""
    if not text:
        return OTP_DEFAULT_TTL_MS
    if len(text) > 12 or not text.isdigit():
        raise AtError("AT0022", f"otp ttl must be 1..{OTP_MAX_TTL_MS} ms")
    ttl = int(text)
    if not 0 < ttl <= OTP_MAX_TTL_MS:
        raise AtError("AT0022", f"otp ttl {ttl} ms is out of range: a one-time code lives at "
                                f"most {OTP_MAX_TTL_MS} ms (1 h)")
    return ttl


def enrollment_error(message: str) -> AtError:
    """Enrollment failures as the reference surfaces them (AT0011, docs/reference/atprotocol.md#utility-verbs)."""
    return AtError("AT0011", message)


def parse_params(text: str | None) -> dict[str, Any]:
    try:
        params = json.loads(text or "")
    except ValueError as exc:
        raise AtError("AT0003", "Invalid syntax. enroll needs a JSON object") from exc
    if not isinstance(params, dict):
        raise AtError("AT0003", "Invalid syntax. enroll needs a JSON object")
    return params


def _name(params: dict[str, Any], field_name: str) -> str:
    v = params.get(field_name)
    if not isinstance(v, str) or not _NAME_RE.match(v):
        raise AtError("AT0022", f"{field_name} is required: 1-{MAX_NAME} characters "
                                "of A-Z a-z 0-9 _ . -")
    return v


def _key_field(params: dict[str, Any], field_name: str, required: bool = True) -> str | None:
    v = params.get(field_name)
    if v is None and not required:
        return None
    if not isinstance(v, str) or not v or len(v) > MAX_KEY_FIELD or not _B64_RE.match(v):
        raise AtError("AT0022", f"{field_name} is required: base64, at most {MAX_KEY_FIELD} "
                                "characters")
    return v


def namespaces(params: dict[str, Any]) -> dict[str, str]:
    ns = params.get("namespaces")
    if not isinstance(ns, dict) or not 0 < len(ns) <= MAX_NAMESPACES:
        raise AtError("AT0022", f"namespaces is required: 1-{MAX_NAMESPACES} entries "
                                '{"<namespace>":"r"|"rw"}')
    out: dict[str, str] = {}
    for k, v in ns.items():
        if not isinstance(k, str) or not _NS_RE.match(k) or v not in ("r", "rw"):
            raise AtError("AT0022", f"namespace {str(k)[:64]!r}: access must be r or rw")
        out[k.lower()] = v
    return out


@dataclass(frozen=True)
class Request:
    """A validated `enroll:request` from a device (unauthenticated, with a code)."""

    app_name: str
    device_name: str
    namespaces: dict[str, str]
    apkam_public_key: str
    encrypted_apkam_symmetric_key: str
    otp: str


def validate_request(params: dict[str, Any]) -> Request:
    otp = params.get("otp")
    if not isinstance(otp, str) or not otp:
        raise AtError("AT0401", "enroll:request without authentication needs a one-time code "
                                '("otp") from `otp:get`')
    if len(otp) > 32:
        raise enrollment_error("invalid otp: too long")
    return Request(_name(params, "appName"), _name(params, "deviceName"), namespaces(params),
                   _key_field(params, "apkamPublicKey") or "",
                   _key_field(params, "encryptedAPKAMSymmetricKey") or "", otp)


def enrollment_id(params: dict[str, Any]) -> str:
    eid = params.get("enrollmentId")
    if not isinstance(eid, str) or not _EID_RE.match(eid):
        raise AtError("AT0022", "enrollmentId is required")
    return eid


# State changes an operator may make: operation -> (states it applies to, resulting state).
TRANSITIONS: dict[str, tuple[tuple[str, ...], str | None]] = {
    "approve": (("pending",), "approved"),
    "deny": (("pending",), "denied"),
    "revoke": (("approved",), "revoked"),
    "unrevoke": (("revoked",), "approved"),
    "delete": (("denied", "revoked"), None),
}


def transition(op: str, state: str, eid: str) -> str | None:
    allowed, to = TRANSITIONS[op]
    if state not in allowed:
        raise AtError("AT0030", f"Invalid Enrollment Status: cannot {op} enrollment {eid}, "
                                f"it is {state} (only {'/'.join(allowed)})")
    return to


def can_manage(auth_type: str | None, enrollment_namespaces: dict[str, str] | None) -> bool:
    """Operators: CRAM, legacy PKAM, or an APKAM enrollment with __manage:rw."""
    if auth_type == "cram":
        return True
    if auth_type == "pkam" and enrollment_namespaces is None:
        return True
    return bool(enrollment_namespaces) and enrollment_namespaces.get(MANAGE) == "rw"


def list_entry(eid: str, me: str, state: str, data: dict[str, Any]) -> tuple[str, dict]:
    """One `enroll:list` entry, keyed like the reference (`<id>.new.enrollments.__manage@me`)."""
    return (f"{eid}.new.enrollments.{MANAGE}{me}",
            {"appName": data.get("appName"), "deviceName": data.get("deviceName"),
             "namespace": data.get("namespaces", {}), "status": state,
             "encryptedAPKAMSymmetricKey": data.get("encryptedAPKAMSymmetricKey")})


@dataclass
class Throttle:
    """Wrong-code attempts of one atSign in a sliding window (in memory: a restart resets it,
    which costs an attacker a restart per 10 guesses)."""

    limit: int = MAX_BAD_OTP_PER_WINDOW
    window_ms: int = BAD_OTP_WINDOW_MS
    failures: deque[int] = field(default_factory=deque)

    def _trim(self, now: int) -> None:
        while self.failures and self.failures[0] <= now - self.window_ms:
            self.failures.popleft()

    def blocked_for(self, now: int) -> int:
        """0, or ms until codes are accepted again."""
        self._trim(now)
        if len(self.failures) < self.limit:
            return 0
        return self.failures[0] + self.window_ms - now

    def failed(self, now: int) -> None:
        self._trim(now)
        self.failures.append(now)


@dataclass
class Runtime:
    """Per-hosted-atSign enrollment state that is not persisted: the throttle and the live
    connections of each enrollment (to close them when it is revoked)."""

    throttle: Throttle = field(default_factory=Throttle)
    live: dict[str, weakref.WeakSet[Any]] = field(default_factory=dict)

    def attach(self, eid: str, conn: Any) -> None:
        self.live.setdefault(eid, weakref.WeakSet()).add(conn)

    def connections(self, eid: str) -> list[Any]:
        return list(self.live.pop(eid, ()))
