"""known_hosts entries for pinned device host keys: alias, replace-in-place, concurrency."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from noports.client.knownhosts import (
    PinChange,
    device_known_hosts_path,
    fingerprint,
    host_key_alias,
    known_hosts_lines,
    pin_change,
    update_known_hosts,
)
from noports.client.pkcache import load_cached_pk, store_cached_pk

ED = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"
RSA = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC7 host@x"


def test_alias_is_safe_for_known_hosts() -> None:
    assert host_key_alias("@Alice_Dev", "box-1") == "alice_dev/box-1"
    assert host_key_alias("@we*ird,one", "x") == "we_ird_one/x"
    assert not host_key_alias("@@x", "d").startswith("@")


def test_lines_drop_comments_and_reject_newlines() -> None:
    assert known_hosts_lines("a/b", [RSA]) == ["a/b ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC7"]
    with pytest.raises(ValueError):
        known_hosts_lines("a/b", ["ssh-ed25519 AAAA\nevil.example ssh-rsa AAAA"])


def test_update_replaces_only_the_alias(tmp_path: Path) -> None:
    f = tmp_path / "sub" / "known_hosts"
    f.parent.mkdir()
    f.write_text("other.host ssh-rsa AAAAOTHER\nd/x ssh-rsa OLDKEY\nd/x,alt ssh-rsa OLD2\n")
    update_known_hosts(f, "d/x", [ED, RSA])
    lines = f.read_text().splitlines()
    assert lines[0] == "other.host ssh-rsa AAAAOTHER"
    assert lines[1:] == [f"d/x {ED}", "d/x ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC7"]
    mtime = f.stat().st_mtime_ns
    update_known_hosts(f, "d/x", [ED, RSA])  # unchanged: not rewritten
    assert f.stat().st_mtime_ns == mtime


def test_created_private(tmp_path: Path) -> None:
    f = update_known_hosts(tmp_path / "new" / "kh", "a/b", [ED])
    assert f.stat().st_mode & 0o077 == 0
    assert (tmp_path / "new").stat().st_mode & 0o077 == 0


def _writer(path: str, i: int) -> None:
    for _ in range(20):
        update_known_hosts(path, f"dev{i}/box", [ED])


def test_concurrent_writers_lose_nothing(tmp_path: Path) -> None:
    f = tmp_path / "kh"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(f), i)) for i in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    lines = f.read_text().splitlines()
    assert sorted(lines) == sorted(f"dev{i}/box {ED}" for i in range(6))
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_device_file_path(tmp_path: Path) -> None:
    assert device_known_hosts_path(tmp_path, "a/b") == tmp_path / "known_hosts.d" / "a__b"


def test_pk_cache_roundtrip(tmp_path: Path) -> None:
    assert load_cached_pk(tmp_path, "@dev") is None
    store_cached_pk(tmp_path, "@Dev", "MIIBpub")
    assert (tmp_path / "cached_pks" / "dev").read_text() == "MIIBpub"
    assert load_cached_pk(tmp_path, "@dev") == "MIIBpub"


ED2 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILMGhqQpPY7VVmpe10kZt2XlXE+3U/pd/J45ZJVWadqq"


@pytest.mark.skipif(not shutil.which("ssh-keygen"), reason="OpenSSH ssh-keygen not installed")
def test_fingerprint_is_what_ssh_keygen_prints(tmp_path: Path) -> None:
    for key in (ED, ED2):
        (tmp_path / "k.pub").write_text(key + " c\n")
        out = subprocess.run(["ssh-keygen", "-l", "-E", "sha256", "-f", str(tmp_path / "k.pub")],
                             capture_output=True, text=True, check=True).stdout
        assert out.split()[1] == fingerprint(key.split()[1])
    assert fingerprint("not base64!") == "unreadable key"


def test_rotation_is_reported_with_both_fingerprints(tmp_path: Path) -> None:
    f = tmp_path / "kh"
    seen: list[PinChange] = []
    update_known_hosts(f, "d/x", [ED], on_change=seen.append)
    assert seen == []  # first use: nothing was pinned, nothing to report
    update_known_hosts(f, "d/x", [ED], on_change=seen.append)
    assert seen == []  # same key again
    update_known_hosts(f, "other/y", [ED2], on_change=seen.append)
    assert seen == []  # another device's first pin
    update_known_hosts(f, "d/x", [ED2], on_change=seen.append)
    assert f.read_text().splitlines() == [f"other/y {ED2}", f"d/x {ED2}"]
    [change] = seen
    old, new = fingerprint(ED.split()[1]), fingerprint(ED2.split()[1])
    assert change.old == [f"ssh-ed25519 {old}"] and change.new == [f"ssh-ed25519 {new}"]
    msg = change.message()
    assert old in msg and new in msg and "d/x" in msg and str(f) in msg
    assert msg.index(old) < msg.index(new)  # "was <old>; now <new>"


def test_pin_change_ignores_other_aliases_and_reorders() -> None:
    old = [f"d/x {ED}", f"d/x {RSA.rsplit(' ', 1)[0]}", f"e/z {ED2}"]
    assert pin_change(old, "d/x", known_hosts_lines("d/x", [RSA, ED]), Path("k")) is None
    assert pin_change([f"e/z {ED}"], "d/x", [f"d/x {ED2}"], Path("k")) is None
    added = pin_change([f"d/x {ED}"], "d/x", known_hosts_lines("d/x", [ED, ED2]), Path("k"))
    assert added is not None and len(added.new) == 2
