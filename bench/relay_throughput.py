#!/usr/bin/env python3
"""Relay throughput and idle-session memory on loopback (not a test; prints a table).

Compares, in one run and with the same sender/receiver processes:
  * direct TCP (sender -> receiver),
  * ``socat -b 65536`` as a two-listener relay,
  * our :class:`noports.relay.Rendezvous` in each splice mode (own process, own loop),
and reports relay memory per idle session (tracemalloc and RSS, 1000 sessions).

    .venv/bin/python -m bench.relay_throughput            # 1 GiB x 3 runs, median
    .venv/bin/python -m bench.relay_throughput --quick    # 256 MiB x 1 run
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import multiprocessing as mp
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
import tracemalloc

from noports.relay import RelayConfig, Rendezvous
from noports.relay.splice import HAS_OS_SPLICE
from tests.harness.plane import free_port

HOST = "127.0.0.1"
CHUNK = 1 << 20
TOKEN_A, TOKEN_B = b"bench-token-a", b"bench-token-b"


# ----------------------------------------------------------------- sender / receiver


def _receiver(lsock_or_port: socket.socket | tuple[str, int], head: bytes, q: mp.Queue) -> None:
    """Accept (or connect), read to EOF, report (bytes, seconds from first byte)."""
    if isinstance(lsock_or_port, socket.socket):
        conn, _ = lsock_or_port.accept()
    else:
        conn = socket.create_connection(lsock_or_port)
        if head:
            conn.sendall(head)
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    total = 0
    t0 = None
    while True:
        n = conn.recv_into(view)
        if not n:
            break
        if t0 is None:
            t0 = time.perf_counter()
        total += n
    q.put((total, time.perf_counter() - (t0 or time.perf_counter())))
    conn.close()


def _sender(addr: tuple[str, int], head: bytes, nbytes: int) -> None:
    sock = socket.create_connection(addr)
    if head:
        sock.sendall(head)
    view = memoryview(os.urandom(CHUNK))
    left = nbytes
    while left > 0:
        n = min(left, CHUNK)
        sock.sendall(view[:n])
        left -= n
    sock.shutdown(socket.SHUT_WR)
    sock.recv(1)  # wait for the far side to finish
    sock.close()


def _gbps(nbytes: int, secs: float) -> float:
    return nbytes * 8 / secs / 1e9


def run_direct(nbytes: int) -> float:
    lsock = socket.create_server((HOST, 0))
    q: mp.Queue = mp.Queue()
    r = mp.Process(target=_receiver, args=(lsock, b"", q))
    r.start()
    s = mp.Process(target=_sender, args=(lsock.getsockname(), b"", nbytes))
    s.start()
    total, secs = q.get(timeout=300)
    s.join()
    r.join()
    lsock.close()
    assert total == nbytes, (total, nbytes)
    return _gbps(total, secs)


def run_socat(nbytes: int) -> float:
    pa, pb = free_port(), free_port()
    proc = subprocess.Popen(["socat", "-b", "65536", f"TCP4-LISTEN:{pa},bind={HOST},reuseaddr",
                             f"TCP4-LISTEN:{pb},bind={HOST},reuseaddr"])
    try:
        _wait_port(pa)
        q: mp.Queue = mp.Queue()
        s = mp.Process(target=_sender, args=((HOST, pa), b"", nbytes))
        s.start()  # socat accepts A first, then starts listening on B
        _wait_port(pb)
        r = mp.Process(target=_receiver, args=((HOST, pb), b"", q))
        r.start()
        total, secs = q.get(timeout=300)
        s.join()
        r.join()
    finally:
        proc.kill()
        proc.wait()
    assert total == nbytes, (total, nbytes)
    return _gbps(total, secs)


def _wait_port(port: int, timeout: float = 5.0) -> None:
    """Wait until ``port`` is LISTENing, without connecting (socat would accept the probe)."""
    needle = f":{port:04X} 00000000:0000 0A"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open("/proc/net/tcp") as f:
            if needle in f.read():
                return
        time.sleep(0.005)
    raise TimeoutError(f"port {port} never opened")


def _relay_main(mode: str, conn: mp.connection.Connection) -> None:
    async def main() -> None:
        cfg = RelayConfig(bind_host=HOST, splice_mode=mode)  # type: ignore[arg-type]
        async with Rendezvous(cfg) as rv:
            conn.send(await rv.open_session("bench", lambda line: line == TOKEN_A,
                                            lambda line: line == TOKEN_B))
            await asyncio.get_running_loop().run_in_executor(None, conn.recv)

    asyncio.run(main())


def run_ours(nbytes: int, mode: str) -> float:
    parent, child = mp.Pipe()
    relay = mp.Process(target=_relay_main, args=(mode, child))
    relay.start()
    try:
        pa, pb = parent.recv()
        q: mp.Queue = mp.Queue()
        # the daemon-side pump (receiver) connects to B, the client-side (sender) to A
        r = mp.Process(target=_receiver, args=((HOST, pb), TOKEN_B + b"\n", q))
        r.start()
        s = mp.Process(target=_sender, args=((HOST, pa), TOKEN_A + b"\n", nbytes))
        s.start()
        total, secs = q.get(timeout=300)
        s.join()
        r.join()
    finally:
        parent.send("stop")
        relay.join(10)
    assert total == nbytes, (total, nbytes)
    return _gbps(total, secs)


# ------------------------------------------------------------------------ memory


def idle_session_memory(n: int = 1000) -> tuple[float, float]:
    """(tracemalloc KiB, RSS KiB) per idle open session."""

    def rss_kib() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024

    async def main() -> tuple[float, float]:
        cfg = RelayConfig(bind_host=HOST, max_sessions=n + 100)
        async with Rendezvous(cfg) as rv:
            for i in range(20):  # warm up allocator and the loop's selector maps
                await rv.open_session(f"warm{i}", lambda _l: True, lambda _l: True)
            gc.collect()
            rss0 = rss_kib()
            tracemalloc.start()
            snap0 = tracemalloc.take_snapshot()
            for i in range(n):
                await rv.open_session(f"s{i}", lambda _l: True, lambda _l: True)
            gc.collect()
            snap1 = tracemalloc.take_snapshot()
            tracemalloc.stop()
            rss1 = rss_kib()
            diff = sum(st.size_diff for st in snap1.compare_to(snap0, "filename"))
            return diff / n / 1024, (rss1 - rss0) / n

    return asyncio.run(main())


# -------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="256 MiB, one run each")
    ap.add_argument("--mib", type=int, help="transfer size in MiB (default 1024, quick 256)")
    ap.add_argument("--runs", type=int, help="runs per case, median reported (default 3)")
    args = ap.parse_args()
    mib = args.mib or (256 if args.quick else 1024)
    runs = args.runs or (1 if args.quick else 3)
    nbytes = mib << 20
    mp.set_start_method("fork")

    cases: list[tuple[str, object]] = [("direct TCP", run_direct)]
    if shutil.which("socat"):
        cases.append(("socat -b 65536", run_socat))
    cases.append(("ours: protocol", lambda n: run_ours(n, "protocol")))
    if HAS_OS_SPLICE:
        cases.append(("ours: os_splice", lambda n: run_ours(n, "os_splice")))

    print(f"loopback, {mib} MiB per transfer, median of {runs} (interleaved), "
          f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}", flush=True)
    samples: dict[str, list[float]] = {name: [] for name, _ in cases}
    for _ in range(runs):  # interleave cases so machine noise hits all of them alike
        for name, fn in cases:
            samples[name].append(fn(nbytes))  # type: ignore[operator]
    results = {name: statistics.median(v) for name, v in samples.items()}
    direct = results["direct TCP"]
    socat = results.get("socat -b 65536")
    print(f"{'case':<18} {'Gbit/s':>8} {'x direct':>9} {'x socat':>8}   [runs]")
    for name, v in results.items():
        xs = f"{v / socat:8.2f}" if socat else f"{'-':>8}"
        runs_s = " ".join(f"{x:.1f}" for x in samples[name])
        print(f"{name:<18} {v:8.2f} {v / direct:9.2f} {xs}   [{runs_s}]")
    tm, rss = idle_session_memory()
    print(f"relay memory per idle session: {tm:.2f} KiB (tracemalloc), "
          f"{rss:.2f} KiB (RSS delta), 1000 sessions")


if __name__ == "__main__":
    main()
