#!/usr/bin/env python3
"""How soon sshnpd answers again after its atServer comes back, before/after the liveness work.

Not a test: it prints figures. A real plane on loopback (atdirectory + one atserver over
TLS) hosts @device and @client; sshnpd runs as a subprocess. Each round kills the atServer
with SIGKILL, keeps it down for ``--outage`` seconds (the daemon's back-off grows meanwhile),
restarts it on the same port, and measures until a ping from @client gets the device's
heartbeat back (a real notification round trip; the client's own connect is included).

Side by side, interleaved round by round:

* ``baseline``: the settings before (monitor heartbeat 30 s, reconnect back-off capped at
  30 s), emulated by patching the daemon's constant in its process;
* ``current``: the shipped defaults (heartbeat 15 s, back-off capped at 4 s, jitter 0.5-1).

    .venv/bin/python -m bench.daemon_reconnect               # 3 rounds, 30 s outages
    .venv/bin/python -m bench.daemon_reconnect --quick       # 1 round, 10 s outages
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from noports import crypto
from noports.atclient.aio import AtClient
from noports.keys.ca import client_context
from noports.keys.onboarding import activate
from tests.harness.plane import Plane, Proc, spawn

PATCH = {"baseline": "import noports.daemon.service as s; s.RECONNECT_BACKOFF_MAX_S = 30.0; ",
         "current": ""}
BEAT = {"baseline": "30", "current": "15"}


def start_daemon(plane: Plane, base: Path, variant: str) -> Proc:
    args = ["-a", "@device", "-m", "@client", "-d", variant,
            "-k", str(base / "keys" / "@device_key.atKeys"), "--root-domain", plane.root,
            "--ca-file", str(plane.tls.ca_cert),
            "--authorized-keys", str(base / variant / "authorized_keys"),
            "--sshd-host-keys", str(base / "none" / "*.pub"),
            "--storage-path", str(base / variant / "state"),
            "--monitor-heartbeat", BEAT[variant], "--log-format", "json"]
    code = (PATCH[variant] + "import sys; from noports.daemon.cli import main; "
            f"sys.exit(main({args!r}))")
    proc = spawn([sys.executable, "-c", code])
    proc.wait_for(r'"event": "ready"', timeout=60)
    return proc


async def ping(root: tuple[str, int], ctx, keys, device: str, limit: float = 120) -> float:  # noqa: ANN001
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        try:
            c = await asyncio.wait_for(AtClient.connect("@client", keys, root, ctx), 10)
        except Exception:  # noqa: BLE001 - atServer not up yet
            await asyncio.sleep(0.1)
            continue
        try:
            mon = c.monitor(f"heartbeat.{device}.sshnp", backoff_max_s=0.5)
            await mon.wait_ready(10)
            await c.notify("@device", f"ping.{device}.sshnp", "ping", ttl_ms=5000)
            try:
                n = await asyncio.wait_for(mon.__anext__(), 1.0)
                if json.loads(n.value).get("devicename") == device:
                    return time.monotonic() - t0
            except asyncio.TimeoutError:
                pass
        finally:
            await c.close()
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--outage", type=float, default=30.0)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    if a.quick:
        a.rounds, a.outage = 1, 10.0
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        plane = Plane(base / "plane")
        plane.start_directory()
        secrets = {s: crypto.generate_cram_secret() for s in ("@device", "@client")}
        server = plane.start_atserver("srv", secrets)
        ctx = client_context(plane.tls.ca_cert)
        root = (plane.directory.host, plane.directory.port)
        keys = {s: activate(s, v, root, ctx, keys_path=base / "keys" / f"{s}_key.atKeys")
                for s, v in secrets.items()}
        daemons = {v: start_daemon(plane, base, v) for v in ("baseline", "current")}
        results: dict[str, list[float]] = {v: [] for v in daemons}
        try:
            for r in range(a.rounds):
                server.proc.kill9()
                time.sleep(a.outage)
                server = plane.start_atserver("srv", restart_of=server)
                t_back = time.monotonic()

                async def both() -> dict[str, float]:
                    got = await asyncio.gather(*(ping(root, ctx, keys["@client"], v)
                                                 for v in daemons))
                    return dict(zip(daemons, got, strict=True))
                for v, took in asyncio.run(both()).items():
                    results[v].append(took)
                print(f"round {r + 1}: outage {a.outage:g}s; answered after the restart: "
                      + ", ".join(f"{v} {results[v][-1]:.1f}s" for v in daemons)
                      + f" (round took {time.monotonic() - t_back:.1f}s)", flush=True)
        finally:
            for d in daemons.values():
                d.stop()
            plane.stop()
    print(f"\nseconds from atServer restart to a ping answered ({a.rounds} round(s), "
          f"{a.outage:g}s outages)")
    print(f"{'variant':<10} {'median':>7} {'max':>7}  settings")
    for v, xs in results.items():
        print(f"{v:<10} {statistics.median(xs):7.1f} {max(xs):7.1f}  heartbeat {BEAT[v]}s, "
              f"back-off cap {'30' if v == 'baseline' else '4'}s")


if __name__ == "__main__":
    main()
