"""Start the real control-plane programs as subprocesses (tests, benches, the demo).

Nothing here is a mock: `atdirectory` and `atserver` are the installed console scripts, over
real TLS on loopback. Each helper waits for the program's own "listening on" line on stderr,
so tests never sleep-and-hope.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from noports import crypto
from noports.keys.atkeys import AtKeys
from noports.keys.ca import TlsFiles, client_context, ensure_plane_tls
from noports.keys.onboarding import activate

BIN = Path(sys.executable).parent
# the official demo .atKeys files, vendored (tests/fixtures/official-demo-atkeys/README.md)
DEMO_ATKEYS = Path(__file__).resolve().parents[1] / "fixtures" / "official-demo-atkeys"


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel just handed out (ephemeral range): for a listener started right away."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def unused_port(low: int = 20000, high: int = 32000) -> int:
    """A free loopback port below the kernel's ephemeral range (32768+ by default), so no
    outgoing connection takes it between now and when a daemon binds it much later."""
    for _attempt in range(200):  # bounded
        port = random.randrange(low, high)
        with socket.socket() as s, contextlib.suppress(OSError):
            s.bind(("127.0.0.1", port))
            return port
    raise RuntimeError(f"no free port on 127.0.0.1 between {low} and {high}")


def cmdlines() -> Iterator[tuple[int, bytes]]:
    """(pid, NUL-separated command line) of every process we can read, from /proc."""
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                yield int(p.name), (p / "cmdline").read_bytes()
            except OSError:
                continue


def tool(name: str) -> str:
    path = BIN / name
    return str(path) if path.exists() else shutil.which(name) or name


@dataclass
class Proc:
    """A running program plus everything it wrote to stderr (kept for failure messages)."""

    popen: subprocess.Popen
    lines: list[str] = field(default_factory=list)
    _cond: threading.Condition = field(default_factory=threading.Condition)

    def start_reader(self) -> None:
        def pump() -> None:
            assert self.popen.stderr is not None
            for raw in self.popen.stderr:
                with self._cond:
                    self.lines.append(raw.rstrip("\n"))
                    self._cond.notify_all()
            with self._cond:
                self._cond.notify_all()
        threading.Thread(target=pump, daemon=True).start()

    def wait_for(self, pattern: str, timeout: float = 20.0, start: int = 0) -> re.Match:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            seen = start
            while True:
                for line in self.lines[seen:]:
                    m = rx.search(line)
                    if m:
                        return m
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0 or self.popen.poll() is not None and seen == len(self.lines):
                    raise AssertionError(
                        f"no line matching {pattern!r}; exit={self.popen.poll()} stderr:\n"
                        + "\n".join(self.lines[-40:]))
                self._cond.wait(min(left, 0.2))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        return self.popen.returncode

    def kill9(self) -> None:
        self.stop(signal.SIGKILL)


def spawn(args: list[str], env: dict[str, str] | None = None) -> Proc:
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    p = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, env=full_env)
    proc = Proc(p)
    proc.start_reader()
    return proc


@dataclass
class Directory:
    proc: Proc
    host: str
    port: int
    store: str


@dataclass
class AtServer:
    proc: Proc
    state_dir: Path
    ports: dict[str, int]


class Plane:
    """A self-hosted plane in a temp dir: one directory, any number of atserver processes,
    and the atSigns it activated (keys saved under ``keys_dir``, 0600).

    ``spawner`` starts the two ``serve`` programs (``topology.NsPlane`` runs them inside the
    relay namespace); registration and ``atserver add`` write files from this process."""

    def __init__(self, base: Path, host: str = "127.0.0.1", *, keys_dir: Path | None = None,
                 spawner: Callable[[list[str]], Proc] | None = None) -> None:
        self.base = base
        self.host = host
        self.tls: TlsFiles = ensure_plane_tls(base / "tls", [host, "localhost", "127.0.0.1"])
        self.store = f"sqlite:///{base / 'directory.db'}"
        self.directory: Directory | None = None
        self.servers: list[AtServer] = []
        self.keys_dir = keys_dir or base / "keys"
        self.keys: dict[str, AtKeys] = {}
        # the operator's side of each atSign's one-time CRAM secret: tests assert it reaches
        # no device (enrollment) and no output
        self.cram_secrets: dict[str, str] = {}
        self.spawner = spawner or spawn

    # -- directory -------------------------------------------------------------------------
    def start_directory(self, store: str | None = None) -> Directory:
        store = store or self.store
        proc = self.spawner([tool("atdirectory"), "serve", "--host", self.host, "--port", "0",
                      "--store", store, "--tls-dir", str(self.tls.directory)])
        m = proc.wait_for(r"atdirectory listening on (\S+):(\d+)")
        self.directory = Directory(proc, m.group(1), int(m.group(2)), store)
        return self.directory

    @property
    def root(self) -> str:
        assert self.directory is not None
        return f"{self.directory.host}:{self.directory.port}"

    def register(self, atsign: str, port: int) -> None:
        run([tool("atdirectory"), "register", atsign, f"{self.host}:{port}",
             "--store", self.store])

    # -- atservers -------------------------------------------------------------------------
    def start_atserver(self, name: str, atsigns: dict[str, str] | None = None,
                       restart_of: AtServer | None = None) -> AtServer:
        """Start (or restart) an atserver process; `atsigns` maps atSign -> CRAM secret."""
        state = restart_of.state_dir if restart_of else self.base / name
        state.mkdir(parents=True, exist_ok=True)
        for atsign, secret in (atsigns or {}).items():
            secret_file = state / f".cram-{secrets.token_hex(4)}"
            fd = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(secret)
            run([tool("atserver"), "add", atsign, "--state-dir", str(state),
                 "--cram-secret-file", str(secret_file)])
            secret_file.unlink()
        proc = self.spawner([tool("atserver"), "serve", "--state-dir", str(state),
                             "--tls-dir", str(self.tls.directory), "--root", self.root,
                             "--host", self.host])
        expected = set(atsigns or {}) | set(restart_of.ports if restart_of else {})
        ports: dict[str, int] = {}
        deadline = time.monotonic() + 20
        while set(ports) < {a.lower() for a in expected} and time.monotonic() < deadline:
            for line in list(proc.lines):
                m = re.search(r"atserver (\S+) listening on (\S+):(\d+)", line)
                if m:
                    ports[m.group(1).lower()] = int(m.group(3))
            if proc.popen.poll() is not None:
                break
            time.sleep(0.05)
        missing = {a.lower() for a in expected} - set(ports)
        assert not missing, f"atserver did not listen for {missing}:\n" + "\n".join(proc.lines)
        for atsign, port in ports.items():
            self.register(atsign, port)
        server = AtServer(proc, state, ports)
        if restart_of in self.servers:
            self.servers.remove(restart_of)
        self.servers.append(server)
        return server

    # -- atSigns -------------------------------------------------------------------------------
    @property
    def root_tuple(self) -> tuple[str, int]:
        assert self.directory is not None
        return self.directory.host, self.directory.port

    def ssl_context(self) -> ssl.SSLContext:
        return client_context(self.tls.ca_cert)

    def keys_file(self, atsign: str) -> Path:
        return self.keys_dir / f"{atsign if atsign.startswith('@') else '@' + atsign}_key.atKeys"

    def activate(self, atsign: str, secret: str) -> AtKeys:
        """Onboard ``atsign`` with its CRAM secret, as a client would; keys in ``keys_dir``."""
        self.keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        keys = activate(atsign, secret, self.root_tuple, self.ssl_context(),
                        keys_path=self.keys_file(atsign))
        self.keys[keys.atsign] = keys
        return keys

    def populate(self, servers: dict[str, list[str]], *, workers: int = 1) -> dict[str, AtKeys]:
        """The directory (if not running yet), one atserver per entry (name -> atSigns, each
        with a fresh CRAM secret), then every atSign activated. Returns ``self.keys``."""
        if self.directory is None:
            self.start_directory()
        cram: dict[str, str] = {}
        for name, atsigns in servers.items():
            mine = {a: crypto.generate_cram_secret() for a in atsigns}
            cram.update(mine)
            self.cram_secrets.update(mine)
            self.start_atserver(name, mine)
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda a: self.activate(a, cram[a]), list(cram)))
        return self.keys

    def stop(self) -> None:
        for s in self.servers:
            s.proc.stop()
        if self.directory:
            self.directory.proc.stop()

    def client_env(self, home: Path) -> dict[str, str]:
        """Environment for an SDK process: its HOME (keys dir) and our CA as trust store."""
        return {**os.environ, "HOME": str(home), "SSL_CERT_FILE": str(self.tls.ca_cert)}


def run(args: list[str], **kw) -> subprocess.CompletedProcess:
    res = subprocess.run(args, capture_output=True, text=True, timeout=60, **kw)
    if res.returncode != 0:
        raise AssertionError(f"{args!r} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res
