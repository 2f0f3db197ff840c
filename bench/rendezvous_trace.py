"""Per-hop breakdown of a rendezvous from the programs' ``NOPORTS_TRACE`` marks.

Not a test. Every program of the world appends timing marks to one file when the
environment names it (src/noports/trace.py); a bench that runs rendezvous one at a time
gives this module each one's (start, end) wall-clock window, and it prints where the
milliseconds went, hop by hop: client's atServer -> s2s -> relay's atServer -> srvd -> back
-> device's atServer -> sshnpd -> session host -> relay -> back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.harness.world import percentile


def _k1(d: str) -> bool:
    return ".request_ports." in d


def _k2(d: str) -> bool:
    return ".sshrvd@" in d and ".request_ports." not in d


def _k5(d: str) -> bool:
    return ":ssh_request." in d


def _k6(d: str) -> bool:
    return ".sshnp@" in d and not any(f":{k}." in d for k in (
        "ssh_request", "ping", "heartbeat", "username", "device_info", "sshpublickey",
        "npt_request"))


def _any(_d: str) -> bool:
    return True


def _side(s: str):  # noqa: ANN202
    return lambda d: d.endswith(f" {s}") or f" {s} " in d


#: (label, event, detail filter), in the order a rendezvous passes them
HOPS: list[tuple[str, str, object]] = [
    ("relay request: client atServer accepts", "atserver.notify_in", _k1),
    ("  stored (fsync)", "atserver.notify_stored", _k1),
    ("  s2s out (delivery queue)", "atserver.s2s_out", _k1),
    ("  relay atServer accepts", "atserver.pol_notify_in", _k1),
    ("  pushed to srvd's monitor", "atserver.monitor_out", _k1),
    ("srvd: notification in", "srvd.in", _k1),
    ("srvd: ports open, reply sent", "srvd.reply_out", _any),
    ("relay answer: relay atServer accepts", "atserver.notify_in", _k2),
    ("  stored (fsync)", "atserver.notify_stored", _k2),
    ("  s2s out (delivery queue)", "atserver.s2s_out", _k2),
    ("  client atServer accepts", "atserver.pol_notify_in", _k2),
    ("  pushed to the client's monitor", "atserver.monitor_out", _k2),
    ("session request: client atServer accepts", "atserver.notify_in", _k5),
    ("  stored (fsync)", "atserver.notify_stored", _k5),
    ("  s2s out (delivery queue)", "atserver.s2s_out", _k5),
    ("  device atServer accepts", "atserver.pol_notify_in", _k5),
    ("  pushed to sshnpd's monitor", "atserver.monitor_out", _k5),
    ("sshnpd: notification in", "sshnpd.in", _k5),
    ("sshnpd: handler starts", "sshnpd.ssh_request", _any),
    ("sshnpd: client public key ready", "sshnpd.pk_ready", _any),
    ("sshnpd: verified, keys made (thread)", "sshnpd.planned", _any),
    ("sshnpd: order to the session host", "sshnpd.host_order", _any),
    ("session host: order in", "host.order", _any),
    ("session host: key in authorized_keys", "host.key_written", _any),
    ("session host: local sshd connected", "host.local_connected", _any),
    ("session host: relay connected", "host.relay_connected", _any),
    ("relay: side B authenticated", "relay.auth", _side("B True")),
    ("session host: started", "host.started", _any),
    ("sshnpd: host reports started", "sshnpd.host_started", _any),
    ("device answer: device atServer accepts", "atserver.notify_in", _k6),
    ("  stored (fsync)", "atserver.notify_stored", _k6),
    ("  s2s out (delivery queue)", "atserver.s2s_out", _k6),
    ("  client atServer accepts", "atserver.pol_notify_in", _k6),
    ("  pushed to the client's monitor", "atserver.monitor_out", _k6),
]


@dataclass
class Mark:
    t: float
    event: str
    detail: str


def read_marks(path: Path) -> list[Mark]:
    out = []
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return out
    for line in text.splitlines():
        parts = line.split(" ", 3)
        if len(parts) < 3:
            continue
        try:
            t = float(parts[0])
        except ValueError:
            continue
        out.append(Mark(t, parts[2], parts[3] if len(parts) > 3 else ""))
    out.sort(key=lambda m: m.t)
    return out


def breakdown(marks: Sequence[Mark], windows: Sequence[tuple[float, float]]
              ) -> list[tuple[str, float | None, float | None]]:
    """(label, p50 ms of this hop, p50 ms since the request) per hop; None: never seen."""
    per_hop: list[list[float]] = [[] for _ in HOPS]
    since: list[list[float]] = [[] for _ in HOPS]
    for t0, t1 in windows:
        inside = [m for m in marks if t0 <= m.t <= t1 + 0.005]
        prev = t0
        start = 0
        for i, (_label, event, keep) in enumerate(HOPS):
            hit = next((m for m in inside[start:] if m.event == event
                        and keep(m.detail)), None)  # type: ignore[operator]
            if hit is None:
                continue
            start = inside.index(hit) + 1
            per_hop[i].append((hit.t - prev) * 1000)
            since[i].append((hit.t - t0) * 1000)
            prev = hit.t
    return [(label, percentile(per_hop[i], 50) if per_hop[i] else None,
             percentile(since[i], 50) if since[i] else None)
            for i, (label, _e, _k) in enumerate(HOPS)]


def print_breakdown(path: Path, windows: Sequence[tuple[float, float]], total_p50_s: float
                    ) -> None:
    rows = breakdown(read_marks(path), windows)
    if not any(r[1] is not None for r in rows):
        print("  (no trace marks: the programs ran without NOPORTS_TRACE)")
        return
    print(f"  per hop (p50 over {len(windows)} rendezvous; ms; wall clock of each program, "
          f"one machine):")
    print(f"    {'hop':<44} {'this hop':>9} {'since request':>14}")
    for label, hop, since in rows:
        if hop is None:
            continue
        print(f"    {label:<44} {hop:>9.1f} {since:>14.1f}")
    print(f"    {'client: answer verified, socket handed over':<44} {'':>9} "
          f"{total_p50_s * 1000:>14.1f}   (goal <= 50 ms)")
