"""`.atKeys` files: official demo files, SDK compatibility both ways, 0600, clear errors."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from at_client.util.keysutil import KeysUtil

from noports import crypto
from noports.keys.atkeys import (
    AtKeys,
    AtKeysError,
    atkeys_to_json,
    default_keys_path,
    generate_atkeys,
    keys_file_name,
    load_atkeys,
    normalise_atsign,
    save_atkeys,
)

DEMO = Path(__file__).resolve().parents[1] / "fixtures" / "official-demo-atkeys"
DEMO_FILES = sorted(DEMO.glob("*.atKeys"))
DEMO_ATSIGNS = ["@alice🛠", "@bob🛠", "@gateway1", "@relay1"]


@pytest.fixture(scope="module")
def fresh() -> AtKeys:
    return generate_atkeys("@alice")


@pytest.fixture
def sdk_dir(tmp_path, monkeypatch) -> Path:
    """Point the SDK's KeysUtil at a temp dir (it computes ~/.atsign/keys at import time)."""
    d = tmp_path / "sdk-keys"
    d.mkdir()
    monkeypatch.setattr(KeysUtil, "expected_keys_files_location", str(d) + os.sep)
    monkeypatch.setattr(KeysUtil, "legacy_keys_files_location", str(tmp_path / "nowhere"))
    return d


def test_all_four_demo_files_present():
    assert [p.name for p in DEMO_FILES] == sorted(a + "_key.atKeys" for a in DEMO_ATSIGNS)


@pytest.mark.parametrize("path", DEMO_FILES, ids=lambda p: p.name)
def test_demo_files_load(path: Path):
    keys = load_atkeys(path)
    assert keys.atsign == path.name[: -len("_key.atKeys")]
    assert keys.pkam_public.startswith("MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8A")
    assert keys.encrypt_public.startswith("MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8A")
    # a usable PKAM pair: sign with the private key, verify with the public one
    sig = crypto.sign(keys.pkam_private, "challenge")
    assert crypto.verify(keys.pkam_public, "challenge", sig)


@pytest.mark.parametrize("path", DEMO_FILES, ids=lambda p: p.name)
def test_demo_files_rewrite_byte_identical(path: Path):
    """What we write is what Dart wrote (only a trailing newline may differ)."""
    assert atkeys_to_json(load_atkeys(path)).encode("utf-8") == path.read_bytes().rstrip(b"\n")


@pytest.mark.parametrize("path", DEMO_FILES, ids=lambda p: p.name)
def test_demo_files_agree_with_sdk(path: Path, sdk_dir: Path):
    (sdk_dir / path.name).write_bytes(path.read_bytes())
    sdk = KeysUtil.load_keys(path.name[: -len("_key.atKeys")])
    ours = load_atkeys(path)
    assert sdk == {
        "selfEncryptionKey": ours.self_encryption_key,
        "aesPkamPublicKey": ours.pkam_public,
        "aesPkamPrivateKey": ours.pkam_private,
        "aesEncryptPublicKey": ours.encrypt_public,
        "aesEncryptPrivateKey": ours.encrypt_private,
    }


def test_ours_load_in_sdk(fresh: AtKeys, sdk_dir: Path):
    save_atkeys(fresh, sdk_dir / keys_file_name(fresh.atsign))
    sdk = KeysUtil.load_keys("@alice")
    assert sdk["aesPkamPrivateKey"] == fresh.pkam_private
    assert sdk["aesPkamPublicKey"] == fresh.pkam_public
    assert sdk["aesEncryptPrivateKey"] == fresh.encrypt_private
    assert sdk["aesEncryptPublicKey"] == fresh.encrypt_public
    assert sdk["selfEncryptionKey"] == fresh.self_encryption_key


def test_sdk_written_loads_here_and_rewrites_same_ciphertexts(sdk_dir: Path, capsys):
    keys = generate_atkeys("@bob")
    KeysUtil.save_keys("@bob", {
        "selfEncryptionKey": keys.self_encryption_key,
        "aesPkamPublicKey": keys.pkam_public, "aesPkamPrivateKey": keys.pkam_private,
        "aesEncryptPublicKey": keys.encrypt_public,
        "aesEncryptPrivateKey": keys.encrypt_private})
    capsys.readouterr()  # the SDK prints "Saving keys to ..."
    path = sdk_dir / "@bob_key.atKeys"
    loaded = load_atkeys(path)  # no "@bob" field in SDK files: atSign from the file name
    assert loaded == keys
    sdk_json = json.loads(path.read_text())
    ours_json = json.loads(atkeys_to_json(loaded))
    assert {k: ours_json[k] for k in sdk_json} == sdk_json
    assert ours_json["@bob"] == keys.self_encryption_key


def test_round_trip_with_optional_fields(tmp_path: Path, fresh: AtKeys):
    keys = AtKeys(**{**fresh.__dict__, "apkam_symmetric_key": crypto.generate_aes_key(),
                     "enrollment_id": "1234-abcd"})
    path = save_atkeys(keys, tmp_path / "x.atKeys")
    data = json.loads(path.read_text())
    assert list(data) == ["aesPkamPublicKey", "aesPkamPrivateKey", "aesEncryptPublicKey",
                          "aesEncryptPrivateKey", "selfEncryptionKey", "@alice",
                          "apkamSymmetricKey", "enrollmentId"]
    assert load_atkeys(path) == keys  # atSign from the "@alice" field, not the file name


def test_saved_mode_0600_and_atomic(tmp_path: Path, fresh: AtKeys):
    path = tmp_path / "deep" / "dir" / "@alice_key.atKeys"
    save_atkeys(fresh, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # overwrite a world-readable file: result is 0600 and no temp files remain
    path.chmod(0o644)
    save_atkeys(fresh, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_emoji_atsign_written_raw_utf8(tmp_path: Path):
    keys = generate_atkeys("@Alice🛠")
    assert keys.atsign == "@alice🛠"
    path = save_atkeys(keys, tmp_path / keys_file_name(keys.atsign))
    assert path.name == "@alice🛠_key.atKeys"
    assert '"@alice🛠":' in path.read_text(encoding="utf-8")


def test_default_keys_path(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_keys_path("alice") == tmp_path / ".atsign" / "keys" / "@alice_key.atKeys"


@pytest.mark.parametrize("bad", ["", "@", "  ", "@a b", "a:b", "@a@b", "../x", "a/b", "x" * 56])
def test_bad_atsigns_rejected(bad: str):
    with pytest.raises(AtKeysError, match="not a valid atSign"):
        normalise_atsign(bad)


def test_repr_hides_private_keys(fresh: AtKeys):
    assert fresh.pkam_private not in repr(fresh)
    assert "MII" not in repr(fresh)


# --- corrupt files: one clear AtKeysError naming the problem -------------------------------

def _write(tmp_path: Path, content: str | bytes, name: str = "@alice_key.atKeys") -> Path:
    p = tmp_path / name
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    return p


def _good(fresh: AtKeys) -> dict:
    return json.loads(atkeys_to_json(fresh))


def test_missing_file(tmp_path: Path):
    with pytest.raises(AtKeysError, match="no such file"):
        load_atkeys(tmp_path / "nope.atKeys")


def test_directory_instead_of_file(tmp_path: Path):
    with pytest.raises(AtKeysError, match="is a directory"):
        load_atkeys(tmp_path)


@pytest.mark.parametrize("content", ["not json", b"\xff\xfe\x00", "{\"a\": ", ""])
def test_not_json(tmp_path: Path, content):
    with pytest.raises(AtKeysError, match="not valid JSON"):
        load_atkeys(_write(tmp_path, content))


def test_not_an_object(tmp_path: Path):
    with pytest.raises(AtKeysError, match="JSON object"):
        load_atkeys(_write(tmp_path, "[1, 2]"))


@pytest.mark.parametrize("field", ["aesPkamPublicKey", "aesEncryptPrivateKey",
                                   "selfEncryptionKey"])
def test_missing_field(tmp_path: Path, fresh: AtKeys, field: str):
    data = _good(fresh)
    del data[field]
    with pytest.raises(AtKeysError, match=f"missing field.*{field}"):
        load_atkeys(_write(tmp_path, json.dumps(data)))


def test_missing_pkam_private_explains_sim_mode(tmp_path: Path, fresh: AtKeys):
    data = _good(fresh)
    del data["aesPkamPrivateKey"]
    with pytest.raises(AtKeysError, match="SIM"):
        load_atkeys(_write(tmp_path, json.dumps(data)))


def test_wrong_self_key(tmp_path: Path, fresh: AtKeys):
    data = _good(fresh)
    data["selfEncryptionKey"] = crypto.generate_aes_key()
    with pytest.raises(AtKeysError, match="wrong|corrupt"):
        load_atkeys(_write(tmp_path, json.dumps(data)))


def test_self_key_not_aes256(tmp_path: Path, fresh: AtKeys):
    data = _good(fresh)
    data["selfEncryptionKey"] = "c2hvcnQ="
    with pytest.raises(AtKeysError, match="not a base64 AES-256 key"):
        load_atkeys(_write(tmp_path, json.dumps(data)))


def test_corrupt_ciphertext(tmp_path: Path, fresh: AtKeys):
    data = _good(fresh)
    data["aesPkamPrivateKey"] = data["aesPkamPrivateKey"][:40] + "AAAA" + data[
        "aesPkamPrivateKey"][44:]
    with pytest.raises(AtKeysError, match="aesPkamPrivateKey|PKAM"):
        load_atkeys(_write(tmp_path, json.dumps(data)))


def test_mismatched_pairs(tmp_path: Path, fresh: AtKeys):
    other = generate_atkeys("@alice")
    keys = AtKeys(**{**fresh.__dict__, "pkam_public": other.pkam_public})
    with pytest.raises(AtKeysError, match="PKAM public and private keys do not match"):
        load_atkeys(_write(tmp_path, atkeys_to_json(keys)))


def test_non_string_value(tmp_path: Path, fresh: AtKeys):
    data = _good(fresh)
    data["enrollmentId"] = 5
    with pytest.raises(AtKeysError, match="must be a string"):
        load_atkeys(_write(tmp_path, json.dumps(data)))


def test_unknown_atsign(tmp_path: Path, fresh: AtKeys):
    data = _good(fresh)
    del data["@alice"]
    with pytest.raises(AtKeysError, match="cannot tell which atSign"):
        load_atkeys(_write(tmp_path, json.dumps(data), name="backup.json"))
    # but an explicit atSign works
    assert load_atkeys(tmp_path / "backup.json", atsign="@carol").atsign == "@carol"


def test_name_and_field_disagree(tmp_path: Path, fresh: AtKeys):
    with pytest.raises(AtKeysError, match="file name says @bob but the file is for @alice"):
        load_atkeys(_write(tmp_path, atkeys_to_json(fresh), name="@bob_key.atKeys"))
