"""One corpus of device_info values, fed to every reader of them (sshnp's heartbeat check,
``sshnp --list-devices``, the ``noports.sshnp.devices`` inventory plugin) by
tests/unit/test_client_deviceinfo.py and tests/unit/plugins/inventory/test_devices.py.

Why here: this directory ships with the collection (``ansible-test units`` runs it), so the
corpus is self-contained (the daemon values are copies of tests/fixtures/npproto/
m6_device_info.json, which does not ship).

Each entry: (name, value text, accepted, version the readers report or None).
"""

from __future__ import annotations

import json

# official daemons' M6 values (docs/reference/noports-protocol.md#message-catalogue example, issue #1182, the C daemon)
DART_REFERENCE = (
    '{"devicename":"orac","deviceGroupName":"__none__","version":"5.6.3",'
    '"corePackageVersion":"6.2.0","supportedFeatures":{"srAuth":true,"srE2ee":true,'
    '"acceptsPublicKeys":false,"supportsPortChoice":true,"adjustableTimeout":true},'
    '"allowedServices":["localhost:22","localhost:3389"]}')
DART_ISSUE_1182 = (
    '{"devicename":"orac","version":"5.3.0","corePackageVersion":"6.1.0",'
    '"supportedFeatures":{"srAuth":true,"srE2ee":true,"acceptsPublicKeys":false,'
    '"supportsPortChoice":true,"adjustableTimeout":true},"allowedServices":["localhost:22",'
    '"localhost:5201","192.168.1.90:445","192.168.1.90:139"]}')
C_DAEMON = (
    '{"devicename":"vps","version":"0.2.0","corePackageVersion":"c0.1.0",'
    '"supportedFeatures":{"srAuth":true,"srE2ee":true,"acceptsPublicKeys":false,'
    '"supportsPortChoice":true},"allowedServices":["localhost:22"]}')


def _j(obj: object) -> str:
    return json.dumps(obj)


VALID = [
    ("python-daemon", _j({"devicename": "pi4", "deviceGroupName": "lab", "version": "5.6.3",
                          "corePackageVersion": "py", "supportedFeatures": {
                              "srAuth": True, "srE2ee": True, "acceptsPublicKeys": True},
                          "allowedServices": ["localhost:22"]}), True, "5.6.3"),
    ("dart-reference", DART_REFERENCE, True, "5.6.3"),
    ("dart-issue-1182", DART_ISSUE_1182, True, "5.3.0"),
    ("c-daemon", C_DAEMON, True, "0.2.0"),
]

OLD_FORMAT = [
    # v4 daemons: no supportedFeatures, no deviceGroupName, no allowedServices
    ("v4-daemon", _j({"devicename": "old", "version": "4.0.5",
                      "corePackageVersion": "4.0.5"}), True, "4.0.5"),
    ("no-version", _j({"devicename": "bare"}), True, None),
    ("future-fields", _j({"devicename": "new", "version": "9.0.0", "quantum": {"a": [1]}}),
     True, "9.0.0"),
]

HOSTILE = [
    ("not-json", "device pi4, version 5", False, None),
    ("json-list", _j([{"devicename": "pi4", "version": "5"}]), False, None),
    ("json-string", _j("pi4"), False, None),
    ("json-null", "null", False, None),
    ("empty-object", "{}", False, None),
    ("devicename-int", _j({"devicename": 4, "version": "5"}), False, None),
    ("version-int", _j({"devicename": "pi4", "version": 5}), False, None),
    ("version-object", _j({"devicename": "pi4", "version": {"$gt": ""}}), False, None),
    ("features-string", _j({"devicename": "pi4", "supportedFeatures": "srAuth"}), False, None),
    ("feature-not-bool", _j({"devicename": "pi4", "supportedFeatures": {"srAuth": "yes"}}),
     False, None),
    ("group-list", _j({"devicename": "pi4", "deviceGroupName": ["lab"]}), False, None),
    ("services-ints", _j({"devicename": "pi4", "allowedServices": [22]}), False, None),
    ("float", '{"devicename": "pi4", "version": "5", "load": 0.5}', False, None),
    ("nan", '{"devicename": "pi4", "version": "5", "load": NaN}', False, None),
    ("deep-nesting", '{"devicename": "pi4", "x": ' + "[" * 5000 + "]" * 5000 + "}",
     False, None),
    ("huge-int", '{"devicename": "pi4", "x": ' + "9" * 5000 + "}", False, None),
    ("oversize", _j({"devicename": "pi4", "version": "5", "pad": "x" * 70_000}), False, None),
]

CORPUS = VALID + OLD_FORMAT + HOSTILE

#: scan replies' keys: (key, client, expected (device atSign, device) or None)
KEYS = [
    ("cached:@alice:device_info.pi4.sshnp@dev", "@alice", ("@dev", "pi4")),
    ("@alice:device_info.pi4.sshnp@dev", "@alice", ("@dev", "pi4")),
    ("cached:@Alice:device_info.Gw.sshnp@Bob_Dev", "@alice", ("@bob_dev", "gw")),
    ("cached:@carol:device_info.pi4.sshnp@dev", "@alice", None),
    ("cached:@alice:username.pi4.sshnp@dev", "@alice", None),
    ("cached:@alice:device_info.pi4.sshnp@dev:extra", "@alice", None),
    ("cached:@alice:device_info..sshnp@dev", "@alice", None),
    ("cached:@alice:device_info.a b.sshnp@dev", "@alice", None),
    ("@alice:device_info.pi4.sshnp@dev@x", "@alice", None),
    ("public:device_info.pi4.sshnp@dev", "@alice", None),
    ("cached:@alice:device_info." + "p" * 36 + ".sshnp@dev", "@alice", ("@dev", "p" * 36)),
    ("cached:@alice:device_info." + "p" * 10_000 + ".sshnp@dev", "@alice", None),
    ("cached:@alice:device_info.$(reboot).sshnp@dev", "@alice", None),
    ("cached:@alice:device_info.a.b.sshnp@dev", "@alice", None),
    ("cached:@alice:device_info.x.sshnp@dev", "@alice", None),
    ("cached:@alice:device_info.-pi.sshnp@dev", "@alice", None),
    ("", "@alice", None),
]
