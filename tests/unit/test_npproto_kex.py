"""The X25519 session key exchange (npproto/kex.py, decision 0029), both directions, pure:
our daemon's handler seals, the client's checks open; official shapes keep the RSA path;
hostile keys and answers get the message the user sees."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from noports import crypto
from noports.agent.keypool import KeyPool
from noports.client import checks
from noports.client.errors import DeviceRefused, SecurityError
from noports.client.params import SessionParams
from noports.daemon.cli import parse_args
from noports.daemon.handler import DaemonHandler, Reply, Request, SessionPlan
from noports.npproto import kex
from noports.npproto.envelope import dart_iso_now, sign_envelope, verify_envelope
from noports.npproto.messages import CIPHER_AES_CTR, SessionResponse, SshRequest
from noports.npproto.streamcipher import new_session_cipher

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "npproto"
KEYS = json.loads((FIX / "test_keys.json").read_text())
CPUB, CPRIV = KEYS["client"]["publicKey"], KEYS["client"]["privateKey"]
DPUB, DPRIV = KEYS["device"]["publicKey"], KEYS["device"]["privateKey"]
SID = "5d1c2a4e-8f0b-4c3d-9e7a-1b2c3d4e5f60"


def handler(*flags: str) -> DaemonHandler:
    """sshnpd as its command line makes it (``--test-official-reply`` is CLI-only)."""
    return DaemonHandler(parse_args(["-a", "@device", "-m", "@client", "-d", "pi", "-k",
                                     "/nonexistent", *flags]), DPRIV)


def request(extra: dict[str, Any], *, sid: str = SID, ciphers: list[str] | None = None
            ) -> Request:
    req = SshRequest(session_id=sid, host="127.0.0.1", port=40001, authenticate_to_rvd=True,
                     client_nonce=dart_iso_now(), rvd_nonce=dart_iso_now(),
                     encrypt_rvd_traffic=True, client_ephemeral_pk=CPUB,
                     client_ephemeral_pk_type="rsa2048", np_ciphers=ciphers, extra=extra)
    return Request("ssh_request", "@client", sign_envelope(req.to_dict(), CPRIV), "n1")


def answer(plan: Any) -> SessionResponse:
    assert isinstance(plan, SessionPlan), plan
    return SessionResponse.from_dict(verify_envelope(plan.response.value, DPUB))


def params(**kw: Any) -> SessionParams:
    base: dict[str, Any] = dict(client_atsign="@client", device_atsign="@device",
                                relays=["@relay"], device="pi", remote_user="pi",
                                cache_dir=Path("/c"))
    base.update(kw)
    return SessionParams(**base)


def rsa_priv() -> Any:
    from cryptography.hazmat.primitives import serialization
    return serialization.load_der_private_key(base64.b64decode(CPRIV), None)


# --- both directions ---------------------------------------------------------------------------

@pytest.mark.parametrize("ciphers,twin", [(None, True), (["chacha20-poly1305-v1"], True),
                                          (None, False)])
def test_our_daemon_seals_to_the_x25519_key_and_the_client_opens_it(ciphers, twin):
    priv, pub = kex.new_client_key()
    extra = {kex.FIELD_PK: pub, **({"twinKeys": True} if twin else {})}
    plan = handler().on_ssh_request(request(extra, ciphers=ciphers), CPUB)
    resp = answer(plan)
    # no RSA ciphertexts at all: the RSA key in the request was not used
    assert resp.session_aes_key is None and resp.session_iv is None
    assert not {"aesKeyC2D", "ivC2D", "aesKeyD2C", "ivD2C"} & set(resp.extra)
    assert plan.key_exchange == "x25519"
    key, iv, cipher, d2c = checks.session_secrets(
        params(ciphers=tuple(ciphers or [CIPHER_AES_CTR])), resp, None, priv)
    assert (key, iv, d2c) == (plan.key, plan.iv, plan.d2c)
    assert (d2c is not None) == (twin and cipher == CIPHER_AES_CTR)
    c = new_session_cipher(cipher, key, iv, is_client=True, d2c=d2c)
    d = new_session_cipher(plan.cipher_id, plan.key, plan.iv, is_client=False, d2c=plan.d2c)
    assert d.decrypt(c.encrypt(b"SSH-2.0-x\r\n")) == b"SSH-2.0-x\r\n"
    assert c.decrypt(d.encrypt(b"SSH-2.0-y\r\n")) == b"SSH-2.0-y\r\n"


def test_official_request_and_official_reply_keep_rsa():
    """Official request bytes (no npX25519) and --test-official-reply (which ignores it, as
    official daemons do) answer with RSA; the client reads that with its RSA key."""
    priv, pub = kex.new_client_key()
    for h, extra in ((handler(), {}), (handler("--test-official-reply"), {kex.FIELD_PK: pub})):
        plan = h.on_ssh_request(request(extra), CPUB)
        resp = answer(plan)
        assert plan.key_exchange == "rsa2048" and not kex.in_response(resp.extra)
        assert base64.b64decode(crypto.rsa_decrypt(CPRIV, resp.session_aes_key)) == plan.key
        key, iv, _c, _d2c = checks.session_secrets(params(), resp, rsa_priv(), priv)
        assert (key, iv) == (plan.key, plan.iv)


# --- hostile requests: the client sees the daemon's error reply --------------------------------

@pytest.mark.parametrize("value,why", [
    (base64.b64encode(b"\1" * 31).decode(), "npX25519 must be 32 bytes, got 31"),
    ("not base64!", "npX25519 is not valid base64"),
    (12345, "npX25519 must be a base64 string, got int"),
    ("A" * 5000, "npX25519 is too long"),
    (base64.b64encode(bytes(32)).decode(), "not a usable X25519 key"),  # low order point
])
def test_bad_x25519_key_in_request_gets_an_error_reply(value, why):
    h = handler()
    r = h.on_ssh_request(request({kex.FIELD_PK: value}), CPUB)
    assert isinstance(r, Reply) and r.is_error
    assert r.value.startswith("Failed to start up the daemon side of the srv socket tunnel : "
                              "unusable npX25519: ")
    assert why in r.value
    # the client shows it as the device's refusal, naming the field
    with pytest.raises(DeviceRefused, match="pi@device refused: Failed to start up .* "
                       "unusable npX25519"):
        checks.check_not_refused(params(), r.value)
    # and the daemon goes on serving the next (good) request
    priv, pub = kex.new_client_key()
    plan = h.on_ssh_request(request({kex.FIELD_PK: pub}, sid=SID[:-1] + "1"), CPUB)
    assert isinstance(plan, SessionPlan) and plan.key_exchange == "x25519"


# --- hostile answers: the client refuses them with a message ----------------------------------

def sealed_answer(sid: str = SID) -> tuple[Any, SessionResponse, SessionPlan]:
    priv, pub = kex.new_client_key()
    plan = handler().on_ssh_request(request({kex.FIELD_PK: pub}, sid=sid), CPUB)
    return priv, answer(plan), plan


def flip(b64: str, at: int = 5) -> str:
    raw = bytearray(base64.b64decode(b64))
    raw[at] ^= 1
    return base64.b64encode(bytes(raw)).decode()


@pytest.mark.parametrize("change,message", [
    (lambda r: r.extra.update({kex.FIELD_SEALED: flip(r.extra[kex.FIELD_SEALED])}),
     "cannot decrypt the session key: npSessionKeys does not open with this session's key"),
    (lambda r: r.extra.update({kex.FIELD_PK: flip(r.extra[kex.FIELD_PK])}),
     "cannot decrypt the session key: npSessionKeys does not open"),
    (lambda r: r.extra.pop(kex.FIELD_SEALED),
     "cannot decrypt the session key: the answer has no npSessionKeys"),
    (lambda r: r.extra.pop(kex.FIELD_PK),
     "cannot decrypt the session key: the answer has no npX25519"),
    (lambda r: r.extra.update({kex.FIELD_PK: base64.b64encode(bytes(32)).decode()}),
     "the device's npX25519 is not a usable X25519 key"),
    (lambda r: r.extra.update({kex.FIELD_SEALED: r.extra[kex.FIELD_SEALED][:-8]}),
     "npSessionKeys has a wrong length"),
    (lambda r: r.extra.update({kex.FIELD_SEALED: None}),
     "npSessionKeys must be a base64 string, got NoneType"),
    (lambda r: setattr(r, "session_aes_key", crypto.rsa_encrypt(CPUB, "AAAA")),
     "answered with both an X25519 and an RSA session key; refusing the mixed answer"),
    (lambda r: r.extra.update({"aesKeyD2C": "x", "ivD2C": "y"}),
     "refusing the mixed answer"),
    (lambda r: r.extra.update({"aesKeyC2D": "x"}), "refusing the mixed answer"),
])
def test_altered_missing_or_mixed_answers_are_refused(change, message):
    priv, resp, _plan = sealed_answer()
    change(resp)
    with pytest.raises(SecurityError, match=message.replace("(", r"\(")) as err:
        checks.session_secrets(params(), resp, rsa_priv(), priv)
    assert str(err.value).startswith("verify: ")


def test_answer_sealed_for_another_session_or_key_is_refused():
    priv, resp, _plan = sealed_answer()
    other_sid = SessionResponse.from_dict({**resp.to_dict(), "sessionId": SID[:-1] + "9"})
    with pytest.raises(SecurityError, match="made for another session"):
        checks.session_secrets(params(), other_sid, rsa_priv(), priv)
    other_priv, _pub = kex.new_client_key()
    with pytest.raises(SecurityError, match="does not open"):
        checks.session_secrets(params(), resp, rsa_priv(), other_priv)


def test_x25519_answer_to_a_request_without_it_is_refused():
    _priv, resp, _plan = sealed_answer()
    with pytest.raises(SecurityError, match="X25519 session key .npX25519. that this session "
                       "did not offer"):
        checks.session_secrets(params(), resp, rsa_priv(), None)


def test_answer_without_the_new_fields_falls_back_to_rsa():
    """A daemon that ignored npX25519 (official, or ours before it): RSA, as before."""
    priv, _pub = kex.new_client_key()
    plan = handler().on_ssh_request(request({}), CPUB)
    key, _iv, _c, _d = checks.session_secrets(params(), answer(plan), rsa_priv(), priv)
    assert key == plan.key
    with pytest.raises(SecurityError, match="no session key"):  # and nothing at all: refused
        checks.session_secrets(params(), SessionResponse(session_id=SID), rsa_priv(), priv)


# --- the agent's reused RSA pair ---------------------------------------------------------------

def test_key_pool_reuses_one_pair_within_its_bounds():
    now = [0.0]
    made: list[int] = []

    def make() -> tuple[str, Any]:
        made.append(1)
        return f"pub{len(made)}", object()

    pool = KeyPool(make, reuse_s=100.0, reuse_sessions=5, clock=lambda: now[0])
    pool.warm()
    firsts = [pool.take().result(timeout=5)[0] for _ in range(5)]
    assert firsts == ["pub1"] * 5  # one pair for 5 sessions; the next was started at 4
    assert pool.take().result(timeout=5)[0] == "pub2"  # the 6th: a new pair
    now[0] += 101  # past its lifetime: a fresh pair, whatever the count
    third = pool.take().result(timeout=5)[0]
    assert third not in ("pub1", "pub2")
    now[0] += 101
    pool.drop_expired()  # an idle agent forgets an expired pair without a session
    assert pool.current is None


def test_key_pool_replaces_a_failed_generation():
    calls: list[int] = []

    def make() -> tuple[str, Any]:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("no entropy")
        return "ok", object()

    pool = KeyPool(make)
    first = pool.take()
    with pytest.raises(RuntimeError):
        first.result(timeout=5)
    assert pool.take().result(timeout=5)[0] == "ok"

