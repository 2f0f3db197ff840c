"""sshnpd never goes silent: it comes back by itself after its atServer is killed or cut off.

Real parts only: the topology (network namespaces + nftables when root), our atServer and
directory over TLS, sshnpd as a subprocess, and a real ping/heartbeat notification round trip
from the client's side. The daemon runs as systemd would run it (``NOTIFY_SOCKET``,
``WATCHDOG_USEC``) and the test is the notify socket.

* kill -9 of the device's atServer, restart on the same port: the daemon answers again;
* a 30 s firewall cut (nftables drop in the device's namespace: no RST, no FIN, the monitor
  connection just stalls): the daemon notices by its heartbeat, reconnects when the path
  is back, and answers again. A 10-minute cut is the same code path with a longer wait:
  ``NOPORTS_SLOW=1`` runs it.

Reconnect times are printed (``[liveness] ...``), never asserted; bench/daemon_reconnect.py
prints them side by side with the previous settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import time

import pytest

from tests.harness.plane import AtServer, tool
from tests.harness.topology import is_root
from tests.harness.world import CLIENT, _client, device_atsign, device_name, noports_world

pytestmark = pytest.mark.integration

DEV = device_name(1)
BEAT = 2.0  # --monitor-heartbeat for these tests: stall noticed within ~3 s


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("liveness")
    with noports_world(base, n_devices=1, daemons=False) as w:
        yield from _with_daemon(w, base)


def _with_daemon(w, base):
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify_path = base / "notify.sock"
    notify.bind(str(notify_path))
    notify.settimeout(0.2)
    argv = w.sshnpd_argv(1, extra=["--monitor-heartbeat", str(BEAT)])
    env = {"HOME": str(w.device(1).home), "NOTIFY_SOCKET": str(notify_path),
           "WATCHDOG_USEC": "4000000"}  # WatchdogSec=4: WATCHDOG=1 every 2 s
    proc = w.topo.spawn_in(w.device(1).ns, argv, env=env)
    proc.wait_for(r'"event": "ready"', timeout=30)
    w.daemons[1] = proc
    w.notify = notify
    yield w
    notify.close()
    if os.environ.get("SSHNPD_TEST_LOGS"):
        print("\n".join(proc.lines))


def users_server(w) -> AtServer:
    return next(s for s in w.plane.servers if device_atsign(1).lower() in s.ports)


def restart_atserver(w, old: AtServer) -> AtServer:
    """Same state dir, so the same port (persisted) and the same stored data."""
    p = w.plane.plane
    proc = w.topo.spawn_in(w.topo.relay_ns, [
        tool("atserver"), "serve", "--state-dir", str(old.state_dir), "--tls-dir",
        str(p.tls.directory), "--root", p.root, "--host", p.host])
    for atsign in old.ports:
        proc.wait_for(rf"atserver {re.escape(atsign)} listening on", timeout=20)
    new = AtServer(proc, old.state_dir, dict(old.ports))
    p.servers[p.servers.index(old)] = new
    return new


async def ping_until_answered(w, deadline_s: float = 60.0) -> float:
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


def run(coro, timeout: float = 120.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def datagrams(sock: socket.socket, seconds: float) -> list[bytes]:
    out: list[bytes] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        with contextlib.suppress(TimeoutError):
            out.append(sock.recv(4096))
    return out


def test_ready_and_watchdog_sent_to_systemd_while_healthy(world):
    got = datagrams(world.notify, 5.0)  # queued since the daemon started
    assert got and got[0].startswith(b"READY=1\n"), got
    assert any(d.startswith(b"STATUS=serving") for d in got), got
    assert got.count(b"WATCHDOG=1") >= 1, got
    run(ping_until_answered(world, 20))


def test_answers_again_after_atserver_kill9(world):
    d = world.daemons[1]
    old = users_server(world)
    start = len(d.lines)
    old.proc.kill9()
    d.wait_for(r"monitor connection lost", timeout=20, start=start)
    time.sleep(3)  # let the back-off grow, as in a real outage
    new = restart_atserver(world, old)
    assert new.proc.popen.poll() is None
    took = run(ping_until_answered(world))
    print(f"\n[liveness] kill -9 + restart: device answered a ping {took:.1f}s after the "
          "atServer was back")
    assert d.popen.poll() is None


def _cut(world, seconds: float) -> tuple[float, list[str]]:
    d = world.daemons[1]
    ns = world.device(1).ns
    relay_ip = world.topo.relay_address
    rules = (f"table inet npcut {{\n"
             f"  chain o {{ type filter hook output priority -10; ip daddr {relay_ip} drop; }}\n"
             f"  chain i {{ type filter hook input priority -10; ip saddr {relay_ip} drop; }}\n"
             f"}}\n")
    start = len(d.lines)
    world.topo.run_in(ns, ["nft", "-f", "-"], input=rules)
    t_cut = time.monotonic()
    try:
        # nothing closes the connection: only the daemon's own heartbeat can notice
        d.wait_for(r"monitor connection lost \(AtTimeoutError\)", timeout=seconds,
                   start=start)
        time.sleep(max(0.0, seconds - (time.monotonic() - t_cut)))  # the cut's full length
    finally:
        world.topo.run_in(ns, ["nft", "delete", "table", "inet", "npcut"])
    took = run(ping_until_answered(world))
    return took, d.lines[start:]


@pytest.mark.skipif(not is_root(), reason="the firewall cut needs root (netns + nftables)")
def test_answers_again_after_30s_firewall_cut(world):
    took, lines = _cut(world, 30.0)
    print(f"\n[liveness] 30 s nftables cut: device answered a ping {took:.1f}s after the "
          "cut was lifted")
    assert any("heartbeat" in ln or "AtTimeoutError" in ln for ln in lines)
    assert world.daemons[1].popen.poll() is None


@pytest.mark.skipif(not (is_root() and os.environ.get("NOPORTS_SLOW") == "1"),
                    reason="10-minute cut: set NOPORTS_SLOW=1 (and be root)")
def test_answers_again_after_10min_firewall_cut(world):
    took, _lines = _cut(world, 600.0)
    print(f"\n[liveness] 10 min nftables cut: device answered {took:.1f}s after the cut")
    assert world.daemons[1].popen.poll() is None

