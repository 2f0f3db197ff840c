"""``sshnp --list-devices``: devices that share their ``device_info`` with us, and who answers.

Like the official client (docs/reference/noports-protocol.md#username-and-device-listing): scan for ``device_info.<dev>.sshnp`` records shared
with us, read each, ping every device and collect heartbeats for a few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from noports.npproto import keys as npkeys
from noports.npproto.messages import DeviceInfo

from . import deviceinfo
from .errors import AtServerError, KeysError
from .progress import Progress

LIST_WAIT_S = 5.0


def listing_line(device: str, owner: str, active: bool, info: DeviceInfo | None) -> str:
    """One output line: ``<device><atSign> TAB active|inactive TAB <version or ?>``.

    ``info`` None: the record could not be read or failed :func:`deviceinfo.parse_value`.
    """
    version = (info.version if info is not None else "") or "?"
    return f"{device}{owner}\t{'active' if active else 'inactive'}\t{version}"


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
        listing = await client.command(f"scan {deviceinfo.SCAN_REGEX}", retry=True) or "[]"
        try:
            found = deviceinfo.parse_scan(listing, me)
        except ValueError as exc:
            raise AtServerError(f"listing devices: {exc}") from None
        devices: dict[tuple[str, str], DeviceInfo | None] = {}
        for k in found:
            dev, owner = k.device, k.device_atsign
            if raw.get("to") and owner != norm_atsign(raw["to"], "--to"):
                continue
            info: DeviceInfo | None = None
            try:
                text = await client.get_shared(f"device_info.{dev}", shared_by=owner,
                                               namespace="sshnp")
                info = deviceinfo.parse_value(text)[1] if text else None
            except (*_at_errors(), ValueError):  # ProtocolError: a malformed record
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
        print(listing_line(dev, owner, (owner, dev) in active, info))
    return 0
