"""A plane whose directory is on a password-protected Redis keeps the password secret.

The password must never be in plane.json (0644), in any process's argv (world-readable in
/proc), or needed on the command line: it lives in D/redis.password (0600) and reaches
`atdirectory` through its environment.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.harness.plane import free_port

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
SECRET = "s3cret-R3dis-pw"


@pytest.fixture
def redis_port(tmp_path: Path):
    redis_server = "/usr/bin/redis-server"
    if not os.path.exists(redis_server):
        pytest.skip("redis-server not installed (apt-get install redis-server)")
    redis = pytest.importorskip("redis")
    port = free_port()
    (tmp_path / "redis").mkdir()
    proc = subprocess.Popen([redis_server, "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no", "--dir", str(tmp_path / "redis"),
                             "--requirepass", SECRET],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            redis.Redis(port=port, password=SECRET).ping()
            break
        except redis.ConnectionError:
            assert time.monotonic() < deadline and proc.poll() is None, "redis did not start"
            time.sleep(0.05)
    yield port
    proc.terminate()
    proc.wait(10)


def _noports(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "noports"), *args], capture_output=True, text=True,
                          timeout=120, **kw)


def _cmdlines() -> list[str]:
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            with contextlib.suppress(OSError):
                out.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
                           .decode(errors="replace"))
    return out


def test_redis_password_stays_out_of_config_and_argv(tmp_path: Path, redis_port: int):
    plane = tmp_path / "plane"
    pwfile = tmp_path / "pw"
    pwfile.write_text(SECRET + "\n")
    res = _noports("plane", "init", "--dir", str(plane), "--directory-port", str(free_port()),
                   "--store", f"redis://127.0.0.1:{redis_port}/0",
                   "--store-password-file", str(pwfile))
    assert res.returncode == 0, res.stderr
    assert SECRET not in (plane / "plane.json").read_text()
    assert SECRET not in res.stdout + res.stderr
    assert (plane / "redis.password").stat().st_mode & 0o777 == 0o600
    up = subprocess.Popen([str(BIN / "noports"), "plane", "up", "--dir", str(plane)],
                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while _noports("-q", "plane", "status", "--dir", str(plane)).returncode != 0:
            assert up.poll() is None and time.monotonic() < deadline, "plane did not come up"
            time.sleep(0.3)
        assert not [c for c in _cmdlines() if SECRET in c], "password visible in a command line"
        keys = tmp_path / "keys"
        res = _noports("atsign", "create", "@redisuser", "--dir", str(plane),
                       "--keys-dir", str(keys))
        assert res.returncode == 0, res.stderr
        import redis
        r = redis.Redis(port=redis_port, password=SECRET, decode_responses=True)
        assert r.get("redisuser") and r.get("redisuser").startswith("127.0.0.1:")
        assert r.get("ping") == "pong"   # the official root's sanity key
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(20)


def test_wrong_password_file_is_a_clear_error(tmp_path: Path, redis_port: int):
    plane = tmp_path / "plane"
    res = _noports("plane", "init", "--dir", str(plane), "--store", "sqlite:///tmp/x.db",
                   "--store-password-file", str(tmp_path / "pw"))
    assert res.returncode == 2
    assert "--store-password-file goes with --store redis://" in res.stderr
    assert "Traceback" not in res.stderr
