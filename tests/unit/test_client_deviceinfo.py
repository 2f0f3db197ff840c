"""The one device_info reader (noports.client.deviceinfo) and the CLI listing built on it.

The corpus (tests/unit/plugins/inventory/deviceinfo_corpus.py: valid, old-format and hostile
values and keys) is also fed to the inventory plugin in
tests/unit/plugins/inventory/test_devices.py, so the three readers cannot drift apart again.
"""

from __future__ import annotations

import json

import pytest
from plugins.inventory.deviceinfo_corpus import CORPUS, KEYS  # tests/unit/plugins, no ansible

from noports.client import deviceinfo
from noports.client.devices import listing_line
from noports.npproto.errors import ProtocolError


@pytest.mark.parametrize("name,text,accepted,version", CORPUS, ids=[c[0] for c in CORPUS])
def test_parse_value_corpus(name: str, text: str, accepted: bool, version: str | None) -> None:
    if accepted:
        raw, info = deviceinfo.parse_value(text)
        assert raw == json.loads(text)  # the record as the device sent it
        assert info.devicename == raw["devicename"]
        assert (info.version or None) == version
        assert isinstance(info.effective_features(), dict)
        assert deviceinfo.parse_value(text.encode())[0] == raw
    else:
        with pytest.raises(ProtocolError, match="device info"):
            deviceinfo.parse_value(text)


@pytest.mark.parametrize("name,text,accepted,version", CORPUS, ids=[c[0] for c in CORPUS])
def test_listing_line_corpus(name: str, text: str, accepted: bool, version: str | None) -> None:
    """What ``sshnp --list-devices`` prints for each record (it used to crash on a list)."""
    try:
        info = deviceinfo.parse_value(text)[1]
    except ProtocolError:
        info = None
    assert (info is not None) == accepted
    line = listing_line("pi4", "@dev", True, info)
    assert line == f"pi4@dev\tactive\t{version or '?'}"
    assert "\n" not in line


def test_parse_value_wrong_types() -> None:
    for bad in (None, 5, ["{}"], {"devicename": "x"}):
        with pytest.raises(ProtocolError, match="not JSON text"):
            deviceinfo.parse_value(bad)  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match="device info"):
        deviceinfo.parse_value(b"\xff\xfe{}")


@pytest.mark.parametrize("key,client,expected", KEYS, ids=range(len(KEYS)))
def test_parse_key_corpus(key: str, client: str, expected: tuple[str, str] | None) -> None:
    k = deviceinfo.parse_key(key, client)
    assert (None if k is None else (k.device_atsign, k.device)) == expected
    if k is not None:
        assert k.key == key and k.cached == key.startswith("cached:")


def test_parse_scan_dedups_and_refuses_non_lists() -> None:
    keys = [k for k, _c, _e in KEYS] + [None, 5, {"k": 1}, ["x"]]
    found = deviceinfo.parse_scan(json.dumps(keys), "@alice")
    assert [(k.device_atsign, k.device) for k in found] == sorted(
        {e for _k, _c, e in KEYS if e is not None})
    # a cached copy wins over the plain spelling of the same record
    by = {(k.device_atsign, k.device): k.key for k in found}
    assert by["@dev", "pi4"] == "cached:@alice:device_info.pi4.sshnp@dev"
    assert deviceinfo.parse_scan(keys, "@alice") == found
    for reply in ("not json", '{"a": 1}', "null", "[" * 100_000):
        with pytest.raises(ValueError, match="scan reply"):
            deviceinfo.parse_scan(reply, "@alice")
