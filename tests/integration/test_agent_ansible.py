"""The controller agent under a real ansible-playbook (docs/agent.md; issue 13 points 2 and 4).

One fleet (tests/harness/fleet.py: port-less devices in their own namespaces, sshnpd, a Redis
directory, one atserver process, two srvd; relay 1 killed so every session falls back to
relay 2), then:

* a play over every device with ``ansible_sshnp_agent: true`` succeeds on each device; while
  the ControlPersist masters live there is ONE agent process and no per-host sshnp process,
  the client's atServer saw exactly ONE PKAM login of the client atSign for the whole play
  and the agent holds exactly one TCP connection to it (commands and the monitor share it,
  decision 0031; the per-process design makes two logins and two connections per host);
  when the masters are gone the agent exits after its idle time and removes its socket;
* with the agent directory unusable (mode 0755: not private) the same play (over two of the
  devices) still succeeds, through one standalone client per host, and Ansible shows the
  connector's warning.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.fleet import (
    CLIENT,
    PY,
    REDIS_CLI,
    REDIS_SERVER,
    Fleet,
    client_processes,
    control_sockets,
    device_name,
    fleet,
    relay_atsign,
    run_playbook,
    sshnp_inventory,
)
from tests.harness.plane import cmdlines
from tests.harness.topology import SSHD

N = 3
DEVICES = list(range(1, N + 1))
R1, R2 = relay_atsign(1), relay_atsign(2)
IDLE_S = 3
FALLBACK = DEVICES[:2]

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(300),
    pytest.mark.skipif(not (shutil.which("ssh") and Path(SSHD).exists()),
                       reason="OpenSSH not installed"),
    pytest.mark.skipif(not (Path(REDIS_SERVER).exists() and Path(REDIS_CLI).exists()),
                       reason="redis-server / redis-cli not installed"),
    pytest.mark.skipif(not (Path(PY).parent / "ansible-playbook").exists(),
                       reason="ansible-core not installed"),
]


@pytest.fixture(scope="module")
def fl(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    with fleet(tmp_path_factory.mktemp("agent"), N, n_shards=1, n_relays=2) as f:
        f.srvd[R1].kill9()  # relay fallback must work through the agent as it does without
        yield f


def _agent_inventory(f: Fleet, run: str, devices: list[int] = DEVICES) -> dict:
    inv = sshnp_inventory(f, devices, run, relay_timeout=5)
    inv["all"]["vars"]["ansible_sshnp_agent"] = True
    inv["all"]["vars"]["ansible_sshnp_extra_args"] = f"--agent-idle {IDLE_S}"
    return inv


def _check_play(f: Fleet, run, name: str,  # noqa: ANN001 - AnsibleRun
                devices: list[int] = DEVICES) -> None:
    assert run.returncode == 0, f"rc={run.returncode}\n{run.stdout[-4000:]}\n{run.stderr[-3000:]}"
    recap = run.recap()
    assert set(recap) == {device_name(i) for i in devices}, run.stdout[-3000:]
    for host, r in recap.items():
        assert r.get("unreachable", 0) == 0 and r.get("failed", 0) == 0 and r.get("ok") == 4, \
            (host, r)
    for i in devices:  # every task ran on the device it was meant for
        assert (f.device(i).base / f"where-{name}.txt").read_text().strip() == f.where(i)


def _agents(cp_dir: Path) -> list[int]:
    needle = str(cp_dir / "sshnp-agent").encode()
    return [pid for pid, cmd in cmdlines() if b"noports.agent" in cmd and needle in cmd]


def _connectors(f: Fleet) -> list[int]:
    keys = str(f.keyfile(CLIENT)).encode()
    return [pid for pid, cmd in cmdlines() if b"sshnp-connect" in cmd and keys in cmd]


def _logins(f: Fleet, since: int) -> int:
    shard = f.shards[f.shard_of[CLIENT]]
    return sum(1 for ln in shard.proc.lines[since:] if f"{CLIENT}: pkam login" in ln)


def _connections(pid: int, port: int) -> int:
    """Established TCP connections of process `pid` to `port` (its /proc, its netns)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    n = 0
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for row in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                f = row.split()
                if f[3] == "01" and int(f[2].rsplit(":", 1)[1], 16) == port and f[9] in inodes:
                    n += 1
    return n


def test_play_through_one_agent_one_login_no_process_per_host_then_idle_exit(fl: Fleet
                                                                             ) -> None:
    shard = fl.shards[fl.shard_of[CLIENT]]
    mark = len(shard.proc.lines)
    sessions = fl.srvd_sessions(R2)
    run = run_playbook(fl, "agent", _agent_inventory(fl, "agent"), forks=N)
    _check_play(fl, run, "agent")
    assert fl.srvd_sessions(R2) - sessions == N  # one rendezvous per host, via relay 2
    # while the masters live: one agent, no sshnp process per host, one login per atSign
    assert len(control_sockets(run.cp_dir)) == N
    agents = _agents(run.cp_dir)
    assert len(agents) == 1, agents
    assert client_processes(fl) == [] and _connectors(fl) == []
    logins = _logins(fl, mark)
    assert logins == 1, f"{logins} PKAM logins of {CLIENT} for {N} hosts"
    port = fl.shards[fl.shard_of[CLIENT]].ports[CLIENT.lower()]
    assert _connections(agents[0], port) == 1
    stats = subprocess.run([str(Path(PY).parent / "sshnp-connect"), "--agent-stats",
                            "--agent-dir", str(run.cp_dir / "sshnp-agent")],
                           capture_output=True, text=True, timeout=30, env=fl.client_env())
    assert stats.returncode == 0, stats.stderr
    got = json.loads(stats.stdout)
    assert (got["pid"], got["tunnels"], got["planes"], got["logins"]) == (agents[0], N, 1, 1)
    # masters gone: the agent exits after its idle time and takes its socket with it
    for sock in control_sockets(run.cp_dir):
        subprocess.run(["ssh", "-o", f"ControlPath={sock}", "-O", "exit", "x"],
                       capture_output=True, timeout=10, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + IDLE_S + 30
    while _agents(run.cp_dir) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = _agents(run.cp_dir)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, "the agent did not exit when idle"
    assert not (run.cp_dir / "sshnp-agent" / "agent.sock").exists()


def test_unusable_agent_dir_falls_back_to_standalone_with_a_warning(fl: Fleet) -> None:
    agent_dir = fl.base / "cp" / "fallback" / "sshnp-agent"
    agent_dir.mkdir(parents=True, mode=0o755)
    agent_dir.chmod(0o755)  # not private: the connector must refuse it
    sessions = fl.srvd_sessions(R2)
    inv = _agent_inventory(fl, "fallback", FALLBACK)
    for hv in inv["all"]["hosts"].values():
        hv["ansible_sshnp_relays"] = R2  # relay fallback was shown above; keep this one short
    run = run_playbook(fl, "fallback", inv, forks=N)
    _check_play(fl, run, "fallback", FALLBACK)
    assert fl.srvd_sessions(R2) - sessions == len(FALLBACK)
    assert "the sshnp agent is not available" in run.stdout + run.stderr, run.stderr[-3000:]
    assert "lets others in" in run.stdout + run.stderr
    assert _agents(run.cp_dir) == []
    assert len(client_processes(fl)) == len(FALLBACK)  # one sshnp per live master
