"""Signed envelopes, relay authentication lines, nonces and replay protection (docs/reference/noports-protocol.md#message-catalogue, docs/reference/noports-protocol.md#relay-authentication).

Why the care: the signature covers Dart's ``jsonEncode(payload)``, and every verifier rebuilds
that text from the *decoded* payload (never from the received bytes). So we sign exactly
``dart_json_encode(payload)`` and verify against ``dart_json_encode(json_decode(payload))``;
the relay goes further and verifies the auth line against a payload it builds itself.
"""

from __future__ import annotations

import heapq
import re
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta, timezone
from typing import Any

from .. import crypto
from .dartjson import dart_json_decode, dart_json_encode
from .errors import ProtocolError, ReplayError, SignatureError

HASHING_ALGO = "sha256"
SIGNING_ALGO = "rsa2048"
#: at_chops can verify rsa2048 with either hash; we always sign with sha256.
ACCEPTED_HASHING_ALGOS = ("sha256", "sha512")
#: an auth line is ~600 bytes; anything much longer before a newline is not one.
MAX_AUTH_LINE = 4096


# --- envelopes ---------------------------------------------------------------------------------

def sign_envelope(payload: Mapping[str, Any], private_key_b64: str) -> str:
    """``signAndWrapAndJsonEncode``: envelope JSON with an RSA-2048/SHA-256 signature."""
    text = dart_json_encode(payload)
    signature = crypto.sign(private_key_b64, text.encode("utf-8"), HASHING_ALGO)
    return dart_json_encode({"payload": payload, "signature": signature,
                             "hashingAlgo": HASHING_ALGO, "signingAlgo": SIGNING_ALGO})


def _parse_envelope(text: str | bytes) -> tuple[dict[str, Any], str, str]:
    try:
        env = dart_json_decode(text)
    except ProtocolError as exc:
        raise SignatureError(f"envelope is not valid JSON: {exc}") from exc
    if not isinstance(env, dict):
        raise SignatureError("envelope is not a JSON object")
    payload = env.get("payload")
    if not isinstance(payload, dict):
        raise SignatureError("envelope field 'payload' is missing or not an object")
    for name in ("signature", "hashingAlgo", "signingAlgo"):
        if not isinstance(env.get(name), str):
            raise SignatureError(f"envelope field {name!r} is missing or not a string")
    if env["signingAlgo"] != SIGNING_ALGO:
        raise SignatureError(f"unsupported signingAlgo {env['signingAlgo']!r} (want rsa2048)")
    if env["hashingAlgo"] not in ACCEPTED_HASHING_ALGOS:
        raise SignatureError(f"unsupported hashingAlgo {env['hashingAlgo']!r}")
    return payload, env["signature"], env["hashingAlgo"]


def verify_envelope(text: str | bytes, public_key_b64: str) -> dict[str, Any]:
    """Check a signed envelope from the holder of ``public_key_b64``; return its payload.

    Raises :class:`SignatureError` for any malformation or a signature that does not verify.
    """
    payload, signature, hashing = _parse_envelope(text)
    try:
        signed_text = dart_json_encode(payload)
    except ProtocolError as exc:
        raise SignatureError(f"payload cannot be re-serialised like Dart does: {exc}") from exc
    if not crypto.verify(public_key_b64, signed_text.encode("utf-8"), signature, hashing):
        raise SignatureError("signature does not verify with the sender's public key")
    return payload


# --- relay authentication (docs/reference/noports-protocol.md#relay-authentication) ---------------------------------------------------------------

def relay_auth_payload(session_id: str, client_nonce: str, rvd_nonce: str) -> dict[str, str]:
    """The payload both sides sign, in the exact key order the relay rebuilds."""
    return {"sessionId": session_id, "clientNonce": client_nonce, "rvdNonce": rvd_nonce}


def relay_auth_line(session_id: str, client_nonce: str, rvd_nonce: str,
                    private_key_b64: str) -> bytes:
    """The first line a connector writes to its relay port: envelope + ``\\n``."""
    env = sign_envelope(relay_auth_payload(session_id, client_nonce, rvd_nonce), private_key_b64)
    return env.encode("utf-8") + b"\n"


def verify_relay_auth(line: bytes | str, expected_session_id: str, client_nonce: str,
                      rvd_nonce: str, public_key_b64: str) -> bool:
    """Relay side: True iff ``line`` is a valid auth line for this session and key.

    Like ``SignatureAuthVerifier``: the payload's rvdNonce must equal ours, and the signature
    is checked against the relay's *own* serialisation of (sessionId, clientNonce, rvdNonce),
    so a connector cannot choose what gets verified. Never raises for bad input.
    """
    try:
        payload, signature, hashing = _parse_envelope(line)
    except SignatureError:
        return False
    if payload.get("rvdNonce") != rvd_nonce:
        return False
    own = dart_json_encode(relay_auth_payload(expected_session_id, client_nonce, rvd_nonce))
    return crypto.verify(public_key_b64, own.encode("utf-8"), signature, hashing)


def extract_auth_line(buffer: bytes, max_len: int = MAX_AUTH_LINE) -> tuple[bytes, bytes] | None:
    """Split ``line, rest`` at the first newline (rest = data to forward), or None if more
    bytes are needed; raises ProtocolError once ``max_len`` bytes arrive without a newline."""
    idx = buffer.find(b"\n", 0, max_len + 1)
    if idx < 0:
        if len(buffer) > max_len:
            raise ProtocolError(f"no auth line within the first {max_len} bytes")
        return None
    return buffer[:idx], buffer[idx + 1:]


# --- nonces ------------------------------------------------------------------------------------

def dart_iso(dt: datetime) -> str:
    """Dart ``DateTime.toIso8601String()``: microseconds printed only when not a whole ms."""
    base = (f"{dt.year:04d}-{dt.month:02d}-{dt.day:02d}T{dt.hour:02d}:{dt.minute:02d}:"
            f"{dt.second:02d}.{dt.microsecond // 1000:03d}")
    if dt.microsecond % 1000:
        base += f"{dt.microsecond % 1000:03d}"
    is_utc = dt.tzinfo is not None and dt.utcoffset() == timedelta(0)
    return base + ("Z" if is_utc else "")


def dart_iso_now() -> str:
    """``DateTime.now().toIso8601String()`` - local time, no zone, e.g. 2024-01-27T08:48:00.911746."""
    return dart_iso(datetime.now())


_DART_ISO_RE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?Z?")


def parse_dart_iso(text: str) -> datetime:
    """Parse a Dart ISO nonce to a naive *local* datetime (UTC ones are converted)."""
    if not isinstance(text, str) or not _DART_ISO_RE.fullmatch(text):
        raise ProtocolError(f"not a Dart ISO-8601 timestamp: {text!r}")
    utc = text.endswith("Z")
    body = text[:-1] if utc else text
    if "." in body:
        head, frac = body.split(".")
        body = f"{head}.{frac.ljust(6, '0')}"
    try:
        dt = datetime.fromisoformat(body)
    except ValueError as exc:
        raise ProtocolError(f"not a valid timestamp: {text!r}") from exc
    if utc:
        dt = dt.replace(tzinfo=timezone.utc).astimezone().replace(tzinfo=None)
    return dt


class ReplayGuard:
    """Refuse a (sessionId, clientNonce) seen before, or a clientNonce outside the window.

    Dart nonces are *local* time without a zone, so a client in another time zone looks hours
    off. ``tz_tolerance`` (default 14 h) widens the accepted age range for that; set it to 0
    when both clocks share a zone. Entries are kept exactly as long as their nonce would still
    pass the freshness test, so expiry never re-opens a replay. Memory is bounded: when full,
    the entry with the oldest nonce is evicted and nothing at or before it is accepted again.
    """

    def __init__(self, window: float = 300.0, *, tz_tolerance: float = 14 * 3600,
                 future_skew: float = 60.0, max_entries: int = 10_000,
                 clock: Callable[[], float] = time.time) -> None:
        self.window = window
        self.tz_tolerance = tz_tolerance
        self.future_skew = future_skew
        self.max_entries = max_entries
        self._clock = clock
        self._seen: dict[tuple[str, str], float] = {}
        self._heap: list[tuple[float, tuple[str, str]]] = []
        self._floor = float("-inf")

    def __len__(self) -> int:
        return len(self._seen)

    def _nonce_ts(self, nonce: str) -> float:
        return parse_dart_iso(nonce).timestamp()  # naive -> interpreted as local time

    def _prune(self, now: float) -> None:
        oldest_ok = now - self.window - self.tz_tolerance
        while self._heap and self._heap[0][0] < oldest_ok:
            _expiry, key = heapq.heappop(self._heap)
            self._seen.pop(key, None)

    def check(self, session_id: str, client_nonce: str) -> None:
        """Record the pair or raise :class:`ReplayError` saying why it is refused."""
        now = self._clock()
        try:
            ts = self._nonce_ts(client_nonce)
        except ProtocolError as exc:
            raise ReplayError(f"clientNonce unusable: {exc}") from exc
        age = now - ts
        if age > self.window + self.tz_tolerance:
            raise ReplayError(f"clientNonce {client_nonce} is too old ({age:.0f}s)")
        if age < -(self.future_skew + self.tz_tolerance):
            raise ReplayError(f"clientNonce {client_nonce} is in the future ({-age:.0f}s)")
        if ts <= self._floor:
            raise ReplayError(f"clientNonce {client_nonce} is older than the replay memory")
        key = (session_id, client_nonce)
        self._prune(now)
        if key in self._seen:
            raise ReplayError(f"session {session_id} with this clientNonce was seen before")
        while len(self._seen) >= self.max_entries and self._heap:
            old_ts, old_key = heapq.heappop(self._heap)
            self._seen.pop(old_key, None)
            self._floor = max(self._floor, old_ts)
        if ts <= self._floor:
            raise ReplayError(f"clientNonce {client_nonce} is older than the replay memory")
        self._seen[key] = ts
        heapq.heappush(self._heap, (ts, key))
