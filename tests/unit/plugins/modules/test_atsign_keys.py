"""atsign_keys: install and activate paths, no secret in argv/diff, idempotence, check mode."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest
from ansible_collections.noports.sshnp.plugins.modules import atsign_keys

atkeys = pytest.importorskip("noports.keys.atkeys")


@pytest.fixture(scope="module")
def keys_text(tmp_path_factory):
    path = tmp_path_factory.mktemp("k") / "@dev1_key.atKeys"
    atkeys.save_atkeys(atkeys.generate_atkeys("@dev1"), path)
    return path.read_text()


@pytest.fixture
def prefix(tmp_path):
    """A runtime prefix whose python is this interpreter (full .atKeys checks) and whose
    `noports` records its argv and stdin, then writes a keys file like activation does."""
    p = tmp_path / "opt"
    (p / "venv" / "bin").mkdir(parents=True)
    (p / "bin").mkdir()
    py = p / "venv" / "bin" / "python"
    py.write_text(f"#!/bin/sh\nexec {sys.executable} \"$@\"\n")
    py.chmod(0o755)
    fake = p / "bin" / "noports"
    fake.write_text(f"""#!{sys.executable}
import json, sys
from noports.keys.atkeys import generate_atkeys, save_atkeys
argv = sys.argv[1:]
secret = sys.stdin.read()
json.dump({{"argv": argv, "stdin": secret}}, open({str(tmp_path / "calls.json")!r}, "w"))
atsign = argv[argv.index("activate") + 1]
keys_dir = argv[argv.index("--keys-dir") + 1]
save_atkeys(generate_atkeys(atsign), keys_dir + "/" + atsign + "_key.atKeys")
""")
    fake.chmod(0o755)
    return p


def base(tmp_path, prefix, **extra):
    return {"atsign": "dev1", "keys_dir": str(tmp_path / "keys"), "runtime_prefix": str(prefix),
            **extra}


def test_install_writes_0600_and_is_idempotent(tmp_path, prefix, keys_text, run_module):
    a = base(tmp_path, prefix, method="install", atkeys_content=keys_text)
    r = run_module(atsign_keys, a, check=True, diff=True)
    assert r.get("changed"), r
    assert r["action"] == "installed" and not (tmp_path / "keys").exists()
    r = run_module(atsign_keys, a, diff=True)
    assert r.get("changed"), r
    assert r["path"].endswith("/@dev1_key.atKeys")
    assert stat.S_IMODE(os.stat(r["path"]).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "keys").st_mode) == 0o700
    assert json.loads(Path(r["path"]).read_text()) == json.loads(keys_text)
    secret_bits = json.loads(keys_text)["selfEncryptionKey"]
    assert secret_bits not in json.dumps(r)  # never in the result or diff
    r = run_module(atsign_keys, a)
    assert not r["changed"] and r["valid_before"]


def test_install_accepts_a_dict(tmp_path, prefix, keys_text, run_module):
    r = run_module(atsign_keys, base(tmp_path, prefix, method="install",
                                     atkeys_content=json.loads(keys_text)))
    assert r["changed"]


def test_valid_keys_are_kept_unless_force(tmp_path, prefix, keys_text, run_module):
    run_module(atsign_keys, base(tmp_path, prefix, method="install", atkeys_content=keys_text))
    other = tmp_path / "other.atKeys"
    atkeys.save_atkeys(atkeys.generate_atkeys("@dev1"), other)
    a = base(tmp_path, prefix, method="install", atkeys_content=other.read_text())
    r = run_module(atsign_keys, a)
    assert not r["changed"]
    r = run_module(atsign_keys, dict(a, force=True))
    assert r["changed"] and json.loads(Path(r["path"]).read_text()) == json.loads(
        other.read_text())


def test_install_refuses_keys_of_another_atsign(tmp_path, prefix, run_module):
    other = tmp_path / "other.atKeys"
    atkeys.save_atkeys(atkeys.generate_atkeys("@someone"), other)
    text = json.loads(other.read_text())
    text["@someone"] = text["selfEncryptionKey"]
    r = run_module(atsign_keys, base(tmp_path, prefix, method="install",
                                     atkeys_content=json.dumps(text)))
    assert r["failed"] and "@someone" in r["msg"]


def test_install_refuses_corrupt_keys(tmp_path, prefix, keys_text, run_module):
    data = json.loads(keys_text)
    data["selfEncryptionKey"] = data["selfEncryptionKey"][::-1]
    r = run_module(atsign_keys, base(tmp_path, prefix, method="install",
                                     atkeys_content=json.dumps(data)))
    assert r["failed"] and "not usable" in r["msg"]
    assert not list((tmp_path / "keys").glob("*.atKeys"))


def test_activate_passes_the_secret_on_stdin(tmp_path, prefix, run_module):
    a = base(tmp_path, prefix, cram_secret="s3cr3t-cram", root_domain="127.0.0.1:6464",
             ca_file="/etc/noports/ca.pem")
    r = run_module(atsign_keys, a, check=True)
    assert r["changed"] and r["action"] == "activated" and not (tmp_path / "calls.json").exists()
    r = run_module(atsign_keys, a, diff=True)
    assert r["changed"] and r["action"] == "activated"
    call = json.loads((tmp_path / "calls.json").read_text())
    assert call["stdin"].strip() == "s3cr3t-cram"
    assert "s3cr3t-cram" not in " ".join(call["argv"])
    assert call["argv"][call["argv"].index("--cram-secret-file") + 1] == "-"
    assert "--ca" in call["argv"] and "--force" not in call["argv"]
    assert "s3cr3t-cram" not in json.dumps(r)
    assert stat.S_IMODE(os.stat(r["path"]).st_mode) == 0o600
    # second run: valid keys there, secret no longer needed (it is single-use anyway)
    os.unlink(tmp_path / "calls.json")
    r = run_module(atsign_keys, base(tmp_path, prefix))
    assert not r["changed"] and not (tmp_path / "calls.json").exists()


def test_activate_without_secret_fails_clearly(tmp_path, prefix, run_module):
    r = run_module(atsign_keys, base(tmp_path, prefix))
    assert r["failed"] and "cram_secret" in r["msg"]


def test_activate_replaces_a_broken_file(tmp_path, prefix, run_module):
    (tmp_path / "keys").mkdir(mode=0o700)
    (tmp_path / "keys" / "@dev1_key.atKeys").write_text("{}")
    r = run_module(atsign_keys, base(tmp_path, prefix, cram_secret="x",
                                     root_domain="h:1"), diff=True)
    assert r["changed"] and not r["valid_before"] and "unusable" in r["diff"]["before"]
    call = json.loads((tmp_path / "calls.json").read_text())
    assert "--force" in call["argv"]


def test_permissions_drift_is_fixed(tmp_path, prefix, keys_text, run_module):
    a = base(tmp_path, prefix, method="install", atkeys_content=keys_text)
    r = run_module(atsign_keys, a)
    os.chmod(r["path"], 0o644)
    r = run_module(atsign_keys, a)
    assert r["changed"] and r["action"] == "attributes"
    assert stat.S_IMODE(os.stat(r["path"]).st_mode) == 0o600


def test_bad_atsign(tmp_path, prefix, run_module):
    r = run_module(atsign_keys, base(tmp_path, prefix, atsign="a b"))
    assert r["failed"] and "atSign" in r["msg"]
