#!/usr/bin/env python3
"""One shared connection (MuxClient, the agent's) vs two connections (AtClient, sshnp's).

Not a test; prints figures side by side and asserts nothing. A real plane on loopback
(atdirectory + one atserver over TLS). Per client, interleaved rounds:

* start: construct, start a monitor (replaying the last 2 s, like the agent's hub), and run
  one command; done when both the monitor is ready and the command answered. AtClient logs
  in twice concurrently; MuxClient logs in once, then waits MONITOR_SETTLE_S and a probe
  round trip after ``monitor`` (decision 0031);
* warm command: ``noop:0`` round trip on the established client (MuxClient: through the
  reader task).

    .venv/bin/python -m bench.mux_startup              # 4 rounds x 10 clients per kind
    .venv/bin/python -m bench.mux_startup --rounds 6 --clients 20
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from noports.atclient.aio import AtClient
from noports.atclient.mux import MuxClient
from tests.harness.plane import Plane


async def one(cls: type, keys: object, root: tuple[str, int], ctx: object,
              commands: int) -> tuple[float, float, int]:
    t0 = time.perf_counter()
    c = cls("@bob", keys, root, ctx)
    m = c.monitor(r"\.x@", since_ms=int(time.time() * 1000) - 2000)
    m.start()
    await asyncio.gather(m.wait_ready(10), c.command("noop:0"))
    start = time.perf_counter() - t0
    t1 = time.perf_counter()
    for _i in range(commands):
        await c.command("noop:0")
    warm = (time.perf_counter() - t1) / commands
    logins = getattr(c, "logins", 2)
    await c.close()
    return start, warm, logins


async def run(args: argparse.Namespace, plane: Plane, keys: dict) -> None:
    root, ctx = plane.root_tuple, plane.ssl_context()
    res: dict[str, list[tuple[float, float, int]]] = {"AtClient": [], "MuxClient": []}
    for _r in range(args.rounds):
        for cls in (AtClient, MuxClient):
            for _i in range(args.clients):
                res[cls.__name__].append(await one(cls, keys["@bob"], root, ctx, args.commands))
    print(f"{'client':10s} {'logins':>6s} {'start p50 ms':>13s} {'start p90 ms':>13s} "
          f"{'warm cmd p50 ms':>16s}")
    for name, rows in res.items():
        starts = sorted(r[0] * 1000 for r in rows)
        warms = [r[1] * 1000 for r in rows]
        print(f"{name:10s} {rows[0][2]:6d} {statistics.median(starts):13.1f} "
              f"{starts[int(len(starts) * 0.9) - 1]:13.1f} {statistics.median(warms):16.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--commands", type=int, default=20)
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="mux-bench-"))
    plane = Plane(base / "plane", keys_dir=base / "keys")
    try:
        keys = plane.populate({"s1": ["@bob"]})
        asyncio.run(run(args, plane, keys))
    finally:
        plane.stop()


if __name__ == "__main__":
    main()
