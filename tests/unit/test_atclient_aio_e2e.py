"""Pure end-to-end-encryption helpers of the asyncio client, cross-checked against the SDK.

The SDK (`at_client`) is only imported here, in tests: a value we encrypt must decrypt with its
EncryptionUtil and the other way round, our key names must equal its names, and the commands we
build must parse with the server grammar to the same fields as the SDK's commands.
"""

from __future__ import annotations

import base64
import json

import pytest
from at_client.common.atsign import AtSign
from at_client.common.keys import PublicKey, SelfKey, SharedKey
from at_client.util.encryptionutil import EncryptionUtil
from at_client.util.verbbuilder import NotifyVerbBuilder, UpdateVerbBuilder

from noports import crypto
from noports.atclient import e2e
from noports.atprotocol import notifications as N
from noports.atprotocol.grammar import parse_command


@pytest.fixture(scope="module")
def rsa_pair() -> tuple[str, str]:
    return crypto.generate_rsa_keypair()


# --- names ------------------------------------------------------------------------------------

def test_shared_key_names_match_the_sdk():
    sk = SharedKey("message", AtSign("@alice"), AtSign("@bob"))
    assert e2e.shared_key_for_other_name("@alice", "@bob") == sk.get_shared_shared_key_name()
    # the SDK's llookup name in get_encryption_key_shared_by_me
    sdk_self = "shared_key." + sk.shared_with.without_prefix + sk.shared_by.to_string()
    assert e2e.shared_key_self_name("alice", "Bob") == sdk_self == "shared_key.bob@alice"


def test_key_strings_match_the_sdk():
    pub = PublicKey("location", AtSign("@alice"))
    pub.set_namespace("noports")
    assert e2e.public_key_str("location", "@alice", "noports") == str(pub)
    selfk = SelfKey("secret", AtSign("@alice"))
    assert e2e.self_key_str("secret", "@alice") == str(selfk)
    sk = SharedKey("msg", AtSign("@alice"), AtSign("@bob"))
    sk.set_namespace(".sshnp")
    assert e2e.shared_key_str("msg", "@bob", "@alice", "sshnp") == str(sk)


@pytest.mark.parametrize("bad", ["", "a:b", "a@b", "a b", "x\ny", "x\n"])
def test_bad_key_names_are_refused(bad):
    with pytest.raises(e2e.E2EError):
        e2e.full_key_name(bad)


@pytest.mark.parametrize("bad", ["", "@", "a b", "a:b", "@a@b"])
def test_bad_atsigns_are_refused(bad):
    with pytest.raises(e2e.E2EError):
        e2e.fix_atsign(bad)


def test_atsigns_are_normalised():
    assert e2e.fix_atsign(" Alice ") == "@alice"
    assert e2e.fix_atsign("@alice🛠") == "@alice🛠"


# --- crypto -----------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["", "x", "hello world", "16 bytes exactly", "é🛠" * 100,
                                  json.dumps({"a": [1, 2, 3]})])
def test_our_ciphertext_decrypts_with_the_sdk(text):
    key = crypto.generate_aes_key()
    ct, iv = e2e.encrypt_value(key, text)
    assert len(base64.b64decode(iv)) == 16
    assert EncryptionUtil.aes_decrypt_from_base64(ct, key, base64.b64decode(iv)) == text


@pytest.mark.parametrize("text", ["", "y", "a longer message " * 20])
def test_sdk_ciphertext_decrypts_here(text):
    key = EncryptionUtil.generate_aes_key_base64()
    iv = EncryptionUtil.generate_iv_nonce()
    ct = EncryptionUtil.aes_encrypt_from_base64(text, key, iv)
    assert e2e.decrypt_value(key, ct, base64.b64encode(iv).decode()) == text


def test_missing_iv_nonce_means_the_legacy_zero_iv():
    key = crypto.generate_aes_key()
    ct = EncryptionUtil.aes_encrypt_from_base64("legacy", key)  # SDK default: zero IV
    assert e2e.decrypt_value(key, ct, None) == "legacy"
    assert e2e.decrypt_value(key, ct, "") == "legacy"


def test_fresh_iv_every_time():
    key = crypto.generate_aes_key()
    seen = {e2e.encrypt_value(key, "same")[1] for _ in range(50)}
    assert len(seen) == 50


def test_wrong_key_is_a_crypto_error():
    ct, iv = e2e.encrypt_value(crypto.generate_aes_key(), "secret value here")
    with pytest.raises(crypto.CryptoError):
        e2e.decrypt_value(crypto.generate_aes_key(), ct, iv)


def test_new_shared_key_unwraps_with_the_sdk(rsa_pair):
    my_pub, my_priv = rsa_pair
    their_pub, their_priv = crypto.generate_rsa_keypair()
    aes, for_me, for_them = e2e.new_shared_key(my_pub, their_pub)
    assert len(base64.b64decode(aes)) == 32
    assert EncryptionUtil.rsa_decrypt_from_base64(for_me, my_priv) == aes
    assert EncryptionUtil.rsa_decrypt_from_base64(for_them, their_priv) == aes
    # and a key the SDK wrapped for us unwraps with our crypto
    wrapped = EncryptionUtil.rsa_encrypt_to_base64(aes, my_pub)
    assert crypto.rsa_decrypt(my_priv, wrapped) == aes


# --- commands ---------------------------------------------------------------------------------

def _sdk_notify(value: str, iv: bytes) -> str:
    key = SharedKey("message", AtSign("@alice"), AtSign("@bob"))
    key.set_namespace("noports")
    key.metadata.iv_nonce = iv
    return NotifyVerbBuilder().with_at_key(key, value, session_id="abc-123").build()


def test_notify_command_parses_like_the_sdks():
    iv_raw = EncryptionUtil.generate_iv_nonce()
    iv = base64.b64encode(iv_raw).decode()
    ct = "Q2lwaGVydGV4dA=="
    ours = e2e.notify_command(notification_id="abc-123", to="@bob", key="message.noports",
                              me="@alice", value=ct, iv_nonce=iv, ttln_ms=60000, ttl_ms=10000)
    assert ours == (f"notify:id:abc-123:update:messageType:key:ttln:60000:ttl:10000:"
                    f"isEncrypted:true:ivNonce:{iv}:@bob:message.noports@alice:{ct}")
    mine = parse_command(ours).params
    sdk = parse_command(_sdk_notify(ct, iv_raw)).params
    for field in ("id", "operation", "forAtSign", "atKey", "atSign", "value", "isEncrypted",
                  "ivNonce"):
        assert mine[field] == sdk[field], field
    assert mine["ttln"] == "60000" and mine["ttl"] == "10000" and mine["messageType"] == "key"
    assert N.notification_key(mine, from_atsign="@alice") == "@bob:message.noports@alice"


def test_plain_notify_command_and_validation():
    cmd = e2e.notify_command(notification_id="n1", to="bob", key="msg", me="alice",
                             value="plain text", iv_nonce=None, ttln_ms=None,
                             is_encrypted=False)
    assert cmd == "notify:id:n1:update:messageType:key:isEncrypted:false:@bob:msg@alice:plain text"
    assert parse_command(cmd).params["value"] == "plain text"
    with pytest.raises(e2e.E2EError):
        e2e.notify_command(notification_id="n1", to="@bob", key="k", me="@alice",
                           value="two\nlines", iv_nonce=None, is_encrypted=False)
    with pytest.raises(e2e.E2EError):
        e2e.notify_command(notification_id="bad id", to="@bob", key="k", me="@alice",
                           value="v", iv_nonce=None)


def test_update_commands_match_the_sdk_layout():
    sig = "c2ln"
    iv_raw = b"\x01" * 16
    iv = base64.b64encode(iv_raw).decode()
    sdk = (UpdateVerbBuilder().set_key_name("secret").set_shared_by("@alice")
           .set_value("Y3Q=").set_data_signature(sig).set_is_encrypted(True))
    sdk.iv_nonce = iv_raw
    ours = e2e.update_command("secret@alice", "Y3Q=", e2e.metadata_fragment(
        data_signature=sig, is_encrypted=True, iv_nonce=iv))
    assert ours == sdk.build()
    shared = e2e.update_command(e2e.shared_key_for_other_name("@alice", "@bob"), "d3JhcA==",
                                e2e.metadata_fragment(ttr_ms=e2e.SHARED_KEY_TTR_MS))
    assert shared == "update:ttr:86400000:@bob:shared_key@alice d3JhcA=="  # SDK's command2
    p = parse_command(shared).params
    assert p["forAtSign"] == "bob" and p["atKey"] == "shared_key" and p["ttr"] == "86400000"


def test_metadata_fragment_is_in_grammar_order():
    frag = e2e.metadata_fragment(ttl_ms=1, ttb_ms=2, ttr_ms=-1, ccd=True, data_signature="s",
                                 is_encrypted=True, iv_nonce="aXY=")
    assert frag == ":ttl:1:ttb:2:ttr:-1:ccd:true:dataSignature:s:isEncrypted:true:ivNonce:aXY="
    p = parse_command(f"update{frag}:@bob:k@alice v").params
    assert (p["ttl"], p["ttb"], p["ttr"], p["ccd"], p["ivNonce"]) == ("1", "2", "-1", "true",
                                                                      "aXY=")
    assert e2e.metadata_fragment() == ""


def test_monitor_command():
    assert e2e.monitor_command(".*", None) == "monitor .*"
    assert e2e.monitor_command(r"\.sshnp@", 1234) == r"monitor:1234 \.sshnp@"
    assert e2e.monitor_command(None, 5, self_notifications=True) == "monitor:selfNotifications:5"
    p = parse_command(e2e.monitor_command("x.y", 99)).params
    assert p["epochMillis"] == "99" and p["regex"] == "x.y"


def test_parse_lookup_all():
    data, meta = e2e.parse_lookup_all(json.dumps({"key": "k@a", "data": "ct",
                                                  "metaData": {"ivNonce": "aXY="}}))
    assert data == "ct" and meta["ivNonce"] == "aXY="
    assert e2e.parse_lookup_all('{"data":null}') == (None, {})
    with pytest.raises(e2e.E2EError):
        e2e.parse_lookup_all("nope")


# --- monitor lines ----------------------------------------------------------------------------

def _server_notification(**kw) -> N.Notification:
    base = dict(id="n-1", from_atsign="@alice", to_atsign="@bob",
                key="@bob:request.sshnp@alice", value="Y3Q=", epoch_millis=1700000000123,
                is_encrypted=True, metadata={"ivNonce": "aXZub25jZQ=="}, type="received")
    base.update(kw)
    return N.Notification(**base)


@pytest.mark.parametrize("replay", [False, True])
def test_parse_server_monitor_lines(replay):
    line = N.monitor_line(_server_notification(), replay=replay)
    parsed = e2e.parse_monitor_line(line)
    assert parsed.kind == "notification"
    n = parsed.notification
    assert n is not None
    assert (n.id, n.from_atsign, n.to_atsign, n.key) == ("n-1", "@alice", "@bob",
                                                         "@bob:request.sshnp@alice")
    assert n.epoch_millis == 1700000000123 and n.operation == "update"
    assert n.is_encrypted and n.value is None and n.raw_value == "Y3Q="
    assert n.iv_nonce == "aXZub25jZQ==" and n.message_type == "key"
    assert "Y3Q=" not in repr(n)  # values never reach logs through repr


def test_plain_and_delete_notifications():
    n = e2e.parse_monitor_line(N.monitor_line(
        _server_notification(is_encrypted=False, value="hi", metadata={}), replay=False))
    assert n.notification is not None and n.notification.value == "hi"
    assert n.notification.iv_nonce is None
    d = e2e.parse_monitor_line(N.monitor_line(
        _server_notification(operation="delete", value=None), replay=False))
    assert d.notification is not None and d.notification.operation == "delete"
    assert d.notification.value is None


def test_stats_and_prompt_glued_lines():
    stats = e2e.parse_monitor_line(N.stats_line("@bob", 42, 1700000000999))
    assert stats.notification is not None and stats.notification.is_stats
    assert stats.notification.epoch_millis == 1700000000999
    glued = "@bob@" + N.monitor_line(_server_notification(), replay=False)
    assert e2e.parse_monitor_line(glued).kind == "notification"
    assert e2e.parse_monitor_line("data:ok").kind == "heartbeat"
    assert e2e.parse_monitor_line("@bob@data:ok").kind == "heartbeat"
    assert e2e.parse_monitor_line("@bob@").kind == "empty"
    assert e2e.parse_monitor_line("").kind == "empty"
    err = e2e.parse_monitor_line("error:AT0401-Client authentication failed")
    assert err.kind == "error" and err.text.startswith("AT0401")
    assert e2e.parse_monitor_line("notification: {broken").kind == "other"
    assert e2e.parse_monitor_line("data:something").kind == "data"


def test_key_share_detection():
    n = e2e.parse_notification({"id": "x", "from": "@alice", "to": "@bob",
                                "key": "@bob:shared_key@alice", "value": "d3JhcA==",
                                "operation": "update", "epochMillis": 1, "isEncrypted": True})
    assert e2e.is_key_share(n, "@bob")
    assert not e2e.is_key_share(n, "@carol")
    other = e2e.parse_notification({"id": "y", "from": "@alice", "to": "@bob",
                                    "key": "@bob:msg@alice", "epochMillis": 1})
    assert not e2e.is_key_share(other, "@bob")


def test_sdk_monitor_classifier_agrees_on_key_shares():
    from at_client.connections.atmonitorconnection import AtMonitorConnection
    assert AtMonitorConnection._is_shared_key_notification(AtSign("@bob"),
                                                           "@bob:shared_key@alice")
    n = e2e.parse_notification({"id": "x", "from": "@alice", "to": "@bob",
                                "key": "@bob:shared_key@alice", "operation": "update",
                                "epochMillis": 1})
    assert e2e.is_key_share(n, "@bob")


# --- fast RSA with cached keys ----------------------------------------------------------------

def test_cached_sign_equals_crypto_sign_and_the_sdk(rsa_pair):
    pub, priv = rsa_pair
    for msg in ("_sid@alice:proof", "é🛠 value"):
        sig = e2e.sign(priv, msg)
        assert sig == crypto.sign(priv, msg)  # PKCS#1 v1.5 is deterministic
        assert sig == EncryptionUtil.sign_sha256_rsa(msg, priv)
        assert crypto.verify(pub, msg, sig)


def test_rsa_unwrap_matches_the_sdk(rsa_pair):
    pub, priv = rsa_pair
    aes = crypto.generate_aes_key()
    assert e2e.rsa_unwrap(priv, EncryptionUtil.rsa_encrypt_to_base64(aes, pub)) == aes
    with pytest.raises(crypto.CryptoError):
        e2e.rsa_unwrap(priv, base64.b64encode(b"\x00" * 256).decode())
    with pytest.raises(crypto.CryptoError):
        e2e.rsa_unwrap("bm90IGEga2V5", "eA==")


def test_new_uuid_is_a_v4_uuid():
    import uuid
    ids = {e2e.new_uuid() for _ in range(200)}
    assert len(ids) == 200
    for s in ids:
        u = uuid.UUID(s)
        assert u.version == 4 and str(u) == s


def test_json_nested_too_deeply_from_a_server_is_refused_not_a_crash():
    """A hostile atServer must not end a monitor (or a lookup) with a RecursionError."""
    deep = "[" * 100_000 + "]" * 100_000
    assert e2e.parse_monitor_line("notification: " + deep).kind == "other"
    with pytest.raises(e2e.E2EError, match="nested too deeply"):
        e2e.parse_lookup_all(deep)
