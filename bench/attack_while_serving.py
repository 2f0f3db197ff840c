#!/usr/bin/env python3
"""A legitimate client's latency and failures, without and with hostile clients, side by side.

Not a test; prints a table and asserts nothing. It starts a real plane on loopback
(tests/integration/plane_harness.py: atdirectory + one atserver hosting @alice and @bob, TLS
everywhere) and runs a legitimate client (the project's own noports.atclient) in a loop:

* ``directory``: a directory lookup of @bob on a new connection (Dart style);
* ``atserver lookup``: ``llookup:public:publickey@alice`` on @alice's authenticated connection;
* ``notify``: a notification @alice -> @bob, timed until the atServer acknowledges it.

First alone (the baseline), then while an attacker process (other source addresses:
127.0.0.2-127.0.0.9) runs every known hostile case against both servers: the regex
``scan (.+)+(.+)+X``, 100-200 KB ``stats:1,1,...`` and ``notify:all:a,a,...`` lines
unauthenticated, thousands of idle TLS and raw TCP connections, slowloris, ``noop:<5000
digits>``, ``scan x{99999999999}``, ``notify:ttln:18446744073709551616``, and a seeded random
line fuzzer. Goal: p99 under attack <= 50 ms on loopback, 0 failures.

    .venv/bin/python -m bench.attack_while_serving            # 20 s per phase
    .venv/bin/python -m bench.attack_while_serving --quick    # 8 s per phase
    .venv/bin/python -m bench.attack_while_serving --seed 7 --idle 3000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

ATTACK_SOURCES = [f"127.0.0.{i}" for i in range(2, 10)]
OPS = ("directory", "atserver lookup", "notify")


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


# --------------------------------------------------------------------------- attacker (subprocess)


def hostile_lines(rng: random.Random) -> list[bytes]:
    """The known cases (issue 9 and the atServer review), one line each."""
    return [
        b"scan (.+)+(.+)+X\n",
        b"stats:" + b"1," * rng.randint(50_000, 100_000) + b"1\n",
        b"notify:all:" + b"a," * rng.randint(50_000, 100_000) + b"a\n",
        b"noop:" + b"9" * 5000 + b"\n",
        b"scan x{99999999999}\n",
        b"notify:ttln:18446744073709551616:@bob:x@alice:v\n",
    ]


VERBS = [b"from:", b"cram:", b"pkam:", b"lookup:", b"plookup:", b"llookup:", b"update:",
         b"delete:", b"scan", b"notify:", b"monitor", b"stats", b"noop:", b"info", b"@exit",
         b"sync:", b"pol", b"alice", b"@", b""]


def fuzz_line(rng: random.Random) -> bytes:
    """A random or mutated line: verbs with junk, binary, huge, unicode, no newline."""
    kind = rng.randrange(6)
    if kind == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randint(1, 400)))
    if kind == 1:
        return rng.choice(VERBS) + bytes(rng.randrange(32, 127)
                                         for _ in range(rng.randint(0, 300))) + b"\n"
    if kind == 2:
        return rng.choice(VERBS) + b":" * rng.randint(1, 2000) + b"\n"
    if kind == 3:
        return rng.choice(VERBS) + ("🛠" * rng.randint(1, 3000)).encode() + b"\n"
    if kind == 4:
        return rng.choice(VERBS) + b"x" * rng.randint(10_000, 300_000) + b"\n"
    return rng.choice(VERBS) + b"\r\n" * rng.randint(1, 50)


async def attacker(targets: list[tuple[str, int]], ca: str, seed: int, idle: int,
                   duration: float) -> dict[str, int]:
    """Every hostile case against every (host, port) until ``duration`` has passed."""
    from noports.netlimits import make_idle_tls_cheap

    make_idle_tls_cheap()
    ctx = ssl.create_default_context(cafile=ca)
    stats = {"connections": 0, "connect_failures": 0, "lines": 0, "idle_open": 0}
    end = time.monotonic() + 3600  # set once the idle connections are open
    held: list[asyncio.StreamWriter] = []

    async def conn(target: tuple[str, int], source: str, tls: bool = True):  # type: ignore[no-untyped-def]
        try:
            r, w = await asyncio.wait_for(asyncio.open_connection(
                target[0], target[1], ssl=ctx if tls else None,
                server_hostname=target[0] if tls else None, local_addr=(source, 0)), 10)
            stats["connections"] += 1
            return r, w
        except (OSError, asyncio.TimeoutError, ssl.SSLError):
            stats["connect_failures"] += 1
            return None

    async def send_and_drop(target: tuple[str, int], source: str, line: bytes) -> None:
        c = await conn(target, source)
        if c is None:
            await asyncio.sleep(0.2)
            return
        r, w = c
        try:
            w.write(line)
            await asyncio.wait_for(w.drain(), 5)
            stats["lines"] += 1
            await asyncio.wait_for(r.read(4096), 2)
        except (OSError, asyncio.TimeoutError, ssl.SSLError, ValueError):
            pass
        finally:
            w.close()

    async def known(target: tuple[str, int], i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        while time.monotonic() < end:
            for line in hostile_lines(rng):
                if time.monotonic() >= end:
                    break
                await send_and_drop(target, ATTACK_SOURCES[i % 4], line)

    async def fuzzer(target: tuple[str, int], i: int) -> None:
        rng = random.Random(seed * 7919 + i)
        while time.monotonic() < end:
            await send_and_drop(target, ATTACK_SOURCES[4 + i % 4], fuzz_line(rng))

    async def slowloris(target: tuple[str, int], i: int) -> None:
        while time.monotonic() < end:
            c = await conn(target, ATTACK_SOURCES[i % 8])
            if c is None:
                await asyncio.sleep(0.5)
                continue
            _r, w = c
            try:
                while time.monotonic() < end and not w.is_closing():
                    w.write(b"a")
                    await asyncio.wait_for(w.drain(), 5)
                    await asyncio.sleep(1.0)
            except (OSError, asyncio.TimeoutError, ssl.SSLError):
                pass
            finally:
                w.close()

    async def idlers(target: tuple[str, int], n: int, tls: bool) -> None:
        sem = asyncio.Semaphore(50)

        async def one(k: int) -> None:
            async with sem:
                c = await conn(target, ATTACK_SOURCES[k % 4], tls)
                if c is not None:
                    held.append(c[1])
                    stats["idle_open"] += 1
        await asyncio.gather(*(one(k) for k in range(n)))

    # The idle connections first (a handshake flood while they open), then everything else.
    await asyncio.gather(*(idlers(t, idle, True) for t in targets),
                         *(idlers(t, idle // 2, False) for t in targets))
    print("READY", flush=True)
    end = time.monotonic() + duration
    jobs = []
    for target in targets:
        jobs += [known(target, i) for i in range(2)]
        jobs += [fuzzer(target, i) for i in range(2)]
        jobs += [slowloris(target, i) for i in range(20)]
    await asyncio.gather(*jobs, return_exceptions=True)
    for w in held:
        w.close()
    return stats


def attacker_main(args: argparse.Namespace) -> int:
    targets = [(h, int(p)) for h, p in (t.rsplit(":", 1) for t in args.attack.split(","))]
    stats = asyncio.run(attacker(targets, args.ca, args.seed, args.idle, args.duration))
    print(json.dumps(stats), flush=True)
    return 0


# --------------------------------------------------------------------------- legitimate client


def legit_loop(plane, ctx: ssl.SSLContext, keys: dict, duration: float) -> dict:  # type: ignore[no-untyped-def]
    """Each operation in its own thread, in a loop for ``duration`` s: latencies (ms), failures.

    One thread per operation, so a stalled atServer does not starve the directory's figures.
    """
    import threading

    from noports.atclient import AtConnection, find_secondary

    lat: dict[str, list[float]] = {op: [] for op in OPS}
    fails: dict[str, list[str]] = {op: [] for op in OPS}
    d = plane.directory
    end = time.monotonic() + duration

    def connect() -> AtConnection:
        host, port = find_secondary(d.host, d.port, "@alice", ctx, timeout=10)
        c = AtConnection(host, port, ctx, timeout=10)
        c.authenticate_pkam("@alice", keys["@alice"].pkam_private)
        return c

    def run(op: str) -> None:
        conn: AtConnection | None = None
        while time.monotonic() < end:
            t0 = time.perf_counter()
            try:
                if op == "directory":
                    find_secondary(d.host, d.port, "@bob", ctx, timeout=10)
                else:
                    if conn is None:
                        conn = connect()
                        t0 = time.perf_counter()
                    if op == "atserver lookup":
                        conn.command("llookup:public:publickey@alice")
                    else:
                        conn.command(f"notify:id:{uuid.uuid4()}:update:messageType:key:ttln:"
                                     f"60000:isEncrypted:false:@bob:n.bench@alice:x")
                lat[op].append((time.perf_counter() - t0) * 1000)
            except Exception as exc:  # counted and shown, never fatal
                fails[op].append(f"{type(exc).__name__}: {str(exc)[:120]}")
                if conn is not None:
                    conn.close()
                    conn = None
            time.sleep(0.02)
        if conn is not None:
            conn.close()

    threads = [threading.Thread(target=run, args=(op,), daemon=True) for op in OPS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(duration + 60)
    return {"lat": lat, "fails": fails}


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) the process has used so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return -1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="8 s per phase instead of 20")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds per phase")
    ap.add_argument("--seed", type=int, default=1, help="fuzzer seed (default 1)")
    ap.add_argument("--idle", type=int, default=2000,
                    help="idle TLS connections per server (and half as many raw TCP)")
    ap.add_argument("--only", choices=["directory", "atserver"],
                    help="attack only this server (default: both); the client uses both")
    ap.add_argument("--attack", help=argparse.SUPPRESS)  # attacker subprocess mode
    ap.add_argument("--ca", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.attack:
        return attacker_main(args)
    if args.quick:
        args.duration = 8.0

    from noports import crypto
    from noports.keys.ca import client_context
    from noports.keys.onboarding import activate
    from tests.harness.plane import Plane

    with tempfile.TemporaryDirectory(prefix="np-attack-") as tmp:
        plane = Plane(Path(tmp))
        try:
            plane.start_directory()
            secrets = {a: crypto.generate_cram_secret() for a in ("@alice", "@bob")}
            server = plane.start_atserver("s1", secrets)
            ctx = client_context(plane.tls.ca_cert)
            root = (plane.directory.host, plane.directory.port)
            keys = {a: activate(a, s, root, ctx) for a, s in secrets.items()}
            pids = {"atdirectory": plane.directory.proc.popen.pid,
                    "atserver": server.proc.popen.pid}
            print(f"baseline: {args.duration:g} s of legitimate traffic alone ...",
                  file=sys.stderr, flush=True)
            rss0 = {k: rss_kib(p) for k, p in pids.items()}
            cpu0 = {k: cpu_s(p) for k, p in pids.items()}
            base = legit_loop(plane, ctx, keys, args.duration)
            cpu_alone = {k: (cpu_s(p) - cpu0[k]) / args.duration for k, p in pids.items()}
            targets = ",".join(t for name, t in (
                ("directory", plane.root), ("atserver", f"127.0.0.1:{server.ports['@alice']}"))
                if args.only in (None, name))
            warmup = 3.0
            print(f"attack: {args.duration:g} s with the attacker (seed {args.seed}, "
                  f"{args.idle} idle TLS per server) ...", file=sys.stderr, flush=True)
            attack = subprocess.Popen(
                [sys.executable, __file__, "--attack", targets, "--ca",
                 str(plane.tls.ca_cert), "--seed", str(args.seed), "--idle", str(args.idle),
                 "--duration", str(args.duration + warmup + 2)],
                stdout=subprocess.PIPE, text=True,
                env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
            assert attack.stdout is not None
            t_open = time.monotonic()
            while attack.stdout.readline().strip() != "READY":  # idle connections are open
                if attack.poll() is not None:
                    raise RuntimeError("the attacker process exited early")
            print(f"  {args.idle} idle TLS + {args.idle // 2} raw per server opened in "
                  f"{time.monotonic() - t_open:.1f} s", file=sys.stderr, flush=True)
            time.sleep(warmup)
            cpu1 = {k: cpu_s(p) for k, p in pids.items()}
            under = legit_loop(plane, ctx, keys, args.duration)
            cpu_under = {k: (cpu_s(p) - cpu1[k]) / args.duration for k, p in pids.items()}
            rss1 = {k: rss_kib(p) for k, p in pids.items()}
            load = os.getloadavg()[0]
            out, _ = attack.communicate(timeout=120)
            alive = {k: p.proc.popen.poll() is None
                     for k, p in (("atdirectory", plane.directory), ("atserver", server))}
        finally:
            plane.stop()
    astats = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
    print(f"\nlegitimate client on loopback, {args.duration:g} s per phase; attacked: "
          f"{args.only or 'both servers'}; attacker seed {args.seed}: {astats}")
    print(f"{'operation':<16} {'alone p50':>10} {'p99 ms':>8} {'n':>5} {'fail':>5} | "
          f"{'attack p50':>10} {'p99 ms':>8} {'n':>5} {'fail':>5}")
    for op in OPS:
        a, b = base["lat"][op], under["lat"][op]
        print(f"{op:<16} {statistics.median(a) if a else float('nan'):>10.2f} "
              f"{pct(a, 99):>8.2f} {len(a):>5} {len(base['fails'][op]):>5} | "
              f"{statistics.median(b) if b else float('nan'):>10.2f} {pct(b, 99):>8.2f} "
              f"{len(b):>5} {len(under['fails'][op]):>5}")
    print("goal under attack: p99 <= 50 ms, 0 failures")
    for name in pids:
        print(f"{name}: RSS {rss0[name]} KiB alone, {rss1[name]} KiB under attack; CPU "
              f"{cpu_alone[name]:.0%} alone, {cpu_under[name]:.0%} under attack; "
              f"{'still running' if alive[name] else 'DIED'}")
    print(f"machine load average (1 min) at the end: {load:.1f} on {os.cpu_count()} CPUs")
    for op in OPS:
        for phase, res in (("alone", base), ("attack", under)):
            if res["fails"][op]:
                kinds = sorted(set(res["fails"][op]))
                print(f"failures {op} ({phase}): {len(res['fails'][op])}, e.g. {kinds[:3]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
