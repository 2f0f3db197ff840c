"""A rotated device host key is visible: old and new fingerprints, on the CLI and in Ansible.

Real programs on loopback (test_client_e2e.Env: plane, srvd, sshnpd, OpenSSH sshd): the
device's sshd host key is rotated the way an admin does it (new key file, sshd restarted);
sshnpd reads the new public key and signs it into its next session response; the client
replaces the pin and must say so (``sshnp: warning: ...`` on stderr, even with ``-q``), and
an Ansible run through the ``noports.sshnp.sshnp`` connection plugin shows it as a
``[WARNING]``, once per rendezvous. The expected fingerprints come from ``ssh-keygen -l``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_client_e2e import CLIENT, DEV, DEVICE, RELAY, Env

from tests.harness.ansible import (
    E2E_DIR,
    agent_pids,
    ansible_tool,
    close_masters,
    snapshot_collection,
)
from tests.harness.plane import spawn
from tests.harness.sshd import SSHD

pytestmark = [
    pytest.mark.integration, pytest.mark.timeout(240),
    pytest.mark.skipif(not Path(SSHD).exists() or not shutil.which("ssh")
                       or not shutil.which("ssh-keygen"), reason="OpenSSH not installed"),
]

ALIAS = "device_e2e/box1"


def fingerprint(pub: Path) -> str:
    """``ssh-ed25519 SHA256:...`` as ssh-keygen prints it (the independent oracle)."""
    out = subprocess.run(["ssh-keygen", "-l", "-E", "sha256", "-f", str(pub)],
                         capture_output=True, text=True, check=True, timeout=30).stdout.split()
    return f"ssh-{out[-1].strip('()').lower()} {out[1]}"


def rotate_host_key(env: Env) -> str:
    """New sshd host key, sshd restarted on the same port; returns the new fingerprint."""
    env.sshd.stop()
    key = env.host_pub.with_suffix("")
    key.unlink()
    env.host_pub.unlink()
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
                   check=True, timeout=30)
    p = spawn([SSHD, "-D", "-e", "-f", str(key.parent / "sshd_config")])
    env.procs.append(p)
    p.wait_for(r"Server listening on 127\.0\.0\.1 port", timeout=10)
    env.sshd = p
    return fingerprint(env.host_pub)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    e = Env(tmp_path_factory.mktemp("rot"))
    yield e
    e.stop()


def test_cli_warns_with_old_and_new_fingerprints(env: Env, tmp_path: Path) -> None:
    kh = tmp_path / "known_hosts"
    first = fingerprint(env.host_pub)
    res = env.sshnp("-q", "--known-hosts", str(kh), "echo", "one")
    assert res.returncode == 0 and res.stdout.strip() == "one", res.stderr
    assert "warning" not in res.stderr  # first use: nothing pinned before, nothing to say

    second = rotate_host_key(env)
    assert second != first
    res = env.sshnp("-q", "--known-hosts", str(kh), "echo", "two")
    assert res.returncode == 0 and res.stdout.strip() == "two", res.stderr
    warnings = [ln for ln in res.stderr.splitlines() if ln.startswith("sshnp: warning:")]
    assert warnings == [f"sshnp: warning: host key of {ALIAS} changed: was {first}; now "
                        f"{second} (new key signed by the device's daemon; pin replaced in "
                        f"{kh})"], res.stderr
    assert kh.read_text().split()[1:] == env.host_pub.read_text().split()[:2]

    res = env.sshnp("-q", "--known-hosts", str(kh), "echo", "three")  # same key: silent
    assert res.returncode == 0 and res.stderr == "", res.stderr


PLAYBOOK = [{"name": "two tasks, one rendezvous", "hosts": "box", "gather_facts": False,
             "tasks": [{"ansible.builtin.ping": None}, {"ansible.builtin.ping": None}]}]


def test_ansible_shows_the_rotation_as_a_warning_once(env: Env, tmp_path: Path) -> None:
    cp_dir = Path(env.base) / "cp"
    cp_dir.mkdir(mode=0o700, exist_ok=True)
    collections = tmp_path / "collections"
    snapshot_collection(collections)
    kh = tmp_path / "kh"
    inventory = tmp_path / "inventory.yml"
    inventory.write_text(json.dumps({"all": {"hosts": {"box": {
        "ansible_connection": "noports.sshnp.sshnp", "ansible_user": env.user,
        "ansible_port": env.sshd_port, "ansible_ssh_private_key_file": str(env.identity),
        "ansible_python_interpreter": sys.executable,
        "ansible_sshnp_client_atsign": CLIENT, "ansible_sshnp_device_atsign": DEVICE,
        "ansible_sshnp_device": DEV, "ansible_sshnp_relays": RELAY,
        "ansible_sshnp_root_domain": env.root, "ansible_sshnp_ca_file": env.ca,
        "ansible_sshnp_keys_file": str(env.keyfile(CLIENT)),
        "ansible_sshnp_known_hosts_file": str(kh)}}}}))
    playbook = tmp_path / "ping.yml"
    playbook.write_text(json.dumps(PLAYBOOK))
    run_env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    run_env.update({"HOME": str(env.home), "ANSIBLE_CONFIG": str(E2E_DIR / "ansible.cfg"),
                    "NOPORTS_COLLECTION_ROOT": str(collections),
                    "ANSIBLE_SSH_CONTROL_PATH_DIR": str(cp_dir),
                    "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0",
                    "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"})

    def play() -> str:
        out = subprocess.run([ansible_tool("ansible-playbook"), "-i", str(inventory),
                              str(playbook)], capture_output=True, text=True, timeout=150,
                             env=run_env, stdin=subprocess.DEVNULL)
        # the next run makes a new rendezvous, through the same (plugin default) agent
        close_masters(cp_dir, stop_agent=False)
        text = out.stdout + out.stderr
        assert out.returncode == 0 and "ok=2" in text, text[-4000:]
        return text

    before = fingerprint(env.host_pub)
    try:
        text = play()  # pins the current key: first use, no warning
        assert "host key of" not in text, text[-3000:]
        agents = agent_pids(cp_dir)
        assert len(agents) == 1, agents
        after = rotate_host_key(env)
        text = play()
        assert agent_pids(cp_dir) == agents  # the rotation surfaced through a warm agent
    finally:
        close_masters(cp_dir)
    expected = (f"[WARNING]: sshnp: host key of {ALIAS} changed: was {before}; now {after} "
                f"(new key signed by the device's daemon; pin replaced in {kh}) (host box)")
    flat = " ".join(text.split())  # Ansible wraps long warnings
    assert flat.count(" ".join(expected.split())) == 1, text[-3000:]  # once, not per task
    assert flat.count("host key of") == 1, text[-3000:]
    # (the same key again says nothing: test_cli_warns_with_old_and_new_fingerprints)
