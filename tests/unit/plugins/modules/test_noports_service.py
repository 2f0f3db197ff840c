"""noports_service: the pid-file runner (what hosts without systemd use) and the module."""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import pytest
from ansible_collections.noports.sshnp.plugins.module_utils import noports_service as svc
from ansible_collections.noports.sshnp.plugins.modules import noports_service


@pytest.fixture
def daemon(tmp_path):
    script = tmp_path / "demo.run"
    script.write_text("#!/bin/sh\necho started\nexec sleep 300\n")
    script.chmod(0o755)
    paths = {"run_script": str(script), "pid_file": str(tmp_path / "run" / "demo.pid"),
             "log_file": str(tmp_path / "log" / "demo.log")}
    yield paths
    svc.stop(paths["pid_file"], timeout=2)


def args(paths, **extra):
    return {"name": "demo", "manager": "none", "start_wait": 0.3, **paths, **extra}


def test_start_is_idempotent_and_stop_stops(daemon, run_module):
    r = run_module(noports_service, args(daemon))
    assert r["changed"] and r["actions"] == ["start"] and r["running"]
    pid = r["pid"]
    assert svc.read_pid(daemon["pid_file"]) == pid
    assert os.getpgid(pid) == pid  # its own session / process group
    r = run_module(noports_service, args(daemon))
    assert not r["changed"] and r["pid"] == pid
    r = run_module(noports_service, args(daemon, state="stopped"))
    assert r["changed"] and r["actions"] == ["stop"]
    assert svc.read_pid(daemon["pid_file"]) is None
    assert not os.path.exists(daemon["pid_file"])
    assert "started" in Path(daemon["log_file"]).read_text()
    r = run_module(noports_service, args(daemon, state="stopped"))
    assert not r["changed"]


def test_check_mode_changes_nothing(daemon, run_module):
    r = run_module(noports_service, args(daemon), check=True)
    assert r["changed"] and r["actions"] == ["start"]
    assert svc.read_pid(daemon["pid_file"]) is None
    run_module(noports_service, args(daemon))
    r = run_module(noports_service, args(daemon, state="stopped"), check=True)
    assert r["changed"] and svc.read_pid(daemon["pid_file"]) is not None


def test_restart_gives_a_new_process(daemon, run_module):
    first = run_module(noports_service, args(daemon))["pid"]
    r = run_module(noports_service, args(daemon, state="restarted"))
    assert r["changed"] and r["actions"] == ["stop", "start"]
    assert r["pid"] != first and svc.read_pid(daemon["pid_file"]) == r["pid"]


@pytest.mark.parametrize("kill_mode,helper_survives", [("group", False), ("process", True)])
def test_kill_mode_decides_whether_the_daemons_group_is_signalled(
        tmp_path, run_module, kill_mode, helper_survives):
    """kill_mode=process (sshnpd's role, like systemd's KillMode=process) signals the daemon
    alone: a helper left in its process group lives on; the default stops the whole group."""
    script = tmp_path / "d.run"
    helper_pid = tmp_path / "helper.pid"
    script.write_text(f"#!/bin/sh\nsleep 300 &\necho $! > {helper_pid}\nexec sleep 300\n")
    script.chmod(0o755)
    paths = {"run_script": str(script), "pid_file": str(tmp_path / "d.pid"),
             "log_file": str(tmp_path / "d.log")}
    run_module(noports_service, args(paths))
    deadline = time.monotonic() + 5
    while not helper_pid.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    helper = int(helper_pid.read_text())
    try:
        r = run_module(noports_service, args(paths, state="stopped", kill_mode=kill_mode))
        assert r["changed"] and svc.read_pid(paths["pid_file"]) is None
        deadline = time.monotonic() + 5
        while svc._alive(helper) and time.monotonic() < deadline and not helper_survives:
            time.sleep(0.05)
        assert svc._alive(helper) == helper_survives
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(helper, 9)


def test_daemon_that_exits_at_once_fails_with_its_log(tmp_path, run_module):
    script = tmp_path / "bad.run"
    script.write_text("#!/bin/sh\necho 'sshnpd: error: no keys' >&2\nexit 2\n")
    script.chmod(0o755)
    paths = {"run_script": str(script), "pid_file": str(tmp_path / "bad.pid"),
             "log_file": str(tmp_path / "bad.log")}
    r = run_module(noports_service, args(paths, start_wait=1.0))
    assert r["failed"] and "no keys" in r["msg"] and "status 2" in r["msg"]
    assert not os.path.exists(paths["pid_file"])


def test_recycled_pid_is_not_our_daemon(daemon):
    pid = svc.start(daemon["run_script"], daemon["pid_file"], daemon["log_file"],
                    start_wait=0.2)
    state = json.loads(Path(svc.state_path(daemon["pid_file"])).read_text())
    state["start_time"] += 1  # as if the pid now belonged to another process
    with open(svc.state_path(daemon["pid_file"]), "w") as fh:
        json.dump(state, fh)
    assert svc.read_pid(daemon["pid_file"]) is None
    os.kill(pid, 15)
    time.sleep(0.1)


def test_stale_pid_file(daemon):
    os.makedirs(os.path.dirname(daemon["pid_file"]))
    with open(daemon["pid_file"], "w") as fh:
        fh.write("999999999\n")
    assert svc.read_pid(daemon["pid_file"]) is None
    assert svc.stop(daemon["pid_file"]) is False


def test_runner_needs_its_paths(run_module):
    r = run_module(noports_service, {"name": "x", "manager": "none"})
    assert r["failed"] and "run_script" in r["msg"]


def test_stop_kills_after_timeout(tmp_path):
    script = tmp_path / "stubborn.run"
    script.write_text("#!/bin/sh\ntrap '' TERM\nwhile :; do sleep 0.1; done\n")
    script.chmod(0o755)
    pid_file = str(tmp_path / "s.pid")
    pid = svc.start(str(script), pid_file, str(tmp_path / "s.log"), start_wait=0.2)
    t0 = time.monotonic()
    assert svc.stop(pid_file, timeout=0.5) is True
    assert time.monotonic() - t0 < 5
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_detect_manager(tmp_path):
    assert svc.detect_manager(str(tmp_path)) == "none"
    (tmp_path / "run" / "systemd" / "system").mkdir(parents=True)
    assert svc.detect_manager(str(tmp_path)) == "systemd"


def test_systemd_path_plans_actions(monkeypatch, run_module):
    calls = []

    def fake_run(self, argv, **kw):  # noqa: ANN001
        calls.append(argv[1:])
        if argv[1] == "is-active":
            return 3, "", ""
        if argv[1] == "is-enabled":
            return 1, "disabled\n", ""
        return 0, "", ""

    monkeypatch.setattr("ansible.module_utils.basic.AnsibleModule.run_command", fake_run)
    monkeypatch.setattr("ansible.module_utils.basic.AnsibleModule.get_bin_path",
                        lambda self, name, *a, **k: "/bin/systemctl")
    r = run_module(noports_service, {"name": "sshnpd", "manager": "systemd", "enabled": True,
                                     "daemon_reload": True})
    assert r["changed"] and r["actions"] == ["daemon-reload", "enable", "start"]
    assert ["enable", "sshnpd.service"] in calls and ["start", "sshnpd.service"] in calls
    calls.clear()
    r = run_module(noports_service, {"name": "sshnpd", "manager": "systemd", "enabled": True},
                   check=True)
    assert r["changed"] and not [c for c in calls if c[0] in ("enable", "start")]
