"""sshnpd liveness: the rule that says whether the daemon is doing its job, and sd_notify.

Why: the most frequent complaint about device daemons is one that goes silent after hours or
days. Network-level silence (a dead or stalled monitor connection) is handled where it
happens: the monitor heartbeats ``noop:0`` and reconnects with a capped, jittered back-off.
This module covers the rest: a daemon that is wedged (event loop blocked, worker threads
stuck on a hung filesystem, monitor supervisor dead, monitor never coming back although the
atServer answers). The daemon samples itself every few seconds; :class:`LivenessRule`
decides (pure, unit-tested without sockets) and only a passing check sends ``WATCHDOG=1`` to
systemd, so a wedged daemon stops feeding the watchdog and systemd restarts it.

What deliberately does NOT fail the check: an atServer that is down or unreachable (every
probe fails with a network error). Restarting would not bring it back and would cut the SSH
sessions that run over the relay, which do not need the atServer; the monitor keeps retrying
every few seconds instead.

``sd_notify`` is the documented datagram protocol (one ``AF_UNIX``/``SOCK_DGRAM`` message to
``$NOTIFY_SOCKET``, ``@`` meaning the abstract namespace): a dozen lines, no dependency.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass

log = logging.getLogger("noports.sshnpd")

#: monitor heartbeat: ``noop:0`` after this long without traffic ...
MONITOR_HEARTBEAT_S = 15.0
#: ... and the connection is declared dead when nothing answers within this
MONITOR_HEARTBEAT_TIMEOUT_S = 5.0
#: reconnect back-off: base * 2^attempt, capped, times a jitter factor in [0.5, 1]
RECONNECT_BACKOFF_BASE_S = 0.25
RECONNECT_BACKOFF_MAX_S = 4.0
#: a revoked enrollment (AT0027) does not come back by itself: log in again only this often
#: (still retrying, so a device the operator reinstates returns without a visit)
REVOKED_RETRY_S = 300.0
#: atServer refusals that are permanent until an operator acts
REVOKED_CODES = frozenset({"AT0027"})
#: how often the daemon samples itself when systemd asks for no watchdog
CHECK_INTERVAL_S = 10.0
#: a probe (``noop:0`` on the command connection, a worker-thread round trip) must end in this
PROBE_TIMEOUT_S = 5.0
#: monitor down this long while the atServer answers probes = wedged monitor
MONITOR_DOWN_GRACE_S = 60.0


def backoff_delay(attempt: int, base: float = RECONNECT_BACKOFF_BASE_S,
                  cap: float = RECONNECT_BACKOFF_MAX_S, jitter: float = 1.0) -> float:
    """Delay before reconnect ``attempt`` (0-based); ``jitter`` is the factor in [0.5, 1]."""
    return min(cap, base * 2 ** min(attempt, 20)) * min(1.0, max(0.5, jitter))


def revoked_message(atsign: str, enrollment_id: str | None, detail: str) -> str:
    """The one error a revoked device logs: what happened and what the operator does."""
    eid = f" {enrollment_id}" if enrollment_id else ""
    return (f"the enrollment{eid} of {atsign} is revoked ({detail}): the atServer refuses "
            f"this device's key. Re-enroll the device (`noports enroll request {atsign} "
            f"--device NAME ...`, approved by the operator) and restart sshnpd with the new "
            f"keys; until then sshnpd tries to log in once every {REVOKED_RETRY_S:.0f} s")


class RevocationGate:
    """Whether our key was refused as revoked, and when a login may be tried again.

    Why: without this the monitor's reconnect loop (2-4 s back-off cap) and the liveness
    probe keep logging in with a key the atServer will refuse until an operator acts. Pure:
    the service edge passes the clock and the refusal's error code.
    """

    def __init__(self, retry_s: float = REVOKED_RETRY_S) -> None:
        self.retry_s = retry_s
        self.revoked_since: float | None = None
        self.refusals = 0  # revocation refusals in this episode
        self._last_try: float | None = None

    def refused(self, code: str, now: float) -> float | None:
        """A login was refused with ``code``: the delay before the next try, or None when
        the refusal is not a revocation (the caller's ordinary back-off applies)."""
        if code not in REVOKED_CODES:
            return None
        if self.revoked_since is None:
            self.revoked_since = now
        self.refusals += 1
        self._last_try = now
        return self.retry_s

    @property
    def first_refusal(self) -> bool:
        """The last refusal started this revocation episode (log the error once)."""
        return self.refusals == 1

    def may_try(self, now: float) -> bool:
        """A login may be tried now (not revoked, or the retry interval has passed)."""
        return self._last_try is None or now - self._last_try >= self.retry_s

    def cleared(self) -> bool:
        """A login succeeded: the enrollment is valid again. True when it had been revoked."""
        was = self.revoked_since is not None
        self.revoked_since = self._last_try = None
        self.refusals = 0
        return was


@dataclass(frozen=True)
class Sample:
    """One self-check of the daemon, as measured by the service edge."""

    now: float  # monotonic seconds
    monitor_task_alive: bool  # the monitor's supervising task is still running
    monitor_connected: bool  # the monitor holds an authenticated connection
    probe: str  # "ok": atServer answered; "network": unreachable; "hung": no end in time
    worker_ok: bool  # a worker-thread round trip finished in time


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str


class LivenessRule:
    """Turns samples into verdicts; remembers since when the monitor has been down."""

    def __init__(self, monitor_down_grace: float = MONITOR_DOWN_GRACE_S) -> None:
        self.monitor_down_grace = monitor_down_grace
        self._down_since: float | None = None

    def decide(self, s: Sample) -> Verdict:
        if s.monitor_connected:
            self._down_since = None
        elif s.probe == "network" or self._down_since is None:
            # the grace counts from when the atServer can be reached again: after a long
            # outage the command probe often gets through a moment before the monitor does
            self._down_since = s.now
        if not s.monitor_task_alive:
            return Verdict(False, "the monitor task has ended")
        if not s.worker_ok:
            return Verdict(False, "worker threads do not answer (hung filesystem?)")
        if s.probe == "hung":
            return Verdict(False, "a probe of the atServer did not end within its timeout")
        down_for = 0.0 if self._down_since is None else s.now - self._down_since
        if s.probe == "ok" and down_for > self.monitor_down_grace:
            return Verdict(False, f"the atServer answers but the monitor has been down for "
                                  f"{down_for:.0f}s")
        if s.probe == "network":
            return Verdict(True, "atServer unreachable; reconnecting")
        if not s.monitor_connected:
            return Verdict(True, "monitor reconnecting")
        return Verdict(True, "monitor connected, atServer answers")


# --- systemd notification protocol ------------------------------------------------------------

def notify_socket_address(env: Mapping[str, str] | None = None) -> str | None:
    """``$NOTIFY_SOCKET`` as a socket address (``@x`` -> abstract ``\\0x``), or None."""
    addr = (os.environ if env is None else env).get("NOTIFY_SOCKET", "")
    if not addr or not (addr.startswith("/") or addr.startswith("@")):
        return None  # unset, or a vsock address we do not speak
    return "\0" + addr[1:] if addr.startswith("@") else addr


_queue_full_logged = False  # warn once per full-queue episode, not every watchdog tick


def sd_notify(state: str, env: Mapping[str, str] | None = None) -> bool:
    """Send ``state`` (``READY=1``, ``WATCHDOG=1``...) to systemd; False when not under it."""
    global _queue_full_logged
    addr = notify_socket_address(env)
    if addr is None:
        return False
    # Non-blocking: this runs on the event loop, and a receiver that stops reading (its
    # queue holds net.unix.max_dgram_qlen = 10 datagrams) would otherwise block the send
    # and with it the whole daemon, forever. A message that does not fit is dropped.
    try:
        with socket.socket(socket.AF_UNIX,
                           socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK) as s:
            s.connect(addr)
            s.send(state.encode("utf-8"), socket.MSG_DONTWAIT)
    except BlockingIOError:
        log.log(logging.DEBUG if _queue_full_logged else logging.WARNING,
                "sd_notify %s dropped: the notify socket's queue is full (is the service "
                "manager reading $NOTIFY_SOCKET?)", state.split("=", 1)[0])
        _queue_full_logged = True
        return False
    except OSError as exc:
        log.debug("sd_notify %s failed: %s", state.split("=", 1)[0], exc)
        return False
    _queue_full_logged = False  # warn again on the next full queue
    return True


def watchdog_interval(env: Mapping[str, str] | None = None, pid: int | None = None
                      ) -> float | None:
    """Seconds between ``WATCHDOG=1`` messages (half of ``WatchdogSec=``), or None if off.

    systemd sets ``WATCHDOG_USEC`` (and ``WATCHDOG_PID``, which must be us when present).
    """
    e = os.environ if env is None else env
    usec = e.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    wpid = e.get("WATCHDOG_PID", "")
    if wpid and wpid != str(os.getpid() if pid is None else pid):
        return None
    return int(usec) / 1e6 / 2


__all__ = ["REVOKED_RETRY_S", "LivenessRule", "RevocationGate", "Sample", "Verdict",
           "backoff_delay", "notify_socket_address", "revoked_message", "sd_notify",
           "watchdog_interval"]
