"""A NoPorts *fleet* in the "no open ports" topology: the scale-out layout of ARCHITECTURE.md.

What runs where (every program is the real one, as a subprocess)::

    relay ns     redis-server (127.0.0.1 of the relay ns only), atdirectory --store redis://,
                 K atserver processes ("shards", atSigns spread round-robin over them),
                 R srvd instances, each with its own relay atSign
    device ns i  OpenSSH sshd on its own 127.0.0.1:22 (topology.py), sshnpd (HOME = device home)
    root ns      the controller: sshnp, ansible-playbook (connection sshnp, or plain ssh)

Without root the topology falls back to loopback (every address 127.0.0.1, each sshd on a
high port, Redis on a free loopback port) and the same helpers run the same flows.

Redis is reachable only from the relay namespace's loopback: the directory is the only
client, so it needs no password (a password would have to go in ``--store`` on the
atdirectory command line, see docs/scale.md). Registrations are made inside the relay
namespace too, with ``atdirectory register`` (the operator's tool) or, for large fleets,
with one ``redis-cli`` pipe in the official layout (key = atSign without ``@``, lower-case;
value = ``host:port``).

Used by tests/integration/test_fleet.py and bench/fleet.py. ``Fleet`` is a
``world.BaseWorld`` (topology, plane, client key, srvd/sshnpd command lines) with what the
single-relay ``world.World`` does not model: a Redis directory, several atserver processes and
several relays.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.harness.plane import AtServer, Proc, cmdlines, free_port, tool
from tests.harness.topology import NsPlane, Topology, build_topology
from tests.harness.world import BaseWorld, client_identity

PY = sys.executable
REPO = Path(__file__).resolve().parents[2]
REDIS_SERVER = shutil.which("redis-server") or "/usr/sbin/redis-server"
REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"
SOCAT = shutil.which("socat") or "/usr/bin/socat"
CLIENT = "@np_fleet_client"


def relay_atsign(k: int) -> str:
    return f"@np_relay{k}"


def device_atsign(i: int) -> str:
    return f"@np_fdev{i}"


def device_name(i: int) -> str:
    return f"dev{i}"


def rss_kib(pid: int) -> int:
    """VmRSS of a live process, KiB (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


_CLK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a live process has used so far (0.0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _CLK  # utime, stime (fields 14, 15)


def pss_kib(pid: int) -> int:
    """Proportional set size, KiB: RSS with shared pages (interpreter, libraries) divided
    among the processes sharing them -- what one more daemon really adds. 0 if gone."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


# --------------------------------------------------------------------------- plane on Redis


class RedisNsPlane(NsPlane):
    """:class:`topology.NsPlane` whose directory store is Redis in the relay namespace.

    Registration runs *inside* the relay namespace (Redis listens only on its loopback).
    """

    def __init__(self, topo: Topology, base: Path, redis_port: int, *,
                 bulk_register: bool = False) -> None:
        super().__init__(topo, base)
        self.redis_port = redis_port
        self.store_url = f"redis://127.0.0.1:{redis_port}/0"
        self.bulk_register = bulk_register
        self.plane.store = self.store_url
        self.plane.register = self._register  # type: ignore[method-assign]

    def redis_cli(self, *args: str, input: str | None = None,
                  timeout: float = 20) -> subprocess.CompletedProcess:
        return self.topo.run_in(self.topo.relay_ns, [
            REDIS_CLI, "-h", "127.0.0.1", "-p", str(self.redis_port), *args],
            input=input, timeout=timeout)

    def atdirectory(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """``atdirectory <args> --store redis://…`` inside the relay namespace."""
        return self.topo.run_in(self.topo.relay_ns, [tool("atdirectory"), *args,
                                                     "--store", self.store_url],
                                check=check, timeout=60)

    def _register(self, atsign: str, port: int) -> None:
        addr = f"{self.plane.host}:{port}"
        if self.bulk_register:
            key = atsign.lstrip("@").lower()
            out = self.redis_cli("SET", key, addr).stdout.strip()
            assert out == "OK", f"redis SET {key} answered {out!r}"
        else:
            self.atdirectory("register", atsign, addr)


def start_redis(topo: Topology, base: Path) -> tuple[Proc, int]:
    """redis-server on the relay namespace's 127.0.0.1 (loopback fallback: a free port).
    No persistence: the directory is rebuilt by registration (docs/scale.md says how to run
    it for real)."""
    port = 6379 if topo.namespaced else free_port()
    rdir = base / "redis"
    rdir.mkdir(parents=True, exist_ok=True)
    conf = rdir / "redis.conf"
    conf.write_text("\n".join([
        f"port {port}", "bind 127.0.0.1", "protected-mode yes", f"dir {rdir}",
        'save ""', "appendonly no", "daemonize no", f"logfile {rdir / 'redis.log'}", ""]))
    proc = topo.spawn_in(topo.relay_ns, [REDIS_SERVER, str(conf)])
    deadline = time.monotonic() + 15
    while True:
        res = topo.run_in(topo.relay_ns, [REDIS_CLI, "-h", "127.0.0.1", "-p", str(port),
                                          "PING"], check=False, timeout=10)
        if res.stdout.strip() == "PONG":
            return proc, port
        if proc.popen.poll() is not None or time.monotonic() > deadline:
            log = (rdir / "redis.log").read_text() if (rdir / "redis.log").exists() else ""
            raise AssertionError(f"redis-server did not start (exit {proc.popen.poll()}):\n"
                                 + log[-2000:])
        time.sleep(0.1)


# --------------------------------------------------------------------------- the fleet


@dataclass
class Fleet(BaseWorld):
    """A :class:`world.BaseWorld` with a Redis directory, sharded atServers and several
    relays (the fleet's own atSign names: ``CLIENT`` and ``device_atsign`` of this module)."""

    plane: RedisNsPlane
    redis: Proc | None = None
    shards: dict[str, AtServer] = field(default_factory=dict)  # shard name -> atserver
    shard_of: dict[str, str] = field(default_factory=dict)  # atSign -> shard name
    relays: list[str] = field(default_factory=list)
    srvd: dict[str, Proc] = field(default_factory=dict)
    daemons: dict[int, Proc] = field(default_factory=dict)

    client_atsign = CLIENT

    @staticmethod
    def device_atsign(i: int) -> str:
        return device_atsign(i)

    @property
    def n(self) -> int:
        return self.topo.n_devices

    def where(self, i: int) -> str:
        """What :data:`WHERE` prints when run on device ``i``'s sshd."""
        return f"{self.netns_id(self.device(i).ns)} {self.device(i).ssh_port}"

    # -- relays -------------------------------------------------------------------------------
    def start_srvd(self, relay: str, *extra: str) -> Proc:
        self.srvd[relay] = self.spawn_srvd(relay, "-m", CLIENT, *extra, timeout=60)
        return self.srvd[relay]

    def srvd_sessions(self, relay: str) -> int:
        """Sessions the relay has opened so far (its own log lines)."""
        rx = re.compile(r"session \S+ opened for ")
        return sum(1 for ln in list(self.srvd[relay].lines) if rx.search(ln))

    # -- devices -------------------------------------------------------------------------------
    def start_sshnpd(self, devices: Iterable[int], *, batch: int = 10,
                     timeout: float = 120) -> None:
        """Start the daemons in batches (spawn a batch, then wait for every ``ready``)."""
        todo = [i for i in devices if i not in self.daemons]
        for k in range(0, len(todo), batch):
            group = todo[k:k + batch]
            for i in group:
                self.daemons[i] = self.spawn_sshnpd(i, self.sshnpd_argv(i))
            for i in group:
                self.daemons[i].wait_for(r'"event": "ready"', timeout=timeout)

    # -- client --------------------------------------------------------------------------------
    def sshnp_argv(self, i: int, *command: str, relays: Sequence[str] | None = None,
                   relay_timeout: float = 5, quiet: bool = True) -> list[str]:
        dev = self.device(i)
        return [PY, "-m", "noports.client.cli", "-f", CLIENT, "-t", device_atsign(i),
                "-d", device_name(i), "-r", ",".join(relays or self.relays),
                "-k", str(self.keyfile(CLIENT)), "--root-domain", self.root,
                "--ca-file", self.ca, "-i", str(self.identity), "-u", dev.ssh_user,
                "--remote-sshd-port", str(dev.ssh_port), "--relay-timeout", f"{relay_timeout:g}",
                # the fleet's relay lists are orders (spread, fallback when one dies): keep
                # them, rather than the default probe for the fastest
                "--relay-select", "ordered",
                *(["-q"] if quiet else []), "-o", "BatchMode=yes", *command]

    def sshnp(self, i: int, *command: str, timeout: float = 90,
              **kw) -> subprocess.CompletedProcess:
        """``sshnp … <command>`` (exec mode) from the root namespace."""
        return subprocess.run(self.sshnp_argv(i, *command, **kw), capture_output=True,
                              text=True, timeout=timeout, env=self.client_env(),
                              stdin=subprocess.DEVNULL)


def shard_layout(n_devices: int, n_shards: int, relays: Sequence[str]) -> dict[str, list[str]]:
    """atSigns over ``n_shards`` atserver processes: devices round-robin, relay k on shard
    k mod n, the client on the last shard (so client, relays and devices mostly live in
    different processes and every session crosses atserver-to-atserver)."""
    shards: dict[str, list[str]] = {f"shard{s + 1}": [] for s in range(n_shards)}
    names = list(shards)
    for k, r in enumerate(relays):
        shards[names[k % n_shards]].append(r)
    shards[names[-1]].append(CLIENT)
    for i in range(1, n_devices + 1):
        shards[names[(i - 1) % n_shards]].append(device_atsign(i))
    return shards


@contextlib.contextmanager
def fleet(base: Path, n_devices: int, *, n_shards: int = 3, n_relays: int = 2,
          daemons: Iterable[int] | None = None, namespaced: bool | None = None,
          bulk_register: bool | None = None, activate_workers: int = 6,
          srvd_args: Sequence[str] = ()) -> Iterator[Fleet]:
    """Topology with ``n_devices`` (sshd running), Redis + directory + ``n_shards`` atserver
    processes + ``n_relays`` srvd in the relay ns, every atSign activated, the client's SSH
    key authorized on every device, and sshnpd started on ``daemons`` (default: all)."""
    relays = [relay_atsign(k) for k in range(1, n_relays + 1)]
    with build_topology(base / "topo", n_devices=n_devices, namespaced=namespaced) as topo:
        redis, port = start_redis(topo, base)
        plane = RedisNsPlane(topo, base / "plane", port,
                             bulk_register=n_devices > 12 if bulk_register is None
                             else bulk_register)
        topo.planes.append(plane)
        layout = shard_layout(n_devices, n_shards, relays)
        plane.plane.populate(layout, workers=activate_workers)
        shards = dict(zip(layout, plane.servers, strict=True))
        home = base / "client-home"
        ident = client_identity(home, topo)
        f = Fleet(topo=topo, plane=plane, base=base, redis=redis, shards=shards,
                  shard_of={a: s for s, al in layout.items() for a in al}, relays=relays,
                  client_home=home, identity=ident)
        for r in relays:
            f.start_srvd(r, *srvd_args)
        f.start_sshnpd(range(1, n_devices + 1) if daemons is None else daemons)
        try:
            yield f
        finally:
            stop_control_masters(base)


# --------------------------------------------------------------------------- Ansible


PLAYBOOK = """\
# Fleet playbook: the same tasks over every device, through whatever connection the
# inventory names (sshnp, or plain ssh for the baseline).
- hosts: all
  gather_facts: false
  tasks:
    - name: module round trip (python on the device)
      ansible.builtin.ping:
    - name: a command
      ansible.builtin.command: uname -r
      changed_when: false
    - name: a file transfer
      ansible.builtin.copy:
        content: "fleet {{ inventory_hostname }}\\n"
        dest: "{{ fleet_dir }}/fleet-{{ fleet_run }}.txt"
        mode: "0644"
    - name: proof of where it ran (the device's network namespace and sshd port)
      ansible.builtin.shell: >-
        echo "$(readlink /proc/self/ns/net) ${SSH_CONNECTION##* }"
        > {{ fleet_dir }}/where-{{ fleet_run }}.txt
      changed_when: false
"""

WHERE = 'echo "$(readlink /proc/self/ns/net) ${SSH_CONNECTION##* }"'
"""Remote command printing where it runs: ``net:[inode] <sshd port>`` -- unique per device
with namespaces (own netns) and without (own sshd port)."""


def collections_root(base: Path) -> Path:
    """A directory holding ``ansible_collections/noports/sshnp`` -> this checkout."""
    if REPO.parent.name == "noports" and REPO.parent.parent.name == "ansible_collections":
        return REPO.parent.parent.parent
    root = base / "ac"
    link = root / "ansible_collections" / "noports" / "sshnp"
    if not link.exists():
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(REPO)
    return root


@dataclass
class AnsibleRun:
    name: str
    returncode: int
    seconds: float
    stdout: str
    stderr: str
    cp_dir: Path

    def recap(self) -> dict[str, dict[str, int]]:
        """PLAY RECAP: host -> {ok, changed, unreachable, failed, ...}."""
        out: dict[str, dict[str, int]] = {}
        for m in re.finditer(r"^(\S+)\s+:\s+((?:\w+=\d+\s*)+)$", self.stdout, re.M):
            out[m.group(1)] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(2))}
        return out


def _hostvars_common(f: Fleet, i: int, run: str) -> dict[str, object]:
    dev = f.device(i)
    hv: dict[str, object] = {"fleet_dir": str(dev.base), "fleet_run": run,
                             "ansible_user": dev.ssh_user}
    if dev.ssh_port != 22:
        hv["ansible_port"] = dev.ssh_port
    return hv


def sshnp_inventory(f: Fleet, devices: Sequence[int], run: str, *,
                    relay_order: str = "listed", relay_timeout: float = 5,
                    connection: str = "sshnp") -> dict:
    """Inventory over ``devices`` with ``ansible_connection: sshnp``. ``relay_order``:
    ``listed`` = every host tries the relays in f.relays order; ``spread`` = host i starts at
    relay i mod R (the client-side way to spread load over several srvd)."""
    hosts: dict[str, dict] = {}
    for i in devices:
        rel = list(f.relays)
        if relay_order == "spread":
            k = (i - 1) % len(rel)
            rel = rel[k:] + rel[:k]
        hosts[device_name(i)] = {**_hostvars_common(f, i, run),
                                 "ansible_sshnp_device_atsign": device_atsign(i),
                                 "ansible_sshnp_device": device_name(i),
                                 "ansible_sshnp_relays": ",".join(rel)}
    return {"all": {"vars": {
        "ansible_connection": connection,
        "ansible_ssh_private_key_file": str(f.identity),
        "ansible_sshnp_client_atsign": CLIENT,
        "ansible_sshnp_keys_file": str(f.keyfile(CLIENT)),
        "ansible_sshnp_root_domain": f.root,
        "ansible_sshnp_ca_file": f.ca,
        "ansible_sshnp_relay_timeout": relay_timeout,
        "ansible_python_interpreter": "/usr/bin/python3",
    }, "hosts": hosts}}


def ssh_inventory(f: Fleet, devices: Sequence[int], run: str) -> dict:
    """Plain-ssh baseline to the same sshds. The controller cannot reach a port-less device,
    so the path is a ProxyCommand that enters the device namespace and joins its loopback
    sshd: ``ip netns exec <ns> socat STDIO TCP:127.0.0.1:22`` (the nftables guard stays on;
    only the device's own loopback is used). Without namespaces: direct to 127.0.0.1:port."""
    kh = f.base / "baseline_known_hosts"
    kh.write_text("".join(
        f"fleet-{device_name(i)} {' '.join(f.host_pub(i).read_text().split()[:2])}\n"
        for i in range(1, f.n + 1)))
    hosts: dict[str, dict] = {}
    for i in devices:
        dev = f.device(i)
        opts = [f"-o HostKeyAlias=fleet-{device_name(i)}", f"-o UserKnownHostsFile={kh}",
                "-o StrictHostKeyChecking=yes", "-o IdentitiesOnly=yes"]
        # a distinct host name per device keeps OpenSSH's %C ControlPath distinct (every
        # namespaced sshd is 127.0.0.1:22); the ProxyCommand means it is never resolved
        hv = {**_hostvars_common(f, i, run),
              "ansible_host": f"fleet-{device_name(i)}" if f.namespaced else "127.0.0.1"}
        if f.namespaced:
            proxy = shlex.join(["ip", "netns", "exec", str(dev.ns), SOCAT, "STDIO",
                                f"TCP:127.0.0.1:{dev.ssh_port}"])
            opts.insert(0, f"-o ProxyCommand=\"{proxy}\"")
        hv["ansible_ssh_common_args"] = " ".join(opts)
        hosts[device_name(i)] = hv
    return {"all": {"vars": {
        "ansible_connection": "ssh",
        "ansible_ssh_private_key_file": str(f.identity),
        "ansible_python_interpreter": "/usr/bin/python3",
    }, "hosts": hosts}}


def run_playbook(f: Fleet, name: str, inventory: dict, *, forks: int = 20,
                 playbook: str = PLAYBOOK, timeout: float = 300,
                 extra_args: Sequence[str] = ()) -> AnsibleRun:
    """ansible-playbook from the root namespace, in its own directory (ansible.cfg with
    ``connection_plugins`` on the collection's plugin dir, so the short name ``sshnp``
    resolves) and its own ControlPath dir (a cold start: one rendezvous per host)."""
    d = f.base / "ansible" / name
    d.mkdir(parents=True, exist_ok=True)
    cp_dir = f.base / "cp" / name  # short: ControlPath must fit sun_path (108 bytes)
    cp_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    ac = collections_root(f.base)
    (d / "inventory.json").write_text(json.dumps(inventory, indent=1))
    (d / "site.yml").write_text(playbook)
    (d / "ansible.cfg").write_text("\n".join([
        "[defaults]",
        f"collections_path = {ac}",
        f"connection_plugins = {ac}/ansible_collections/noports/sshnp/plugins/connection",
        "inventory = ./inventory.json",
        f"forks = {forks}",
        "host_key_checking = True",
        "retry_files_enabled = False",
        "interpreter_python = auto_silent",
        f"local_tmp = {d / 'tmp-local'}",
        f"remote_tmp = {f.base / 'ansible-remote-tmp'}",
        "",
        "[ssh_connection]",
        "pipelining = True",
        f"control_path_dir = {cp_dir}",
        "",
    ]))
    env = f.client_env(ANSIBLE_CONFIG=str(d / "ansible.cfg"), ANSIBLE_NOCOLOR="1",
                       ANSIBLE_FORCE_COLOR="0", ANSIBLE_HOST_KEY_CHECKING="True")
    argv = [str(Path(PY).parent / "ansible-playbook"), "site.yml", *extra_args]
    t0 = time.monotonic()
    try:
        res = subprocess.run(argv, cwd=d, capture_output=True, text=True, timeout=timeout,
                             env=env, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        def _s(b: object) -> str:
            return b.decode(errors="replace") if isinstance(b, bytes) else str(b or "")
        return AnsibleRun(name, -1, time.monotonic() - t0, _s(e.stdout),
                          _s(e.stderr) + f"\n(timed out after {timeout}s)", cp_dir)
    return AnsibleRun(name, res.returncode, time.monotonic() - t0, res.stdout, res.stderr,
                      cp_dir)


def control_sockets(cp_dir: Path) -> list[Path]:
    return [p for p in cp_dir.iterdir() if p.is_socket()] if cp_dir.exists() else []


def stop_control_masters(base: Path, grace: float = 5.0) -> None:
    """End the OpenSSH ControlPersist masters our runs left (``ssh -O exit`` on each socket
    under ``base/cp``), then, bounded, any process of ours still naming ``base`` (its
    ProxyCommand), by pid. Safe to call more than once, and from a finally block."""
    cp_root = base / "cp"
    if cp_root.exists():
        for d in cp_root.iterdir():
            for sock in control_sockets(d):
                with contextlib.suppress(Exception):
                    subprocess.run(["ssh", "-o", f"ControlPath={sock}", "-O", "exit", "x"],
                                   capture_output=True, timeout=5, stdin=subprocess.DEVNULL)
    needle = str(base).encode()
    me = os.getpid()
    deadline = time.monotonic() + grace
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = [p for p in _pids_mentioning(needle) if p != me]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        while pids and time.monotonic() < deadline:
            pids = [p for p in pids if Path(f"/proc/{p}").exists()]
            time.sleep(0.05)
        if not pids:
            return


def _pids_mentioning(needle: bytes) -> list[int]:
    """Client-side processes whose command line names ``needle`` (a temp dir this run
    created, so they are ours; ssh masters daemonize away from us): ssh, sh, sshnp and the
    sshnp agent only."""
    out = []
    for pid, cmd in cmdlines():
        if needle not in cmd:
            continue
        argv0 = cmd.split(b"\0", 1)[0].rsplit(b"/", 1)[-1]
        first_args = b" ".join(cmd.split(b"\0")[:3])
        if argv0 in (b"ssh", b"sh") or b"noports.client" in first_args or b"sshnp" in first_args \
                or b"noports.agent" in first_args:  # the agent of a run's control dir
            out.append(pid)
    return out


def client_processes(f: Fleet) -> list[int]:
    """Live ``sshnp --stdio`` ProxyCommand processes of this fleet (one per open master)."""
    keys = str(f.keyfile(CLIENT)).encode()
    return [pid for pid, cmd in cmdlines()
            if b"--stdio" in cmd and keys in cmd and not cmd.startswith(b"/bin/sh")]


__all__ = [
    "CLIENT", "PLAYBOOK", "WHERE", "AnsibleRun", "Fleet", "RedisNsPlane", "client_processes",
    "collections_root", "control_sockets", "device_atsign", "device_name", "fleet",
    "cpu_s", "pss_kib", "relay_atsign", "rss_kib", "run_playbook", "shard_layout", "ssh_inventory",
    "sshnp_inventory", "start_redis", "stop_control_masters",
]
