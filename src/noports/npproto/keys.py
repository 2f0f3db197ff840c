"""NoPorts v5 atKey names (docs/reference/noports-protocol.md#key-names, K1-K9) and the monitor regexes of each role.

Why a module of its own: the key names are the routing layer of NoPorts. An extra dot or a
wrong namespace and an official daemon/relay silently ignores the notification, so every
name is built and parsed here, from validated parts, and nowhere else.

Notation: C = client atSign, D = device atSign, R = relay atSign, ``dev`` = device name,
``sid`` = session id (UUID v4). Shared keys read ``@recipient:<name>@sender``.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass

from noports.atprotocol.atsign import InvalidAtSign
from noports.atprotocol.atsign import normalize_atsign as _normalize_atsign

from .errors import ProtocolError

SSHNP_NS = "sshnp"
RELAY_NS = "sshrvd"  # the relay kept its old namespace after the srvd rename

#: Official rule (noports_core validation_utils.dart, 6.2.0+): ``[a-z0-9_][a-z0-9_\-]{1,35}``
#: matched against the whole name, i.e. 2-36 characters, lower-case alnum, ``_`` and ``-``
#: (not first). Older releases were stricter (first char not ``_``; before 6.2.0 no ``-``;
#: v3: ``[a-zA-Z0-9_]{0,15}``), so plain ``[a-z0-9_]`` names are the most portable.
DEVICE_NAME_RE = re.compile(r"[a-z0-9_][a-z0-9_\-]{1,35}")
DEVICE_NAME_MAX = 36

_UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")

#: Values of K3 and of daemon kinds dispatched on (sshnpd_impl.dart ``_notificationHandler``).
PING_VALUE = "ping"
DAEMON_KINDS = ("privatekey", "sshpublickey", "sshd", "ping", "ssh_request", "npt_request")


# --- validation ----------------------------------------------------------------------------

def snakify_device_name(name: str) -> str:
    """Lower-case and turn whitespace runs into ``_``, as sshnpd does before validating -d."""
    return re.sub(r"\s+", "_", name.lower())


def validate_device_name(name: str) -> str:
    """Return ``name`` if it is a valid device name, else raise a ProtocolError saying why."""
    if not isinstance(name, str):
        raise ProtocolError(f"device name must be a string, got {type(name).__name__}")
    if not name:
        raise ProtocolError("device name is empty")
    if len(name) > DEVICE_NAME_MAX:
        raise ProtocolError(
            f"device name {name!r} is {len(name)} characters; the maximum is {DEVICE_NAME_MAX}")
    if len(name) < 2:
        raise ProtocolError(
            f"device name {name!r} is too short: official clients require 2-36 characters")
    if name != name.lower():
        raise ProtocolError(f"device name {name!r} must be lower case")
    if name[0] == "-":
        raise ProtocolError(f"device name {name!r} must not start with '-'")
    if not DEVICE_NAME_RE.fullmatch(name):
        bad = sorted({c for c in name if not re.fullmatch(r"[a-z0-9_\-]", c)})
        raise ProtocolError(
            f"device name {name!r} contains {''.join(bad)!r}: only a-z, 0-9, '_' and '-' "
            "are allowed")
    return name


def normalize_atsign(atsign: str) -> str:
    """``Alice`` / ``@Alice`` -> ``@alice``: the one atSign rule (noports.atprotocol.atsign)."""
    try:
        return _normalize_atsign(atsign)
    except InvalidAtSign as exc:
        raise ProtocolError(f"invalid atSign {atsign!r}: {exc.reason}") from None


def validate_session_id(sid: str) -> str:
    """Session ids are lower-case UUIDs (Dart ``Uuid().v4()``); anything else is refused."""
    if not isinstance(sid, str) or not _UUID_RE.fullmatch(sid):
        raise ProtocolError(f"invalid session id {sid!r}: expected a lower-case UUID")
    return sid


def new_session_id() -> str:
    return str(uuid.uuid4())


def _shared(recipient: str, name: str, sender: str) -> str:
    return f"{normalize_atsign(recipient)}:{name}{normalize_atsign(sender)}"


# --- builders (K1-K9) ----------------------------------------------------------------------

def relay_request_key(relay: str, device: str, client: str) -> str:
    """K1 ``@R:dev.request_ports.sshrvd@C`` (namespaceAware=false, JSON value)."""
    return _shared(relay, f"{validate_device_name(device)}.request_ports.{RELAY_NS}", client)


def legacy_relay_request_key(relay: str, device: str, client: str) -> str:
    """K1' ``@R:dev.sshrvd@C`` (value = the bare session id; only with --no-ac --no-ad)."""
    return _shared(relay, f"{validate_device_name(device)}.{RELAY_NS}", client)


def relay_response_key(client: str, session_id: str, relay: str) -> str:
    """K2 ``@C:sid.sshrvd@R``."""
    return _shared(client, f"{validate_session_id(session_id)}.{RELAY_NS}", relay)


def _device_key(recipient: str, kind: str, device: str, sender: str) -> str:
    return _shared(recipient, f"{kind}.{validate_device_name(device)}.{SSHNP_NS}", sender)


def ping_key(device_atsign: str, device: str, client: str) -> str:
    """K3 ``@D:ping.dev.sshnp@C`` (value ``ping``)."""
    return _device_key(device_atsign, "ping", device, client)


def heartbeat_key(client: str, device: str, device_atsign: str) -> str:
    """K4 ``@C:heartbeat.dev.sshnp@D`` (ping response)."""
    return _device_key(client, "heartbeat", device, device_atsign)


def ssh_request_key(device_atsign: str, device: str, client: str) -> str:
    """K5 ``@D:ssh_request.dev.sshnp@C``."""
    return _device_key(device_atsign, "ssh_request", device, client)


def npt_request_key(device_atsign: str, device: str, client: str) -> str:
    """K5' ``@D:npt_request.dev.sshnp@C``."""
    return _device_key(device_atsign, "npt_request", device, client)


def session_response_key(client: str, session_id: str, device: str, device_atsign: str) -> str:
    """K6 ``@C:sid.dev.sshnp@D`` (signed envelope or plain error string)."""
    return _device_key(client, validate_session_id(session_id), device, device_atsign)


def sshpublickey_key(device_atsign: str, device: str, client: str) -> str:
    """K7 ``@D:sshpublickey.dev.sshnp@C``."""
    return _device_key(device_atsign, "sshpublickey", device, client)


def username_key(client: str, device: str, device_atsign: str) -> str:
    """K8 ``@C:username.dev.sshnp@D``."""
    return _device_key(client, "username", device, device_atsign)


def device_info_key(client: str, device: str, device_atsign: str) -> str:
    """K9 ``@C:device_info.dev.sshnp@D``."""
    return _device_key(client, "device_info", device, device_atsign)


# --- monitor regexes (strings as the official peers send them) -----------------------------

def daemon_subscription_regex(device: str) -> str:
    """sshnpd monitors ``<dev>\\.sshnp@``."""
    return f"{validate_device_name(device)}\\.{SSHNP_NS}@"


def relay_subscription_regex() -> str:
    """srvd monitors ``sshrvd@``."""
    return f"{RELAY_NS}@"


def client_relay_response_regex(session_id: str) -> str:
    """Client waits for the relay with ``<sid>.sshrvd@`` (dots unescaped, as Dart sends it)."""
    return f"{validate_session_id(session_id)}.{RELAY_NS}@"


def client_session_response_regex(session_id: str, device: str, device_atsign: str) -> str:
    """Client waits for the daemon with ``<sid>.<dev>.sshnp@<d>``."""
    return (f"{validate_session_id(session_id)}.{validate_device_name(device)}.{SSHNP_NS}"
            f"{normalize_atsign(device_atsign)}")


def client_heartbeat_regex(device: str) -> str:
    """Client waits for ping responses with ``heartbeat.<dev>.sshnp`` (then checks the sender)."""
    return f"heartbeat.{validate_device_name(device)}.{SSHNP_NS}"


# --- parsing ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class SharedKey:
    """A shared atKey split into its parts; ``name`` is lower-cased like Dart's AtClient does."""

    recipient: str
    name: str
    sender: str


_SHARED_RE = re.compile(r"(?P<to>@[^:@\s]+):(?P<name>[^@\s]+)(?P<from>@[^:@\s]+)")


def split_shared_key(key: str) -> SharedKey:
    """Split ``@to:name@from``; the sender of a notification is authoritative, not this text."""
    m = _SHARED_RE.fullmatch(key.strip().lower()) if isinstance(key, str) else None
    if not m:
        raise ProtocolError(f"not a shared atKey of the form @to:name@from: {key!r}")
    return SharedKey(m["to"], m["name"], m["from"])


@dataclass(frozen=True)
class DaemonKey:
    """An inbound notification for sshnpd: ``kind`` is one of :data:`DAEMON_KINDS`."""

    kind: str
    device: str
    sender: str
    recipient: str


def parse_daemon_key(key: str, device: str) -> DaemonKey:
    """Classify a key received by the daemon for ``device`` (strip ``@to:`` and ``.dev.sshnp@from``)."""
    sk = split_shared_key(key)
    suffix = f".{validate_device_name(device)}.{SSHNP_NS}"
    if not sk.name.endswith(suffix):
        raise ProtocolError(f"key {key!r} is not for device {device!r}")
    kind = sk.name[: -len(suffix)]
    if kind not in DAEMON_KINDS:
        raise ProtocolError(f"unknown daemon request kind {kind!r} in key {key!r}")
    return DaemonKey(kind, device, sk.sender, sk.recipient)


@dataclass(frozen=True)
class RelayKey:
    """An inbound notification for srvd: ``legacy`` is True for K1' (value = bare session id)."""

    device: str
    legacy: bool
    sender: str
    recipient: str


def parse_relay_key(key: str) -> RelayKey:
    """Classify K1 / K1' as the relay receives them."""
    sk = split_shared_key(key)
    tail = f".request_ports.{RELAY_NS}"
    if sk.name.endswith(tail):
        return RelayKey(validate_device_name(sk.name[: -len(tail)]), False, sk.sender,
                        sk.recipient)
    if sk.name.endswith(f".{RELAY_NS}"):
        return RelayKey(validate_device_name(sk.name[: -len(RELAY_NS) - 1]), True, sk.sender,
                        sk.recipient)
    raise ProtocolError(f"not a relay request key: {key!r}")


@dataclass(frozen=True)
class ClientKey:
    """An inbound notification for the client: ``kind`` is relay_response, session_response,
    heartbeat, username or device_info."""

    kind: str
    sender: str
    recipient: str
    device: str | None = None
    session_id: str | None = None


def parse_client_key(key: str) -> ClientKey:
    """Classify K2, K4, K6, K8, K9 as the client receives them."""
    sk = split_shared_key(key)
    parts = sk.name.split(".")
    if len(parts) == 2 and parts[1] == RELAY_NS and _UUID_RE.fullmatch(parts[0]):
        return ClientKey("relay_response", sk.sender, sk.recipient, session_id=parts[0])
    if len(parts) == 2 and parts[1] == RELAY_NS and parts[0] == "discover":
        # a relay answering RelaySelector's probe (docs/decisions/0025-*)
        return ClientKey("relay_discover", sk.sender, sk.recipient, session_id="discover")
    if len(parts) == 3 and parts[0] == "nack" and parts[2] == RELAY_NS \
            and _UUID_RE.fullmatch(parts[1]):  # the relay refused (srvd's NACK)
        return ClientKey("relay_nack", sk.sender, sk.recipient, session_id=parts[1])
    if len(parts) == 3 and parts[2] == SSHNP_NS:
        first, dev = parts[0], validate_device_name(parts[1])
        if first in ("heartbeat", "username", "device_info"):
            return ClientKey(first, sk.sender, sk.recipient, device=dev)
        if _UUID_RE.fullmatch(first):
            return ClientKey("session_response", sk.sender, sk.recipient, device=dev,
                             session_id=first)
    raise ProtocolError(f"not a key a NoPorts client expects: {key!r}")
