"""NoPorts v5 control messages M1-M6 (docs/reference/noports-protocol.md#message-catalogue) as dataclasses.

Why dataclasses with explicit ``to_dict``: field names *and order* are part of the wire format
(signatures are over Dart's insertion-ordered JSON), so each ``to_dict`` lists the official
fields in the official order, then our additions (``npCiphers``/``npCipher``, ``hostKeys``),
then unknown fields we received (``extra``) so a round trip keeps a newer peer's fields.

``from_json`` type-checks like the Dart daemon: required fields must be present with the right
type, optional v5 fields may be missing or null (missing booleans mean ``false``), anything
else raises :class:`ProtocolError` naming the field.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .dartjson import dart_json_decode, dart_json_encode
from .errors import ProtocolError

#: cipher ids for our negotiation field; absent = the official AES-256-CTR.
CIPHER_AES_CTR = "aes-256-ctr"
CIPHER_CHACHA20_POLY1305 = "chacha20-poly1305-v1"
EPHEMERAL_PK_TYPE_RSA2048 = "rsa2048"
NPT_DEFAULT_TIMEOUT_MS = 60_000

#: daemon feature names (features.dart: "Do not change the names of existing features").
FEATURE_SR_AUTH = "srAuth"
FEATURE_SR_E2EE = "srE2ee"
FEATURE_ACCEPTS_PUBLIC_KEYS = "acceptsPublicKeys"
FEATURE_PORT_CHOICE = "supportsPortChoice"
FEATURE_ADJUSTABLE_TIMEOUT = "adjustableTimeout"

_MISSING = object()
_HOST_KEY_RE = re.compile(r"[a-z0-9][a-z0-9@.\-]* [A-Za-z0-9+/]+={0,2}( [\x20-\x7e]*)?")


# --- field checking helpers --------------------------------------------------------------------

_DART_NAMES = {bool: "bool", int: "int", str: "String", list: "List", dict: "Map"}


def _type_name(v: Any) -> str:
    """Dart-style name of a decoded JSON value's type, for error messages."""
    return "null" if v is None else _DART_NAMES.get(type(v), type(v).__name__)


def _check(msg: str, data: Mapping[str, Any], name: str, typ: type, *,
           required: bool = False, default: Any = None) -> Any:
    """Return data[name] if it has type ``typ``; missing/null -> default (or error if required)."""
    v = data.get(name, _MISSING)
    if v is _MISSING or v is None:
        if required:
            raise ProtocolError(f"{msg}: required field {name!r} is "
                                f"{'missing' if v is _MISSING else 'null'}")
        return default
    ok = isinstance(v, bool) if typ is bool else (
        isinstance(v, int) and not isinstance(v, bool) if typ is int else isinstance(v, typ))
    if not ok:
        raise ProtocolError(f"{msg}: field {name!r} should be a {_DART_NAMES[typ]} but is a "
                            f"{_type_name(v)} ({v!r})")
    return v


def _check_str_list(msg: str, data: Mapping[str, Any], name: str) -> list[str] | None:
    v = _check(msg, data, name, list)
    if v is not None and not all(isinstance(x, str) for x in v):
        raise ProtocolError(f"{msg}: field {name!r} should be a list of strings: {v!r}")
    return v


def _load_object(msg: str, text: str | bytes | Mapping[str, Any]) -> dict[str, Any]:
    data = dict(text) if isinstance(text, Mapping) else dart_json_decode(text)
    if not isinstance(data, dict):
        raise ProtocolError(f"{msg}: expected a JSON object, got {_type_name(data)}")
    return data


def _extra(data: Mapping[str, Any], known: tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k not in known}


def _nonneg_port(msg: str, name: str, port: int) -> int:
    if not 0 < port < 65536:
        raise ProtocolError(f"{msg}: field {name!r} is not a TCP port: {port}")
    return port


class _JsonMessage:
    """Shared ``to_json``/``from_json`` plumbing; subclasses define to_dict/from_dict."""

    FIELDS: ClassVar[tuple[str, ...]] = ()

    def to_dict(self) -> dict[str, Any]:  # pragma: no cover - overridden
        raise NotImplementedError

    def to_json(self) -> str:
        """Dart-identical JSON text of :meth:`to_dict` (what gets signed / sent)."""
        return dart_json_encode(self.to_dict())

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]):  # pragma: no cover - overridden
        raise NotImplementedError

    @classmethod
    def from_json(cls, text: str | bytes | Mapping[str, Any]):
        """Parse and type-check JSON text (or an already decoded payload dict)."""
        return cls.from_dict(_load_object(cls.__name__, text))


# --- M1 relay request --------------------------------------------------------------------------

@dataclass
class RelayRequest(_JsonMessage):
    """M1: client -> relay on K1 (``SocketRendezvousRequestMessage``)."""

    session_id: str
    atsign_a: str
    atsign_b: str
    client_nonce: str
    authenticate_socket_a: bool = True
    authenticate_socket_b: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    FIELDS: ClassVar[tuple[str, ...]] = ("sessionId", "atSignA", "atSignB", "authenticateSocketA",
                                         "authenticateSocketB", "clientNonce")

    def to_dict(self) -> dict[str, Any]:
        return {"sessionId": self.session_id, "atSignA": self.atsign_a, "atSignB": self.atsign_b,
                "authenticateSocketA": self.authenticate_socket_a,
                "authenticateSocketB": self.authenticate_socket_b,
                "clientNonce": self.client_nonce, **self.extra}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RelayRequest:
        m = "relay request"
        # srvd requires these four strings and authenticateSocketA; it never type-checks B (a
        # bug, docs/reference/noports-protocol.md#message-catalogue) - we do, treating a missing B like a missing A: false.
        return cls(session_id=_check(m, data, "sessionId", str, required=True),
                   atsign_a=_check(m, data, "atSignA", str, required=True),
                   atsign_b=_check(m, data, "atSignB", str, required=True),
                   client_nonce=_check(m, data, "clientNonce", str, required=True),
                   authenticate_socket_a=_check(m, data, "authenticateSocketA", bool,
                                                required=True),
                   authenticate_socket_b=_check(m, data, "authenticateSocketB", bool,
                                                default=False),
                   extra=_extra(data, cls.FIELDS))


# --- M2 relay response -------------------------------------------------------------------------

@dataclass
class RelayResponse:
    """M2: relay -> client on K2, CSV ``ip,portA,portB,rvdNonce``; portA = client side."""

    host: str
    port_a: int
    port_b: int
    rvd_nonce: str | None

    def to_csv(self) -> str:
        nonce = "null" if self.rvd_nonce is None else self.rvd_nonce
        return f"{self.host},{self.port_a},{self.port_b},{nonce}"

    @classmethod
    def from_csv(cls, text: str) -> RelayResponse:
        """Parse CSV; tolerates the legacy 3-field form and ``,null`` (both -> rvd_nonce None).

        A JSON object (newer relays' ``sendJsonResponse`` form, docs/reference/noports-protocol.md#newer-protocol-versions) is accepted too.
        """
        m = "relay response"
        if not isinstance(text, str):
            raise ProtocolError(f"{m}: expected a string, got {_type_name(text)}")
        text = text.strip()
        if text.startswith("{"):
            data = _load_object(m, text)
            host = _check(m, data, "address", str, required=True)
            pa = _check(m, data, "portA", int, required=True)
            pb = _check(m, data, "portB", int, required=True)
            nonce = _check(m, data, "rvdNonce", str)
        else:
            parts = text.split(",")
            if len(parts) not in (3, 4):
                raise ProtocolError(
                    f"{m}: expected 'host,portA,portB[,rvdNonce]', got {len(parts)} fields: "
                    f"{text!r}")
            host = parts[0]
            try:
                pa, pb = int(parts[1]), int(parts[2])
            except ValueError as exc:
                raise ProtocolError(f"{m}: ports must be integers: {text!r}") from exc
            nonce = parts[3] if len(parts) == 4 and parts[3] not in ("", "null") else None
        if not host:
            raise ProtocolError(f"{m}: empty host")
        return cls(host, _nonneg_port(m, "portA", pa), _nonneg_port(m, "portB", pb), nonce)


# --- M3 ssh_request ----------------------------------------------------------------------------

@dataclass
class SshRequest(_JsonMessage):
    """M3: client -> daemon on K5, inside a signed envelope (``SshnpSessionRequest``).

    ``np_ciphers`` (our addition, wire name ``npCiphers``) offers stream ciphers in preference
    order; an official daemon ignores it and answers without ``npCipher`` -> AES-256-CTR.
    """

    session_id: str
    host: str
    port: int
    direct: bool = True
    authenticate_to_rvd: bool = False
    client_nonce: str | None = None
    rvd_nonce: str | None = None
    encrypt_rvd_traffic: bool = False
    client_ephemeral_pk: str | None = None
    client_ephemeral_pk_type: str | None = None
    np_ciphers: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    FIELDS: ClassVar[tuple[str, ...]] = (
        "direct", "sessionId", "host", "port", "authenticateToRvd", "clientNonce", "rvdNonce",
        "encryptRvdTraffic", "clientEphemeralPK", "clientEphemeralPKType", "npCiphers")

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "direct": self.direct, "sessionId": self.session_id, "host": self.host,
            "port": self.port, "authenticateToRvd": self.authenticate_to_rvd,
            "clientNonce": self.client_nonce, "rvdNonce": self.rvd_nonce,
            "encryptRvdTraffic": self.encrypt_rvd_traffic,
            "clientEphemeralPK": self.client_ephemeral_pk,
            "clientEphemeralPKType": self.client_ephemeral_pk_type}
        if self.np_ciphers is not None:
            d["npCiphers"] = list(self.np_ciphers)
        d.update(self.extra)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SshRequest:
        m = "ssh_request"
        direct = _check(m, data, "direct", bool, required=True)
        if not direct:
            # Dart's fromJson never reads username/remoteForwardPort/privateKey, so direct:false
            # always fails there too; reverse ssh only exists via the legacy 'sshd' message.
            raise ProtocolError(f"{m}: direct:false (reverse ssh) is not supported")
        req = cls(
            session_id=_check(m, data, "sessionId", str, required=True),
            host=_check(m, data, "host", str, required=True),
            port=_check(m, data, "port", int, required=True),
            direct=direct,
            authenticate_to_rvd=_check(m, data, "authenticateToRvd", bool, default=False),
            client_nonce=_check(m, data, "clientNonce", str),
            rvd_nonce=_check(m, data, "rvdNonce", str),
            encrypt_rvd_traffic=_check(m, data, "encryptRvdTraffic", bool, default=False),
            client_ephemeral_pk=_check(m, data, "clientEphemeralPK", str),
            client_ephemeral_pk_type=_check(m, data, "clientEphemeralPKType", str),
            np_ciphers=_check_str_list(m, data, "npCiphers"),
            extra=_extra(data, cls.FIELDS))
        _nonneg_port(m, "port", req.port)
        _check_v5_consistency(m, req.authenticate_to_rvd, req.client_nonce, req.rvd_nonce,
                              req.encrypt_rvd_traffic, req.client_ephemeral_pk,
                              req.client_ephemeral_pk_type)
        return req


def _check_v5_consistency(m: str, auth: bool, cn: str | None, rn: str | None, enc: bool,
                          pk: str | None, pk_type: str | None) -> None:
    """What the C daemon enforces: nonces when authenticating, an rsa2048 PK when encrypting."""
    if auth and (cn is None or rn is None):
        raise ProtocolError(f"{m}: authenticateToRvd is true but "
                            f"{'clientNonce' if cn is None else 'rvdNonce'} is missing")
    if enc:
        if pk is None:
            raise ProtocolError(f"{m}: encryptRvdTraffic is true but clientEphemeralPK is missing")
        if pk_type != EPHEMERAL_PK_TYPE_RSA2048:
            raise ProtocolError(f"{m}: clientEphemeralPKType must be 'rsa2048', got {pk_type!r}")


# --- M4 npt_request ----------------------------------------------------------------------------

@dataclass
class NptRequest(_JsonMessage):
    """M4: client -> daemon on K5', signed (``NptSessionRequest``); timeout in milliseconds."""

    session_id: str
    rvd_host: str
    rvd_port: int
    requested_port: int
    requested_host: str = "localhost"
    authenticate_to_rvd: bool = True
    client_nonce: str | None = None
    rvd_nonce: str | None = None
    encrypt_rvd_traffic: bool = True
    client_ephemeral_pk: str | None = None
    client_ephemeral_pk_type: str | None = EPHEMERAL_PK_TYPE_RSA2048
    timeout_ms: int = NPT_DEFAULT_TIMEOUT_MS
    np_ciphers: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    FIELDS: ClassVar[tuple[str, ...]] = (
        "sessionId", "rvdHost", "rvdPort", "requestedPort", "requestedHost", "authenticateToRvd",
        "clientNonce", "rvdNonce", "encryptRvdTraffic", "clientEphemeralPK",
        "clientEphemeralPKType", "timeout", "npCiphers")

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "sessionId": self.session_id, "rvdHost": self.rvd_host, "rvdPort": self.rvd_port,
            "requestedPort": self.requested_port, "requestedHost": self.requested_host,
            "authenticateToRvd": self.authenticate_to_rvd, "clientNonce": self.client_nonce,
            "rvdNonce": self.rvd_nonce, "encryptRvdTraffic": self.encrypt_rvd_traffic,
            "clientEphemeralPK": self.client_ephemeral_pk,
            "clientEphemeralPKType": self.client_ephemeral_pk_type, "timeout": self.timeout_ms}
        if self.np_ciphers is not None:
            d["npCiphers"] = list(self.np_ciphers)
        d.update(self.extra)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NptRequest:
        m = "npt_request"
        req = cls(
            session_id=_check(m, data, "sessionId", str, required=True),
            rvd_host=_check(m, data, "rvdHost", str, required=True),
            rvd_port=_check(m, data, "rvdPort", int, required=True),
            requested_port=_check(m, data, "requestedPort", int, required=True),
            requested_host=_check(m, data, "requestedHost", str, required=True),
            authenticate_to_rvd=_check(m, data, "authenticateToRvd", bool, default=False),
            client_nonce=_check(m, data, "clientNonce", str),
            rvd_nonce=_check(m, data, "rvdNonce", str),
            encrypt_rvd_traffic=_check(m, data, "encryptRvdTraffic", bool, default=False),
            client_ephemeral_pk=_check(m, data, "clientEphemeralPK", str),
            client_ephemeral_pk_type=_check(m, data, "clientEphemeralPKType", str),
            timeout_ms=_check(m, data, "timeout", int, default=NPT_DEFAULT_TIMEOUT_MS),
            np_ciphers=_check_str_list(m, data, "npCiphers"),
            extra=_extra(data, cls.FIELDS))
        _nonneg_port(m, "rvdPort", req.rvd_port)
        _nonneg_port(m, "requestedPort", req.requested_port)
        if req.timeout_ms < 0:
            raise ProtocolError(f"{m}: field 'timeout' must not be negative: {req.timeout_ms}")
        _check_v5_consistency(m, req.authenticate_to_rvd, req.client_nonce, req.rvd_nonce,
                              req.encrypt_rvd_traffic, req.client_ephemeral_pk,
                              req.client_ephemeral_pk_type)
        return req


# --- M5 session response -----------------------------------------------------------------------

@dataclass
class SessionResponse(_JsonMessage):
    """M5: daemon -> client on K6, signed. Ours adds ``hostKeys`` and ``npCipher``.

    ``omit_ephemeral_private_key`` reproduces the Dart npt response, which has no
    ``ephemeralPrivateKey`` field at all (the C daemon sends null instead).
    """

    session_id: str
    status: str = "connected"
    ephemeral_private_key: str | None = None
    session_aes_key: str | None = None
    session_iv: str | None = None
    host_keys: list[str] | None = None
    np_cipher: str | None = None
    omit_ephemeral_private_key: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    FIELDS: ClassVar[tuple[str, ...]] = ("status", "sessionId", "ephemeralPrivateKey",
                                         "sessionAESKey", "sessionIV", "hostKeys", "npCipher")

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"status": self.status, "sessionId": self.session_id}
        if not self.omit_ephemeral_private_key:
            d["ephemeralPrivateKey"] = self.ephemeral_private_key
        d["sessionAESKey"] = self.session_aes_key
        d["sessionIV"] = self.session_iv
        if self.host_keys is not None:
            d["hostKeys"] = list(self.host_keys)
        if self.np_cipher is not None:
            d["npCipher"] = self.np_cipher
        d.update(self.extra)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SessionResponse:
        m = "session response"
        host_keys = _check_str_list(m, data, "hostKeys")
        for hk in host_keys or ():
            if not is_openssh_public_key_line(hk):
                raise ProtocolError(f"{m}: hostKeys entry is not an OpenSSH public key line: "
                                    f"{hk[:60]!r}")
        return cls(
            status=_check(m, data, "status", str, required=True),
            session_id=_check(m, data, "sessionId", str, required=True),
            ephemeral_private_key=_check(m, data, "ephemeralPrivateKey", str),
            session_aes_key=_check(m, data, "sessionAESKey", str),
            session_iv=_check(m, data, "sessionIV", str),
            host_keys=host_keys,
            np_cipher=_check(m, data, "npCipher", str),
            omit_ephemeral_private_key="ephemeralPrivateKey" not in data,
            extra=_extra(data, cls.FIELDS))


# --- M6 ping response / device info ------------------------------------------------------------

@dataclass
class DeviceInfo(_JsonMessage):
    """M6: daemon's ping response (K4) and device_info record (K9); unsigned.

    ``device_group_name`` None means "field absent" (C daemon, Dart < 5.4).
    ``supported_features`` None means "field absent" (v4 daemon).
    """

    devicename: str
    version: str
    core_package_version: str
    supported_features: dict[str, bool] | None = None
    allowed_services: list[str] | None = None
    device_group_name: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    FIELDS: ClassVar[tuple[str, ...]] = ("devicename", "deviceGroupName", "version",
                                         "corePackageVersion", "supportedFeatures",
                                         "allowedServices")

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"devicename": self.devicename}
        if self.device_group_name is not None:
            d["deviceGroupName"] = self.device_group_name
        d["version"] = self.version
        d["corePackageVersion"] = self.core_package_version
        if self.supported_features is not None:
            d["supportedFeatures"] = dict(self.supported_features)
        if self.allowed_services is not None:
            d["allowedServices"] = list(self.allowed_services)
        d.update(self.extra)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DeviceInfo:
        m = "device info"
        feats = _check(m, data, "supportedFeatures", dict)
        if feats is not None:
            for k, v in feats.items():
                if not isinstance(v, bool):
                    raise ProtocolError(f"{m}: supportedFeatures.{k} should be a bool but is a "
                                        f"{_type_name(v)}")
        return cls(devicename=_check(m, data, "devicename", str, required=True),
                   device_group_name=_check(m, data, "deviceGroupName", str),
                   version=_check(m, data, "version", str, default=""),
                   core_package_version=_check(m, data, "corePackageVersion", str, default=""),
                   supported_features=feats,
                   allowed_services=_check_str_list(m, data, "allowedServices"),
                   extra=_extra(data, cls.FIELDS))

    def effective_features(self) -> dict[str, bool]:
        """Features as the Dart client sees them: no map at all (v4) = acceptsPublicKeys only."""
        if self.supported_features is None:
            return {FEATURE_ACCEPTS_PUBLIC_KEYS: True}
        return dict(self.supported_features)

    def missing_features(self, required: list[str] | tuple[str, ...]) -> list[str]:
        """Required features the daemon does not advertise as true (client step 8)."""
        feats = self.effective_features()
        return [f for f in required if not feats.get(f, False)]


# --- helpers -----------------------------------------------------------------------------------

def is_openssh_public_key_line(line: str) -> bool:
    """``<type> <base64 blob> [comment]`` on one printable line, blob naming the same type.

    Host keys end up in known_hosts, so a newline or a forged blob must never get through.
    """
    if not isinstance(line, str) or not _HOST_KEY_RE.fullmatch(line):
        return False
    ktype, blob_b64 = line.split(" ")[:2]
    try:
        blob = base64.b64decode(blob_b64, validate=True)
    except ValueError:
        return False
    if len(blob) < 4:
        return False
    n = int.from_bytes(blob[:4], "big")
    return blob[4:4 + n] == ktype.encode("ascii") and len(blob) > 4 + n


def negotiate_cipher(offered: list[str] | None, supported: tuple[str, ...] | list[str]) -> str:
    """Daemon side: first client-offered cipher we support; no offer = official AES-CTR."""
    for c in offered or ():
        if c in supported:
            return c
    return CIPHER_AES_CTR


def is_daemon_error(value: str) -> bool:
    """A K6 value that is not a JSON object is a plain error string (Dart: not starting '{')."""
    return not value.startswith("{")
