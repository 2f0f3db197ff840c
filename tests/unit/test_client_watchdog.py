"""sshnp's set-up watchdog: a client whose event loop is blocked (here by a file lock another
process holds) still exits, printing the stacks of what hung and an error naming the step."""

from __future__ import annotations

import fcntl
import subprocess
import sys
import textwrap
from pathlib import Path

from noports.client.errors import EXIT_ATSERVER

CHILD = textwrap.dedent("""
    import fcntl, os, sys
    from noports.client import flow, watchdog
    from noports.client.errors import AtServerError
    flow.CURRENT_STEP[0] = (AtServerError, "atServer", "sending the relay request to @r1")
    watchdog.arm(0.5, grace=0.5)
    fd = os.open(sys.argv[1], os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # blocks the only thread that runs the loop
    print("not reached")
""")


def test_blocked_client_exits_naming_the_step_with_stacks(tmp_path: Path) -> None:
    lock = tmp_path / "held.lock"
    lock.write_text("")
    with lock.open("r+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        proc = subprocess.run([sys.executable, "-c", CHILD, str(lock)], capture_output=True,
                              text=True, timeout=60)
    assert proc.returncode == EXIT_ATSERVER, proc.stderr
    assert "not reached" not in proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("sshnp: error: atServer: sending the relay request to @r1: "
                                "no progress for 1s"), proc.stderr
    assert "fcntl.flock" in proc.stderr or 'File "<string>"' in proc.stderr  # the stack


def test_disarmed_watchdog_stays_quiet(tmp_path: Path) -> None:
    code = ("import time\nfrom noports.client import watchdog\nwatchdog.arm(0.2, grace=0.1)\n"
            "watchdog.disarm()\ntime.sleep(1.0)\nprint('done')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "done", proc.stderr
    assert proc.stderr == ""


def test_stuck_wind_down_exits_with_ssh_code(tmp_path: Path) -> None:
    code = ("import threading\nfrom noports.client import watchdog\n"
            "watchdog.arm_exit(42, limit=0.5)\nthreading.Event().wait()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 42, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "sshnp: error: exit: winding down after ssh exited: no progress"), proc.stderr
