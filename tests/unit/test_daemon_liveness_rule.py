"""sshnpd liveness rule, reconnect back-off and sd_notify over a real AF_UNIX datagram socket."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from noports.daemon.liveness import (
    RECONNECT_BACKOFF_MAX_S,
    LivenessRule,
    Sample,
    backoff_delay,
    notify_socket_address,
    sd_notify,
    watchdog_interval,
)


def sample(now: float, *, alive: bool = True, connected: bool = True, probe: str = "ok",
           worker: bool = True) -> Sample:
    return Sample(now=now, monitor_task_alive=alive, monitor_connected=connected,
                  probe=probe, worker_ok=worker)


def test_backoff_is_capped_at_most_5s_and_jittered():
    delays = [backoff_delay(a, jitter=1.0) for a in range(30)]
    assert delays[0] == 0.25 and delays == sorted(delays)
    assert max(delays) == RECONNECT_BACKOFF_MAX_S <= 5.0
    assert backoff_delay(50, jitter=0.5) == RECONNECT_BACKOFF_MAX_S / 2
    assert backoff_delay(50, jitter=7.0) == RECONNECT_BACKOFF_MAX_S  # factor clamped


def test_healthy_daemon_passes():
    v = LivenessRule().decide(sample(0))
    assert v.ok and "connected" in v.reason


def test_atserver_outage_does_not_fail_the_check():
    """A restart would not bring the atServer back and would cut relay sessions."""
    rule = LivenessRule(monitor_down_grace=60)
    for t in range(0, 3600, 10):
        v = rule.decide(sample(t, connected=False, probe="network"))
        assert v.ok, v.reason
    assert "unreachable" in v.reason


def test_monitor_down_while_atserver_answers_fails_after_grace():
    rule = LivenessRule(monitor_down_grace=60)
    assert rule.decide(sample(0, connected=False)).ok  # reconnecting
    assert rule.decide(sample(59, connected=False)).ok
    v = rule.decide(sample(61, connected=False))
    assert not v.ok and "monitor has been down for 61s" in v.reason
    assert rule.decide(sample(62)).ok  # it came back: the clock restarts
    assert rule.decide(sample(100, connected=False)).ok


def test_grace_starts_when_the_atserver_is_reachable_again():
    """After a 10-minute outage the probe got through 0.2 s before the monitor reconnected
    and the check failed ("down for 581s"); the outage itself must not use up the grace."""
    rule = LivenessRule(monitor_down_grace=60)
    for t in range(0, 600, 10):  # the last unreachable sample is at 590
        assert rule.decide(sample(t, connected=False, probe="network")).ok
    assert rule.decide(sample(600, connected=False)).ok  # reachable; monitor a moment behind
    assert rule.decide(sample(649, connected=False)).ok
    v = rule.decide(sample(651, connected=False))
    assert not v.ok and "monitor has been down for 61s" in v.reason


def test_dead_monitor_task_hung_probe_and_stuck_workers_fail():
    assert "monitor task" in LivenessRule().decide(sample(0, alive=False)).reason
    v = LivenessRule().decide(sample(0, probe="hung"))
    assert not v.ok and "did not end" in v.reason
    v = LivenessRule().decide(sample(0, worker=False))
    assert not v.ok and "worker threads" in v.reason


def test_watchdog_interval_from_systemd_environment():
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "junk"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "120000000"}) == 60.0
    env = {"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": "4242"}
    assert watchdog_interval(env, pid=4242) == 10.0
    assert watchdog_interval(env, pid=4243) is None  # meant for another process


def test_notify_socket_address_forms():
    assert notify_socket_address({}) is None
    assert notify_socket_address({"NOTIFY_SOCKET": "/run/systemd/notify"}) == \
        "/run/systemd/notify"
    assert notify_socket_address({"NOTIFY_SOCKET": "@abstract"}) == "\0abstract"
    assert notify_socket_address({"NOTIFY_SOCKET": "vsock:2:1234"}) is None


@pytest.fixture
def notify_socket(tmp_path: Path):
    path = tmp_path / "notify"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv.bind(str(path))
    srv.settimeout(10)
    yield path, srv
    srv.close()


def test_sd_notify_sends_one_datagram(notify_socket):
    path, srv = notify_socket
    assert sd_notify("READY=1\nSTATUS=serving", {"NOTIFY_SOCKET": str(path)})
    assert srv.recv(4096) == b"READY=1\nSTATUS=serving"
    assert sd_notify("WATCHDOG=1", {"NOTIFY_SOCKET": str(path)})
    assert srv.recv(4096) == b"WATCHDOG=1"


def test_sd_notify_abstract_namespace():
    name = f"noports-test-{os.getpid()}"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv.bind("\0" + name)
    srv.settimeout(10)
    try:
        assert sd_notify("READY=1", {"NOTIFY_SOCKET": "@" + name})
        assert srv.recv(64) == b"READY=1"
    finally:
        srv.close()


def test_sd_notify_without_systemd_or_with_a_dead_socket_is_harmless(tmp_path):
    assert sd_notify("READY=1", {}) is False
    assert sd_notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "gone")}) is False


def test_sd_notify_never_blocks_when_the_manager_stops_reading(notify_socket):
    """The queue of an unread notify socket fills after net.unix.max_dgram_qlen (10)
    datagrams; a blocking send then froze the whole daemon (its event loop) for good, which
    is how a 10-minute network cut turned into a silent sshnpd. Extra messages are dropped
    with one warning, and sending works again once the manager reads."""
    path, srv = notify_socket
    code = ("import logging; logging.basicConfig(level=logging.WARNING)\n"
            "from noports.daemon.liveness import sd_notify\n"
            "print(sum(sd_notify('WATCHDOG=1') for _ in range(200)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "NOTIFY_SOCKET": str(path)}, timeout=60)
    assert out.returncode == 0, out.stderr
    delivered = int(out.stdout)
    assert 0 < delivered < 200  # the queue filled up and the rest was dropped, not waited for
    assert out.stderr.count("notify socket's queue is full") == 1, out.stderr
    assert "is the service manager reading $NOTIFY_SOCKET?" in out.stderr
    for _ in range(delivered):
        assert srv.recv(64) == b"WATCHDOG=1"
    assert sd_notify("WATCHDOG=1", {"NOTIFY_SOCKET": str(path)})
    assert srv.recv(64) == b"WATCHDOG=1"


def test_sd_notify_reads_the_real_environment(notify_socket):
    """As systemd runs it: a child process with NOTIFY_SOCKET in its environment."""
    path, srv = notify_socket
    code = "from noports.daemon.liveness import sd_notify; print(sd_notify('READY=1'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "NOTIFY_SOCKET": str(path)}, timeout=60)
    assert out.stdout.strip() == "True", out.stderr
    assert srv.recv(64) == b"READY=1"


def test_role_unit_uses_the_watchdog():
    unit = (Path(__file__).resolve().parents[2] / "roles" / "sshnpd" / "templates"
            / "sshnpd.service.j2").read_text()
    assert "\nType=notify\n" in unit and "\nNotifyAccess=main\n" in unit
    sec = int(unit.split("\nWatchdogSec=", 1)[1].split("\n", 1)[0])
    assert sec >= 90  # above the slowest probe (lookup + TLS + from + pkam + noop)


# --- a revoked enrollment (AT0027) is permanent until an operator acts -------------------------

def test_revoked_refusal_waits_the_long_interval_not_the_backoff():
    from noports.daemon.liveness import REVOKED_RETRY_S, RevocationGate, backoff_delay

    g = RevocationGate()
    assert g.may_try(0.0)
    assert g.refused("AT0027", 100.0) == REVOKED_RETRY_S
    assert 60 * backoff_delay(99) <= REVOKED_RETRY_S  # far above the 2-4 s reconnect cap
    assert g.first_refusal  # the one error is logged now ...
    assert not g.may_try(100.0 + REVOKED_RETRY_S - 1)  # the probe does not log in meanwhile
    assert g.may_try(100.0 + REVOKED_RETRY_S)
    assert g.refused("AT0027", 400.0) == REVOKED_RETRY_S
    assert not g.first_refusal and g.revoked_since == 100.0  # ... and not again
    assert g.cleared()  # re-approved: back to normal, and the next revocation logs again
    assert g.may_try(401.0) and not g.cleared()
    assert g.refused("AT0027", 500.0) and g.first_refusal


def test_other_refusals_keep_their_behaviour():
    from noports.daemon.liveness import RevocationGate

    g = RevocationGate()
    for code in ("AT0401", "AT0026", "AT0025", ""):
        assert g.refused(code, 1.0) is None
    assert g.revoked_since is None and g.may_try(1.0)


def test_revoked_message_names_the_revocation_and_the_fix():
    from noports.daemon.liveness import REVOKED_RETRY_S, revoked_message

    m = revoked_message("@fleet", "e-123", "AT0027: enrollment_id: e-123 is revoked")
    assert "enrollment e-123 of @fleet is revoked" in m
    assert "noports enroll request @fleet" in m and "restart sshnpd" in m
    assert f"every {REVOKED_RETRY_S:.0f} s" in m
