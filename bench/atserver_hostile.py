#!/usr/bin/env python3
"""Hostile input against a real atserver: what one bad line or many idle connections cost.

Not a test; prints figures next to the ones measured before the hardening (issue 9). Starts a
real plane on loopback (atdirectory + one atserver over TLS, default limits) and measures:

* the reply time of the unauthenticated line `scan (.+)+(.+)+X` (client regex, now RE2),
  with 50 public keys stored, and the worst `noop:0` round trip of another, authenticated
  client while those lines run;
* unauthenticated 200 KB lines (`stats:1,1,...`, `notify:all:a,a,...`): time until refused
  and the worst round trip of the other client meanwhile;
* server RSS per idle TLS connection (N connections that completed TLS and read the prompt)
  and what is left after they close.

    .venv/bin/python -m bench.atserver_hostile            # N = 1000
    .venv/bin/python -m bench.atserver_hostile --quick    # N = 300
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import socket
import ssl
import threading
import time
from pathlib import Path

from noports import crypto
from tests.integration.test_atserver_s2s import Plane

ROOT = Path(__file__).resolve().parents[1]

BEFORE = {
    "scan": "25.9 s (whole server frozen)",
    "big": "2.0-4.3 s loop stall per line",
    "idle": "~241 KiB per idle TLS connection, kept after close",
}


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


class Pinger(threading.Thread):
    """An authenticated client sending noop:0 in a loop; records the worst round trip."""

    def __init__(self, plane: Plane, port: int) -> None:
        super().__init__(daemon=True)
        self.c = plane.client(port)
        ch = self.c.data("from:@ann")
        assert self.c.data("cram:" + crypto.cram_digest(plane.secrets["@ann"], ch)) == "success"
        self.worst = 0.0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            t = time.perf_counter()
            assert self.c.data("noop:0") == "ok"
            self.worst = max(self.worst, time.perf_counter() - t)
            time.sleep(0.005)

    def reset(self) -> float:
        w, self.worst = self.worst, 0.0
        return w


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    n_idle = 300 if args.quick else 1000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        plane = Plane(Path(tmp))
        plane.add("p1", "@ann")
        s = plane.start("p1", ["@ann"])
        port, pid = s["ports"]["@ann"], s["proc"].pid
        try:
            owner = plane.client(port)
            ch = owner.data("from:@ann")
            assert owner.data("cram:" + crypto.cram_digest(plane.secrets["@ann"], ch))
            for i in range(50):
                owner.data(f"update:public:{'a' * 40}{i}@ann v")
            pinger = Pinger(plane, port)
            pinger.start()
            time.sleep(0.3)
            pinger.reset()

            anon = plane.client(port)
            times = []
            for _ in range(5):
                t = time.perf_counter()
                assert anon.cmd("scan (.+)+(.+)+X").startswith("data:")
                times.append(time.perf_counter() - t)
            print(f"{'unauth scan (.+)+(.+)+X reply':44} now {max(times) * 1000:8.2f} ms (worst "
                  f"of 5), other client's worst noop {pinger.reset() * 1000:.1f} ms"
                  f"   before: {BEFORE['scan']}")

            for label, line in (("stats:1,1,... 200 KB", b"stats:" + b"1," * 100_000),
                                ("notify:all:a,a,... 200 KB",
                                 b"notify:all:" + b"a," * 100_000 + b":key")):
                c = plane.client(port)
                t = time.perf_counter()
                with contextlib.suppress(OSError):
                    c.sock.sendall(line + b"\n")
                with contextlib.suppress(OSError):
                    c._read_until(lambda b: b"\n" in b)
                print(f"{'unauth ' + label:44} now refused in "
                      f"{(time.perf_counter() - t) * 1000:6.2f} ms, other client's worst noop "
                      f"{pinger.reset() * 1000:.1f} ms   before: {BEFORE['big']}")
                c.close()
            pinger.stop.set()
            pinger.join()

            time.sleep(1)
            base = rss_kib(pid)
            ctx = ssl.create_default_context(cafile=str(plane.cafile))
            for rnd in (1, 2):  # a second round shows whether what stays after close grows
                socks = []
                for i in range(n_idle):
                    raw = socket.create_connection(("127.0.0.1", port), timeout=15,
                                                   source_address=(f"127.0.1.{i % 200 + 1}", 0))
                    tls = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
                    assert tls.recv(10) == b"@"
                    socks.append(tls)
                time.sleep(2)
                held = rss_kib(pid)
                for t in socks:
                    t.close()
                time.sleep(6)  # the server trims its heap once a burst of closes pauses
                after = rss_kib(pid)
                print(f"{f'idle TLS connections: {n_idle}, round {rnd}':44} now "
                      f"{(held - base) / n_idle:6.1f} KiB each (RSS {base} -> {held} KiB), "
                      f"after close {after} KiB ({after - base:+d})   before: {BEFORE['idle']}")
        finally:
            plane.stop_all()


if __name__ == "__main__":
    main()
