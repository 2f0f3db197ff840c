"""Day 2 through the tunnel: sessions outlive sshnpd (docs/decisions/0024-sessions-outlive-daemon.md).

One world (tests/harness/world.py; network namespaces as root, else loopback): a plane, srvd, one
device with its OpenSSH sshd and a harness-run sshnpd named ``boot``. Over
``ansible_connection: sshnp`` through ``boot``, the ``sshnpd`` role deploys a second daemon for
the same device, ``box``, with the pid-file runner (tests/ansible/day2/). Then:

1. a live ``sshnp`` session to ``box`` running a long command survives a restart of ``box``
   through the pid-file runner (what the role's handler does), a new session to the new
   daemon works as soon as it is ready, and the old session host exits when its session ends;
2. over ``ansible_connection: sshnp`` to ``box`` itself, one play re-applies the role with a
   config change and with a runtime upgrade (a copy of the collection whose version is
   bumped, via ``sshnpd_runtime_source``), each followed by ``meta: flush_handlers`` and tasks
   checking on the device that a new daemon runs the new config / version, and ends by
   removing sshnpd (``sshnpd_state: absent``) as its last task: the play's own tunnel and a
   second live session survive all of it; nothing of ``box`` is left once they end.

The systemd side (``KillMode=process`` in the role's unit) is exercised by the real-systemd
role tests.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness.ansible import (
    REPO,
    PlaybookRun,
    ansible_env,
    ansible_tool,
    close_masters,
    parse_recap,
    pids_mentioning,
    skip_reason,
    snapshot_collection,
    write_inventory,
)
from tests.harness.world import CLIENT, PY, RELAY, World, device_atsign, noports_world

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

DAY2 = REPO / "tests" / "ansible" / "day2"
UPGRADE_VERSION = "0.1.0+day2"
OWNER = f"{device_atsign(1)}/box"


@dataclass
class Day2:
    world: World
    base: Path
    host_root: Path
    cp_dir: Path
    inventory: Path
    env: dict[str, str]
    extra: list[str]

    @property
    def pid_file(self) -> Path:
        return self.host_root / "run" / "noports" / "sshnpd.pid"

    @property
    def log_file(self) -> Path:
        return self.host_root / "var" / "log" / "noports" / "sshnpd.log"

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")

    def playbook(self, name: str, timeout: float = 300) -> PlaybookRun:
        argv = [ansible_tool("ansible-playbook"), "-i", str(self.inventory), *self.extra,
                str(DAY2 / name)]
        t0 = time.monotonic()
        res = subprocess.run(argv, capture_output=True, text=True, env=self.env,
                             timeout=timeout, stdin=subprocess.DEVNULL, check=False)
        out = res.stdout + res.stderr
        return PlaybookRun(argv, res.returncode, out, time.monotonic() - t0, parse_recap(out))

    def long_session(self, tag: str) -> tuple[subprocess.Popen[str], Path, Path]:
        """``sshnp`` to box running a command that lasts until the test says so."""
        started, release = self.base / f"{tag}.started", self.base / f"{tag}.release"
        cmd = (f"touch {started}; i=0; while [ ! -e {release} ] && [ $i -lt 1500 ]; "
               f"do sleep 0.2; i=$((i+1)); done; echo survived-{tag}")
        proc = subprocess.Popen(self.world.sshnp_argv(1, cmd, name="box"), text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, env=self.world.client_env())
        wait_until(lambda: started.exists() or proc.poll() is not None, 60,
                   f"the long command of {tag} to start")
        assert proc.poll() is None, proc.communicate()
        return proc, started, release


def wait_until(pred, timeout: float, what: str) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def finish(proc: subprocess.Popen[str], release: Path, tag: str) -> None:
    release.touch()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and out.strip() == f"survived-{tag}", (proc.returncode, out, err)


def host_pids(text: str) -> list[int]:
    return [int(p) for p in re.findall(r"session host (\d+) started", text)]


def box_hosts(base: Path) -> list[int]:
    """Live session hosts of this world's ``box`` daemon: their argv names the owner and the
    world's authorized_keys file. Only this world's: other runs of this module on the machine
    (other worktrees, another xdist worker) have hosts with the same owner, and the teardown
    below SIGTERMs what this returns - which cuts every session of such a host."""
    return [p for p in pids_mentioning(f"--for {OWNER} ")
            if p in pids_mentioning("sessionhost") and p in pids_mentioning(str(base))]


def upgrade_source(base: Path) -> Path:
    """A copy of the runtime's source with a bumped version: the 'newer build'."""
    src = base / "upgrade"
    snap = snapshot_collection(src)
    init = snap / "src" / "noports" / "daemon" / "__init__.py"
    text = init.read_text()
    assert 'DAEMON_VERSION = "' in text
    init.write_text(re.sub(r'DAEMON_VERSION = "[^"]*"', f'DAEMON_VERSION = "{UPGRADE_VERSION}"',
                           text))
    return snap


def test_box_hosts_are_only_this_worlds(tmp_path: Path) -> None:
    """Another run of this module (another worktree, another worker) has session hosts with
    the same owner; the teardown SIGTERMs what ``box_hosts`` returns, and a SIGTERMed host
    cuts its sessions ("relay connection lost ... without the device's end-of-stream frame"
    in that run's play). So only hosts naming this world's files count."""
    fake = [PY, "-c", "import time; time.sleep(60)", "-m", "noports.daemon.sessionhost",
            "--for", OWNER, "--authorized-keys"]
    theirs = subprocess.Popen([*fake, str(tmp_path / "other" / "authorized_keys")])
    mine = subprocess.Popen([*fake, str(tmp_path / "mine" / "authorized_keys")])
    try:
        wait_until(lambda: {theirs.pid, mine.pid} <= set(pids_mentioning(f"--for {OWNER} ")),
                   10, "the fake hosts")
        assert box_hosts(tmp_path / "mine") == [mine.pid]
    finally:
        for proc in (theirs, mine):
            proc.kill()
            proc.wait(10)


@pytest.fixture(scope="module")
def day2(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Day2]:
    reason = skip_reason(namespaced=False)
    if reason:
        pytest.skip(reason)
    base = tmp_path_factory.mktemp("day2")
    with noports_world(base, n_devices=1, daemons=False) as world:
        world.start_sshnpd(1, name="boot")
        dev = world.device(1)
        collections = base / "collections"
        snapshot_collection(collections)
        cp_dir = base / "cp"
        cp_dir.mkdir(mode=0o700)
        common = {
            "ansible_connection": "sshnp", "ansible_user": dev.ssh_user,
            "ansible_port": dev.ssh_port, "ansible_ssh_private_key_file": str(world.identity),
            "ansible_python_interpreter": PY, "ansible_sshnp_client_atsign": CLIENT,
            "ansible_sshnp_device_atsign": device_atsign(1), "ansible_sshnp_relays": RELAY,
            "ansible_sshnp_root_domain": world.root, "ansible_sshnp_ca_file": world.ca,
            "ansible_sshnp_keys_file": str(world.keyfile(CLIENT)),
            "ansible_sshnp_known_hosts_file": str(base / "known_hosts")}
        inventory = write_inventory(base / "inventory.yml", {"all": {"hosts": {
            "viaboot": {**common, "ansible_sshnp_device": "boot"},
            "box": {**common, "ansible_sshnp_device": "box"}}}})
        host_root = base / "devroot"
        evars = {
            "device_atsign": device_atsign(1), "client_atsign": CLIENT,
            "root_domain": world.root, "ca_file": world.ca,
            "keys_dir": str(world.keyfile(device_atsign(1)).parent),
            "authorized_keys": str(dev.authorized_keys),
            "sshd_host_keys": str(world.host_pub(1)), "sshd_port": dev.ssh_port,
            "host_root": str(host_root), "runtime_python": PY,
            "runtime_site_dirs": [sysconfig.get_paths()["purelib"]],
            "payload_cache": str(base / "payload-cache"),
            "upgrade_source": str(upgrade_source(base)), "upgrade_version": UPGRADE_VERSION}
        extra = ["-e", json.dumps(evars)]
        env = ansible_env(base, home=world.client_home, collections=collections, cp_dir=cp_dir)
        if os.environ.get("DAY2_ANSIBLE_LOG"):  # timestamps per task, for looking at timings
            env["ANSIBLE_LOG_PATH"] = os.environ["DAY2_ANSIBLE_LOG"]
        d = Day2(world, base, host_root, cp_dir, inventory, env, extra)
        deploy = d.playbook("deploy.yml").check()
        print(f"\ndeploy over sshnp via boot: {deploy.seconds:.1f}s")
        close_masters(cp_dir)
        try:
            yield d
        finally:
            close_masters(cp_dir)
            for pid in [*box_hosts(d.base), *([int(d.pid_file.read_text().split()[0])]
                                        if d.pid_file.exists() else [])]:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGTERM)


def test_live_session_survives_runner_restart_and_new_daemon_serves(day2: Day2) -> None:
    w, dev = day2.world, day2.world.device(1)
    wait_until(lambda: "ready: device 'box'" in day2.log(), 30, "the role's daemon ready")
    before = day2.log()
    old_pid = int(day2.pid_file.read_text().split()[0])
    old_hosts = host_pids(before)
    assert old_hosts, before[-2000:]
    proc, _started, release = day2.long_session("runner")
    # the restart the role's handler does, with the runner (noports_service, kill_mode process)
    mark = len(day2.log())
    collections = Path(day2.env["NOPORTS_COLLECTION_ROOT"])
    code = (f"import sys; sys.path.insert(0, {str(collections)!r})\n"
            "from ansible_collections.noports.sshnp.plugins.module_utils import "
            "noports_service as svc\n"
            f"assert svc.stop({str(day2.pid_file)!r}, kill_mode='process')\n"
            f"print(svc.start({str(day2.host_root / 'etc/noports/sshnpd.run')!r}, "
            f"{str(day2.pid_file)!r}, {str(day2.log_file)!r}))\n")
    res = w.topo.run_in(dev.ns, [PY, "-c", code], timeout=60)
    new_pid = int(res.stdout.strip())
    assert new_pid != old_pid
    wait_until(lambda: "ready: device 'box'" in day2.log()[mark:], 30, "the new daemon ready")
    assert proc.poll() is None, "the live session was cut by the restart"
    # a new session goes to the new daemon and its new session host
    res2 = w.sshnp(1, "echo new-daemon", name="box")
    assert res2.returncode == 0 and res2.stdout.strip() == "new-daemon", res2.stderr
    after = day2.log()[mark:]
    assert host_pids(after) and host_pids(after)[0] not in old_hosts, after[-2000:]
    assert re.search(r"session \S+ for " + re.escape(CLIENT), after), after[-2000:]
    # the old session is still served by the old daemon's host; it ends when the user is done
    finish(proc, release, "runner")
    wait_until(lambda: not any(p in box_hosts(day2.base) for p in old_hosts), 15,
               "the old session host to exit after its last session")


def test_role_over_sshnp_reconfigures_upgrades_and_removes_itself(day2: Day2) -> None:
    proc, _started, release = day2.long_session("role")
    run = day2.playbook("redeploy.yml")
    print(f"\nredeploy + upgrade + removal over sshnp via box: {run.seconds:.1f}s")
    run.check()
    assert run.recap["box"]["changed"] > 0, run.tail()
    log = day2.log()
    # what the play checked on the device, seen from here too
    assert f"sshnpd {UPGRADE_VERSION} starting for {device_atsign(1)} device 'box'" in log
    assert "managers @np_client,@np_day2_other" in log
    # removed: no daemon, no service files, no configuration, no runtime
    for gone in (day2.pid_file, day2.host_root / "etc/noports/sshnpd.run",
                 day2.host_root / "etc/noports/sshnpd.conf", day2.host_root / "opt/noports/venv",
                 day2.host_root / "opt/noports/lib"):
        assert not gone.exists(), gone
    # the second live session survived two restarts, an upgrade and the removal
    finish(proc, release, "role")
    # once the play's tunnel is closed too, the last session host exits and leaves no key
    close_masters(day2.cp_dir)
    wait_until(lambda: not box_hosts(day2.base), 20, "every session host of box to exit")
    lines = day2.world.ephemeral_lines(1)
    assert not [ln for ln in lines if f"owner={OWNER}" in ln], lines


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-s"]))

