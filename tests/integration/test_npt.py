"""npt end to end in the "no open ports" topology (docs/npt.md).

Every program is the real one: plane and srvd in the relay namespace; in the device
namespace an HTTP server bound to the device's OWN 127.0.0.1 (unreachable from anywhere
else) and sshnpd allowed to open only that port (``--permit-open localhost:<port>``); the
client (``npt``, plain sockets, ``ansible-playbook``) in the root namespace. Without root the
topology falls back to loopback and the same flows run.

1. ``npt -x`` prints a local port; three TCP connections are open at once through that one
   session (the first is answered last), each gets its own file, hash checked; the session
   carries our AEAD; the background npt ends after ``-T`` without connections, and the
   daemon logs one session with three connections.
2. A target outside ``--permit-open`` is refused: the user reads the daemon's official
   refusal and which --permit-open entry would allow it; nothing is connected. A permitted
   target where nothing listens: the foreground npt names it; the session ends after
   ``-T`` and ``-K`` starts the next one on the same local port.
3. The same against a daemon that answers as official daemons do (``--test-official-reply``):
   the AES-256-CTR path; a capture on the relay shows every ``connect:`` line travelling
   whole on the control connection (the C daemon parses each read on its own).
4. Hostile: a client that writes garbage on its control stream loses its session (the daemon
   names the bad control stream), and the next client is served.
5. Ansible: docs/npt.md's pattern (tests/ansible/npt/npt_http.yml) with a real
   ansible-playbook: ``noports.sshnp.npt_tunnel`` opens the tunnel in one task (idempotent),
   ``uri`` and ``get_url`` use it from the controller, ``always:`` closes it (idempotent).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.harness.plane import free_port
from tests.harness.topology import capture
from tests.harness.world import CLIENT, RELAY, World, device_atsign, noports_world

pytestmark = [pytest.mark.integration]

PY = sys.executable
REPO = Path(__file__).resolve().parents[2]
FILES = {f"f{i}.bin": os.urandom(200_000 + i) for i in range(3)}


@pytest.fixture(scope="module")
def npt_world(tmp_path_factory):
    base = tmp_path_factory.mktemp("npt")
    with noports_world(base, n_devices=1, daemons=False) as world:
        dev = world.device(1)
        www = base / "www"
        www.mkdir()
        for name, data in FILES.items():
            (www / name).write_bytes(data)
        (www / "hello.txt").write_text("hello from the device loopback\n")
        port = 8080 if world.namespaced else free_port()
        world.topo.spawn_in(dev.ns, [PY, "-m", "http.server", "--bind", "127.0.0.1",
                                     str(port), "--directory", str(www)])
        probe = ("import socket,sys\nsocket.create_connection(('127.0.0.1', int(sys.argv[1])),"
                 " timeout=1).close()")
        deadline = time.monotonic() + 20
        while world.topo.python_in(dev.ns, probe, str(port)).returncode != 0:
            assert time.monotonic() < deadline, "http.server did not start"
            time.sleep(0.2)
        dead = 8081 if world.namespaced else free_port()  # permitted, nothing listens
        world.start_sshnpd(1, extra=["--permit-open", f"localhost:{port},localhost:{dead}"])
        world.start_sshnpd(1, key=2, name="official", extra=[
            "--permit-open", f"localhost:{port}", "--test-official-reply"])
        world.http_port = port  # type: ignore[attr-defined]
        world.dead_port = dead  # type: ignore[attr-defined]
        yield world


def npt_argv(world: World, port: int, *extra: str, device: str = "dev1") -> list[str]:
    return [PY, "-m", "noports.client.npt_cli", "-f", CLIENT, "-t", device_atsign(1),
            "-d", device, "-r", RELAY, "-p", str(port), "-k", str(world.keyfile(CLIENT)),
            "--root-domain", world.root, "--ca-file", world.ca, *extra]


def npt_x(world: World, *extra: str, device: str = "dev1", timeout_s: str = "1s",
          pid_file: Path | None = None) -> tuple[int, subprocess.CompletedProcess]:
    argv = npt_argv(world, world.http_port, "-x", "-T", timeout_s, *extra, device=device)
    if pid_file is not None:
        argv += ["--pid-file", str(pid_file)]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                         env=world.client_env())
    assert res.returncode == 0, res.stderr
    return int(res.stdout.strip()), res


def http_get(sock: socket.socket, path: str) -> None:
    sock.sendall(f"GET /{path} HTTP/1.0\r\nHost: device\r\n\r\n".encode())


def read_body(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _sep, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200"), head[:200]
    return body


def wait_gone(pid_file: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while pid_file.exists():
        assert time.monotonic() < deadline, "the background npt did not end after -T"
        time.sleep(0.2)


def test_three_concurrent_connections_in_one_session(npt_world: World, tmp_path: Path) -> None:
    pid_file = tmp_path / "npt.pid"
    port, res = npt_x(npt_world, pid_file=pid_file)
    assert "npt session ready (chacha20-poly1305-v1)" in res.stderr  # both ends ours: AEAD
    assert pid_file.read_text().strip().isdigit()
    socks = [socket.create_connection(("127.0.0.1", port), timeout=20) for _ in FILES]
    time.sleep(0.5)  # all three are open (and spliced on the device) before any request
    names = list(FILES)
    bodies = {}
    for sock, name in reversed(list(zip(socks, names, strict=True))):  # first answered last
        http_get(sock, name)
        bodies[name] = read_body(sock)
        sock.close()
    for name, data in FILES.items():
        assert hashlib.sha256(bodies[name]).hexdigest() == hashlib.sha256(data).hexdigest()
    wait_gone(pid_file)  # -T 3s after the last connection: the tunnel is gone
    daemon = npt_world.daemons[1]
    daemon.wait_for(r"npt session \S+ ended \(no connection for 1s\): 3 connection\(s\), "
                    r"0 failed", timeout=60)
    assert len(re.findall(r"npt session \S+ for", "\n".join(daemon.lines))) == 1


def test_a_target_outside_permit_open_is_refused(npt_world: World) -> None:
    refused = 9  # in no --permit-open entry
    res = subprocess.run(npt_argv(npt_world, refused, "-x"), capture_output=True, text=True,
                         timeout=60, env=npt_world.client_env())
    assert res.returncode == 7, res.stderr
    assert f"refused: Daemon does not permit connections to localhost:{refused}" in res.stderr
    assert f"start sshnpd on {device_atsign(1)} with --permit-open localhost:{refused}" \
        in res.stderr
    assert res.stdout == "" and "Traceback" not in res.stderr


def test_a_permitted_target_that_is_down_is_named_in_the_foreground(
        npt_world: World) -> None:
    """Foreground npt with -K: the connection is closed and the user reads why (the daemon
    says it on the control stream); the session ends by itself after -T and -K starts the
    next one on the same local port."""
    w = npt_world
    proc = subprocess.Popen(npt_argv(w, w.dead_port, "-K", "-T", "1s"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=w.client_env())
    guard = threading.Timer(120, proc.kill)  # hang detection: the reads below block
    guard.start()
    lines: list[str] = []

    def until(pattern: str) -> re.Match:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            m = re.search(pattern, line)
            if m:
                return m
        raise AssertionError("".join(lines))

    try:
        port = int(until(r"npt is listening on localhost:(\d+)").group(1))
        with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
            s.settimeout(20)
            try:
                got = s.recv(100)
            except ConnectionResetError:
                got = b""
            assert got == b""  # closed (or reset): nothing to reach
        until(r"session ended: ")  # by itself, after -T
        until(r"keep-alive: a new session in 5s")
        assert int(until(r"npt is listening on localhost:(\d+)").group(1)) == port
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=60)[1]
    finally:
        guard.cancel()
        if proc.poll() is None:
            proc.kill()
    err = "".join(lines) + rest
    assert (f"npt: warning: the device cannot connect localhost:{w.dead_port}: Connection "
            "refused; is the service running on the device?") in err
    assert proc.returncode == 130 and "npt: error: interrupted" in err, err


def _segments(cap, src: str, dst: str) -> list[tuple[int, bytes]]:
    """(source port, TCP payload) of each captured IPv4 segment from ``src`` to ``dst``."""
    out = []
    for frame in cap.packets():
        ip = frame[14:] if cap.link_type() == 1 else frame[16:]
        if len(ip) < 20 or ip[0] >> 4 != 4 or ip[9] != 6:
            continue
        if socket.inet_ntoa(ip[12:16]) != src or socket.inet_ntoa(ip[16:20]) != dst:
            continue
        tcp = ip[(ip[0] & 0xF) * 4:struct.unpack("!H", ip[2:4])[0]]
        payload = tcp[(tcp[12] >> 4) * 4:]
        if payload:
            out.append((struct.unpack("!H", tcp[0:2])[0], payload))
    return out


def test_official_style_daemon_aes_ctr(npt_world: World, tmp_path: Path) -> None:
    """The AES-CTR path, and (namespaces) the property the C daemon needs: on the control
    connection every ``connect:`` line (78 bytes with AES-CTR) travels whole - no segment
    after the auth line carries part of one."""
    w = npt_world
    pid_file = tmp_path / "npt.pid"
    with contextlib.ExitStack() as stack:
        cap = (stack.enter_context(capture(w.topo.relay_ns, w.topo.relay_iface))
               if w.namespaced else None)
        port, res = npt_x(w, device="official", pid_file=pid_file, timeout_s="1s")
        assert "npt session ready (aes-256-ctr)" in res.stderr
        for name in ("f1.bin", "hello.txt", "f0.bin"):
            with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
                http_get(s, name)
                assert read_body(s) == (FILES.get(name) or b"hello from the device loopback\n")
        wait_gone(pid_file)
    if cap is None:
        return
    segs = _segments(cap, w.topo.controller_address, w.topo.relay_address)
    first: dict[int, bytes] = {}
    for sport, payload in segs:
        first.setdefault(sport, payload)
    authed = [p for p, data in first.items() if data.startswith(b'{"payload":')]
    control = authed[0]  # the control connection is dialled first
    after = [data for sport, data in segs if sport == control][1:]
    assert len(after) >= 1 and sum(len(d) for d in after) == 3 * 78, [len(d) for d in after]
    assert all(len(d) % 78 == 0 for d in after), [len(d) for d in after]


def test_garbage_on_the_control_stream_ends_only_that_session(npt_world: World) -> None:
    from noports.client.npt_flow import NptTarget, open_npt_session
    from noports.client.params import SessionParams, parse_root
    w = npt_world
    params = SessionParams(client_atsign=CLIENT, device_atsign=device_atsign(1),
                           relays=[RELAY], device="dev1", key_file=w.keyfile(CLIENT),
                           root=parse_root(w.root), ca_file=w.plane.ca_file,
                           need_remote_user=False,
                           cache_dir=w.client_home / ".atsign" / "sshnp")

    async def attack() -> str:
        s = await open_npt_session(params, NptTarget("localhost", w.http_port, 30.0))
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(s.control, os.urandom(4096))  # not AEAD frames
        try:
            got = await asyncio.wait_for(loop.sock_recv(s.control, 10), 20)
        finally:
            s.close()
        return s.session_id if got == b"" else "still open"

    sid = asyncio.run(attack())
    assert sid != "still open"  # the daemon closed the control pair
    w.daemons[1].wait_for(rf"npt session {sid} ended \(bad control stream: ", timeout=60)
    port, _res = npt_x(w, timeout_s="1s")
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        http_get(s, "hello.txt")
        assert read_body(s) == b"hello from the device loopback\n"


@pytest.mark.skipif(not shutil.which("ansible-playbook")
                    and not (Path(PY).parent / "ansible-playbook").exists(),
                    reason="ansible-core not installed")
def test_ansible_play_reaches_the_device_http_server(npt_world: World, tmp_path: Path) -> None:
    from tests.harness.ansible import ansible_tool
    w = npt_world
    env = {k: v for k, v in w.client_env().items() if not k.startswith("ANSIBLE_")}
    coll = tmp_path / "collections" / "ansible_collections" / "noports"
    coll.mkdir(parents=True)
    (coll / "sshnp").symlink_to(REPO)  # the collection from this checkout
    env.update({"ANSIBLE_NOCOLOR": "1", "ANSIBLE_LOCAL_TEMP": str(tmp_path / "tmp"),
                "ANSIBLE_COLLECTIONS_PATH": str(tmp_path / "collections"),
                "PATH": f"{Path(PY).parent}:{env.get('PATH', '/usr/bin:/bin')}"})
    pid_file = tmp_path / "npt.pid"
    extra = {"npt_from": CLIENT, "npt_to": device_atsign(1), "npt_device": "dev1",
             "npt_relay": RELAY, "npt_remote_port": w.http_port,
             "npt_key_file": str(w.keyfile(CLIENT)), "npt_root_domain": w.root,
             "npt_ca_file": w.ca, "npt_pid_file": str(pid_file),  # default: /tmp/npt-<device>.pid
             "download_to": str(tmp_path / "f2.bin"), "ansible_python_interpreter": PY}
    argv = [ansible_tool("ansible-playbook"), "-i", "localhost,", "-c", "local",
            str(REPO / "tests" / "ansible" / "npt" / "npt_http.yml"),
            *[a for k, v in extra.items() for a in ("-e", f"{k}={v}")]]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-6000:]
    assert "hello from the device loopback" in out
    assert re.search(r"localhost\s*: ok=\d+\s+changed=\d+\s+unreachable=0\s+failed=0", out)
    assert (tmp_path / "f2.bin").read_bytes() == FILES["f2.bin"]
    assert not pid_file.exists()  # closed by the play's always: block
    pid = re.search(r"npt pid (\d+)", out)
    assert pid is not None, out[-3000:]
    stat = Path(f"/proc/{pid.group(1)}/stat")  # gone, or a zombie (ended; its reaper is late)
    assert not stat.exists() or stat.read_text().rpartition(")")[2].split()[0] == "Z"
