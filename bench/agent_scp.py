#!/usr/bin/env python3
"""20 concurrent scp transfers: through the controller agent vs one sshnp per transfer.

Not a test; prints figures side by side and asserts nothing. Real programs
(tests/harness/world.py): plane, srvd, ``--devices`` devices with sshd and sshnpd; OpenSSH
``scp`` copies a random file to ``/dev/null`` on a device, ``--concurrent`` at once spread over
the devices, each with its own tunnel:

* ``per-process``: ``-o ProxyCommand='sshnp --stdio ...'`` (one client process per transfer);
* ``agent``: ``-o ProxyCommand='sshnp-connect ...' -o ProxyUseFdpass=yes`` (one agent pumps
  and encrypts every transfer in one event loop; started by the warm-up, kept up).

Per case: aggregate throughput (bytes of all transfers / wall time of the batch, set-up
included) and, while the batch runs, the time of a small ``ssh ... true`` through the same
design to another device (does one busy host stall the others?). Cases alternate over runs.

    .venv/bin/python -m bench.agent_scp                   # 20 x 64 MiB, 2 devices, 2 runs
    .venv/bin/python -m bench.agent_scp --mib 16 --runs 1
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.scp_throughput import MIB, make_file
from bench.sshnp_setup import stop_agent
from tests.harness.world import PY, World, noports_world, run_timed

CONNECT = str(Path(PY).parent / "sshnp-connect")


def options(w: World, i: int, kh: Path, agent_dir: Path | None) -> list[str]:
    opts = w.proxy_options(i, known_hosts=kh)
    if agent_dir is not None:
        client = w.sshnp_argv(i, "--known-hosts", str(kh))[3:]
        k = opts.index("-o") + 1
        opts[k] = "ProxyCommand=" + shlex.join([CONNECT, "--agent-dir", str(agent_dir),
                                                "--agent-idle", "900", *client])
        opts[k + 1:k + 1] = ["-o", "ProxyUseFdpass=yes"]
    return opts


def batch(w: World, src: Path, n: int, devices: int, kh: Path, agent_dir: Path | None
          ) -> tuple[float, float]:
    """(aggregate MiB/s, seconds of a small ssh to device 1 while the batch runs)."""
    env = w.client_env()
    targets = [2 + k % (devices - 1) if devices > 1 else 1 for k in range(n)]

    def one(i: int) -> None:
        argv = ["scp", "-q", *options(w, i, kh, agent_dir), str(src),
                f"{w.proxy_target(i)}:/dev/null"]
        run_timed(argv, env=env, timeout=900).check("scp")
    small: list[float] = []

    def probe() -> None:
        time.sleep(2.0)  # the transfers are under way
        argv = ["ssh", *options(w, 1, kh, agent_dir), w.proxy_target(1), "true"]
        small.append(run_timed(argv, env=env, timeout=300).check("probe").total_s)
    t = threading.Thread(target=probe)
    t0 = time.monotonic()
    t.start()
    with ThreadPoolExecutor(n) as pool:
        list(pool.map(one, targets))
    wall = time.monotonic() - t0
    t.join()
    return n * src.stat().st_size / MIB / wall, small[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--concurrent", type=int, default=20)
    ap.add_argument("--mib", type=int, default=64, help="MiB per transfer (64)")
    ap.add_argument("--devices", type=int, default=2)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--netns", action="store_true", help="namespaces (root)")
    args = ap.parse_args()
    if not shutil.which("scp"):
        ap.error("OpenSSH scp not installed")
    with tempfile.TemporaryDirectory(prefix="npas-") as tmp, \
            noports_world(Path(tmp), args.devices, namespaced=args.netns) as w:
        src = make_file(Path(tmp) / "payload", args.mib * MIB)
        kh = Path(tmp) / "known_hosts"
        agent_dir = Path(tmp) / "ag"
        env = w.client_env()
        for i in range(1, args.devices + 1):  # warm-up: first contact, agent started
            for d in (None, agent_dir):
                argv = ["ssh", *options(w, i, kh, d), w.proxy_target(i), "true"]
                run_timed(argv, env=env, timeout=300).check("warm-up")
        got: dict[str, list[tuple[float, float]]] = {"per-process": [], "agent": []}
        for r in range(args.runs):
            order = ("per-process", "agent") if r % 2 == 0 else ("agent", "per-process")
            for case in order:
                got[case].append(batch(w, src, args.concurrent, args.devices, kh,
                                       agent_dir if case == "agent" else None))
        stop_agent(agent_dir, env)
    print(f"\n{args.concurrent} concurrent scp x {args.mib} MiB over {args.devices} devices, "
          f"{'netns' if w.namespaced else 'loopback'}, {os.cpu_count()} CPUs (shared: "
          f"compare the columns), {args.runs} run(s), median")
    print(f"{'case':<12} {'aggregate MiB/s':>16} {'small ssh during batch s':>26}")
    for case, vals in got.items():
        print(f"{case:<12} {statistics.median(v[0] for v in vals):>16.1f} "
              f"{statistics.median(v[1] for v in vals):>26.2f}")
    a, p = (statistics.median(v[0] for v in got[c]) for c in ("agent", "per-process"))
    print(f"agent / per-process aggregate: {a / p:.2f}x (goal >= 1.0); load average "
          f"{' / '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
