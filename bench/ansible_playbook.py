#!/usr/bin/env python3
"""Ansible over sshnp vs plain ssh, to the same sshd, side by side in one run.

Not a test; prints a table. The world is tests/harness/world.py's (network
namespaces, root): a real plane + srvd in the relay namespace, one namespace per device with
OpenSSH sshd on its own 127.0.0.1:22 behind a drop-all firewall, and sshnpd. Two inventories
reach the SAME sshd of each device:

* sshnp:  ``ansible_connection: sshnp`` (short name; ProxyCommand ``sshnp --stdio``, one
  rendezvous per host per run through the relay);
* ssh:    ``ansible_connection: ssh`` with
  ``ProxyCommand="ip netns exec <device ns> socat - TCP:127.0.0.1:22"`` (the baseline: no
  relay, no control plane).

Both use the ssh plugin's ControlMaster/ControlPersist and pipelining; every measured run
starts with no master (so each sshnp run pays its rendezvous), after a warm-up run of each
kind. Scenarios:

* one:    1 host x 100 tasks            target sshnp <= 1.10 x ssh
* fleet:  20 hosts x 20 tasks, forks 20  target sshnp <= 1.25 x ssh

    .venv/bin/python -m bench.ansible_playbook            # both scenarios, 2 runs each (ABBA)
    .venv/bin/python -m bench.ansible_playbook --quick    # 1 x 30 and 5 x 10, 1 run (~2 min)
    .venv/bin/python -m bench.ansible_playbook --runs 1   # one run per case

Runtime is bounded (``--budget``, 570 s by default: a run that would overshoot is skipped and
reported); Ctrl-C or SIGTERM stops ansible-playbook, closes the ssh masters and removes the
namespaces.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.harness.ansible import (
    E2E_DIR,
    ansible_tool,
    close_masters,
    parse_recap,
    snapshot_collection,
    write_inventory,
)
from tests.harness.world import CLIENT, RELAY, device_atsign, device_name, noports_world

ROOT = Path(__file__).resolve().parents[1]

TARGETS = {"one": 1.10, "fleet": 1.25}
SOCAT = "/usr/bin/socat"


@dataclass
class Result:
    seconds: float
    rc: int
    rendezvous: int
    tasks_ok: int
    note: str = ""


@dataclass
class Scenario:
    key: str
    hosts: int
    tasks: int
    forks: int
    results: dict[str, list[Result]] = field(default_factory=lambda: {"ssh": [], "sshnp": []})

    @property
    def label(self) -> str:
        return f"{self.hosts} host{'s' if self.hosts > 1 else ''} x {self.tasks} tasks" + (
            f", forks {self.forks}" if self.hosts > 1 else "")


class Bench:
    def __init__(self, world, base: Path) -> None:  # noqa: ANN001 - tests.harness.world.World
        self.w = world
        self.base = base
        self.home = base / "ansible-home"
        (self.home / ".ssh").mkdir(parents=True, exist_ok=True, mode=0o700)
        self.collections = base / "collections"
        snapshot_collection(self.collections)
        self.known_hosts = base / "baseline_known_hosts"
        self.known_hosts.write_text("".join(
            f"bench-{device_name(d.index)} "
            f"{' '.join(Path(f'{d.host_keys[0]}.pub').read_text().split()[:2])}\n"
            for d in world.topo.devices))
        self.run_no = 0
        self.proc: subprocess.Popen | None = None

    # -- inventories -------------------------------------------------------------------------
    def inventory(self, kind: str, n_hosts: int) -> Path:
        w = self.w
        common = {"ansible_user": w.device(1).ssh_user,
                  "ansible_ssh_private_key_file": str(w.identity),
                  "ansible_python_interpreter": "/usr/bin/python3",
                  "ansible_pipelining": True}
        hosts: dict[str, dict] = {}
        for i in range(1, n_hosts + 1):
            dev = w.device(i)
            if kind == "sshnp":
                hosts[f"dev{i}"] = {"ansible_sshnp_device_atsign": device_atsign(i),
                                    "ansible_sshnp_device": device_name(i),
                                    "ansible_port": dev.ssh_port}
            else:
                proxy = f"ip netns exec {dev.ns} {SOCAT} - TCP:127.0.0.1:{dev.ssh_port}"
                hosts[f"dev{i}"] = {
                    "ansible_host": f"bench-{device_name(i)}",  # distinct ControlPath per host
                    "ansible_ssh_common_args": (
                        f'-o ProxyCommand="{proxy}" -o UserKnownHostsFile={self.known_hosts}'
                        " -o GlobalKnownHostsFile=/dev/null -o IdentitiesOnly=yes")}
        if kind == "sshnp":
            common.update({"ansible_connection": "sshnp",
                           "ansible_sshnp_client_atsign": CLIENT,
                           "ansible_sshnp_relays": RELAY,
                           "ansible_sshnp_keys_file": str(w.keyfile(CLIENT)),
                           "ansible_sshnp_root_domain": w.root,
                           "ansible_sshnp_ca_file": w.ca})
        else:
            common["ansible_connection"] = "ssh"
        inv = {"all": {"children": {"bench": {"vars": common, "hosts": hosts}}}}
        return write_inventory(self.base / f"inventory-{kind}-{n_hosts}.yml", inv)

    def playbook(self, tasks: int) -> Path:
        import jinja2
        path = self.base / f"bench-{tasks}.yml"
        if not path.exists():
            tpl = (E2E_DIR / "templates" / "bench_playbook.yml.j2").read_text()
            path.write_text(jinja2.Template(tpl, keep_trailing_newline=True).render(tasks=tasks))
        return path

    # -- one run -----------------------------------------------------------------------------
    def env(self, cp_dir: Path) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
        env.update({
            "HOME": str(self.home), "ANSIBLE_CONFIG": str(E2E_DIR / "ansible.cfg"),
            "NOPORTS_COLLECTION_ROOT": str(self.collections),
            "ANSIBLE_SSH_CONTROL_PATH_DIR": str(cp_dir),
            "ANSIBLE_LOCAL_TEMP": str(self.base / "ansible-local"),
            "ANSIBLE_REMOTE_TEMP": str(self.base / "ansible-remote"),
            "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0",
            "ANSIBLE_STDOUT_CALLBACK": "ansible.builtin.default",
            "ANSIBLE_DISPLAY_OK_HOSTS": "0", "ANSIBLE_DISPLAY_SKIPPED_HOSTS": "0",
        })
        env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}"
        return env

    def srvd_sessions(self) -> int:
        assert self.w.srvd is not None
        return sum(1 for ln in list(self.w.srvd.lines) if " opened for " in ln)

    def run(self, kind: str, n_hosts: int, tasks: int, forks: int, timeout: float) -> Result:
        self.run_no += 1
        cp_dir = self.base / "cp" / f"{self.run_no}"
        cp_dir.mkdir(parents=True, mode=0o700)
        argv = [ansible_tool("ansible-playbook"), "-i", str(self.inventory(kind, n_hosts)),
                "-f", str(forks), str(self.playbook(tasks))]
        before = self.srvd_sessions()
        t0 = time.monotonic()
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=self.env(cp_dir), cwd=str(E2E_DIR))
        try:
            out, _ = self.proc.communicate(timeout=timeout)
            note = ""
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
            note = f"timed out after {timeout:.0f}s"
        finally:
            seconds = time.monotonic() - t0
            rc = self.proc.returncode
            self.proc = None
            close_masters(cp_dir)  # the next run starts without a master (and a rendezvous)
        time.sleep(0.2)  # srvd's log line of the last session is written before the reply
        recap = parse_recap(out)
        ok = sum(r.get("ok", 0) for r in recap.values())
        bad = {h: r for h, r in recap.items() if r.get("failed") or r.get("unreachable")}
        if rc != 0 or bad:
            note = note or f"rc={rc} {bad}"
            sys.stderr.write(out[-4000:] + "\n")
            for log in sorted(cp_dir.glob("*.log")):  # the sshnp client's stderr per tunnel
                sys.stderr.write(f"--- {log.name}\n{log.read_text(errors='replace')[-2000:]}\n")
        return Result(seconds, rc if rc is not None else -1, self.srvd_sessions() - before, ok,
                      note)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        for d in sorted((self.base / "cp").glob("*")):
            close_masters(d, timeout=5)


def _fmt(res: list[Result]) -> tuple[str, float | None]:
    good = [r for r in res if not r.note]
    if not good:
        return ("; ".join(r.note for r in res) or "not run"), None
    best = min(good, key=lambda r: r.seconds)
    runs = " ".join(f"{r.seconds:.1f}" + ("!" if r.note else "") for r in res)  # ! = failed
    return f"{best.seconds:7.2f}  (runs: {runs}; rendezvous {best.rendezvous}, ok {best.tasks_ok})", \
        best.seconds


def measure(bench: Bench, scenarios: list[Scenario], fleet: int, args: argparse.Namespace,
            deadline: float) -> None:
    # warm-up: bytecode, page cache, the client's key caches, known_hosts. sshnp to ONE host
    # first: concurrent first contacts of a fresh client atSign race to create its shared key
    # with the relay (see bench/README.md, "Ansible"); a user's fleet is past that point.
    for kind, n in (("ssh", fleet), ("sshnp", 1), ("sshnp", fleet)):
        w = bench.run(kind, n, 1, args.forks, max(30.0, deadline - time.monotonic()))
        print(f"warm-up {kind:5} {n} host(s) x 1 task: {w.seconds:.1f}s rendezvous "
              f"{w.rendezvous} {w.note}", flush=True)
    for sc in scenarios:
        for k in range(args.runs):
            # interleaved ABBA (ssh, sshnp, sshnp, ssh, ...) so a drift in machine load hits
            # both kinds alike
            for kind in (("ssh", "sshnp") if k % 2 == 0 else ("sshnp", "ssh")):
                left = deadline - time.monotonic()
                if left < 20:
                    sc.results[kind].append(Result(0, -1, 0, 0, "skipped: budget"))
                    continue
                r = bench.run(kind, sc.hosts, sc.tasks, sc.forks, left)
                sc.results[kind].append(r)
                print(f"{sc.label:34} {kind:5} {r.seconds:6.1f}s rendezvous "
                      f"{r.rendezvous} {r.note}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 x 30 tasks and 5 hosts x 10 tasks")
    ap.add_argument("--runs", type=int, help="runs per case, ABBA order; the min is reported "
                    "(default 2, quick 1)")
    ap.add_argument("--hosts", type=int, help="fleet size (default 20, quick 5)")
    ap.add_argument("--forks", type=int, default=20)
    ap.add_argument("--budget", type=float, default=570.0,
                    help="seconds for the whole bench, setup included (default 570); a run "
                    "that would start with less than 20 s left is skipped")
    args = ap.parse_args()
    if os.geteuid() != 0:
        ap.error("needs root (network namespaces)")
    for tool in (SOCAT, ansible_tool("ansible-playbook")):
        if not Path(tool).exists():
            ap.error(f"{tool} is not installed")
    args.runs = args.runs or (1 if args.quick else 2)
    deadline = time.monotonic() + args.budget
    fleet = args.hosts or (5 if args.quick else 20)
    scenarios = [Scenario("one", 1, 30 if args.quick else 100, 1),
                 Scenario("fleet", fleet, 10 if args.quick else 20, args.forks)]

    def on_term(signum, frame):  # noqa: ANN001, ARG001
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    t_setup = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="np-bench-ansible-") as tmp, \
                noports_world(Path(tmp) / "world", n_devices=fleet, namespaced=True) as world:
            bench = Bench(world, Path(tmp))
            try:
                print(f"world: {fleet} device namespaces, plane + srvd + {fleet} sshnpd up in "
                      f"{time.monotonic() - t_setup:.1f}s", flush=True)
                measure(bench, scenarios, fleet, args, deadline)
            finally:
                bench.stop()  # masters (and their tunnels) before the namespaces go
    except KeyboardInterrupt:
        print("\ninterrupted: ansible-playbook, ssh masters and namespaces stopped",
              file=sys.stderr)
        return 130

    print("\nAnsible over sshnp vs plain ssh (same sshd; min of runs; seconds)")
    print(f"{'scenario':34} {'ssh (ip netns exec socat)':48} {'sshnp':48} ratio target")
    for sc in scenarios:
        s_txt, s = _fmt(sc.results["ssh"])
        n_txt, n = _fmt(sc.results["sshnp"])
        ratio = f"{n / s:5.2f}x" if s and n else "  n/a"
        verdict = ("ok" if s and n and n / s <= TARGETS[sc.key] else "MISSED") if s and n else ""
        print(f"{sc.label:34} {s_txt:48} {n_txt:48} {ratio} <= {TARGETS[sc.key]:.2f}x {verdict}")
    print(f"\ntotal {time.monotonic() - t_setup:.0f}s; rendezvous = srvd 'session ... opened' "
          "lines during the run (sshnp: expect one per host; ssh: 0)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
