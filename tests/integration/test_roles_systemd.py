"""The sshnpd role under a real systemd (issue 14, point 2).

Every other role test uses ``service_manager: none``; here a device of the "no open ports"
topology boots systemd as its PID 1 (tests/harness/systemd.py: its own overlay root, PID, mount,
cgroup and network namespaces), and the controller runs the ``sshnpd`` role into it over SSH
with the role's default service manager (``auto`` -> systemd). Then, through the hardened unit
the role wrote: the daemon is active, a real sshnp session (client in the root namespace, srvd
and the plane in the relay namespace) reaches the device's sshd, a second run changes nothing,
and a ``systemctl restart sshnpd`` keeps a live session.
"""

from __future__ import annotations

import json
import subprocess
import sysconfig
import time
from pathlib import Path

import pytest

from noports.crypto import generate_cram_secret
from tests.harness.ansible import (
    ETC_HOST_KEY,
    ansible_env,
    ansible_tool,
    parse_recap,
    snapshot_collection,
)
from tests.harness.ansible import skip_reason as ansible_skip_reason
from tests.harness.sshd import keygen
from tests.harness.systemd import SystemdDevice
from tests.harness.systemd import skip_reason as systemd_skip_reason
from tests.harness.topology import build_topology, want_namespaces
from tests.harness.world import CLIENT, PY, RELAY, World, device_atsign, device_name

pytestmark = pytest.mark.skipif(
    not want_namespaces() or systemd_skip_reason() is not None
    or ansible_skip_reason(True) is not None,
    reason=(systemd_skip_reason() or ansible_skip_reason(True)
            or "needs root network namespaces (NOPORTS_TOPOLOGY=loopback set)"))

PLAYBOOK = """\
- name: sshnpd under systemd
  hosts: devices
  gather_facts: false
  roles:
    - role: noports.sshnp.sshnpd
"""


def _playbook(base: Path, env: dict[str, str], inventory: Path, playbook: Path,
              timeout: float = 300) -> tuple[int, str, dict]:
    """One ansible-playbook run; its output also goes to ``base/ansible-<n>.log``."""
    argv = [ansible_tool("ansible-playbook"), "-i", str(inventory), str(playbook)]
    log = base / f"ansible-{len(list(base.glob('ansible-*.log')))}.log"
    with open(log, "w") as fh:
        p = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=env,
                             cwd=str(base))
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            raise AssertionError(f"ansible-playbook hung for {timeout:.0f} s:\n"
                                 f"{log.read_text()[-6000:]}") from None
    out = log.read_text()
    return p.returncode, out, parse_recap(out)


def test_sshnpd_role_under_systemd(tmp_path: Path) -> None:
    with build_topology(tmp_path / "topo", n_devices=1, sshd=False) as topo:
        plane = topo.start_plane({"relay-srv": [RELAY], "users-srv": [CLIENT]})
        dev_atsign, dev_name = device_atsign(1), device_name(1)
        cram = generate_cram_secret()  # the device activates itself: keys made on the device
        plane.plane.start_atserver("device-srv", {dev_atsign: cram})
        home = tmp_path / "client-home"
        (home / ".ssh").mkdir(parents=True, mode=0o700)
        identity = keygen(home / ".ssh" / "id_ed25519", "np-systemd-test")
        world = World(topo=topo, plane=plane, base=tmp_path, client_home=home,
                      identity=identity)
        world.start_srvd()

        device = SystemdDevice(tmp_path / "sd", topo.device_ns(1) or "", name=dev_name,
                               authorized_keys=[Path(f"{identity}.pub").read_text()])
        try:
            device.boot()
            # setup phase: the controller may reach the device's sshd (as in test_ansible_e2e)
            topo.run_in(topo.device_ns(1), ["nft", "insert", "rule", "inet", "np_guard",
                                            "input", "ip", "saddr", topo.controller_address,
                                            "tcp", "dport", "22", "accept"])
            _converge_and_check(tmp_path, world, device, cram)
        except BaseException:
            print("---- sshnpd journal ----\n" + device.journal("sshnpd")
                  if device.pid1 else device.boot_log())
            raise
        finally:
            device.close()


def _converge_and_check(base: Path, world: World, device: SystemdDevice, cram: str) -> None:
    topo = world.topo
    collections = base / "collections"
    snapshot_collection(collections)
    known = base / "known_hosts"
    known.write_text(f"{topo.device_address(1)} "
                     + " ".join(Path(f"{ETC_HOST_KEY}.pub").read_text().split()[:2]) + "\n")
    inventory = base / "inventory.yml"
    inventory.write_text(json.dumps({"all": {"children": {"devices": {"hosts": {"sd1": {
        "ansible_host": topo.device_address(1), "ansible_port": 22,
        "ansible_connection": "ssh", "ansible_user": "root",
        "ansible_ssh_private_key_file": str(world.identity),
        "ansible_ssh_common_args": (f"-F /dev/null -o UserKnownHostsFile={known}"
                                    " -o GlobalKnownHostsFile=/dev/null"
                                    " -o IdentitiesOnly=yes -o BatchMode=yes"),
        "ansible_python_interpreter": PY,
        "sshnpd_atsign": device_atsign(1), "sshnpd_managers": [CLIENT],
        "sshnpd_device": device_name(1), "sshnpd_root_domain": world.root,
        "sshnpd_ca_content": world.plane.ca_file.read_text(),
        "sshnpd_keys_method": "activate", "sshnpd_cram_secret": cram,
        "sshnpd_runtime_python": PY,
        "sshnpd_runtime_site_dirs": [sysconfig.get_paths()["purelib"]],
        "sshnpd_runtime_payload_cache": str(base / "payload-cache"),
    }}}}}}, indent=2))
    playbook = base / "sshnpd-systemd.yml"
    playbook.write_text(PLAYBOOK)
    (base / "home").mkdir(exist_ok=True)
    env = ansible_env(base, home=base / "home", collections=collections, cp_dir=base / "cp")
    (base / "cp").mkdir(exist_ok=True)

    rc, out, recap = _playbook(base, env, inventory, playbook)
    assert rc == 0 and recap.get("sd1", {}).get("failed", 1) == 0, out[-8000:]
    # the default service manager resolved to systemd, and the hardened unit runs the daemon
    assert device.is_active("sshnpd") == "active", device.journal("sshnpd")
    unit = device.systemctl("cat", "sshnpd").stdout
    assert "Type=notify" in unit and "ProtectSystem=strict" in unit, unit
    assert device.systemctl("is-enabled", "sshnpd").stdout.strip() == "enabled"

    # a real session through the unit-run daemon (client in the root namespace)
    res = world.sshnp(1, "echo", "through-systemd", "$(hostname)", timeout=90)
    assert res.returncode == 0 and f"through-systemd {device_name(1)}" in res.stdout, (
        res.stdout, res.stderr[-3000:], device.journal("sshnpd"))

    # idempotence: a second run changes nothing and restarts nothing
    pid_before = device.systemctl("show", "-p", "MainPID", "--value", "sshnpd").stdout.strip()
    rc, out, recap = _playbook(base, env, inventory, playbook)
    assert rc == 0 and recap.get("sd1", {}).get("changed") == 0, out[-8000:]
    assert device.systemctl("show", "-p", "MainPID", "--value",
                            "sshnpd").stdout.strip() == pid_before

    # day 2: a restart of the unit keeps a live session (issue 15's rule)
    live = subprocess.Popen(world.sshnp_argv(1, "echo started; sleep 8; echo survived"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=world.client_env())
    try:
        assert live.stdout is not None
        first = live.stdout.readline()
        assert "started" in first, (first, live.stderr.read() if live.poll() is not None else "")
        restart = device.systemctl("restart", "sshnpd")
        assert restart.returncode == 0, restart.stderr + device.journal("sshnpd")
        out_rest, err = live.communicate(timeout=60)
    finally:
        if live.poll() is None:
            live.kill()
            live.wait(10)
    survived = live.returncode == 0 and "survived" in out_rest
    if not survived and "KillMode=process" not in unit:
        # sessions are served inside the daemon's process until issue 15 lands (branch
        # restart15: KillMode=process + session processes); then this branch is dead code
        pytest.xfail("a live session does not survive `systemctl restart sshnpd` yet: the "
                     "unit has no KillMode=process and sessions run in the daemon (issue 15)")
    assert survived, (
        f"the live session died with `systemctl restart sshnpd` (rc={live.returncode}):\n"
        f"{err[-2000:]}\n{device.journal('sshnpd')}")
    assert device.is_active("sshnpd") == "active"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # the restarted daemon serves new sessions again
        res = world.sshnp(1, "echo", "after-restart", timeout=90)
        if res.returncode == 0:
            break
        time.sleep(1)
    assert "after-restart" in res.stdout, (res.stderr[-3000:], device.journal("sshnpd"))
