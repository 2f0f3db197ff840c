"""noports.crypto must agree byte for byte with the official Python SDK's EncryptionUtil."""

import json
import re
from pathlib import Path

import pytest
from at_client.util.authutil import AuthUtil
from at_client.util.encryptionutil import EncryptionUtil

from noports import crypto

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "official-demo-atkeys"


def test_aes_matches_sdk_both_ways():
    key = crypto.generate_aes_key()
    iv = crypto.generate_iv()
    text = "hello ✓ world " * 7
    ours = crypto.aes_encrypt(key, text, iv)
    assert ours == EncryptionUtil.aes_encrypt_from_base64(text, key, crypto.unb64(iv))
    assert crypto.aes_decrypt(key, ours, iv) == text
    # legacy zero IV is the default on both sides
    assert crypto.aes_encrypt(key, text) == EncryptionUtil.aes_encrypt_from_base64(text, key)


def test_aes_wrong_key_is_a_clear_error():
    ct = crypto.aes_encrypt(crypto.generate_aes_key(), "secret")
    with pytest.raises(crypto.CryptoError, match="AES decryption failed"):
        crypto.aes_decrypt(crypto.generate_aes_key(), ct)


def test_rsa_sign_verify_and_sdk_interop():
    pub, priv = crypto.generate_rsa_keypair()
    sig = crypto.sign(priv, "challenge")
    assert sig == EncryptionUtil.sign_sha256_rsa("challenge", priv)
    assert crypto.verify(pub, "challenge", sig)
    assert not crypto.verify(pub, "challengE", sig)
    assert not crypto.verify(pub, "challenge", "not base64 !!")
    assert not crypto.verify("garbage", "challenge", sig)
    sig512 = crypto.sign(priv, "challenge", "sha512")
    assert crypto.verify(pub, "challenge", sig512, "sha512")
    assert not crypto.verify(pub, "challenge", sig512, "sha256")


def test_rsa_encrypt_decrypt_with_sdk():
    pub, priv = crypto.generate_rsa_keypair()
    aes = crypto.generate_aes_key()
    assert EncryptionUtil.rsa_decrypt_from_base64(crypto.rsa_encrypt(pub, aes), priv) == aes
    assert crypto.rsa_decrypt(priv, EncryptionUtil.rsa_encrypt_to_base64(aes, pub)) == aes


def test_cram_digest_matches_sdk():
    secret, challenge = crypto.generate_cram_secret(), "_abc@alice:1234"
    assert len(secret) == 128
    assert crypto.cram_digest(secret, challenge) == AuthUtil._get_cram_digest(secret, challenge)
    assert crypto.cram_matches(secret, challenge, crypto.cram_digest(secret, challenge).upper())
    assert not crypto.cram_matches(secret, challenge, "00" * 64)
    assert not crypto.cram_matches(secret, challenge, "é🛠\x00")


@pytest.mark.parametrize("name", ["@alice🛠", "@bob🛠", "@gateway1", "@relay1"])
def test_official_demo_keys_decrypt_and_sign(name):
    data = json.loads((FIXTURES / f"{name}_key.atKeys").read_text())
    self_key = data["selfEncryptionKey"]
    pkam_pub = crypto.aes_decrypt(self_key, data["aesPkamPublicKey"])
    pkam_priv = crypto.aes_decrypt(self_key, data["aesPkamPrivateKey"])
    assert pkam_pub.startswith("MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8A")
    assert crypto.verify(pkam_pub, "proof", crypto.sign(pkam_priv, "proof"))


def test_one_rsa_signer():
    """Every RSA signature of the runtime comes from crypto.sign (PKAM, envelopes, relay auth
    lines, pol proofs, dataSignature): a second copy could drift in hash or padding."""
    src = Path(__file__).resolve().parents[2] / "src" / "noports"
    rsa_sign = re.compile(r"\.sign\(.{0,120}?PKCS1v15\(\)", re.DOTALL)
    signers = sorted(str(p.relative_to(src)) for p in src.rglob("*.py")
                     if rsa_sign.search(p.read_text(encoding="utf-8")))
    assert signers == ["crypto.py"]
    from noports.atclient import e2e
    from noports.client import flow
    from noports.npproto import envelope
    pub, priv = crypto.generate_rsa_keypair()
    assert e2e.sign(priv, "m") == crypto.sign(priv, "m")
    assert flow.fast_sign_envelope is envelope.sign_envelope  # the old name, one function
