"""The "no open ports" test topology: network namespaces when root, loopback otherwise.

Why namespaces: the product's central claim is that a device accepts no inbound connection,
and only a separate network stack with a firewall shows that for real. Layout (root)::

    root ns (controller)  bridge nptp<id>b  10.213.X.1/24
      |-- veth -- ns nptp-<id>-relay   eth0 10.213.X.2   directory, atserver(s), srvd
      |-- veth -- ns nptp-<id>-d1      eth0 10.213.X.11  sshd on 127.0.0.1:22, nftables:
      |-- veth -- ns nptp-<id>-d2      eth0 10.213.X.12  inbound NEW dropped except on lo
      ...

No default routes and no forwarding: nothing in the topology can reach anything outside it.
Without root (``namespaced`` False) every address is 127.0.0.1, each device's sshd listens on
a high port as the current user and ``run_in``/``spawn_in`` ignore the namespace, so tests
keep running and only assert the strong property when ``topology.namespaced``.

Names carry a per-run id; a state file per run (``/tmp/noports-topology/<id>.json``, written
*before* anything is created) records the owning pid, so a later run removes what an aborted
run left behind but never touches a live parallel run.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from noports.keys.atkeys import AtKeys
from tests.harness.plane import AtServer, Directory, Plane, Proc, free_port, spawn
from tests.harness.sshd import SSHD, start_sshd

PREFIX = "nptp"  # every namespace and link we create starts with this
STATE_DIR = Path(os.environ.get("NOPORTS_TOPOLOGY_STATE", "/tmp/noports-topology"))
SUBNET_BASE = "10.213"  # 10.213.X.0/24, X picked free per run (7 when available)
PREFERRED_X = 7
RELAY_HOST = 2
DEVICE_HOST0 = 10  # device i (1-based) gets .10+i
_ID_RE = re.compile(rf"{PREFIX}-?([0-9a-f]{{6}})")

NFT_DEVICE_RULES = """\
table inet np_guard {
  chain input {
    type filter hook input priority 0; policy drop;
    iif "lo" accept
    ct state established,related accept
  }
}
"""


def is_root() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None


def want_namespaces() -> bool:
    """Namespaces when root, unless ``NOPORTS_TOPOLOGY=loopback`` forces the fallback."""
    return is_root() and os.environ.get("NOPORTS_TOPOLOGY", "").lower() != "loopback"


def _sh(argv: Sequence[str], check: bool = True, timeout: float = 20) -> subprocess.CompletedProcess:
    res = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({res.returncode}): {res.stderr.strip()}")
    return res


def _proc_start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22: starttime


def _owner_alive(state: dict) -> bool:
    pid = int(state.get("pid", 0))
    return (pid > 0 and _proc_start_time(pid) == state.get("pid_start")
            and _proc_state(pid) not in ("Z", "X"))  # a zombie owner is a dead owner


def _list_netns() -> list[str]:
    res = _sh(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in res.stdout.splitlines() if line.strip()]


def _list_links() -> list[str]:
    res = _sh(["ip", "-o", "link", "show"], check=False)
    return [line.split(":")[1].strip().split("@")[0] for line in res.stdout.splitlines()
            if line.count(":") >= 2]


def _kill_ns_pids(ns: str, grace: float = 3.0) -> None:
    """Stop whatever still runs in one of *our* namespaces (TERM, then KILL), by pid."""
    pids = [int(p) for p in _sh(["ip", "netns", "pids", ns], check=False).stdout.split()]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            pids = [p for p in pids if Path(f"/proc/{p}").exists()
                    and "Z" not in _proc_state(p)]
            if not pids:
                return
            time.sleep(0.05)


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def _destroy(run_id: str) -> None:
    """Remove every namespace and link of ``run_id`` (idempotent)."""
    for ns in _list_netns():
        if ns.startswith(f"{PREFIX}-{run_id}-"):
            _kill_ns_pids(ns)
            _sh(["ip", "netns", "del", ns], check=False)
    for link in _list_links():
        if link.startswith(f"{PREFIX}{run_id}"):
            _sh(["ip", "link", "del", link], check=False)
    with contextlib.suppress(FileNotFoundError):
        (STATE_DIR / f"{run_id}.json").unlink()


def cleanup_stale() -> list[str]:
    """Remove leftovers of runs whose owner process is gone; returns their ids. Under the
    lock: a run being built writes its state file there, and a half-written one would
    look stale."""
    with _lock():
        return _cleanup_stale_locked()


def _cleanup_stale_locked() -> list[str]:
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    live: set[str] = set()
    stale: set[str] = set()
    for f in STATE_DIR.glob("*.json"):
        try:
            state = json.loads(f.read_text())
        except (OSError, ValueError):
            stale.add(f.stem)
            continue
        (live if _owner_alive(state) else stale).add(f.stem)
    # anything carrying our prefix without a live state file is stale: the state file is
    # written before the first namespace or link of a run exists
    for name in _list_netns() + _list_links():
        m = _ID_RE.match(name)
        if m and m.group(1) not in live:
            stale.add(m.group(1))
    for run_id in sorted(stale):
        _destroy(run_id)
    return sorted(stale)


@contextlib.contextmanager
def _lock() -> Iterator[None]:
    """Serialises subnet choice between parallel runs."""
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    with open(STATE_DIR / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _used_subnet_x() -> set[int]:
    used: set[int] = set()
    for f in STATE_DIR.glob("*.json"):
        with contextlib.suppress(OSError, ValueError, KeyError):
            used.add(int(json.loads(f.read_text())["x"]))
    out = _sh(["ip", "-o", "-4", "addr"], check=False).stdout
    out += _sh(["ip", "-4", "route"], check=False).stdout
    for m in re.finditer(rf"\b{re.escape(SUBNET_BASE)}\.(\d+)\.", out):
        used.add(int(m.group(1)))
    return used


# --------------------------------------------------------------------------- devices


@dataclass
class Device:
    """One device: its namespace (None without root), address and OpenSSH sshd.

    Run a device program with ``HOME=device.home``: sshd reads that user's
    ``home/.ssh/authorized_keys`` (the file sshnpd edits) whatever the login user.
    """

    index: int
    ns: str | None
    address: str  # how other namespaces would reach it (nothing may answer there)
    base: Path
    ssh_port: int
    ssh_user: str
    ssh_host: str = "127.0.0.1"  # sshd listens here, inside the device
    sshd: Proc | None = None
    host_keys: list[Path] = field(default_factory=list)

    @property
    def home(self) -> Path:
        return self.base / "home"

    @property
    def authorized_keys(self) -> Path:
        return self.home / ".ssh" / "authorized_keys"

    def host_public_keys(self) -> list[str]:
        return [Path(f"{k}.pub").read_text().strip() for k in self.host_keys]


# --------------------------------------------------------------------------- plane


class NsPlane:
    """A :class:`tests.harness.plane.Plane` whose servers run inside the relay namespace.

    Composition, not a subclass: the Plane keeps TLS, the directory store, registration,
    activation and client_env; its ``spawner`` prefixes the two ``serve`` programs with
    ``ip netns exec``. Registration writes the store and activation connects from the root
    namespace.
    """

    def __init__(self, topo: Topology, base: Path) -> None:
        self.topo = topo
        self.plane = Plane(base, host=topo.relay_address,
                           spawner=lambda argv: topo.spawn_in(topo.relay_ns, argv))

    # delegation of what tests use most
    @property
    def tls(self):  # noqa: ANN201 - TlsFiles
        return self.plane.tls

    @property
    def ca_file(self) -> Path:
        return self.plane.tls.ca_cert

    @property
    def root(self) -> str:
        return self.plane.root

    @property
    def root_tuple(self) -> tuple[str, int]:
        return self.plane.root_tuple

    @property
    def directory(self) -> Directory | None:
        return self.plane.directory

    @property
    def servers(self) -> list[AtServer]:
        return self.plane.servers

    @property
    def keys(self) -> dict[str, AtKeys]:
        return self.plane.keys

    @property
    def keys_dir(self) -> Path:
        return self.plane.keys_dir

    def client_env(self, home: Path) -> dict[str, str]:
        return self.plane.client_env(home)

    def ssl_context(self):  # noqa: ANN201 - ssl.SSLContext
        return self.plane.ssl_context()

    def start_directory(self) -> Directory:
        return self.plane.start_directory()

    def start_atserver(self, name: str, atsigns: dict[str, str]) -> AtServer:
        """Start an atserver hosting ``atsigns`` (atSign -> CRAM secret) in the relay ns."""
        return self.plane.start_atserver(name, atsigns)

    def activate(self, atsign: str, secret: str) -> AtKeys:
        """Onboard from the root namespace; keys saved under ``keys_dir`` (0600)."""
        return self.plane.activate(atsign, secret)

    def keys_file(self, atsign: str) -> Path:
        return self.plane.keys_file(atsign)

    def stop(self) -> None:
        self.plane.stop()


# --------------------------------------------------------------------------- topology


class Topology:
    """See the module docstring. Create with :func:`build_topology` (a context manager)."""

    def __init__(self, base: Path, n_devices: int = 2, *, namespaced: bool | None = None,
                 run_id: str | None = None) -> None:
        self.base = base
        self.n_devices = n_devices
        self.namespaced = want_namespaces() if namespaced is None else namespaced
        self.run_id = run_id or secrets.token_hex(3)
        self.procs: list[Proc] = []
        self.planes: list[NsPlane] = []
        self.devices: list[Device] = []
        self.x: int | None = None
        self._built = False
        if self.namespaced:
            self.relay_ns: str | None = f"{PREFIX}-{self.run_id}-relay"
            self.bridge: str | None = f"{PREFIX}{self.run_id}b"
        else:
            self.relay_ns = None
            self.bridge = None

    # -- addresses -------------------------------------------------------------------------
    def _ip(self, host: int) -> str:
        if not self.namespaced:
            return "127.0.0.1"
        assert self.x is not None
        return f"{SUBNET_BASE}.{self.x}.{host}"

    @property
    def controller_address(self) -> str:
        """The root namespace's address on the bridge (what other namespaces see)."""
        return self._ip(1)

    @property
    def relay_address(self) -> str:
        return self._ip(RELAY_HOST)

    @property
    def relay_iface(self) -> str:
        """Interface inside the relay namespace that carries all its traffic (capture here)."""
        return "eth0" if self.namespaced else "lo"

    @property
    def subnet(self) -> str | None:
        return f"{SUBNET_BASE}.{self.x}.0/24" if self.namespaced else None

    def device_address(self, i: int) -> str:
        """Address of device ``i`` (1-based) as seen from outside it."""
        return self._ip(DEVICE_HOST0 + i)

    def device_ns(self, i: int) -> str | None:
        return f"{PREFIX}-{self.run_id}-d{i}" if self.namespaced else None

    def device(self, i: int) -> Device:
        return self.devices[i - 1]

    def namespaces(self) -> list[str]:
        if not self.namespaced:
            return []
        assert self.relay_ns is not None
        return [self.relay_ns] + [self.device_ns(i) or "" for i in range(1, self.n_devices + 1)]

    # -- running things ----------------------------------------------------------------------
    def ns_argv(self, ns: str | None, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside ``ns`` (None = root namespace / no namespaces)."""
        argv = [str(a) for a in argv]
        if ns is None or not self.namespaced:
            return argv
        return ["ip", "netns", "exec", ns, *argv]

    def run_in(self, ns: str | None, argv: Sequence[str], *, check: bool = True,
               timeout: float = 30, input: str | None = None,
               env: dict[str, str] | None = None, **kw) -> subprocess.CompletedProcess:
        """Run to completion inside ``ns``; text output captured."""
        full_env = {**os.environ, **(env or {})}
        res = subprocess.run(self.ns_argv(ns, argv), capture_output=True, text=True,
                             timeout=timeout, input=input, env=full_env, **kw)
        if check and res.returncode != 0:
            raise AssertionError(f"{argv!r} in {ns} failed ({res.returncode}):\n"
                                 f"{res.stdout}\n{res.stderr}")
        return res

    def spawn_in(self, ns: str | None, argv: Sequence[str], *,
                 env: dict[str, str] | None = None) -> Proc:
        """Start a long-running program inside ``ns``; stopped at teardown.

        ``ip netns exec`` execs the program in place, so the handle's pid is the program's
        and signals reach it directly.
        """
        proc = spawn(self.ns_argv(ns, argv), env=env)
        self.procs.append(proc)
        return proc

    def python_in(self, ns: str | None, code: str, *args: str, timeout: float = 30,
                  env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run a snippet with this interpreter inside ``ns`` (handy for socket probes)."""
        return self.run_in(ns, [sys.executable, "-c", code, *args], timeout=timeout, env=env,
                           check=False)

    # -- build / teardown ----------------------------------------------------------------------
    def build(self) -> Topology:
        self.base.mkdir(parents=True, exist_ok=True)
        if self.namespaced:
            with _lock():  # cleanup inside the lock: another run may be writing its state
                _cleanup_stale_locked()
                used = _used_subnet_x()
                candidates = [PREFERRED_X] + [x for x in range(100, 250)]
                free = [x for x in candidates if x not in used]
                if not free:
                    raise RuntimeError(f"no free {SUBNET_BASE}.X.0/24 subnet")
                self.x = free[0] if free[0] == PREFERRED_X else secrets.choice(free)
                self._write_state()
            try:
                self._build_netns()
            except BaseException:
                self.close()
                raise
        self._built = True
        for i in range(1, self.n_devices + 1):
            self.devices.append(self._make_device(i))
        return self

    def _write_state(self) -> None:
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        state = {"pid": os.getpid(), "pid_start": _proc_start_time(os.getpid()), "x": self.x,
                 "base": str(self.base), "created": time.time()}
        (STATE_DIR / f"{self.run_id}.json").write_text(json.dumps(state))

    def _build_netns(self) -> None:
        assert self.bridge is not None and self.relay_ns is not None
        net = ipaddress.ip_network(self.subnet or "")
        _sh(["ip", "link", "add", self.bridge, "type", "bridge"])
        _sh(["ip", "addr", "add", f"{self.controller_address}/{net.prefixlen}", "dev",
             self.bridge])
        _sh(["ip", "link", "set", self.bridge, "up"])
        members = [(self.relay_ns, self.relay_address, f"{PREFIX}{self.run_id}r")]
        members += [(self.device_ns(i) or "", self.device_address(i), f"{PREFIX}{self.run_id}d{i}")
                    for i in range(1, self.n_devices + 1)]
        for ns, addr, host_if in members:
            _sh(["ip", "netns", "add", ns])
            _sh(["ip", "link", "add", host_if, "type", "veth", "peer", "name", "eth0",
                 "netns", ns])
            _sh(["ip", "link", "set", host_if, "master", self.bridge])
            _sh(["ip", "link", "set", host_if, "up"])
            inside = ["ip", "netns", "exec", ns]
            _sh(inside + ["ip", "link", "set", "lo", "up"])
            _sh(inside + ["ip", "addr", "add", f"{addr}/{net.prefixlen}", "dev", "eth0"])
            _sh(inside + ["ip", "link", "set", "eth0", "up"])
        for i in range(1, self.n_devices + 1):
            ns = self.device_ns(i) or ""
            res = subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"],
                                 input=NFT_DEVICE_RULES, capture_output=True, text=True,
                                 timeout=20)
            if res.returncode != 0:
                raise RuntimeError(f"nftables ruleset for {ns} failed: {res.stderr.strip()}")
        # wait (bounded) until the links are usable: DAD is off for IPv4, carrier takes a tick
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if "state UP" in _sh(["ip", "netns", "exec", self.relay_ns, "ip", "link", "show",
                                  "eth0"], check=False).stdout:
                break
            time.sleep(0.05)

    def _make_device(self, i: int) -> Device:
        base = self.base / f"device{i}"
        (base / "home" / ".ssh").mkdir(parents=True, exist_ok=True, mode=0o700)
        ak = base / "home" / ".ssh" / "authorized_keys"
        ak.touch(mode=0o600)
        user = getpass.getuser() if os.geteuid() != 0 else "root"
        port = 22 if self.namespaced else free_port()
        return Device(i, self.device_ns(i), self.device_address(i), base, port, user)

    def start_device_sshd(self, i: int) -> Device:
        """OpenSSH sshd on the device's own 127.0.0.1 (port 22 when namespaced)."""
        dev = self.device(i)
        if dev.sshd is not None and dev.sshd.popen.poll() is None:
            return dev
        dev.sshd, key = start_sshd(dev.base, port=dev.ssh_port,
                                   authorized_keys=dev.authorized_keys,
                                   spawner=lambda argv: self.spawn_in(dev.ns, argv))
        dev.host_keys = [key]
        return dev

    def start_all_sshd(self) -> None:
        for i in range(1, self.n_devices + 1):
            self.start_device_sshd(i)

    def start_plane(self, servers: dict[str, list[str]], name: str = "plane") -> NsPlane:
        """Directory + one atserver per entry (name -> atSigns) in the relay ns; activates
        every atSign from the root namespace (keys in ``plane.keys`` / ``plane.keys_file``)."""
        np_ = NsPlane(self, self.base / name)
        self.planes.append(np_)
        np_.plane.populate(servers)
        return np_

    def close(self) -> None:
        """Stop our processes (SIGTERM first), then delete namespaces, links and state."""
        for proc in reversed(self.procs):
            with contextlib.suppress(Exception):
                proc.stop(timeout=5)
        self.procs.clear()
        if self.namespaced:
            _destroy(self.run_id)

    def __enter__(self) -> Topology:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def build_topology(base: Path, n_devices: int = 2, *, sshd: bool = True,
                   namespaced: bool | None = None) -> Iterator[Topology]:
    topo = Topology(base, n_devices, namespaced=namespaced)
    try:
        topo.build()
        if sshd:
            topo.start_all_sshd()
        yield topo
    finally:
        topo.close()


# --------------------------------------------------------------------------- probes


_PROBE = """\
import errno, socket, sys, threading
timeout = float(sys.argv[1]); targets = sys.argv[2:]; out = {}
def probe(t):
    host, port = t.rsplit(":", 1)
    s = socket.socket(); s.settimeout(timeout)
    try:
        s.connect((host, int(port))); out[t] = "ok"
    except socket.timeout:
        out[t] = "timeout"
    except ConnectionRefusedError:
        out[t] = "refused"
    except OSError as e:
        out[t] = errno.errorcode.get(e.errno, "oserror")
    finally:
        s.close()
ts = [threading.Thread(target=probe, args=(t,)) for t in targets]
[t.start() for t in ts]; [t.join() for t in ts]
print("\\n".join(f"{t} {out[t]}" for t in targets))
"""


def tcp_probe(topo: Topology, ns: str | None, targets: Sequence[tuple[str, int]],
              timeout: float = 1.5) -> dict[tuple[str, int], str]:
    """Concurrent TCP connects from inside ``ns``: target -> 'ok', 'refused', 'timeout' or
    an errno name. A subprocess, so the source namespace really is ``ns``."""
    res = topo.python_in(ns, _PROBE, str(timeout), *(f"{h}:{p}" for h, p in targets),
                         timeout=timeout + 20)
    got: dict[tuple[str, int], str] = {}
    for line in res.stdout.splitlines():
        hp, result = line.rsplit(" ", 1)
        h, p = hp.rsplit(":", 1)
        got[(h, int(p))] = result
    for t in targets:
        got.setdefault((t[0], int(t[1])), f"error: {res.stderr.strip()[-300:]}")
    return got


def tcp_connect(topo: Topology, ns: str | None, host: str, port: int,
                timeout: float = 1.5) -> str:
    """One TCP connect from ``ns``; see :func:`tcp_probe`."""
    return tcp_probe(topo, ns, [(host, port)], timeout)[(host, port)]


def read_banner(topo: Topology, ns: str | None, host: str, port: int,
                timeout: float = 5.0) -> str:
    """First line a TCP server sends (an SSH banner), read from inside ``ns``."""
    code = ("import socket,sys\n"
            "s=socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=float(sys.argv[3]))\n"
            "print(s.recv(256).split(b'\\n')[0].decode('ascii','replace').strip())\n")
    res = topo.python_in(ns, code, host, str(port), str(timeout), timeout=timeout + 15)
    return res.stdout.strip() or f"error: {res.stderr.strip()[-200:]}"


# --------------------------------------------------------------------------- capture


@dataclass
class Capture:
    """Packets seen on an interface: ``data`` is the raw pcap file (filled on exit)."""

    ns: str | None
    iface: str
    data: bytes = b""
    stderr: str = ""

    def __bytes__(self) -> bytes:
        return self.data

    def __contains__(self, needle: bytes) -> bool:
        """True if ``needle`` is in any packet or in any reassembled TCP flow."""
        return needle in self.data or any(needle in b for b in self.flows().values())

    def packets(self) -> Iterator[bytes]:
        """Link-layer frames in capture order (classic pcap, any endianness)."""
        d = self.data
        if len(d) < 24:
            return
        magic = d[:4]
        endian = "<" if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
        off = 24
        while off + 16 <= len(d):
            _ts, _us, incl, _orig = struct.unpack(endian + "IIII", d[off:off + 16])
            off += 16
            yield d[off:off + incl]
            off += incl

    def link_type(self) -> int:
        if len(self.data) < 24:
            return 1
        endian = "<" if self.data[:4] in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
        return struct.unpack(endian + "I", self.data[20:24])[0]

    def flows(self) -> dict[tuple[str, int, str, int], bytes]:
        """TCP payload per (src, sport, dst, dport), concatenated in capture order (IPv4,
        Ethernet or Linux cooked captures; retransmissions are not de-duplicated)."""
        out: dict[tuple[str, int, str, int], bytearray] = {}
        lt = self.link_type()
        for frame in self.packets():
            if lt == 1:  # Ethernet
                if len(frame) < 14 or frame[12:14] != b"\x08\x00":
                    continue
                ip = frame[14:]
            elif lt == 113:  # Linux SLL
                if len(frame) < 16 or frame[14:16] != b"\x08\x00":
                    continue
                ip = frame[16:]
            elif lt == 0:  # BSD loopback
                ip = frame[4:]
            else:
                continue
            if len(ip) < 20 or ip[0] >> 4 != 4 or ip[9] != 6:
                continue
            ihl = (ip[0] & 0xF) * 4
            total = struct.unpack("!H", ip[2:4])[0]
            tcp = ip[ihl:total]
            if len(tcp) < 20:
                continue
            doff = (tcp[12] >> 4) * 4
            payload = tcp[doff:]
            if not payload:
                continue
            key = (socket.inet_ntoa(ip[12:16]), struct.unpack("!H", tcp[0:2])[0],
                   socket.inet_ntoa(ip[16:20]), struct.unpack("!H", tcp[2:4])[0])
            out.setdefault(key, bytearray()).extend(payload)
        return {k: bytes(v) for k, v in out.items()}


@contextlib.contextmanager
def capture(ns: str | None, iface: str, bpf: str = "tcp", *,
            ready_timeout: float = 10.0) -> Iterator[Capture]:
    """Record ``iface`` inside ``ns`` with tcpdump while the block runs.

    Yields a :class:`Capture` whose ``data`` (raw pcap bytes) is filled when the block
    exits; ``needle in cap`` searches packets and reassembled flows. Needs root (raw socket).
    """
    if os.geteuid() != 0:
        raise RuntimeError("packet capture needs root")
    tcpdump = shutil.which("tcpdump") or "/usr/bin/tcpdump"
    argv = [tcpdump, "-i", iface, "-n", "-s", "0", "--immediate-mode", "-U", "-w", "-",
            *bpf.split()]
    if ns is not None:
        argv = ["ip", "netns", "exec", ns, *argv]
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    chunks: list[bytes] = []
    errs: list[str] = []
    ready = threading.Event()

    def read_out() -> None:
        assert p.stdout is not None
        for chunk in iter(lambda: p.stdout.read(65536), b""):
            chunks.append(chunk)

    def read_err() -> None:
        assert p.stderr is not None
        for raw in p.stderr:
            errs.append(raw.decode("utf-8", "replace").rstrip())
            if "listening on" in errs[-1]:
                ready.set()
        ready.set()

    threads = [threading.Thread(target=read_out, daemon=True),
               threading.Thread(target=read_err, daemon=True)]
    for t in threads:
        t.start()
    cap = Capture(ns, iface)
    try:
        if not ready.wait(ready_timeout) or p.poll() is not None:
            raise RuntimeError(f"tcpdump did not start: {' '.join(errs)[-500:]}")
        yield cap
        time.sleep(0.3)  # let the last segments and their ACKs reach the capture
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        for t in threads:
            t.join(5)
        cap.data = b"".join(chunks)
        cap.stderr = "\n".join(errs)


__all__ = [
    "NFT_DEVICE_RULES", "PREFIX", "SSHD", "STATE_DIR", "Capture", "Device", "NsPlane", "Topology",
    "build_topology", "capture", "cleanup_stale",
    "free_port", "is_root", "want_namespaces", "read_banner", "tcp_connect", "tcp_probe",
]
