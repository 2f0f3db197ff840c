"""The sshnp client's security decisions, pure: what it accepts from the plane, what it refuses.

Why apart from ``flow.py``: the asyncio flow only moves bytes and waits; every decision about
what the relay, the device or anyone else sent (who may answer, which features are needed,
whether a signed response is genuine and for this session, which cipher and host keys to
use) is a plain function here, unit-tested without an event loop or sockets, hostile input
included (tests/unit/test_client_checks.py). Each refusal is an :class:`SshnpError` subclass
whose text names the step and what to check (docs/sshnp.md, exit codes).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from noports.atprotocol.atsign import InvalidAtSign, normalize_atsign
from noports.npproto import keys as npkeys
from noports.npproto.envelope import verify_envelope
from noports.npproto.errors import ProtocolError, SignatureError
from noports.npproto.messages import (
    CIPHER_AES_CTR,
    FEATURE_ACCEPTS_PUBLIC_KEYS,
    FEATURE_SR_AUTH,
    FEATURE_SR_E2EE,
    DeviceInfo,
    RelayResponse,
    SessionResponse,
    is_daemon_error,
)

from .errors import DeviceRefused, DeviceTimeout, KeysError, RelayError, SecurityError
from .knownhosts import device_known_hosts_path, host_key_alias
from .params import SessionParams

SSH_KEY_PREFIXES = ("ecdsa-sha2-nistp", "rsa-sha2-", "ssh-rsa", "ssh-ed25519")
#: A signed session response is a few KB (ephemeral key, host keys, wrapped session key).
MAX_SESSION_RESPONSE = 64 * 1024


# --- who may answer ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Route:
    """Where a monitor notification goes: ``kind`` is relay / relay_nack / session / heartbeat; a relay
    answer is filed under (``sender``, ``session_id``), a session response under
    ``session_id``."""

    kind: str
    sender: str
    session_id: str = ""


def sender_atsign(from_atsign: str | None) -> str | None:
    """The sender as the atServer reported it, by the one atSign rule; None if not an atSign."""
    try:
        return normalize_atsign(from_atsign or "")
    except InvalidAtSign:
        return None


def route(p: SessionParams, key: str, from_atsign: str | None) -> Route | None:
    """Which waiter a notification may reach, or None (ignored).

    Session responses and heartbeats count only from the device atSign about our device;
    relay answers are filed under their sender, so an answer is only taken from the relay
    that was asked, for the session id it was asked with.
    """
    try:
        ck = npkeys.parse_client_key(key)
    except ProtocolError:
        return None
    sender = sender_atsign(from_atsign)
    if sender is None:
        return None
    if ck.kind in ("relay_response", "relay_discover"):  # discover: relays.probe
        return Route("relay", sender, ck.session_id or "")
    if ck.kind == "relay_nack":
        return Route("relay_nack", sender, ck.session_id or "")
    if sender != p.device_atsign or ck.device != p.device:
        return None
    if ck.kind == "session_response":
        return Route("session", sender, ck.session_id or "")
    if ck.kind == "heartbeat":
        return Route("heartbeat", sender)
    return None


# --- the relay's answer ------------------------------------------------------------------------

def relay_answer(relay: str, answer: str) -> RelayResponse:
    """The relay's CSV answer; a relay that does not authenticate sockets is refused."""
    try:
        rr = RelayResponse.from_csv(answer)
    except (ProtocolError, ValueError) as exc:
        raise RelayError(f"relay {relay} sent an unusable answer: {exc}") from None
    if rr.rvd_nonce is None:
        raise RelayError(f"relay {relay} answered without an rvdNonce (a legacy relay "
                         "that does not authenticate sockets)")
    return rr


# --- the device's features and answer ----------------------------------------------------------

def required_features(p: SessionParams) -> list[str]:
    """Features the daemon must advertise for this session (client step 8)."""
    required = [FEATURE_SR_AUTH]
    if p.tunnel_mode == "aes":
        required.append(FEATURE_SR_E2EE)
    if p.send_ssh_public_key:
        required.append(FEATURE_ACCEPTS_PUBLIC_KEYS)
    return required


def check_features(p: SessionParams, info: DeviceInfo) -> None:
    """Fail early (before the session request times out) if the ping says a feature lacks."""
    missing = info.missing_features(required_features(p))
    if missing:
        raise DeviceRefused(
            f"{p.device}{p.device_atsign} (version {info.version or '?'}) does not support "
            f"{', '.join(missing)}",
            hint="upgrade the daemon, or for acceptsPublicKeys start it with -s")


def device_timeout(p: SessionParams, pinged: bool) -> DeviceTimeout:
    """What to say when the device did not answer the session request in time."""
    hint = (f"is sshnpd running as {p.device_atsign} with -d {p.device}, and is "
            f"{p.client_atsign} in its managers (-m)?")
    if pinged:
        msg = (f"{p.device}{p.device_atsign} answered the ping but not the session request "
               f"within {p.daemon_timeout:g}s")
        hint = "see the daemon's log; it may refuse the request (permit-open, signature)"
        if p.tunnel_mode == "ssh":
            hint += "; the C sshnpd only supports --tunnel-mode aes"
    else:
        msg = f"{p.device}{p.device_atsign} did not answer within {p.daemon_timeout:g}s"
    return DeviceTimeout(msg, hint=hint)


def check_not_refused(p: SessionParams, value: str) -> None:
    """A K6 value that is not a JSON object is the daemon's plain-text refusal."""
    if is_daemon_error(value):
        hint = "check the daemon's --permit-open / managers and its log"
        if "device clock" in value:  # sshnpd's freshness refusal says what to check
            hint = ("compare `date -u` here and on the device; sshnpd --request-window "
                    "sets the allowance (docs/sshnpd.md, replay protection)")
        raise DeviceRefused(f"{p.device}{p.device_atsign} refused: {value.strip()[:500]}",
                            hint=hint)


class BadSignature(SecurityError):
    """The envelope does not verify with the key we have: worth one retry with a freshly
    fetched public key (the device may have re-keyed), never more."""


def verify_response(p: SessionParams, sid: str, value: str, device_pk: str) -> SessionResponse:
    """The device's signed answer to session ``sid``, checked, or the error to stop with.

    Order: refusal text, size, envelope and signature (with ``device_pk``, the device
    atSign's public key), message types, session id (a response replayed from another
    session is refused), status.
    """
    check_not_refused(p, value)
    if len(value) > MAX_SESSION_RESPONSE:
        raise SecurityError(f"the session response from {p.device_atsign} is {len(value)} "
                            f"bytes, more than the {MAX_SESSION_RESPONSE} a device sends",
                            hint="nothing was connected")
    try:
        payload = verify_envelope(value, device_pk)
    except SignatureError as exc:
        raise BadSignature(f"the session response from {p.device_atsign} failed "
                           f"verification: {exc}",
                           hint="someone other than the device answered, or its "
                           "keys changed; nothing was connected") from None
    except (ValueError, RecursionError) as exc:  # int digit limit, nesting depth
        raise SecurityError(f"the session response from {p.device_atsign} is not usable "
                            f"JSON: {str(exc)[:120]}", hint="nothing was connected") from None
    try:
        resp = SessionResponse.from_dict(payload)
    except ProtocolError as exc:
        raise SecurityError(f"malformed signed session response: {exc}") from None
    if resp.session_id != sid:
        raise SecurityError(f"signed response is for session {resp.session_id}, not {sid}")
    if resp.status != "connected":
        raise DeviceRefused(f"{p.device}{p.device_atsign} answered status "
                            f"{resp.status!r}")
    return resp


# --- what we send and what we use --------------------------------------------------------------

def ssh_public_key_line(pub: Path, text: str) -> str:
    """The one OpenSSH public key line ``-s`` may send to the device."""
    line = text.strip()
    if not line.startswith(SSH_KEY_PREFIXES) or "\n" in line:
        raise KeysError(f"{pub} is not an OpenSSH public key line")
    return line


def check_remote_user(p: SessionParams, user: str | None) -> None:
    """A tunnel that logs in needs a user: ours (-u) or the one the device shared."""
    if user is None and p.need_remote_user:
        raise DeviceRefused(
            f"{p.device}{p.device_atsign} has not shared its username with "
            f"{p.client_atsign}", step="username",
            hint="pass -u/--remote-user, or run sshnpd without --hide")


def rsa_decrypt(key: Any, ciphertext_b64: str) -> str:
    """``crypto.rsa_decrypt`` for a loaded key (PKCS#1 v1.5, base64 in, UTF-8 text out)."""
    from cryptography.hazmat.primitives.asymmetric import padding
    return key.decrypt(base64.b64decode(ciphertext_b64), padding.PKCS1v15()).decode("utf-8")


def session_secrets(p: SessionParams, resp: SessionResponse, session_priv: Any,
                    x25519_priv: Any = None
                    ) -> tuple[bytes, bytes, str, tuple[bytes, bytes] | None]:
    """AES mode: (key, iv, cipher id, daemon-to-client key and IV or None) from the device's
    answer, decrypted with our session key; the cipher must be one we offered (no downgrade
    to something we did not ask for). Twin keys: ``aesKeyC2D``... (npproto/twinkeys.py).

    ``x25519_priv``: the session's X25519 key when the request offered one (npproto/kex.py):
    an answer in those fields is opened with it; an answer without them is an official
    daemon's (RSA, ``session_priv``); an answer with both kinds is refused."""
    from noports.npproto import kex, twinkeys
    from noports.npproto.streamcipher import decode_session_secrets
    key_ct, iv_ct, d2c_key_ct, d2c_iv_ct = twinkeys.response_secrets(
        resp.session_aes_key, resp.session_iv, resp.extra)
    if kex.in_response(resp.extra):
        rsa_fields = (twinkeys.C2D_KEY, twinkeys.C2D_IV, twinkeys.D2C_KEY, twinkeys.D2C_IV)
        mixed = bool(resp.session_aes_key or resp.session_iv
                     or any(resp.extra.get(f) is not None for f in rsa_fields))
        return _sealed_secrets(p, resp, x25519_priv, mixed=mixed)
    if not key_ct or not iv_ct or session_priv is None:
        raise SecurityError("the device sent no session key although encryption was "
                            "requested")
    d2c = None
    try:
        key, iv = decode_session_secrets(rsa_decrypt(session_priv, key_ct),
                                         rsa_decrypt(session_priv, iv_ct))
        if d2c_key_ct is not None and d2c_iv_ct is not None:
            d2c = decode_session_secrets(rsa_decrypt(session_priv, d2c_key_ct),
                                         rsa_decrypt(session_priv, d2c_iv_ct))
    except (ValueError, ProtocolError, UnicodeDecodeError) as exc:
        raise SecurityError(f"cannot decrypt the session key: {exc}") from None
    return key, iv, _chosen_cipher(p, resp), d2c


def _chosen_cipher(p: SessionParams, resp: SessionResponse) -> str:
    cipher_id = resp.np_cipher or CIPHER_AES_CTR
    if cipher_id not in p.ciphers:
        raise SecurityError(f"the device chose cipher {cipher_id!r}, which was not offered")
    return cipher_id


def _sealed_secrets(p: SessionParams, resp: SessionResponse, x25519_priv: Any, *, mixed: bool
                    ) -> tuple[bytes, bytes, str, tuple[bytes, bytes] | None]:
    """The X25519 answer (npproto/kex.py): refused when not asked for or mixed with RSA."""
    from noports.npproto import kex
    if x25519_priv is None:
        raise SecurityError(f"the device answered with an X25519 session key ({kex.FIELD_PK}) "
                            "that this session did not offer")
    if mixed:
        raise SecurityError("the device answered with both an X25519 and an RSA session key; "
                            "refusing the mixed answer", hint="is the device's sshnpd a "
                            "modified or broken build?")
    try:
        key, iv, d2c = kex.unpack(kex.open_sealed(x25519_priv, resp.session_id, resp.extra))
    except kex.KexError as exc:
        raise SecurityError(f"cannot decrypt the session key: {exc}") from None
    return key, iv, _chosen_cipher(p, resp), d2c


def check_ssh_mode(p: SessionParams, resp: SessionResponse, host_keys: list[str]) -> None:
    """SSH mode: the outer SSH needs host keys to verify and the device's ephemeral key."""
    if not host_keys:
        raise SecurityError(
            f"{p.device_atsign} sent no host keys to pin, so the outer SSH cannot "
            "verify the device", hint="use --tunnel-mode aes with this daemon")
    if not resp.ephemeral_private_key:
        raise DeviceRefused("the device sent no ephemeral key for the outer SSH",
                            hint="use --tunnel-mode aes with this daemon")


@dataclass(frozen=True)
class HostKeyPin:
    """Where the signed host keys go: ``target`` None means none were sent (official
    daemons), so ssh trusts the device's host key on first use."""

    alias: str
    host_keys: list[str]
    target: Path | None


def host_key_pin(p: SessionParams, resp: SessionResponse) -> HostKeyPin:
    """The HostKeyAlias, the keys from the signed response and the known_hosts file."""
    alias = host_key_alias(p.device_atsign, p.device)
    host_keys = list(resp.host_keys or [])
    target = None
    if host_keys:
        target = p.known_hosts_file or device_known_hosts_path(p.home_cache, alias)
    return HostKeyPin(alias, host_keys, target)
