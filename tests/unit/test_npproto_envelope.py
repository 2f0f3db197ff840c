"""Signed envelopes, relay auth lines (docs/reference/noports-protocol.md#relay-authentication), Dart ISO nonces and the replay guard."""

import json
from datetime import datetime, timezone
from pathlib import Path

import pytest

from noports import crypto
from noports.npproto import (
    ProtocolError,
    ReplayError,
    ReplayGuard,
    SignatureError,
    SshRequest,
    dart_iso,
    dart_iso_now,
    extract_auth_line,
    parse_dart_iso,
    relay_auth_line,
    sign_envelope,
    verify_envelope,
    verify_relay_auth,
)

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "npproto"
KEYS = json.loads((FIX / "test_keys.json").read_text())
CPUB, CPRIV = KEYS["client"]["publicKey"], KEYS["client"]["privateKey"]
DPUB, DPRIV = KEYS["device"]["publicKey"], KEYS["device"]["privateKey"]


def fixture(name):
    return json.loads((FIX / name).read_text())


# --- envelopes ----------------------------------------------------------------------------------

def test_sign_envelope_byte_identical_to_fixture():
    """Fixture was assembled by string concatenation and signed by the official Python SDK."""
    fx = fixture("m3_ssh_request_envelope.json")
    payload = SshRequest.from_json(fx["payload_text"]).to_dict()
    assert sign_envelope(payload, CPRIV) == fx["envelope_text"]


def test_envelope_field_order_and_algos():
    env = sign_envelope({"b": 1, "a": "x"}, CPRIV)
    assert env.startswith('{"payload":{"b":1,"a":"x"},"signature":"')
    assert env.endswith('","hashingAlgo":"sha256","signingAlgo":"rsa2048"}')
    sig = json.loads(env)["signature"]
    # The SDK is a test-only cross-check; the old-Python device venvs do not install it.
    EncryptionUtil = pytest.importorskip("at_client.util.encryptionutil").EncryptionUtil
    assert sig == EncryptionUtil.sign_sha256_rsa('{"b":1,"a":"x"}', CPRIV)


@pytest.mark.parametrize(("name", "pub"), [("m3_ssh_request_envelope.json", CPUB),
                                           ("m5_session_response_envelope.json", DPUB)])
def test_verify_fixture_envelopes(name, pub):
    fx = fixture(name)
    assert verify_envelope(fx["envelope_text"], pub) == json.loads(fx["payload_text"])
    assert verify_envelope(fx["envelope_text"].encode(), pub)  # bytes accepted too


def test_verify_reserialises_like_dart():
    """A C peer may pretty-print or escape differently; the payload is re-encoded, not reused."""
    fx = fixture("m5_session_response_envelope.json")
    pretty = json.dumps(json.loads(fx["envelope_text"]), indent="\t", ensure_ascii=True)
    assert pretty != fx["envelope_text"]
    assert verify_envelope(pretty, DPUB)["sessionId"] == "b3bbf23a-bf85-498d-87d5-cd832931d092"


def test_roundtrip_with_unicode_and_newlines():
    payload = {"ephemeralPrivateKey": "-----BEGIN-----\nx/y\n", "note": "é😀\x01"}
    assert verify_envelope(sign_envelope(payload, DPRIV), DPUB) == payload


def _tamper(text: str, old: str, new: str) -> str:
    assert old in text
    return text.replace(old, new, 1)


def test_tampered_payload_rejected():
    env = fixture("m3_ssh_request_envelope.json")["envelope_text"]
    with pytest.raises(SignatureError, match="does not verify"):
        verify_envelope(_tamper(env, '"port":38051', '"port":38052'), CPUB)
    # reordering payload fields changes Dart's re-serialisation too
    obj = json.loads(env)
    obj["payload"] = dict(reversed(list(obj["payload"].items())))
    with pytest.raises(SignatureError, match="does not verify"):
        verify_envelope(json.dumps(obj), CPUB)


def test_wrong_key_rejected():
    env = fixture("m3_ssh_request_envelope.json")["envelope_text"]
    with pytest.raises(SignatureError, match="does not verify"):
        verify_envelope(env, DPUB)
    with pytest.raises(SignatureError):
        verify_envelope(env, "not a key")


@pytest.mark.parametrize(("mutate", "match"), [
    (lambda e: e.pop("signature"), "'signature' is missing"),
    (lambda e: e.update(signature=5), "'signature' is missing or not a string"),
    (lambda e: e.pop("hashingAlgo"), "'hashingAlgo'"),
    (lambda e: e.update(hashingAlgo="md5"), "unsupported hashingAlgo"),
    (lambda e: e.update(signingAlgo="ecc_secp256r1"), "unsupported signingAlgo"),
    (lambda e: e.update(payload="{}"), "'payload' is missing or not an object"),
    (lambda e: e.pop("payload"), "'payload'"),
])
def test_malformed_envelopes(mutate, match):
    env = json.loads(fixture("m3_ssh_request_envelope.json")["envelope_text"])
    mutate(env)
    with pytest.raises(SignatureError, match=match):
        verify_envelope(json.dumps(env), CPUB)


@pytest.mark.parametrize("bad", ["not json", "[1,2]", '{"payload":{"t":1.5},"signature":"x",'
                                 '"hashingAlgo":"sha256","signingAlgo":"rsa2048"}'])
def test_unparseable_envelopes(bad):
    with pytest.raises(SignatureError):
        verify_envelope(bad, CPUB)


def test_signing_refuses_floats():
    with pytest.raises(ProtocolError, match="float"):
        sign_envelope({"timeout": 30.0}, CPRIV)


def test_sha512_envelopes_accepted():
    text = '{"a":1}'
    sig = crypto.sign(CPRIV, text, "sha512")
    env = ('{"payload":' + text + ',"signature":"' + sig +
           '","hashingAlgo":"sha512","signingAlgo":"rsa2048"}')
    assert verify_envelope(env, CPUB) == {"a": 1}


# --- relay auth ---------------------------------------------------------------------------------

def test_relay_auth_line_matches_fixture():
    fx = fixture("relay_auth_line.json")
    line = relay_auth_line(fx["sessionId"], fx["clientNonce"], fx["rvdNonce"], DPRIV)
    assert line == fx["line"].encode()
    assert line.endswith(b"}\n") and line.count(b"\n") == 1
    assert line.startswith(b'{"payload":{"sessionId":"b3bbf23a-bf85-498d-87d5-cd832931d092",'
                           b'"clientNonce":"2024-09-24T00:34:28.652988",'
                           b'"rvdNonce":"2024-09-24T04:34:33.038927"},"signature":"')


def test_verify_relay_auth():
    fx = fixture("relay_auth_line.json")
    args = (fx["sessionId"], fx["clientNonce"], fx["rvdNonce"])
    line = fx["line"].encode()
    assert verify_relay_auth(line, *args, DPUB)
    assert verify_relay_auth(line.rstrip(b"\n"), *args, DPUB)
    assert not verify_relay_auth(line, *args, CPUB)  # side B must be the device's key
    assert not verify_relay_auth(line, "00000000-0000-4000-8000-000000000000", *args[1:], DPUB)
    assert not verify_relay_auth(line, args[0], "2024-09-24T00:34:28.652989", args[2], DPUB)
    assert not verify_relay_auth(line, args[0], args[1], "other", DPUB)
    assert not verify_relay_auth(b"garbage\n", *args, DPUB)


def test_relay_verifies_its_own_serialisation_not_the_senders():
    """Same signature, payload fields reordered: still valid, since the relay rebuilds the text."""
    fx = fixture("relay_auth_line.json")
    env = json.loads(fx["line"])
    env["payload"] = {"rvdNonce": fx["rvdNonce"], "sessionId": "whatever", "clientNonce": "x"}
    assert verify_relay_auth(json.dumps(env), fx["sessionId"], fx["clientNonce"], fx["rvdNonce"],
                             DPUB)


def test_extract_auth_line():
    assert extract_auth_line(b'{"payload"') is None
    assert extract_auth_line(b'{"a":1}\nSSH-2.0-OpenSSH') == (b'{"a":1}', b"SSH-2.0-OpenSSH")
    with pytest.raises(ProtocolError, match="no auth line"):
        extract_auth_line(b"x" * 5000)


# --- nonces -------------------------------------------------------------------------------------

def test_dart_iso_format():
    assert dart_iso(datetime(2024, 1, 27, 8, 48, 0, 911746)) == "2024-01-27T08:48:00.911746"
    # Dart omits the microsecond digits when they are zero
    assert dart_iso(datetime(2024, 1, 27, 8, 48, 0, 911000)) == "2024-01-27T08:48:00.911"
    assert dart_iso(datetime(2024, 1, 27, 8, 48, 0)) == "2024-01-27T08:48:00.000"
    assert dart_iso(datetime(2024, 1, 27, 8, 48, 0, 5, tzinfo=timezone.utc)) == \
        "2024-01-27T08:48:00.000005Z"
    now = dart_iso_now()
    assert abs((parse_dart_iso(now) - datetime.now()).total_seconds()) < 5


@pytest.mark.parametrize("text", ["2024-01-27T08:48:00.911746", "2024-01-27T08:48:00.911"])
def test_parse_dart_iso_roundtrip(text):
    assert dart_iso(parse_dart_iso(text)) == text


@pytest.mark.parametrize("bad", ["yesterday", "2024-01-27 08:48:00", "2024-13-01T00:00:00.000"])
def test_parse_dart_iso_rejects(bad):
    with pytest.raises(ProtocolError):
        parse_dart_iso(bad)


# --- replay guard -------------------------------------------------------------------------------

class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _nonce(ts: float) -> str:
    return dart_iso(datetime.fromtimestamp(ts))


def test_replay_refused():
    clock = Clock(1_700_000_000.0)
    g = ReplayGuard(window=60, tz_tolerance=0, clock=clock)
    n = _nonce(clock.t - 1)
    g.check("sid-1", n)
    with pytest.raises(ReplayError, match="seen before"):
        g.check("sid-1", n)
    g.check("sid-2", n)  # a different session with the same nonce is fine


def test_stale_and_future_nonces_refused():
    clock = Clock(1_700_000_000.0)
    g = ReplayGuard(window=60, tz_tolerance=0, future_skew=10, clock=clock)
    with pytest.raises(ReplayError, match="too old"):
        g.check("s", _nonce(clock.t - 61))
    with pytest.raises(ReplayError, match="future"):
        g.check("s", _nonce(clock.t + 11))
    with pytest.raises(ReplayError, match="unusable"):
        g.check("s", "not a nonce")
    g.check("s", _nonce(clock.t - 59))


def test_timezone_tolerance_for_official_clients():
    clock = Clock(1_700_000_000.0)
    g = ReplayGuard(window=60, clock=clock)  # default: any zone within 14 h
    g.check("s", _nonce(clock.t - 4 * 3600))  # PR #1377: client 4 h behind the relay
    with pytest.raises(ReplayError, match="too old"):
        g.check("t", _nonce(clock.t - 15 * 3600))


def test_entries_expire_only_when_the_nonce_would_be_refused_anyway():
    clock = Clock(1_700_000_000.0)
    g = ReplayGuard(window=60, tz_tolerance=0, clock=clock)
    n = _nonce(clock.t)
    g.check("s", n)
    clock.t += 30
    with pytest.raises(ReplayError, match="seen before"):
        g.check("s", n)
    clock.t += 31
    g.check("other", _nonce(clock.t))  # triggers pruning
    assert len(g) == 1
    with pytest.raises(ReplayError, match="too old"):
        g.check("s", n)


def test_bounded_memory_fails_closed_for_evicted_range():
    clock = Clock(1_700_000_000.0)
    g = ReplayGuard(window=600, tz_tolerance=0, max_entries=3, clock=clock)
    nonces = [_nonce(clock.t - 100 + i) for i in range(5)]
    for i, n in enumerate(nonces):
        g.check(f"s{i}", n)
    assert len(g) == 3
    with pytest.raises(ReplayError, match="older than the replay memory"):
        g.check("s0", nonces[0])  # evicted, but must still not be accepted
    with pytest.raises(ReplayError, match="older than the replay memory"):
        g.check("new", nonces[1])
    with pytest.raises(ReplayError, match="seen before"):
        g.check("s4", nonces[4])
