"""sshnpd decisions without sockets: authorization, signatures, replay, permit-open, ciphers."""

from __future__ import annotations

import base64
import json
import logging
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from noports import crypto
from noports.daemon.config import build_config
from noports.daemon.handler import (
    AddClientKey,
    DaemonHandler,
    Ignore,
    Inbound,
    Reply,
    Request,
    SessionPlan,
    permitted,
)
from noports.daemon.sshkeys import EphemeralKey, generate_ephemeral_key
from noports.npproto import (
    CIPHER_AES_CTR,
    CIPHER_CHACHA20_POLY1305,
    DeviceInfo,
    SessionResponse,
    SshRequest,
    dart_iso_now,
    sign_envelope,
    verify_envelope,
    verify_relay_auth,
)
from noports.npproto.streamcipher import CtrStream, new_session_cipher

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "npproto"
KEYS = json.loads((FIX / "test_keys.json").read_text())
CPUB, CPRIV = KEYS["client"]["publicKey"], KEYS["client"]["privateKey"]
DPUB, DPRIV = KEYS["device"]["publicKey"], KEYS["device"]["privateKey"]
SID = "0b7e6c1a-3c1f-4f7e-9d5a-2b8f0e6c9a11"
HOST_KEY = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGl1eLS3Wd0q8o3o+6eR5fdKZ0b9xJ6o8l1yY0qvZb7P")


def cfg(**kw):
    base = {"atsign": "@device", "managers": ["@client"], "device": "pi"}
    base.update(kw)
    return build_config(base)


def handler(**kw) -> DaemonHandler:
    fixed = EphemeralKey("-----BEGIN OPENSSH PRIVATE KEY-----\nX\n-----END OPENSSH PRIVATE KEY-----\n",
                         "ssh-ed25519 AAAA")
    return DaemonHandler(cfg(**kw), DPRIV, keygen=lambda algo: fixed)


def note(kind: str, value: str | None = "ping", sender: str = "@client", **kw) -> Inbound:
    return Inbound("n1", sender, f"@device:{kind}.pi.sshnp{sender}", value, **kw)


def ssh_request(sid: str = SID, *, sign_with: str = CPRIV, encrypt: bool = True,
                auth: bool = True, ciphers: list[str] | None = None,
                nonce: str | None = None, twin: bool = False) -> str:
    req = SshRequest(session_id=sid, host="127.0.0.1", port=40001, authenticate_to_rvd=auth,
                     client_nonce=nonce or dart_iso_now(), rvd_nonce=dart_iso_now(),
                     encrypt_rvd_traffic=encrypt,
                     client_ephemeral_pk=CPUB if encrypt else None,
                     client_ephemeral_pk_type="rsa2048" if encrypt else None,
                     np_ciphers=ciphers, extra={"twinKeys": True} if twin else {})
    return sign_envelope(req.to_dict(), sign_with)


def routed(h: DaemonHandler, inbound: Inbound) -> Request:
    r = h.route(inbound)
    assert isinstance(r, Request), r
    return r


# --- authorization and routing ---------------------------------------------------------------

@pytest.mark.parametrize("kind", ["ping", "ssh_request", "sshpublickey", "npt_request"])
def test_unauthorized_sender_gets_nothing(kind):
    h = handler()
    r = h.route(note(kind, "x", sender="@eve"))
    assert isinstance(r, Ignore) and r.event == "unauthorized"
    assert r.level == logging.WARNING
    assert "not authorized" in r.reason and "@eve" in r.reason


def test_authorization_uses_notification_sender_not_key_text():
    # the key claims @client but the atServer says @eve sent it
    h = handler()
    n = Inbound("n1", "@eve", "@device:ping.pi.sshnp@client", "ping")
    assert h.route(n).event == "unauthorized"
    # an authorized sender whose key names someone else is dropped too
    n = Inbound("n1", "@client", "@device:ping.pi.sshnp@other", "ping")
    assert h.route(n).event == "key_mismatch"


@pytest.mark.parametrize("inbound,event", [
    (Inbound("n", "@client", "@device:ping.other.sshnp@client", "ping"), "unknown_key"),
    (Inbound("n", "@client", "@device:nonsense.pi.sshnp@client", "x"), "unknown_key"),
    (Inbound("n", "@client", "garbage", "x"), "unknown_key"),
    (Inbound("n", "@client", "", None), "unknown_key"),
    (Inbound("n", "@client", "@device:ping.pi.sshnp@client", None), "no_value"),
    (Inbound("n", "@client", "@device:ping.pi.sshnp@client", "x", error="bad"), "undecryptable"),
    (Inbound("n", "@client", "@device:ping.pi.sshnp@client", "x", operation="delete"),
     "not_update"),
    (Inbound("n", "@client", "@device:ping.pi.sshnp@client", "x" * 70000), "too_large"),
    (Inbound("n", "@client", "@device:sshd.pi.sshnp@client", "1 2 u h s"), "legacy"),
    (Inbound("n", "@client", "@other:ping.pi.sshnp@client", "ping"), "key_mismatch"),
])
def test_malformed_or_unusable_notifications_are_ignored(inbound, event):
    r = handler().route(inbound)
    assert isinstance(r, Ignore) and r.event == event


def test_route_is_case_insensitive_like_dart():
    h = handler()
    r = h.route(Inbound("n", "@Client", "@DEVICE:Ping.PI.sshnp@client", "ping"))
    assert isinstance(r, Request) and r.kind == "ping" and r.sender == "@client"


# --- ping and shared records -----------------------------------------------------------------

def test_ping_answers_heartbeat_with_feature_map():
    h = handler(sshpublickey=True, permit_open=["localhost:22,localhost:3389"])
    reply = h.on_ping(routed(h, note("ping")))
    assert reply.to == "@client" and reply.key_name == "heartbeat.pi.sshnp"
    assert reply.ttl_ms == 10_000 and not reply.is_error
    info = json.loads(reply.value)
    assert list(info) == ["devicename", "deviceGroupName", "version", "corePackageVersion",
                          "supportedFeatures", "allowedServices"]
    assert info["devicename"] == "pi" and info["deviceGroupName"] == "__none__"
    assert info["supportedFeatures"] == {"acceptsPublicKeys": True, "srAuth": True,
                                         "srE2ee": True, "supportsPortChoice": True,
                                         "adjustableTimeout": True}
    assert info["allowedServices"] == ["localhost:22", "localhost:3389"]
    assert DeviceInfo.from_json(reply.value).missing_features(["srAuth", "srE2ee"]) == []


def test_share_records_and_hide():
    h = handler(managers=["@a", "@b"])
    recs = h.share_records("alice")
    assert [(r.atkey, r.value is not None) for r in recs] == [
        ("@a:username.pi.sshnp@device", True), ("@a:device_info.pi.sshnp@device", True),
        ("@b:username.pi.sshnp@device", True), ("@b:device_info.pi.sshnp@device", True)]
    assert recs[0].value == "alice" and recs[0].key_name == "username.pi.sshnp"
    assert json.loads(recs[1].value)["devicename"] == "pi"
    assert recs[1].ttl_ms == 30 * 24 * 3600 * 1000
    hidden = handler(managers=["@a"], hide=True).share_records("alice")
    assert [(r.atkey, r.value) for r in hidden] == [
        ("@a:username.pi.sshnp@device", None), ("@a:device_info.pi.sshnp@device", None)]


# --- sshpublickey ------------------------------------------------------------------------------

def test_sshpublickey_needs_dash_s_and_a_valid_key():
    key = generate_ephemeral_key().public_line + " me@laptop"
    h = handler()
    assert h.on_sshpublickey(routed(h, note("sshpublickey", key))).event == "publickey_refused"
    h = handler(sshpublickey=True)
    act = h.on_sshpublickey(routed(h, note("sshpublickey", key)))
    assert isinstance(act, AddClientKey) and act.public_key == key
    for bad in ('command="sh" ' + key, key + "\nssh-ed25519 AAAA", "ssh-dss AAAAB3", "hello"):
        r = h.on_sshpublickey(routed(h, note("sshpublickey", bad)))
        assert isinstance(r, Ignore) and r.event == "bad_publickey"


# --- ssh_request -------------------------------------------------------------------------------

def test_valid_request_plans_a_signed_session():
    h = DaemonHandler(cfg(), DPRIV)  # real key generation
    plan = h.on_ssh_request(routed(h, note("ssh_request", ssh_request())), CPUB, [HOST_KEY])
    assert isinstance(plan, SessionPlan)
    assert plan.client == "@client" and plan.session_id == SID
    assert (plan.relay_host, plan.relay_port) == ("127.0.0.1", 40001)
    assert plan.response.key_name == f"{SID}.pi.sshnp" and plan.response.to == "@client"
    payload = verify_envelope(plan.response.value, DPUB)  # signed with the device key
    resp = SessionResponse.from_dict(payload)
    assert resp.status == "connected" and resp.session_id == SID
    assert resp.host_keys == [HOST_KEY]
    assert resp.np_cipher == CIPHER_AES_CTR  # the client offered nothing
    # the ephemeral private key is a real OpenSSH key matching the planned public key
    priv = serialization.load_ssh_private_key(resp.ephemeral_private_key.encode(), None)
    pub = priv.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                         serialization.PublicFormat.OpenSSH).decode()
    assert pub == plan.ephemeral.public_line
    # session key and IV: base64 text, RSA-encrypted to clientEphemeralPK
    key_b64 = crypto.rsa_decrypt(CPRIV, resp.session_aes_key)
    iv_b64 = crypto.rsa_decrypt(CPRIV, resp.session_iv)
    assert base64.b64decode(key_b64) == plan.key and len(plan.key) == 32
    assert base64.b64decode(iv_b64) == plan.iv and len(plan.iv) == 16
    # relay auth line signed with the device's encryption key over (sid, cn, rn)
    req = SshRequest.from_dict(verify_envelope(ssh_request(), CPUB))
    assert plan.auth_line.endswith(b"\n")
    env = json.loads(plan.auth_line)
    assert verify_relay_auth(plan.auth_line.rstrip(b"\n"), SID,
                             env["payload"]["clientNonce"], env["payload"]["rvdNonce"], DPUB)
    assert req.session_id == SID
    assert "PRIVATE" not in repr(plan) and "PRIVATE" not in repr(plan.ephemeral)


@pytest.mark.parametrize("offer,expected", [
    (None, CIPHER_AES_CTR),
    ([CIPHER_CHACHA20_POLY1305, CIPHER_AES_CTR], CIPHER_CHACHA20_POLY1305),
    ([CIPHER_AES_CTR, CIPHER_CHACHA20_POLY1305], CIPHER_AES_CTR),
    (["rot13"], CIPHER_AES_CTR),
])
def test_cipher_negotiation(offer, expected):
    h = handler()
    plan = h.on_ssh_request(routed(h, note("ssh_request", ssh_request(ciphers=offer))), CPUB)
    assert plan.cipher_id == expected
    assert SessionResponse.from_dict(verify_envelope(plan.response.value, DPUB)).np_cipher \
        == expected
    # the daemon's cipher talks to a client-side cipher built from the response
    d = new_session_cipher(plan.cipher_id, plan.key, plan.iv, is_client=False)
    c = new_session_cipher(plan.cipher_id, plan.key, plan.iv, is_client=True)
    assert c.decrypt(d.encrypt(b"SSH-2.0-OpenSSH_9.2\r\n")) == b"SSH-2.0-OpenSSH_9.2\r\n"


def test_twin_keys_offered_each_direction_its_own_key():
    """Official twin keys: aesKeyC2D/ivC2D + aesKeyD2C/ivD2C answer, a key per direction."""
    h = DaemonHandler(cfg(), DPRIV)
    plan = h.on_ssh_request(routed(h, note("ssh_request", ssh_request(twin=True))), CPUB)
    assert isinstance(plan, SessionPlan) and plan.cipher_id == CIPHER_AES_CTR
    payload = verify_envelope(plan.response.value, DPUB)
    assert payload["sessionAESKey"] is None and payload["sessionIV"] is None
    secrets = [base64.b64decode(crypto.rsa_decrypt(CPRIV, payload[f]))
               for f in ("aesKeyC2D", "ivC2D", "aesKeyD2C", "ivD2C")]
    assert secrets == [plan.key, plan.iv, *plan.d2c]
    assert plan.d2c[0] != plan.key and plan.d2c[1] != plan.iv
    c = new_session_cipher(CIPHER_AES_CTR, secrets[0], secrets[1], is_client=True,
                           d2c=(secrets[2], secrets[3]))
    d = new_session_cipher(CIPHER_AES_CTR, plan.key, plan.iv, is_client=False, d2c=plan.d2c)
    up, down = b"SSH-2.0-client\r\n", b"SSH-2.0-server\r\n"
    up_ct, down_ct = c.encrypt(up), d.encrypt(down)
    assert d.decrypt(up_ct) == up and c.decrypt(down_ct) == down
    assert up_ct == CtrStream(plan.key, plan.iv).process(up)  # client->daemon: C2D
    assert down_ct == CtrStream(*plan.d2c).process(down)  # daemon->client: D2C
    assert down_ct != CtrStream(plan.key, plan.iv).process(down)


@pytest.mark.parametrize("twin,ciphers", [(False, None), (True, [CIPHER_CHACHA20_POLY1305])])
def test_no_twin_offer_or_aead_keeps_one_key(twin, ciphers):
    """Without the offer (old clients), or with our AEAD chosen, one key as before."""
    h = handler()
    plan = h.on_ssh_request(routed(h, note("ssh_request", ssh_request(
        twin=twin, ciphers=ciphers))), CPUB)
    assert isinstance(plan, SessionPlan) and plan.d2c is None
    payload = verify_envelope(plan.response.value, DPUB)
    assert payload["sessionAESKey"] and payload["sessionIV"]
    assert not {"aesKeyC2D", "ivC2D", "aesKeyD2C", "ivD2C"} & set(payload)


def test_unencrypted_request_plain_session_without_cipher():
    h = handler()
    plan = h.on_ssh_request(routed(h, note("ssh_request", ssh_request(
        encrypt=False, auth=False, ciphers=[CIPHER_CHACHA20_POLY1305]))), CPUB)
    assert isinstance(plan, SessionPlan)
    assert plan.cipher_id is None and plan.key is None and plan.auth_line is None
    payload = verify_envelope(plan.response.value, DPUB)
    assert payload["sessionAESKey"] is None and payload["sessionIV"] is None
    assert "npCipher" not in payload and "hostKeys" not in payload
    assert list(payload)[:5] == ["status", "sessionId", "ephemeralPrivateKey",
                                 "sessionAESKey", "sessionIV"]


def test_bad_signature_no_session_no_reply():
    h = handler()
    r = h.on_ssh_request(routed(h, note("ssh_request", ssh_request(sign_with=DPRIV))), CPUB)
    assert isinstance(r, Ignore) and r.event == "bad_signature"
    assert r.level == logging.WARNING
    # a tampered payload fails too
    env = json.loads(ssh_request())
    env["payload"]["port"] = 22
    r = h.on_ssh_request(routed(h, note("ssh_request", json.dumps(env))), CPUB)
    assert isinstance(r, Ignore) and r.event == "bad_signature"
    # a failed verification does not burn the session id: the real request still works
    ok = h.on_ssh_request(routed(h, note("ssh_request", ssh_request())), CPUB)
    assert isinstance(ok, SessionPlan)


@pytest.mark.parametrize("value", ["", "not json", "{}", "[1]", '{"payload":1}',
                                   '{"payload":{},"signature":1}'])
def test_garbage_ssh_request_is_ignored(value):
    h = handler()
    r = h.on_ssh_request(routed(h, note("ssh_request", value or " ")), CPUB)
    assert isinstance(r, Ignore)


def test_signed_but_malformed_payload_is_ignored():
    h = handler()
    for payload in ({"direct": True, "sessionId": SID, "host": "h"},  # no port
                    {"direct": True, "sessionId": "not-a-uuid", "host": "h", "port": 1},
                    {"direct": False, "sessionId": SID, "host": "h", "port": 1}):
        r = h.on_ssh_request(routed(h, note("ssh_request", sign_envelope(payload, CPRIV))),
                             CPUB)
        assert isinstance(r, Ignore) and r.event == "bad_request", payload


def test_replay_refused_with_error_reply():
    h = handler()
    value = ssh_request()
    assert isinstance(h.on_ssh_request(routed(h, note("ssh_request", value)), CPUB),
                      SessionPlan)
    again = h.on_ssh_request(routed(h, note("ssh_request", value)), CPUB)
    assert isinstance(again, Reply) and again.is_error
    assert again.value == f"Request refused: session {SID} was already used (a replayed request)"
    assert again.key_name == f"{SID}.pi.sshnp" and again.to == "@client"
    # same session id with a new nonce: still refused (one session id, one session)
    again = h.on_ssh_request(routed(h, note("ssh_request", ssh_request())), CPUB)
    assert isinstance(again, Reply) and "already used" in again.value


def test_stale_nonce_refused_with_error_reply():
    h = handler()
    r = h.on_ssh_request(routed(h, note("ssh_request", ssh_request(
        nonce="2020-01-01T00:00:00.000"))), CPUB)
    assert isinstance(r, Reply) and r.is_error and r.key_name == f"{SID}.pi.sshnp"
    assert r.value.startswith("Request refused: its timestamp 2020-01-01T00:00:00.000 is ")
    assert "behind the device clock (allowed: 60 s either way)" in r.value
    assert SID not in h.seen  # a refused request is not recorded: nothing else happened


def test_permit_open_refusal_sends_official_error_string():
    h = handler(permit_open=["localhost:3389"])
    r = h.on_ssh_request(routed(h, note("ssh_request", ssh_request())), CPUB)
    assert isinstance(r, Reply) and r.is_error
    assert r.value == "Daemon does not permit connections to localhost:22"
    assert r.key_name == f"{SID}.pi.sshnp" and r.to == "@client"
    h = handler(permit_open=["*:22"], local_sshd_port=22)
    assert isinstance(h.on_ssh_request(routed(h, note("ssh_request", ssh_request())), CPUB),
                      SessionPlan)


def test_tunnel_failure_reply_text():
    h = handler()
    plan = h.on_ssh_request(routed(h, note("ssh_request", ssh_request())), CPUB)
    r = h.tunnel_failed(plan, "connection refused")
    assert r.value == ("Failed to start up the daemon side of the srv socket tunnel : "
                       "connection refused")
    assert r.is_error and r.key_name == f"{SID}.pi.sshnp"


@pytest.mark.parametrize("target,rules,ok", [
    (("localhost", 22), ["localhost:22"], True),
    (("localhost", 22), ["*:22"], True),
    (("localhost", 22), ["localhost:*"], True),
    (("localhost", 22), ["*:*"], True),
    (("localhost", 22), ["127.0.0.1:22"], False),  # exact strings, no DNS (like Dart)
    (("localhost", 22), ["localhost:2222"], False),
])
def test_permitted(target, rules, ok):
    assert permitted(*target, rules) is ok


def test_npt_request_signature_failure_is_answered():
    """npt's answer names the failed signature (ssh_request only logs), as Dart's daemon;
    the request itself is in tests/unit/test_daemon_npt.py."""
    h = handler()
    from noports.npproto import NptRequest
    nr = NptRequest(session_id=SID, rvd_host="h", rvd_port=1, requested_port=22,
                    client_nonce=dart_iso_now(), rvd_nonce=dart_iso_now(),
                    client_ephemeral_pk=CPUB)
    bad = h.on_npt_request(routed(h, note("npt_request", sign_envelope(nr.to_dict(), DPRIV))),
                           CPUB)
    assert isinstance(bad, Reply) and bad.value.startswith("Signature not verified: ")
