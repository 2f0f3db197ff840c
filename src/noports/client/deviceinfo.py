"""One reader of what a device says about itself: its ``device_info`` records and heartbeats.

Why one module: ``sshnp`` (the ping answer it checks features against), ``sshnp
--list-devices`` and the ``noports.sshnp.devices`` inventory plugin all read the same M6 value
(docs/reference/noports-protocol.md#username-and-device-listing) and the same K9 key
``[cached:]@client:device_info.<device>.sshnp@<device atSign>``. Parsed in three places they
drifted apart (one crashed on a JSON list, one accepted device names sshnp refuses); here the rules are written once and fed a hostile corpus in
tests/unit/test_client_deviceinfo.py. Pure: no sockets, no event loop.

A value is accepted only if it is a JSON object that :class:`DeviceInfo` type-checks (old
daemons' records without ``supportedFeatures`` or ``deviceGroupName`` included); anything else
(not JSON, deeply nested, integers beyond Python's conversion limit, more than
:data:`MAX_DEVICE_INFO` bytes) is a :class:`ProtocolError` whose text says why.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from noports.npproto.dartjson import dart_json_decode
from noports.npproto.errors import ProtocolError
from noports.npproto.keys import DEVICE_NAME_RE
from noports.npproto.messages import DeviceInfo

#: What the scan asks the client's atServer for (the key regex below filters the answer).
SCAN_REGEX = r"device_info\..+\.sshnp@"
#: A daemon's record is a few hundred bytes; a long permit-open list stays far below this.
MAX_DEVICE_INFO = 64 * 1024

_KEY = re.compile(
    r"^(?P<cached>cached:)?(?P<client>@[^:@\s]+):device_info\.(?P<device>[^:@\s]+)\.sshnp"
    r"(?P<atsign>@[^:@\s]+)$", re.IGNORECASE)


@dataclass(frozen=True)
class DeviceInfoKey:
    """One K9 key of a scan: ``key`` as listed, atSign and device name lower-cased."""

    key: str
    device_atsign: str
    device: str
    cached: bool


def parse_key(key: object, client_atsign: str) -> DeviceInfoKey | None:
    """The K9 key shared with ``client_atsign`` (lower-case, with ``@``), else None.

    Any atSign can share a key with us, so the device name must be one sshnp could connect
    to (the official 2-36 character grammar); anything else (``$(reboot)``, 10 000
    characters) never becomes an inventory host or a listing line.
    """
    if not isinstance(key, str):
        return None
    m = _KEY.match(key)
    if not m or m.group("client").lower() != client_atsign.lower():
        return None
    device = m.group("device").lower()
    if not DEVICE_NAME_RE.fullmatch(device):
        return None
    return DeviceInfoKey(key=key, device_atsign=m.group("atsign").lower(),
                         device=device, cached=bool(m.group("cached")))


def parse_scan(reply: str | list[Any], client_atsign: str) -> list[DeviceInfoKey]:
    """``scan`` reply (JSON text or decoded list) -> this client's K9 keys, sorted by (atSign,
    device); a cached copy wins over a second spelling of the same record.

    Raises ValueError if the reply is not a JSON list (the atServer answered something else).
    """
    if isinstance(reply, str):
        try:
            keys = json.loads(reply)
        except (ValueError, RecursionError) as exc:
            raise ValueError(f"scan reply is not JSON: {exc}") from None
    else:
        keys = reply
    if not isinstance(keys, list):
        raise ValueError("scan reply is not a JSON list")
    found: dict[tuple[str, str], DeviceInfoKey] = {}
    for key in keys:
        k = parse_key(key, client_atsign)
        if k is None:
            continue
        ident = (k.device_atsign, k.device)
        if k.cached or ident not in found:
            found[ident] = k
    return [found[ident] for ident in sorted(found)]


def parse_value(text: str | bytes) -> tuple[dict[str, Any], DeviceInfo]:
    """A device_info record or heartbeat -> (the JSON object as sent, its typed view).

    The object is returned too because the inventory shows the device's record as is; both
    are returned only after the typed view accepted it, so every field read from the object
    has the type :class:`DeviceInfo` checked.
    """
    if not isinstance(text, (str, bytes)):
        raise ProtocolError(f"device info is a {type(text).__name__}, not JSON text")
    if len(text) > MAX_DEVICE_INFO:
        raise ProtocolError(f"device info is {len(text)} bytes, more than the "
                            f"{MAX_DEVICE_INFO} any daemon sends")
    try:
        obj = dart_json_decode(text)
    except ProtocolError as exc:
        raise ProtocolError(f"device info: {exc}") from None
    except (ValueError, RecursionError) as exc:  # int digit limit, nesting depth
        raise ProtocolError(f"device info is not usable JSON: {str(exc)[:120]}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"device info is a JSON {type(obj).__name__}, not an object")
    return obj, DeviceInfo.from_dict(obj)
