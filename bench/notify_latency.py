#!/usr/bin/env python3
"""notify -> monitor latency (p50/p99) and notifications per second through our control plane.

Not a test: it prints figures. It starts a real plane on loopback (atdirectory + two atserver
processes over TLS), activates @alice (process 1) and @bob (process 2), opens @bob's monitor,
and has @alice send notifications to @bob, which travel sender atServer -> (from/pol
server-to-server connection) -> recipient atServer -> monitor line.

Side by side it measures the floor: a `noop:0` request/reply round trip on one TLS connection
(the cheapest thing a client can ask an atServer), and the same notify path when both atSigns
live in ONE atserver process (no server-to-server hop).

    .venv/bin/python -m bench.notify_latency            # 300 latency samples, 2000 for rate
    .venv/bin/python -m bench.notify_latency --quick    # smaller, ~10 s
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path

from noports import crypto
from noports.atclient import AtConnection, find_secondary
from noports.keys.ca import client_context
from noports.keys.onboarding import activate
from tests.harness.plane import Plane


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


class Monitor:
    """@bob's monitor in a thread: records the arrival time of each notification id."""

    def __init__(self, conn: AtConnection, regex: str) -> None:
        self.arrived: dict[str, float] = {}
        self.cond = threading.Condition()
        self.conn = conn
        self.regex = regex
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        try:
            for n in self.conn.monitor(self.regex, since_ms=int(time.time() * 1000)):
                now = time.perf_counter()
                with self.cond:
                    self.arrived[str(n.get("key", ""))] = now
                    self.cond.notify_all()
        except Exception:  # connection closed at the end of the run
            pass

    def wait(self, key: str, timeout: float = 10.0) -> float:
        with self.cond:
            ok = self.cond.wait_for(lambda: key in self.arrived, timeout)
            if not ok:
                raise TimeoutError(f"notification {key} not received in {timeout}s")
            return self.arrived[key]

    def wait_count(self, prefix: str, count: int, timeout: float = 120.0) -> float:
        with self.cond:
            self.cond.wait_for(
                lambda: sum(1 for k in self.arrived if prefix in k) >= count, timeout)
            return max(v for k, v in self.arrived.items() if prefix in k)


def connect(plane: Plane, ctx, atsign: str, pkam_private: str) -> AtConnection:
    host, port = find_secondary(plane.directory.host, plane.directory.port, atsign, ctx)
    conn = AtConnection(host, port, ctx)
    conn.authenticate_pkam(atsign, pkam_private)
    return conn


def notify_cmd(sender: str, recipient: str, name: str) -> str:
    return (f"notify:id:{uuid.uuid4()}:update:messageType:key:ttln:60000:isEncrypted:false:"
            f"{recipient}:{name}.bench{sender}:x")


def run_path(plane: Plane, ctx, keys: dict, sender: str, recipient: str,
             samples: int, burst: int, label: str) -> dict:
    tx = connect(plane, ctx, sender, keys[sender].pkam_private)
    rx = connect(plane, ctx, recipient, keys[recipient].pkam_private)
    mon = Monitor(rx, r"\.bench@")
    time.sleep(0.3)
    run = uuid.uuid4().hex[:6]
    # warm up: the first notify opens the server-to-server connection (from/pol handshake)
    t0 = time.perf_counter()
    tx.command(notify_cmd(sender, recipient, f"warm{run}"))
    first = mon.wait(f"{recipient}:warm{run}.bench{sender}", 15) - t0
    lat = []
    for i in range(samples):
        name = f"l{run}n{i}"
        t0 = time.perf_counter()
        tx.command(notify_cmd(sender, recipient, name))
        lat.append((mon.wait(f"{recipient}:{name}.bench{sender}") - t0) * 1000)
    t0 = time.perf_counter()
    for i in range(burst):
        tx.command(notify_cmd(sender, recipient, f"b{run}n{i}"))
    sent = time.perf_counter() - t0
    last = mon.wait_count(f"b{run}n", burst)
    total = last - t0
    tx.close()
    rx.close()
    return {"label": label, "first_ms": first * 1000, "p50": statistics.median(lat),
            "p99": pct(lat, 99), "rate": burst / total, "accept_rate": burst / sent}


def noop_rtt(plane: Plane, ctx, keys: dict, atsign: str, n: int) -> float:
    conn = connect(plane, ctx, atsign, keys[atsign].pkam_private)
    t = []
    for _ in range(n):
        t0 = time.perf_counter()
        conn.command("noop:0")
        t.append((time.perf_counter() - t0) * 1000)
    conn.close()
    return statistics.median(t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer samples (about 10 s)")
    ap.add_argument("--samples", type=int, default=300, help="sequential latency samples")
    ap.add_argument("--burst", type=int, default=2000, help="notifications for the rate run")
    args = ap.parse_args()
    if args.quick:
        args.samples, args.burst = 50, 300
    with tempfile.TemporaryDirectory(prefix="np-bench-") as tmp:
        plane = Plane(Path(tmp))
        try:
            plane.start_directory()
            secrets = {a: crypto.generate_cram_secret() for a in ("@alice", "@bob", "@carol")}
            plane.start_atserver("s1", {"@alice": secrets["@alice"], "@carol": secrets["@carol"]})
            plane.start_atserver("s2", {"@bob": secrets["@bob"]})
            ctx = client_context(plane.tls.ca_cert)
            root = (plane.directory.host, plane.directory.port)
            keys = {a: activate(a, s, root, ctx) for a, s in secrets.items()}
            rtt = noop_rtt(plane, ctx, keys, "@alice", max(100, args.samples))
            rows = [
                run_path(plane, ctx, keys, "@alice", "@bob", args.samples, args.burst,
                         "cross-process (s2s from/pol)"),
                run_path(plane, ctx, keys, "@alice", "@carol", args.samples, args.burst,
                         "same process"),
            ]
        finally:
            plane.stop()
    print(f"\nnotify -> monitor on loopback, TLS everywhere ({args.samples} sequential "
          f"samples, {args.burst} burst)")
    print(f"baseline: noop:0 round trip on one connection  p50 {rtt:.3f} ms")
    print(f"{'path':32} {'first':>8} {'p50 ms':>8} {'p99 ms':>8} {'x noop':>7} "
          f"{'notif/s':>9} {'accepted/s':>11}")
    for r in rows:
        print(f"{r['label']:32} {r['first_ms']:8.1f} {r['p50']:8.2f} {r['p99']:8.2f} "
              f"{r['p50'] / rtt:7.1f} {r['rate']:9.0f} {r['accept_rate']:11.0f}")
    print("first = first notify incl. opening the server-to-server connection; notif/s = "
          "delivered to the monitor end to end; accepted/s = sender's atServer acks")


if __name__ == "__main__":
    main()
