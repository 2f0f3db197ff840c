#!/usr/bin/env python3
"""sshnp session setup time: ``sshnp ... <cmd>`` start -> first byte of remote output.

Not a test; prints a table. Every component is the real program (tests/integration
noports_harness.py): plane + srvd + sshnpd + OpenSSH sshd, and the client as a fresh
``python -m noports.client.cli`` process per run (what a user or Ansible pays). Side by side,
per tunnel mode, exec mode and ProxyCommand mode (``ssh -o ProxyCommand='sshnp --stdio'``),
next to plain ``ssh`` to the same sshd (from inside the device namespace, or on loopback):
p50/p90 over N runs, interleaved so machine noise hits every case alike.

    .venv/bin/python -m bench.sshnp_setup            # 30 runs per case, loopback
    .venv/bin/python -m bench.sshnp_setup --quick    # 8 runs per case
    .venv/bin/python -m bench.sshnp_setup --netns    # namespaced topology (root)
    .venv/bin/python -m bench.sshnp_setup --runs 12 --agent-only   # plain ssh vs the agent

The ``agent stdio`` cases are a cold ``ssh`` whose ProxyCommand is ``sshnp-connect`` with the
controller agent already up (docs/agent.md): what every host after the first costs.

Target: sshnp p50 <= 0.5 s on loopback (official NoPorts: 3-4 s, docs/reference/noports-protocol.md#session-step-by-step).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
from pathlib import Path

from tests.harness.world import PY, World, noports_world, percentile, run_timed

OFFICIAL_S = (3.0, 4.0)


def agent_ssh_argv(w: World, i: int, mode: str, kh: Path, agent_dir: Path) -> list[str]:
    """``ssh -o ProxyCommand='sshnp-connect ...' -o ProxyUseFdpass=yes``: a cold ssh with the
    agent already running (it is started on demand by the first run, the warm-up)."""
    argv = w.proxy_ssh_argv(i, "echo x", mode=mode, known_hosts=kh)
    client = w.sshnp_argv(i, "--known-hosts", str(kh), mode=mode)[3:]
    k = next(n for n, a in enumerate(argv) if a.startswith("ProxyCommand="))
    argv[k] = "ProxyCommand=" + shlex.join([str(Path(PY).parent / "sshnp-connect"),
                                            "--agent-dir", str(agent_dir),
                                            "--agent-idle", "900", *client])
    argv[k + 1:k + 1] = ["-o", "ProxyUseFdpass=yes"]
    return argv


def stop_agent(agent_dir: Path, env: dict[str, str]) -> None:
    import json
    import signal
    import subprocess
    r = subprocess.run([str(Path(PY).parent / "sshnp-connect"), "--agent-stats",
                        "--agent-dir", str(agent_dir)], capture_output=True, text=True,
                       env=env, timeout=30)
    if r.returncode == 0:
        os.kill(json.loads(r.stdout)["pid"], signal.SIGTERM)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="8 runs per case")
    ap.add_argument("--runs", type=int, help="runs per case (default 30, quick 8)")
    ap.add_argument("--netns", action="store_true",
                    help="network-namespace topology (needs root); default loopback")
    ap.add_argument("--no-proxy", action="store_true", help="skip the ProxyCommand cases")
    ap.add_argument("--no-agent", action="store_true",
                    help="skip the controller agent cases (sshnp-connect, docs/agent.md)")
    ap.add_argument("--agent-only", action="store_true",
                    help="only plain ssh and the agent cases (issue 13's goal: agent stdio "
                    "p50 <= 1.15x plain ssh), a shorter run")
    args = ap.parse_args()
    runs = args.runs or (8 if args.quick else 30)
    if args.netns and os.geteuid() != 0:
        ap.error("--netns needs root")

    with tempfile.TemporaryDirectory(prefix="np-bench-setup-") as tmp, \
            noports_world(Path(tmp), n_devices=1, namespaced=args.netns) as w:
        i = 1
        env = w.client_env()
        kh = Path(tmp) / "proxy_known_hosts"
        cases: dict[str, list[str]] = {"plain ssh (baseline)": w.direct_ssh_argv(i) + ["echo x"]}
        for mode in () if args.agent_only else ("aes", "ssh"):
            cases[f"sshnp exec  {mode}"] = w.sshnp_argv(i, mode=mode) + ["echo x"]
        if not (args.no_proxy or args.agent_only):
            for mode in ("aes", "ssh"):
                cases[f"sshnp stdio {mode}"] = w.proxy_ssh_argv(i, "echo x", mode=mode,
                                                               known_hosts=kh)
        agent_dir = Path(tmp) / "ag"
        if not args.no_agent:  # the agent is started by the warm-up run and stays up
            for mode in ("aes", "ssh"):
                cases[f"agent stdio {mode}"] = agent_ssh_argv(w, i, mode, kh, agent_dir)
        for argv in cases.values():  # warm-up: page cache, pk cache, known_hosts, sshd
            run_timed(argv, env=env, timeout=60).check()
        samples: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(runs):
            for name, argv in cases.items():
                res = run_timed(argv, env=env, timeout=60).check(name)
                assert res.first_output_s is not None, name
                samples[name].append(res.first_output_s)
        topo = "netns (client in root ns, device in its namespace)" if w.namespaced \
            else "loopback"
        print(f"sshnp setup: start -> first remote output, {runs} runs per case "
              f"(interleaved), {topo}, {os.cpu_count()} CPUs, Python "
              f"{sys.version.split()[0]}")
        base = percentile(samples["plain ssh (baseline)"], 50)
        print(f"{'case':<22} {'p50 s':>7} {'p90 s':>7} {'min s':>7} {'x ssh p50':>10} "
              f"{'vs official 3-4 s':>18}")
        for name, v in samples.items():
            p50, p90 = percentile(v, 50), percentile(v, 90)
            off = f"{OFFICIAL_S[0] / p50:.1f}-{OFFICIAL_S[1] / p50:.1f}x faster" \
                if name.startswith(("sshnp", "agent")) else "-"
            print(f"{name:<22} {p50:7.3f} {p90:7.3f} {min(v):7.3f} {p50 / base:10.2f} "
                  f"{off:>18}")
        if not args.no_agent:
            stop_agent(agent_dir, env)
            for mode in ("aes", "ssh"):
                r = percentile(samples[f"agent stdio {mode}"], 50) / base
                print(f"agent stdio {mode}: {r:.2f}x plain ssh at p50 (issue 13 goal <= 1.15x: "
                      f"{'met' if r <= 1.15 else 'NOT met'}); load average "
                      f"{os.getloadavg()[0]:.1f} at the end")
        best = min(percentile(v, 50) for n, v in samples.items() if n.startswith(("sshnp", "agent")))
        worst = max(percentile(v, 50) for n, v in samples.items() if n.startswith(("sshnp", "agent")))
        print(f"target p50 <= 0.500 s: best {best:.3f} s, worst {worst:.3f} s -> "
              f"{'met' if worst <= 0.5 else 'met by some cases' if best <= 0.5 else 'NOT met'}")


if __name__ == "__main__":
    main()
