"""scripts/bootstrap.sh waits for a busy apt/dpkg lock instead of failing with apt's raw error.

Real parts: the real script (sourced for its ``wait_apt_lock`` function, or run whole), a real
fcntl lock held by another process (what apt-get and dpkg take), and the real
``/var/lib/dpkg/lock-frontend`` for the whole-script case (root only).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

REPO = Path(__file__).resolve().parents[2]
BOOTSTRAP = REPO / "scripts" / "bootstrap.sh"
DPKG_FRONTEND = Path("/var/lib/dpkg/lock-frontend")
HOLDER = ("import fcntl, sys, time\n"
          "f = open(sys.argv[1], 'a')\n"
          "fcntl.lockf(f, fcntl.LOCK_EX)\n"  # an fcntl (POSIX) lock, as apt and dpkg take
          "print('locked', flush=True)\n"
          "time.sleep(float(sys.argv[2]))\n")


@contextmanager
def held(lock: Path, seconds: float) -> Iterator[subprocess.Popen[str]]:
    """Another process holding ``lock`` for ``seconds`` (then it exits, releasing it)."""
    script = Path(tempfile.mkdtemp(prefix="np-")) / "np-test-lock-holder.py"
    script.write_text(HOLDER)
    proc = subprocess.Popen([sys.executable, str(script), str(lock), str(seconds)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        yield proc
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(script.parent, ignore_errors=True)


def test_waits_for_the_lock_then_goes_on(tmp_path: Path) -> None:
    lock = tmp_path / "lock-frontend"
    with held(lock, 2.5) as holder:
        started = time.monotonic()
        out = subprocess.run(
            ["bash", "-c", f'source "{BOOTSTRAP}"; APT_LOCKS=("{lock}"); '
                           'wait_apt_lock 60; echo "lock free"'],
            capture_output=True, text=True, timeout=90)
        waited = time.monotonic() - started
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "lock free"
    assert f"waiting for the apt/dpkg lock {lock} held by pid {holder.pid} (" in out.stderr
    assert "np-test-lock-holder" in out.stderr  # the holder's command line, for the user
    assert waited >= 1.0, waited  # it did wait for the release (hang guard: the timeout)


def test_sourcing_runs_nothing(tmp_path: Path) -> None:
    out = subprocess.run(["bash", "-c", f'source "{BOOTSTRAP}"; declare -F wait_apt_lock'],
                         capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    assert not (tmp_path / ".venv").exists()


@pytest.mark.skipif(os.geteuid() != 0 or not DPKG_FRONTEND.exists()
                    or not shutil.which("apt-get"), reason="needs root and Debian's apt/dpkg")
def test_bootstrap_gives_up_with_a_clear_error_naming_the_holder(tmp_path: Path) -> None:
    """``make bootstrap`` while another apt runs: a bounded wait, then an error naming the
    lock and its holder (not apt's raw "Could not get lock"). ``hello`` stands in for a
    missing package (BOOTSTRAP_EXTRA_PKGS); nothing is installed: it stops at the lock."""
    installed = subprocess.run(["dpkg-query", "-W", "-f=${Status}", "hello"],
                               capture_output=True, text=True)
    if "install ok installed" in installed.stdout:
        pytest.skip("the stand-in missing package 'hello' is installed here")
    env = {**os.environ, "APT_LOCK_TIMEOUT": "3", "BOOTSTRAP_EXTRA_PKGS": "hello",
           "VENV": str(tmp_path / "venv")}
    with held(DPKG_FRONTEND, 60) as holder:
        out = subprocess.run(["bash", str(BOOTSTRAP)], capture_output=True, text=True,
                             timeout=60, env=env, stdin=subprocess.DEVNULL)
    assert out.returncode == 1, out.stderr
    err = out.stderr
    assert "installing Debian packages: hello" in err
    assert f"waiting for the apt/dpkg lock {DPKG_FRONTEND} held by pid {holder.pid}" in err
    assert (f"error: the apt/dpkg lock {DPKG_FRONTEND} held by pid {holder.pid} (" in err
            and "is still taken after 3s" in err and "'make bootstrap' again" in err), err
    assert "Could not get lock" not in err
    assert not (tmp_path / "venv").exists()  # stopped before the virtualenv step
