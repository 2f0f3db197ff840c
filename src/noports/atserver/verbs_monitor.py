"""The monitor verb and the live push of notifications / stats to monitoring connections.

Why here: a connection in monitor mode stops being request/reply; lines are pushed to it
from other connections' work (through the host), filtered by the connection's own regex
(docs/reference/atprotocol.md#monitor-line-json, docs/reference/atprotocol.md#stats-notifications).
"""

from __future__ import annotations

from typing import Any

from noports import trace
from noports.atprotocol import notifications as N
from noports.atprotocol.grammar import Command

from . import clientregex
from .context import Conn, Reply, int_or_none
from .store import NotificationRow


async def v_monitor(s: Conn, cmd: Command) -> Reply:
    p = cmd.params
    rx = clientregex.compile_client(p.get("regex") or ".*")
    s.monitor_regex = rx
    s.monitor_self = bool(p.get("selfNotifications"))
    s.monitoring = True
    epoch = int_or_none(p.get("epochMillis"))
    # replay then register without yielding to the loop: no gap, no duplicate
    if epoch is not None:
        kinds = ("received", "self") if s.monitor_self else ("received",)
        for row in s.host.store.notifications(s.me, kinds, after_epoch=epoch, now=s.now()):
            emit_notification(s, row, N.from_storage(row.data), replay=True)
    s.host.monitors.add(s)  # type: ignore[arg-type]  # a Session, which is a MonitorSink
    return Reply(None)


def _matches(s: Conn, row: NotificationRow) -> bool:
    rx = s.monitor_regex
    if rx is None:
        return True
    return (clientregex.search(rx, row.key)
            or clientregex.search(rx, row.from_atsign.lstrip("@")))


def emit_notification(s: Conn, row: NotificationRow, n: Any, *, replay: bool) -> None:
    if _matches(s, row):
        s.emit(N.monitor_line(n, replay=replay).rstrip("\n") + "\n")
        trace.mark("atserver.monitor_out", f"{s.me} {row.key}")


def deliver_notification(s: Conn, row: NotificationRow, n: Any) -> None:
    """Called (via the host) for every newly stored received/self notification."""
    if not s.monitoring or s.closed:
        return
    if row.kind == "self" and not s.monitor_self:
        return
    emit_notification(s, row, n, replay=False)


def deliver_stats(s: Conn, last_commit_id: int, now: int) -> None:
    if s.monitoring and not s.closed:
        s.emit(N.stats_line(s.me, last_commit_id, now).rstrip("\n") + "\n")
