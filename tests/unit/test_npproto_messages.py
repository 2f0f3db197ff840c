"""M1-M6 (docs/reference/noports-protocol.md#message-catalogue): exact field names and order, round trips, Dart-like type checks."""

import json
from pathlib import Path

import pytest

from noports.npproto import (
    CIPHER_AES_CTR,
    CIPHER_CHACHA20_POLY1305,
    DeviceInfo,
    NptRequest,
    ProtocolError,
    RelayRequest,
    RelayResponse,
    SessionResponse,
    SshRequest,
    negotiate_cipher,
)
from noports.npproto.messages import is_daemon_error

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "npproto"
SID = "b3bbf23a-bf85-498d-87d5-cd832931d092"


def fixture(name):
    return json.loads((FIX / name).read_text())


# --- M1 -----------------------------------------------------------------------------------------

def test_m1_byte_identical_to_reference_shape():
    fx = fixture("m1_relay_request.json")
    msg = RelayRequest(session_id="a4b8a23e-b39f-4aa7-9991-ec7923a37192", atsign_a="@cconstab",
                       atsign_b="@ssh_1", client_nonce="2024-01-27T08:48:00.911746")
    assert msg.to_json() == fx["value"]
    assert RelayRequest.from_json(fx["value"]) == msg


def test_m1_keeps_newer_fields_after_official_ones():
    text = ('{"sessionId":"s","atSignA":"@a","atSignB":"@b","authenticateSocketA":true,'
            '"authenticateSocketB":false,"clientNonce":"n","relayAuthMode":"payload"}')
    msg = RelayRequest.from_json(text)
    assert msg.extra == {"relayAuthMode": "payload"}
    assert msg.to_json() == text


@pytest.mark.parametrize(("patch", "match"), [
    ({"sessionId": None}, "'sessionId' is null"),
    ({"atSignA": 5}, "'atSignA' should be a String but is a int"),
    ({"authenticateSocketA": "true"}, "'authenticateSocketA' should be a bool"),
    ({"authenticateSocketB": 1}, "'authenticateSocketB' should be a bool"),
])
def test_m1_type_errors(patch, match):
    d = {**json.loads(fixture("m1_relay_request.json")["value"]), **patch}
    with pytest.raises(ProtocolError, match=match):
        RelayRequest.from_json(json.dumps(d))


def test_m1_missing_required_field():
    d = json.loads(fixture("m1_relay_request.json")["value"])
    del d["clientNonce"]
    with pytest.raises(ProtocolError, match="'clientNonce' is missing"):
        RelayRequest.from_json(json.dumps(d))


# --- M2 -----------------------------------------------------------------------------------------

def test_m2_csv_forms():
    r = RelayResponse.from_csv("85.239.53.170,43903,38051,2024-03-06T02:43:44.773487")
    assert (r.host, r.port_a, r.port_b, r.rvd_nonce) == ("85.239.53.170", 43903, 38051,
                                                          "2024-03-06T02:43:44.773487")
    assert r.to_csv() == "85.239.53.170,43903,38051,2024-03-06T02:43:44.773487"
    assert RelayResponse.from_csv("rv.example.com,1,2").rvd_nonce is None
    legacy = RelayResponse.from_csv("rv.example.com,1,2,null")
    assert legacy.rvd_nonce is None and legacy.to_csv() == "rv.example.com,1,2,null"


def test_m2_json_form_of_newer_relays():
    r = RelayResponse.from_csv('{"address":"1.2.3.4","portA":10,"portB":11,"rvdNonce":"n",'
                               '"supportsEventLogging":true}')
    assert (r.host, r.port_a, r.port_b, r.rvd_nonce) == ("1.2.3.4", 10, 11, "n")


@pytest.mark.parametrize("bad", ["", "h,1", "h,1,2,n,x", "h,a,2,n", ",1,2,n", "h,0,2,n",
                                 "h,1,70000,n"])
def test_m2_rejects(bad):
    with pytest.raises(ProtocolError, match="relay response"):
        RelayResponse.from_csv(bad)


# --- M3 -----------------------------------------------------------------------------------------

def _m3(pk: str) -> SshRequest:
    return SshRequest(session_id=SID, host="85.239.53.170", port=38051,
                      authenticate_to_rvd=True, client_nonce="2024-09-24T00:34:28.652988",
                      rvd_nonce="2024-09-24T04:34:33.038927", encrypt_rvd_traffic=True,
                      client_ephemeral_pk=pk, client_ephemeral_pk_type="rsa2048")


def test_m3_byte_identical_field_order():
    fx = fixture("m3_ssh_request_envelope.json")
    pk = fixture("test_keys.json")["clientEphemeralPK"]
    assert _m3(pk).to_json() == fx["payload_text"]
    assert SshRequest.from_json(fx["payload_text"]) == _m3(pk)


def test_m3_our_cipher_offer_goes_last():
    msg = _m3("PK")
    msg.np_ciphers = [CIPHER_CHACHA20_POLY1305, CIPHER_AES_CTR]
    text = msg.to_json()
    assert text.endswith(',"clientEphemeralPKType":"rsa2048",'
                         '"npCiphers":["chacha20-poly1305-v1","aes-256-ctr"]}')
    assert SshRequest.from_json(text) == msg


def test_m3_v4_request_missing_v5_fields_defaults_false():
    r = SshRequest.from_json('{"direct":true,"sessionId":"s","host":"h","port":1}')
    assert r.authenticate_to_rvd is False and r.encrypt_rvd_traffic is False
    assert r.client_nonce is None and r.np_ciphers is None
    # explicit nulls (what Dart's toJson emits for unset fields) are the same as missing
    r2 = SshRequest.from_json('{"direct":true,"sessionId":"s","host":"h","port":1,'
                              '"authenticateToRvd":null,"encryptRvdTraffic":null}')
    assert r2.authenticate_to_rvd is False


@pytest.mark.parametrize(("patch", "match"), [
    ({"port": "38051"}, "'port' should be a int but is a String"),
    ({"port": True}, "'port' should be a int but is a bool"),
    ({"host": None}, "'host' is null"),
    ({"authenticateToRvd": "yes"}, "'authenticateToRvd' should be a bool"),
    ({"encryptRvdTraffic": 1}, "'encryptRvdTraffic' should be a bool"),
    ({"clientEphemeralPK": 7}, "'clientEphemeralPK' should be a String"),
    ({"direct": False}, "direct:false"),
    ({"clientEphemeralPKType": "rsa4096"}, "rsa2048"),
    ({"rvdNonce": None}, "rvdNonce' is missing|rvdNonce is missing"),
    ({"npCiphers": "aes-256-ctr"}, "'npCiphers' should be a List"),
    ({"npCiphers": [1]}, "list of strings"),
    ({"port": 0}, "not a TCP port"),
])
def test_m3_type_errors_name_the_field(patch, match):
    d = {**json.loads(fixture("m3_ssh_request_envelope.json")["payload_text"]), **patch}
    with pytest.raises(ProtocolError, match=match):
        SshRequest.from_json(json.dumps(d))


def test_m3_float_port_rejected():
    with pytest.raises(ProtocolError, match="float"):
        SshRequest.from_json('{"direct":true,"sessionId":"s","host":"h","port":22.0}')


# --- M4 -----------------------------------------------------------------------------------------

def test_m4_field_order_requested_port_before_host():
    msg = NptRequest(session_id=SID, rvd_host="1.2.3.4", rvd_port=5000, requested_port=22,
                     requested_host="localhost", client_nonce="cn", rvd_nonce="rn",
                     client_ephemeral_pk="PK", timeout_ms=30000)
    expected = ('{"sessionId":"' + SID + '","rvdHost":"1.2.3.4","rvdPort":5000,'
                '"requestedPort":22,"requestedHost":"localhost","authenticateToRvd":true,'
                '"clientNonce":"cn","rvdNonce":"rn","encryptRvdTraffic":true,'
                '"clientEphemeralPK":"PK","clientEphemeralPKType":"rsa2048","timeout":30000}')
    assert msg.to_json() == expected
    assert NptRequest.from_json(expected) == msg


def test_m4_timeout_default_and_errors():
    base = {"sessionId": "s", "rvdHost": "h", "rvdPort": 1, "requestedPort": 22,
            "requestedHost": "localhost"}
    assert NptRequest.from_dict(base).timeout_ms == 60000
    with pytest.raises(ProtocolError, match="'timeout' should be a int"):
        NptRequest.from_dict({**base, "timeout": "30s"})
    with pytest.raises(ProtocolError, match="'requestedHost' is missing"):
        NptRequest.from_dict({k: v for k, v in base.items() if k != "requestedHost"})


# --- M5 -----------------------------------------------------------------------------------------

def test_m5_ssh_byte_identical_and_roundtrip():
    fx = fixture("m5_session_response_envelope.json")
    msg = SessionResponse.from_json(fx["payload_text"])
    assert msg.ephemeral_private_key.startswith("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    assert msg.to_json() == fx["payload_text"]


def test_m5_npt_omits_key_c_daemon_sends_null():
    npt = SessionResponse(session_id=SID, session_aes_key="k", session_iv="i",
                          omit_ephemeral_private_key=True)
    assert npt.to_json() == (f'{{"status":"connected","sessionId":"{SID}",'
                             '"sessionAESKey":"k","sessionIV":"i"}')
    c_style = SessionResponse(session_id=SID)
    assert c_style.to_json() == (f'{{"status":"connected","sessionId":"{SID}",'
                                 '"ephemeralPrivateKey":null,"sessionAESKey":null,'
                                 '"sessionIV":null}')
    assert SessionResponse.from_json(npt.to_json()) == npt
    assert SessionResponse.from_json(c_style.to_json()) == c_style


def test_m5_host_keys_and_cipher_answer_after_official_fields():
    hk = ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJdD7y3aLq454yWBdwLWbieU1ebz9/cu7/QEXn9OIeZJ "
          "root@device"]
    msg = SessionResponse(session_id=SID, session_aes_key="k", session_iv="i", host_keys=hk,
                          np_cipher=CIPHER_CHACHA20_POLY1305)
    text = msg.to_json()
    assert text.index('"sessionIV"') < text.index('"hostKeys"') < text.index('"npCipher"')
    assert SessionResponse.from_json(text) == msg


@pytest.mark.parametrize("bad", [
    "ssh-ed25519 AAAA\nevil.example ssh-rsa AAAA",  # known_hosts injection
    "not a key at all!",
    "ssh-ed25519",
])
def test_m5_rejects_bad_host_keys(bad):
    d = {"status": "connected", "sessionId": SID, "hostKeys": [bad]}
    with pytest.raises(ProtocolError, match="hostKeys"):
        SessionResponse.from_dict(d)


def test_m5_type_errors():
    with pytest.raises(ProtocolError, match="'sessionAESKey' should be a String"):
        SessionResponse.from_dict({"status": "connected", "sessionId": SID, "sessionAESKey": 1})
    with pytest.raises(ProtocolError, match="'status' is missing"):
        SessionResponse.from_dict({"sessionId": SID})
    with pytest.raises(ProtocolError, match="JSON object"):
        SessionResponse.from_json("[1]")


def test_daemon_error_strings():
    assert is_daemon_error("Daemon does not permit connections to localhost:23")
    assert not is_daemon_error('{"payload":{}}')


# --- M6 -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["issue_1182", "reference", "c_daemon"])
def test_m6_real_examples_roundtrip_byte_identical(which):
    text = fixture("m6_device_info.json")[which]["value"]
    assert DeviceInfo.from_json(text).to_json() == text


def test_m6_built_from_fields_matches_reference():
    msg = DeviceInfo(devicename="orac", device_group_name="__none__", version="5.6.3",
                     core_package_version="6.2.0",
                     supported_features={"srAuth": True, "srE2ee": True,
                                         "acceptsPublicKeys": False,
                                         "supportsPortChoice": True, "adjustableTimeout": True},
                     allowed_services=["localhost:22", "localhost:3389"])
    assert msg.to_json() == fixture("m6_device_info.json")["reference"]["value"]


def test_m6_feature_checks():
    c = DeviceInfo.from_json(fixture("m6_device_info.json")["c_daemon"]["value"])
    assert c.device_group_name is None
    assert c.missing_features(["srAuth", "srE2ee", "adjustableTimeout"]) == ["adjustableTimeout"]
    v4 = DeviceInfo.from_json('{"devicename":"old","version":"4.0.5","corePackageVersion":"x"}')
    assert v4.effective_features() == {"acceptsPublicKeys": True}
    assert v4.missing_features(["srAuth"]) == ["srAuth"]


def test_m6_type_errors():
    with pytest.raises(ProtocolError, match="supportedFeatures.srAuth should be a bool"):
        DeviceInfo.from_dict({"devicename": "x", "supportedFeatures": {"srAuth": "yes"}})
    with pytest.raises(ProtocolError, match="'allowedServices' should be a list of strings"):
        DeviceInfo.from_dict({"devicename": "x", "allowedServices": [22]})


def test_negotiate_cipher():
    assert negotiate_cipher(None, (CIPHER_CHACHA20_POLY1305, CIPHER_AES_CTR)) == CIPHER_AES_CTR
    assert negotiate_cipher(["x", CIPHER_CHACHA20_POLY1305], (CIPHER_CHACHA20_POLY1305,)) == \
        CIPHER_CHACHA20_POLY1305
    assert negotiate_cipher(["x"], (CIPHER_CHACHA20_POLY1305,)) == CIPHER_AES_CTR
