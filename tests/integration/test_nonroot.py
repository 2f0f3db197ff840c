"""The README's two commands as a non-root user, from a fresh clone, with no manual step.

Why a test: the root path is what CI runs every time, and the non-root path breaks in ways
root never sees - a ``.venv`` pointing at root's own Python, Debian's python3 (3.11.2 ignored
``pause_reading`` in ``connection_made`` and the tunnel lost its first bytes), files in
root-only directories. As root, this makes a throw-away user, clones HEAD into a directory
that user owns, and runs, as that user with a clean environment:

* ``make demo`` - bootstraps ``.venv`` with the system python3 and runs the demo on loopback;
* ``make test`` restricted by ``PYTEST_ARGS`` to the tunnel end-to-end
  tests and the Ansible end-to-end test (roles over plain SSH, then a playbook over
  ``ansible_connection: sshnp``, in the harness's loopback world with one device). ``NOPORTS_NONROOT_FULL=1`` runs ``make test`` exactly as written instead, the whole
  suite as the non-root user (by hand: it takes about as long as CI's own root run).

It tests the committed HEAD, not uncommitted edits: that is what a fresh clone is.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

FULL = os.environ.get("NOPORTS_NONROOT_FULL") == "1"
# each test bootstraps a .venv from PyPI first (a few minutes), then runs
pytestmark = [pytest.mark.integration, pytest.mark.long, pytest.mark.timeout(3000 if FULL else 1500)]

REPO = Path(__file__).resolve().parents[2]
USER = "npnonroot"
CLEAN_PATH = "/usr/local/bin:/usr/bin:/bin"
# the unit tests are left out: CI's root run has them and they touch no user's files; the
# nested run is serial (the outer suite already keeps both CPUs busy)
SUBSET = ("tests/integration/test_relay_pump.py tests/integration/test_client_e2e.py "
          "tests/integration/test_ansible_e2e.py")


def _needs() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create a throw-away user (as non-root, run the commands directly)"
    for tool in ("runuser", "useradd", "userdel", "git", "make"):
        if shutil.which(tool) is None:
            return f"{tool} not found"
    if not (REPO / ".git").exists():
        return "not a git checkout"
    return None


@pytest.fixture(scope="module")
def checkout():
    why = _needs()
    if why:
        pytest.skip(why)
    base = Path(tempfile.mkdtemp(prefix="np-nonroot-", dir="/tmp"))
    base.chmod(0o755)
    home = base / "home"
    home.mkdir()
    made_user = subprocess.run(["id", "-u", USER], capture_output=True).returncode != 0
    if made_user:
        subprocess.run(["useradd", "--no-create-home", "--home-dir", str(home),
                        "--shell", "/bin/bash", "--user-group", USER], check=True)
    try:
        subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(REPO), str(base / "main")],
                       check=True)
        subprocess.run(["chown", "-R", f"{USER}:{USER}", str(base / "main"), str(home)],
                       check=True)
        yield base
    finally:
        subprocess.run(["pkill", "-KILL", "-u", USER], capture_output=True)
        if made_user:
            subprocess.run(["userdel", USER], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def _as_user(base: Path, *cmd: str, timeout: float) -> subprocess.CompletedProcess[str]:
    env = ["env", "-i", f"HOME={base / 'home'}", f"PATH={CLEAN_PATH}", "LANG=C.UTF-8",
           f"USER={USER}", f"LOGNAME={USER}"]
    return subprocess.run(["runuser", "-u", USER, "--", *env, *cmd], cwd=base / "main",
                          capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def _tail(res: subprocess.CompletedProcess[str]) -> str:
    return f"rc={res.returncode}\nstdout:\n{res.stdout[-3000:]}\nstderr:\n{res.stderr[-5000:]}"


def test_make_demo_as_non_root(checkout: Path) -> None:
    res = _as_user(checkout, "make", "demo", timeout=1200)
    assert res.returncode == 0, _tail(res)
    assert "bootstrap: creating virtualenv .venv" in res.stderr, _tail(res)
    summary = [line for line in res.stdout.splitlines() if line.startswith("demo OK:")]
    assert summary, _tail(res)
    # not root: no namespaces, so the loopback fallback, with its own proof line per device
    assert ", mode=loopback, " in summary[0], summary
    assert "3/3 hosts reached" in summary[0] and "failed=0 unreachable=0" in summary[0], summary
    assert "0 listening sockets of sshnpd" in summary[0], summary
    assert sum("listens on nothing" in ln for ln in res.stdout.splitlines()) == 3, res.stdout
    # the venv is the user's own: its interpreter is not under /root
    venv_python = os.path.realpath(checkout / "main" / ".venv" / "bin" / "python")
    assert not venv_python.startswith("/root/"), venv_python
    # the demo cleaned up: nothing of the user's is left running (zombies are exited
    # processes whose reaper - here, possibly a container's PID 1 - has not collected them)
    ps = subprocess.run(["ps", "-u", USER, "-o", "pid=,stat=,args="], capture_output=True,
                        text=True)
    rows = [ln.split(None, 2) for ln in ps.stdout.splitlines() if ln.strip()]
    left = [row for row in rows if not row[1].startswith("Z")]
    assert left == [], left


def test_make_test_as_non_root(checkout: Path) -> None:
    args = () if FULL else (f"PYTEST_ARGS={SUBSET}", "PYTEST_XDIST=")
    res = _as_user(checkout, "make", "test", *args, timeout=2700 if FULL else 1200)
    print(res.stdout.strip().splitlines()[-1] if res.stdout.strip() else "(no output)")
    assert res.returncode == 0, _tail(res)
    assert "All checks passed!" in res.stdout + res.stderr, _tail(res)  # ruff ran
    last = res.stdout.strip().splitlines()[-1]
    assert " passed" in last and "failed" not in last and "error" not in last, _tail(res)
