"""The ``noports.sshnp.devices`` inventory plugin against a LIVE plane and REAL sshnpd daemons.

tests/unit/plugins/inventory/test_devices.py checks the plugin against a fake atServer; here
every component is the real program (subprocesses), on loopback, as root or not:

* the plane (tests.harness.plane): one atdirectory, an atserver for the users (client, relay,
  ``@inv_nobody``) and a second atserver for the two device atSigns, so the device_info
  records reach the client's atServer as in production (server to server, autoNotify);
* three ``sshnpd`` (``python -m noports.daemon.cli``) whose manager is the client atSign:
  ``alpha`` (@inv_dev_a, device group ``lab``), ``beta`` (@inv_dev_a, no group) and
  ``gamma`` (@inv_dev_b, device group ``lab-eu``). alpha and gamma front one real OpenSSH
  sshd on a high loopback port; nothing listens on beta's sshd port;
* ``srvd`` for the relay atSign;
* the venv's REAL ``ansible-inventory`` and ``ansible`` CLIs, with the collection snapshot and
  the ``ansible.cfg`` of test_ansible_e2e.py (tests.harness.ansible.snapshot_collection,
  tests/ansible/e2e/ansible.cfg, the environment of ``AnsibleE2E.env``).

Covered: ``ansible-inventory --list`` gives exactly the live devices with the documented
connection variables, daemon facts and groups; ``device_regex`` / ``device_atsigns`` /
``hostname_format`` / ``group_prefix`` / ``compose`` / ``groups`` / ``keyed_groups`` /
``set_ansible_user`` on live data; ``ansible all -m ping`` through the ``noports.sshnp.sshnp``
connection plugin with hosts straight from the plugin (SUCCESS where an sshd runs, UNREACHABLE
for beta, one rendezvous per host seen by srvd); an atSign that manages nothing gets an empty
inventory; wrong keys, missing keys and a wrong CA give the plugin's one-line parse error
(never an unexpected exception); the devices stay listed, facts included, with their atServer
down (the client's atServer's cached copies).
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from noports.atclient.connection import AtConnection, find_secondary
from noports.keys.atkeys import generate_atkeys, load_atkeys, save_atkeys
from noports.keys.ca import ensure_plane_tls
from tests.harness.ansible import ansible_env, ansible_tool, close_masters, snapshot_collection
from tests.harness.plane import Plane, Proc, free_port, spawn
from tests.harness.sshd import loopback_sshd

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not Path(SSHD).exists() or not shutil.which("ssh")
                       or not shutil.which("ssh-keygen"),
                       reason="OpenSSH sshd/ssh not installed"),
    pytest.mark.skipif(not Path(ansible_tool("ansible-inventory")).exists(),
                       reason="ansible-inventory is not installed"),
]

PY = sys.executable
CLIENT, RELAY, NOBODY = "@inv_client", "@inv_relay", "@inv_nobody"
DEV_A, DEV_B = "@inv_dev_a", "@inv_dev_b"


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    atsign: str
    group: str | None  # sshnpd --device-group; None: the daemon's default (__none__)
    sshd: bool  # an sshd listens on its --local-sshd-port

    @property
    def host(self) -> str:  # the plugin's default hostname_format "{device}.{atsign}"
        return f"{self.name}.{self.atsign.lstrip('@')}"


DEVICES = (
    DeviceSpec("alpha", DEV_A, "lab", True),
    DeviceSpec("beta", DEV_A, None, False),
    DeviceSpec("gamma", DEV_B, "lab-eu", True),
)
ALL_HOSTS = {d.host for d in DEVICES}


class Live:
    """Plane, srvd, sshd, three sshnpd, and the controller side of Ansible."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.home = base / "home"
        self.keys = self.home / ".atsign" / "keys"
        self.keys.mkdir(parents=True)
        self.cp_dir = base / "cp"  # ssh ControlPath dir (short: sun_path is 108 bytes)
        self.cp_dir.mkdir(mode=0o700)
        self.collections = base / "collections"
        self.procs: list[Proc] = []
        self.daemons: dict[str, Proc] = {}
        self.user = pwd.getpwuid(os.geteuid()).pw_name  # what sshnpd shares as username
        self.plane = Plane(base / "plane", keys_dir=self.keys)
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        self.plane.populate({"users": [CLIENT, RELAY, NOBODY], "devices": [DEV_A, DEV_B]})
        self.devices_server = self.plane.servers[1]
        self.root_tuple = self.plane.root_tuple
        self.ctx = self.plane.ssl_context()
        self.root = self.plane.root
        self.ca = str(self.plane.tls.ca_cert)
        self._start_sshd()
        self.closed_port = free_port()  # beta's "sshd": nothing listens there
        srvd = spawn([PY, "-m", "noports.relay.srvd_cli", "-a", RELAY, "-k",
                      str(self.keyfile(RELAY)), "--root-domain", self.root, "--ca-file",
                      self.ca, "-i", "127.0.0.1", "--bind", "127.0.0.1"], env=self.env())
        self.procs.append(srvd)
        self.srvd = srvd
        for spec in DEVICES:  # started together, waited for below
            self.daemons[spec.name] = self._spawn_sshnpd(spec)
        snapshot_collection(self.collections)
        srvd.wait_for(r"ready", timeout=20)
        for name, proc in self.daemons.items():
            proc.wait_for(r"shared username/device_info for 1 manager\(s\)", timeout=30)
            assert not [ln for ln in proc.lines if "could not share" in ln], (name, proc.lines)
        self._wait_cached()

    def _wait_cached(self, timeout: float = 15.0) -> None:
        """The devices' atServer pushes each record to the client's atServer after it has
        acknowledged the daemon's update (autoNotify): wait until the client's atServer holds
        every cached copy (device_info and username), so the plugin's first ``scan`` is not
        a race and the offline test finds both."""
        wanted = {f"cached:{CLIENT}:{what}.{d.name}.sshnp{d.atsign}"
                  for d in DEVICES for what in ("device_info", "username")}
        keys = load_atkeys(self.keyfile(CLIENT), CLIENT)
        host, port = find_secondary(*self.root_tuple, CLIENT, self.ctx, 10)
        conn = AtConnection(host, port, self.ctx, timeout=10)
        try:
            conn.authenticate_pkam(CLIENT, keys.pkam_private, keys.enrollment_id)
            deadline = time.monotonic() + timeout
            while True:
                seen = set(json.loads(conn.command(r"scan \.sshnp@")))
                if wanted <= seen:
                    return
                assert time.monotonic() < deadline, (wanted - seen, self.logs())
                time.sleep(0.05)
        finally:
            conn.close()

    # -- programs ------------------------------------------------------------------------
    def keyfile(self, atsign: str) -> Path:
        return self.keys / f"{atsign}_key.atKeys"

    def env(self) -> dict[str, str]:
        return {**os.environ, "HOME": str(self.home), "PYTHONUNBUFFERED": "1"}

    def _start_sshd(self) -> None:
        """A throw-away config, the current user, a high port (tests.harness.sshd)."""
        sshd = loopback_sshd(self.base, self.home)
        p, self.sshd_port, self.identity = sshd.proc, sshd.port, sshd.identity
        self.authorized, self.host_pub = sshd.authorized_keys, sshd.host_pub
        self.procs.append(p)

    def _spawn_sshnpd(self, spec: DeviceSpec) -> Proc:
        port = self.sshd_port if spec.sshd else self.closed_port
        argv = [PY, "-m", "noports.daemon.cli", "-a", spec.atsign, "-m", CLIENT,
                "-d", spec.name, "-k", str(self.keyfile(spec.atsign)),
                "--root-domain", self.root, "--ca-file", self.ca,
                "--local-sshd-port", str(port), "--permit-open", f"localhost:{port}",
                "--authorized-keys", str(self.authorized),
                "--sshd-host-keys", str(self.host_pub)]
        if spec.group:
            argv += ["--device-group", spec.group]
        p = spawn(argv, env=self.env())
        self.procs.append(p)
        return p

    # -- Ansible (tests.harness.ansible.ansible_env, as AnsibleE2E.env) -----------------------
    def ansible_env(self, **extra: str) -> dict[str, str]:
        return ansible_env(self.base, home=self.home, collections=self.collections,
                           cp_dir=self.cp_dir, **extra)

    def inventory(self, name: str, **options: object) -> Path:
        """``<name>.sshnp.yml`` for the plugin (JSON is YAML), pointed at this plane."""
        config: dict[str, object] = {
            "plugin": "noports.sshnp.devices", "client_atsign": CLIENT,
            "keys_file": str(self.keyfile(CLIENT)), "root_domain": self.root,
            "ca_file": self.ca, "relays": [RELAY], **options}
        path = self.base / f"{name}.sshnp.yml"
        path.write_text(json.dumps(config, indent=2) + "\n")
        return path

    def ansible(self, tool: str, *args: str, timeout: float = 60,
                **env: str) -> subprocess.CompletedProcess:
        return subprocess.run([ansible_tool(tool), *args], capture_output=True, text=True,
                              timeout=timeout, env=self.ansible_env(**env), cwd=str(self.base),
                              stdin=subprocess.DEVNULL, check=False)

    def inventory_list(self, inventory: Path, **env: str) -> subprocess.CompletedProcess:
        return self.ansible("ansible-inventory", "-i", str(inventory), "--list", **env)

    def logs(self) -> str:
        return "\n".join(f"--- {name}\n" + "\n".join(p.lines[-15:])
                         for name, p in self.daemons.items())

    def stop(self) -> None:
        close_masters(self.cp_dir)  # ControlPersist masters (and their sshnp clients)
        for p in reversed(self.procs):
            p.stop()
        self.plane.stop()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    world = Live(tmp_path_factory.mktemp("inv-live"))
    yield world
    world.stop()


def _plain(value: Any) -> Any:
    """ansible-core 2.19's ``--list`` (profile ``inventory_legacy``) writes the strings that
    are not trusted templates as ``{"__ansible_unsafe": "..."}``: unwrap them."""
    if isinstance(value, dict):
        if set(value) == {"__ansible_unsafe"}:
            return value["__ansible_unsafe"]
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _listed(res: subprocess.CompletedProcess, live: Live) -> dict:
    assert res.returncode == 0, f"rc={res.returncode}\n{res.stdout}\n{res.stderr}\n{live.logs()}"
    assert "Traceback" not in res.stderr, res.stderr
    assert "[WARNING]" not in res.stderr, res.stderr
    return _plain(json.loads(res.stdout))


def _hosts(inv: dict, group: str) -> set[str]:
    return set(inv.get(group, {}).get("hosts", []))


def _plugin_error(res: subprocess.CompletedProcess) -> str:
    """The reason ansible-inventory gives for the ``auto`` plugin (ours) failing."""
    m = re.search(r"Failed to parse inventory with 'auto' plugin: (.+)", res.stderr)
    assert m, res.stderr
    return m.group(1).strip()


# ------------------------------------------------------------------------------- listing


def test_list_shows_the_live_devices_with_connection_variables(live: Live) -> None:
    inv = _listed(live.inventory_list(live.inventory("fleet", set_ansible_user=True)), live)
    hostvars = inv["_meta"]["hostvars"]
    assert set(hostvars) == ALL_HOSTS, (inv, live.logs())
    for spec in DEVICES:
        hv = hostvars[spec.host]
        assert hv["sshnp_error"] is None, hv
        assert hv["ansible_connection"] == "noports.sshnp.sshnp"
        assert hv["ansible_sshnp_client_atsign"] == CLIENT
        assert hv["ansible_sshnp_device_atsign"] == spec.atsign
        assert hv["ansible_sshnp_device"] == spec.name
        assert hv["ansible_sshnp_root_domain"] == live.root
        assert hv["ansible_sshnp_relays"] == [RELAY]
        assert hv["ansible_sshnp_keys_file"] == str(live.keyfile(CLIENT))
        assert hv["ansible_sshnp_ca_file"] == live.ca
        # what the daemon shared, decrypted with the client's keys
        assert hv["sshnp_username"] == live.user
        assert hv["ansible_user"] == live.user  # set_ansible_user: true
        assert hv["sshnp_device_group"] == spec.group
        info = hv["sshnp_device_info"]
        assert info["devicename"] == spec.name, info
        assert info["deviceGroupName"] == (spec.group or "__none__"), info
        assert hv["sshnp_version"] == info["version"] and hv["sshnp_version"]
        assert hv["sshnp_features"] == info["supportedFeatures"]
        assert hv["sshnp_features"]["srAuth"] is True, hv["sshnp_features"]

    # <prefix>, <prefix>_atsign_<atSign>, <prefix>_group_<device group> (beta's __none__: none)
    assert _hosts(inv, "sshnp") == ALL_HOSTS
    assert _hosts(inv, "sshnp_atsign_inv_dev_a") == {"alpha.inv_dev_a", "beta.inv_dev_a"}
    assert _hosts(inv, "sshnp_atsign_inv_dev_b") == {"gamma.inv_dev_b"}
    assert _hosts(inv, "sshnp_group_lab") == {"alpha.inv_dev_a"}
    assert _hosts(inv, "sshnp_group_lab_eu") == {"gamma.inv_dev_b"}
    assert sorted(g for g in inv if g.startswith("sshnp_group_")) == [
        "sshnp_group_lab", "sshnp_group_lab_eu"]
    assert {"sshnp", "sshnp_atsign_inv_dev_a", "sshnp_atsign_inv_dev_b"} <= set(
        inv["all"]["children"])


def test_device_regex_and_device_atsigns_exclude(live: Live) -> None:
    inv = _listed(live.inventory_list(live.inventory("by-name", device_regex="alpha|gamma")),
                  live)
    assert set(inv["_meta"]["hostvars"]) == {"alpha.inv_dev_a", "gamma.inv_dev_b"}
    assert _hosts(inv, "sshnp_atsign_inv_dev_a") == {"alpha.inv_dev_a"}

    inv = _listed(live.inventory_list(live.inventory(
        "by-atsign", device_atsigns=[DEV_B.lstrip("@")])), live)  # '@' is optional
    assert set(inv["_meta"]["hostvars"]) == {"gamma.inv_dev_b"}
    assert "sshnp_atsign_inv_dev_a" not in inv and "sshnp_group_lab" not in inv

    inv = _listed(live.inventory_list(live.inventory(
        "both", device_regex="a.*", device_atsigns=[DEV_A],
        hostname_format="{atsign}-{device}", group_prefix="np")), live)
    assert set(inv["_meta"]["hostvars"]) == {"inv_dev_a-alpha"}  # beta: regex, gamma: atSign
    assert _hosts(inv, "np") == _hosts(inv, "np_atsign_inv_dev_a") == {"inv_dev_a-alpha"}
    assert _hosts(inv, "np_group_lab") == {"inv_dev_a-alpha"}
    assert not [g for g in inv if g.startswith("sshnp")], sorted(inv)


def test_constructed_options_on_live_data(live: Live) -> None:
    inv_file = live.inventory(
        "constructed",
        compose={"ansible_user": "sshnp_username",
                 "device_label": "sshnp_device_info.devicename ~ ansible_sshnp_device_atsign"},
        groups={"in_a_group": "sshnp_device_group is not none"},
        keyed_groups=[{"key": "sshnp_version", "prefix": "sshnpd"}])
    inv = _listed(live.inventory_list(inv_file), live)
    hostvars = inv["_meta"]["hostvars"]
    for spec in DEVICES:
        assert hostvars[spec.host]["ansible_user"] == live.user
        assert hostvars[spec.host]["device_label"] == f"{spec.name}{spec.atsign}"
    assert _hosts(inv, "in_a_group") == {"alpha.inv_dev_a", "gamma.inv_dev_b"}
    version = hostvars["alpha.inv_dev_a"]["sshnp_version"]
    keyed = "sshnpd_" + re.sub(r"[^A-Za-z0-9_]", "_", version)
    assert _hosts(inv, keyed) == ALL_HOSTS, sorted(inv)


# ------------------------------------------------------------------------------- using it


def _ping_inventory(live: Live) -> Path:
    """Everything the connection needs comes from the plugin, plus the sshd's port and the
    controller's key through ``compose`` (Jinja expressions, hence the quoted literals)."""
    return live.inventory(
        "ping", set_ansible_user=True,
        compose={"ansible_port": str(live.sshd_port),
                 "ansible_ssh_private_key_file": repr(str(live.identity)),
                 "ansible_python_interpreter": repr(PY),
                 "ansible_sshnp_daemon_timeout": "8"})


def _statuses(stdout: str) -> dict[str, str]:
    """``host | SUCCESS => {...`` lines of the ad hoc (minimal) callback."""
    return dict(re.findall(r"^(\S+) \| (SUCCESS|CHANGED|FAILED!|UNREACHABLE!)", stdout, re.M))


def test_ping_through_the_sshnp_connection_plugin(live: Live) -> None:
    """``ansible all -m ping``: hosts and connection variables straight from the plugin, the
    ``noports.sshnp.sshnp`` connection plugin, the real relay, daemons and sshd."""
    mark = len(live.srvd.lines)
    t0 = time.monotonic()
    res = live.ansible("ansible", "-i", str(_ping_inventory(live)), "all",
                       "-m", "ansible.builtin.ping", timeout=90)
    print(f"\nansible -m ping over sshnp, 3 hosts: {time.monotonic() - t0:.1f}s")
    out = res.stdout + res.stderr
    assert "Traceback" not in out, out
    assert _statuses(res.stdout) == {"alpha.inv_dev_a": "SUCCESS", "gamma.inv_dev_b": "SUCCESS",
                                     "beta.inv_dev_a": "UNREACHABLE!"}, (out, live.logs())
    assert res.stdout.count('"ping": "pong"') == 2, out
    assert res.returncode == 4, out  # ansible's "some hosts were unreachable"
    # each host went through one rendezvous on the relay, for the right device
    opened = "\n".join(live.srvd.lines[mark:])
    for spec in DEVICES:
        found = re.findall(rf"session \S+ opened for {CLIENT} -> {spec.atsign} "
                           rf"\(device {spec.name}\)", opened)
        assert len(found) == 1, (spec.name, opened)


@pytest.mark.parametrize("pipelining", [
    pytest.param("False", id="no-pipelining"),
    pytest.param("True", id="pipelining"),  # ssh.py raises its own error on exit 255
])
def test_unreachable_device_names_the_failed_step(live: Live, pipelining: str) -> None:
    """docs/ansible-connection.md: a device failure makes the host UNREACHABLE with the
    client's one-line message naming the failed step (here: beta's daemon cannot reach its
    sshd)."""
    res = live.ansible("ansible", "-i", str(_ping_inventory(live)), "beta.inv_dev_a",
                       "-m", "ansible.builtin.ping", timeout=60, ANSIBLE_PIPELINING=pipelining)
    assert _statuses(res.stdout) == {"beta.inv_dev_a": "UNREACHABLE!"}, res.stdout
    assert "Traceback" not in res.stdout + res.stderr
    assert f"sshnp: device: beta{DEV_A} refused" in res.stdout, res.stdout
    assert "cannot connect to the local sshd" in res.stdout, res.stdout
    assert f"[device {DEV_A} 'beta' as {CLIENT} via {RELAY}]" in res.stdout, res.stdout


# ------------------------------------------------------------------------------- failures


def test_atsign_that_manages_nothing_gets_an_empty_inventory(live: Live) -> None:
    inv = _listed(live.inventory_list(live.inventory(
        "nobody", client_atsign=NOBODY, keys_file=str(live.keyfile(NOBODY)))), live)
    assert inv["_meta"]["hostvars"] == {}
    assert not [g for g in inv if g.startswith("sshnp_")], inv
    assert not _hosts(inv, "sshnp")


def test_wrong_keys_and_ca_give_the_plugins_one_line_error(live: Live, tmp_path: Path) -> None:
    failing = f"noports.sshnp.devices: listing the devices of {CLIENT} failed: "
    # keys of the right atSign that its atServer has never seen, and another atSign's keys
    stranger = save_atkeys(generate_atkeys(CLIENT), tmp_path / "stranger.atKeys")
    for name, keys in (("stranger-keys", stranger), ("nobodys-keys", live.keyfile(NOBODY))):
        inv_file = live.inventory(name, keys_file=str(keys))
        res = live.inventory_list(inv_file)
        assert "Traceback" not in res.stderr, res.stderr
        error = _plugin_error(res)
        assert error.startswith(failing) and "pkam authentication failed" in error, error
        # Ansible's default: a source that fails to parse is a warning, the inventory empty
        assert res.returncode == 0, res.stderr
        assert _plain(json.loads(res.stdout))["_meta"]["hostvars"] == {}
        # ... and an error when unparsed inventory is configured to fail
        strict = live.inventory_list(inv_file, ANSIBLE_INVENTORY_UNPARSED_FAILED="True")
        assert strict.returncode != 0, strict.stdout
        assert _plugin_error(strict) == error
        assert "Traceback" not in strict.stderr, strict.stderr

    res = live.inventory_list(live.inventory("missing-keys",
                                             keys_file=str(tmp_path / "none.atKeys")))
    error = _plugin_error(res)
    missing = tmp_path / "none.atKeys"
    assert error.startswith(f"noports.sshnp.devices: cannot load {missing}"), error

    other_ca = ensure_plane_tls(tmp_path / "other-ca", ["127.0.0.1"]).ca_cert
    res = live.inventory_list(live.inventory("wrong-ca", ca_file=str(other_ca)))
    error = _plugin_error(res)
    assert error.startswith(failing) and "is not trusted" in error, error
    assert "Traceback" not in res.stderr, res.stderr


# ------------------------------------------------------------------------------- offline
# Last: it stops the devices' atServer and daemons for good.


def test_devices_stay_listed_while_their_atserver_is_down(live: Live) -> None:
    """The client's atServer keeps the cached copies: the fleet, facts included, is listed
    with every device and the devices' atServer offline ('offline devices are listed too')."""
    for proc in live.daemons.values():
        proc.stop()
    live.devices_server.proc.stop()
    inv = _listed(live.inventory_list(live.inventory("offline")), live)
    hostvars = inv["_meta"]["hostvars"]
    assert set(hostvars) == ALL_HOSTS
    for spec in DEVICES:
        assert hostvars[spec.host]["sshnp_error"] is None, hostvars[spec.host]
        assert hostvars[spec.host]["sshnp_username"] == live.user
        assert hostvars[spec.host]["sshnp_device_group"] == spec.group
    assert _hosts(inv, "sshnp_group_lab_eu") == {"gamma.inv_dev_b"}
