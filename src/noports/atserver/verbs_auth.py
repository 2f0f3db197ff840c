"""Authentication verbs: from, cram, pkam, pol (docs/reference/atprotocol.md#authentication-verbs,
docs/reference/atprotocol.md#pol-handshake); enroll: verbs_enroll.

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
    key_not_found,
    unauthenticated,
    wants_json_errors,
)
from noports.atprotocol.grammar import Command

from .context import Conn, Reply
from .verbs_enroll import approved_apkam_key, runtime

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
    namespaces = None
    if enrollment_id:
        pub, namespaces = approved_apkam_key(s, enrollment_id)
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
    s.enrollment_namespaces = namespaces
    if enrollment_id:
        runtime(s).attach(enrollment_id, s)  # closed at once if the enrollment is revoked
    log.info("%s: pkam login", s.me)  # counted by tests/integration/test_agent_ansible.py
    return s.data("success")


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
