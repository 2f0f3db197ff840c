"""sshnpd's way back after an outage: a daemon run as systemd runs it, cuts, pings.

Shared by tests/integration/test_daemon_liveness.py (kill -9, 30 s cut) and
tests/integration/test_daemon_long_cut.py (10-minute cut). Each test module builds its own
world (its own namespaces, ports, notify socket under its tmp dir): nothing here is global.

* :func:`daemon_world` — a one-device world whose sshnpd sends sd_notify to a socket the test
  reads (``NOTIFY_SOCKET``, ``WATCHDOG_USEC``) and heartbeats its monitor every ``beat`` s;
* :func:`firewall_cut` — nftables drop between the device and the relay namespace (no RST, no
  FIN: the monitor connection just stalls), lifted after the cut's full length;
* :func:`ping_until_answered` — a real client pings the device until its heartbeat answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from tests.harness.plane import AtServer, tool
from tests.harness.world import CLIENT, World, _client, device_atsign, device_name, noports_world

DEV = device_name(1)
BEAT = 2.0  # --monitor-heartbeat for these tests: a stall is noticed within ~3 s
CUT_TABLE = "npcut"


@contextlib.contextmanager
def daemon_world(base: Path, *, beat: float = BEAT) -> Iterator[World]:
    """One device; its sshnpd runs as systemd would run it. ``w.notify`` is the socket."""
    with noports_world(base, n_devices=1, daemons=False) as w:
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify_path = base / "notify.sock"
        notify.bind(str(notify_path))
        notify.settimeout(0.2)
        argv = w.sshnpd_argv(1, extra=["--monitor-heartbeat", str(beat)])
        env = {"HOME": str(w.device(1).home), "NOTIFY_SOCKET": str(notify_path),
               "WATCHDOG_USEC": "4000000"}  # WatchdogSec=4: WATCHDOG=1 every 2 s
        proc = w.topo.spawn_in(w.device(1).ns, argv, env=env)
        proc.wait_for(r'"event": "ready"', timeout=60)
        w.daemons[1] = proc
        w.notify = notify  # type: ignore[attr-defined]
        try:
            yield w
        finally:
            notify.close()
            if os.environ.get("SSHNPD_TEST_LOGS"):
                print("\n".join(proc.lines))


def users_server(w: World) -> AtServer:
    """The atServer process that hosts the device's atSign."""
    return next(s for s in w.plane.servers if device_atsign(1).lower() in s.ports)


def restart_atserver(w: World, old: AtServer) -> AtServer:
    """Same state dir, so the same port (persisted) and the same stored data."""
    p = w.plane.plane
    proc = w.topo.spawn_in(w.topo.relay_ns, [
        tool("atserver"), "serve", "--state-dir", str(old.state_dir), "--tls-dir",
        str(p.tls.directory), "--root", p.root, "--host", p.host])
    for atsign in old.ports:
        proc.wait_for(rf"atserver {re.escape(atsign)} listening on", timeout=30)
    new = AtServer(proc, old.state_dir, dict(old.ports))
    p.servers[p.servers.index(old)] = new
    return new


async def ping_until_answered(w: World, deadline_s: float = 60.0) -> float:
    """Ping the device until its heartbeat comes back; seconds it took."""
    t0 = time.monotonic()
    while True:
        try:
            c = await asyncio.wait_for(_client(w, CLIENT), 10)
        except Exception:
            if time.monotonic() - t0 > deadline_s:
                raise
            await asyncio.sleep(0.2)
            continue
        try:
            mon = c.monitor(f"heartbeat.{DEV}.sshnp", backoff_max_s=0.5)
            await mon.wait_ready(10)
            await c.notify(device_atsign(1), f"ping.{DEV}.sshnp", "ping", ttl_ms=5_000)
            try:
                n = await asyncio.wait_for(mon.__anext__(), 1.0)
            except asyncio.TimeoutError:
                if time.monotonic() - t0 > deadline_s:
                    raise AssertionError(f"device silent {deadline_s:g}s after the "
                                         "atServer came back") from None
                continue
            assert json.loads(n.value)["devicename"] == DEV
            return time.monotonic() - t0
        finally:
            await c.close()


def run(coro, timeout: float = 120.0):  # noqa: ANN001, ANN201 - any coroutine
    return asyncio.run(asyncio.wait_for(coro, timeout))


def datagrams(sock: socket.socket, seconds: float) -> list[bytes]:
    out: list[bytes] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        with contextlib.suppress(TimeoutError):
            out.append(sock.recv(4096))
    return out


def firewall_cut(w: World, seconds: float) -> tuple[float, list[str]]:
    """Drop everything between the device and the relay namespace for ``seconds``.

    Returns (seconds from lifting the cut until the daemon's monitor was started again, the
    daemon's log lines since the cut began). Waits for the reconnect with a hang bound only."""
    d = w.daemons[1]
    ns = w.device(1).ns
    relay_ip = w.topo.relay_address
    rules = (f"table inet {CUT_TABLE} {{\n"
             f"  chain o {{ type filter hook output priority -10; ip daddr {relay_ip} drop; }}\n"
             f"  chain i {{ type filter hook input priority -10; ip saddr {relay_ip} drop; }}\n"
             f"}}\n")
    start = len(d.lines)
    w.topo.run_in(ns, ["nft", "-f", "-"], input=rules)
    t_cut = time.monotonic()
    try:
        # nothing closes the connection: only the daemon's own heartbeat can notice
        d.wait_for(r"monitor connection lost \(AtTimeoutError\)", timeout=seconds,
                   start=start)
        time.sleep(max(0.0, seconds - (time.monotonic() - t_cut)))  # the cut's full length
        mark = len(d.lines)
    finally:
        w.topo.run_in(ns, ["nft", "delete", "table", "inet", CUT_TABLE])
    t_lift = time.monotonic()
    d.wait_for(r"monitor started", timeout=120, start=mark)  # hang bound only
    back = time.monotonic() - t_lift
    return back, d.lines[start:]


__all__ = ["BEAT", "DEV", "daemon_world", "datagrams", "firewall_cut", "ping_until_answered",
           "restart_atserver", "run", "users_server"]
