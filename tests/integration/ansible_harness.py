"""Ansible end to end in the "no open ports" topology (root + network namespaces).

The world a user starts from, built for real::

    root ns = controller    ansible-playbook, OpenSSH ssh, the sshnp client (ProxyCommand)
    relay ns  10.213.X.2    OpenSSH sshd on 10.213.X.2:22 (the relay host's admin access);
                            the roles put the control plane (atDirectory + atServer) and srvd here
    device ns 10.213.X.1i   OpenSSH sshd on 127.0.0.1:22 (topology.py), nftables drop-all guard;
                            during the setup phase only: a rule accepting tcp/22 from the
                            controller and a second sshd on the device address (same host key,
                            same authorized_keys); the sshnpd role installs the daemon here

Phases (test_ansible_e2e.py): :meth:`AnsibleE2E.provision` over plain SSH (``ansible_connection:
ssh`` as root, roles with ``service_manager: none``), then :meth:`AnsibleE2E.close_inbound`
(setup ssh masters closed, setup sshd stopped, the topology's drop-all ruleset restored), then a
playbook whose inventory says ``ansible_connection: sshnp``.

Hosts share one filesystem (namespaces isolate only the network), so every host gets its own
``host_root`` directory standing in for its /etc, /opt, /var, /run: the roles are pointed there.
Device sshd host key: the roles' sshnpd pins ``/etc/ssh/ssh_host_*_key.pub`` (the role has no
variable for ``sshd_host_keys``), so each device sshd serves ``/etc/ssh/ssh_host_ed25519_key``,
as a real device's sshd does; the relay's sshd gets a fresh key.

Also used by bench/ansible_playbook.py for inventories, ansible-playbook runs and recaps.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from plane_harness import Proc
from topology import NFT_DEVICE_RULES, SSHD, Topology, build_topology, tcp_connect

REPO = Path(__file__).resolve().parents[2]
E2E_DIR = REPO / "tests" / "ansible" / "e2e"
PY = sys.executable
ETC_HOST_KEY = Path("/etc/ssh/ssh_host_ed25519_key")

RELAY_ATSIGN = "@np_rv"
CLIENT_ATSIGN = "@np_ops"
PLANE_PORT = 6464


def device_atsign(i: int) -> str:
    return f"@np_box{i}"


def device_name(i: int) -> str:
    return f"box{i}"


def ansible_tool(name: str) -> str:
    """An Ansible CLI next to this interpreter (the venv), else on PATH."""
    found = Path(PY).parent / name
    if found.exists():
        return str(found)
    return shutil.which(name) or name


# --------------------------------------------------------------------------- playbook runs


def parse_recap(output: str) -> dict[str, dict[str, int]]:
    """``PLAY RECAP`` -> {host: {"ok": n, "changed": n, "unreachable": n, "failed": n, ...}}."""
    recap: dict[str, dict[str, int]] = {}
    if "PLAY RECAP" not in output:
        return recap
    for line in output.rsplit("PLAY RECAP", 1)[1].splitlines():
        m = re.match(r"^(\S+)\s+:\s+(ok=.*)$", line.strip())
        if m:
            recap[m.group(1)] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(2))}
    return recap


@dataclass
class PlaybookRun:
    argv: list[str]
    returncode: int
    output: str
    seconds: float
    recap: dict[str, dict[str, int]]

    def tail(self, n: int = 8000) -> str:
        return self.output[-n:]

    def check(self) -> PlaybookRun:
        bad = {h: r for h, r in self.recap.items()
               if r.get("failed", 0) or r.get("unreachable", 0)}
        if self.returncode != 0 or bad or not self.recap:
            raise AssertionError(f"ansible-playbook failed (rc={self.returncode}, {bad}):\n"
                                 f"{' '.join(self.argv)}\n{self.tail()}")
        return self


def write_inventory(path: Path, inventory: Mapping) -> Path:
    """JSON is YAML: an inventory file the yaml inventory plugin reads as it is."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(inventory, indent=2) + "\n")
    return path


COLLECTION_PARTS = ("galaxy.yml", "meta", "plugins", "roles", "src", "scripts", "pyproject.toml",
                    "README.md", "COPYING", "LICENSES")


def snapshot_collection(collections: Path) -> Path:
    """Copy the collection (what ``ansible-galaxy collection build`` ships: plugins, roles,
    and the runtime's ``src``/``scripts``/``pyproject.toml``) to
    ``<collections>/ansible_collections/noports/sshnp`` and return that path.

    A copy, not a link to the checkout: the roles build their runtime payload from the
    collection, and a payload that changes between the first and the second run (someone
    editing ``src/`` meanwhile) would be a real change, not an idempotence failure."""
    dest = collections / "ansible_collections" / "noports" / "sshnp"
    dest.mkdir(parents=True, exist_ok=True)
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", ".ruff_cache", ".pytest_cache")
    for part in COLLECTION_PARTS:
        src = REPO / part
        if src.is_dir():
            shutil.copytree(src, dest / part, ignore=skip, dirs_exist_ok=True)
        elif src.is_file():
            shutil.copy2(src, dest / part)
    return dest


def close_masters(cp_dir: Path, timeout: float = 10) -> int:
    """``ssh -O exit`` every OpenSSH master whose socket is in ``cp_dir`` (bounded)."""
    n = 0
    if not cp_dir.is_dir():
        return 0
    for sock in sorted(cp_dir.iterdir()):
        if not sock.is_socket():
            continue
        subprocess.run(["ssh", "-F", "/dev/null", "-o", f"ControlPath={sock}", "-O", "exit",
                        "np-master"], capture_output=True, timeout=timeout, check=False)
        n += 1
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(s.is_socket() for s in cp_dir.iterdir()):
        time.sleep(0.05)
    return n


# --------------------------------------------------------------------------- hosts


@dataclass
class Host:
    """One managed host: its namespace, address, and the directory standing for its /."""

    name: str
    ns: str | None
    address: str
    root: Path
    index: int = 0  # device number (1-based); 0 for the relay

    @property
    def log_dir(self) -> Path:
        return self.root / "var" / "log" / "noports"


def sshd_config(path: Path, *, listen: str, port: int, host_key: Path, authorized_keys: Path,
                pid_file: Path) -> Path:
    path.write_text("\n".join([
        f"Port {port}", f"ListenAddress {listen}", f"HostKey {host_key}",
        f"AuthorizedKeysFile {authorized_keys}", f"PidFile {pid_file}", "StrictModes no",
        "UsePAM no", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
        "PubkeyAuthentication yes", "PermitRootLogin prohibit-password",
        "AllowTcpForwarding yes", "Subsystem sftp internal-sftp", "LogLevel VERBOSE",
        "MaxSessions 64", "MaxStartups 100:30:200", ""]))
    return path


class AnsibleE2E:
    """The topology plus what the controller needs to run playbooks into it."""

    def __init__(self, topo: Topology, base: Path) -> None:
        self.topo = topo
        self.base = base
        self.home = base / "controller-home"  # HOME of every ansible/ssh/sshnp run
        self.controller_dir = base / "controller"
        self.client_keys_dir = self.controller_dir / "keys"
        self.collections = base / "collections"
        self.cp_dir = base / "cp"  # ControlPath directory (short: sun_path is 108 bytes)
        self.known_hosts = base / "known_hosts"
        self.identity = self.home / ".ssh" / "id_ed25519"
        self.relay = Host("relay", topo.relay_ns, topo.relay_address, base / "hosts" / "relay")
        self.devices = [Host(device_name(i), topo.device_ns(i), topo.device_address(i),
                             base / "hosts" / device_name(i), i)
                        for i in range(1, topo.n_devices + 1)]
        self.relay_sshd: Proc | None = None
        self.setup_sshd: dict[int, Proc] = {}
        self.inbound_open = False
        self.runs: list[PlaybookRun] = []

    # -- environment -----------------------------------------------------------------------
    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        for k in [k for k in env if k.startswith("ANSIBLE_")]:
            del env[k]  # nothing of the caller's Ansible setup leaks in
        env.update({
            "HOME": str(self.home),
            "ANSIBLE_CONFIG": str(E2E_DIR / "ansible.cfg"),
            "NOPORTS_COLLECTION_ROOT": str(self.collections),
            "ANSIBLE_SSH_CONTROL_PATH_DIR": str(self.cp_dir),
            "ANSIBLE_LOCAL_TEMP": str(self.base / "ansible-local"),
            "ANSIBLE_REMOTE_TEMP": str(self.base / "ansible-remote"),
            "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0",
            "ANSIBLE_STDOUT_CALLBACK": "ansible.builtin.default",
            "ANSIBLE_CALLBACK_RESULT_FORMAT": "yaml",
            "PYTHONUNBUFFERED": "1",
        })
        env["PATH"] = f"{Path(PY).parent}:{env.get('PATH', '/usr/bin:/bin')}"
        env.update(extra)
        return env

    def playbook(self, playbook: str | Path, inventory: Path, *args: str, timeout: float = 240,
                 env: Mapping[str, str] | None = None) -> PlaybookRun:
        argv = [ansible_tool("ansible-playbook"), "-i", str(inventory),
                str(E2E_DIR / playbook if isinstance(playbook, str) else playbook), *args]
        t0 = time.monotonic()
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                           env=self.env(**(env or {})), cwd=str(E2E_DIR), check=False)
        out = p.stdout + p.stderr
        run = PlaybookRun(argv, p.returncode, out, time.monotonic() - t0, parse_recap(out))
        self.runs.append(run)
        return run

    # -- set-up ----------------------------------------------------------------------------
    def prepare(self) -> None:
        """Controller key and dirs, collection link, relay sshd, device sshd + setup access."""
        for d in (self.home / ".ssh", self.controller_dir, self.cp_dir, self.relay.root,
                  *(h.root for h in self.devices)):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        snapshot_collection(self.collections)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "np-ansible-e2e",
                        "-f", str(self.identity)], check=True, timeout=30)
        pub = Path(f"{self.identity}.pub").read_text().strip()

        # devices: sshd on 127.0.0.1:22 serving the host's /etc/ssh key (what sshnpd pins)
        for dev in self.topo.devices:
            key = dev.base / "ssh_host_ed25519_key"
            for suffix in ("", ".pub"):
                target = dev.base / f"ssh_host_ed25519_key{suffix}"
                if not target.exists():
                    os.symlink(f"{ETC_HOST_KEY}{suffix}", target)
            with open(dev.authorized_keys, "a", encoding="utf-8") as fh:
                fh.write(pub + "\n")
            self.topo.start_device_sshd(dev.index)
            assert dev.host_keys == [key]

        # relay: its own host key, sshd on its address (the relay takes inbound connections)
        rdir = self.relay.root / "sshd"
        rdir.mkdir(parents=True, exist_ok=True)
        rkey = rdir / "ssh_host_ed25519_key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "relay", "-f",
                        str(rkey)], check=True, timeout=30)
        rak = rdir / "authorized_keys"
        rak.write_text(pub + "\n")
        cfg = sshd_config(rdir / "sshd_config", listen=self.relay.address, port=22,
                          host_key=rkey, authorized_keys=rak, pid_file=rdir / "sshd.pid")
        self.relay_sshd = self.topo.spawn_in(self.relay.ns, [SSHD, "-D", "-e", "-f", str(cfg)])
        self.relay_sshd.wait_for(rf"Server listening on {re.escape(self.relay.address)} port 22",
                                 timeout=15)

        lines = [f"{self.relay.address} {' '.join(Path(f'{rkey}.pub').read_text().split()[:2])}"]
        etc_pub = " ".join(Path(f"{ETC_HOST_KEY}.pub").read_text().split()[:2])
        lines += [f"{h.address} {etc_pub}" for h in self.devices]
        self.known_hosts.write_text("\n".join(lines) + "\n")
        self.open_inbound()

    def open_inbound(self) -> None:
        """Setup phase: each device accepts tcp/22 from the controller on its own address."""
        for h in self.devices:
            self.topo.run_in(h.ns, ["nft", "insert", "rule", "inet", "np_guard", "input", "ip",
                                    "saddr", self.topo.controller_address, "tcp", "dport", "22",
                                    "accept"])
            dev = self.topo.device(h.index)
            d = dev.base / "setup-sshd"
            d.mkdir(exist_ok=True)
            cfg = sshd_config(d / "sshd_config", listen=h.address, port=22,
                              host_key=dev.host_keys[0], authorized_keys=dev.authorized_keys,
                              pid_file=d / "sshd.pid")
            proc = self.topo.spawn_in(h.ns, [SSHD, "-D", "-e", "-f", str(cfg)])
            proc.wait_for(rf"Server listening on {re.escape(h.address)} port 22", timeout=15)
            self.setup_sshd[h.index] = proc
        self.inbound_open = True

    def close_inbound(self) -> dict[str, str]:
        """End of the setup phase: close the setup ssh masters, stop the setup sshd, restore
        the drop-all guard. Returns ``{device: result of a TCP connect to address:22}``."""
        close_masters(self.cp_dir)
        for i, proc in list(self.setup_sshd.items()):
            proc.stop(timeout=5)
            del self.setup_sshd[i]
        for h in self.devices:
            self.topo.run_in(h.ns, ["nft", "-f", "-"],
                             input="delete table inet np_guard\n" + NFT_DEVICE_RULES)
        self.inbound_open = False
        return {h.name: tcp_connect(self.topo, None, h.address, 22, timeout=2.0)
                for h in self.devices}

    def ruleset(self, h: Host) -> str:
        return self.topo.run_in(h.ns, ["nft", "list", "ruleset"]).stdout

    def established_inbound(self, h: Host) -> list[str]:
        """Inbound TCP connections established on the device's own (non-loopback) address:
        local port 22 or any port something listens on (outbound ones, like sshnpd's to its
        atServer and to the relay, use ephemeral local ports and are not counted)."""
        listening = {ln.split()[3].rsplit(":", 1)[1] for ln in self.topo.run_in(
            h.ns, ["ss", "-Htln"]).stdout.splitlines() if len(ln.split()) >= 5}
        out = self.topo.run_in(h.ns, ["ss", "-Htn", "state", "established"]).stdout
        inbound = []
        for ln in out.splitlines():
            cols = ln.split()
            if len(cols) < 4 or not cols[2].startswith(f"{h.address}:"):
                continue
            if cols[2].rsplit(":", 1)[1] in listening | {"22"}:
                inbound.append(ln)
        return inbound

    # -- inventories -----------------------------------------------------------------------
    def runtime_vars(self) -> dict:
        return {"runtime_python": PY,
                "runtime_site_dirs": [sysconfig.get_paths()["purelib"]],
                "payload_cache": str(self.base / "payload-cache")}

    def provision_inventory(self) -> Path:
        ssh_vars = {
            "ansible_connection": "ssh",
            "ansible_user": "root",
            "ansible_ssh_private_key_file": str(self.identity),
            "ansible_ssh_common_args": (f"-F /dev/null -o UserKnownHostsFile={self.known_hosts}"
                                        " -o GlobalKnownHostsFile=/dev/null"
                                        " -o IdentitiesOnly=yes -o BatchMode=yes"),
            "ansible_python_interpreter": PY,
        }
        inv = {"all": {
            "vars": {"plane_host": self.relay.address, "plane_port": PLANE_PORT,
                     "relay_atsign": RELAY_ATSIGN, "client_atsign": CLIENT_ATSIGN,
                     "controller_dir": str(self.controller_dir),
                     "client_keys_dir": str(self.client_keys_dir), **self.runtime_vars()},
            "children": {
                "relays": {"hosts": {"relay": {"ansible_host": self.relay.address,
                                              "host_root": str(self.relay.root), **ssh_vars}}},
                "devices": {"hosts": {h.name: {
                    "ansible_host": h.address, "host_root": str(h.root),
                    "device_atsign": device_atsign(h.index), "device_name": h.name,
                    "device_address": h.address,
                    "device_authorized_keys": str(self.topo.device(h.index).authorized_keys),
                    **ssh_vars} for h in self.devices}},
            }}}
        return write_inventory(self.base / "inventory-provision.yml", inv)

    def client_keys(self) -> Path:
        return self.client_keys_dir / f"{CLIENT_ATSIGN}_key.atKeys"

    def sshnp_inventory(self, *, connection: str = "sshnp") -> Path:
        """What a user writes: ``ansible_connection: sshnp`` and the device identities."""
        inv = {"all": {"children": {"devices": {
            "vars": {
                "ansible_connection": connection,
                "ansible_user": "root",
                "ansible_ssh_private_key_file": str(self.identity),
                "ansible_sshnp_client_atsign": CLIENT_ATSIGN,
                "ansible_sshnp_relays": RELAY_ATSIGN,
                "ansible_sshnp_keys_file": str(self.client_keys()),
                "ansible_sshnp_root_domain": f"{self.relay.address}:{PLANE_PORT}",
                "ansible_sshnp_ca_file": str(self.controller_dir / "ca.pem"),
                "ansible_python_interpreter": PY,
                "ansible_become_method": "su",  # no sudo in the image; root -> root
                "controller_dir": str(self.controller_dir),
            },
            "hosts": {h.name: {"ansible_sshnp_device_atsign": device_atsign(h.index),
                               "ansible_sshnp_device": h.name, "host_root": str(h.root),
                               "device_address": h.address} for h in self.devices},
        }}}}
        return write_inventory(self.base / "inventory-sshnp.yml", inv)

    # -- what the daemons logged -----------------------------------------------------------
    def srvd_log(self) -> Path:
        return self.relay.log_dir / "srvd.log"

    def sshnpd_log(self, h: Host) -> Path:
        return h.log_dir / "sshnpd.log"

    def log_mark(self) -> dict[Path, int]:
        paths = [self.srvd_log(), *(self.sshnpd_log(h) for h in self.devices)]
        return {p: (p.stat().st_size if p.exists() else 0) for p in paths}

    @staticmethod
    def _since(path: Path, mark: Mapping[Path, int]) -> str:
        if not path.exists():
            return ""
        with open(path, "rb") as fh:
            fh.seek(mark.get(path, 0))
            return fh.read().decode("utf-8", "replace")

    def rendezvous_since(self, mark: Mapping[Path, int]) -> dict[str, dict[str, list[str]]]:
        """{device name: {"srvd": [session lines], "sshnpd": [session lines]}} after ``mark``.

        srvd logs ``session <sid> opened for @client -> @device (device <name>): ...`` once per
        session it opens; sshnpd logs ``session <sid> for @client: relay h:p, cipher ...`` once
        per ssh_request it serves."""
        srvd = self._since(self.srvd_log(), mark)
        out: dict[str, dict[str, list[str]]] = {}
        for h in self.devices:
            pat = re.compile(rf"session \S+ opened for {re.escape(CLIENT_ATSIGN)} -> "
                             rf"{re.escape(device_atsign(h.index))} \(device {re.escape(h.name)}[),]")
            dpat = re.compile(rf"session \S+ for {re.escape(CLIENT_ATSIGN)}: relay ")
            out[h.name] = {
                "srvd": [ln for ln in srvd.splitlines() if pat.search(ln)],
                "sshnpd": [ln for ln in self._since(self.sshnpd_log(h), mark).splitlines()
                           if dpat.search(ln)],
            }
        return out

    # -- teardown --------------------------------------------------------------------------
    def close(self) -> None:
        with contextlib.suppress(Exception):
            close_masters(self.cp_dir)


@contextlib.contextmanager
def ansible_world(base: Path, n_devices: int = 2) -> Iterator[AnsibleE2E]:
    """Topology (namespaced) with sshd on the relay and, reachable for the setup phase, on
    every device. Daemons the roles start run inside the namespaces and are stopped by the
    topology's teardown (TERM, then KILL, by pid)."""
    with build_topology(base / "topo", n_devices=n_devices, sshd=False) as topo:
        world = AnsibleE2E(topo, base)
        try:
            world.prepare()
            yield world
        finally:
            world.close()


def skip_reason() -> str | None:
    """Why the e2e cannot run here (None when it can)."""
    from topology import want_namespaces
    if not want_namespaces():
        return "needs root and network namespaces (drop-all devices are the point of the test)"
    for tool in ("nft", "ssh", "ssh-keygen", "ss"):
        if not shutil.which(tool):
            return f"{tool} is not installed"
    if not Path(SSHD).exists():
        return "OpenSSH sshd is not installed"
    if not (ETC_HOST_KEY.exists() and Path(f"{ETC_HOST_KEY}.pub").exists()):
        return f"{ETC_HOST_KEY} missing (sshnpd pins /etc/ssh host keys; run ssh-keygen -A)"
    if not Path(ansible_tool("ansible-playbook")).exists():
        return "ansible-playbook is not installed"
    return None


__all__ = [
    "AnsibleE2E", "CLIENT_ATSIGN", "E2E_DIR", "Host", "PLANE_PORT", "PlaybookRun",
    "RELAY_ATSIGN", "ansible_tool", "ansible_world", "close_masters", "device_atsign",
    "device_name", "parse_recap", "skip_reason", "snapshot_collection", "sshd_config",
    "write_inventory",
]
