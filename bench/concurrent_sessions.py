#!/usr/bin/env python3
"""Concurrent sessions bench: N ``sshnp`` at once from one controller through one srvd,
next to N plain ssh at once to the same sshds.

Not a test; prints figures and asserts nothing. Real programs throughout
(tests/integration/fleet_harness.py): D device network namespaces (OpenSSH sshd on each
device's own 127.0.0.1:22 behind an nftables guard, one sshnpd each), a relay namespace with
redis-server, atdirectory --store redis://, 3 atserver shards and ONE srvd; the controller
(root namespace) starts N ``sshnp ... echo tok`` processes at once, sessions spread
round-robin over the devices. The client uses its default timeouts (what a user gets);
clients of both cases run at nice 19 (test_load_sessions.CLIENT_NICE: on one machine, 200
clients at nice 0 would starve the few server processes, which in a deployment run
elsewhere).

Printed per case: successes, p50/p99 time from process start to exit (setup + the ssh
login + the remote echo) of the successful ones, wall time, and the most common failure
messages (the limiting resource: which part refused or timed out, as the user saw it).
The baseline is N plain ssh at once to the same sshds, ProxyCommand
``ip netns exec <ns> socat STDIO TCP:127.0.0.1:22`` (no rendezvous, no plane).

    sudo .venv/bin/python -m bench.concurrent_sessions                  # N = 200, D = 20
    sudo .venv/bin/python -m bench.concurrent_sessions --n 100 --devices 10
    sudo .venv/bin/python -m bench.concurrent_sessions --directory-flags=""   # dir defaults
    sudo .venv/bin/python -m bench.concurrent_sessions --srvd-flags="--max-sessions-per-atsign 64"

Without root the topology's loopback fallback runs (said in the output).
"""

from __future__ import annotations

import argparse
import os
import resource
import shlex
import sys
import tempfile
import time
from pathlib import Path

from tests.harness.fleet import Fleet, cpu_s, fleet
from tests.integration.test_load_sessions import (
    DIRECTORY_FLAGS,
    LoadResult,
    directory_flags,
    report,
    run_plain_ssh,
    run_sshnp,
)


def components(f: Fleet) -> dict[str, list[int]]:
    """Server-side processes by role (pids), for CPU accounting."""
    d = f.plane.plane.directory
    groups = {"atdirectory": [d.proc.popen.pid] if d is not None else [],
              "srvd": [p.popen.pid for p in f.srvd.values()],
              "sshnpd (all)": [p.popen.pid for p in f.daemons.values()]}
    for name, srv in f.shards.items():
        who = "client+" if f.shard_of.get("@np_fleet_client") == name else ""
        groups[f"atserver {name} ({who}{len([a for a, s in f.shard_of.items() if s == name])}"
               " atSigns)"] = [srv.proc.popen.pid]
    return groups


def cpu_usage(f: Fleet, before: dict[str, float], children_before: float
              ) -> dict[str, float]:
    """CPU seconds each component used since ``snapshot``; clients under their own key."""
    used = {name: sum(cpu_s(p) for p in pids) - before[name]
            for name, pids in components(f).items()}
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    used[CLIENTS] = kids.ru_utime + kids.ru_stime - children_before
    return used


CLIENTS = "clients (sshnp/ssh processes, reaped)"


def cpu_table(used: dict[str, float], wall: float) -> str:
    """CPU seconds each component used during a case, and as a share of one CPU over the
    wall time: a single-process server near 100% is the limiting resource."""
    lines = [f"  {'component':<40}{'CPU s':>8}{'% of 1 CPU':>12}"]
    for name, sec in used.items():
        lines.append(f"  {name:<40}{sec:>8.1f}{100 * sec / wall:>11.0f}%")
    return "\n".join(lines)


def limiting_resource(res: LoadResult, used: dict[str, float], wall: float) -> str:
    """One line naming what limited the case: the refusing part when sessions failed (the
    user's message names it), else the busiest one-process server, else the CPUs."""
    failures = res.failures()
    if failures:
        msg, count = failures.most_common(1)[0]
        return (f"{sum(failures.values())} failures (what the users read, above), most often "
                f"({count}): {msg}; clients got {100 * used[CLIENTS] / wall:.0f}% of one CPU")
    cpus = os.cpu_count() or 1
    total = sum(used.values())
    name, sec = max(((n, s) for n, s in used.items() if n != CLIENTS
                     and not n.startswith("sshnpd")), key=lambda x: x[1], default=("-", 0.0))
    if sec / wall > 0.8:
        return f"{name}: {100 * sec / wall:.0f}% of one CPU (a one-process server saturated)"
    load = os.getloadavg()[0]
    return (f"CPU: the case used {total:.0f} CPU s in {wall:.0f} s on {cpus} CPUs "
            f"({100 * total / (wall * cpus):.0f}% of the machine; load average {load:.1f}), "
            f"{100 * used[CLIENTS] / max(total, 1e-9):.0f}% of it the clients; busiest "
            f"server {name} at {100 * sec / wall:.0f}% of one CPU")


def snapshot(f: Fleet) -> tuple[dict[str, float], float]:
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ({n: sum(cpu_s(p) for p in pids) for n, pids in components(f).items()},
            kids.ru_utime + kids.ru_stime)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=200, help="concurrent sessions (200)")
    ap.add_argument("--devices", type=int, default=20, help="devices (20)")
    ap.add_argument("--shards", type=int, default=3, help="atserver processes (3)")
    ap.add_argument("--directory-flags", default=shlex.join(DIRECTORY_FLAGS),
                    help="extra 'atdirectory serve' flags (default: %(default)r)")
    ap.add_argument("--srvd-flags", default="", help="extra srvd flags")
    ap.add_argument("--no-baseline", action="store_true", help="skip the plain ssh case")
    ap.add_argument("--timeout", type=float, default=300, help="per case (300 s)")
    args = ap.parse_args()

    print(f"concurrent sessions: N={args.n} over {args.devices} devices, 1 srvd, "
          f"{args.shards} atserver shards, {os.cpu_count()} CPUs, load "
          f"{os.getloadavg()[0]:.1f}")
    print(f"atdirectory flags: {args.directory_flags or '(defaults)'}; "
          f"srvd flags: {args.srvd_flags or '(defaults)'}")
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="np-conc-") as d, \
            directory_flags(*shlex.split(args.directory_flags)), \
            fleet(Path(d), args.devices, n_shards=args.shards, n_relays=1,
                  srvd_args=shlex.split(args.srvd_flags)) as f:
        print(f"setup {time.monotonic() - t0:.1f}s "
              f"({'network namespaces' if f.namespaced else 'loopback fallback'})")
        cpu = []
        before = snapshot(f)
        results = [run_sshnp(f, args.n, timeout=args.timeout)]
        cpu.append(("sshnp", cpu_usage(f, *before)))
        if not args.no_baseline:
            before = snapshot(f)
            results.append(run_plain_ssh(f, args.n, timeout=args.timeout))
            cpu.append(("ssh", cpu_usage(f, *before)))
        srvd = f.srvd[f.relays[0]]
        refused = [ln for ln in srvd.lines if "refused" in ln]
        print(report(results, args.n))
        print(f"srvd: {f.srvd_sessions(f.relays[0])} sessions opened, "
              f"{len(refused)} refusals logged")
        for ln in refused[:3]:
            print("  " + ln[-200:])
        for (case, used), res in zip(cpu, results, strict=True):
            print(f"CPU during the {case} case:")
            print(cpu_table(used, res.wall))
        for (case, used), res in zip(cpu, results, strict=True):
            print(f"limiting resource ({case}): {limiting_resource(res, used, res.wall)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
