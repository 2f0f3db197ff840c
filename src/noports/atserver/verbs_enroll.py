"""Enrollment verbs: `otp:get` and `enroll:request|list|fetch|approve|deny|revoke|unrevoke|delete`.

Why: a device must get its own key without the atSign's CRAM secret (docs/reference/atprotocol.md#utility-verbs): an
operator connection issues a one-time code, the device (unauthenticated) sends its own APKAM
public key with the code, an operator approves (sending the atSign's encryption keys encrypted
for that device), the device then authenticates with `pkam:…:enrollmentId:<id>`. Revoking an
enrollment refuses its pkam from then on, closes its live connections at once and bumps
`public:revocations.__manage@<atsign>` so relays end its sessions (decision 0021). The rules
are in enrollment.py; this module only applies them to the store and the connection.
"""

from __future__ import annotations

import logging
import uuid

from noports.atprotocol import keys as K
from noports.atprotocol.errors import AtError, unauthenticated, unauthorized
from noports.atprotocol.grammar import Command

from . import enrollment as E
from .context import Conn, Reply, dumps, remove_nulls
from .host import fresh_meta_storage
from .store import EnrollmentRow

log = logging.getLogger("noports.atserver.enroll")

REVOCATIONS_KEY = "public:revocations.__manage"


def runtime(s: Conn) -> E.Runtime:
    rt = getattr(s.host, "enroll_rt", None)
    if rt is None:
        rt = E.Runtime()
        s.host.enroll_rt = rt
    return rt


def _require_manage(s: Conn) -> None:
    if not s.authenticated:
        raise unauthenticated("Command cannot be executed without auth")
    if not E.can_manage(s.auth_type, s.enrollment_namespaces):
        raise unauthorized("this enrollment has no __manage:rw access; enrollments are managed "
                           "by an operator connection")


async def v_otp(s: Conn, cmd: Command) -> Reply:
    p = cmd.params
    _require_manage(s)
    if (p.get("operation") or "").lower() != "get":
        raise AtError("AT0003", "otp:put (semi-permanent passcodes) is not supported by this "
                                "server; use otp:get[:ttl:<ms>]")
    ttl = E.otp_ttl(p.get("ttl"))
    now = s.now()
    if s.host.store.count_otps(s.me, now) >= E.MAX_LIVE_OTPS:
        raise E.enrollment_error(f"too many live one-time codes (max {E.MAX_LIVE_OTPS}); "
                                 "wait for some to be used or expire")
    otp = E.new_otp()
    s.host.store.put_otp(s.me, E.otp_digest(otp), now + ttl,
                         {"issuedBy": s.enrollment_id or s.auth_type})
    log.info("%s: one-time enrollment code issued (valid %d s)", s.me, ttl // 1000)
    return s.data(otp)


async def v_enroll(s: Conn, cmd: Command) -> Reply:
    p = cmd.params
    op = (p.get("operation") or "").lower()
    params = E.parse_params(p.get("enrollParams")) if p.get("enrollParams") else {}
    if op == "request":
        if s.authenticated and s.auth_type == "cram":
            return _request_over_cram(s, params)
        if s.authenticated:
            raise E.enrollment_error("enroll:request on an authenticated connection is only "
                                     "supported after CRAM")
        return _request_with_otp(s, params)
    if (op == "fetch" and s.authenticated and s.enrollment_id
            and params.get("enrollmentId") == s.enrollment_id):
        return _fetch_own(s)
    _require_manage(s)
    if op == "list":
        return _list(s, params)
    eid = E.enrollment_id(params)
    row = s.host.store.get_enrollment(s.me, eid)
    if row is None or _expired(s, row):
        raise AtError("AT0029", f"enrollment_id: {eid} is expired or invalid")
    if op == "fetch":
        return s.data(dumps(remove_nulls(E.list_entry(eid, s.me, row.state, row.data)[1])))
    if op not in E.TRANSITIONS:
        raise AtError("AT0003", f"enroll:{op} is not supported")
    if op == "revoke" and eid == s.enrollment_id and p.get("force") != "force":
        raise AtError("AT0031", "Cannot revoke self enrollment (use enroll:revoke:force)")
    new_state = E.transition(op, row.state, eid)
    if new_state is None:
        s.host.store.delete_enrollment(s.me, eid)
        return s.data(dumps({"status": "deleted", "enrollmentId": eid}))
    data = dict(row.data)
    if op == "approve":
        for field_name in ("encryptedDefaultEncryptionPrivateKey",
                           "encryptedDefaultSelfEncryptionKey"):
            data[field_name] = E._key_field(params, field_name, required=False)
    now = s.now()
    s.host.store.put_enrollment(EnrollmentRow(s.me, eid, new_state, row.created, now, None,
                                              remove_nulls(data)))
    if op in ("approve", "unrevoke"):
        _publish_apkam_key(s, data)
    if op == "revoke":
        _revoked(s, eid, data, now)
    log.info("%s: enrollment %s (%s/%s) %s", s.me, eid, data.get("appName"),
             data.get("deviceName"), new_state)
    return s.data(dumps({"status": new_state, "enrollmentId": eid}))


def _fetch_own(s: Conn) -> Reply:
    """A device reads its own enrollment, with the keys the approver encrypted for it (only
    its APKAM symmetric key decrypts them)."""
    assert s.enrollment_id is not None
    row = s.host.store.get_enrollment(s.me, s.enrollment_id)
    if row is None or row.state != "approved":
        raise AtError("AT0029", f"enrollment_id: {s.enrollment_id} is expired or invalid")
    out = E.list_entry(row.id, s.me, row.state, row.data)[1]
    for k in ("encryptedDefaultEncryptionPrivateKey", "encryptedDefaultSelfEncryptionKey"):
        out[k] = row.data.get(k)
    return s.data(dumps(remove_nulls(out)))


def _expired(s: Conn, row: EnrollmentRow) -> bool:
    return row.expires_at is not None and row.expires_at < s.now()


def _list(s: Conn, params: dict) -> Reply:
    wanted = params.get("enrollmentStatusFilter")
    if not isinstance(wanted, list) or not wanted:
        wanted = list(E.STATES)
    out = {}
    for row in s.host.store.enrollments(s.me):
        if row.state in wanted and not _expired(s, row):
            k, v = E.list_entry(row.id, s.me, row.state, row.data)
            out[k] = remove_nulls(v)
    return s.data(dumps(out))


def _request_with_otp(s: Conn, params: dict) -> Reply:
    req = E.validate_request(params)
    now = s.now()
    rt = runtime(s)
    wait = rt.throttle.blocked_for(now)
    if wait:
        raise AtError("AT0028", f"too many wrong one-time codes for {s.me}; enrollment "
                                f"requests are refused for {wait // 1000 + 1} s")
    if s.host.store.count_enrollments(s.me, "pending", now) >= E.MAX_PENDING:
        raise E.enrollment_error(f"too many pending enrollment requests (max {E.MAX_PENDING});"
                                 " an operator must approve or deny some first")
    code = s.host.store.consume_otp(s.me, E.otp_digest(req.otp), now)
    if code is None:
        rt.throttle.failed(now)
        s.bad_otps += 1
        log.warning("%s: enroll:request with an invalid one-time code (%d on this connection)",
                    s.me, s.bad_otps)
        close = s.bad_otps >= E.MAX_BAD_OTP_PER_CONN
        msg = "invalid otp: the one-time code is wrong, used or expired"
        if close:
            raise E.ClosingError("AT0011", msg + "; closing after repeated wrong codes")
        raise AtError("AT0011", msg)
    eid = str(uuid.uuid4())
    data = {"appName": req.app_name, "deviceName": req.device_name,
            "namespaces": req.namespaces, "apkamPublicKey": req.apkam_public_key,
            "encryptedAPKAMSymmetricKey": req.encrypted_apkam_symmetric_key,
            "requestType": "newEnrollment", "sessionId": s.sid}
    s.host.store.put_enrollment(EnrollmentRow(s.me, eid, "pending", now, now,
                                              now + E.PENDING_TTL_MS, data))
    _notify_managers(s, eid, data)
    log.info("%s: enrollment %s requested by %s/%s (pending)", s.me, eid, req.app_name,
             req.device_name)
    return s.data(dumps({"enrollmentId": eid, "status": "pending"}))


def _notify_managers(s: Conn, eid: str, data: dict) -> None:
    """The self notification `<id>.new.enrollments.__manage` an approving client monitors."""
    from .verbs_notify import build_notification, store_received  # noqa: PLC0415 - cycle

    value = dumps({"appName": data["appName"], "deviceName": data["deviceName"],
                   "namespace": data["namespaces"],
                   "encryptedAPKAMSymmetricKey": data["encryptedAPKAMSymmetricKey"]})
    params = {"forAtSign": s.me, "atKey": f"{eid}.new.enrollments.{E.MANAGE}",
              "value": value, "isEncrypted": "false"}
    n = build_notification(s, params, from_atsign=s.me, to=s.me, now=s.host.next_epoch(),
                           ttln=s.host.config.notification_expiry_ms)
    store_received(s, n)


def _request_over_cram(s: Conn, params: dict) -> Reply:
    """First enrollment of an atSign on a CRAM connection: auto-approved (docs/reference/atprotocol.md#enrollment)."""
    apkam = params.get("apkamPublicKey")
    if not isinstance(apkam, str) or not apkam or len(apkam) > E.MAX_KEY_FIELD:
        raise AtError("AT0022", "apkamPublicKey is required")
    eid = str(uuid.uuid4())
    now = s.now()
    data = remove_nulls({
        "appName": params.get("appName"), "deviceName": params.get("deviceName"),
        "namespaces": {E.MANAGE: "rw", "*": "rw"}, "apkamPublicKey": apkam,
        "requestType": "newEnrollment", "sessionId": s.sid,
        "encryptedAPKAMSymmetricKey": params.get("encryptedAPKAMSymmetricKey"),
        "encryptedDefaultEncryptionPrivateKey": params.get("encryptedDefaultEncryptionPrivateKey"),
        "encryptedDefaultSelfEncryptionKey": params.get("encryptedDefaultSelfEncryptionKey"),
    })
    store, me = s.host.store, s.me
    store.put_enrollment(EnrollmentRow(me, eid, "approved", now, now, None, data))
    store.put(me, "privatekey:at_pkam_publickey", apkam, fresh_meta_storage(me, now),
              commit=False)
    return s.data(dumps({"enrollmentId": eid, "status": "approved"}))


def _publish_apkam_key(s: Conn, data: dict) -> None:
    app, dev = data.get("appName"), data.get("deviceName")
    if app and dev:
        me = s.me
        s.host.store.put(me, K.normalize_key(f"public:{app}.{dev}.pkam.__pkams.__public_keys{me}"),
                         dumps({"apkamPublicKey": data["apkamPublicKey"]}),
                         fresh_meta_storage(me, s.now(), is_encrypted=False), commit=False)


def _revoked(s: Conn, eid: str, data: dict, now: int) -> None:
    """Everything a revocation reaches on this server, at once."""
    store, me = s.host.store, s.me
    legacy = store.get(me, "privatekey:at_pkam_publickey")
    if legacy is not None and legacy.value == data.get("apkamPublicKey"):
        # the first enrollment (over CRAM) also installed its key for legacy pkam
        store.delete(me, "privatekey:at_pkam_publickey", commit=False)
    app, dev = data.get("appName"), data.get("deviceName")
    if app and dev:
        store.delete(me, K.normalize_key(f"public:{app}.{dev}.pkam.__pkams.__public_keys{me}"),
                     commit=False)
    store.put(me, K.normalize_key(f"{REVOCATIONS_KEY}{me}"),
              dumps({"lastRevokedAt": now, "enrollmentId": eid}),
              fresh_meta_storage(me, now, is_encrypted=False), commit=False)
    conns = runtime(s).connections(eid)
    for c in conns:
        c.revoke()
    log.info("%s: enrollment %s revoked; %d live connection(s) closed", me, eid, len(conns))


def approved_apkam_key(s: Conn, eid: str) -> tuple[str, dict[str, str]]:
    """The public key and namespaces of an approved enrollment, or the reference's error."""
    row = s.host.store.get_enrollment(s.me, eid)
    if row is None or _expired(s, row):
        raise AtError("AT0028", f"enrollment_id: {eid} is expired or invalid")
    pub = row.data.get("apkamPublicKey")
    if row.state == "approved" and isinstance(pub, str):
        return pub, dict(row.data.get("namespaces") or {})
    code = {"pending": "AT0026", "revoked": "AT0027"}.get(row.state, "AT0025")
    raise AtError(code, f"enrollment_id: {eid} is {row.state}")
