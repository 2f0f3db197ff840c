"""npt_tunnel without a device: which processes it may stop (never a recycled pid), check mode,
what it needs to start, and a missing npt client. The tunnel itself: tests/integration/test_npt.py."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ansible_collections.noports.sshnp.plugins.modules import npt_tunnel


@pytest.fixture
def fake_npt():
    """A process whose command line looks like the npt client's (python -m ...npt_cli)."""
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                          "noports.client.npt_cli"])
    deadline = time.monotonic() + 30  # until exec() has run, /proc shows the forking pytest
    while b"npt_cli" not in Path(f"/proc/{p.pid}/cmdline").read_bytes():
        assert time.monotonic() < deadline, "the fake npt never started"
        time.sleep(0.01)
    yield p
    p.kill()
    p.wait()


def test_only_an_npt_process_is_recognised(tmp_path, fake_npt):
    pid_file = tmp_path / "t.pid"
    assert npt_tunnel.npt_pid(str(pid_file)) is None  # no file
    pid_file.write_text(f"{os.getpid()}\n")  # alive, but not npt (a recycled pid)
    assert npt_tunnel.npt_pid(str(pid_file)) is None
    pid_file.write_text("not a pid\n")
    assert npt_tunnel.npt_pid(str(pid_file)) is None
    pid_file.write_text(f"{fake_npt.pid}\n")
    assert npt_tunnel.npt_pid(str(pid_file)) == fake_npt.pid


def test_stop_ends_the_npt_process_and_is_idempotent(tmp_path, fake_npt, run_module):
    pid_file = tmp_path / "t.pid"
    pid_file.write_text(f"{fake_npt.pid}\n")
    r = run_module(npt_tunnel, {"pid_file": str(pid_file), "state": "stopped"}, check=True)
    assert r["changed"] and fake_npt.poll() is None  # check mode: still running
    r = run_module(npt_tunnel, {"pid_file": str(pid_file), "state": "stopped"})
    assert r["changed"] and fake_npt.wait(10) is not None and not pid_file.exists()
    r = run_module(npt_tunnel, {"pid_file": str(pid_file), "state": "stopped"})
    assert not r["changed"]


def test_a_running_tunnel_is_kept(tmp_path, fake_npt, run_module):
    pid_file = tmp_path / "t.pid"
    pid_file.write_text(f"{fake_npt.pid}\n")
    (tmp_path / "t.pid.port").write_text("4321\n")
    r = run_module(npt_tunnel, {"pid_file": str(pid_file)})
    assert not r["changed"] and r["port"] == 4321 and r["pid"] == fake_npt.pid


def test_start_needs_the_session_options(tmp_path, run_module):
    r = run_module(npt_tunnel, {"pid_file": str(tmp_path / "t.pid"), "device_atsign": "@d"})
    assert r["failed"] and r["msg"] == "state=started needs client_atsign, relays, remote_port"


def test_check_mode_start_opens_nothing(tmp_path, run_module):
    r = run_module(npt_tunnel, {"pid_file": str(tmp_path / "t.pid"), "client_atsign": "@c",
                                "device_atsign": "@d", "relays": ["@r"], "remote_port": 80},
                   check=True)
    assert r["changed"] and r["port"] is None and not (tmp_path / "t.pid").exists()


def test_a_missing_npt_client_is_named(tmp_path, run_module):
    r = run_module(npt_tunnel, {"pid_file": str(tmp_path / "t.pid"), "client_atsign": "@c",
                                "device_atsign": "@d", "relays": ["@r"], "remote_port": 80,
                                "npt_executable": "no-such-npt-client"})
    assert r["failed"] and "cannot find the npt client 'no-such-npt-client'" in r["msg"]
