"""Ansible end to end in the "no open ports" topology: the world of test_ansible_e2e.py and of
``make demo`` (demo/run.py), built for real::

    root ns = controller    ansible-playbook, OpenSSH ssh, the sshnp client (ProxyCommand)
    relay ns  10.213.X.2    OpenSSH sshd on 10.213.X.2:22 (the relay host's admin access);
                            the roles put the control plane (atDirectory + atServer) and srvd here
    device ns 10.213.X.1i   OpenSSH sshd on 127.0.0.1:22 (topology.py), nftables drop-all guard;
                            during the setup phase only: a rule accepting tcp/22 from the
                            controller and a second sshd on the device address (same host key,
                            same authorized_keys); the sshnpd role installs the daemon here

Phases: :meth:`AnsibleE2E.provision_inventory` + ``provision.yml`` over plain SSH
(``ansible_connection: ssh``, roles with ``service_manager: none``), then
:meth:`AnsibleE2E.close_inbound` (setup ssh masters closed, setup sshd stopped, the topology's
drop-all ruleset restored), then a playbook whose inventory says ``ansible_connection: sshnp``.

Hosts share one filesystem (namespaces isolate only the network), so every host gets its own
``host_root`` directory standing in for its /etc, /opt, /var, /run: the roles are pointed there.
Device sshd host key (namespaced): each device sshd serves ``/etc/ssh/ssh_host_ed25519_key``, as
a real device's sshd does, which is what the sshnpd role pins by default; the relay's sshd gets
a fresh key.

Without root (or with ``NOPORTS_TOPOLOGY=loopback``) :func:`ansible_world` gives a
:class:`LoopbackE2E` instead: no namespaces and no firewall, every sshd runs as the current user
on a free high port of 127.0.0.1 with its own host key (``sshnpd_sshd_host_keys`` pins it), the
login user is the current user. The same playbooks run; what only namespaces can show (dropped
inbound connections, separate network stacks) is asserted only when ``topo.namespaced``.

Also used by bench/ansible_playbook.py for inventories, ansible-playbook runs and recaps.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from tests.harness.plane import Proc, free_port, unused_port
from tests.harness.sshd import keygen, start_sshd
from tests.harness.topology import (
    NFT_DEVICE_RULES,
    SSHD,
    Topology,
    build_topology,
    tcp_connect,
    want_namespaces,
)

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


def ansible_env(base: Path, *, home: Path, collections: Path, cp_dir: Path,
                **extra: str) -> dict[str, str]:
    """Environment of an ansible run on the controller: none of the caller's ``ANSIBLE_*``
    settings, ``HOME`` and temp dirs under ``base``, tests/ansible/e2e/ansible.cfg with the
    collection copy at ``collections``, ssh masters in ``cp_dir``, the venv first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    env.update({
        "HOME": str(home),
        "ANSIBLE_CONFIG": str(E2E_DIR / "ansible.cfg"),
        "NOPORTS_COLLECTION_ROOT": str(collections),
        "ANSIBLE_SSH_CONTROL_PATH_DIR": str(cp_dir),
        "ANSIBLE_LOCAL_TEMP": str(base / "ansible-local"),
        "ANSIBLE_REMOTE_TEMP": str(base / "ansible-remote"),
        "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0",
        "PYTHONUNBUFFERED": "1",
    })
    env["PATH"] = f"{Path(PY).parent}:{env.get('PATH', '/usr/bin:/bin')}"
    env.update(extra)
    return env


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


def _proc_state(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/status").read_bytes()
    except OSError:
        return b"zombie"


def agent_pids(cp_dir: Path) -> list[int]:
    """The sshnp agent(s) serving ``cp_dir``'s ``sshnp-agent`` directory (docs/agent.md)."""
    needle = str(cp_dir / "sshnp-agent").encode()
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if b"noports.agent\0" in cmd and needle + b"\0" in cmd:
            out.append(int(proc.name))
    return out


def close_masters(cp_dir: Path, timeout: float = 10, *, stop_agent: bool = True) -> int:
    """``ssh -O exit`` every OpenSSH master whose socket is in ``cp_dir`` (bounded), then
    (``stop_agent``) SIGTERM the sshnp agent of ``cp_dir`` rather than wait for its idle
    exit."""
    n = 0
    if not cp_dir.is_dir():
        return 0
    if stop_agent:
        try:
            return close_masters(cp_dir, timeout, stop_agent=False)
        finally:
            agents = agent_pids(cp_dir)
            for pid in agents:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while agents and time.monotonic() < deadline:
                agents = [p for p in agents if Path(f"/proc/{p}").exists()
                          and b"zombie" not in _proc_state(p)]
                time.sleep(0.05)
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


class AnsibleE2E:
    """The topology plus what the controller needs to run playbooks into it. Namespaced, or
    the loopback fallback (``topo.namespaced`` False): see the module docstring."""

    def __init__(self, topo: Topology, base: Path) -> None:
        self.topo = topo
        self.base = base
        ns = topo.namespaced
        self.ssh_user = "root" if ns else getpass.getuser()  # ansible's login, ssh and sshnp
        # loopback: the control plane's port is bound ~20 s later, by the role: not ephemeral
        self.plane_port = PLANE_PORT if ns else unused_port()
        self.relay_ssh_port = 22 if ns else free_port()
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
        return ansible_env(self.base, home=self.home, collections=self.collections,
                           cp_dir=self.cp_dir, ANSIBLE_STDOUT_CALLBACK="ansible.builtin.default",
                           ANSIBLE_CALLBACK_RESULT_FORMAT="yaml", **extra)

    def playbook(self, playbook: str | Path, inventory: Path, *args: str, timeout: float = 240,
                 env: Mapping[str, str] | None = None) -> PlaybookRun:
        argv = [ansible_tool("ansible-playbook"), "-i", str(inventory),
                str(E2E_DIR / playbook if isinstance(playbook, str) else playbook), *args]
        t0 = time.monotonic()
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                               env=self.env(**(env or {})), cwd=str(E2E_DIR), check=False)
        except subprocess.TimeoutExpired as e:  # say where it was, not just that it hung
            partial = "".join(b.decode(errors="replace") if isinstance(b, bytes) else (b or "")
                              for b in (e.stdout, e.stderr))
            raise AssertionError(f"ansible-playbook did not finish within {timeout:.0f} s: "
                                 f"{' '.join(argv)}\n{partial[-8000:]}") from None
        out = p.stdout + p.stderr
        run = PlaybookRun(argv, p.returncode, out, time.monotonic() - t0, parse_recap(out))
        self.runs.append(run)
        return run

    # -- set-up ----------------------------------------------------------------------------
    def prepare(self) -> None:
        """Controller key and dirs, collection copy, relay sshd, device sshd + setup access."""
        for d in (self.home / ".ssh", self.controller_dir, self.cp_dir, self.relay.root,
                  *(h.root for h in self.devices)):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        snapshot_collection(self.collections)
        keygen(self.identity, "np-ansible-e2e")
        pub = Path(f"{self.identity}.pub").read_text().strip()

        # devices: sshd on their 127.0.0.1; namespaced, serving the host's /etc/ssh key (what
        # the sshnpd role pins by default); loopback, their own key (pinned by the inventory)
        known = []
        for dev, h in zip(self.topo.devices, self.devices, strict=True):
            for suffix in ("", ".pub") if self.topo.namespaced else ():
                target = dev.base / f"ssh_host_ed25519_key{suffix}"
                if not target.exists():
                    os.symlink(f"{ETC_HOST_KEY}{suffix}", target)
            with open(dev.authorized_keys, "a", encoding="utf-8") as fh:
                fh.write(pub + "\n")
            self.topo.start_device_sshd(dev.index)
            known.append(_known_line(h.address, dev.ssh_port, dev.host_keys[0]))

        # relay: its own host key, sshd on its address (the relay takes inbound connections)
        rdir = self.relay.root / "sshd"
        rak = rdir / "authorized_keys"
        rdir.mkdir(parents=True, exist_ok=True)
        rak.write_text(pub + "\n")
        self.relay_sshd, rkey = start_sshd(
            rdir, listen=self.relay.address, port=self.relay_ssh_port, authorized_keys=rak,
            spawner=lambda argv: self.topo.spawn_in(self.relay.ns, argv))
        known.append(_known_line(self.relay.address, self.relay_ssh_port, rkey))
        self.known_hosts.write_text("\n".join(known) + "\n")
        self.open_inbound()

    def open_inbound(self) -> None:
        """Setup phase: each device accepts tcp/22 from the controller on its own address
        (loopback: nothing to open, the devices' sshd are reachable already)."""
        for h in self.devices if self.topo.namespaced else ():
            self.topo.run_in(h.ns, ["nft", "insert", "rule", "inet", "np_guard", "input", "ip",
                                    "saddr", self.topo.controller_address, "tcp", "dport", "22",
                                    "accept"])
            dev = self.topo.device(h.index)
            proc, _key = start_sshd(
                dev.base / "setup-sshd", listen=h.address, port=22, host_key=dev.host_keys[0],
                authorized_keys=dev.authorized_keys,
                spawner=lambda argv, ns=h.ns: self.topo.spawn_in(ns, argv))
            self.setup_sshd[h.index] = proc
        self.inbound_open = True

    def close_inbound(self) -> dict[str, str]:
        """End of the setup phase: close the setup ssh masters, stop the setup sshd, restore
        the drop-all guard. Returns ``{device: result of a TCP connect to address:22}``."""
        close_masters(self.cp_dir)
        for i, proc in list(self.setup_sshd.items()):
            proc.stop(timeout=5)
            del self.setup_sshd[i]
        self.inbound_open = False
        if not self.topo.namespaced:
            return {}  # loopback: no firewall to restore, nothing to probe
        for h in self.devices:
            self.topo.run_in(h.ns, ["nft", "-f", "-"],
                             input="delete table inet np_guard\n" + NFT_DEVICE_RULES)
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
            "ansible_user": self.ssh_user,
            "ansible_ssh_private_key_file": str(self.identity),
            "ansible_ssh_common_args": (f"-F /dev/null -o UserKnownHostsFile={self.known_hosts}"
                                        " -o GlobalKnownHostsFile=/dev/null"
                                        " -o IdentitiesOnly=yes -o BatchMode=yes"),
            "ansible_python_interpreter": PY,
        }
        inv = {"all": {
            "vars": {"plane_host": self.relay.address, "plane_port": self.plane_port,
                     "relay_atsign": RELAY_ATSIGN, "client_atsign": CLIENT_ATSIGN,
                     "controller_dir": str(self.controller_dir),
                     "client_keys_dir": str(self.client_keys_dir), **self.runtime_vars()},
            "children": {
                "relays": {"hosts": {"relay": {"ansible_host": self.relay.address,
                                              "ansible_port": self.relay_ssh_port,
                                              "host_root": str(self.relay.root), **ssh_vars}}},
                "devices": {"hosts": {h.name: {
                    "ansible_host": h.address, "host_root": str(h.root),
                    "device_atsign": device_atsign(h.index), "device_name": h.name,
                    "device_address": h.address,
                    "device_authorized_keys": str(self.topo.device(h.index).authorized_keys),
                    **self._device_sshd_vars(h), **ssh_vars} for h in self.devices}},
            }}}
        return write_inventory(self.base / "inventory-provision.yml", inv)

    def _device_sshd_vars(self, h: Host) -> dict:
        """Where the device's sshd listens and which host key sshnpd pins: the roles'
        defaults (port 22, /etc/ssh keys) when namespaced; the loopback sshd otherwise."""
        dev = self.topo.device(h.index)
        if self.topo.namespaced:
            return {"ansible_port": 22}
        return {"ansible_port": dev.ssh_port, "sshnpd_local_sshd_port": dev.ssh_port,
                "sshnpd_permit_open": [f"localhost:{dev.ssh_port}"],
                "sshnpd_sshd_host_keys": f"{dev.host_keys[0]}.pub"}

    def client_keys(self) -> Path:
        return self.client_keys_dir / f"{CLIENT_ATSIGN}_key.atKeys"

    def sshnp_inventory(self, *, connection: str = "sshnp") -> Path:
        """What a user writes: ``ansible_connection: sshnp`` and the device identities."""
        inv = {"all": {"children": {"devices": {
            "vars": {
                "ansible_connection": connection,
                "ansible_user": self.ssh_user,
                "ansible_ssh_private_key_file": str(self.identity),
                "ansible_sshnp_client_atsign": CLIENT_ATSIGN,
                "ansible_sshnp_relays": RELAY_ATSIGN,
                "ansible_sshnp_keys_file": str(self.client_keys()),
                "ansible_sshnp_root_domain": f"{self.relay.address}:{self.plane_port}",
                "ansible_sshnp_ca_file": str(self.controller_dir / "ca.pem"),
                "ansible_python_interpreter": PY,
                "ansible_become_method": "su",  # no sudo in the image; root -> root
                "controller_dir": str(self.controller_dir),
            },
            "hosts": {h.name: {"ansible_sshnp_device_atsign": device_atsign(h.index),
                               "ansible_sshnp_device": h.name, "host_root": str(h.root),
                               "device_address": h.address,
                               "device_iface": self.topo.relay_iface} for h in self.devices},
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
        """ssh masters closed, the daemons the roles started stopped (loopback has no
        namespace whose teardown would stop them)."""
        with contextlib.suppress(Exception):
            close_masters(self.cp_dir)
        with contextlib.suppress(Exception):
            stop_role_daemons(self)


def _known_line(address: str, port: int, host_key: Path) -> str:
    """A known_hosts line for an sshd at address:port serving ``host_key``."""
    name = address if port == 22 else f"[{address}]:{port}"
    return f"{name} {' '.join(Path(f'{host_key}.pub').read_text().split()[:2])}"


@contextlib.contextmanager
def ansible_world(base: Path, n_devices: int = 2, *,
                  namespaced: bool | None = None) -> Iterator[AnsibleE2E]:
    """Topology (namespaced when root, else loopback) with sshd on the relay and, reachable for
    the setup phase, on every device. Daemons the roles start are stopped by the topology's
    teardown when namespaced (TERM, then KILL, by pid); in loopback by the caller
    (:func:`stop_role_daemons`)."""
    with build_topology(base / "topo", n_devices=n_devices, sshd=False,
                        namespaced=namespaced) as topo:
        world = AnsibleE2E(topo, base)
        try:
            world.prepare()
            yield world
        finally:
            world.close()


def skip_reason(namespaced: bool | None = None) -> str | None:
    """Why the e2e world cannot be built here (None when it can); ``namespaced`` None: as
    :func:`ansible_world` would decide."""
    namespaced = want_namespaces() if namespaced is None else namespaced
    for tool in ("ssh", "ssh-keygen", "ss", *(("ip", "nft") if namespaced else ())):
        if not shutil.which(tool):
            return f"{tool} is not installed"
    if not Path(SSHD).exists():
        return "OpenSSH sshd is not installed"
    if namespaced and not (ETC_HOST_KEY.exists() and Path(f"{ETC_HOST_KEY}.pub").exists()):
        return f"{ETC_HOST_KEY} missing (sshnpd pins /etc/ssh host keys; run ssh-keygen -A)"
    if not Path(ansible_tool("ansible-playbook")).exists():
        return "ansible-playbook is not installed"
    return None


# --------------------------------------------------------------------------- processes


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def kill_group(pid: int, grace: float = 5.0) -> None:
    """TERM then KILL the process group led by ``pid`` (or the process alone)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            if os.getpgid(pid) == pid:
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if not alive(pid):
                return
            time.sleep(0.05)


def pids_mentioning(text: str) -> list[int]:
    """Our own live processes whose command line mentions ``text`` (a run's temp dir)."""
    me = os.getpid()
    found = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == me:
            continue
        try:
            if p.stat().st_uid != os.geteuid():
                continue
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            continue
        if text in cmd and alive(int(p.name)):
            found.append(int(p.name))
    return found


def stop_role_daemons(world: AnsibleE2E) -> int:
    """The daemons our roles started (pid files under each host's run dir): TERM, then KILL,
    by process group (the roles' runner starts each in a session of its own)."""
    n = 0
    for host in (world.relay, *world.devices):
        for pid_file in sorted((host.root / "run" / "noports").glob("*.pid")):
            with contextlib.suppress(OSError, ValueError, IndexError):
                pid = int(pid_file.read_text().split()[0])
                if alive(pid) and pid in pids_mentioning(str(world.base)):  # not a reused pid
                    kill_group(pid)
                    n += 1
    # sshnpd's session hosts outlive their daemon by design (decision 0024): end them too
    for pid in pids_mentioning("noports.daemon.sessionhost"):
        if pid in pids_mentioning(str(world.base)):
            kill_group(pid)
    return n


__all__ = [
    "AnsibleE2E", "CLIENT_ATSIGN", "E2E_DIR", "Host", "PLANE_PORT", "PlaybookRun",
    "RELAY_ATSIGN", "ansible_env", "ansible_tool", "ansible_world", "close_masters", "device_atsign",
    "device_name", "kill_group", "parse_recap", "pids_mentioning", "skip_reason",
    "snapshot_collection", "stop_role_daemons", "write_inventory",
]
