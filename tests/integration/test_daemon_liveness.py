"""sshnpd never goes silent: it comes back by itself after its atServer is killed or cut off.

Real parts only: the topology (network namespaces + nftables when root), our atServer and
directory over TLS, sshnpd as a subprocess, and a real ping/heartbeat notification round trip
from the client's side. The daemon runs as systemd would run it (``NOTIFY_SOCKET``,
``WATCHDOG_USEC``) and the test is the notify socket (tests/harness/liveness.py).

* kill -9 of the device's atServer, restart on the same port: the daemon answers again;
* a 30 s firewall cut (nftables drop in the device's namespace: no RST, no FIN, the monitor
  connection just stalls): the daemon notices by its heartbeat, reconnects when the path
  is back, and answers again. The 10-minute cut is tests/integration/test_daemon_long_cut.py
  (marker ``long``).

Reconnect times are printed (``[liveness] ...``), never asserted here; bench/daemon_reconnect.py
prints them side by side with the previous settings.
"""

from __future__ import annotations

import time

import pytest

from tests.harness.liveness import (
    daemon_world,
    datagrams,
    firewall_cut,
    ping_until_answered,
    restart_atserver,
    run,
    users_server,
)
from tests.harness.topology import is_root

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    with daemon_world(tmp_path_factory.mktemp("liveness")) as w:
        yield w


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


@pytest.mark.skipif(not is_root(), reason="the firewall cut needs root (netns + nftables)")
def test_answers_again_after_30s_firewall_cut(world):
    back, lines = firewall_cut(world, 30.0)
    took = run(ping_until_answered(world))
    print(f"\n[liveness] 30 s nftables cut: monitor back {back:.1f}s after the cut was "
          f"lifted, a ping answered {took:.1f}s after that")
    assert any("heartbeat" in ln or "AtTimeoutError" in ln for ln in lines)
    assert world.daemons[1].popen.poll() is None
