"""Utility verbs: noop, info, stats, sync, batch (docs/reference/atprotocol.md#utility-verbs, docs/reference/atprotocol.md#crud-verbs).

Why together: none of them changes identity, keys or notifications on its own; they report
on the server or (batch) replay other verbs through the session.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from noports.atprotocol import metadata as M
from noports.atprotocol.errors import illegal_argument, invalid_syntax
from noports.atprotocol.grammar import Command

from . import clientregex
from .context import Conn, Reply, client_int, dumps, remove_nulls

MAX_BATCH = 1000


def convert_verb(line: str) -> str:
    return line.strip().split(":", 1)[0].lower()


async def v_noop(s: Conn, cmd: Command) -> Reply:
    ms = client_int("noop delayMillis", cmd.params["delayMillis"], lo=0)
    if ms > s.host.config.noop_max_ms:
        raise illegal_argument(f"noop:{ms} where the duration maximum is "
                               f"{s.host.config.noop_max_ms} milliseconds")
    if ms > 0:
        sleep = s.host.sleep or asyncio.sleep
        await sleep(ms / 1000)
    return s.data("ok")


async def v_info(s: Conn, cmd: Command) -> Reply:
    up = max(0, s.now() - s.host.started_ms)
    if cmd.params.get("brief"):
        return s.data(dumps({"version": s.host.config.version, "uptimeAsMillis": up}))
    sec = up // 1000
    words = f"{sec // 3600} hours {(sec % 3600) // 60} minutes {sec % 60} seconds"
    return s.data(dumps({"version": s.host.config.version, "uptimeAsWords": words}))


_STAT_NAMES = {"1": "activeInboundConnections", "2": "activeOutboundConnections",
               "3": "lastCommitID", "7": "secondaryServerVersion", "11": "NotificationCount"}


async def v_stats(s: Conn, cmd: Command) -> Reply:
    raw = cmd.params.get("statId", "").lstrip(":")
    ids = [i for i in raw.split(",") if i] if raw else ["1", "2", "3", "7", "11"]
    out = []
    for i in ids:
        if i not in _STAT_NAMES:
            continue
        if i == "3":
            value: Any = s.host.store.last_commit_id(s.me)
        elif i == "7":
            value = s.host.config.version
        elif i == "11":
            value = s.host.store.count_notifications(s.me)
        elif i == "1":
            value = len(s.host.monitors)
        else:
            value = 0
        out.append({"id": i, "name": _STAT_NAMES[i], "value": str(value)})
    return s.ok("data: " + dumps(out))


async def v_sync(s: Conn, cmd: Command) -> Reply:
    p = cmd.params
    start = client_int("sync from commit id", p["from_commit_seq"], lo=-1)
    limit = max(1, min(client_int("sync limit", p.get("limit") or "25", lo=0), 100))
    rx_text = p.get("regex")
    rx = clientregex.compile_client(rx_text) if rx_text else None
    latest: dict[str, tuple[int, str]] = {}
    for cid, key, op in s.host.store.commit_entries(s.me):
        if cid > start:
            latest[key] = (cid, op)
    out = []
    for key, (cid, op) in sorted(latest.items(), key=lambda kv: kv[1][0]):
        if rx is not None and not clientregex.search(rx, key):
            continue
        rec = s.host.get(key)
        entry: dict[str, Any] = {"atKey": key, "commitId": cid, "operation": op}
        if rec is not None and op != "-":
            entry["value"] = rec.value
            entry["metadata"] = {k: str(v) for k, v in
                                 remove_nulls(M.to_json(s.meta(rec))).items()}
        out.append(entry)
        if len(out) >= limit:
            break
    return s.data(dumps(out))


async def v_batch(s: Conn, cmd: Command) -> Reply:
    try:
        items = json.loads(cmd.params["json"])
        if not isinstance(items, list):
            raise ValueError
    except ValueError as exc:
        raise invalid_syntax("batch: expected a JSON list") from exc
    if len(items) > MAX_BATCH:
        raise illegal_argument(f"batch of {len(items)} commands; at most {MAX_BATCH}")
    results = []
    for it in items:
        await asyncio.sleep(0)  # a long batch must not hold the loop
        if not isinstance(it, dict) or not isinstance(it.get("command"), str):
            continue
        sub = it["command"]
        if convert_verb(sub) in ("batch", "monitor"):
            results.append({"id": it.get("id"), "response": {
                "error_code": "AT0003", "error_message": "not allowed in batch"}})
            continue
        r = await s.handle(sub)
        body = (r.text or "").split("\n", 1)[0]
        if body.startswith("data:"):
            results.append({"id": it.get("id"), "response": {"data": body[5:]}})
        else:
            results.append({"id": it.get("id"), "response": {
                "error_code": body[6:12], "error_message": body[13:]}})
    return s.data(dumps(results))
