#!/usr/bin/env python3
"""Memory of idle connections: RSS of a real atdirectory (and atServer) before, with, after.

Not a test; prints a table and asserts nothing. For each server and each N (1,000 and 5,000
by default) it opens N idle TLS connections (handshake done, nothing sent), then N raw TCP
connections (never start TLS), and prints VmRSS of the server process before, while they are
open and 3 s after they are closed, with the cost per connection in KiB.

    .venv/bin/python -m bench.idle_connections                      # atdirectory only
    .venv/bin/python -m bench.idle_connections --start-atserver     # + an atserver of its own
    .venv/bin/python -m bench.idle_connections --atserver 127.0.0.1:PORT --ca ca.pem
    .venv/bin/python -m bench.idle_connections --counts 1000 --src /tmp/old/src   # baseline

The directory runs with limits and deadlines raised far above N so that it keeps every
connection (the point is the cost of a held connection, not the limits). ``--src DIR`` runs
the directory from another source tree (e.g. ``git archive <commit> src | tar -x -C /tmp/old``)
for a before/after comparison; flags it does not know are left out.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from noports.keys.ca import client_context
from noports.netlimits import make_idle_tls_cheap
from tests.harness.plane import Directory, Plane, Proc, spawn, tool

ROOT = Path(__file__).resolve().parents[1]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def settle(pid: int, seconds: float) -> int:
    time.sleep(seconds)
    return rss_kib(pid)


def pid_listening_on(port: int) -> int | None:
    """The pid owning the listening TCP socket on ``port`` (scans /proc; same user or root)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as fh:
            for line in list(fh)[1:]:
                f = line.split()
                if f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(f[9])
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    return int(pid)
        except OSError:
            continue
    return None


async def open_many(host: str, port: int, n: int, ctx: ssl.SSLContext | None,
                    server_hostname: str) -> list[asyncio.StreamWriter | socket.socket]:
    """Open ``n`` connections (TLS when ``ctx``), 100 at a time; returns what to close."""
    sem = asyncio.Semaphore(100)
    loop = asyncio.get_running_loop()

    async def one() -> asyncio.StreamWriter | socket.socket | None:
        async with sem:
            try:
                if ctx is None:
                    s = socket.socket()
                    s.setblocking(False)
                    await loop.sock_connect(s, (host, port))
                    return s
                r, w = await asyncio.wait_for(asyncio.open_connection(
                    host, port, ssl=ctx, server_hostname=server_hostname), 60)
                await asyncio.wait_for(r.read(1), 30)  # the server's first byte (prompt)
                return w
            except (OSError, asyncio.TimeoutError, ssl.SSLError) as exc:
                print(f"    open failed: {type(exc).__name__}: {exc}", file=sys.stderr)
                return None

    got = await asyncio.gather(*(one() for _ in range(n)))
    return [c for c in got if c is not None]


async def close_all(conns: list[asyncio.StreamWriter | socket.socket]) -> None:
    for c in conns:
        c.close()
    await asyncio.sleep(0.5)


async def hold(pid: int, host: str, port: int, n: int, ctx: ssl.SSLContext | None,
               hostname: str, wait: float) -> tuple[int, int]:
    """Open ``n`` connections, sample the server's RSS, close them: (opened, RSS KiB)."""
    conns = await open_many(host, port, n, ctx, hostname)
    with_ = settle(pid, wait)
    await close_all(conns)
    return len(conns), with_


def measure(name: str, pid: int, host: str, port: int, counts: list[int],
            ctx: ssl.SSLContext, hostname: str, wait: float,
            kinds: tuple[str, ...] = ("tls", "raw")) -> list[tuple]:
    rows = []
    for kind in kinds:
        for n in counts:
            before = settle(pid, wait)

            opened, with_ = asyncio.run(
                hold(pid, host, port, n, ctx if kind == "tls" else None, hostname, wait))
            after = settle(pid, wait + 1)
            per = (with_ - before) / max(1, opened)
            rows.append((name, kind, n, opened, before, with_, after, per, after - before))
            print(f"  {name} {kind} {n}: opened {opened}, RSS {before} -> {with_} -> {after} KiB",
                  file=sys.stderr, flush=True)
    return rows


def start_directory(plane: Plane, src: str | None) -> tuple[Proc, int]:
    if src:
        cmd = [sys.executable, "-m", "noports.directory.cli"]
        env = {"PYTHONPATH": src}
    else:
        cmd, env = [tool("atdirectory")], None
    help_text = subprocess.run([*cmd, "serve", "--help"], capture_output=True, text=True,
                               env={**os.environ, **(env or {})}).stdout
    flags = ["--max-connections-per-ip", "100000"]
    for flag, value in (("--max-connections", "100000"), ("--handshake-timeout", "600"),
                        ("--request-timeout", "600")):
        if flag in help_text:
            flags += [flag, value]
    proc = spawn([*cmd, "serve", "--host", "127.0.0.1", "--port", "0", "--store", plane.store,
                  "--tls-dir", str(plane.tls.directory), *flags], env=env)
    m = proc.wait_for(r"atdirectory listening on (\S+):(\d+)")
    return proc, int(m.group(2))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--counts", default="1000,5000", help="connection counts (default 1000,5000)")
    ap.add_argument("--atserver", metavar="HOST:PORT", help="also measure this atServer")
    ap.add_argument("--ca", type=Path, help="CA file for --atserver (default: the plane's)")
    ap.add_argument("--start-atserver", action="store_true",
                    help="start an atserver (one atSign) in the bench's own plane and measure it")
    ap.add_argument("--src", help="run the directory from this source tree (baseline)")
    ap.add_argument("--wait", type=float, default=2.0, help="settle seconds per sample")
    ap.add_argument("--kinds", default="tls,raw",
                    help="which connections, in order (default tls,raw; 'raw' alone measures "
                         "raw TCP on a fresh server)")
    args = ap.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    kinds = tuple(k for k in args.kinds.split(",") if k in ("tls", "raw"))
    make_idle_tls_cheap()  # the bench's own client side; it measures the servers
    rows: list[tuple] = []
    with tempfile.TemporaryDirectory() as tmp:
        plane = Plane(Path(tmp))
        proc, port = start_directory(plane, args.src)
        try:
            ctx = client_context(plane.tls.ca_cert)
            pid = proc.popen.pid
            label = "atdirectory" + (" (--src)" if args.src else "")
            rows += measure(label, pid, "127.0.0.1", port, counts, ctx, "127.0.0.1", args.wait,
                            kinds)
            targets: list[tuple[str, str, int, ssl.SSLContext]] = []
            if args.atserver:
                h, p = args.atserver.rsplit(":", 1)
                targets.append(("atserver", h, int(p),
                                client_context(args.ca) if args.ca else ctx))
            if args.start_atserver:
                plane.directory = Directory(proc, "127.0.0.1", port, plane.store)
                srv = plane.start_atserver("s1", {"@idlebench": "c" * 64})
                targets.append(("atserver", "127.0.0.1", srv.ports["@idlebench"], ctx))
            for name, h, p, c in targets:
                spid = pid_listening_on(p)
                if spid is None:
                    print(f"cannot find the pid listening on {p}; skipping {name}")
                    continue
                rows += measure(name, spid, h, p, counts, c, h, args.wait, kinds)
        finally:
            for s in plane.servers:
                s.proc.stop()
            proc.stop()
    print()
    print(f"{'server':<22} {'kind':<4} {'N':>6} {'opened':>6} {'before KiB':>11} "
          f"{'with KiB':>10} {'after KiB':>10} {'KiB/conn':>9} {'kept KiB':>9}")
    for name, kind, n, opened, before, with_, after, per, kept in rows:
        print(f"{name:<22} {kind:<4} {n:>6} {opened:>6} {before:>11} {with_:>10} {after:>10} "
              f"{per:>9.1f} {kept:>9}")
    print("\nkept = RSS after close - before: memory not given back to the OS.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
