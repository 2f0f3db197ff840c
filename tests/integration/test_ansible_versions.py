"""The oldest and the newest supported ansible-core, each in its own venv, against a real device.

Users run the collection with ansible-core 2.16 up to 2.21; the test extra pins the one the
rest of the suite uses. Here two more venvs, on the Python each needs on the controller
(2.20+ needs 3.12), are created once under a cache directory keyed by version
(``$NOPORTS_TEST_VENVS``, default ``~/.cache/noports-test-venvs``: reruns reuse them; pip from
the package index on the first run, about 90 s for both, created in parallel):

* the ssh options that ``noports.sshnp.sshnp`` declares (its ``SSH`` doc fragment, adapted to
  the running ansible-core, docs/decisions/0018) are exactly those of that version's
  ``ansible.builtin.ssh``, with the same defaults (``ansible-doc --json`` of both plugins);
* ``ansible -m ping`` and a short playbook (copy, command, assert) reach a real device through
  ``ansible_connection: noports.sshnp.sshnp``: the loopback world of test_inventory_live.py
  (plane, srvd, sshnpd, OpenSSH sshd), the sshnp client of this checkout's venv;
* on 2.16 ``ansible_scp_if_ssh: true`` makes the copy go over scp (it was ignored while the
  fragment gave ``ssh_transfer_method`` 2.17's default ``smart``); on the newest, ``smart``
  starts with sftp.
"""

from __future__ import annotations

import fcntl
import glob
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from test_inventory_live import CLIENT, DEV_A, RELAY, SSHD, Live

from tests.harness.ansible import close_masters, snapshot_collection

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(600),
    pytest.mark.skipif(not Path(SSHD).exists() or not shutil.which("ssh"),
                       reason="OpenSSH sshd/ssh not installed"),
]

PY = sys.executable
# oldest and newest supported ansible-core, and the controller Python each is run on
VERSIONS = {"oldest": ("2.16.19", "3.11"), "newest": ("2.21.5", "3.12")}
CACHE = Path(os.environ.get("NOPORTS_TEST_VENVS",
                            Path.home() / ".cache" / "noports-test-venvs"))


def find_python(minor: str) -> str | None:
    """``python3.X`` on PATH, else a pyenv build of it."""
    found = shutil.which(f"python{minor}")
    if found and subprocess.run([found, "-c", "pass"], capture_output=True).returncode == 0:
        return found
    builds = sorted(glob.glob(str(Path.home() / ".pyenv" / "versions" / f"{minor}.*"
                                  / "bin" / "python3")))
    return builds[-1] if builds else None


def core_venv(version: str, minor: str) -> tuple[Path, float]:
    """``<cache>/ansible-core-<version>-py<minor>``, created once (locked: parallel runs)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    venv = CACHE / f"ansible-core-{version}-py{minor}"
    done = venv / ".noports-complete"
    t0 = time.monotonic()
    with open(CACHE / f"{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            python = find_python(minor)
            if python is None:
                pytest.skip(f"Python {minor} is not installed (ansible-core {version} needs it)")
            shutil.rmtree(venv, ignore_errors=True)
            subprocess.run([python, "-m", "venv", str(venv)], check=True, timeout=120)
            res = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
                                  f"ansible-core=={version}"], capture_output=True, text=True,
                                 timeout=400, check=False)
            assert res.returncode == 0, res.stdout + res.stderr
            done.write_text(version + "\n")
    return venv, time.monotonic() - t0


@pytest.fixture(scope="module")
def venvs() -> dict[str, Path]:
    with ThreadPoolExecutor(len(VERSIONS)) as pool:
        made = dict(zip(VERSIONS, pool.map(lambda vm: core_venv(*vm), VERSIONS.values()),
                        strict=True))
    print("\nansible-core venvs: " + ", ".join(
        f"{VERSIONS[k][0]} (py{VERSIONS[k][1]}) {s:.1f}s" for k, (_v, s) in made.items()))
    return {k: v for k, (v, _s) in made.items()}


def core_env(home: Path, collections: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ANSIBLE_", "PYTHON", "VIRTUAL_ENV"))}
    env.update(HOME=str(home), ANSIBLE_COLLECTIONS_PATH=str(collections), ANSIBLE_NOCOLOR="1",
               ANSIBLE_FORCE_COLOR="0", PYTHONUNBUFFERED="1", **extra)
    return env


def ansible_doc_options(venv: Path, plugin: str, env: dict[str, str]) -> dict[str, dict]:
    res = subprocess.run([str(venv / "bin" / "ansible-doc"), "-t", "connection", plugin,
                          "--json"], capture_output=True, text=True, env=env, timeout=120,
                         check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    return json.loads(res.stdout)[plugin]["doc"]["options"]


@pytest.mark.parametrize("which", list(VERSIONS))
def test_fragment_declares_the_ssh_options_of_each_version(venvs, which, tmp_path) -> None:
    version = VERSIONS[which][0]
    collections = tmp_path / "collections"
    snapshot_collection(collections)
    env = core_env(tmp_path, collections)
    ssh = ansible_doc_options(venvs[which], "ssh", env)
    ours = ansible_doc_options(venvs[which], "noports.sshnp.sshnp", env)
    missing = set(ssh) - set(ours)
    assert not missing, f"ansible-core {version}: ssh options not declared: {sorted(missing)}"
    # everything else we declare is ours (never a stale ssh option of another version)
    own = set(ours) - set(ssh)
    assert all(not name.startswith(("scp", "sftp", "ssh_", "private_key", "password"))
               for name in own), sorted(own)
    assert {"client_atsign", "device_atsign", "relays", "sshnp_executable"} <= own
    differ = {n: (ssh[n].get("default"), ours[n].get("default")) for n in ssh
              if ssh[n].get("default") != ours[n].get("default")}
    assert not differ, f"ansible-core {version}: defaults (ssh, ours) differ: {differ}"
    if which == "oldest":  # the 2.16 shape: scp_if_ssh decides while ssh_transfer_method unset
        assert ours["scp_if_ssh"]["default"] == "smart"
        assert ours["ssh_transfer_method"].get("default") is None
    else:
        assert "scp_if_ssh" not in ours and ours["ssh_transfer_method"]["default"] == "smart"


# ----------------------------------------------------------------------- against a device


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory):
    world = Live(tmp_path_factory.mktemp("versions-live"))
    yield world
    world.stop()


def device_inventory(live: Live, path: Path, **hostvars: object) -> Path:
    """One host, ``alpha`` (device ``alpha`` of @inv_dev_a, a real sshd behind it)."""
    host = {
        "ansible_connection": "noports.sshnp.sshnp",
        "ansible_sshnp_client_atsign": CLIENT, "ansible_sshnp_device_atsign": DEV_A,
        "ansible_sshnp_device": "alpha", "ansible_sshnp_relays": [RELAY],
        "ansible_sshnp_keys_file": str(live.keyfile(CLIENT)),
        "ansible_sshnp_root_domain": live.root, "ansible_sshnp_ca_file": live.ca,
        "ansible_sshnp_executable": str(Path(PY).parent / "sshnp"),
        "ansible_sshnp_daemon_timeout": 8, "ansible_user": live.user,
        "ansible_port": live.sshd_port,
        "ansible_ssh_private_key_file": str(live.identity),
        "ansible_python_interpreter": PY, **hostvars}
    path.write_text(json.dumps({"all": {"hosts": {"alpha": host}}}, indent=2) + "\n")
    return path


PLAYBOOK = """\
- hosts: all
  gather_facts: false
  tasks:
    - ansible.builtin.ping:
    - ansible.builtin.copy:
        content: "hello from ansible-core {{ ansible_version.full }}\\n"
        dest: "{{ work }}/hello.txt"
        mode: "0600"
    - ansible.builtin.command: cat {{ work }}/hello.txt
      register: out
      changed_when: false
    - ansible.builtin.assert:
        that: out.stdout == "hello from ansible-core " ~ ansible_version.full
"""


@pytest.mark.parametrize("which", list(VERSIONS))
def test_ping_and_playbook_through_sshnp(venvs, live: Live, which, tmp_path) -> None:
    version = VERSIONS[which][0]
    bindir = venvs[which] / "bin"
    cp = tmp_path / "cp"
    cp.mkdir()
    env = core_env(live.home, live.collections, ANSIBLE_SSH_CONTROL_PATH_DIR=str(cp),
                   ANSIBLE_LOCAL_TEMP=str(tmp_path / "local"),
                   ANSIBLE_REMOTE_TEMP=str(tmp_path / "remote"))
    try:
        # 2.16: scp_if_ssh is honoured (ssh_transfer_method unset); newest: smart -> sftp first
        extra = {"ansible_scp_if_ssh": True} if which == "oldest" else {}
        inventory = device_inventory(live, tmp_path / "hosts.yml", **extra)
        t0 = time.monotonic()
        ping = subprocess.run([str(bindir / "ansible"), "-i", str(inventory), "all", "-m",
                               "ansible.builtin.ping"], capture_output=True, text=True,
                              env=env, timeout=120, cwd=tmp_path, check=False)
        t_ping = time.monotonic() - t0
        assert ping.returncode == 0, (ping.stdout, ping.stderr, live.logs())
        assert "alpha | SUCCESS" in ping.stdout and '"ping": "pong"' in ping.stdout
        (tmp_path / "play.yml").write_text(PLAYBOOK)
        work = tmp_path / "work"
        work.mkdir()
        t0 = time.monotonic()
        play = subprocess.run([str(bindir / "ansible-playbook"), "-vvv", "-i", str(inventory),
                               "-e", f"work={work}", str(tmp_path / "play.yml")],
                              capture_output=True, text=True, env=env, timeout=180,
                              cwd=tmp_path, check=False)
        t_play = time.monotonic() - t0
        out = play.stdout + play.stderr
        assert play.returncode == 0, out[-6000:]
        assert f"ansible-playbook [core {version}]" in out, out[:400]
        assert "ok=4" in out and "changed=1" in out and "failed=0" in out, out[-2000:]
        assert (work / "hello.txt").read_text() == f"hello from ansible-core {version}\n"
        # which program moved the file: the ssh plugin logs "SSH: EXEC <program> ..."
        if which == "oldest":
            assert "EXEC scp " in out and "EXEC sftp " not in out, out[-6000:]
        else:
            assert "EXEC sftp " in out, out[-6000:]
        # through the plugin's default agent, in this run's control path dir
        assert "sshnp-connect" in out and "ProxyUseFdpass=yes" in out, out[-6000:]
        assert " ready in " in (cp / "sshnp-agent" / "agent.log").read_text()
        print(f"\nansible-core {version}: ping {t_ping:.1f}s, playbook {t_play:.1f}s")
    finally:
        close_masters(cp)
