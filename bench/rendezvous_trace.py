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
    ("relay req: client atServer accepts", "atserver.notify_in", _k1),
    ("relay req: client atServer stored (fsync)", "atserver.notify_stored", _k1),
    ("relay req: s2s out", "atserver.s2s_out", _k1),
    ("relay req: relay atServer accepts", "atserver.pol_notify_in", _k1),
    ("relay req: pushed to srvd's monitor", "atserver.monitor_out", _k1),
    ("relay req: relay atServer stored (fsync)", "atserver.pol_notify_stored", _k1),
    ("srvd: notification in", "srvd.in", _k1),
    ("srvd: ports open, answer sent", "srvd.reply_out", _any),
    ("relay ans: relay atServer accepts", "atserver.notify_in", _k2),
    ("relay ans: relay atServer stored (fsync)", "atserver.notify_stored", _k2),
    ("relay ans: s2s out", "atserver.s2s_out", _k2),
    ("relay ans: client atServer accepts", "atserver.pol_notify_in", _k2),
    ("relay ans: pushed to the client's monitor", "atserver.monitor_out", _k2),
    ("relay ans: client atServer stored (fsync)", "atserver.pol_notify_stored", _k2),
    ("session req: client atServer accepts", "atserver.notify_in", _k5),
    ("session req: client atServer stored (fsync)", "atserver.notify_stored", _k5),
    ("session req: s2s out", "atserver.s2s_out", _k5),
    ("session req: device atServer accepts", "atserver.pol_notify_in", _k5),
    ("session req: pushed to sshnpd's monitor", "atserver.monitor_out", _k5),
    ("session req: device atServer stored (fsync)", "atserver.pol_notify_stored", _k5),
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
    ("device ans: device atServer accepts", "atserver.notify_in", _k6),
    ("device ans: device atServer stored (fsync)", "atserver.notify_stored", _k6),
    ("device ans: s2s out", "atserver.s2s_out", _k6),
    ("device ans: client atServer accepts", "atserver.pol_notify_in", _k6),
    ("device ans: pushed to the client's monitor", "atserver.monitor_out", _k6),
    ("device ans: client atServer stored (fsync)", "atserver.pol_notify_stored", _k6),
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
              ) -> list[tuple[str, float, float]]:
    """(label, p50 ms since the row above, p50 ms since the request), in protocol order.

    Each hop is the first matching mark inside a rendezvous' window. Steps may overlap (a
    delivery starts before its sender's commit ends; the device's atServer pushes before
    it stores), so a negative "this hop" means "that much before the row above".
    """
    times: list[dict[int, float]] = []
    for t0, t1 in windows:
        inside = [m for m in marks if t0 <= m.t <= t1 + 0.005]
        got: dict[int, float] = {}
        for i, (_label, event, keep) in enumerate(HOPS):
            hit = next((m for m in inside if m.event == event
                        and keep(m.detail)), None)  # type: ignore[operator]
            if hit is not None:
                got[i] = (hit.t - t0) * 1000
        times.append(got)
    order = [i for i in range(len(HOPS)) if any(i in g for g in times)]
    since = {i: percentile([g[i] for g in times if i in g], 50) for i in order}
    rows = []
    for n, i in enumerate(order):
        prev = order[n - 1] if n else None
        hop = [g[i] - (g[prev] if prev is not None else 0.0) for g in times
               if i in g and (prev is None or prev in g)]
        rows.append((HOPS[i][0], percentile(hop, 50) if hop else 0.0, since[i]))
    return rows


def print_breakdown(path: Path, windows: Sequence[tuple[float, float]], total_p50_s: float
                    ) -> None:
    rows = breakdown(read_marks(path), windows)
    if not rows:
        print("  (no trace marks: the programs ran without NOPORTS_TRACE)")
        return
    print(f"  per hop (p50 over {len(windows)} rendezvous; ms; wall clock of each program, "
          f"one machine):")
    print(f"    {'hop':<44} {'this hop':>9} {'since request':>14}")
    for label, hop, since in rows:
        print(f"    {label:<44} {hop:>9.1f} {since:>14.1f}")
    print(f"    {'client: answer verified, socket handed over':<44} {'':>9} "
          f"{total_p50_s * 1000:>14.1f}   (goal <= 50 ms)")
