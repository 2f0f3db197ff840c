"""sshnpd's test-only ``--test-official-reply``: the signed session response has exactly the
official daemons' shape (no ``hostKeys``, no ``npCipher`` so AES-256-CTR, and
``ephemeralPrivateKey: null``) whatever the client offers; off by default, not settable from a
config file. No sockets."""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from noports.daemon.cli import parse_args
from noports.daemon.config import ConfigError, parse_config_text
from noports.daemon.handler import DaemonHandler, Inbound, Request, SessionPlan
from noports.daemon.sshkeys import EphemeralKey
from noports.npproto import SshRequest, dart_iso, sign_envelope, verify_envelope
from noports.npproto.messages import CIPHER_AES_CTR, CIPHER_CHACHA20_POLY1305

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "npproto"
KEYS = json.loads((FIX / "test_keys.json").read_text())
CPUB, CPRIV = KEYS["client"]["publicKey"], KEYS["client"]["privateKey"]
DPUB, DPRIV = KEYS["device"]["publicKey"], KEYS["device"]["privateKey"]
SID = "0b7e6c1a-3c1f-4f7e-9d5a-2b8f0e6c9a11"
HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"
BASE = ["-a", "@device", "-m", "@client", "-d", "pi", "-k", "/nonexistent"]


def _keygen(_algo: str) -> EphemeralKey:
    return EphemeralKey("-----BEGIN OPENSSH PRIVATE KEY-----\nX\n-----END OPENSSH PRIVATE "
                        "KEY-----\n", "ssh-ed25519 AAAA")


def _response(*flags: str) -> dict:
    cfg = parse_args([*BASE, *flags])
    now = time.time()
    h = DaemonHandler(cfg, DPRIV, keygen=_keygen, clock=lambda: now)
    iso = dart_iso(datetime.fromtimestamp(now, timezone.utc))
    payload = SshRequest(session_id=SID, host="127.0.0.1", port=40001, authenticate_to_rvd=True,
                         client_nonce=iso, rvd_nonce=iso,
                         encrypt_rvd_traffic=True, client_ephemeral_pk=KEYS["client"]["publicKey"],
                         client_ephemeral_pk_type="rsa2048",
                         np_ciphers=[CIPHER_CHACHA20_POLY1305, CIPHER_AES_CTR]).to_dict()
    r = h.route(Inbound("n1", "@client", "@device:ssh_request.pi.sshnp@client",
                        sign_envelope(payload, CPRIV)))
    assert isinstance(r, Request)
    plan = h.on_ssh_request(r, CPUB, [HOST_KEY])
    assert isinstance(plan, SessionPlan), plan
    resp = verify_envelope(plan.response.value, DPUB)
    resp["_cipher_used"] = plan.cipher_id
    return resp


def test_official_reply_shape() -> None:
    resp = _response("--test-official-reply")
    assert "hostKeys" not in resp and "npCipher" not in resp
    assert "ephemeralPrivateKey" in resp and resp["ephemeralPrivateKey"] is None
    assert resp["sessionAESKey"] and resp["sessionIV"] and resp["status"] == "connected"
    assert resp["_cipher_used"] == "aes-256-ctr"  # what a client must assume without npCipher


def test_default_reply_keeps_our_additions() -> None:
    resp = _response()
    assert resp["hostKeys"] == [HOST_KEY]
    assert resp["npCipher"] == resp["_cipher_used"] == CIPHER_CHACHA20_POLY1305
    assert resp["ephemeralPrivateKey"].startswith("-----BEGIN OPENSSH PRIVATE KEY-----")


def test_not_settable_from_a_config_file() -> None:
    with pytest.raises(ConfigError):
        parse_config_text("atsign: '@device'\nofficial_reply: true\n", "cfg.yaml")
