"""The client's security decisions (noports.client.checks), without an event loop or sockets.

Every test calls a plain function with what a relay, a device or an impostor could send and
asserts what the user would see: accepted, or the error (class, exit code, text) that stops
the session before anything is connected.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from noports import crypto
from noports.client import checks
from noports.client.errors import (
    EXIT_DEVICE_REFUSED,
    EXIT_SECURITY,
    DeviceRefused,
    DeviceTimeout,
    KeysError,
    RelayError,
    SecurityError,
)
from noports.client.params import SessionParams
from noports.keys.atkeys import generate_atkeys
from noports.npproto import keys as npkeys
from noports.npproto.envelope import sign_envelope
from noports.npproto.messages import DeviceInfo, SessionResponse

CLIENT, DEVICE, RELAY = "@alice", "@dev", "@r1"
HOST_KEY = ("ssh-ed25519 " + base64.b64encode(
    b"\x00\x00\x00\x0bssh-ed25519\x00\x00\x00\x20" + b"k" * 32).decode() + " root@box")
_KEYS: dict[str, Any] = {}


def keys(atsign: str) -> Any:
    if atsign not in _KEYS:
        _KEYS[atsign] = generate_atkeys(atsign)
    return _KEYS[atsign]


def params(**kw: Any) -> SessionParams:
    base: dict[str, Any] = dict(client_atsign=CLIENT, device_atsign=DEVICE, relays=[RELAY],
                                device="box", remote_user="pi", cache_dir=Path("/c"))
    base.update(kw)
    return SessionParams(**base)


def signed(payload: dict[str, Any], by: str = DEVICE) -> str:
    return sign_envelope(payload, keys(by).encrypt_private)


def response(sid: str, **kw: Any) -> dict[str, Any]:
    d = SessionResponse(session_id=sid, ephemeral_private_key="k", host_keys=[HOST_KEY]
                        ).to_dict()
    d.update(kw)
    return d


def test_checks_need_no_event_loop() -> None:
    """The module is pure: importing it (and everything it imports) starts no asyncio."""
    code = ("import sys, noports.client.checks, noports.client.deviceinfo; "
            "assert 'asyncio' not in sys.modules, 'asyncio imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# --- who may answer ----------------------------------------------------------------------------

def test_route_files_answers_under_their_sender_and_session() -> None:
    p, sid = params(), npkeys.new_session_id()
    r = checks.route(p, f"{CLIENT}:{sid}.sshrvd@R1", "R1")
    assert r == checks.Route("relay", "@r1", sid)
    assert checks.route(p, f"{CLIENT}:{sid}.box.sshnp{DEVICE}", DEVICE) == \
        checks.Route("session", DEVICE, sid)
    assert checks.route(p, f"{CLIENT}:heartbeat.box.sshnp{DEVICE}", "@DEV") == \
        checks.Route("heartbeat", DEVICE)
    # a relay's refusal is filed like its answer: under its sender and the session asked for
    assert checks.route(p, f"{CLIENT}:nack.{sid}.sshrvd@R1", "@R1") == \
        checks.Route("relay_nack", "@r1", sid)
    assert checks.route(p, f"{CLIENT}:nack.{sid}.sshrvd@R1", "not an atsign/") is None


def test_route_ignores_impostors_and_garbage() -> None:
    p, sid = params(), npkeys.new_session_id()
    # a session response or heartbeat from anyone but the device atSign goes nowhere
    assert checks.route(p, f"{CLIENT}:{sid}.box.sshnp@mallory", "@mallory") is None
    assert checks.route(p, f"{CLIENT}:{sid}.box.sshnp{DEVICE}", "@mallory") is None
    assert checks.route(p, f"{CLIENT}:heartbeat.box.sshnp@mallory", "@mallory") is None
    # the right device atSign, but another of its devices
    assert checks.route(p, f"{CLIENT}:{sid}.other.sshnp{DEVICE}", DEVICE) is None
    for key in ("", "x" * 100_000, f"{CLIENT}:ping.box.sshnp{DEVICE}", "\x00:\n@",
                f"{CLIENT}:not-a-uuid.sshrvd@r1"):
        assert checks.route(p, key, DEVICE) is None, key


# --- the relay's answer ------------------------------------------------------------------------

def test_relay_answer_needs_an_rvd_nonce() -> None:
    rr = checks.relay_answer(RELAY, "10.0.0.1,4001,4002,2024-01-27T08:48:00.911746")
    assert (rr.host, rr.port_a, rr.port_b) == ("10.0.0.1", 4001, 4002)
    with pytest.raises(RelayError, match="without an rvdNonce") as ei:
        checks.relay_answer(RELAY, "10.0.0.1,4001,4002")
    assert str(ei.value).startswith("relay: relay @r1 answered")


@pytest.mark.parametrize("answer", ["", "garbage", "h,1", "h,99999999,2,n", "h,a,b,n",
                                    "1," * 100_000, "h,1,2,n\n" * 3])
def test_relay_answer_hostile(answer: str) -> None:
    try:
        rr = checks.relay_answer(RELAY, answer)
    except RelayError as exc:
        assert "@r1" in str(exc)
    else:  # whatever is accepted is a usable answer
        assert 0 < rr.port_a < 65536 and rr.rvd_nonce


# --- the device's features ---------------------------------------------------------------------

def info(features: dict[str, bool] | None, version: str = "5.1") -> DeviceInfo:
    return DeviceInfo(devicename="box", version=version, core_package_version="x",
                      supported_features=features)


def test_required_features_follow_the_session() -> None:
    assert checks.required_features(params()) == ["srAuth", "srE2ee"]
    assert checks.required_features(params(tunnel_mode="ssh")) == ["srAuth"]
    assert checks.required_features(params(tunnel_mode="ssh", send_ssh_public_key=True)) == \
        ["srAuth", "acceptsPublicKeys"]


def test_check_features_names_what_lacks() -> None:
    checks.check_features(params(), info({"srAuth": True, "srE2ee": True}))
    with pytest.raises(DeviceRefused) as ei:
        checks.check_features(params(), info({"srAuth": True, "srE2ee": False}, "5.0.1"))
    assert "box@dev (version 5.0.1) does not support srE2ee" in str(ei.value)
    assert ei.value.exit_code == EXIT_DEVICE_REFUSED
    # a v4 daemon (no feature map) only accepts public keys
    with pytest.raises(DeviceRefused, match="does not support srAuth, srE2ee"):
        checks.check_features(params(), info(None, ""))


def test_device_timeout_says_whether_the_device_was_alive() -> None:
    silent = checks.device_timeout(params(daemon_timeout=3), pinged=False)
    assert isinstance(silent, DeviceTimeout)
    assert "box@dev did not answer within 3s" in str(silent)
    assert "managers (-m)" in str(silent)
    alive = checks.device_timeout(params(tunnel_mode="ssh"), pinged=True)
    assert "answered the ping but not the session request" in str(alive)
    assert "only supports --tunnel-mode aes" in str(alive)


# --- the device's signed answer ----------------------------------------------------------------

def test_verify_response_accepts_the_device() -> None:
    sid = npkeys.new_session_id()
    resp = checks.verify_response(params(), sid, signed(response(sid)),
                                  keys(DEVICE).encrypt_public)
    assert resp.session_id == sid and resp.host_keys == [HOST_KEY]


def test_verify_response_wrong_signer_is_retryable_then_fatal() -> None:
    sid = npkeys.new_session_id()
    with pytest.raises(checks.BadSignature) as ei:
        checks.verify_response(params(), sid, signed(response(sid), by="@mallory"),
                               keys(DEVICE).encrypt_public)
    assert isinstance(ei.value, SecurityError) and ei.value.exit_code == EXIT_SECURITY
    assert "session response from @dev failed verification" in str(ei.value)
    assert "nothing was connected" in str(ei.value)


def test_verify_response_refuses_a_replayed_session() -> None:
    """A genuine response of an earlier session, delivered under our session id."""
    old, sid = npkeys.new_session_id(), npkeys.new_session_id()
    with pytest.raises(SecurityError, match=f"is for session {old}, not {sid}") as ei:
        checks.verify_response(params(), sid, signed(response(old)),
                               keys(DEVICE).encrypt_public)
    assert not isinstance(ei.value, checks.BadSignature)


def test_verify_response_tampered_payload() -> None:
    sid = npkeys.new_session_id()
    env = json.loads(signed(response(sid)))
    env["payload"]["hostKeys"] = [HOST_KEY.replace("root@box", "root@evil")]
    with pytest.raises(checks.BadSignature):
        checks.verify_response(params(), sid, json.dumps(env), keys(DEVICE).encrypt_public)


def test_verify_response_daemon_refusal_and_status() -> None:
    sid = npkeys.new_session_id()
    with pytest.raises(DeviceRefused, match="refused: no permit-open for localhost:22"):
        checks.verify_response(params(), sid, "no permit-open for localhost:22\n",
                               keys(DEVICE).encrypt_public)
    with pytest.raises(DeviceRefused) as ei:
        checks.verify_response(params(), sid, "x" * 10_000, keys(DEVICE).encrypt_public)
    assert len(str(ei.value)) < 700  # a huge refusal text is cut (500 characters)
    with pytest.raises(DeviceRefused, match="compare `date -u` here and on the device"):
        checks.verify_response(params(), sid, "its timestamp 2026-01-01T00:00:00.000Z is "
                               "90 s behind the device clock (allowed: 60 s either way).",
                               keys(DEVICE).encrypt_public)
    with pytest.raises(DeviceRefused, match="answered status 'busy'"):
        checks.verify_response(params(), sid, signed(response(sid, status="busy")),
                               keys(DEVICE).encrypt_public)


@pytest.mark.parametrize("change,match", [
    ({"sessionId": None}, "malformed signed session response"),
    ({"sessionId": 7}, "malformed signed session response"),
    ({"status": ["connected"]}, "malformed signed session response"),
    ({"hostKeys": "ssh-ed25519 AAAA"}, "malformed signed session response"),
    ({"hostKeys": [HOST_KEY + "\n@cert-authority * ssh-rsa AAAA"]}, "not an OpenSSH public"),
    ({"hostKeys": [123]}, "malformed signed session response"),
    ({"npCipher": {"a": 1}}, "malformed signed session response"),
])
def test_verify_response_missing_fields_and_wrong_types(change: dict[str, Any],
                                                        match: str) -> None:
    sid = npkeys.new_session_id()
    payload = response(sid)
    for k, v in change.items():
        if v is None:
            payload.pop(k)
        else:
            payload[k] = v
    with pytest.raises(SecurityError, match=match) as ei:
        checks.verify_response(params(), sid, signed(payload), keys(DEVICE).encrypt_public)
    assert not isinstance(ei.value, checks.BadSignature)  # genuinely signed: no re-fetch


@pytest.mark.parametrize("value", [
    "{}", "{", '{"payload": "x", "signature": "s", "hashingAlgo": "sha256", '
    '"signingAlgo": "rsa2048"}',
    '{"payload": {}, "signature": 1, "hashingAlgo": "sha256", "signingAlgo": "rsa2048"}',
    '{"payload": {}, "signature": "AAAA", "hashingAlgo": "md5", "signingAlgo": "rsa2048"}',
    '{"payload": {}, "signature": "AAAA", "hashingAlgo": "sha256", "signingAlgo": "none"}',
])
def test_verify_response_malformed_envelopes(value: str) -> None:
    with pytest.raises(checks.BadSignature, match="failed verification"):
        checks.verify_response(params(), npkeys.new_session_id(), value,
                               keys(DEVICE).encrypt_public)


@pytest.mark.parametrize("value,match", [
    ("{" + " " * checks.MAX_SESSION_RESPONSE + "}", "more than the 65536 a device sends"),
    ('{"payload":' * 5000, "not usable JSON"),
    ('{"payload": {"n": ' + "9" * 5000 + "}}", "not usable JSON"),
    ('{"payload": ' + "[" * 5000 + "]" * 5000 + "}", "not usable JSON"),
])
def test_verify_response_huge_values(value: str, match: str) -> None:
    """Huge or absurdly nested input is a SecurityError, never a crash of the client."""
    with pytest.raises(SecurityError, match=match) as ei:
        checks.verify_response(params(), npkeys.new_session_id(), value,
                               keys(DEVICE).encrypt_public)
    assert ei.value.exit_code == EXIT_SECURITY


def test_verify_response_with_a_bad_key() -> None:
    sid = npkeys.new_session_id()
    for pk in ("", "not base64 !", base64.b64encode(b"x" * 300).decode()):
        with pytest.raises(checks.BadSignature):
            checks.verify_response(params(), sid, signed(response(sid)), pk)


# --- what we send and what we use --------------------------------------------------------------

def test_ssh_public_key_line() -> None:
    pub = Path("/k/id.pub")
    assert checks.ssh_public_key_line(pub, HOST_KEY + "\n") == HOST_KEY
    for text in ("", "-----BEGIN OPENSSH PRIVATE KEY-----", HOST_KEY + "\nssh-rsa AAAA x",
                 "ssh-dss AAAA"):
        with pytest.raises(KeysError, match="/k/id.pub is not an OpenSSH public key line"):
            checks.ssh_public_key_line(pub, text)


def test_check_remote_user() -> None:
    checks.check_remote_user(params(), "pi")
    checks.check_remote_user(params(need_remote_user=False), None)
    with pytest.raises(DeviceRefused, match="has not shared its username") as ei:
        checks.check_remote_user(params(), None)
    assert ei.value.step == "username" and "-u/--remote-user" in str(ei.value)


@pytest.fixture(scope="module")
def session_key() -> Any:
    from cryptography.hazmat.primitives.asymmetric import rsa
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return crypto.public_key_b64(key.public_key()), key


def aes_response(pub: str, cipher: str | None = None, *, key_len: int = 32) -> SessionResponse:
    return SessionResponse(
        session_id=npkeys.new_session_id(), np_cipher=cipher,
        session_aes_key=crypto.rsa_encrypt(pub, base64.b64encode(os.urandom(key_len)).decode()),
        session_iv=crypto.rsa_encrypt(pub, base64.b64encode(os.urandom(16)).decode()))


def test_session_secrets(session_key: Any) -> None:
    pub, priv = session_key
    key, iv, cipher, d2c = checks.session_secrets(params(), aes_response(pub), priv)
    assert (len(key), len(iv), cipher, d2c) == (32, 16, "aes-256-ctr", None)
    assert checks.session_secrets(params(), aes_response(pub, "chacha20-poly1305-v1"),
                                  priv)[2] == "chacha20-poly1305-v1"


def test_session_secrets_twin_keys(session_key: Any) -> None:
    """An official twin-key answer: aesKeyC2D/ivC2D instead of sessionAESKey/IV, plus D2C."""
    pub, priv = session_key
    secrets = [os.urandom(32), os.urandom(16), os.urandom(32), os.urandom(16)]
    enc = [crypto.rsa_encrypt(pub, base64.b64encode(b).decode()) for b in secrets]
    resp = SessionResponse(session_id="x", extra={"aesKeyC2D": enc[0], "ivC2D": enc[1],
                                                  "aesKeyD2C": enc[2], "ivD2C": enc[3]})
    resp = SessionResponse.from_dict(resp.to_dict())  # sessionAESKey/IV: null on the wire
    key, iv, _cipher, d2c = checks.session_secrets(params(), resp, priv)
    assert [key, iv, *d2c] == secrets


def test_session_secrets_refusals(session_key: Any) -> None:
    pub, priv = session_key
    with pytest.raises(SecurityError, match="'rot13', which was not offered"):
        checks.session_secrets(params(), aes_response(pub, "rot13"), priv)
    with pytest.raises(SecurityError, match="'aes-256-ctr', which was not offered"):
        checks.session_secrets(params(ciphers=("chacha20-poly1305-v1",)), aes_response(pub),
                               priv)
    with pytest.raises(SecurityError, match="no session key"):
        checks.session_secrets(params(), SessionResponse(session_id="x"), priv)
    with pytest.raises(SecurityError, match="no session key"):
        checks.session_secrets(params(), aes_response(pub), None)
    other = keys("@mallory").encrypt_public  # encrypted to someone else's key
    with pytest.raises(SecurityError, match="cannot decrypt the session key"):
        checks.session_secrets(params(), aes_response(other), priv)
    with pytest.raises(SecurityError, match="cannot decrypt the session key"):
        checks.session_secrets(params(), aes_response(pub, key_len=16), priv)
    garbage = SessionResponse(session_id="x", session_aes_key="!!" * 1000, session_iv="AA==")
    with pytest.raises(SecurityError, match="cannot decrypt the session key"):
        checks.session_secrets(params(), garbage, priv)


def test_ssh_mode_needs_host_keys_and_an_ephemeral_key() -> None:
    p = params(tunnel_mode="ssh")
    checks.check_ssh_mode(p, SessionResponse(session_id="x", ephemeral_private_key="k"),
                          [HOST_KEY])
    with pytest.raises(SecurityError, match="sent no host keys to pin"):
        checks.check_ssh_mode(p, SessionResponse(session_id="x", ephemeral_private_key="k"), [])
    with pytest.raises(DeviceRefused, match="no ephemeral key"):
        checks.check_ssh_mode(p, SessionResponse(session_id="x"), [HOST_KEY])


def test_host_key_pin() -> None:
    resp = SessionResponse(session_id="x", host_keys=[HOST_KEY])
    pin = checks.host_key_pin(params(), resp)
    assert pin.alias == "dev/box" and pin.host_keys == [HOST_KEY]
    assert pin.target == Path("/c/known_hosts.d/dev__box")
    pin = checks.host_key_pin(params(known_hosts_file=Path("/k/kh")), resp)
    assert pin.target == Path("/k/kh")
    # an official daemon sends none: nothing to pin (ssh falls back to trust on first use)
    assert checks.host_key_pin(params(), SessionResponse(session_id="x")).target is None
