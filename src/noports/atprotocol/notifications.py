"""Notifications: model, monitor/stats lines, notify keys and server-to-server bodies.

The wire shapes are those of the Dart server (docs/reference/atprotocol.md#notification-verbs, docs/reference/atprotocol.md#notification-delivery, docs/reference/atprotocol.md#notifications): the Python SDK and
Dart clients parse monitor lines by fixed prefixes and field names, and other atServers parse
our ``notify:`` bodies with the at_commons notify regex, whose field order is significant.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from noports.npproto.dartjson import dart_json_encode

from .keys import format_atsign
from .metadata import dart_date

# Metadata keys of the monitor line (monitor_verb_handler.dart `Notification`).
_LIVE_META = ("encKeyName", "encAlgo", "ivNonce", "skeEncKeyName", "skeEncAlgo", "sharedKeyEnc")
_REPLAY_META = ("encKeyName", "encAlgo", "ivNonce", "skeEncKeyName", "skeEncAlgo")


@dataclass
class Notification:
    """AtNotification: one stored notification, sent, received or self."""

    id: str
    from_atsign: str
    to_atsign: str
    key: str
    value: str | None = None
    operation: str = "update"  # update | delete
    message_type: str = "key"  # key | text
    epoch_millis: int = 0  # notificationDateTime, set by the server storing it
    expires_at: int | None = None
    is_encrypted: bool = False
    metadata: dict = field(default_factory=dict)  # camelCase keys, e.g. ivNonce, ttr, ccd
    notifier: str = "SYSTEM"
    strategy: str = "all"
    priority: str = "low"
    status: str = "queued"  # queued | delivered | errored | expired
    type: str = "sent"  # sent | received | self
    retry_count: int = 1
    ttl_ms: int | None = None
    latest_n: int = 1
    available_at: int | None = None

    def is_expired(self, now_ms: int) -> bool:
        """Expired notifications are hidden from list/replay and report status ``expired``."""
        return self.expires_at is not None and self.expires_at < now_ms


def _dump(obj: object) -> str:
    return dart_json_encode(obj)  # the Dart server's jsonEncode, byte for byte


def _date_str(ms: object) -> str:
    # Dart `DateTime?.toString()`: a missing date becomes the *string* "null".
    return dart_date(ms) if isinstance(ms, int) and not isinstance(ms, bool) else "null"


def monitor_map(n: Notification, *, replay: bool) -> dict:
    """The JSON object of a monitor line / notify:list entry (docs/reference/atprotocol.md#monitor-line-json), in Dart's field order."""
    meta = n.metadata or {}
    if replay:
        md: dict = {k: meta.get(k) for k in _REPLAY_META}
        md["availableAt"] = _date_str(meta.get("availableAt", n.available_at))
        md["expiresAt"] = _date_str(meta.get("expiresAt") or n.expires_at)
    else:
        md = {k: meta.get(k) for k in _LIVE_META}
    return {
        "id": n.id,
        "from": n.from_atsign,
        "to": n.to_atsign,
        "key": n.key,
        "value": n.value,
        "operation": n.operation,
        "epochMillis": n.epoch_millis,
        "messageType": f"MessageType.{n.message_type}",
        "isEncrypted": bool(n.is_encrypted),
        "metadata": md,
    }


def monitor_line(n: Notification, *, replay: bool) -> str:
    """``notification: {json}`` (no newline) for a monitor connection."""
    return "notification: " + _dump(monitor_map(n, replay=replay))


def stats_line(atsign: str, last_commit_id: int, now_ms: int) -> str:
    """The periodic/after-write stats notification (docs/reference/atprotocol.md#stats-notifications); clients key on id ``-1``."""
    body = {
        "id": "-1",
        "from": atsign,
        "to": atsign,
        "key": f"statsNotification.{atsign}",
        "value": str(last_commit_id),
        "operation": "update",
        "epochMillis": now_ms,
        "messageType": "MessageType.key",
        "isEncrypted": False,
        "metadata": None,
    }
    return "notification: " + _dump(body)


def _format_atsign(s: str | None) -> str | None:
    return format_atsign(s)  # AtUtils.formatAtSign: prefix '@' if missing; no lower-casing


def notification_key(params: dict, *, from_atsign: str) -> str:
    """Key of a notification from parsed ``notify`` params (NotifyVerbHandler rules).

    * messageType text: ``@to:<text>`` (the text is the "key", the value is null);
    * key starting ``public``: ``<atKey>@owner`` (``notify:…:@bob:public:x@alice``);
    * ``public`` scope without a recipient: ``public:<atKey>@owner`` (Dart prints ``null:``);
    * otherwise ``@to:<atKey>@owner``.

    ``from_atsign`` is the owner used when the command carries no ``@owner``.
    """
    to = _format_atsign(params.get("forAtSign"))
    at_key = params.get("atKey", "")
    if str(params.get("messageType", "key")).lower() == "text":
        return f"{to}:{at_key}"
    owner = _format_atsign(params.get("atSign")) or _format_atsign(from_atsign) or ""
    if at_key.startswith("public"):
        return f"{at_key}{owner}"
    if to is None:
        return f"public:{at_key}{owner}"
    return f"{to}:{at_key}{owner}"


def _lower_bool(v: object) -> str:
    if isinstance(v, str):
        return v.lower()
    return "true" if v else "false"


def s2s_notify_command(n: Notification) -> str:
    """``notify:…`` command (no newline) that delivers ``n`` to the recipient's server (docs/reference/atprotocol.md#notification-delivery).

    Field order follows the notify regex so the receiver parses it. The metadata part
    (ttl…skeEncAlgo, including ``isEncrypted``) is sent when ``n.metadata`` is non-empty or
    ``n.is_encrypted`` is true.
    """
    parts = [f"id:{n.id}", n.operation, f"messageType:{n.message_type}"]
    parts.append(f"notifier:{n.notifier}")
    if n.ttl_ms is not None:
        parts.append(f"ttln:{n.ttl_ms}")
    meta = n.metadata or {}
    if meta or n.is_encrypted:
        for name in ("ttl", "ttb"):
            if meta.get(name) is not None:
                parts.append(f"{name}:{meta[name]}")
        if meta.get("ttr") is not None:
            parts.append(f"ttr:{meta['ttr']}")
            parts.append(f"ccd:{_lower_bool(meta.get('ccd', False))}")
        parts.append(f"isEncrypted:{_lower_bool(n.is_encrypted)}")
        for name in (
            "sharedKeyEnc",
            "pubKeyCS",
            "encKeyName",
            "encAlgo",
            "ivNonce",
            "skeEncKeyName",
            "skeEncAlgo",
        ):
            if meta.get(name) is not None:
                parts.append(f"{name}:{meta[name]}")
    parts.append(n.key)
    if n.value is not None:
        parts.append(n.value)
    return "notify:" + ":".join(parts)


def notify_list_json(ns: list[Notification]) -> str:
    """Body of ``notify:list`` (without ``data:``): JSON array in the replay form, or ``null``."""
    if not ns:
        return "null"
    return _dump([monitor_map(n, replay=True) for n in ns])


def to_storage(n: Notification) -> dict:
    """Lossless plain dict for a JSON storage column."""
    return asdict(n)


def from_storage(d: dict) -> Notification:
    """Inverse of :func:`to_storage`; unknown keys ignored."""
    names = {f.name for f in fields(Notification)}
    data = {k: v for k, v in d.items() if k in names}
    data["metadata"] = dict(data.get("metadata") or {})
    return Notification(**data)
