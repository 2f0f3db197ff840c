"""Pure decision logic of sshnpd: notification + config + state -> what to do.

Why pure: every security decision of the daemon (who may talk to it, which requests are
signed, fresh and permitted, what goes back) lives here and is unit-tested without sockets,
atServers or files. :mod:`.service` only performs the returned actions.

Order for every notification, as the official daemon
(docs/reference/noports-protocol.md#authorization-and-policy,
docs/reference/noports-protocol.md#compatibility-checklist): the sender
(``notification.from``, authenticated by the atServer) must be a manager *before* anything
else is looked at; unauthorized senders get no reply. Then the key is classified, and for
``ssh_request``: signature (no reply on failure, like Dart) -> fields -> freshness/replay
(ours: a plain error string reply, like the official refusals; the id is recorded durably
before anything else happens) -> permit-open (plain error string reply) -> session plan.
"""

from __future__ import annotations

import base64
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from noports import crypto
from noports.atprotocol.atsign import InvalidAtSign, normalize_atsign
from noports.npproto import escr, kex, twinkeys
from noports.npproto.dartjson import dart_json_decode
from noports.npproto.envelope import (
    parse_dart_iso,
    relay_auth_line,
    sign_envelope,
    verify_envelope,
)
from noports.npproto.errors import ProtocolError, SignatureError
from noports.npproto.escr import escr_auth_for
from noports.npproto.keys import (
    device_info_key,
    heartbeat_key,
    parse_daemon_key,
    session_response_key,
    split_shared_key,
    username_key,
    validate_session_id,
)
from noports.npproto.messages import (
    CIPHER_AES_CTR,
    FEATURE_ACCEPTS_PUBLIC_KEYS,
    FEATURE_ADJUSTABLE_TIMEOUT,
    FEATURE_PORT_CHOICE,
    FEATURE_SR_AUTH,
    FEATURE_SR_E2EE,
    DeviceInfo,
    NptRequest,
    SessionResponse,
    SshRequest,
    negotiate_cipher,
)
from noports.npproto.streamcipher import IV_LEN, KEY_LEN, SUPPORTED_CIPHERS

from . import DAEMON_VERSION
from .authorized_keys import AuthorizedKeysError, validate_client_public_key
from .config import DaemonConfig
from .seen import SeenRequests, SeenStoreError
from .sshkeys import EphemeralKey, generate_ephemeral_key

log = logging.getLogger(__name__)

RESPONSE_TTL_MS = 10_000  # K4/K6 (docs/reference/noports-protocol.md#key-names)
DEVICE_INFO_TTL_MS = 30 * 24 * 3600 * 1000  # K9: 30 days, refreshed hourly
MAX_VALUE_LEN = 64 * 1024  # an ssh_request is ~1.5 KiB; anything huge is not one of ours
CORE_PACKAGE_VERSION = f"noports-py {DAEMON_VERSION}"

# official daemon error strings (docs/reference/noports-protocol.md#daemon-error-strings), sent as plain K6 values
ERR_DAEMON_PERMIT = "Daemon does not permit connections to {target}"
ERR_SIGNATURE = "Signature not verified: {err}"
ERR_TUNNEL = "Failed to start up the daemon side of the srv socket tunnel : {err}"
# ours, same form (a plain K6 string): the official daemon does not check freshness
ERR_REFUSED = "Request refused: {why}"

NPT_MIN_IDLE_S = 1.0
NPT_MAX_IDLE_S = 365 * 24 * 3600.0  # the official "-T 0": a year
ZONE_STEP_S = 15 * 60  # every time zone offset in use is a multiple of 15 minutes
MAX_ZONE_OFFSET_S = 26 * 3600  # UTC-12 .. UTC+14


# --- inputs and actions ----------------------------------------------------------------------

@dataclass(frozen=True)
class Inbound:
    """A received notification, reduced to what decisions need (value already decrypted)."""

    id: str
    sender: str  # notification.from: authenticated by the atServer, the only trusted origin
    key: str
    value: str | None
    operation: str = "update"
    error: str | None = None  # set when the value could not be decrypted

    def __repr__(self) -> str:  # values are secrets: never in logs
        return f"Inbound(id={self.id!r}, from={self.sender!r}, key={self.key!r})"


@dataclass(frozen=True)
class Ignore:
    """Do nothing (and send nothing); ``event`` is a stable name for structured logs."""

    event: str
    reason: str
    level: int = logging.INFO
    sender: str | None = None
    session_id: str | None = None


@dataclass(frozen=True)
class Request:
    """An authorized notification of a known kind, ready for its kind's handler."""

    kind: str
    sender: str
    value: str
    id: str

    def __repr__(self) -> str:
        return f"Request(kind={self.kind!r}, from={self.sender!r}, id={self.id!r})"


@dataclass(frozen=True)
class Reply:
    """A notification to send: ``@to:<key_name>@<device atSign>``."""

    to: str
    key_name: str
    value: str
    ttl_ms: int = RESPONSE_TTL_MS
    session_id: str | None = None
    is_error: bool = False

    def __repr__(self) -> str:
        return f"Reply(to={self.to!r}, key={self.key_name!r}, error={self.is_error})"


@dataclass(frozen=True)
class AddClientKey:
    """``-s``: append this (validated) public key to authorized_keys."""

    sender: str
    public_key: str


@dataclass(frozen=True)
class ShareRecord:
    """Put (value set) or delete (value None) ``@manager:<name>@device`` (K8/K9)."""

    to: str
    atkey: str  # full @to:name@device
    key_name: str  # name without atSigns
    value: str | None
    ttl_ms: int | None = None


@dataclass
class SessionPlan:
    """Everything the service needs to run one ssh session (secrets: never log this)."""

    session_id: str
    client: str
    relay_host: str
    relay_port: int
    auth_line: Any  # bytes (v5 line), EscrAuth (single port) or None (no relay auth)
    cipher_id: str | None  # None: plain bytes (the client's outer SSH carries the crypto)
    key: bytes | None
    iv: bytes | None
    ephemeral: EphemeralKey
    response: Reply
    d2c: tuple[bytes, bytes] | None = None  # twin keys: the daemon-to-client key and IV
    key_exchange: str | None = None  # how the client got key/iv: "x25519" or "rsa2048"

    def __repr__(self) -> str:
        return (f"SessionPlan(session_id={self.session_id!r}, client={self.client!r}, "
                f"relay={self.relay_host}:{self.relay_port}, cipher={self.cipher_id!r})")


@dataclass
class NptPlan:
    """One npt session (multi mode): the control pair's secrets and the permitted target.

    ``key``/``iv`` encrypt the control stream; each ``connect:`` line brings its own pair for
    its connection. ``idle_timeout``: the session ends after this long without a connection
    (the request's ``timeout``, operative on the daemon side as in the official daemon).
    """

    session_id: str
    client: str
    relay_host: str
    relay_port: int
    auth_line: bytes | None
    cipher_id: str
    key: bytes
    iv: bytes
    target_host: str
    target_port: int
    idle_timeout: float
    response: Reply

    def __repr__(self) -> str:
        return (f"NptPlan(session_id={self.session_id!r}, client={self.client!r}, "
                f"target={self.target_host}:{self.target_port}, cipher={self.cipher_id!r})")


# --- helpers ---------------------------------------------------------------------------------

def permitted(host: str, port: int, permit_open: tuple[str, ...] | list[str]) -> bool:
    """Official ``_permittedToOpen``: exact ``host:port``, ``*:port``, ``host:*`` or ``*:*``."""
    return any(p in permit_open for p in (f"{host}:{port}", f"*:{port}", f"{host}:*", "*:*"))


def _name(atkey: str) -> str:
    return split_shared_key(atkey).name


# --- freshness of a request (pure: the clock is an argument) ---------------------------------

@dataclass(frozen=True)
class Fresh:
    """A timestamp inside the window: ``skew`` = its time minus the device's (seconds, after
    any time zone offset), ``expires`` = until when the same timestamp could still pass."""

    skew: float
    expires: float


def _duration(secs: float) -> str:
    secs = abs(secs)
    if not math.isfinite(secs):
        return "an unmeasurable time"
    if secs < 120:
        return f"{secs:.1f} s"
    whole = int(secs)
    h, rest = divmod(whole, 3600)
    m, s = divmod(rest, 60)
    text = f"{h} h {m} min" if h else f"{m} min {s} s"
    return f"{text} ({whole} s)"


def check_request_time(nonce: object, now: float, window: float,
                       any_timezone: bool = False) -> Fresh | str:
    """Is the request's ``clientNonce`` timestamp within ``window`` seconds of ``now``?

    Returns :class:`Fresh`, or the reason for refusing (the text of the error reply, naming
    the difference and what to check). A nonce ending in ``Z`` is UTC; one without a zone
    (what the official Dart clients send: ``DateTime.now()``) is read as the device's local
    time, or with ``any_timezone`` the difference may also be any whole time zone offset
    (multiples of 15 minutes up to 26 hours) - the window still bounds what is left.
    Never raises, whatever ``nonce`` is.
    """
    if nonce is None:
        return ("it carries no clientNonce timestamp, so its freshness cannot be checked; "
                "use a client that sends one (sshnp/npt 5.x)")
    if not isinstance(nonce, str):
        return f"its clientNonce is a {type(nonce).__name__}, not a timestamp"
    try:
        ts = parse_dart_iso(nonce).timestamp()  # naive -> the device's local time
    except (ProtocolError, ValueError, OverflowError, OSError):
        return f"its clientNonce {nonce[:40]!r} is not a timestamp"
    zoned = nonce.endswith("Z")
    skew = ts - now
    offset = 0.0
    if any_timezone and not zoned and math.isfinite(skew):
        offset = max(-MAX_ZONE_OFFSET_S, min(MAX_ZONE_OFFSET_S,
                                             round(skew / ZONE_STEP_S) * ZONE_STEP_S))
    left = skew - offset
    if not math.isfinite(left) or abs(left) > window:
        where = "behind" if left < 0 else "ahead of"
        tz = "" if zoned else (
            "; the timestamp has no time zone (client local time), so both must also use "
            "the same time zone" + ("" if any_timezone else
                                    ", or start sshnpd with --any-client-timezone"))
        return (f"its timestamp {nonce} is {_duration(left)} {where} the device clock "
                f"(allowed: {window:g} s either way). The request was delayed, or the clocks "
                f"differ: check that the client's and the device's clocks are synchronised "
                f"(NTP){tz}")
    reach = MAX_ZONE_OFFSET_S if (any_timezone and not zoned) else 0.0
    return Fresh(skew=left, expires=ts + reach + window)


# --- the handler -----------------------------------------------------------------------------

class DaemonHandler:
    """Decisions for one daemon (one device name); holds only replay state."""

    def __init__(self, config: DaemonConfig, signing_private_key: str, *,
                 seen: SeenRequests | None = None,
                 clock: Callable[[], float] = time.time,
                 keygen: Callable[[str], EphemeralKey] = generate_ephemeral_key,
                 randbytes: Callable[[int], bytes] = os.urandom,
                 supported_ciphers: tuple[str, ...] = SUPPORTED_CIPHERS,
                 escr_keys: object | None = None) -> None:
        self.config = config
        self._signing_key = signing_private_key
        self._escr_keys = escr_keys  # AtKeys: answers ESCR relays (single-port) as side B
        self.seen = seen if seen is not None else SeenRequests(clock=clock)
        self._clock = clock
        self._keygen = keygen
        self._randbytes = randbytes
        self.supported_ciphers = supported_ciphers

    def __repr__(self) -> str:
        return f"DaemonHandler({self.config.atsign}:{self.config.device})"

    # -- routing -------------------------------------------------------------------------------

    def authorize(self, sender: str) -> str | None:
        """None if ``sender`` may use this daemon, else the official denial message."""
        if sender in self.config.managers:
            return None
        return f"{sender} is not in --managers list"

    def route(self, n: Inbound) -> Request | Ignore:
        """Authorize, then classify; never raises for any input."""
        sender = _sender(n.sender)
        denial = self.authorize(sender)
        if denial is not None:
            return Ignore("unauthorized", f"Notification ignored from {sender or '?'} which is "
                          f"not authorized: {denial}", logging.WARNING, sender)
        if n.operation != "update":
            return Ignore("not_update", f"ignoring a {n.operation!r} notification",
                          logging.DEBUG, sender)
        try:
            dk = parse_daemon_key(n.key, self.config.device)
        except (ProtocolError, TypeError) as exc:
            return Ignore("unknown_key", f"ignoring notification: {exc}", logging.INFO, sender)
        if dk.sender != sender or dk.recipient != self.config.atsign:
            return Ignore("key_mismatch", "ignoring notification whose key names another "
                          "sender or recipient", logging.WARNING, sender)
        if n.error is not None:
            return Ignore("undecryptable", f"ignoring {dk.kind}: {n.error}", logging.WARNING,
                          sender)
        if n.value is None:
            return Ignore("no_value", f"ignoring {dk.kind} without a value", logging.INFO,
                          sender)
        if len(n.value) > MAX_VALUE_LEN:
            return Ignore("too_large", f"ignoring {dk.kind}: value of {len(n.value)} chars",
                          logging.WARNING, sender)
        if dk.kind in ("privatekey", "sshd"):
            return Ignore("legacy", f"ignoring legacy reverse-ssh '{dk.kind}' request "
                          "(not supported)", logging.WARNING, sender)
        return Request(dk.kind, sender, n.value, n.id)

    # -- ping and shared records ---------------------------------------------------------------

    def device_info(self) -> DeviceInfo:
        """M6: what pings and the device_info record say about this daemon."""
        c = self.config
        features = {FEATURE_ACCEPTS_PUBLIC_KEYS: c.accept_public_keys, FEATURE_SR_AUTH: True,
                    FEATURE_SR_E2EE: True, FEATURE_PORT_CHOICE: True,
                    FEATURE_ADJUSTABLE_TIMEOUT: True}
        return DeviceInfo(devicename=c.device, device_group_name=c.device_group,
                          version=DAEMON_VERSION, core_package_version=CORE_PACKAGE_VERSION,
                          supported_features=features, allowed_services=list(c.permit_open))

    def on_ping(self, req: Request) -> Reply:
        """K3 -> K4 heartbeat with the M6 JSON (unsigned, like the official daemon)."""
        key = heartbeat_key(req.sender, self.config.device, self.config.atsign)
        return Reply(req.sender, _name(key), self.device_info().to_json())

    def share_records(self, username: str) -> list[ShareRecord]:
        """K8/K9 for every manager: put them, or with ``--hide`` delete them."""
        c = self.config
        out: list[ShareRecord] = []
        info = self.device_info().to_json()
        for m in c.managers:
            uk = username_key(m, c.device, c.atsign)
            dk = device_info_key(m, c.device, c.atsign)
            if c.hide:
                out += [ShareRecord(m, uk, _name(uk), None), ShareRecord(m, dk, _name(dk), None)]
            else:
                out += [ShareRecord(m, uk, _name(uk), username),
                        ShareRecord(m, dk, _name(dk), info, DEVICE_INFO_TTL_MS)]
        return out

    # -- sshpublickey (K7) -----------------------------------------------------------------------

    def on_sshpublickey(self, req: Request) -> AddClientKey | Ignore:
        if not self.config.accept_public_keys:
            return Ignore("publickey_refused", f"ignoring sshpublickey from {req.sender}: "
                          "daemon not started with -s", logging.INFO, req.sender)
        try:
            key = validate_client_public_key(req.value)
        except AuthorizedKeysError as exc:
            return Ignore("bad_publickey", f"ignoring sshpublickey from {req.sender}: {exc}",
                          logging.WARNING, req.sender)
        return AddClientKey(req.sender, key)

    # -- ssh_request (K5) ----------------------------------------------------------------------

    def _error_reply(self, to: str, sid: str, text: str) -> Reply:
        key = session_response_key(to, sid, self.config.device, self.config.atsign)
        return Reply(to, _name(key), text, session_id=sid, is_error=True)

    def tunnel_failed(self, plan: SessionPlan, err: str) -> Reply:
        """The official reply when the relay or local sshd cannot be reached."""
        return self._error_reply(plan.client, plan.session_id, ERR_TUNNEL.format(err=err))

    def _fresh(self, sid: str, client_nonce: object, sender: str) -> Reply | None:
        """Replay defence, before anything is written: the timestamp must be within the
        window and the session id unused; the id is then recorded (durably) - None = go on."""
        c = self.config
        verdict = check_request_time(client_nonce, self._clock(), c.request_window,
                                     c.any_client_timezone)
        if isinstance(verdict, str):
            return self._error_reply(sender, sid, ERR_REFUSED.format(why=verdict))
        try:
            if not self.seen.add(sid, verdict.expires):
                return self._error_reply(sender, sid, ERR_REFUSED.format(
                    why=f"session {sid} was already used (a replayed request)"))
        except SeenStoreError as exc:
            log.error("cannot record session %s: %s", sid, exc)
            return self._error_reply(sender, sid, ERR_REFUSED.format(
                why=f"the device cannot record it against replays ({exc}); see its log"))
        return None

    def on_ssh_request(self, req: Request, client_public_key: str,
                       host_keys: list[str] | None = None) -> SessionPlan | Reply | Ignore:
        """Verify and plan one session; ``client_public_key`` is ``public:publickey@client``."""
        sender = req.sender
        try:
            payload = verify_envelope(req.value, client_public_key)
        except SignatureError as exc:
            # Dart's ssh_request path only logs; no reply (docs/reference/noports-protocol.md#daemon-error-strings)
            return Ignore("bad_signature", f"ssh_request from {sender}: signature not "
                          f"verified: {exc}", logging.WARNING, sender)
        try:
            sr = SshRequest.from_dict(payload)
            sid = validate_session_id(sr.session_id)
        except ProtocolError as exc:
            return Ignore("bad_request", f"ignoring malformed ssh_request from {sender}: {exc}",
                          logging.WARNING, sender)
        refused = self._fresh(sid, sr.client_nonce, sender)
        if refused is not None:
            return refused
        target_port = self.config.local_sshd_port
        if not permitted("localhost", target_port, self.config.permit_open):
            return self._error_reply(sender, sid, ERR_DAEMON_PERMIT.format(
                target=f"localhost:{target_port}"))
        if not 0 < sr.port < 65536 or not sr.host:
            return self._error_reply(sender, sid, ERR_TUNNEL.format(
                err=f"bad relay address {sr.host}:{sr.port}"))

        cipher_id = key = iv = None
        aes_ct = iv_ct = None
        official = self.config.official_reply  # test-only: answer as official daemons do
        x_pk = None  # the client's X25519 key: seal the secrets with it, not RSA (0029)
        if sr.encrypt_rvd_traffic and not official:
            try:
                x_pk = kex.offered(sr.extra)
            except kex.KexError as exc:
                return self._error_reply(sender, sid, ERR_TUNNEL.format(
                    err=f"unusable {kex.FIELD_PK}: {exc}"))
        if sr.encrypt_rvd_traffic:
            cipher_id = negotiate_cipher(None if official else sr.np_ciphers,
                                         self.supported_ciphers)
            key, iv = self._randbytes(KEY_LEN), self._randbytes(IV_LEN)
        if key is not None and iv is not None and x_pk is None:
            try:
                assert sr.client_ephemeral_pk is not None  # from_dict checked it
                aes_ct = crypto.rsa_encrypt(sr.client_ephemeral_pk,
                                            base64.b64encode(key).decode("ascii"))
                iv_ct = crypto.rsa_encrypt(sr.client_ephemeral_pk,
                                           base64.b64encode(iv).decode("ascii"))
            except (crypto.CryptoError, ValueError, TypeError) as exc:
                return self._error_reply(sender, sid, ERR_TUNNEL.format(
                    err=f"unusable clientEphemeralPK ({type(exc).__name__})"))
        d2c, twin, sealed = None, None, None
        if x_pk is not None:
            assert key is not None and iv is not None
            if cipher_id == CIPHER_AES_CTR and twinkeys.offered(sr.extra):
                d2c = (self._randbytes(KEY_LEN), self._randbytes(IV_LEN))
            try:
                sealed = kex.seal(x_pk, sid, kex.pack(key, iv, d2c))
            except kex.KexError as exc:
                return self._error_reply(sender, sid, ERR_TUNNEL.format(
                    err=f"unusable {kex.FIELD_PK}: {exc}"))
        elif cipher_id == CIPHER_AES_CTR and twinkeys.offered(sr.extra):
            d2c, twin = self._twin_keys(sr.client_ephemeral_pk, aes_ct, iv_ct)
        auth_line = None
        if sr.authenticate_to_rvd:
            assert sr.client_nonce is not None and sr.rvd_nonce is not None
            auth_line = relay_auth_line(sid, sr.client_nonce, sr.rvd_nonce, self._signing_key)
            escr_key = sr.extra.get("relayAuthAesKey")
            if sr.extra.get("relayAuthMode") == "escr" and self._escr_keys is not None \
                    and escr.valid_relay_auth_key(escr_key):  # single-port relay (srvd --443)
                auth_line = escr_auth_for(self._escr_keys, sid, str(escr_key), side_a=False)
        eph = self._keygen(self.config.ssh_algorithm)
        resp = SessionResponse(
            session_id=sid, status="connected", ephemeral_private_key=eph.private_openssh,
            session_aes_key=aes_ct, session_iv=iv_ct, host_keys=list(host_keys or []) or None,
            np_cipher=cipher_id)
        if official:  # no hostKeys, no npCipher (AES-256-CTR), ephemeralPrivateKey: null
            resp.host_keys = resp.np_cipher = resp.ephemeral_private_key = None
        if twin is not None:  # official names: aesKeyC2D/ivC2D replace sessionAESKey/IV
            resp.session_aes_key = resp.session_iv = None
            resp.extra.update(twin)
        if sealed is not None:  # X25519: no RSA ciphertexts at all
            resp.extra.update(sealed)
        key_name = _name(session_response_key(sender, sid, self.config.device,
                                              self.config.atsign))
        envelope = sign_envelope(resp.to_dict(), self._signing_key)
        return SessionPlan(
            session_id=sid, client=sender, relay_host=sr.host, relay_port=sr.port,
            auth_line=auth_line, cipher_id=cipher_id, key=key, iv=iv, ephemeral=eph,
            response=Reply(sender, key_name, envelope, session_id=sid), d2c=d2c,
            key_exchange=None if key is None else kex.KEX_X25519 if sealed else kex.KEX_RSA)

    def _twin_keys(self, client_pk: str | None, c2d_key_ct: str | None, c2d_iv_ct: str | None
                   ) -> tuple[tuple[bytes, bytes] | None, dict[str, str] | None]:
        """The client offered twin keys: a second key and IV for daemon-to-client, and the
        response fields; (None, None) keeps the single key when it cannot be encrypted."""
        if client_pk is None or c2d_key_ct is None or c2d_iv_ct is None:
            return None, None
        key, iv = self._randbytes(KEY_LEN), self._randbytes(IV_LEN)
        try:
            k_ct = crypto.rsa_encrypt(client_pk, base64.b64encode(key).decode("ascii"))
            iv_ct = crypto.rsa_encrypt(client_pk, base64.b64encode(iv).decode("ascii"))
        except (crypto.CryptoError, ValueError, TypeError):
            return None, None
        return (key, iv), twinkeys.response_fields(c2d_key_ct, c2d_iv_ct, k_ct, iv_ct)

    # -- npt_request (K5') ---------------------------------------------------------------------

    def on_npt_request(self, req: Request, client_public_key: str) -> NptPlan | Reply | Ignore:
        """Verify, check permit-open and plan one npt session (K5' -> K6).

        Order as the official daemon: signature (an error reply naming it, as Dart's npt
        path does), fields, then ours: freshness and replay; then permit-open (deny unless
        ``--permit-open`` lists ``host:port``, ``*:port``, ``host:*`` or ``*:*``).
        """
        try:
            payload = verify_envelope(req.value, client_public_key)
        except SignatureError as exc:
            sid = _peek_session_id(req.value)
            if sid is None:
                return Ignore("bad_signature", f"npt_request from {req.sender}: {exc}",
                              logging.WARNING, req.sender)
            return self._error_reply(req.sender, sid, ERR_SIGNATURE.format(err=exc))
        try:
            nr = NptRequest.from_dict(payload)
            sid = validate_session_id(nr.session_id)
        except ProtocolError as exc:
            return Ignore("bad_request", f"ignoring malformed npt_request from {req.sender}: "
                          f"{exc}", logging.WARNING, req.sender)
        refused = self._fresh(sid, nr.client_nonce, req.sender)
        if refused is not None:
            return refused
        target = f"{nr.requested_host}:{nr.requested_port}"
        if not nr.requested_host or not permitted(nr.requested_host, nr.requested_port,
                                                  self.config.permit_open):
            return self._error_reply(req.sender, sid, ERR_DAEMON_PERMIT.format(target=target))
        if not nr.encrypt_rvd_traffic:
            # ours: the device never carries an npt session in clear over the relay
            return self._error_reply(req.sender, sid, ERR_TUNNEL.format(
                err="this daemon requires encryptRvdTraffic (npt --encrypt-rvd-traffic)"))
        official = self.config.official_reply
        cipher_id = negotiate_cipher(None if official else nr.np_ciphers,
                                     self.supported_ciphers)
        key, iv = self._randbytes(KEY_LEN), self._randbytes(IV_LEN)
        try:
            assert nr.client_ephemeral_pk is not None  # from_dict checked it
            aes_ct = crypto.rsa_encrypt(nr.client_ephemeral_pk,
                                        base64.b64encode(key).decode("ascii"))
            iv_ct = crypto.rsa_encrypt(nr.client_ephemeral_pk,
                                       base64.b64encode(iv).decode("ascii"))
        except (crypto.CryptoError, ValueError, TypeError) as exc:
            return self._error_reply(req.sender, sid, ERR_TUNNEL.format(
                err=f"unusable clientEphemeralPK ({type(exc).__name__})"))
        auth_line = None
        if nr.authenticate_to_rvd:
            assert nr.client_nonce is not None and nr.rvd_nonce is not None
            auth_line = relay_auth_line(sid, nr.client_nonce, nr.rvd_nonce, self._signing_key)
        # Dart's npt response has no ephemeralPrivateKey; the C daemon's has it null
        resp = SessionResponse(session_id=sid, status="connected", session_aes_key=aes_ct,
                               session_iv=iv_ct,
                               np_cipher=cipher_id if nr.np_ciphers and not official else None,
                               omit_ephemeral_private_key=not official)
        key_name = _name(session_response_key(req.sender, sid, self.config.device,
                                              self.config.atsign))
        idle = min(max(nr.timeout_ms / 1000.0, NPT_MIN_IDLE_S), NPT_MAX_IDLE_S)
        return NptPlan(
            session_id=sid, client=req.sender, relay_host=nr.rvd_host,
            relay_port=nr.rvd_port, auth_line=auth_line, cipher_id=cipher_id, key=key, iv=iv,
            target_host=nr.requested_host, target_port=nr.requested_port, idle_timeout=idle,
            response=Reply(req.sender, key_name, sign_envelope(resp.to_dict(),
                                                               self._signing_key),
                           session_id=sid))

    def npt_failed(self, plan: NptPlan, err: str) -> Reply:
        """The official reply when the relay cannot be reached for an npt session."""
        return self._error_reply(plan.client, plan.session_id, ERR_TUNNEL.format(err=err))


def _peek_session_id(value: str) -> str | None:
    """The sessionId of an unverifiable envelope, only to address the official error reply."""
    try:
        env = dart_json_decode(value)
        sid = env["payload"]["sessionId"]
        return validate_session_id(sid)
    except (ProtocolError, KeyError, TypeError):
        return None


__all__ = [
    "CIPHER_AES_CTR", "AddClientKey", "DaemonHandler", "Fresh", "Ignore", "Inbound",
    "NptPlan", "Reply", "Request", "SessionPlan", "ShareRecord", "check_request_time", "permitted",
]


def _sender(atsign: str | None) -> str:
    """A notification's sender under the one atSign rule; '' (never authorized) if invalid."""
    try:
        return normalize_atsign(atsign or "")
    except InvalidAtSign:
        return ""
