# Copyright (c) noports.sshnp developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
# ruff: noqa: E402  (Ansible convention: DOCUMENTATION/EXAMPLES come before the imports)
"""``noports.sshnp.devices``: the devices that share their device_info with the client atSign.

Why this source of truth: every ``sshnpd`` puts ``@client:device_info.<device>.sshnp@<device
atSign>`` (NoPorts K9, docs/reference/noports-protocol.md#key-names, docs/reference/noports-protocol.md#username-and-device-listing) for each of its
managers and refreshes it hourly, and the client's atServer keeps a cached copy; so one
authenticated ``scan`` of the client's own atServer lists the fleet, offline devices included,
without contacting any device.
"""

from __future__ import annotations

DOCUMENTATION = r"""
name: devices
short_description: Devices reachable with SSH No Ports, from the client atSign's atServer
version_added: 0.1.0
description:
  - Authenticates to the client atSign's atServer (PKAM, with the client C(.atKeys)), scans
    for the C(device_info) records that device daemons share with it, decrypts them and adds
    one host per device, with the connection variables of the C(noports.sshnp.sshnp)
    connection plugin set.
  - Groups hosts by device atSign (C(<group_prefix>_atsign_<atSign>)) and by the daemon's
    C(deviceGroupName) (C(<group_prefix>_group_<name>)); all hosts are also in
    C(<group_prefix>). O(compose), O(groups) and O(keyed_groups) work as in
    C(ansible.builtin.constructed).
  - The configuration file name must end in C(.sshnp.yml) or C(.sshnp.yaml).
author: noports.sshnp developers (@noports)
requirements:
  - The C(noports) Python distribution importable by the controller's Python.
extends_documentation_fragment:
  - constructed
  - inventory_cache
  - noports.sshnp.sshnp
seealso:
  - plugin: noports.sshnp.sshnp
    plugin_type: connection
options:
  plugin:
    description: Marks this file as a configuration for this plugin.
    required: true
    type: string
    choices: [noports.sshnp.devices]
  client_atsign:
    required: true
  device_regex:
    description:
      - Only devices whose name matches this regular expression (Python syntax, full match).
    type: string
    default: ".+"
  device_atsigns:
    description:
      - Only devices served by these device atSigns. Empty means all.
    type: list
    elements: string
    default: []
  hostname_format:
    description:
      - Inventory host name, a Python format string with the fields C(device), C(atsign)
        (without C(@)) and C(group).
    type: string
    default: "{device}.{atsign}"
  group_prefix:
    description:
      - Prefix of the generated groups, and the name of the group with every device.
    type: string
    default: sshnp
  connection_plugin:
    description:
      - Value of C(ansible_connection) for the generated hosts. Keep the fully qualified
        name unless the short name is on the connection plugin path.
    type: string
    default: noports.sshnp.sshnp
  set_ansible_user:
    description:
      - Set C(ansible_user) to the user name the device shares (its daemon's Unix user).
      - The value is always available as C(sshnp_username).
    type: boolean
    default: false
  timeout:
    description:
      - Seconds for each connect and reply of the atDirectory and atServer.
    type: float
    default: 10
"""

EXAMPLES = r"""
# fleet.sshnp.yml
plugin: noports.sshnp.devices
client_atsign: "@alice_client"
relays: ["@rv_eu", "@rv_am"]
# self-hosted plane:
# root_domain: 127.0.0.1:6464
# ca_file: ~/.noports/plane/tls/ca.pem
device_regex: "pi.*"
keyed_groups:
  - key: sshnp_version
    prefix: sshnpd
compose:
  ansible_user: sshnp_username
cache: true
cache_plugin: ansible.builtin.jsonfile
cache_connection: ~/.cache/ansible-sshnp
cache_timeout: 600

# ansible-inventory -i fleet.sshnp.yml --graph
"""

import json
import re
import ssl
import typing as t

from ansible.errors import AnsibleParserError
from ansible.plugins.inventory import BaseInventoryPlugin, Cacheable, Constructable
from ansible_collections.noports.sshnp.plugins.plugin_utils._sshnp_common import (
    DEFAULT_ROOT_DOMAIN,
    SshnpConfigError,
    norm_atsign,
    relay_list,
)

#: what the scan asks for; equal to ``noports.client.deviceinfo.SCAN_REGEX`` (unit-tested),
#: spelled out so that ansible-doc and the plugin loader never import the runtime
SCAN_REGEX = r"device_info\..+\.sshnp@"
NO_GROUP = "__none__"


class AtCommander(t.Protocol):
    """What :func:`fetch_devices` needs: ``noports.atclient.connection.AtConnection``."""

    def command(self, cmd: str) -> str: ...


class _Crypto(t.Protocol):
    def unwrap(self, wrapped_b64: str) -> str: ...

    def decrypt(self, aes_key_b64: str, ciphertext_b64: str, iv_b64: str | None) -> str: ...


def parse_scan(reply: str, client_atsign: str) -> list[tuple[str, str, str]]:
    """``scan`` JSON -> sorted ``(key, device atSign, device)`` for this client's K9 records
    (``noports.client.deviceinfo.parse_scan``, the parser ``sshnp --list-devices`` uses)."""
    from noports.client import deviceinfo
    return [(k.key, k.device_atsign, k.device)
            for k in deviceinfo.parse_scan(reply, client_atsign)]


def parse_info(text: str | None) -> dict[str, t.Any]:
    """The device's record as sent, once ``noports.client.deviceinfo.parse_value`` (the
    parser sshnp and ``--list-devices`` use) accepted it; raises ValueError otherwise."""
    if not text:
        return {}
    from noports.client import deviceinfo
    return deviceinfo.parse_value(text)[0]


def _lookup_all(conn: AtCommander, cmd: str) -> tuple[str | None, dict[str, t.Any]]:
    obj = json.loads(conn.command(cmd))
    if not isinstance(obj, dict):
        raise ValueError(f"{cmd.split(':', 1)[0]} reply is not a JSON object")
    meta = obj.get("metaData") or obj.get("metadata") or {}
    data = obj.get("data")
    return (None if data is None else str(data)), (meta if isinstance(meta, dict) else {})


def _shared_value(conn: AtCommander, crypto: _Crypto, shared_keys: dict[str, str],
                  key: str, name: str, device_atsign: str) -> str | None:
    """The plaintext of a record ``device_atsign`` shared with us: the cached copy first
    (works while the device is offline), else a lookup through its atServer."""
    from noports.atclient.connection import AtProtocolError
    try:
        data, meta = _lookup_all(conn, f"llookup:all:{key}")
    except AtProtocolError:
        data, meta = None, {}
    if data is None:
        try:
            data, meta = _lookup_all(conn, f"lookup:all:{name}{device_atsign}")
        except AtProtocolError:
            return None
    if data is None:
        return None
    if str(meta.get("isEncrypted", True)).lower() == "false":
        return data
    if device_atsign not in shared_keys:
        wrapped = conn.command(f"lookup:shared_key{device_atsign}").strip()
        if not wrapped or wrapped == "null":
            raise ValueError(f"{device_atsign} has not shared an encryption key with us")
        shared_keys[device_atsign] = crypto.unwrap(wrapped)
    return crypto.decrypt(shared_keys[device_atsign], data, meta.get("ivNonce"))


def fetch_devices(conn: AtCommander, client_atsign: str, crypto: _Crypto, *,
                  device_regex: str = ".+",
                  device_atsigns: t.Iterable[str] = ()) -> list[dict[str, t.Any]]:
    """Scan, decrypt and parse every K9 record; JSON-ready dicts (they go to the cache).

    A device whose record cannot be read is kept with ``error`` set rather than dropped, so
    an inventory never silently loses a host.
    """
    wanted = {norm_atsign(a, "device_atsigns") for a in device_atsigns}
    name_rx = re.compile(device_regex)
    shared_keys: dict[str, str] = {}
    out: list[dict[str, t.Any]] = []
    for key, device_atsign, device in parse_scan(conn.command(f"scan {SCAN_REGEX}"),
                                                 client_atsign):
        if wanted and device_atsign not in wanted:
            continue
        if not name_rx.fullmatch(device):
            continue
        record: dict[str, t.Any] = {"device_atsign": device_atsign, "device": device,
                                    "info": {}, "username": None, "error": None}
        try:
            text = _shared_value(conn, crypto, shared_keys, key,
                                 f"device_info.{device}.sshnp", device_atsign)
            record["info"] = parse_info(text)
            cached_user = key.replace(":device_info.", ":username.", 1)
            record["username"] = _shared_value(conn, crypto, shared_keys, cached_user,
                                               f"username.{device}.sshnp", device_atsign)
        except Exception as exc:  # one bad record must not hide the fleet
            record["error"] = f"{type(exc).__name__}: {exc}"
        out.append(record)
    return out


class _AtKeysCrypto:
    """RSA unwrap and AES-CTR decrypt with the client's keys (noports.atclient.e2e)."""

    def __init__(self, encrypt_private: str) -> None:
        self._private = encrypt_private

    def unwrap(self, wrapped_b64: str) -> str:
        from noports.atclient import e2e
        return e2e.rsa_unwrap(self._private, wrapped_b64)

    def decrypt(self, aes_key_b64: str, ciphertext_b64: str, iv_b64: str | None) -> str:
        from noports.atclient import e2e
        return e2e.decrypt_value(aes_key_b64, ciphertext_b64, iv_b64)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", name)


class InventoryModule(BaseInventoryPlugin, Constructable, Cacheable):
    """Hosts from the client's atServer (see the module docstring)."""

    NAME = "noports.sshnp.devices"

    def verify_file(self, path: str) -> bool:
        return bool(super().verify_file(path)
                    and path.endswith((".sshnp.yml", ".sshnp.yaml")))

    def parse(self, inventory: t.Any, loader: t.Any, path: str, cache: bool = True) -> None:
        super().parse(inventory, loader, path, cache)
        self._read_config_data(path)
        cache_key = self.get_cache_key(path)
        use_cache = bool(self.get_option("cache"))
        devices: list[dict[str, t.Any]] | None = None
        update_cache = use_cache and not cache
        if use_cache and cache:
            try:
                devices = self._cache[cache_key]
            except KeyError:
                update_cache = True
        if devices is None:
            devices = self._fetch_devices()
        if update_cache:
            self._cache[cache_key] = devices
        self._populate(devices)

    # -- control plane -------------------------------------------------------------------

    def _client_atsign(self) -> str:
        try:
            return norm_atsign(self.get_option("client_atsign"), "client_atsign")
        except SshnpConfigError as exc:
            raise AnsibleParserError(f"noports.sshnp.devices: {exc}") from None

    def _load_keys(self, client_atsign: str) -> t.Any:
        try:
            from noports.keys.atkeys import AtKeysError, default_keys_path, load_atkeys
        except ImportError as exc:
            raise AnsibleParserError(
                "noports.sshnp.devices needs the noports Python package on the controller "
                f"(pip install noports): {exc}") from None
        path = self.get_option("keys_file") or default_keys_path(client_atsign)
        try:
            return load_atkeys(path, client_atsign)
        except (AtKeysError, OSError) as exc:
            raise AnsibleParserError(f"noports.sshnp.devices: cannot load {path}: {exc}"
                                     ) from None

    def _open_connection(self, client_atsign: str, keys: t.Any) -> AtCommander:
        """Directory lookup, TLS to the client's atServer, PKAM (APKAM when enrolled)."""
        from noports.atclient.connection import AtConnection, find_secondary
        root = str(self.get_option("root_domain") or DEFAULT_ROOT_DOMAIN)
        host, sep, port = root.rpartition(":")
        if not sep or not host or not port.isdigit():
            host, port = root, "64"
        ca_file = self.get_option("ca_file")
        ctx = ssl.create_default_context(cafile=ca_file) if ca_file else None
        timeout = float(self.get_option("timeout"))
        server = find_secondary(host, int(port), client_atsign, ctx, timeout)
        conn = AtConnection(server[0], server[1], ctx, timeout=timeout)
        try:
            conn.authenticate_pkam(client_atsign, keys.pkam_private, keys.enrollment_id)
        except BaseException:
            conn.close()
            raise
        return conn

    def _fetch_devices(self) -> list[dict[str, t.Any]]:
        client = self._client_atsign()
        keys = self._load_keys(client)
        try:
            from noports.atclient.connection import AtClientError
            conn = self._open_connection(client, keys)
            try:
                return fetch_devices(conn, client, _AtKeysCrypto(keys.encrypt_private),
                                     device_regex=self.get_option("device_regex"),
                                     device_atsigns=self.get_option("device_atsigns") or ())
            finally:
                close = getattr(conn, "close", None)
                if callable(close):
                    close()
        except (AtClientError, OSError, ValueError, re.error) as exc:
            raise AnsibleParserError(
                f"noports.sshnp.devices: listing the devices of {client} failed: {exc}"
            ) from None

    # -- inventory -----------------------------------------------------------------------

    def _host_vars(self, client: str, dev: dict[str, t.Any]) -> dict[str, t.Any]:
        info = dev.get("info") or {}
        group = info.get("deviceGroupName")
        hv: dict[str, t.Any] = {
            "ansible_connection": self.get_option("connection_plugin"),
            "ansible_sshnp_client_atsign": client,
            "ansible_sshnp_device_atsign": dev["device_atsign"],
            "ansible_sshnp_device": dev["device"],
            "ansible_sshnp_root_domain": self.get_option("root_domain"),
            "sshnp_device_info": info,
            "sshnp_username": dev.get("username"),
            "sshnp_version": info.get("version"),
            "sshnp_features": info.get("supportedFeatures") or {},
            "sshnp_device_group": None if group in (None, NO_GROUP) else group,
            "sshnp_error": dev.get("error"),
        }
        relays = relay_list(self.get_option("relays"))
        if relays:
            hv["ansible_sshnp_relays"] = relays
        for opt in ("keys_file", "ca_file"):
            if self.get_option(opt):
                hv[f"ansible_sshnp_{opt}"] = self.get_option(opt)
        if self.get_option("set_ansible_user") and dev.get("username"):
            hv["ansible_user"] = dev["username"]
        return hv

    def _populate(self, devices: list[dict[str, t.Any]]) -> None:
        client = self._client_atsign()
        prefix = _safe(self.get_option("group_prefix"))
        strict = self.get_option("strict")
        self.inventory.add_group(prefix)
        for dev in devices:
            hv = self._host_vars(client, dev)
            try:
                name = self.get_option("hostname_format").format(
                    device=dev["device"], atsign=dev["device_atsign"].lstrip("@"),
                    group=hv["sshnp_device_group"] or "")
            except (KeyError, IndexError, ValueError) as exc:
                raise AnsibleParserError(f"noports.sshnp.devices: bad hostname_format: {exc}"
                                         ) from None
            host = self.inventory.add_host(name, group=prefix)
            for key, value in hv.items():
                self.inventory.set_variable(host, key, value)
            at_group = self.inventory.add_group(
                f"{prefix}_atsign_{_safe(dev['device_atsign'].lstrip('@'))}")
            self.inventory.add_child(at_group, host)
            if hv["sshnp_device_group"]:
                g = self.inventory.add_group(f"{prefix}_group_{_safe(hv['sshnp_device_group'])}")
                self.inventory.add_child(g, host)
            hostvars = self.inventory.get_host(host).get_vars()
            self._set_composite_vars(self.get_option("compose"), hostvars, host, strict=strict)
            self._add_host_to_composed_groups(self.get_option("groups"), hostvars, host,
                                              strict=strict)
            self._add_host_to_keyed_groups(self.get_option("keyed_groups"), hostvars, host,
                                           strict=strict)
