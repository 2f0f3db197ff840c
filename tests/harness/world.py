"""Start the whole NoPorts product in the "no open ports" topology, for tests and benches.

What runs where (every program is the real one, as a subprocess)::

    relay ns     atdirectory, atserver (relay atSign), atserver (users), srvd
    device ns i  OpenSSH sshd on its own 127.0.0.1 (topology.py), sshnpd (HOME = device home)
    root ns      the client: sshnp (exec, -x, --stdio as ProxyCommand), plain ssh

Without root the topology falls back to loopback (every address 127.0.0.1, each sshd on a
high port); the same helpers then run the same flows without namespaces.

Used by tests/integration/test_noports_e2e.py and by bench/sshnp_setup.py,
bench/scp_throughput.py and bench/noports_memory.py; BaseWorld is shared with fleet.Fleet.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.harness.plane import Proc, free_port
from tests.harness.sshd import keygen, start_sshd
from tests.harness.topology import Device, NsPlane, Topology, build_topology

PY = sys.executable
CLIENT = "@np_client"
RELAY = "@np_relay"
EVE = "@np_eve"  # activated, but in no device's managers list


def device_atsign(i: int) -> str:
    return f"@np_dev{i}"


def device_name(i: int) -> str:
    return f"dev{i}"


# --------------------------------------------------------------------------- timing


@dataclass
class Timed:
    """A finished program: exit code, output, and when its first stdout byte came."""

    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    first_output_s: float | None  # since start; None if it printed nothing
    total_s: float

    def check(self, what: str = "") -> Timed:
        if self.returncode != 0:
            raise AssertionError(f"{what or self.argv[0]} failed (rc={self.returncode}):\n"
                                 f"argv: {shlex.join(self.argv)}\nstdout: {self.stdout}\n"
                                 f"stderr: {self.stderr[-3000:]}")
        return self


def run_timed(argv: Sequence[str], *, env: dict[str, str] | None = None,
              timeout: float = 60.0, stdin: int | None = subprocess.DEVNULL) -> Timed:
    """Run to completion; record the time of the first byte on stdout (remote output)."""
    argv = [str(a) for a in argv]
    t0 = time.monotonic()
    p = subprocess.Popen(argv, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=env)
    first: list[float] = []
    out: list[bytes] = []
    err: list[bytes] = []

    def read_out() -> None:
        assert p.stdout is not None
        fd = p.stdout.fileno()
        while True:
            b = os.read(fd, 65536)
            if not b:
                break
            if not first:
                first.append(time.monotonic() - t0)
            out.append(b)

    def read_err() -> None:
        assert p.stderr is not None
        for chunk in iter(lambda: p.stderr.read(65536), b""):
            err.append(chunk)

    threads = [threading.Thread(target=read_out, daemon=True),
               threading.Thread(target=read_err, daemon=True)]
    for t in threads:
        t.start()
    try:
        rc = p.wait(timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(5)
        for t in threads:
            t.join(2)
        raise AssertionError(f"timed out after {timeout}s: {shlex.join(argv)}\nstderr: "
                             + b"".join(err).decode(errors="replace")[-3000:]) from None
    total = time.monotonic() - t0
    for t in threads:
        t.join(5)
    # -x leaves a background child holding no pipe of ours; nothing else to wait for
    return Timed(argv, rc, b"".join(out).decode(errors="replace"),
                 b"".join(err).decode(errors="replace"), first[0] if first else None, total)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sample."""
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(q / 100 * len(s) + 0.5)) - 1))
    return s[k]


# --------------------------------------------------------------------------- the world


@dataclass
class BaseWorld:
    """What every NoPorts world has: the topology, a plane in its relay namespace, and the
    client's home and SSH key. :class:`World` (one relay) and ``fleet.Fleet`` (Redis
    directory, sharded atServers, several relays) add their programs on top."""

    topo: Topology
    plane: NsPlane
    base: Path
    client_home: Path
    identity: Path

    client_atsign = CLIENT  # the manager of every device

    @staticmethod
    def device_atsign(i: int) -> str:
        return device_atsign(i)

    # -- addresses, keys ---------------------------------------------------------------------
    @property
    def namespaced(self) -> bool:
        return self.topo.namespaced

    @property
    def root(self) -> str:
        return self.plane.root

    @property
    def ca(self) -> str:
        return str(self.plane.ca_file)

    def keyfile(self, atsign: str) -> Path:
        return self.plane.keys_file(atsign)

    def client_env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, "HOME": str(self.client_home), "PYTHONUNBUFFERED": "1", **extra}

    def device(self, i: int) -> Device:
        return self.topo.device(i)

    def host_pub(self, i: int) -> Path:
        return Path(str(self.device(i).host_keys[0]) + ".pub")

    def netns_id(self, ns: str | None) -> str:
        """``net:[inode]`` of a namespace (the root one for None): identifies a device."""
        res = self.topo.run_in(ns, ["readlink", "/proc/self/ns/net"])
        return res.stdout.strip()

    # -- programs ----------------------------------------------------------------------------
    def spawn_srvd(self, relay: str, *extra: str, timeout: float = 30) -> Proc:
        """srvd for ``relay`` in the relay namespace, on the relay address; waits for ready."""
        ip = self.topo.relay_address
        proc = self.topo.spawn_in(self.topo.relay_ns, [
            PY, "-m", "noports.relay.srvd_cli", "-a", relay, "-k", str(self.keyfile(relay)),
            "--root-domain", self.root, "--ca-file", self.ca, "-i", ip, "--bind", ip, *extra])
        proc.wait_for(rf"srvd {re.escape(relay)} ready", timeout=timeout)
        return proc

    def sshnpd_argv(self, i: int, *, name: str | None = None, sshd_port: int | None = None,
                    host_keys: Path | None = None, extra: Sequence[str] = ()) -> list[str]:
        dev = self.device(i)
        port = sshd_port or dev.ssh_port
        atsign = self.device_atsign(i)
        return [PY, "-m", "noports.daemon.cli", "-a", atsign, "-m", self.client_atsign,
                "-d", name or device_name(i), "-k", str(self.keyfile(atsign)),
                "--root-domain", self.root, "--ca-file", self.ca,
                "--local-sshd-port", str(port), "--permit-open", f"localhost:{port}",
                "--authorized-keys", str(dev.authorized_keys),
                "--sshd-host-keys", str(host_keys or self.host_pub(i)),
                "--log-format", "json", *extra]

    def spawn_sshnpd(self, i: int, argv: list[str]) -> Proc:
        """Run an sshnpd argv inside device ``i`` (HOME = its home; not waited for)."""
        return self.topo.spawn_in(self.device(i).ns, argv, env={"HOME": str(self.device(i).home)})


@dataclass
class World(BaseWorld):
    """The topology plus the NoPorts programs running in it (one relay, ``RELAY``)."""

    srvd: Proc | None = None
    daemons: dict[int, Proc] = field(default_factory=dict)
    daemon_argv: dict[int, list[str]] = field(default_factory=dict)
    extra_sshd: list[Proc] = field(default_factory=list)

    def start_srvd(self, *extra: str) -> Proc:
        self.srvd = self.spawn_srvd(RELAY, *extra)
        return self.srvd

    def start_sshnpd(self, i: int, *, key: int | None = None, **kw) -> Proc:
        """sshnpd for device ``i`` inside its namespace; ``key`` names it in ``daemons``."""
        argv = self.sshnpd_argv(i, **kw)
        proc = self.spawn_sshnpd(i, argv)
        proc.wait_for(r'"event": "ready"', timeout=30)
        k = i if key is None else key
        self.daemons[k] = proc
        self.daemon_argv[k] = argv
        return proc

    def restart_sshnpd(self, k: int, i: int | None = None) -> Proc:
        """Start daemon ``k`` again with the same argv (after a crash)."""
        i = k if i is None else i
        proc = self.spawn_sshnpd(i, self.daemon_argv[k])
        proc.wait_for(r'"event": "ready"', timeout=30)
        self.daemons[k] = proc
        return proc

    def start_impostor_sshd(self, i: int) -> tuple[Proc, int, Path]:
        """A second sshd in device ``i``'s namespace with *different* host keys, reading the
        same authorized_keys (so only host-key pinning can stop a login)."""
        dev = self.device(i)
        port = 2222 if self.namespaced else free_port()
        proc, key = start_sshd(dev.base / "impostor", port=port,
                               authorized_keys=dev.authorized_keys,
                               spawner=lambda argv: self.topo.spawn_in(dev.ns, argv))
        self.extra_sshd.append(proc)
        return proc, port, Path(str(key) + ".pub")

    # -- client command lines --------------------------------------------------------------------
    def sshnp_argv(self, i: int, *extra: str, mode: str = "aes", client: str = CLIENT,
                   name: str | None = None, sshd_port: int | None = None,
                   quiet: bool = True) -> list[str]:
        dev = self.device(i)
        return [PY, "-m", "noports.client.cli", "-f", client, "-t", device_atsign(i),
                "-d", name or device_name(i), "-r", RELAY, "-k", str(self.keyfile(client)),
                "--root-domain", self.root, "--ca-file", self.ca, "-i", str(self.identity),
                "-u", dev.ssh_user, "--remote-sshd-port", str(sshd_port or dev.ssh_port),
                "--tunnel-mode", mode, *(["-q"] if quiet else []), *extra]

    def sshnp(self, i: int, *command: str, mode: str = "aes", timeout: float = 60,
              **kw) -> Timed:
        """Exec mode: ``sshnp ... <command>`` (OpenSSH runs as a child of sshnp)."""
        return run_timed(self.sshnp_argv(i, mode=mode, **kw) + list(command),
                         env=self.client_env(), timeout=timeout)

    def sshnp_x(self, i: int, command: str, *, mode: str = "aes",
                timeout: float = 60) -> tuple[Timed, Timed]:
        """``sshnp -x`` (prints the ssh command, tunnel stays in the background), then run
        the printed command with ``command``. Returns (sshnp, ssh)."""
        first = run_timed(self.sshnp_argv(i, "-x", mode=mode), env=self.client_env(),
                          timeout=timeout).check("sshnp -x")
        argv = shlex.split(first.stdout.strip().splitlines()[-1])
        second = run_timed([*argv, "-o", "BatchMode=yes", command], env=self.client_env(),
                           timeout=timeout)
        return first, second

    def proxy_options(self, i: int, *, mode: str = "aes", known_hosts: Path) -> list[str]:
        """OpenSSH options for a plain ssh/scp whose ProxyCommand is ``sshnp --stdio``, with
        strict host key checking against the known_hosts file sshnp fills with the device's
        pinned (signed) keys."""
        alias = f"{device_atsign(i).lstrip('@')}/{device_name(i)}"
        proxy = shlex.join(self.sshnp_argv(i, "--stdio", "--known-hosts", str(known_hosts),
                                           mode=mode))
        return ["-F", "/dev/null", "-o", f"ProxyCommand={proxy}",
                "-o", f"HostKeyAlias={alias}", "-o", f"UserKnownHostsFile={known_hosts}",
                "-o", "GlobalKnownHostsFile=/dev/null", "-o", "StrictHostKeyChecking=yes",
                "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-i", str(self.identity)]

    def proxy_target(self, i: int) -> str:
        return f"{self.device(i).ssh_user}@{device_name(i)}.noports"

    def proxy_ssh_argv(self, i: int, command: str, *, mode: str = "aes",
                       known_hosts: Path) -> list[str]:
        """``ssh -o ProxyCommand='sshnp --stdio ...' user@devN.noports <command>``."""
        return ["ssh", *self.proxy_options(i, mode=mode, known_hosts=known_hosts),
                self.proxy_target(i), command]

    def direct_ssh_argv(self, i: int, *extra: str) -> list[str]:
        """Plain OpenSSH to device ``i``'s sshd from *inside* its namespace (the baseline)."""
        dev = self.device(i)
        kh = self.base / f"direct_known_hosts_{i}"
        if not kh.exists():
            kh.write_text((f"[127.0.0.1]:{dev.ssh_port} " if dev.ssh_port != 22 else "127.0.0.1 ")
                          + " ".join(self.host_pub(i).read_text().split()[:2]) + "\n")
        return self.topo.ns_argv(dev.ns, [
            "ssh", "-F", "/dev/null", "-p", str(dev.ssh_port), "-o", "BatchMode=yes",
            "-o", f"UserKnownHostsFile={kh}", "-o", "StrictHostKeyChecking=yes",
            "-o", "IdentitiesOnly=yes", "-i", str(self.identity), *extra,
            f"{dev.ssh_user}@127.0.0.1"])

    def session_params(self, i: int, mode: str):  # noqa: ANN201 - SessionParams
        from noports.client.params import SessionParams, parse_root
        dev = self.device(i)
        return SessionParams(
            client_atsign=CLIENT, device_atsign=device_atsign(i), relays=[RELAY],
            device=device_name(i), remote_user=dev.ssh_user, key_file=self.keyfile(CLIENT),
            root=parse_root(self.root), ca_file=self.plane.ca_file, tunnel_mode=mode,
            remote_sshd_port=dev.ssh_port, identity_file=self.identity,
            cache_dir=self.client_home / ".atsign" / "sshnp")

    # -- authorized_keys ---------------------------------------------------------------------
    def ephemeral_lines(self, i: int) -> list[str]:
        text = self.device(i).authorized_keys.read_text()
        return [ln for ln in text.splitlines() if "sshnp_ephemeral_" in ln]


def client_identity(home: Path, topo: Topology) -> Path:
    """The client's SSH key (``home/.ssh/id_ed25519``), authorized on every device's sshd."""
    ssh = home / ".ssh"
    ssh.mkdir(parents=True, exist_ok=True, mode=0o700)
    ident = keygen(ssh / "id_ed25519", "np-client")
    pub = Path(f"{ident}.pub").read_text().strip()
    for dev in topo.devices:
        with open(dev.authorized_keys, "a", encoding="utf-8") as fh:
            fh.write(pub + "\n")
    return ident


@contextlib.contextmanager
def noports_world(base: Path, n_devices: int = 2, *, namespaced: bool | None = None,
                  daemons: bool = True, srvd_args: Sequence[str] = ()) -> Iterator[World]:
    """Topology + plane (relay atSign on its own atserver, users on another) + srvd +
    one sshnpd per device; the client's identity is authorized on every device's sshd."""
    with build_topology(base / "topo", n_devices=n_devices, namespaced=namespaced) as topo:
        users = [CLIENT, EVE] + [device_atsign(i) for i in range(1, n_devices + 1)]
        plane = topo.start_plane({"relay-srv": [RELAY], "users-srv": users})
        home = base / "client-home"
        ident = client_identity(home, topo)
        world = World(topo=topo, plane=plane, base=base, client_home=home, identity=ident)
        world.start_srvd(*srvd_args)
        if daemons:
            for i in range(1, n_devices + 1):
                world.start_sshnpd(i)
        yield world


# --------------------------------------------------------------------------- in-process client


async def run_inprocess(world: World, i: int, mode: str, command: str,
                        timeout: float = 40.0):  # noqa: ANN201 - (Session, rc, out, err)
    """The library flow (what the Ansible plugin uses): ``open_session`` in this process,
    the tunnel on an ephemeral 127.0.0.1 port, OpenSSH through it. Returns the Session too,
    so a test can see what only the client holds (the ephemeral private key)."""
    from noports.client.flow import open_session
    from noports.client.sshcmd import ssh_command
    params = world.session_params(i, mode)
    session = await asyncio.wait_for(open_session(params), timeout)
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(1)
    lst.setblocking(False)
    loop = asyncio.get_running_loop()

    async def serve() -> None:
        try:
            conn, _ = await asyncio.wait_for(loop.sock_accept(lst), timeout)
        finally:
            lst.close()
        await session.tunnel.serve_socket(conn)

    server = loop.create_task(serve())
    argv = ssh_command(ssh_binary=shutil.which("ssh") or "ssh", port=lst.getsockname()[1],
                       user=session.remote_user, alias=session.host_key_alias,
                       known_hosts=session.known_hosts, identity_file=params.identity_file,
                       ssh_options=["BatchMode=yes"], command=[command])
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=world.client_env())
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    finally:
        server.cancel()
        with contextlib.suppress(BaseException):
            await server
        session.close()
    return session, proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


# --------------------------------------------------------------------------- raw protocol


async def _client(world: World, atsign: str = CLIENT):  # noqa: ANN202 - AtClient
    from noports.atclient.aio import AtClient
    return await AtClient.connect(atsign, world.plane.keys[atsign], world.plane.root_tuple,
                                  world.plane.ssl_context())


async def request_ports(world: World, c, sid: str, cn: str, i: int,
                        timeout: float = 15.0):  # noqa: ANN001, ANN201 - RelayResponse
    """K1 to srvd as the client, K2 back (a real srvd session: ports A and B)."""
    from noports.npproto import RelayRequest, RelayResponse
    from noports.npproto.keys import client_relay_response_regex
    mon = c.monitor(client_relay_response_regex(sid))
    await mon.wait_ready(10)
    try:
        await c.notify(RELAY, f"{device_name(i)}.request_ports.sshrvd",
                       RelayRequest(sid, CLIENT, device_atsign(i), cn).to_json(),
                       ttl_ms=10_000)
        n = await asyncio.wait_for(mon.__anext__(), timeout)
    finally:
        await mon.aclose()
    return RelayResponse.from_csv(n.value)


@dataclass
class RawSession:
    sid: str
    client_nonce: str
    relay: object  # RelayResponse
    envelope: str
    responses: list[tuple[float, str]]  # (monotonic time, value)


async def raw_ssh_request(world: World, i: int, *, sends: int = 1, gap: float = 0.0,
                          wait_after: float = 0.0, on_first=None) -> RawSession:  # noqa: ANN001
    """Ask srvd for ports, then send ONE signed ssh_request envelope ``sends`` times (a
    replay when > 1), collecting every session response that arrives. ``on_first`` (sync)
    runs as soon as the first response is in."""
    from noports.npproto import SshRequest, dart_iso_now, sign_envelope
    c = await _client(world)
    try:
        sid, cn = str(uuid.uuid4()), dart_iso_now()
        rr = await request_ports(world, c, sid, cn, i)
        req = SshRequest(session_id=sid, host=rr.host, port=rr.port_b,
                         authenticate_to_rvd=True, client_nonce=cn, rvd_nonce=rr.rvd_nonce,
                         encrypt_rvd_traffic=False)
        envelope = sign_envelope(req.to_dict(), world.plane.keys[CLIENT].encrypt_private)
        at = device_atsign(i).lstrip("@")
        mon = c.monitor(rf"{re.escape(sid)}\.{device_name(i)}\.sshnp@{at}")
        await mon.wait_ready(10)
        responses: list[tuple[float, str]] = []
        got_first = asyncio.Event()

        async def collect() -> None:
            async for n in mon:
                responses.append((time.monotonic(), n.value))
                if not got_first.is_set():
                    got_first.set()

        collector = asyncio.get_running_loop().create_task(collect())
        for k in range(sends):
            await c.notify(device_atsign(i), f"ssh_request.{device_name(i)}.sshnp", envelope,
                           ttl_ms=10_000)
            if k == 0:
                await asyncio.wait_for(got_first.wait(), 15)
                if on_first is not None:
                    on_first()
            if gap:
                await asyncio.sleep(gap)
        if wait_after:
            await asyncio.sleep(wait_after)
        collector.cancel()
        with contextlib.suppress(BaseException):
            await collector
        await mon.aclose()
        return RawSession(sid, cn, rr, envelope, responses)
    finally:
        await c.close()


__all__ = [
    "CLIENT", "EVE", "RELAY", "RawSession", "Timed", "World", "device_atsign", "device_name",
    "noports_world", "percentile", "raw_ssh_request", "request_ports", "run_inprocess",
    "run_timed",
]
