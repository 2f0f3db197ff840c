"""npt without sockets, device side: the daemon's decisions on an npt_request (permit-open,
cipher, reply shape, replay) and the control stream parser (hostile input). Runs under
Python 3.8 too (tests/integration/test_old_pythons.py); the client's pieces are in
tests/unit/test_npt_client.py."""

from __future__ import annotations

import base64
import dataclasses
import json
from pathlib import Path

import pytest

from noports.daemon.config import build_config
from noports.daemon.handler import DaemonHandler, Inbound, NptPlan, Reply, Request
from noports.npproto import NptRequest, dart_iso_now, sign_envelope, verify_envelope
from noports.npproto.errors import ProtocolError
from noports.npproto.messages import CIPHER_AES_CTR, CIPHER_CHACHA20_POLY1305
from noports.npproto.nptcontrol import (
    Connect,
    ControlParser,
    DeviceError,
    Heartbeat,
    Unknown,
    connect_line,
    error_line,
)
from noports.npproto.streamcipher import new_session_cipher

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "npproto"
KEYS = json.loads((FIX / "test_keys.json").read_text())
CPUB, CPRIV = KEYS["client"]["publicKey"], KEYS["client"]["privateKey"]
DPUB, DPRIV = KEYS["device"]["publicKey"], KEYS["device"]["privateKey"]
SID = "6f0c7e1a-3c1f-4f7e-9d5a-2b8f0e6c9a22"
K, IV = bytes(range(32)), bytes(range(16))


def handler(official: bool = False, **kw) -> DaemonHandler:
    base = {"atsign": "@device", "managers": ["@client"], "device": "pi",
            "permit_open": ["localhost:22", "localhost:8080", "*:5432", "db.lan:*"]}
    base.update(kw)
    cfg = build_config(base)
    if official:  # the test-only switch is not settable from a config: the CLI sets it
        cfg = dataclasses.replace(cfg, official_reply=True)
    return DaemonHandler(cfg, DPRIV)


def npt_request(h: DaemonHandler, *, host: str = "localhost", port: int = 8080,
                sid: str = SID, ciphers: list[str] | None = None, timeout_ms: int = 30000,
                encrypt: bool = True) -> NptPlan | Reply:
    nr = NptRequest(session_id=sid, rvd_host="10.0.0.1", rvd_port=40002, requested_port=port,
                    requested_host=host, authenticate_to_rvd=True, client_nonce=dart_iso_now(),
                    rvd_nonce=dart_iso_now(), encrypt_rvd_traffic=encrypt,
                    client_ephemeral_pk=CPUB if encrypt else None,
                    client_ephemeral_pk_type="rsa2048" if encrypt else None,
                    timeout_ms=timeout_ms, np_ciphers=ciphers)
    value = sign_envelope(nr.to_dict(), CPRIV)
    r = h.route(Inbound("n1", "@client", "@device:npt_request.pi.sshnp@client", value))
    assert isinstance(r, Request) and r.kind == "npt_request"
    out = h.on_npt_request(r, CPUB)
    assert not hasattr(out, "event"), out  # never silently ignored
    return out


# --- permit-open ------------------------------------------------------------------------------

@pytest.mark.parametrize(("host", "port"), [("localhost", 8080), ("localhost", 22),
                                            ("10.1.2.3", 5432), ("db.lan", 6379)])
def test_permitted_targets_get_a_plan(host: str, port: int) -> None:
    plan = npt_request(handler(), host=host, port=port)
    assert isinstance(plan, NptPlan), plan
    assert (plan.target_host, plan.target_port) == (host, port)
    assert plan.relay_host == "10.0.0.1" and plan.relay_port == 40002


@pytest.mark.parametrize(("host", "port"), [("localhost", 8081), ("127.0.0.1", 8080),
                                            ("other", 22), ("", 8080)])
def test_anything_not_permitted_is_refused_with_the_official_text(host: str, port: int) -> None:
    r = npt_request(handler(), host=host, port=port)
    assert isinstance(r, Reply) and r.is_error
    assert r.value == f"Daemon does not permit connections to {host}:{port}"
    assert r.key_name == f"{SID}.pi.sshnp" and r.to == "@client"


def test_default_permit_open_is_only_the_sshd() -> None:
    h = DaemonHandler(build_config({"atsign": "@device", "managers": ["@client"],
                                    "device": "pi"}), DPRIV)
    assert isinstance(npt_request(h, port=22), NptPlan)
    assert isinstance(npt_request(h, port=8080, sid=SID.replace("6f", "7f")), Reply)


def test_a_replayed_npt_request_opens_nothing() -> None:
    h = handler()
    assert isinstance(npt_request(h), NptPlan)
    again = npt_request(h)
    assert isinstance(again, Reply) and "already used" in again.value


def test_unencrypted_npt_is_refused() -> None:
    r = npt_request(handler(), encrypt=False)
    assert isinstance(r, Reply) and "requires encryptRvdTraffic" in r.value


# --- the signed answer and the cipher ---------------------------------------------------------

def _answer(plan: NptPlan) -> dict:
    return verify_envelope(plan.response.value, DPUB)


def test_our_client_gets_aead_and_the_npt_answer_shape() -> None:
    plan = npt_request(handler(), ciphers=[CIPHER_CHACHA20_POLY1305, CIPHER_AES_CTR])
    assert isinstance(plan, NptPlan)
    resp = _answer(plan)
    assert list(resp) == ["status", "sessionId", "sessionAESKey", "sessionIV", "npCipher"]
    assert "ephemeralPrivateKey" not in resp  # Dart's npt answer has none
    assert resp["npCipher"] == plan.cipher_id == CIPHER_CHACHA20_POLY1305
    from noports.crypto import rsa_decrypt
    assert base64.b64decode(rsa_decrypt(CPRIV, resp["sessionAESKey"])) == plan.key
    assert base64.b64decode(rsa_decrypt(CPRIV, resp["sessionIV"])) == plan.iv
    assert plan.auth_line is not None and b"\n" not in plan.auth_line.rstrip(b"\n")


def test_an_official_client_gets_aes_ctr() -> None:
    plan = npt_request(handler())  # no npCiphers: the official npt
    assert isinstance(plan, NptPlan) and plan.cipher_id == CIPHER_AES_CTR
    assert "npCipher" not in _answer(plan)


def test_test_official_reply_answers_like_the_c_daemon() -> None:
    plan = npt_request(handler(official=True), ciphers=[CIPHER_CHACHA20_POLY1305])
    assert isinstance(plan, NptPlan) and plan.cipher_id == CIPHER_AES_CTR
    resp = _answer(plan)
    assert resp["ephemeralPrivateKey"] is None and "npCipher" not in resp


@pytest.mark.parametrize(("ms", "idle"), [(30000, 30.0), (0, 1.0), (2**40, 365 * 86400.0)])
def test_idle_timeout_is_bounded(ms: int, idle: float) -> None:
    plan = npt_request(handler(), timeout_ms=ms)
    assert isinstance(plan, NptPlan) and plan.idle_timeout == idle


# --- the control stream -----------------------------------------------------------------------

def test_connect_line_round_trip_in_any_chunks() -> None:
    line = connect_line(K, IV)
    assert line.startswith(b"connect:") and line.endswith(b"\n") and line.count(b"\n") == 1
    stream = line + b"heartbeat:1\n" + connect_line(None, None) + b"bogus:x\n\n"
    for size in (1, 3, 77, len(stream)):
        p = ControlParser()
        out = []
        for i in range(0, len(stream), size):
            out += p.feed(stream[i:i + size])
        assert out == [Connect(K, IV), Heartbeat("heartbeat:1"), Connect(None, None),
                       Unknown("bogus:x")]


def test_legacy_lines_without_newline_are_accepted() -> None:
    """Dart clients before 5.6.1 wrote 77-byte lines with no newline."""
    one = connect_line(K, IV)[:-1]
    assert len(one) == 77
    assert ControlParser().feed(one * 3) == [Connect(K, IV)] * 3


@pytest.mark.parametrize("bad", [
    b"connect:" + b"A" * 600,  # no newline, too long
    b"connect:!!!!:????\n",  # not base64
    b"connect:" + base64.b64encode(b"k" * 16) + b":" + base64.b64encode(IV) + b"\n",
    b"connect:onlykey\n",
    b"\xff\xfe garbage \n",  # wrong key: decrypted noise
])
def test_hostile_control_lines_raise(bad: bytes) -> None:
    with pytest.raises(ProtocolError):
        ControlParser().feed(bad)


def test_control_stream_through_both_ciphers() -> None:
    """What the client writes is what the daemon parses, for AEAD and for AES-CTR."""
    for cid in (CIPHER_CHACHA20_POLY1305, CIPHER_AES_CTR):
        cli = new_session_cipher(cid, K, IV, is_client=True)
        dev = new_session_cipher(cid, K, IV, is_client=False)
        p = ControlParser()
        got = []
        for key in (bytes(32), bytes([1]) * 32):
            got += p.feed(dev.decrypt(cli.encrypt(connect_line(key, IV))))
        assert got == [Connect(bytes(32), IV), Connect(bytes([1]) * 32, IV)]


def test_device_error_lines_are_printable_and_bounded() -> None:
    line = error_line("cannot connect localhost:80: refused\n\x1b[31m" + "x" * 1000)
    assert line.endswith(b"\n") and line.count(b"\n") == 1 and len(line) < 320
    (msg,) = ControlParser().feed(line)
    assert isinstance(msg, DeviceError)
    assert msg.text.startswith("cannot connect localhost:80: refused??[31m")
