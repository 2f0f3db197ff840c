#!/usr/bin/env python3
"""Fleet bench: one Ansible playbook over N port-less devices, through sshnp vs plain ssh.

Not a test; prints figures and asserts nothing. Real programs throughout
(tests/integration/fleet_harness.py): N device network namespaces, each with OpenSSH sshd on
its own 127.0.0.1:22 behind an nftables guard (inbound NEW dropped) and an sshnpd; a relay
namespace with redis-server, atdirectory --store redis://, 3 atserver processes (atSigns
sharded round-robin) and 2 srvd; ansible-playbook on the controller (root namespace).

Three cases: plain ssh, sshnp with one ``sshnp --stdio`` per host, and sshnp through the
controller agent (``ansible_sshnp_agent: true``, docs/agent.md).
Two sizes in one invocation (default N = 10, then N = 50): the plane and the first 10
daemons start, every case runs over 10 hosts, the other 40 daemons start, every case runs over
all 50. Per size and case: wall time of ``ansible-playbook`` (4 tasks: ping, command, copy,
shell; forks 20; pipelining; ControlPersist; a fresh ControlPath dir so every run is a cold
start with one connection per host), and, while the ControlPersist masters are still up:
srvd RSS growth per relay session, sshnpd RSS with a live session, RSS of the controller's
``sshnp --stdio`` processes. Plus sshnpd RSS/PSS idle (daemon + its session host), per-atserver
RSS, Redis memory.

The plain-ssh baseline needs a path from the controller to sshds that accept no inbound
connection. It uses ``ProxyCommand ip netns exec <device ns> socat STDIO TCP:127.0.0.1:22``:
OpenSSH on the controller, the device's own loopback sshd, the firewall untouched; the cost
of the path (one ip+socat exec per host, a local pipe) is of the same kind as sshnp's own
ProxyCommand, minus the rendezvous. Both cases use the same sshds, keys, playbook and
ansible.cfg.

    sudo .venv/bin/python -m bench.fleet                 # N = 10 and 50, forks 20
    sudo .venv/bin/python -m bench.fleet --n 100 --small 20 --forks 40
    sudo .venv/bin/python -m bench.fleet --n 20 --small 5 --runs 2

Bounded: every subprocess has a timeout and the whole run a budget (``--budget``, 570 s):
a size that would start after the budget is skipped and said so. Cleans up everything
(ssh masters, daemons, namespaces, links) on success, error, Ctrl-C or SIGTERM.
Needs root for namespaces; without it the topology's loopback fallback runs and the
baseline is direct ssh to 127.0.0.1:port (said in the output).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.harness.fleet import (
    AnsibleRun,
    Fleet,
    client_processes,
    cpu_s,
    fleet,
    pss_kib,
    rss_kib,
    run_playbook,
    ssh_inventory,
    sshnp_inventory,
    stop_control_masters,
)
from tests.harness.plane import cmdlines

from .noports_memory import device_rss_kib, session_host_pids


def settle_rss(pids: list[int], seconds: float = 1.5) -> dict[int, int]:
    """RSS of each pid after ``seconds`` (lets freed arenas and GC settle)."""
    time.sleep(seconds)
    return {p: rss_kib(p) for p in pids}


def mib(kib: float) -> str:
    return f"{kib / 1024:.1f} MiB"


@dataclass
class CaseResult:
    case: str
    n: int
    seconds: list[float] = field(default_factory=list)
    ok_hosts: int = 0
    failed: str = ""
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def t(self) -> float:
        return statistics.median(self.seconds) if self.seconds else float("nan")


def check(run: AnsibleRun, n: int) -> tuple[int, str]:
    recap = run.recap()
    good = sum(1 for r in recap.values()
               if r.get("unreachable", 0) == 0 and r.get("failed", 0) == 0 and r.get("ok") == 4)
    if run.returncode == 0 and good == n:
        return good, ""
    return good, (f"rc={run.returncode}, {good}/{n} hosts ok\n" + run.stdout[-2500:]
                  + "\n" + run.stderr[-1500:])


SRVD_FRESH: dict[str, int] = {}  # relay -> srvd RSS before its first session (KiB)


def run_case(f: Fleet, case: str, devices: list[int], run_no: int, forks: int,
             res: CaseResult, timeout: float) -> None:
    tag = f"{case}-{len(devices)}-{run_no}"
    stop_control_masters(f.base)  # nothing warm from an earlier case
    srvd_before = settle_rss([p.popen.pid for p in f.srvd.values()], 1.0)
    sess_before = {r: f.srvd_sessions(r) for r in f.srvd}
    groups = {"sshnpd": [f.daemons[i].popen.pid for i in devices],
              "atservers": [s.proc.popen.pid for s in f.shards.values()],
              "srvd": [p.popen.pid for p in f.srvd.values()]}
    cpu_before = {g: sum(cpu_s(p) for p in pids) for g, pids in groups.items()}
    if case == "ssh":
        inv = ssh_inventory(f, devices, tag)
    else:
        inv = sshnp_inventory(f, devices, tag, relay_order="spread", relay_timeout=10)
        if case == "agent":  # the per-user controller agent (docs/agent.md)
            inv["all"]["vars"]["ansible_sshnp_agent"] = True
    run = run_playbook(f, tag, inv, forks=forks, timeout=timeout)
    good, err = check(run, len(devices))
    res.seconds.append(run.seconds)
    res.ok_hosts = good
    if err:
        res.failed = err
    if case == "sshnp":
        # measured while the ControlPersist masters still hold one session per host
        pids = [p.popen.pid for p in f.srvd.values()]
        srvd_after = settle_rss(pids, 1.0)
        opened = {r: f.srvd_sessions(r) - sess_before[r] for r in f.srvd}
        per = [(srvd_after[f.srvd[r].popen.pid] - srvd_before[f.srvd[r].popen.pid])
               / opened[r] for r in f.srvd if opened[r] > 0]
        per_fresh = [(srvd_after[f.srvd[r].popen.pid] - SRVD_FRESH.get(r, 0)) / opened[r]
                     for r in f.srvd if opened[r] > 0 and r in SRVD_FRESH]
        n_sess = sum(opened.values())
        res.extra["sessions"] = n_sess
        res.extra["srvd_kib_per_session"] = statistics.mean(per) if per else float("nan")
        res.extra["srvd_kib_per_session_fresh"] = (statistics.mean(per_fresh) if per_fresh
                                                   else float("nan"))
        for g, pids in groups.items():
            if n_sess:
                res.extra[f"cpu_{g}"] = (sum(cpu_s(p) for p in pids) - cpu_before[g]) / n_sess
        live = [device_rss_kib(f.daemons[i].popen.pid) for i in devices]
        res.extra["sshnpd_live_rss"] = statistics.median(live)
        clients = client_processes(f)
        res.extra["clients"] = len(clients)
        res.extra["client_rss"] = (statistics.median([rss_kib(p) for p in clients])
                                   if clients else float("nan"))
        res.extra["client_pss"] = (statistics.median([pss_kib(p) for p in clients])
                                   if clients else float("nan"))
        res.extra["cpu_client"] = (statistics.median([cpu_s(p) for p in clients])
                                   if clients else float("nan"))
    if case == "agent":
        # the agent replaces every per-host process: its whole PSS and CPU, per live host
        # (the connectors have exited; bench/agent_tunnels.py measures their CPU)
        time.sleep(1.0)
        agents = agent_processes(run.cp_dir)
        n = len(devices)
        res.extra["agents"] = len(agents)
        res.extra["clients"] = len(client_processes(f))
        res.extra["agent_pss_per_host"] = sum(pss_kib(p) for p in agents) / n
        res.extra["agent_rss"] = sum(rss_kib(p) for p in agents)
        res.extra["cpu_agent_per_host"] = sum(cpu_s(p) for p in agents) / n
        for pid in agents:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
    stop_control_masters(f.base)


def agent_processes(cp_dir: Path) -> list[int]:
    """The agent serving this run's control dir (``<cp>/sshnp-agent``)."""
    needle = str(cp_dir / "sshnp-agent").encode()
    return [pid for pid, cmd in cmdlines() if b"noports.agent" in cmd and needle in cmd]


def measure_idle(f: Fleet, devices: list[int]) -> dict[str, float]:
    """Per device: the daemon's RSS plus its session host's private pages (shared pages
    once; decision 0032), and the PSS of both."""
    pids = [f.daemons[i].popen.pid for i in devices]
    time.sleep(2.0)
    rss = [device_rss_kib(p) for p in pids]
    pss = [pss_kib(p) + sum(pss_kib(h) for h in session_host_pids(p)) for p in pids]
    out = {"sshnpd_rss_med": statistics.median(rss), "sshnpd_rss_max": max(rss),
           "sshnpd_pss_med": statistics.median(pss), "sshnpd_rss_sum": sum(rss),
           "sshnpd_pss_sum": sum(pss)}
    out["atserver_rss"] = sum(rss_kib(s.proc.popen.pid) for s in f.shards.values())
    out["srvd_rss"] = sum(rss_kib(p.popen.pid) for p in f.srvd.values())
    info = f.plane.redis_cli("INFO", "memory").stdout
    for line in info.splitlines():
        if line.startswith("used_memory:"):
            out["redis_used"] = int(line.split(":")[1]) / 1024
    out["redis_keys"] = int(f.plane.redis_cli("DBSIZE").stdout.strip() or 0)
    return out


CASES = ("ssh", "sshnp", "agent")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=50, help="devices in the big run (50)")
    ap.add_argument("--small", type=int, default=10, help="devices in the small run (10)")
    ap.add_argument("--forks", type=int, default=20, help="Ansible forks (20)")
    ap.add_argument("--shards", type=int, default=3, help="atserver processes (3)")
    ap.add_argument("--relays", type=int, default=2, help="srvd instances (2)")
    ap.add_argument("--runs", type=int, default=1, help="runs per case and size (1; median)")
    ap.add_argument("--budget", type=float, default=570, help="seconds for everything (570)")
    ap.add_argument("--cases", default=",".join(CASES),
                    help=f"comma-separated subset of {','.join(CASES)}")
    args = ap.parse_args()
    if args.n < 1 or not 0 < args.small <= args.n:
        ap.error("need 0 < --small <= --n")
    cases = tuple(c for c in CASES if c in args.cases.split(","))
    t_start = time.monotonic()

    def left() -> float:
        return args.budget - (time.monotonic() - t_start)

    def on_term(signum: int, frame: object) -> None:  # noqa: ARG001
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with it ignored
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 8192)), hard))
    if os.geteuid() != 0:
        print("note: not root -> loopback topology (no namespaces); baseline is direct ssh",
              file=sys.stderr)

    sizes = [args.small, args.n] if args.small != args.n else [args.n]
    results: dict[tuple[str, int], CaseResult] = {}
    idle: dict[int, dict[str, float]] = {}
    timing: dict[str, float] = {}
    skipped: list[str] = []
    base = Path(tempfile.mkdtemp(prefix="npf-"))  # short: ControlPath must fit sun_path
    namespaced = False
    try:
        t0 = time.monotonic()
        print(f"starting: {args.n} device namespaces + sshd, redis, directory, "
              f"{args.shards} atservers, {args.relays} srvd, sshnpd x {sizes[0]} ...",
              file=sys.stderr, flush=True)
        with fleet(base, args.n, n_shards=args.shards, n_relays=args.relays,
                   daemons=range(1, sizes[0] + 1),
                   srvd_args=("--max-sessions-per-atsign", str(4 * args.n + 64))) as f:
            namespaced = f.namespaced
            timing["setup"] = time.monotonic() - t0
            fresh = settle_rss([p.popen.pid for p in f.srvd.values()], 1.0)
            SRVD_FRESH.update({r: fresh[p.popen.pid] for r, p in f.srvd.items()})
            # warm-up (untimed in the table): the first sessions open the atserver-to-
            # atserver connections (one per shard pair, then kept) and warm ansible's own
            # caches; a long-running plane pays this once, not per playbook
            # first contact with each relay alone: concurrent first contacts of one client
            # atSign race on the shared key (tests/integration/test_fleet.py, xfail)
            for r in f.relays:
                f.sshnp(1, "true", relays=[r], relay_timeout=20)
            warm = list(range(1, min(sizes[0], args.shards * args.relays) + 1))
            for case in cases:
                wr = CaseResult(case, len(warm))
                run_case(f, case, warm, 0, args.forks, wr, timeout=120)
                timing[f"warm-up {case} x{len(warm)}"] = wr.t
                if wr.failed:
                    results[(case + " warm-up", len(warm))] = wr
            started = sizes[0]
            for n in sizes:
                if n > started:
                    t1 = time.monotonic()
                    print(f"starting sshnpd {started + 1}..{n} ...", file=sys.stderr,
                          flush=True)
                    f.start_sshnpd(range(started + 1, n + 1))
                    timing[f"daemons {started + 1}..{n}"] = time.monotonic() - t1
                    started = n
                devices = list(range(1, n + 1))
                idle[n] = measure_idle(f, devices)
                for run_no in range(1, args.runs + 1):
                    order = cases if run_no % 2 else cases[::-1]
                    for case in order:
                        # a run over N hosts with forks F: allow 4 s per host-batch + slack
                        need = 30 + 6 * (n / args.forks + 1) * 4
                        if left() < need:
                            skipped.append(f"{case} N={n} run {run_no} (budget)")
                            continue
                        print(f"  {case:<5} N={n} run {run_no} ...", file=sys.stderr,
                              flush=True)
                        res = results.setdefault((case, n), CaseResult(case, n))
                        run_case(f, case, devices, run_no, args.forks, res,
                                 timeout=max(30.0, min(300.0, left() - 20)))
            t_down = time.monotonic()
        timing["teardown"] = time.monotonic() - t_down
    except KeyboardInterrupt:
        print("\ninterrupted: cleaned up (masters, daemons, namespaces)", file=sys.stderr)
        return 130
    finally:
        stop_control_masters(base)
        shutil.rmtree(base, ignore_errors=True)

    report(args, sizes, results, idle, timing, skipped, namespaced,
           time.monotonic() - t_start)
    return 1 if any(r.failed for r in results.values()) else 0


def report(args: argparse.Namespace, sizes: list[int],
           results: dict[tuple[str, int], CaseResult], idle: dict[int, dict[str, float]],
           timing: dict[str, float], skipped: list[str], namespaced: bool,
           total: float) -> None:
    cpus = os.cpu_count()
    print(f"\nFleet bench: {'netns' if namespaced else 'loopback'} topology, {cpus} CPUs, "
          f"Python {sys.version.split()[0]}, forks {args.forks}, {args.shards} atservers, "
          f"{args.relays} srvd, {args.runs} run(s) per case (median)")
    print("playbook: ping + command + copy + shell per host, gather_facts off, pipelining, "
          "ControlPersist, cold ControlPath dir per run")
    if namespaced:
        print("plain-ssh baseline path: ProxyCommand 'ip netns exec <dev ns> socat STDIO "
              "TCP:127.0.0.1:22' (device firewall untouched; same sshd, key, playbook)")
    else:
        print("plain-ssh baseline path: direct ssh to each sshd on 127.0.0.1:<port> "
              "(loopback fallback, not root)")
    print("sshnp: ansible_connection sshnp, relays spread (host i starts at relay i mod R)")
    print()
    hdr = f"{'N':>4} {'plain ssh s':>12} {'sshnp s':>9} {'ratio':>6} {'ssh s/host':>11} " \
          f"{'sshnp s/host':>13} {'sessions':>9} {'agent s':>8} {'ratio':>6}"
    print(hdr)
    print("-" * len(hdr))
    for n in sizes:
        s, p = results.get(("ssh", n)), results.get(("sshnp", n))
        a = results.get(("agent", n))
        ts = s.t if s else float("nan")
        tp = p.t if p else float("nan")
        ta = a.t if a else float("nan")
        sess = int(p.extra.get("sessions", 0)) if p else 0
        print(f"{n:>4} {ts:>12.1f} {tp:>9.1f} {tp / ts:>6.2f} {ts / n:>11.3f} "
              f"{tp / n:>13.3f} {sess:>9} {ta:>8.1f} {ta / ts:>6.2f}")
    if len(sizes) == 2 and all((c, n) in results for c in ("ssh", "sshnp") for n in sizes):
        a, b = sizes
        gs = results[("ssh", b)].t / results[("ssh", a)].t
        gp = results[("sshnp", b)].t / results[("sshnp", a)].t
        extra_a = results[("sshnp", a)].t - results[("ssh", a)].t
        extra_b = results[("sshnp", b)].t - results[("ssh", b)].t
        print(f"growth N={a} -> N={b} (x{b / a:.0f} hosts): plain ssh x{gs:.2f}, sshnp "
              f"x{gp:.2f}; sshnp's extra over ssh {extra_a:.1f}s -> {extra_b:.1f}s "
              f"({(extra_b - extra_a) / (b - a):.3f} s per added host at forks "
              f"{args.forks})")
    print()
    print(f"{'memory':<52} " + " ".join(f"{'N=' + str(n):>12}" for n in sizes))

    def row(label: str, vals: list[str]) -> None:
        print(f"{label:<52} " + " ".join(f"{v:>12}" for v in vals))
    row("sshnpd + session host RSS per device, idle (median)",
        [mib(idle[n]["sshnpd_rss_med"]) for n in sizes])
    row("sshnpd + session host RSS, idle (max)",
        [mib(idle[n]["sshnpd_rss_max"]) for n in sizes])
    row("sshnpd + session host PSS per device, idle (median)",
        [mib(idle[n]["sshnpd_pss_med"]) for n in sizes])
    row("sshnpd + session host RSS, a live session (median)",
        [mib(results[("sshnp", n)].extra.get("sshnpd_live_rss", 0))
         if ("sshnp", n) in results else "-" for n in sizes])
    row("srvd RSS growth per live session (vs before run)",
        [f"{results[('sshnp', n)].extra.get('srvd_kib_per_session', float('nan')):.1f} KiB"
         if ("sshnp", n) in results else "-" for n in sizes])
    row("srvd RSS per live session vs fresh srvd (upper bound)",
        [f"{results[('sshnp', n)].extra.get('srvd_kib_per_session_fresh', float('nan')):.1f}"
         " KiB" if ("sshnp", n) in results else "-" for n in sizes])
    row("controller: sshnp --stdio per host, RSS (median)",
        [mib(results[("sshnp", n)].extra.get("client_rss", 0))
         if ("sshnp", n) in results else "-" for n in sizes])
    row("controller: sshnp --stdio per host, PSS (median)",
        [mib(results[("sshnp", n)].extra.get("client_pss", 0))
         if ("sshnp", n) in results else "-" for n in sizes])
    row("controller: live sshnp --stdio processes",
        [str(int(results[("sshnp", n)].extra.get("clients", 0)))
         if ("sshnp", n) in results else "-" for n in sizes])
    row("controller, agent: agent PSS / live hosts",
        [mib(results[("agent", n)].extra.get("agent_pss_per_host", 0))
         if ("agent", n) in results else "-" for n in sizes])
    row("controller, agent: agents / per-host sshnp processes",
        [f"{int(results[('agent', n)].extra.get('agents', 0))} / "
         f"{int(results[('agent', n)].extra.get('clients', 0))}"
         if ("agent", n) in results else "-" for n in sizes])
    row(f"atserver RSS, all {args.shards} processes",
        [mib(idle[n]["atserver_rss"]) for n in sizes])
    row(f"srvd RSS, all {args.relays}, idle", [mib(idle[n]["srvd_rss"]) for n in sizes])
    row("redis used_memory (keys)",
        [f"{idle[n]['redis_used'] / 1024:.2f}M ({int(idle[n]['redis_keys'])})" for n in sizes])
    print()
    print(f"{'CPU seconds per host (sshnp run, whole playbook)':<52} "
          + " ".join(f"{'N=' + str(n):>12}" for n in sizes))
    row("controller, agent: agent CPU / hosts",
        [f"{results[('agent', n)].extra.get('cpu_agent_per_host', float('nan')):.3f} s"
         if ("agent", n) in results else "-" for n in sizes])
    for key, label in (("cpu_client", "controller: sshnp --stdio client (median)"),
                       ("cpu_sshnpd", "device: sshnpd (mean)"),
                       ("cpu_atservers", "plane: atservers, total / sessions"),
                       ("cpu_srvd", "relay: srvd, total / sessions")):
        row(label, [f"{results[('sshnp', n)].extra.get(key, float('nan')):.3f} s"
                    if ("sshnp", n) in results else "-" for n in sizes])
    print()
    print("wall clock: " + ", ".join(f"{k} {v:.1f}s" for k, v in timing.items())
          + f", total {total:.1f}s")
    for k in skipped:
        print(f"SKIPPED: {k}")
    for r in results.values():
        if r.failed:
            print(f"\nFAILED {r.case} N={r.n}: {r.failed}")


if __name__ == "__main__":
    sys.exit(main())
