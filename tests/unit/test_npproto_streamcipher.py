"""Data-plane ciphers: official AES-256-CTR vectors and our ChaCha20-Poly1305 framing."""

import base64
import json
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from noports.npproto import (
    CIPHER_AES_CTR,
    CIPHER_CHACHA20_POLY1305,
    AeadStream,
    CtrDuplex,
    CtrStream,
    IntegrityError,
    ProtocolError,
    new_session_cipher,
)
from noports.npproto.streamcipher import (
    MAX_FRAME_PLAINTEXT,
    AeadDecoder,
    AeadEncoder,
    decode_session_secrets,
    derive_direction_key,
)

FIX = json.loads((Path(__file__).resolve().parents[1] / "fixtures" / "npproto" /
                  "ctr_vectors.json").read_text())


def _chunks(data: bytes, sizes):
    i = 0
    for n in sizes:
        yield data[i:i + n]
        i += n
    yield data[i:]


# --- official CTR -------------------------------------------------------------------------------

def test_nist_sp800_38a_f55():
    v = FIX["nist_f55"]
    s = CtrStream(bytes.fromhex(v["key_hex"]), bytes.fromhex(v["iv_hex"]))
    assert s.process(bytes.fromhex(v["plaintext_hex"])).hex() == v["ciphertext_hex"]


@pytest.mark.parametrize("n", ["1", "2"])
def test_c_srv_vector_byte_by_byte(n):
    """Same key/IV/plaintext as test_stream_encrypt.c, streamed one byte at a time like it."""
    v = FIX["c_srv_test"]
    key, iv = base64.b64decode(v["key_b64"]), v["iv_ascii"].encode()
    pt = v[f"plaintext{n}_ascii"].encode()
    enc, dec = CtrStream(key, iv), CtrStream(key, iv)
    ct = b"".join(enc.process(pt[i:i + 1]) for i in range(len(pt)))
    assert ct.hex() == v[f"ciphertext{n}_hex"]
    assert b"".join(dec.process(ct[i:i + 1]) for i in range(len(ct))) == pt


def test_arbitrary_chunking_equals_one_shot():
    key, iv, data = os.urandom(32), os.urandom(16), os.urandom(5000)
    one = CtrStream(key, iv).process(data)
    s = CtrStream(key, iv)
    assert b"".join(s.process(c) for c in _chunks(data, [0, 1, 15, 17, 100, 4096])) == one


def test_full_block_big_endian_increment_with_carry_and_wrap():
    """Counter must carry past 64 bits and wrap at 2**128 (not a 64-bit/32-bit counter)."""
    key = os.urandom(32)
    ecb = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    for iv_int in (2**64 - 1, 2**128 - 1):
        iv = iv_int.to_bytes(16, "big")
        nxt = ((iv_int + 1) % 2**128).to_bytes(16, "big")
        ks = CtrStream(key, iv).process(bytes(32))
        assert ks == ecb.update(iv) + ecb.update(nxt)


def test_duplex_uses_same_keystream_both_ways():
    key, iv = os.urandom(32), os.urandom(16)
    a, b = CtrDuplex(key, iv), CtrDuplex(key, iv)
    assert b.decrypt(a.encrypt(b"hello")) == b"hello"
    assert a.decrypt(b.encrypt(b"world")) == b"world"
    # the documented weakness we replicate: equal plaintexts give equal ciphertexts per direction
    assert CtrDuplex(key, iv).encrypt(b"x" * 8) == CtrDuplex(key, iv).encrypt(b"x" * 8)
    assert a.close() == b"" and a.finish() is None


def test_key_iv_validation():
    with pytest.raises(ProtocolError, match="32 bytes"):
        CtrStream(b"k" * 16, b"i" * 16)
    with pytest.raises(ProtocolError, match="16 bytes"):
        CtrStream(b"k" * 32, b"i" * 12)
    key, iv = decode_session_secrets(FIX["c_srv_test"]["key_b64"],
                                     base64.b64encode(b"1234567890ABCDEF").decode())
    assert len(key) == 32 and iv == b"1234567890ABCDEF"
    with pytest.raises(ProtocolError, match="base64"):
        decode_session_secrets("!!!", "AAAA")


# --- our AEAD -----------------------------------------------------------------------------------

def _pair():
    key, iv = os.urandom(32), os.urandom(16)
    return AeadStream(key, iv, is_client=True), AeadStream(key, iv, is_client=False)


def test_aead_roundtrip_both_directions_arbitrary_chunks():
    client, daemon = _pair()
    data = os.urandom(3 * MAX_FRAME_PLAINTEXT + 123)
    wire = client.encrypt(data[:1000]) + client.encrypt(data[1000:]) + client.close()
    out = b"".join(daemon.decrypt(c) for c in _chunks(wire, [1, 2, 3, 500, 16 * 1024 + 7]))
    assert out == data
    daemon.finish()
    back = daemon.encrypt(b"pong") + daemon.close()
    assert b"".join(client.decrypt(back[i:i + 1]) for i in range(len(back))) == b"pong"
    client.finish()


def test_aead_frames_are_bounded():
    enc = AeadEncoder(os.urandom(32))
    wire = enc.encode(bytes(MAX_FRAME_PLAINTEXT + 1))
    assert len(wire) == 2 * (3 + 16) + MAX_FRAME_PLAINTEXT + 1
    assert enc.encode(b"") == b""


def test_aead_directions_use_different_keys():
    key, iv = os.urandom(32), os.urandom(16)
    c2d = derive_direction_key(key, iv, b"client->daemon")
    assert c2d != derive_direction_key(key, iv, b"daemon->client")
    assert c2d != key and c2d != derive_direction_key(key, os.urandom(16), b"client->daemon")
    client, daemon = _pair()
    assert client.encrypt(b"same") != daemon.encrypt(b"same")
    # a frame reflected back to its sender does not decrypt
    sender = AeadStream(key, iv, is_client=True)
    with pytest.raises(IntegrityError):
        AeadStream(key, iv, is_client=True).decrypt(sender.encrypt(b"echo"))


def test_aead_tamper_detected():
    client, daemon = _pair()
    wire = bytearray(client.encrypt(b"secret data"))
    wire[5] ^= 1
    with pytest.raises(IntegrityError, match="failed authentication"):
        daemon.decrypt(bytes(wire))
    with pytest.raises(IntegrityError, match="already failed"):
        daemon.decrypt(b"")


def test_aead_reorder_and_drop_detected():
    client, daemon = _pair()
    f1, f2 = client.encrypt(b"one"), client.encrypt(b"two")
    with pytest.raises(IntegrityError):
        daemon.decrypt(f2 + f1)
    client, daemon = _pair()
    _, f2 = client.encrypt(b"one"), client.encrypt(b"two")
    with pytest.raises(IntegrityError):
        daemon.decrypt(f2)  # first frame dropped


def test_aead_truncation_detected():
    client, daemon = _pair()
    wire = client.encrypt(b"abc") + client.close()
    assert daemon.decrypt(wire[:-1]) == b"abc"  # data frame delivered, end frame incomplete
    with pytest.raises(IntegrityError, match="truncated"):
        daemon.finish()
    client, daemon = _pair()
    daemon.decrypt(client.encrypt(b"abc"))
    with pytest.raises(IntegrityError, match="truncated"):
        daemon.finish()  # clean TCP EOF but no end frame: cut by an attacker


def test_aead_data_after_end_and_bad_header():
    client, daemon = _pair()
    wire = client.close()
    daemon.decrypt(wire)
    assert daemon.ended
    with pytest.raises(IntegrityError, match="after the end"):
        daemon.decrypt(b"x")
    dec = AeadDecoder(os.urandom(32))
    with pytest.raises(IntegrityError, match="bad frame header"):
        dec.decode(b"\x00\xff\xff")  # length beyond the 16 KiB limit, refused before buffering
    with pytest.raises(IntegrityError, match="bad frame header"):
        AeadDecoder(os.urandom(32)).decode(b"\x07\x00\x20")


def test_aead_encoder_closed():
    enc = AeadEncoder(os.urandom(32))
    enc.close()
    assert enc.close() == b""
    with pytest.raises(ProtocolError, match="closed"):
        enc.encode(b"x")


def test_new_session_cipher_factory():
    key, iv = os.urandom(32), os.urandom(16)
    assert isinstance(new_session_cipher(CIPHER_AES_CTR, key, iv, is_client=True), CtrDuplex)
    c = new_session_cipher(CIPHER_CHACHA20_POLY1305, key, iv, is_client=True)
    d = new_session_cipher(CIPHER_CHACHA20_POLY1305, key, iv, is_client=False)
    assert d.decrypt(c.encrypt(b"hi")) == b"hi"
    with pytest.raises(ProtocolError, match="unknown session cipher"):
        new_session_cipher("rot13", key, iv, is_client=True)


def test_twin_key_fields_hostile_or_partial_fall_back_to_one_key():
    """Only a JSON true is an offer; a D2C key without its IV (or not a string) is ignored,
    so a bad answer cannot split the directions half-way."""
    from noports.npproto import twinkeys

    assert twinkeys.offered({"twinKeys": True})
    for v in ("true", 1, [True], None, {}):
        assert not twinkeys.offered({"twinKeys": v})
    assert not twinkeys.offered({})
    assert twinkeys.response_secrets("K", "I", {"aesKeyD2C": "k2"}) == ("K", "I", None, None)
    assert twinkeys.response_secrets("K", "I", {"aesKeyD2C": 5, "ivD2C": "i2"}) == \
        ("K", "I", None, None)
    assert twinkeys.response_secrets(None, None, {"aesKeyC2D": "K", "ivC2D": "I",
                                                  "aesKeyD2C": "k", "ivD2C": "i"}) == \
        ("K", "I", "k", "i")
    c2d, d2c = (b"a" * 32, b"b" * 16), (b"c" * 32, b"d" * 16)
    assert twinkeys.ctr_directions(c2d, d2c, is_client=True) == (c2d, d2c)
    assert twinkeys.ctr_directions(c2d, d2c, is_client=False) == (d2c, c2d)
    assert twinkeys.ctr_directions(c2d, None, is_client=False) == (c2d, c2d)
