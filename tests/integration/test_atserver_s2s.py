"""Real `atserver` processes over real TLS, resolved through a real `atdirectory`.

Covers: cross-process notify via from/pol into a monitor, remote lookup/plookup, retry when the
recipient is down, durability across kill -9 with monitor replay, bad input, admin pickup.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from noports import crypto
from noports.atserver.wire import reply_complete
from noports.keys import ca

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent


def _wait_line(logfile: Path, pattern: str, timeout: float = 30.0,
               proc: subprocess.Popen | None = None) -> re.Match:
    rx = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if logfile.exists():
            m = rx.search(logfile.read_text(errors="replace"))
            if m:
                return m
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited: {logfile.read_text(errors='replace')[-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"timeout waiting for {pattern!r} in {logfile}:\n"
                         f"{logfile.read_text(errors='replace')[-3000:] if logfile.exists() else ''}")


class Client:
    """Minimal synchronous atProtocol client (one reply per command)."""

    def __init__(self, port: int, cafile: Path, host: str = "127.0.0.1") -> None:
        ctx = ssl.create_default_context(cafile=str(cafile))
        raw = socket.create_connection((host, port), timeout=15)
        self.sock = ctx.wrap_socket(raw, server_hostname=host)
        self.buf = b""
        assert self._read_until(lambda b: b.endswith(b"@")) == "@"

    def _read_until(self, done) -> str:
        while not done(self.buf):
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed; got {self.buf[:300]!r}")
            self.buf += chunk
        out, self.buf = self.buf, b""
        return out.decode()

    def cmd(self, line: str) -> str:
        self.sock.sendall(line.encode() + b"\n")
        return self._read_until(lambda b: reply_complete(b.decode(errors="replace")))

    def data(self, line: str) -> str:
        r = self.cmd(line)
        assert r.startswith("data:"), (line[:60], r)
        return r.split("\n", 1)[0][len("data:"):]

    def send(self, line: str) -> None:
        self.sock.sendall(line.encode() + b"\n")

    def readline(self, timeout: float = 20.0) -> str:
        self.sock.settimeout(timeout)
        try:
            return self._read_until(lambda b: b"\n" in b).rstrip("\n")
        finally:
            self.sock.settimeout(15)

    def read_notifications(self, want_id: str, timeout: float = 30.0) -> list[dict]:
        """Read monitor lines (carrying over partial data) until `want_id` shows up."""
        deadline = time.monotonic() + timeout
        seen: list[dict] = []
        pending = b""
        self.sock.settimeout(1.0)
        try:
            while time.monotonic() < deadline:
                try:
                    chunk = self.sock.recv(65536)
                except TimeoutError:
                    continue
                if not chunk:
                    raise ConnectionError("monitor closed")
                pending += chunk
                while b"\n" in pending:
                    line, pending = pending.split(b"\n", 1)
                    text = line.decode()
                    assert text.startswith("notification: ") or text.startswith("data:ok"), text
                    if text.startswith("notification: "):
                        j = json.loads(text[len("notification: "):])
                        seen.append(j)
                        if j["id"] == want_id:
                            return seen
        finally:
            self.sock.settimeout(15)
        raise AssertionError(f"{want_id} not seen; got {[s['id'] for s in seen]}")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class Plane:
    """A directory plus atserver processes, all under one tmp dir and one CA."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tls = root / "tls"
        ca.ensure_plane_tls(self.tls, ["127.0.0.1", "localhost"])
        self.cafile = self.tls / "ca.pem"
        self.dir_db = root / "directory.db"
        self.procs: list[subprocess.Popen] = []
        self.keys: dict[str, tuple[str, str]] = {}
        self.secrets: dict[str, str] = {}
        log = root / "directory.log"
        self.directory = self._spawn(
            [str(BIN / "atdirectory"), "serve", "--port", "0", "--host", "127.0.0.1",
             "--store", f"sqlite:///{self.dir_db}", "--tls-dir", str(self.tls)], log)
        m = _wait_line(log, r"atdirectory listening on ([\d.]+):(\d+)", proc=self.directory)
        self.root_addr = f"{m.group(1)}:{m.group(2)}"

    def _spawn(self, argv: list[str], log: Path) -> subprocess.Popen:
        fh = open(log, "ab")  # noqa: SIM115 - lives as long as the process
        p = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.procs.append(p)
        return p

    def add(self, name: str, atsign: str) -> None:
        secret = crypto.generate_cram_secret()
        self.secrets[atsign] = secret
        sf = self.root / f"{atsign[1:]}.secret"
        sf.write_text(secret)
        os.chmod(sf, 0o600)
        subprocess.run([str(BIN / "atserver"), "add", "--state-dir", str(self.root / name),
                        atsign, "--cram-secret-file", str(sf)], check=True, capture_output=True)

    def start(self, name: str, atsigns: list[str], extra: list[str] | None = None) -> dict:
        log = self.root / f"{name}.log"
        offset = log.stat().st_size if log.exists() else 0
        p = self._spawn([str(BIN / "atserver"), "--log-level", "DEBUG", "serve",
                         "--state-dir", str(self.root / name), "--tls-dir", str(self.tls),
                         "--root", self.root_addr, "--retry-max-ms", "1000",
                         *(extra or [])], log)
        ports = {}
        for at in atsigns:
            deadline = time.monotonic() + 30
            while True:
                text = log.read_text(errors="replace")[offset:] if log.exists() else ""
                m = re.search(rf"atserver {re.escape(at)} listening on [\d.]+:(\d+)", text)
                if m:
                    ports[at] = int(m.group(1))
                    break
                if p.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(text[-3000:])
                time.sleep(0.05)
            subprocess.run([str(BIN / "atdirectory"), "register", at, f"127.0.0.1:{ports[at]}",
                            "--store", f"sqlite:///{self.dir_db}"], check=True,
                           capture_output=True)
        return {"proc": p, "ports": ports}

    def client(self, port: int) -> Client:
        return Client(port, self.cafile)

    def activate(self, atsign: str, port: int) -> None:
        """CRAM, install a PKAM key, PKAM, publish an encryption public key."""
        c = self.client(port)
        ch = c.data(f"from:{atsign}")
        assert c.data("cram:" + crypto.cram_digest(self.secrets[atsign], ch)) == "success"
        pub, priv = crypto.generate_rsa_keypair()
        assert c.data(f"update:privatekey:at_pkam_publickey {pub}") == "-1"
        ch = c.data(f"from:{atsign}")
        assert c.data("pkam:" + crypto.sign(priv, ch)) == "success"
        enc_pub, enc_priv = crypto.generate_rsa_keypair()
        c.data(f"update:public:publickey{atsign} {enc_pub}")
        self.keys[atsign] = (pub, priv, enc_pub, enc_priv)
        c.close()

    def login(self, atsign: str, port: int) -> Client:
        c = self.client(port)
        ch = c.data(f"from:{atsign}")
        assert c.data("pkam:" + crypto.sign(self.keys[atsign][1], ch)) == "success"
        return c

    def stop_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


@pytest.fixture()
def plane(tmp_path):
    pl = Plane(tmp_path)
    yield pl
    pl.stop_all()


@pytest.fixture()
def two(plane):
    """@ann on process p1 and @ben on process p2, both activated."""
    plane.add("p1", "@ann")
    plane.add("p2", "@ben")
    s1 = plane.start("p1", ["@ann"])
    s2 = plane.start("p2", ["@ben"])
    plane.activate("@ann", s1["ports"]["@ann"])
    plane.activate("@ben", s2["ports"]["@ben"])
    return plane, s1, s2


def _wait_status(c: Client, nid: str, want: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        last = c.data(f"notify:status:{nid}")
        if last == want:
            return
        time.sleep(0.2)
    raise AssertionError(f"status of {nid} is {last}, wanted {want}")


def test_notify_reaches_monitor_on_other_process(two):
    plane, s1, s2 = two
    mon = plane.login("@ben", s2["ports"]["@ben"])
    mon.send("monitor:0")
    ann = plane.login("@ann", s1["ports"]["@ann"])
    nid = str(uuid.uuid4())
    r = ann.data(f"notify:id:{nid}:update:isEncrypted:true:ivNonce:AAAAAAAAAAAAAAAAAAAAAA==:"
                 f"@ben:msg.test@ann:hello")
    assert r == nid
    seen = mon.read_notifications(nid)
    n = seen[-1]
    assert n["from"] == "@ann" and n["to"] == "@ben" and n["key"] == "@ben:msg.test@ann"
    assert n["value"] == "hello" and n["metadata"]["ivNonce"] == "AAAAAAAAAAAAAAAAAAAAAA=="
    _wait_status(ann, nid, "delivered")
    # heartbeat on a monitor connection: reply without prompt
    mon.send("noop:0")
    assert mon.readline() == "data:ok"


def test_remote_lookup_and_plookup_across_processes(two):
    plane, s1, s2 = two
    ann = plane.login("@ann", s1["ports"]["@ann"])
    ben = plane.login("@ben", s2["ports"]["@ben"])
    ann.data("update:ttr:-1:@ben:phone.test@ann for-ben")
    ann.data("update:@carl:phone.test@ann for-carl")
    ann.data("update:public:site.test@ann public-value")
    assert ben.data("lookup:phone.test@ann") == "for-ben"
    allj = json.loads(ben.data("lookup:all:phone.test@ann"))
    assert allj["data"] == "for-ben"
    assert ben.data("plookup:site.test@ann") == "public-value"
    assert ben.data("plookup:publickey@ann") == plane_pub(ann, "@ann")
    r = ben.cmd("lookup:nothing.test@ann")
    assert r.startswith("error:AT0015"), r
    r = ben.cmd("lookup:x.test@nosuchatsign")
    assert r.startswith("error:AT0007") or r.startswith("error:AT0021"), r
    # shared-key update is pushed to ben's cache by autonotify (ttr set)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        r = ben.cmd("llookup:cached:@ben:phone.test@ann")
        if r.startswith("data:for-ben"):
            break
        time.sleep(0.2)
    assert r.startswith("data:for-ben"), r


def plane_pub(c: Client, atsign: str) -> str:
    return c.data(f"llookup:public:publickey{atsign}")


def test_notification_retried_until_recipient_is_up(two):
    plane, s1, s2 = two
    port_b = s2["ports"]["@ben"]
    s2["proc"].send_signal(signal.SIGTERM)
    s2["proc"].wait(10)
    ann = plane.login("@ann", s1["ports"]["@ann"])
    nid = str(uuid.uuid4())
    assert ann.data(f"notify:id:{nid}:update:@ben:later.test@ann:v1") == nid
    time.sleep(1.5)
    assert ann.data(f"notify:status:{nid}") in ("queued", "errored")
    s2b = plane.start("p2", ["@ben"])
    assert s2b["ports"]["@ben"] == port_b  # OS-chosen port persisted across restarts
    _wait_status(ann, nid, "delivered")
    mon = plane.login("@ben", port_b)
    mon.send("monitor:0")
    assert mon.read_notifications(nid)[-1]["value"] == "v1"


def test_kill9_loses_nothing_and_monitor_replays(two):
    plane, s1, s2 = two
    port_a, port_b = s1["ports"]["@ann"], s2["ports"]["@ben"]
    ann = plane.login("@ann", port_a)
    mon = plane.login("@ben", port_b)
    mon.send("monitor:0")
    first = str(uuid.uuid4())
    ann.data(f"notify:id:{first}:update:@ben:k9.test@ann:one")
    epoch = mon.read_notifications(first)[-1]["epochMillis"]
    mon.close()
    _wait_status(ann, first, "delivered")
    # recipient dies hard; sender keeps writing and queueing
    s2["proc"].send_signal(signal.SIGKILL)
    s2["proc"].wait(10)
    cids = [ann.data(f"update:k{i}.test@ann value{i}") for i in range(5)]
    queued = [str(uuid.uuid4()) for _ in range(3)]
    for i, nid in enumerate(queued):
        assert ann.data(f"notify:id:{nid}:update:@ben:k9.test@ann:q{i}") == nid
    # sender dies hard too, right after the acknowledgements
    s1["proc"].send_signal(signal.SIGKILL)
    s1["proc"].wait(10)
    s1b = plane.start("p1", ["@ann"])
    assert s1b["ports"]["@ann"] == port_a
    ann = plane.login("@ann", port_a)
    for i in range(5):
        assert ann.data(f"llookup:k{i}.test@ann") == f"value{i}"
    stats = json.loads(ann.cmd("stats:3").split("\n")[0][len("data: "):])
    assert int(stats[0]["value"]) >= int(cids[-1])
    plane.start("p2", ["@ben"])
    for nid in queued:
        _wait_status(ann, nid, "delivered")
    mon = plane.login("@ben", port_b)
    mon.send(f"monitor:{epoch}")
    seen = mon.read_notifications(queued[-1])
    ids = [s["id"] for s in seen if s["id"] != "-1"]
    assert first not in ids
    assert ids == queued
    assert [s["value"] for s in seen if s["id"] in queued] == ["q0", "q1", "q2"]


def test_bad_input_leaves_connection_and_server_alive(plane):
    plane.add("p1", "@ann")
    s1 = plane.start("p1", ["@ann"], ["--max-buffer", "100000"])
    port = s1["ports"]["@ann"]
    c = plane.client(port)
    assert c.cmd("bogus:thing").startswith("error:AT0003")
    assert c.cmd("llookup:x1@ann").startswith("error:AT0401")
    assert c.cmd("\x00\x01 garbage ::: @@@").startswith("error:AT0003")
    ch = c.data("from:@ann")
    assert c.cmd("cram:" + "0" * 128).startswith("error:AT0401")
    assert c.cmd("pkam:AAAA").startswith("error:AT0015")  # no PKAM key installed yet
    assert c.data("cram:" + crypto.cram_digest(plane.secrets["@ann"], ch)) == "success"
    assert c.cmd("update:public:bad,key@ann v").startswith("error:AT0016")
    c.sock.sendall(b"\xff\xfe\n")
    assert c._read_until(lambda b: b"\n" in b and b.endswith(b"@")).startswith("error:AT0003")
    assert c.data("noop:0") == "ok"
    # oversize before auth: error then close. Just over --max-unauth-line (8192): the server
    # must read every byte before it can refuse, so it never closes with our bytes unread
    # (that RST raced the error line: SSLEOFError in CI)
    big = plane.client(port)
    big.sock.sendall(b"x" * 8_300)
    r = big._read_until(lambda b: b"\n" in b)
    assert r.startswith("error:AT0005") and "--max-unauth-line" in r, r
    with pytest.raises((ConnectionError, OSError)):
        for _ in range(3):
            big.cmd("noop:0")
    # oversize once authenticated: the --max-buffer limit, named
    c.sock.sendall(b"update:public:big@ann " + b"x" * 100_500)
    r = c._read_until(lambda b: b"\n" in b)
    assert r.startswith("error:AT0005") and "--max-buffer" in r, r
    c = plane.client(port)
    ch = c.data("from:@ann")
    assert c.data("cram:" + crypto.cram_digest(plane.secrets["@ann"], ch)) == "success"
    # server and an authenticated connection survive
    assert c.data("noop:0") == "ok"
    assert plane.client(port).cmd("from:@ann").startswith("data:")


def test_admin_add_while_running_and_remove(plane):
    from noports.atserver import admin

    plane.add("p1", "@ann")
    plane.start("p1", ["@ann"])
    state = plane.root / "p1"
    admin.add_atsign(state, "@dora", "doras-secret", port=0)
    port = admin.wait_for_port(state, "@dora", timeout=10)
    assert admin.list_atsigns(state)["@dora"] == port
    c = plane.client(port)
    ch = c.data("from:@dora")
    assert c.data("cram:" + crypto.cram_digest("doras-secret", ch)) == "success"
    assert c.data("llookup:public:signing_publickey@dora")
    c.close()
    assert plane.client(port).data("lookup:signing_publickey@dora")
    assert admin.remove_atsign(state, "@dora")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            plane.client(port).close()
        except (OSError, ConnectionError):
            break
        time.sleep(0.1)
    else:
        raise AssertionError("port still open after remove")


def _write_atkeys(home: Path, atsign: str, keys: tuple[str, str, str, str]) -> None:
    pub, priv, enc_pub, enc_priv = keys
    self_key = crypto.generate_aes_key()
    d = home / ".atsign" / "keys"
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{atsign}_key.atKeys").write_text(json.dumps({
        "selfEncryptionKey": self_key,
        "aesPkamPublicKey": crypto.aes_encrypt(self_key, pub),
        "aesPkamPrivateKey": crypto.aes_encrypt(self_key, priv),
        "aesEncryptPublicKey": crypto.aes_encrypt(self_key, enc_pub),
        "aesEncryptPrivateKey": crypto.aes_encrypt(self_key, enc_priv),
    }))


def test_python_sdk_end_to_end_across_processes(two, tmp_path):
    """The unmodified at_client SDK: put/get of public/self/shared keys, notify + monitor."""
    plane, _s1, _s2 = two
    scenario = Path(__file__).with_name("sdk_scenario.py")
    if not scenario.exists():
        pytest.skip("sdk_scenario.py not present")
    home = tmp_path / "home"
    for at in ("@ann", "@ben"):
        _write_atkeys(home, at, plane.keys[at])
    host, port = plane.root_addr.rsplit(":", 1)
    env = {**os.environ, "HOME": str(home), "SSL_CERT_FILE": str(plane.cafile)}
    r = subprocess.run([sys.executable, str(scenario), host, port, "@ann", "@ben"],
                       capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    assert lines, f"no result: {r.stdout[-2000:]} {r.stderr[-3000:]}"
    out = json.loads(lines[-1])
    assert out["pkam"] is True
    assert out["public"] == "public value"
    assert out["self"] == "self value"
    assert out["shared_by_me"] == "shared value"
    assert out["shared_by_other"] == "shared value"
    assert out["public_remote"] == "public value"
    # The first decrypted update may be the autonotify of the shared key itself (its value
    # is the ciphertext of "shared value"), exactly as with the reference server.
    assert out["decrypted"] in (out["expected"], "shared value"), out
    assert out["received_from"] == "@ann"
    assert "MONITOR_EXCEPTION" not in out["events"], out


def test_remove_and_readd_within_one_poll_serves_the_new_atsign(plane):
    """A remove + add faster than the hosted-table poll must not leave the old listener."""
    from noports.atserver import admin

    plane.add("p1", "@ann")
    plane.start("p1", ["@ann"])
    state = plane.root / "p1"
    admin.add_atsign(state, "@eve", "first-secret", port=0)
    admin.wait_for_port(state, "@eve", timeout=10)
    assert admin.remove_atsign(state, "@eve")
    admin.add_atsign(state, "@eve", "second-secret", port=0)   # same poll interval
    port = admin.wait_for_port(state, "@eve", timeout=10)
    c = plane.client(port)
    ch = c.data("from:@eve")
    assert c.data("cram:" + crypto.cram_digest("second-secret", ch)) == "success"
    c.close()
