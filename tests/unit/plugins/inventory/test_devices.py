"""Unit tests of the noports.sshnp.devices inventory plugin against a fake atServer connection.

The fake answers ``scan``/``llookup``/``lookup`` exactly as an atServer does, with values
really encrypted the atProtocol way (AES-CTR under an RSA-wrapped shared key), so the
decrypting and parsing paths are the production ones.
"""

from __future__ import annotations

import json

import pytest
from ansible.errors import AnsibleParserError
from ansible.inventory.data import InventoryData
from ansible.parsing.dataloader import DataLoader
from ansible.plugins.loader import inventory_loader

pytest.importorskip("noports.keys.atkeys")
from ansible_collections.noports.sshnp.plugins.inventory import devices as devmod  # noqa: E402

from noports import crypto  # noqa: E402
from noports.atclient import e2e  # noqa: E402
from noports.atclient.connection import AtProtocolError  # noqa: E402
from noports.keys.atkeys import generate_atkeys  # noqa: E402

CLIENT = "@alice_client"


@pytest.fixture(scope="module")
def keys():
    return generate_atkeys(CLIENT)


def info(name, group=None, version="0.1.0"):
    d = {"devicename": name, "version": version, "corePackageVersion": "py",
         "supportedFeatures": {"srAuth": True, "srE2ee": True}}
    if group is not None:
        d["deviceGroupName"] = group
    return json.dumps(d)


class FakeAtServer:
    """The client's atServer as seen through AtConnection.command()."""

    def __init__(self, keys):
        self.keys = keys
        self.shared: dict[str, str] = {}
        self.records: dict[str, tuple[str, dict]] = {}
        self.commands: list[str] = []
        self.extra_scan: list[str] = []
        self.llookup_fails = False

    def aes_for(self, device_atsign):
        if device_atsign not in self.shared:
            self.shared[device_atsign] = crypto.generate_aes_key()
        return self.shared[device_atsign]

    def share(self, device_atsign, name, value, *, cached=True, corrupt=False):
        ct, iv = e2e.encrypt_value(self.aes_for(device_atsign), value)
        if corrupt:
            ct = ct[::-1]
        key = f"{'cached:' if cached else ''}{CLIENT}:{name}{device_atsign}"
        self.records[key] = (ct, {"ivNonce": iv, "isEncrypted": True, "ttr": -1})

    def command(self, cmd):
        self.commands.append(cmd)
        if cmd.startswith("scan "):
            assert cmd == f"scan {devmod.SCAN_REGEX}"
            return json.dumps(sorted(self.records) + self.extra_scan)
        if cmd.startswith("lookup:shared_key@"):
            at = cmd[len("lookup:shared_key"):]
            return crypto.rsa_encrypt(self.keys.encrypt_public, self.shared[at])
        for verb in ("llookup:all:", "lookup:all:"):
            if cmd.startswith(verb):
                key = cmd[len(verb):]
                if verb == "lookup:all:":
                    key = f"cached:{CLIENT}:{key}"
                elif self.llookup_fails:
                    raise AtProtocolError("AT0015", f"key not found : {key}")
                if key in self.records:
                    data, meta = self.records[key]
                    return json.dumps({"key": key, "data": data, "metaData": meta})
                raise AtProtocolError("AT0015", f"key not found : {key}")
        raise AssertionError(f"unexpected command {cmd!r}")

    def close(self):
        pass


@pytest.fixture
def fleet(keys):
    s = FakeAtServer(keys)
    s.share("@alice_device", "device_info.pi4.sshnp", info("pi4", "lab"))
    s.share("@alice_device", "username.pi4.sshnp", "pi")
    s.share("@alice_device", "device_info.pi5.sshnp", info("pi5", "__none__", "5.6.3"))
    s.share("@bob_device", "device_info.gw.sshnp", info("gw"))
    s.share("@bob_device", "device_info.broken.sshnp", info("broken"), corrupt=True)
    # not ours / not device_info: ignored
    s.extra_scan += ["cached:@carol:device_info.x.sshnp@alice_device",
                     f"cached:{CLIENT}:heartbeat.pi4.sshnp@alice_device",
                     "public:publickey@alice_client"]
    return s


def test_parse_scan_keeps_only_this_clients_device_info():
    keys = ["cached:@alice_client:device_info.pi4.sshnp@alice_device",
            "@alice_client:device_info.pi4.sshnp@alice_device",
            "cached:@Alice_Client:device_info.Gw.sshnp@Bob_Device",
            "cached:@carol:device_info.x.sshnp@alice_device",
            "cached:@alice_client:username.pi4.sshnp@alice_device"]
    assert devmod.parse_scan(json.dumps(keys), CLIENT) == [
        ("cached:@alice_client:device_info.pi4.sshnp@alice_device", "@alice_device", "pi4"),
        ("cached:@Alice_Client:device_info.Gw.sshnp@Bob_Device", "@bob_device", "gw"),
    ]
    with pytest.raises(ValueError):
        devmod.parse_scan("not json", CLIENT)


def test_fetch_devices_decrypts_and_keeps_broken_records(fleet, keys):
    out = devmod.fetch_devices(fleet, CLIENT, devmod._AtKeysCrypto(keys.encrypt_private))
    by = {(d["device_atsign"], d["device"]): d for d in out}
    assert set(by) == {("@alice_device", "pi4"), ("@alice_device", "pi5"),
                       ("@bob_device", "gw"), ("@bob_device", "broken")}
    assert by["@alice_device", "pi4"]["info"]["deviceGroupName"] == "lab"
    assert by["@alice_device", "pi4"]["username"] == "pi"
    assert by["@alice_device", "pi5"]["username"] is None
    assert by["@bob_device", "broken"]["error"]
    assert by["@bob_device", "gw"]["error"] is None
    # one shared-key lookup per device atSign, whatever the number of records
    assert sum(c.startswith("lookup:shared_key") for c in fleet.commands) == 2
    json.dumps(out)  # cacheable as is


def test_fetch_devices_filters(fleet, keys):
    c = devmod._AtKeysCrypto(keys.encrypt_private)
    assert [d["device"] for d in devmod.fetch_devices(fleet, CLIENT, c, device_regex="pi.*")
            ] == ["pi4", "pi5"]
    assert {d["device"] for d in devmod.fetch_devices(fleet, CLIENT, c,
                                                      device_atsigns=["Bob_Device"])
            } == {"gw", "broken"}


def test_falls_back_to_a_remote_lookup(keys):
    s = FakeAtServer(keys)
    s.share("@alice_device", "device_info.pi4.sshnp", info("pi4"))
    s.llookup_fails = True  # e.g. the cached copy expired between scan and llookup
    out = devmod.fetch_devices(s, CLIENT, devmod._AtKeysCrypto(keys.encrypt_private))
    assert out[0]["info"]["devicename"] == "pi4"
    assert "lookup:all:device_info.pi4.sshnp@alice_device" in s.commands


CONFIG = """\
plugin: noports.sshnp.devices
client_atsign: "@Alice_Client"
relays: "@rv_eu,@rv_am"
root_domain: 127.0.0.1:6464
ca_file: /plane/ca.pem
keyed_groups:
  - key: sshnp_version
    prefix: sshnpd
    separator: "_"
groups:
  pis: "'pi' in ansible_sshnp_device"
compose:
  ansible_user: sshnp_username | default('admin', true)
"""


def run_inventory(tmp_path, monkeypatch, fleet, keys, config=CONFIG, cache=False,
                  name="fleet.sshnp.yml"):
    path = tmp_path / name
    path.write_text(config)
    plugin = inventory_loader.get("noports.sshnp.devices")
    assert plugin.verify_file(str(path))
    monkeypatch.setattr(plugin, "_load_keys", lambda client: keys)
    monkeypatch.setattr(plugin, "_open_connection", lambda client, k: fleet)
    inv = InventoryData()
    plugin.parse(inv, DataLoader(), str(path), cache=cache)
    if getattr(plugin, "_cache", None):  # what InventoryManager does after parse()
        plugin.update_cache_if_changed()
    return inv


def test_inventory_hosts_vars_and_groups(tmp_path, monkeypatch, fleet, keys):
    inv = run_inventory(tmp_path, monkeypatch, fleet, keys)
    assert set(inv.hosts) == {"pi4.alice_device", "pi5.alice_device", "gw.bob_device",
                              "broken.bob_device"}
    hv = inv.get_host("pi4.alice_device").get_vars()
    assert hv["ansible_connection"] == "noports.sshnp.sshnp"
    assert hv["ansible_sshnp_client_atsign"] == CLIENT
    assert hv["ansible_sshnp_device_atsign"] == "@alice_device"
    assert hv["ansible_sshnp_device"] == "pi4"
    assert hv["ansible_sshnp_relays"] == ["@rv_eu", "@rv_am"]
    assert hv["ansible_sshnp_root_domain"] == "127.0.0.1:6464"
    assert hv["ansible_sshnp_ca_file"] == "/plane/ca.pem"
    assert hv["sshnp_device_group"] == "lab"
    assert hv["ansible_user"] == "pi"  # compose
    assert inv.get_host("gw.bob_device").get_vars()["ansible_user"] == "admin"
    assert inv.get_host("broken.bob_device").get_vars()["sshnp_error"]
    groups = inv.groups
    assert {h.name for h in groups["sshnp"].get_hosts()} == set(inv.hosts)
    assert {h.name for h in groups["sshnp_atsign_alice_device"].get_hosts()} == {
        "pi4.alice_device", "pi5.alice_device"}
    assert {h.name for h in groups["sshnp_group_lab"].get_hosts()} == {"pi4.alice_device"}
    assert "sshnp_group___none__" not in groups
    assert {h.name for h in groups["pis"].get_hosts()} == {"pi4.alice_device",
                                                           "pi5.alice_device"}
    assert {h.name for h in groups["sshnpd_5_6_3"].get_hosts()} == {"pi5.alice_device"}


def test_inventory_hostname_format_and_set_ansible_user(tmp_path, monkeypatch, fleet, keys):
    cfg = ("plugin: noports.sshnp.devices\nclient_atsign: '@alice_client'\n"
           "hostname_format: '{atsign}-{device}'\nset_ansible_user: true\ngroup_prefix: np\n"
           "connection_plugin: sshnp\n")
    inv = run_inventory(tmp_path, monkeypatch, fleet, keys, cfg)
    hv = inv.get_host("alice_device-pi4").get_vars()
    assert hv["ansible_user"] == "pi" and hv["ansible_connection"] == "sshnp"
    assert "ansible_sshnp_relays" not in hv
    assert "np_atsign_bob_device" in inv.groups


def test_inventory_cache(tmp_path, monkeypatch, fleet, keys):
    cfg = CONFIG + (f"cache: true\ncache_plugin: ansible.builtin.jsonfile\n"
                    f"cache_connection: {tmp_path / 'cache'}\n")
    run_inventory(tmp_path, monkeypatch, fleet, keys, cfg, cache=False)  # refresh + store

    class Down:
        def command(self, cmd):
            raise AssertionError("the cache should have answered")

    inv = run_inventory(tmp_path, monkeypatch, Down(), keys, cfg, cache=True)
    assert "pi4.alice_device" in inv.hosts


def test_verify_file_wants_the_suffix(tmp_path):
    plugin = inventory_loader.get("noports.sshnp.devices")
    for name, ok in [("a.sshnp.yml", True), ("a.sshnp.yaml", True), ("a.yml", False),
                     ("sshnp.yml", False)]:
        p = tmp_path / name
        p.write_text("plugin: noports.sshnp.devices\n")
        assert plugin.verify_file(str(p)) is ok, name


def test_connection_errors_are_parser_errors(tmp_path, monkeypatch, keys):
    class Broken:
        def command(self, cmd):
            from noports.atclient.connection import AtTimeoutError
            raise AtTimeoutError("no reply from 127.0.0.1:6464 to 'scan' within 10s")

    with pytest.raises(AnsibleParserError, match="listing the devices of @alice_client"):
        run_inventory(tmp_path, monkeypatch, Broken(), keys)


# --- one parser with sshnp and --list-devices (deviceinfo_corpus.py) -----------------------------

def test_inventory_reads_device_info_like_sshnp(keys):
    """Every corpus value goes through fetch_devices: accepted ones become the host's
    ``info`` as sent, the others stay in the inventory with ``error`` naming the problem."""
    from .deviceinfo_corpus import CORPUS

    s = FakeAtServer(keys)
    names = {}
    for i, (name, text, _accepted, _version) in enumerate(CORPUS):
        names[f"d{i:02d}"] = name
        s.share("@corpus", f"device_info.d{i:02d}.sshnp", text)
    out = devmod.fetch_devices(s, CLIENT, devmod._AtKeysCrypto(keys.encrypt_private))
    assert [d["device"] for d in out] == sorted(names)
    for d in out:
        name, text, accepted, version = next(c for c in CORPUS if c[0] == names[d["device"]])
        if accepted:
            assert d["error"] is None, name
            assert d["info"] == json.loads(text), name
            assert d["info"].get("version") == version, name
        else:
            assert d["info"] == {} and "device info" in d["error"], name


def test_inventory_scan_is_the_clients():
    from noports.client import deviceinfo

    from .deviceinfo_corpus import KEYS
    assert devmod.SCAN_REGEX == deviceinfo.SCAN_REGEX
    reply = json.dumps([k for k, _c, _e in KEYS])
    assert devmod.parse_scan(reply, "@alice") == [
        (k.key, k.device_atsign, k.device) for k in deviceinfo.parse_scan(reply, "@alice")]
    assert {(at, dev) for _k, at, dev in devmod.parse_scan(reply, "@alice")} == {
        e for _k, _c, e in KEYS if e is not None}


def test_inventory_module_imports_no_runtime_at_load():
    """ansible-doc and the plugin loader must not need the noports runtime: it is imported
    inside the functions that talk to the atServer."""
    import ast
    from pathlib import Path
    tree = ast.parse(Path(devmod.__file__).read_text(encoding="utf-8"))
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = [a.name for n in top for a in n.names] + [
        n.module or "" for n in top if isinstance(n, ast.ImportFrom)]
    assert not [n for n in names if n.split(".")[0] == "noports"]
