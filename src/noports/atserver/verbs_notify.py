"""Notification verbs: notify, notify:all, notify:list, notify:status, notify:fetch,
notify:remove (docs/reference/atprotocol.md#notification-verbs, docs/reference/atprotocol.md#notifications).

Why together: they share how a notification is built from request parameters, stored
(sent / received / self) and handed to live monitors through the host.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from typing import Any

from noports import trace
from noports.atprotocol import keys as K
from noports.atprotocol import metadata as M
from noports.atprotocol import notifications as N
from noports.atprotocol.errors import (
    illegal_argument,
    invalid_key,
    invalid_syntax,
    unauthenticated,
    unauthorized,
)
from noports.atprotocol.grammar import Command

from . import clientregex
from .context import Conn, Reply, client_int, dumps, int_or_none, remove_nulls
from .store import NotificationRow


def notif_meta(meta: Any, p: dict[str, str] | None = None) -> dict[str, Any]:
    """The metadata a notification carries (and forwards, docs/reference/atprotocol.md#notification-delivery)."""
    if meta is None:
        return {}
    j = remove_nulls(M.to_json(meta))
    keep = ("ttl", "ttb", "ttr", "ccd", "isEncrypted", "sharedKeyEnc", "pubKeyCS", "encKeyName",
            "encAlgo", "ivNonce", "skeEncKeyName", "skeEncAlgo", "dataSignature", "isBinary",
            "encoding", "sharedKeyStatus")
    return {k: j[k] for k in keep if k in j}


def sent_row(s: Conn, n: Any, now: int) -> NotificationRow:
    return NotificationRow(
        atsign=s.me, id=n.id, kind="sent", from_atsign=n.from_atsign,
        to_atsign=n.to_atsign, key=n.key, status="queued", retry_count=0, next_attempt=now,
        epoch_ms=n.epoch_millis, expires_at=n.expires_at, data=N.to_storage(n))


def store_sent(s: Conn, n: Any, now: int) -> None:
    s.host.store.put_notification(sent_row(s, n, now))
    s.host.nudge()


async def _put_durably(s: Conn, row: NotificationRow, *, sent: bool = False) -> None:
    """Commit ``row``; on disk when this returns. With the host's ``flush`` the fsync
    runs in a thread (walsync.py) so the event loop serves others meanwhile; a sent row
    is handed to the delivery queue as soon as it is committed."""
    flush = s.host.flush
    s.host.store.put_notification(row, durable=flush is None)
    if sent:
        s.host.nudge()
    if flush is not None:
        await flush()


async def send_and_store(s: Conn, n: Any, now: int) -> None:
    """Queue a notification for another atSign, its delivery overlapping the commit.

    Why: the fsync takes milliseconds (more on a busy disk) and a rendezvous crosses four
    notifications. When the recipient's connection is idle and nothing is queued for it,
    the delivery's first write goes out before the commit (``send_early``; one loop turn
    lets it), so the recipient works while we store; otherwise the queue gets the row as
    soon as it is committed, while the fsync runs (``_put_durably``). The client is still
    answered only once the row is on disk; if the commit fails the client gets the error
    while the recipient may have the notification (delivery is at-least-once).
    """
    row = sent_row(s, n, now)
    if s.host.send_early(row):
        await asyncio.sleep(0)  # the delivery task writes its s2s line now
    await _put_durably(s, row, sent=True)


def store_received(s: Conn, n: Any, kind: str = "received") -> NotificationRow:
    """Hand a received/self notification to live monitors, then persist it.

    Why in this order: the commit fsyncs, and a monitor (srvd, sshnpd, a waiting client)
    should not wait for it; the sender is still answered only after the commit. If the
    process dies between the two, the sender saw no ``success`` and sends it again, and
    the monitor sees it twice: delivery is at-least-once, as with a lost acknowledgement.
    """
    row = received_row(s, n, kind)
    s.host.publish(row, n)
    s.host.store.put_notification(row)
    return row


def received_row(s: Conn, n: Any, kind: str = "received") -> NotificationRow:
    return NotificationRow(
        atsign=s.me, id=n.id, kind=kind, from_atsign=n.from_atsign,
        to_atsign=n.to_atsign, key=n.key, status="delivered", retry_count=0,
        next_attempt=0, epoch_ms=n.epoch_millis, expires_at=n.expires_at,
        data=N.to_storage(n))


async def v_notify(s: Conn, cmd: Command) -> Reply:
    p = cmd.params
    if not s.authenticated and not s.pol_atsign:
        raise unauthenticated("Command cannot be executed without auth")
    now = s.host.next_epoch()
    ttln = (client_int("ttln", p["ttln"], lo=0) if p.get("ttln") else 0) \
        or s.host.config.notification_expiry_ms
    if s.authenticated:
        if p.get("atSign") and K.fix_atsign(p["atSign"]) != s.me:
            raise unauthorized(f"{K.fix_atsign(p['atSign'])} is not the current atSign")
        if not p.get("forAtSign"):
            raise invalid_syntax("Invalid syntax. notify needs a recipient @<atSign>")
        to = K.fix_atsign(p["forAtSign"])
        n = build_notification(s, p, from_atsign=s.me, to=to, now=now, ttln=ttln)
        _check_id_owner(s, n, "received" if to == s.me else "sent")
        trace.mark("atserver.notify_in", f"{s.me} {n.key}")
        if to == s.me:
            store_received(s, n)
        else:
            await send_and_store(s, n, now)
        trace.mark("atserver.notify_stored", f"{s.me} {n.key}")
        return s.data(n.id)
    # receiving side: a pol-authenticated peer delivers a notification to us
    sender = s.pol_atsign
    assert sender is not None
    if p.get("atSign") and K.fix_atsign(p["atSign"]) != sender:
        raise unauthorized(f"{sender} cannot notify on behalf of {K.fix_atsign(p['atSign'])}")
    to = K.fix_atsign(p["forAtSign"]) if p.get("forAtSign") else s.me
    if to != s.me:
        raise unauthorized(f"notification for {to} delivered to {s.me}")
    n = build_notification(s, p, from_atsign=sender, to=s.me, now=now, ttln=ttln)
    if _is_redelivery(s, n):
        if s.host.flush is not None:  # the first copy may still be on its way to disk
            await s.host.flush()
        return s.data("success")
    _check_id_owner(s, n, "received")
    trace.mark("atserver.pol_notify_in", f"{s.me} {n.key}")
    row = received_row(s, n)
    s.host.publish(row, n)  # monitors first: see store_received
    await _put_durably(s, row)
    _cache_from_notification(s, n, p)
    trace.mark("atserver.pol_notify_stored", f"{s.me} {n.key}")
    return s.data("success")


def _is_redelivery(s: Conn, n: Any) -> bool:
    """Same id, sender and content as one already stored: a retry after a lost ack.

    Delivery is at-least-once (the sender retries when it did not see `data:success`);
    ignoring exact duplicates keeps monitors and replay free of repeats. A reused id with
    different content (old SDKs reuse ids) is still stored, overwriting as the reference
    server does.
    """
    old = notif_row(s, n.id)
    if old is None or old.kind != "received" or old.from_atsign != n.from_atsign:
        return False
    d = old.data if isinstance(old.data, dict) else {}
    return (d.get("key"), d.get("value"), d.get("operation")) == (n.key, n.value, n.operation)


def _check_id_owner(s: Conn, n: Any, kind: str) -> None:
    """A notification id belongs to the sender that first used it (and to one kind).

    Ids are chosen by clients (`notify:id:<id>`); without this check any pol-authenticated
    atSign could replace another sender's stored notification by reusing its id.
    """
    old = notif_row(s, n.id)
    if old is not None and (old.from_atsign != n.from_atsign or old.kind != kind):
        raise unauthorized(f"notification id {n.id} is already used by another notification; "
                           "choose a new id")


def build_notification(s: Conn, p: dict[str, str], *, from_atsign: str, to: str, now: int,
                       ttln: int) -> Any:
    key = N.notification_key(p, from_atsign=from_atsign)
    update = M.params_to_update(p)
    meta = M.apply_update(None, update, now_ms=now, atsign=from_atsign)
    message_type = (p.get("messageType") or "key").lower()
    if key.startswith("public:") or p.get("publicScope"):
        is_enc = False
    elif message_type == "text":
        is_enc = (p.get("isEncrypted") or "false").lower() == "true"
    else:
        is_enc = (p.get("isEncrypted") or "true").lower() != "false"
    return N.Notification(
        id=p.get("id") or str(uuid.uuid4()), from_atsign=from_atsign, to_atsign=to,
        key=key, value=p.get("value") if message_type != "text" else None,
        operation=(p.get("operation") or "update").lower(), message_type=message_type,
        epoch_millis=now, expires_at=now + ttln, is_encrypted=is_enc,
        metadata=notif_meta(meta, p), notifier=p.get("notifier") or "SYSTEM",
        strategy=(p.get("strategy") or "all").lower(),
        priority=(p.get("priority") or "low").lower(), ttl_ms=ttln,
    )


def _cache_from_notification(s: Conn, n: Any, p: dict[str, str]) -> None:
    """Receiver-side cache of shared keys pushed with a ttr (docs/reference/atprotocol.md#notification-verbs)."""
    if (p.get("messageType") or "key").lower() != "key":
        return
    cache_key = K.normalize_key("cached:" + n.key)
    if len(cache_key) > 255:
        raise invalid_key(f"cached key too long: {len(cache_key)} > 255")
    ttr = int_or_none(p.get("ttr"))
    if n.operation == "delete":
        rec = s.host.get(cache_key)
        if rec is not None and getattr(s.meta(rec), "ccd", False):
            s.host.store.delete(s.me, cache_key, commit=False)
            s.host.stats_changed()
        return
    if ttr in (None, 0):
        return
    update = M.params_to_update(p)
    if p.get("value") is not None:
        meta = M.apply_update(None, update, now_ms=s.now(), atsign=n.from_atsign)
        s.put(cache_key, p["value"], meta)
        s.host.stats_changed()
    else:
        rec = s.host.get(cache_key)
        if rec is not None:
            meta = M.apply_update(s.meta(rec), update, now_ms=s.now(), atsign=n.from_atsign)
            s.put(cache_key, rec.value, meta)
            s.host.stats_changed()


def notif_row(s: Conn, nid: str) -> NotificationRow | None:
    return s.host.store.get_notification(s.me, nid)


async def v_notify_status(s: Conn, cmd: Command) -> Reply:
    row = notif_row(s, cmd.params["notificationId"])
    if row is None:
        return s.data(None)
    if row.expires_at is not None and row.expires_at < s.now():
        return s.data("expired")
    return s.data(row.status)


async def v_notify_list(s: Conn, cmd: Command) -> Reply:
    p = cmd.params
    if not s.authenticated and not s.pol_atsign:
        return s.data(None)
    rx_text = p.get("regex")
    rx = clientregex.compile_client(rx_text) if rx_text else None
    now = s.now()
    if s.authenticated:
        rows = s.host.store.notifications(s.me, ("received",), now=now)
    else:
        rows = s.host.store.notifications(s.me, ("sent",), now=now, to_atsign=s.pol_atsign)
    from_ms = _date_ms(p.get("fromDate"))
    to_ms = _date_ms(p.get("toDate"), end=True)
    items = []
    for row in rows:
        if from_ms is not None and row.epoch_ms < from_ms:
            continue
        if to_ms is not None and row.epoch_ms > to_ms:
            continue
        if rx is not None and not (clientregex.search(rx, row.key)
                                   or clientregex.search(rx, row.from_atsign.lstrip("@"))):
            continue
        items.append(N.from_storage(row.data))
    if not items:
        return s.data(None)
    body = N.notify_list_json(items)
    return s.data(body if isinstance(body, str) else dumps(body))


async def v_notify_remove(s: Conn, cmd: Command) -> Reply:
    s.host.store.remove_notification(s.me, cmd.params["id"])
    return s.data("success")


async def v_notify_fetch(s: Conn, cmd: Command) -> Reply:
    nid = cmd.params["notificationId"]
    row = notif_row(s, nid)
    if row is None:
        return s.data(dumps({"id": nid, "notificationStatus": "NotificationStatus.expired"}))
    ttype = {"sent": "sent", "received": "received", "self": "self"}[row.kind]
    d = {
        "id": row.id, "fromAtSign": row.from_atsign, "toAtSign": row.to_atsign,
        "notification": row.key, "type": f"NotificationType.{ttype}",
        "notificationStatus": f"NotificationStatus.{row.status}",
        "notificationDateTime": M.dart_date(row.epoch_ms),
        "expiresAt": M.dart_date(row.expires_at) if row.expires_at else "null",
        "retryCount": str(row.retry_count),
    }
    for k in ("operation", "messageType", "priority", "strategy", "notifier", "value"):
        v = row.data.get(k) if isinstance(row.data, dict) else None
        if v is not None:
            d[k] = str(v)
    return s.data(dumps(d))


MAX_NOTIFY_ALL_RECIPIENTS = 256


async def v_notify_all(s: Conn, cmd: Command) -> Reply:
    p = cmd.params
    if p.get("atSign") and K.fix_atsign(p["atSign"]) != s.me:
        raise unauthorized("notify:all must be sent by the current atSign")
    recipients = [r for r in (p.get("forAtSign") or "").split(",") if r.strip()]
    if len(recipients) > MAX_NOTIFY_ALL_RECIPIENTS:
        raise illegal_argument(f"notify:all to {len(recipients)} atSigns; at most "
                               f"{MAX_NOTIFY_ALL_RECIPIENTS} per request")
    result: dict[str, str] = {}
    for r in recipients:
        await asyncio.sleep(0)  # one durable write per recipient: let other connections in
        to = K.fix_atsign(r)
        now = s.host.next_epoch()
        q = dict(p, forAtSign=to)
        n = build_notification(s, q, from_atsign=s.me, to=to, now=now,
                               ttln=s.host.config.notification_expiry_ms)
        if to == s.me:
            store_received(s, n)
        else:
            store_sent(s, n, now)
        result[to] = n.id
    return s.ok(f"data: {dumps(result)}")


def _date_ms(text: str | None, end: bool = False) -> int | None:
    if not text:
        return None
    try:
        y, m, d = (int(x) for x in text.split("-"))
        day = dt.datetime(y, m, d, tzinfo=dt.timezone.utc)
    except (ValueError, TypeError):
        return None
    ms = int(day.timestamp() * 1000)
    return ms + 86_400_000 - 1 if end else ms
