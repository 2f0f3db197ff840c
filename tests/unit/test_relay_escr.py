"""ESCR relay authentication and single-port requests, without sockets.

The connector's response (noports.npproto.escr.escr_response) must open and verify on the
relay side (open_response, verify_claim) only for the session's key, this socket's
challenge, the named side and a key from the per-enrollment namespace; srvd's decide() takes
the newer request fields (relayAuthMode, relayAuthAesKey, only443, sendJsonResponse).
"""

from __future__ import annotations

import base64
import json

import pytest

from noports import crypto
from noports.npproto import escr
from noports.npproto.errors import ProtocolError
from noports.npproto.keys import relay_request_key
from noports.relay.session import Side
from noports.relay.singleport import EscrSession, judge
from noports.relay.srvd import (
    Accept,
    Refuse,
    SrvdPolicy,
    decide,
    discover_reply,
    is_discover,
    reply_text,
)

SID = "a4b8a23e-b39f-4aa7-9991-ec7923a37192"
PUB, PRIV = crypto.generate_rsa_keypair()
OTHER_PUB, OTHER_PRIV = crypto.generate_rsa_keypair()
AES = escr.new_relay_auth_key()
URI_A = escr.apsk_uri("@alice")
URI_B = escr.apsk_uri("@bob", "enr-1")


def response(challenge: str, *, side_a: bool = True, key: str = AES, priv: str = PRIV,
             uri: str = URI_A, sid: str = SID) -> tuple[str, str]:
    line = escr.escr_response(sid, challenge, side_a=side_a, relay_auth_key=key,
                              signing_private_key=priv, signing_key_uri=uri)
    return escr.split_response(line.encode())


def test_round_trip_and_the_wire_shape() -> None:
    challenge = escr.new_challenge()
    assert len(base64.b64decode(challenge)) == 32
    sid, payload = response(challenge)
    assert sid == SID
    outer = json.loads(base64.b64decode(payload))
    assert list(outer) == ["iv", "e"] and len(base64.b64decode(outer["iv"])) == 16
    env = json.loads(base64.b64decode(crypto.aes_decrypt(AES, outer["e"], outer["iv"])))
    assert list(env) == ["p", "s", "ha", "sa", "sk"]
    assert env["p"] == {"sid": SID, "c": challenge, "side": "a"}
    assert (env["ha"], env["sa"], env["sk"]) == ("sha256", "rsa2048",
                                                 "public:_apsk.primary.a.__e@alice")
    claim = escr.open_response(sid, payload, relay_auth_key=AES, challenge=challenge)
    assert (claim.session_id, claim.side_a, claim.atsign) == (SID, True, "@alice")
    assert escr.key_lookup_name(claim) == "_apsk.primary.a.__e"
    assert escr.verify_claim(claim, PUB)
    assert not escr.verify_claim(claim, OTHER_PUB)  # signed by another key


@pytest.mark.parametrize("case", ["key", "challenge", "sid"])
def test_response_for_another_key_challenge_or_session_does_not_open(case: str) -> None:
    challenge = escr.new_challenge()
    sid, payload = response(challenge, key=escr.new_relay_auth_key() if case == "key" else AES)
    with pytest.raises(ProtocolError):
        escr.open_response(SID if case != "sid" else "other", payload, relay_auth_key=AES,
                           challenge=challenge if case != "challenge" else escr.new_challenge())


def test_replayed_response_fails_on_a_fresh_challenge() -> None:
    first = escr.new_challenge()
    _sid, payload = response(first)
    escr.open_response(SID, payload, relay_auth_key=AES, challenge=first)
    with pytest.raises(ProtocolError, match="another challenge"):
        escr.open_response(SID, payload, relay_auth_key=AES, challenge=escr.new_challenge())


def test_signing_key_outside_the_enrollment_namespace_is_refused() -> None:
    challenge = escr.new_challenge()
    _sid, payload = response(challenge, uri="public:publickey@alice")
    with pytest.raises(ProtocolError, match="per-enrollment"):
        escr.open_response(SID, payload, relay_auth_key=AES, challenge=challenge)


@pytest.mark.parametrize("line", [b"", b"garbage", b"a:b:c", b"sid:\x01\x02", b"x" * 5000,
                                  b"%s:%s" % (SID.encode(), b"bm90IGpzb24=")])
def test_garbage_is_a_protocol_error(line: bytes) -> None:
    with pytest.raises(ProtocolError):
        sid, payload = escr.split_response(line)
        escr.open_response(sid, payload, relay_auth_key=AES, challenge="c")


def test_judge_binds_each_side_to_the_requested_atsign() -> None:
    sess = EscrSession(SID, AES, "@alice", "@bob")
    challenge = escr.new_challenge()
    a = escr.open_response(*response(challenge), relay_auth_key=AES, challenge=challenge)
    assert judge(a, sess, None) is None
    assert judge(a, sess, Side.B) is not None  # side A response on port B
    # @alice claiming side B (the device's side) is refused, although she is in the session
    b_by_alice = escr.open_response(*response(challenge, side_a=False), relay_auth_key=AES,
                                    challenge=challenge)
    assert "not @bob" in (judge(b_by_alice, sess, None) or "")
    b = escr.open_response(*response(challenge, side_a=False, uri=URI_B), relay_auth_key=AES,
                           challenge=challenge)
    assert judge(b, sess, None) is None


def test_apsk_values_bare_and_advertised() -> None:
    assert escr.apsk_public_keys(PUB) == [PUB]
    adv = json.dumps({"keys": [{"alg": "rsa2048", "pub": PUB, "status": "active"},
                               {"alg": "rsa2048", "pub": OTHER_PUB, "status": "revoked"},
                               {"alg": "mldsa65", "pub": "x"}]})
    assert escr.apsk_public_keys(adv) == [PUB]


# --- srvd: the newer request fields ------------------------------------------------------------

R = "@relay"
KEY = relay_request_key(R, "orac", "@alice")
SINGLE = SrvdPolicy(R, single_port=True)


def m1(**extra: object) -> str:
    d = {"sessionId": SID, "atSignA": "@alice", "atSignB": "@bob", "authenticateSocketA": True,
         "authenticateSocketB": True, "clientNonce": "2026-01-01T00:00:00.000Z"}
    d.update(extra)
    return json.dumps(d)


ESCR_443 = {"relayAuthMode": "escr", "relayAuthAesKey": AES, "only443": True,
            "multipleAcksOk": True, "preFetch": [URI_A], "sendJsonResponse": True}


def test_today_official_single_port_request_is_accepted() -> None:
    d = decide(KEY, "@alice", m1(**ESCR_443), SINGLE)
    assert isinstance(d, Accept)
    assert (d.escr_key, d.only443, d.json_reply) == (AES, True, True)


def test_today_official_per_port_request_declares_payload_and_is_accepted() -> None:
    d = decide(KEY, "@alice", m1(**{**ESCR_443, "relayAuthMode": "payload",
                                    "relayAuthAesKey": None, "only443": False}), SrvdPolicy(R))
    assert isinstance(d, Accept) and not d.only443 and d.escr_key is None and d.json_reply


@pytest.mark.parametrize(("extra", "policy", "words"), [
    (ESCR_443, SrvdPolicy(R), "start srvd with --443"),
    ({**ESCR_443, "relayAuthMode": "payload"}, SINGLE, "authenticate with relayAuthMode escr"),
    ({**ESCR_443, "only443": False}, SINGLE, "single port only"),
    ({**ESCR_443, "relayAuthAesKey": "c2hvcnQ="}, SINGLE, "32-byte AES key"),
    ({**ESCR_443, "relayAuthMode": "pq"}, SINGLE, "unknown relayAuthMode"),
])
def test_unusable_newer_requests_get_a_nack_naming_why(extra: dict, policy: SrvdPolicy,
                                                       words: str) -> None:
    d = decide(KEY, "@alice", m1(**extra), policy)
    assert isinstance(d, Refuse) and d.nack is not None and words in d.nack


def test_single_port_needs_both_sides_authenticated() -> None:
    d = decide(KEY, "@alice", m1(**ESCR_443, authenticateSocketB=False), SINGLE)
    assert isinstance(d, Refuse) and "both sides" in (d.nack or "")


def test_json_reply_and_discover() -> None:
    reply = json.loads(reply_text("relay.example", 443, 443, "nonce", json_reply=True))
    assert reply == {"address": "relay.example", "portA": 443, "portB": 443,
                     "rvdNonce": "nonce", "supportsEventLogging": False}
    assert reply_text("h", 1, 2, "n") == "h,1,2,n"
    assert is_discover("@relay:discover.sshrvd@alice", SINGLE)
    assert not is_discover("@other:discover.sshrvd@alice", SINGLE)
    assert not is_discover(KEY, SINGLE)
    assert json.loads(discover_reply("10.0.0.2", 443)) == {"ipaddr": "10.0.0.2", "port": 443}
