"""``sshnp --list-devices``: devices that share their ``device_info`` with us, and who answers.

Like the official client (reference §3.6): scan for ``device_info.<dev>.sshnp`` records shared
with us, read each, ping every device and collect heartbeats for a few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from typing import Any

from noports.npproto import keys as npkeys

from .errors import KeysError
from .progress import Progress

_KEY_RE = re.compile(r"(?:cached:)?(@[^:]+):device_info\.([a-z0-9_\-]+)\.sshnp(@[^\s]+)$")
LIST_WAIT_S = 5.0


async def list_devices(opts: Any, progress: Progress) -> int:
    from noports.atclient.aio import AtClient

    from .flow import _at_errors, _plane_error, client_ssl_context, load_client_keys
    from .params import SessionParams, norm_atsign, parse_root

    raw = opts.raw
    me = norm_atsign(raw["from"], "--from")
    # reuse SessionParams for key/CA paths (relay and device are irrelevant here)
    params = SessionParams(client_atsign=me, device_atsign=raw.get("to") or me,
                           relays=[me], root=parse_root(raw["root_domain"]),
                           key_file=raw.get("key_file"), ca_file=raw.get("ca_file"))
    keys = load_client_keys(params)
    if keys is None:  # pragma: no cover
        raise KeysError("no keys")
    client = AtClient(me, keys, params.root, client_ssl_context(params),
                      timeout=params.connect_timeout)
    try:
        mon = client.monitor(r"heartbeat\.[a-z0-9_\-]+\.sshnp@",
                             since_ms=int(time.time() * 1000))
        mon.start()
        progress(f"scanning the devices shared with {me}")
        listing = json.loads(await client.command(r"scan device_info\.", retry=True) or "[]")
        devices: dict[tuple[str, str], dict[str, Any]] = {}
        for key in listing:
            m = _KEY_RE.match(str(key).lower())
            if not m or m.group(1) != me:
                continue
            dev, owner = m.group(2), m.group(3)
            if raw.get("to") and owner != norm_atsign(raw["to"], "--to"):
                continue
            info: dict[str, Any] = {}
            try:
                text = await client.get_shared(f"device_info.{dev}", shared_by=owner,
                                               namespace="sshnp")
                info = json.loads(text) if text else {}
            except (*_at_errors(), ValueError):
                pass
            devices[(owner, dev)] = info
        for owner, dev in devices:
            await client.notify(owner, npkeys.split_shared_key(
                npkeys.ping_key(owner, dev, me)).name, npkeys.PING_VALUE, ttln_ms=60_000)
        active: set[tuple[str, str]] = set()
        deadline = asyncio.get_running_loop().time() + LIST_WAIT_S

        async def collect() -> None:
            async for n in mon:
                try:
                    ck = npkeys.parse_client_key(n.key)
                except Exception:
                    continue
                if ck.kind == "heartbeat" and (n.from_atsign.lower(), ck.device) in devices:
                    active.add((n.from_atsign.lower(), ck.device or ""))
                    if len(active) == len(devices):
                        return

        if devices:
            left = deadline - asyncio.get_running_loop().time()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(collect(), max(left, 0.1))
    except _at_errors() as exc:
        raise _plane_error(exc, params, "listing devices") from None
    finally:
        await client.close()
    if not devices:
        print("no devices share their info with " + me)
        return 0
    for (owner, dev), info in sorted(devices.items()):
        state = "active" if (owner, dev) in active else "inactive"
        print(f"{dev}{owner}\t{state}\t{info.get('version', '?')}")
    return 0
