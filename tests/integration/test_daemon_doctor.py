"""``sshnpd --doctor`` against a real plane (TLS), a real OpenSSH sshd and a running sshnpd.

A healthy device exits 0 with every check OK; each broken case (keys readable by others,
authorized_keys group-writable, sshd down, atDirectory unreachable, wrong CA) exits 1 and
the output names the check and what to do.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_daemon_sshnpd import SSHD, Env

from noports.keys.ca import ensure_plane_tls
from tests.harness.plane import free_port as _free_port

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    if not (os.path.exists(SSHD) and shutil.which("ssh-keygen")):
        pytest.skip("OpenSSH sshd/ssh-keygen not installed")
    if os.geteuid() != 0 and not os.path.isdir("/run/sshd"):
        pytest.skip("sshd needs /run/sshd (create it as root)")
    e = Env(tmp_path_factory.mktemp("doctor"))
    e.ak_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    e.ak_path.touch(mode=0o600)
    d = e.start_daemon()
    e.pid_file = e.base / "sshnpd.pid"
    e.pid_file.write_text(f"{d.popen.pid}\n")
    yield e
    e.stop()


def doctor(env: Env, *extra: str, key: Path | None = None) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "noports.daemon.cli", "--doctor", "-a", "@device",
            "-m", "@client", "-d", "pi",
            "-k", str(key or env.keys_dir / "@device_key.atKeys"),
            "--root-domain", env.plane.root, "--ca-file", str(env.plane.tls.ca_cert),
            "--authorized-keys", str(env.ak_path),
            "--sshd-host-keys", str(env.sshd_dir / "*.pub"),
            "--local-sshd-port", str(env.sshd_port),
            "--storage-path", str(env.base / "state" / "pi"),
            "--pid-file", str(env.pid_file), *extra]
    # later flags win: a case overrides one setting by appending it
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


def test_healthy_device_every_check_ok(env):
    res = doctor(env)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = [ln for ln in res.stdout.splitlines() if ln[:4] in ("OK  ", "WARN", "FAIL")]
    checks = {ln[5:].split(":", 1)[0] for ln in lines}
    assert {"config", "keys", "authorized_keys", "sshd", "storage", "atDirectory",
            "atServer", "clock", "service"} <= checks, res.stdout
    assert all(ln.startswith("OK") for ln in lines), res.stdout
    assert "SSH-2.0-OpenSSH" in res.stdout and "healthy" in res.stdout


def test_world_readable_keys(env, tmp_path):
    key = tmp_path / "@device_key.atKeys"
    shutil.copy(env.keys_dir / "@device_key.atKeys", key)
    key.chmod(0o644)
    res = doctor(env, key=key)
    assert res.returncode == 1
    assert "FAIL keys:" in res.stdout and f"chmod 600 {key}" in res.stdout


def test_group_writable_authorized_keys(env):
    env.ak_path.chmod(0o620)
    try:
        res = doctor(env)
    finally:
        env.ak_path.chmod(0o600)
    assert res.returncode == 1
    assert "FAIL authorized_keys:" in res.stdout and "StrictModes" in res.stdout
    assert f"chmod go-w {env.ak_path}" in res.stdout


def test_sshd_down(env):
    res = doctor(env, "--local-sshd-port", str(_free_port()))
    assert res.returncode == 1
    assert "FAIL sshd: no sshd on localhost port" in res.stdout
    assert "start sshd" in res.stdout


def test_directory_unreachable(env):
    res = doctor(env, "--root-domain", f"127.0.0.1:{_free_port()}")
    assert res.returncode == 1
    assert "FAIL atDirectory: cannot reach 127.0.0.1:" in res.stdout
    assert "--root-domain" in res.stdout


def test_wrong_ca(env, tmp_path):
    other = ensure_plane_tls(tmp_path / "other", ["127.0.0.1"])
    res = doctor(env, "--ca-file", str(other.ca_cert))
    assert res.returncode == 1
    assert "FAIL TLS trust:" in res.stdout and "--ca-file" in res.stdout


def test_bad_config_names_the_setting(env):
    res = doctor(env, "--request-window", "0")
    assert res.returncode == 2
    assert "--request-window" in res.stderr
