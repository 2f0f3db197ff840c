#!/usr/bin/env python3
"""scp throughput through a NoPorts tunnel vs direct scp to the same sshd; relay vs socat.

Not a test; prints a table. Real programs throughout (tests/integration/noports_harness.py):
plane + srvd + sshnpd + OpenSSH sshd; OpenSSH ``scp`` (SFTP protocol) copies a file of
random bytes to ``/dev/null`` on the device:

* ``direct``: scp to the device's sshd from inside the device namespace (or on loopback):
  the baseline, no relay;
* ``-x <mode>``: ``sshnp -x`` (tunnel on a local port, kept by a background sshnp), then scp
  through that port;
* ``stdio <mode>``: scp with ``-o ProxyCommand='sshnp --stdio ...'`` (what Ansible does).

Each case is timed wall-clock for the big file and for a 1-byte file; ``net`` subtracts the
1-byte time (SSH handshake + sshnp setup) so the ratio compares the data path. Cases are
interleaved over the runs; medians are reported.

Then the relay's own data plane, by calling bench/relay_throughput.py (not duplicated):
direct TCP, ``socat -b 65536`` and the Rendezvous srvd runs, in srvd's default splice mode.

    .venv/bin/python -m bench.scp_throughput            # 256 MiB, 3 runs
    .venv/bin/python -m bench.scp_throughput --quick    # 256 MiB, 1 run, fewer cases
    .venv/bin/python -m bench.scp_throughput --netns    # namespaced topology (root)

Target: tunnel >= 0.5x direct scp.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shlex
import shutil
import statistics
import tempfile
from pathlib import Path

from tests.harness.world import World, noports_world, run_timed

MIB = 1 << 20


def make_file(path: Path, nbytes: int) -> Path:
    with open(path, "wb") as fh:
        left = nbytes
        block = os.urandom(4 * MIB)
        while left > 0:
            n = min(left, len(block))
            fh.write(block[:n])
            left -= n
    return path


def scp_from_printed(line: str, src: Path, dst: str = "/dev/null") -> list[str]:
    """``ssh -p PORT -o ... user@127.0.0.1`` (sshnp -x) -> the equivalent scp argv."""
    argv = shlex.split(line)
    out = [shutil.which("scp") or "scp", "-q"]
    it = iter(argv[1:])
    target = None
    for tok in it:
        if tok == "-p":
            out += ["-P", next(it)]
        elif tok in ("-o", "-i"):
            out += [tok, next(it)]
        elif tok == "--":
            break
        elif not tok.startswith("-"):
            target = tok
    assert target, line
    return [*out, "-o", "BatchMode=yes", str(src), f"{target}:{dst}"]


class Cases:
    def __init__(self, w: World, kh: Path) -> None:
        self.w = w
        self.kh = kh
        self.env = w.client_env()

    def direct(self, src: Path) -> float:
        w, dev = self.w, self.w.device(1)
        kh = w.base / "direct_known_hosts_scp"
        if not kh.exists():
            kh.write_text((f"[127.0.0.1]:{dev.ssh_port} " if dev.ssh_port != 22 else "127.0.0.1 ")
                          + " ".join(w.host_pub(1).read_text().split()[:2]) + "\n")
        argv = w.topo.ns_argv(dev.ns, [
            "scp", "-q", "-F", "/dev/null", "-P", str(dev.ssh_port), "-o", "BatchMode=yes",
            "-o", f"UserKnownHostsFile={kh}", "-o", "StrictHostKeyChecking=yes",
            "-o", "IdentitiesOnly=yes", "-i", str(w.identity), str(src),
            f"{dev.ssh_user}@127.0.0.1:/dev/null"])
        return run_timed(argv, env=self.env, timeout=600).check("direct scp").total_s

    def printed(self, mode: str, src: Path) -> float:
        first = run_timed(self.w.sshnp_argv(1, "-x", mode=mode), env=self.env,
                          timeout=60).check("sshnp -x")
        argv = scp_from_printed(first.stdout.strip().splitlines()[-1], src)
        return run_timed(argv, env=self.env, timeout=600).check(f"scp -x {mode}").total_s

    def stdio(self, mode: str, src: Path) -> float:
        argv = ["scp", "-q", *self.w.proxy_options(1, mode=mode, known_hosts=self.kh),
                str(src), f"{self.w.proxy_target(1)}:/dev/null"]
        return run_timed(argv, env=self.env, timeout=600).check(f"scp stdio {mode}").total_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one run; relay part 256 MiB once")
    ap.add_argument("--mib", type=int, default=256, help="file size in MiB (default 256)")
    ap.add_argument("--runs", type=int, help="runs per case, median (default 3, quick 1)")
    ap.add_argument("--netns", action="store_true",
                    help="network-namespace topology (needs root); default loopback")
    ap.add_argument("--no-relay", action="store_true", help="skip the relay_throughput part")
    args = ap.parse_args()
    runs = args.runs or (1 if args.quick else 3)
    nbytes = args.mib * MIB
    if args.netns and os.geteuid() != 0:
        ap.error("--netns needs root")
    if not shutil.which("scp"):
        ap.error("OpenSSH scp not installed")

    with tempfile.TemporaryDirectory(prefix="np-bench-scp-") as tmp:
        big = make_file(Path(tmp) / "big.bin", nbytes)
        tiny = make_file(Path(tmp) / "tiny.bin", 1)
        with noports_world(Path(tmp) / "world", n_devices=1, namespaced=args.netns) as w:
            c = Cases(w, Path(tmp) / "known_hosts")
            cases = {
                "direct scp": c.direct,
                "sshnp -x aes": lambda s: c.printed("aes", s),
                "sshnp -x ssh": lambda s: c.printed("ssh", s),
                "sshnp stdio aes": lambda s: c.stdio("aes", s),
                "sshnp stdio ssh": lambda s: c.stdio("ssh", s),
            }
            for fn in cases.values():  # warm-up
                fn(tiny)
            big_t: dict[str, list[float]] = {k: [] for k in cases}
            tiny_t: dict[str, list[float]] = {k: [] for k in cases}
            for _ in range(runs):
                for name, fn in cases.items():
                    tiny_t[name].append(fn(tiny))
                    big_t[name].append(fn(big))
            topo = "netns" if w.namespaced else "loopback"
        print(f"scp of {args.mib} MiB (random) to /dev/null on the device, {topo}, median of "
              f"{runs} (interleaved), {os.cpu_count()} CPUs")
        print(f"{'case':<17} {'wall s':>7} {'1B s':>6} {'MiB/s':>8} {'net MiB/s':>10} "
              f"{'x direct':>9} {'x direct net':>13}")
        res = {}
        for name in cases:
            wall = statistics.median(big_t[name])
            setup = statistics.median(tiny_t[name])
            res[name] = (wall, setup, args.mib / wall, args.mib / max(wall - setup, 1e-6))
        d_raw, d_net = res["direct scp"][2], res["direct scp"][3]
        for name, (wall, setup, raw, net) in res.items():
            print(f"{name:<17} {wall:7.2f} {setup:6.2f} {raw:8.1f} {net:10.1f} "
                  f"{raw / d_raw:9.2f} {net / d_net:13.2f}")
        worst = min(v[3] / d_net for k, v in res.items() if k != "direct scp")
        print(f"target >= 0.5x direct (net): worst tunnel case {worst:.2f}x -> "
              f"{'met' if worst >= 0.5 else 'NOT met'}")

    if not args.no_relay:
        from bench import relay_throughput as rt
        from noports.relay.splice import DEFAULT_MODE
        mp.set_start_method("fork", force=True)
        rmib = 256 if args.quick else 1024
        rb = rmib * MIB
        relay_cases = [("direct TCP", rt.run_direct)]
        if shutil.which("socat"):
            relay_cases.append(("socat -b 65536", rt.run_socat))
        relay_cases.append((f"srvd data plane ({DEFAULT_MODE})",
                            lambda n: rt.run_ours(n, DEFAULT_MODE)))
        samples: dict[str, list[float]] = {k: [] for k, _ in relay_cases}
        for _ in range(runs):
            for name, fn in relay_cases:
                samples[name].append(fn(rb))
        med = {k: statistics.median(v) for k, v in samples.items()}
        socat = med.get("socat -b 65536")
        print(f"\nrelay alone (bench/relay_throughput.py), loopback, {rmib} MiB, median of "
              f"{runs}")
        print(f"{'case':<30} {'Gbit/s':>8} {'x direct':>9} {'x socat':>8}")
        for name, v in med.items():
            xs = f"{v / socat:8.2f}" if socat else f"{'-':>8}"
            print(f"{name:<30} {v:8.2f} {v / med['direct TCP']:9.2f} {xs}")


if __name__ == "__main__":
    main()
