"""Authentication verbs: from, cram, pkam, pol, enroll (reference §3.1, §3.4, §6.3).

Why together: they are the only verbs that change who the connection is; each moves the
connection from one state to the next (`from` issues a challenge, cram/pkam/pol answer it).
"""

from __future__ import annotations

import json
import logging
import uuid

from noports import crypto
from noports.atprotocol import keys as K
from noports.atprotocol.errors import (
    AtError,
    RemoteError,
    invalid_syntax,
    key_not_found,
    unauthenticated,
    wants_json_errors,
)
from noports.atprotocol.grammar import Command

from .context import Conn, Reply, dumps, remove_nulls
from .host import fresh_meta_storage

log = logging.getLogger("noports.atserver.session")

PROOF_TTL_MS = 60_000


async def v_from(s: Conn, cmd: Command) -> Reply:
    p = cmd.params
    cfg = p.get("clientConfig")
    if cfg is not None:
        try:
            parsed = json.loads(cfg)
        except ValueError:
            parsed = None
        s.json_errors = wants_json_errors(parsed if isinstance(parsed, dict) else None)
    at = K.fix_atsign(p["atSign"])
    proof = str(uuid.uuid4())
    expires = s.now() + PROOF_TTL_MS
    if at == s.me:
        challenge = f"{s.sid}{s.me}:{proof}"
        s.pending = ("self", challenge, expires)
        return s.data(challenge)
    cookie = f"{s.sid}{at}"
    s.pending = ("pol", at, cookie, proof, expires)
    return s.data(f"proof:{cookie}:{proof}")


def _self_challenge(s: Conn) -> str:
    if not s.pending or s.pending[0] != "self" or s.pending[-1] < s.now():
        raise unauthenticated("Authentication Failed: no valid from: challenge")
    return s.pending[1]


async def v_cram(s: Conn, cmd: Command) -> Reply:
    challenge = _self_challenge(s)
    rec = s.host.get("privatekey:at_secret")
    if rec is None or not rec.value:
        raise key_not_found("privatekey:at_secret")
    digest = cmd.params["digest"]
    # crypto.cram_matches uses hmac.compare_digest, which rejects non-ASCII str
    if not digest.isascii() or not crypto.cram_matches(rec.value, challenge, digest):
        raise unauthenticated("Authentication Failed")
    s.authenticated = True
    s.auth_type = "cram"
    return s.data("success")


async def v_pkam(s: Conn, cmd: Command) -> Reply:
    p = cmd.params
    challenge = _self_challenge(s)
    enrollment_id = p.get("enrollmentId")
    if enrollment_id:
        pub = _approved_apkam_key(s, enrollment_id)
    else:
        rec = s.host.get("privatekey:at_pkam_publickey")
        if rec is None or not rec.value:
            raise key_not_found("privatekey:at_pkam_publickey")
        pub = rec.value
    algo = (p.get("signingAlgo") or "rsa2048").lower()
    hash_name = (p.get("hashingAlgo") or "sha256").lower()
    if not crypto.verify(pub, challenge, p["signature"], hash_name, algo):
        raise unauthenticated("pkam authentication failed")
    s.authenticated = True
    s.auth_type = "pkam"
    s.enrollment_id = enrollment_id or None
    return s.data("success")


def _enrollment_key(s: Conn, enrollment_id: str) -> str:
    return K.normalize_key(f"{enrollment_id}.new.enrollments.__manage{s.me}")


def _approved_apkam_key(s: Conn, enrollment_id: str) -> str:
    rec = s.host.get(_enrollment_key(s, enrollment_id))
    if rec is None or not rec.value or not s.active(rec):
        raise AtError("AT0028", f"enrollment_id: {enrollment_id} is expired or invalid")
    try:
        obj = json.loads(rec.value)
        state = obj["approval"]["state"]
        pub = obj["apkamPublicKey"]
    except (ValueError, KeyError, TypeError) as exc:
        raise AtError("AT0028", f"enrollment_id: {enrollment_id} is invalid") from exc
    if state == "approved" and isinstance(pub, str):
        return pub
    code = {"pending": "AT0026", "revoked": "AT0027"}.get(state, "AT0025")
    raise AtError(code, f"enrollment_id: {enrollment_id} is {state}")


async def v_enroll(s: Conn, cmd: Command) -> Reply:
    """Only `enroll:request` on a CRAM-authenticated connection (auto-approved, §3.4).

    That is what current Dart onboarding does; OTP-based requests and the management
    operations (approve/deny/revoke/list/fetch) are not supported.
    """
    p = cmd.params
    if (p.get("operation") or "").lower() != "request":
        raise invalid_syntax(f"enroll:{p.get('operation')} is not supported by this server")
    if not (s.authenticated and s.auth_type == "cram"):
        raise unauthenticated("enroll:request is only supported on a CRAM-authenticated "
                              "connection by this server")
    try:
        params = json.loads(p.get("enrollParams") or "")
        if not isinstance(params, dict):
            raise ValueError("not an object")
    except ValueError as exc:
        raise invalid_syntax("enroll:request needs a JSON object") from exc
    apkam = params.get("apkamPublicKey")
    if not isinstance(apkam, str) or not apkam:
        raise AtError("AT0022", "apkamPublicKey is required")
    eid = str(uuid.uuid4())
    now = s.now()
    record = {
        "sessionId": s.sid, "appName": params.get("appName"),
        "deviceName": params.get("deviceName"),
        "namespaces": {"__manage": "rw", "*": "rw"}, "apkamPublicKey": apkam,
        "requestType": "newEnrollment", "approval": {"state": "approved"},
        "encryptedAPKAMSymmetricKey": params.get("encryptedAPKAMSymmetricKey"),
    }
    store, me = s.host.store, s.me
    meta = fresh_meta_storage(me, now)
    store.put(me, _enrollment_key(s, eid), dumps(remove_nulls(record)), meta, commit=False)
    store.put(me, "privatekey:at_pkam_publickey", apkam, meta, commit=False)
    for field_name, suffix in (("encryptedDefaultEncryptionPrivateKey",
                                "default_enc_private_key"),
                               ("encryptedDefaultSelfEncryptionKey",
                                "default_self_enc_key")):
        if isinstance(params.get(field_name), str):
            store.put(me, K.normalize_key(f"{eid}.{suffix}.__manage{me}"),
                      dumps({"value": params[field_name]}), meta, commit=False)
    return s.data(dumps({"enrollmentId": eid, "status": "approved"}))


async def v_pol(s: Conn, cmd: Command) -> Reply:
    pend = s.pending
    if not pend or pend[0] != "pol" or pend[-1] < s.now():
        raise unauthenticated("pol without a preceding from:@<atsign>")
    _kind, at, cookie, proof, _exp = pend
    remote = s.host.remote
    if remote is None:
        raise AtError("AT0021", "no outbound connectivity configured")
    try:
        ok = await remote.verify_pol(s.me, at, cookie, proof)
    except RemoteError as err:
        log.info("pol from %s on %s: verification lookup failed: %s", at, s.me, err.code)
        ok = False
    if not ok:
        raise unauthenticated("Pol Authentication Failed")
    s.pending = None
    s.pol_atsign = at
    return Reply(f"{at}@")
