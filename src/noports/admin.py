"""`noports`: the one admin entry point of a self-hosted control plane.

    noports plane init   --dir D [--host H] [--directory-port P] [--store SPEC] [--name N]...
    noports plane up     --dir D          (foreground; Ctrl-C / SIGTERM stops both servers)
    noports plane status --dir D
    noports atsign create @alice --dir D [--keys-dir DIR] [--port N] [--force]
    noports atsign create @dev --dir D --cram-secret-out FILE     (provision only, then:)
    noports atsign activate @dev --root HOST:PORT --ca ca.pem --cram-secret-file FILE
    noports atsign import FILE.atKeys --dir D [--atsign @x] [--keys-dir DIR] [--force]
    noports atsign list   --dir D
    noports atsign remove @alice --dir D
    noports enroll otp @fleet --root HOST:PORT --ca ca.pem [--keys F] [--ttl S]   (operator)
    noports enroll request @fleet --root HOST:PORT --ca ca.pem --otp-file - --device NAME
    noports enroll list|approve|deny|revoke @fleet [ID] --root HOST:PORT --ca ca.pem

Why one tool: creating an atSign touches three things that must agree (the atserver's hosted
table, the directory entry, the keys file); doing it in one command with roll-back keeps them
consistent. Expected failures print one line and exit 2; secrets (CRAM secrets, private keys)
never appear in argv, output or logs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import unicodedata
import urllib.parse
from collections.abc import Sequence
from pathlib import Path

from noports.cliargs import arg_type, pid_alive, port_type
from noports.keys import enroll_cli
from noports.keys.atkeys import (
    AtKeys,
    AtKeysError,
    default_keys_dir,
    keys_file_name,
    load_atkeys,
    normalise_atsign,
    save_atkeys,
)
from noports.keys.plane import DEFAULT_DIRECTORY_PORT, PlaneConfig, PlaneError, init_plane

log = logging.getLogger("noports.admin")

PROG = "noports"
EXIT_ERROR = 2
PLANE_DIR_ENV = "NOPORTS_PLANE_DIR"


class AdminError(Exception):
    """An expected failure: printed as one line (what is wrong, what to check), exit 2."""


# --- argument parsing ---------------------------------------------------------------------

_port = port_type("port out of range 0-65535: {value}")
_positive = arg_type(float, "a number", lambda v: math.isfinite(v) and v > 0,
                     "must be a finite number > 0: {text!r}")


def _add_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", type=Path, default=None, metavar="D",
                   help=f"plane directory (default: ${PLANE_DIR_ENV})")
    _add_common(p, argparse.SUPPRESS)


def _add_common(p: argparse.ArgumentParser, default: object) -> None:
    """-q/--debug work before or after the subcommand (SUPPRESS keeps the top-level value)."""
    p.add_argument("-q", "--quiet", action="store_true", default=default,
                   help="only print errors")
    p.add_argument("--debug", action="store_true", default=default,
                   help="debug logging and full tracebacks on unexpected errors")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Administer a self-hosted atProtocol control plane (atDirectory + "
                    "atServer) and its atSigns.",
        epilog="Clients trust the plane's CA with: export SSL_CERT_FILE=<D>/tls/ca.pem")
    _add_common(parser, False)
    top = parser.add_subparsers(dest="group", metavar="{plane,atsign,enroll}")
    top.required = True

    plane = top.add_parser("plane", help="create, run and inspect a plane",
                           description="Create, run and inspect a self-hosted plane.")
    psub = plane.add_subparsers(dest="command", metavar="{init,up,status}")
    psub.required = True

    p = psub.add_parser(
        "init", help="create the CA, server certificate and plane.json",
        description="Create a plane directory: a CA and server certificate (tls/), the "
                    "directory store location and the atserver state directory. Idempotent: "
                    "re-running with the same options keeps the CA.")
    _add_dir(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="name/IP clients use to reach the plane; advertised in the directory "
                        "and put in the certificate (default: 127.0.0.1)")
    p.add_argument("--directory-port", type=_port, default=DEFAULT_DIRECTORY_PORT, metavar="P",
                   help=f"atDirectory port (default: {DEFAULT_DIRECTORY_PORT}; the public "
                        "atPlatform uses 64)")
    p.add_argument("--store", default=None, metavar="SPEC",
                   help="directory store: sqlite:///ABS/PATH.db or redis://HOST:PORT/DB "
                        "(default: sqlite:///D/directory.db)")
    p.add_argument("--store-password-file", default=None, metavar="FILE", type=Path,
                   help="file holding the Redis password; it is kept in D/redis.password "
                        "(0600), never in plane.json or a command line")
    p.add_argument("--name", action="append", default=[], metavar="EXTRA",
                   help="extra DNS name or IP for the server certificate (repeatable)")
    p.add_argument("--bind", default=None, metavar="ADDR",
                   help="address the servers listen on (default: --host if it is an IP, "
                        "else 0.0.0.0)")
    p.add_argument("--force", action="store_true",
                   help="change the settings of an already initialised plane (the CA is kept)")

    p = psub.add_parser(
        "up", help="run atdirectory and atserver in the foreground",
        description="Start atdirectory and atserver as child processes with the plane's "
                    "configuration, wait until both listen, print their addresses and stay in "
                    "the foreground. SIGINT/SIGTERM stops both.")
    _add_dir(p)
    p.add_argument("--timeout", type=_positive, default=30.0, metavar="S",
                   help="seconds to wait for the servers to listen (default: 30)")

    p = psub.add_parser("status", help="show configuration and whether the servers answer",
                        description="Show the plane's configuration, whether `plane up` is "
                                    "running and whether the directory and each atSign's "
                                    "port answer. Exit 0 when everything answers, 1 if not.")
    _add_dir(p)
    p.add_argument("--json", action="store_true", help="print JSON")

    atsign = top.add_parser("atsign", help="create, import, list and remove atSigns",
                            description="Manage the atSigns hosted by a plane.")
    asub = atsign.add_subparsers(dest="command",
                                 metavar="{create,activate,import,list,remove}")
    asub.required = True

    keys_help = "where .atKeys files go (default: ~/.atsign/keys, where the SDKs look)"
    p = asub.add_parser(
        "create", help="host a new atSign, activate it and write its .atKeys",
        description="Host a new atSign on the running plane: generate a one-time CRAM "
                    "secret, add the atSign to the atserver, register it in the directory, "
                    "then activate it over the network (CRAM, install PKAM key, PKAM, publish "
                    "encryption key, delete the CRAM secret) and write its .atKeys (0600). "
                    "The plane must be up.")
    p.add_argument("atsign", metavar="@ATSIGN")
    _add_dir(p)
    p.add_argument("--keys-dir", type=Path, default=None, metavar="DIR", help=keys_help)
    p.add_argument("--port", type=_port, default=0,
                   help="atserver port for this atSign (default: 0 = any free port)")
    p.add_argument("--force", action="store_true",
                   help="overwrite an existing .atKeys file for this atSign")
    p.add_argument("--cram-secret-out", type=Path, default=None, metavar="FILE",
                   help="provision only: write the one-time CRAM secret to FILE (0600) and "
                        "stop; activate on the device with `noports atsign activate`")
    p.add_argument("--timeout", type=_positive, default=30.0, metavar="S",
                   help="seconds to wait for the atserver and for replies (default: 30)")

    p = asub.add_parser(
        "activate", help="activate a provisioned atSign from this host (no plane dir needed)",
        description="Activate an atSign that `noports atsign create --cram-secret-out` "
                    "provisioned, from the host that will use it, so its private keys are "
                    "generated here and never leave it. Needs only the directory address, "
                    "the plane CA and the one-time CRAM secret.")
    p.add_argument("atsign", metavar="@ATSIGN")
    p.add_argument("--root", type=_hostport, required=True, metavar="HOST:PORT",
                   help="the plane's atDirectory")
    p.add_argument("--cram-secret-file", type=Path, required=True, metavar="FILE",
                   help="file holding the one-time CRAM secret ('-' = stdin)")
    p.add_argument("--ca", type=Path, default=None, metavar="FILE",
                   help="CA certificate to trust (default: $SSL_CERT_FILE / system store)")
    p.add_argument("--keys-file", type=Path, default=None, metavar="FILE.atKeys",
                   help="install these existing keys instead of generating new ones")
    p.add_argument("--keys-dir", type=Path, default=None, metavar="DIR", help=keys_help)
    p.add_argument("--no-copy", action="store_true",
                   help="with --keys-file: do not copy the file to --keys-dir")
    p.add_argument("--force", action="store_true",
                   help="overwrite an existing .atKeys file for this atSign")
    p.add_argument("--timeout", type=_positive, default=30.0, metavar="S",
                   help="seconds to wait for replies (default: 30)")
    _add_common(p, argparse.SUPPRESS)

    p = asub.add_parser(
        "import", help="host an existing atSign using its .atKeys file",
        description="Host an atSign whose keys already exist (e.g. official .atKeys files): "
                    "same as create, but installs the file's public keys. Only public keys "
                    "are sent. A copy of the file is written to --keys-dir unless one with "
                    "the same keys is there.")
    p.add_argument("file", type=Path, metavar="FILE.atKeys")
    _add_dir(p)
    p.add_argument("--atsign", default=None, metavar="@ATSIGN",
                   help="atSign to host the keys as (default: from the file / its name)")
    p.add_argument("--keys-dir", type=Path, default=None, metavar="DIR", help=keys_help)
    p.add_argument("--no-copy", action="store_true", help="do not copy the file to --keys-dir")
    p.add_argument("--port", type=_port, default=0,
                   help="atserver port for this atSign (default: 0 = any free port)")
    p.add_argument("--force", action="store_true",
                   help="overwrite a different .atKeys file for this atSign in --keys-dir")
    p.add_argument("--timeout", type=_positive, default=30.0, metavar="S",
                   help="seconds to wait for the atserver and for replies (default: 30)")

    p = asub.add_parser("list", help="list hosted atSigns, ports and directory entries",
                        description="List the atSigns the plane hosts with their atserver port "
                                    "and directory entry.")
    _add_dir(p)
    p.add_argument("--json", action="store_true", help="print JSON")

    enroll_cli.add_parser(top, _add_common)

    p = asub.add_parser("remove", help="stop hosting an atSign",
                        description="Stop hosting an atSign: remove it (and its data) from the "
                                    "atserver and its directory entry. Its .atKeys file is "
                                    "left alone.")
    p.add_argument("atsign", metavar="@ATSIGN")
    _add_dir(p)
    return parser


# --- helpers ------------------------------------------------------------------------------

def _plane(args: argparse.Namespace) -> PlaneConfig:
    d = args.dir or (Path(os.environ[PLANE_DIR_ENV]) if os.environ.get(PLANE_DIR_ENV) else None)
    if d is None:
        raise AdminError(f"no plane directory: pass --dir D (or set ${PLANE_DIR_ENV})")
    cfg = PlaneConfig.load(d)
    if not cfg.tls.exists():
        raise AdminError(f"TLS material missing in {cfg.tls.directory}: re-run "
                         f"`noports plane init --dir {cfg.directory}`")
    return cfg


def _atsign(text: str) -> str:
    try:
        return normalise_atsign(text)
    except AtKeysError as exc:
        raise AdminError(str(exc)) from None


def _atserver_admin():  # noqa: ANN202 - module
    try:
        from noports.atserver import admin
    except ImportError as exc:
        raise AdminError(f"the atserver package is not usable: {exc}") from None
    return admin


def _open_store(cfg: PlaneConfig):  # noqa: ANN202 - DirectoryStore protocol
    try:
        from noports.directory.store import open_store
    except ImportError as exc:
        raise AdminError(f"the directory package is not usable: {exc}") from None
    try:
        return open_store(cfg.store_spec, password=cfg.store_password)
    except Exception as exc:  # the store's own errors are one-line and name the spec
        raise AdminError(f"cannot open the directory store: {exc}") from None


def _ssl_ctx(cfg: PlaneConfig) -> ssl.SSLContext:
    from noports.keys.ca import client_context
    return client_context(cfg.ca_file)


def _probe(host: str, port: int, ctx: ssl.SSLContext | None, timeout: float = 3.0) -> str | None:
    """None if a TLS server answers with the '@' prompt at host:port, else why not."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            if ctx is None:
                return None
            with ctx.wrap_socket(raw, server_hostname=host) as s:
                s.settimeout(timeout)
                first = s.recv(1)
                return None if first == b"@" else f"unexpected greeting {first!r}"
    except ssl.SSLCertVerificationError as exc:
        return f"certificate not trusted ({exc.verify_message})"
    except OSError as exc:
        return exc.strerror or str(exc) or type(exc).__name__


def _require_directory_up(cfg: PlaneConfig) -> None:
    why = _probe(cfg.host, cfg.directory_port, _ssl_ctx(cfg))
    if why:
        raise AdminError(f"the plane's directory at {cfg.root_address} does not answer ({why}); "
                         f"is `noports plane up --dir {cfg.directory}` running?")


def _keys_path(args: argparse.Namespace, atsign: str) -> Path:
    return (args.keys_dir or default_keys_dir()).expanduser() / keys_file_name(atsign)


def _out(args: argparse.Namespace, text: str) -> None:
    if not getattr(args, "quiet", False):
        print(text, flush=True)


# --- plane --------------------------------------------------------------------------------

def cmd_plane_init(args: argparse.Namespace) -> int:
    d = args.dir or (Path(os.environ[PLANE_DIR_ENV]) if os.environ.get(PLANE_DIR_ENV) else None)
    if d is None:
        raise AdminError(f"no plane directory: pass --dir D (or set ${PLANE_DIR_ENV})")
    store = args.store
    if args.store_password_file is not None:
        if not store or not store.startswith(("redis://", "rediss://")):
            raise AdminError("--store-password-file goes with --store redis://HOST:PORT/DB")
        try:
            password = args.store_password_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise AdminError(f"cannot read {args.store_password_file}: {exc.strerror}") from None
        scheme, rest = store.split("://", 1)
        store = f"{scheme}://:{urllib.parse.quote(password, safe='')}@{rest}"
    cfg = init_plane(d, host=args.host, directory_port=args.directory_port,
                     store_spec=store, extra_names=args.name, directory_bind=args.bind,
                     atserver_bind=args.bind, force=args.force)
    _out(args, f"plane initialised in {cfg.directory}\n"
               f"  directory: {cfg.root_address} (store {_redact(cfg.store_spec)})\n"
               f"  CA certificate: {cfg.ca_file}\n"
               f"  certificate names: {', '.join(cfg.tls_names)}\n"
               f"clients trust the plane with:\n"
               f"  export SSL_CERT_FILE={cfg.ca_file}\n"
               f"next: noports plane up --dir {cfg.directory}")
    return 0


def _redact(spec: str) -> str:
    """Hide a password in a redis:// spec."""
    if "://" in spec and "@" in spec.split("://", 1)[1]:
        scheme, rest = spec.split("://", 1)
        return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
    return spec


def _tool(name: str) -> list[str]:
    """The installed console script next to our interpreter, else run its module."""
    path = Path(sys.executable).parent / name
    if path.exists():
        return [str(path)]
    found = shutil.which(name)
    if found:
        return [found]
    module = {"atdirectory": "noports.directory.cli", "atserver": "noports.atserver.cli"}[name]
    return [sys.executable, "-c", f"import sys; from {module} import main; sys.exit(main())"]


def _stderr_fd() -> int:
    """Children's stdout goes to our stderr (stdout is for results); DEVNULL if we have none."""
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return subprocess.DEVNULL


class _Child:
    """A server child process whose stderr we forward and scan for 'listening' lines."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.name = name
        self.lines: list[str] = []
        self.cond = threading.Condition()
        try:
            self.popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=_stderr_fd(),
                                          stderr=subprocess.PIPE, text=True, errors="replace",
                                          env={**os.environ, "PYTHONUNBUFFERED": "1",
                                               **(env or {})})
        except OSError as exc:
            raise AdminError(f"cannot start {name} ({argv[0]}): {exc.strerror or exc}") from None
        threading.Thread(target=self._pump, daemon=True, name=f"{name}-stderr").start()

    def _pump(self) -> None:
        assert self.popen.stderr is not None
        for raw in self.popen.stderr:
            line = raw.rstrip("\n")
            sys.stderr.write(f"[{self.name}] {line}\n")
            sys.stderr.flush()
            with self.cond:
                self.lines.append(line)
                self.cond.notify_all()
        with self.cond:
            self.cond.notify_all()

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)


def _listening(lines: list[str], prefix: str) -> dict[str, tuple[str, int]]:
    """Parse '<prefix> [@x] listening on HOST:PORT' lines: key '' for the directory."""
    found: dict[str, tuple[str, int]] = {}
    for line in lines:
        idx = line.find(prefix + " ")
        if idx < 0 or " listening on " not in line:
            continue
        head, _sep, addr = line[idx + len(prefix) + 1:].partition("listening on ")
        host, _sep, port = addr.strip().split()[0].rpartition(":") if addr.strip() else ("", "", "")
        if port.isdigit():
            found[head.strip().lower()] = (host, int(port))
    return found


def _wait_listening(child: _Child, prefix: str, want: set[str], deadline: float,
                    settle: float = 0.0) -> dict[str, tuple[str, int]]:
    """Wait until `child` reported listening for every key in `want` (or settle if empty)."""
    started = time.monotonic()
    with child.cond:
        while True:
            found = _listening(child.lines, prefix)
            if want <= set(found) and (want or time.monotonic() - started >= settle):
                return found
            if not child.alive():
                tail = "; ".join(child.lines[-3:]) or "no output"
                raise AdminError(f"{child.name} exited with status {child.popen.returncode} "
                                 f"before listening: {tail}")
            left = deadline - time.monotonic()
            if left <= 0:
                missing = ", ".join(sorted(want - set(found))) or "its listening line"
                raise AdminError(f"{child.name} did not start listening in time (waiting for "
                                 f"{missing}); see its messages above")
            child.cond.wait(min(left, 0.2))


def cmd_plane_up(args: argparse.Namespace) -> int:
    cfg = _plane(args)
    state = cfg.read_run_state()
    if state and pid_alive(state.get("pid")):
        raise AdminError(f"the plane in {cfg.directory} is already up (pid {state['pid']}); "
                         "stop it first")
    admin = _atserver_admin()
    hosted = admin.list_atsigns(cfg.state_dir)
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s: stopping", signal.Signals(signum).name)
        stop.set()

    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    children: list[_Child] = []
    try:
        deadline = time.monotonic() + args.timeout
        directory = _Child("atdirectory", [
            *_tool("atdirectory"), "serve", "--host", cfg.directory_bind,
            "--port", str(cfg.directory_port), "--store", cfg.store_spec,
            "--tls-dir", str(cfg.tls.directory)],
            env={"NOPORTS_REDIS_PASSWORD": cfg.store_password} if cfg.store_password else None)
        children.append(directory)
        dir_addr = _wait_listening(directory, "atdirectory", {""}, deadline)[""]
        server = _Child("atserver", [
            *_tool("atserver"), "serve", "--state-dir", str(cfg.state_dir),
            "--tls-dir", str(cfg.tls.directory), "--root", cfg.root_address,
            "--host", cfg.atserver_bind, "--public-host", cfg.host])
        children.append(server)
        ports = _wait_listening(server, "atserver", set(hosted), deadline, settle=1.0)
        _sync_directory(cfg, {a: p for a, (_h, p) in ports.items() if a})
        cfg.run_path.write_text(json.dumps({
            "pid": os.getpid(), "atdirectory_pid": directory.popen.pid,
            "atserver_pid": server.popen.pid, "directory": f"{dir_addr[0]}:{dir_addr[1]}",
            "started": time.time()}) + "\n", encoding="utf-8")
        _out(args, f"plane up in {cfg.directory}\n"
                   f"  directory: {cfg.root_address} (listening on {dir_addr[0]}:{dir_addr[1]})")
        for atsign, (host, port) in sorted(ports.items()):
            if atsign:
                _out(args, f"  atserver {atsign}: {cfg.host}:{port} (listening on {host}:{port})")
        _out(args, f"  trust: export SSL_CERT_FILE={cfg.ca_file}\n"
                   "press Ctrl-C to stop")
        while not stop.wait(0.5):
            for child in children:
                if not child.alive():
                    raise AdminError(f"{child.name} exited unexpectedly with status "
                                     f"{child.popen.returncode}; stopping the plane")
        return 0
    finally:
        for child in reversed(children):
            child.stop()
        with contextlib.suppress(FileNotFoundError):
            cfg.run_path.unlink()
        for s, h in old_handlers.items():
            signal.signal(s, h)
        if children:
            log.info("plane stopped")


def _sync_directory(cfg: PlaneConfig, ports: dict[str, int]) -> None:
    """Make the directory point at the ports the atserver actually listens on."""
    if not ports:
        return
    store = _open_store(cfg)
    try:
        for atsign, port in ports.items():
            want = f"{cfg.host}:{port}"
            if store.get(atsign) != want:
                store.set(atsign, want)
                log.info("directory: %s -> %s", atsign, want)
    finally:
        store.close()


def cmd_plane_status(args: argparse.Namespace) -> int:
    cfg = _plane(args)
    ctx = _ssl_ctx(cfg)
    run = cfg.read_run_state()
    running = bool(run and pid_alive(run.get("pid")))
    dir_problem = _probe(cfg.host, cfg.directory_port, ctx)
    admin = _atserver_admin()
    hosted = admin.list_atsigns(cfg.state_dir)
    entries = _directory_entries(cfg)
    atsigns = {}
    for atsign, port in hosted.items():
        problem = _probe(cfg.host, port, ctx) if port else "no port yet"
        atsigns[atsign] = {"port": port, "directory": entries.get(atsign),
                           "answers": problem is None, "problem": problem}
    report = {"dir": str(cfg.directory), "host": cfg.host, "directory": cfg.root_address,
              "store": _redact(cfg.store_spec), "ca": str(cfg.ca_file), "up": running,
              "pid": run.get("pid") if running and run else None,
              "directory_answers": dir_problem is None, "directory_problem": dir_problem,
              "atsigns": atsigns}
    healthy = dir_problem is None and all(a["answers"] for a in atsigns.values())
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
        return 0 if healthy else 1
    print(f"plane {cfg.directory}")
    up = f"yes (pid {report['pid']})" if running else "no"
    print(f"  plane up: {up}")
    print(f"  directory {cfg.root_address}: "
          f"{'answers' if dir_problem is None else 'not answering (' + dir_problem + ')'}")
    print(f"  store: {report['store']}")
    print(f"  CA: {cfg.ca_file}  (export SSL_CERT_FILE={cfg.ca_file})")
    if not atsigns:
        print("  atSigns: none (noports atsign create @name --dir ...)")
    for atsign, info in sorted(atsigns.items()):
        state = "answers" if info["answers"] else f"not answering ({info['problem']})"
        print(f"  {atsign}: port {info['port'] or '-'}, directory {info['directory'] or '-'}, "
              f"{state}")
    return 0 if healthy else 1


def _directory_entries(cfg: PlaneConfig) -> dict[str, str]:
    store = _open_store(cfg)
    try:
        return {("@" + k.lstrip("@")).lower(): v for k, v in store.list().items()}
    finally:
        store.close()


# --- atsign -------------------------------------------------------------------------------

def _rollback(cfg: PlaneConfig, atsign: str) -> None:
    """Undo a provisioning: atserver entry (and its data) and directory entry."""
    log.info("%s: rolling back", atsign)
    with contextlib.suppress(Exception):
        _atserver_admin().remove_atsign(cfg.state_dir, atsign)
    with contextlib.suppress(Exception):
        store = _open_store(cfg)
        try:
            store.delete(atsign)
        finally:
            store.close()


def _provision(args: argparse.Namespace, cfg: PlaneConfig, atsign: str) -> tuple[str, int]:
    """Host `atsign` on the running plane with a fresh CRAM secret; return (secret, port)."""
    from noports import crypto

    admin = _atserver_admin()
    if atsign in admin.list_atsigns(cfg.state_dir):
        raise AdminError(f"{atsign} already exists on this plane; remove it first with "
                         f"`noports atsign remove {atsign} --dir {cfg.directory}`")
    _require_directory_up(cfg)
    secret = crypto.generate_cram_secret()
    try:
        admin.add_atsign(cfg.state_dir, atsign, secret, port=args.port)
    except ValueError as exc:
        raise AdminError(f"cannot add {atsign} to the atserver: {exc}") from None
    try:
        try:
            port = admin.wait_for_port(cfg.state_dir, atsign, timeout=args.timeout)
        except TimeoutError:
            raise AdminError(f"no atserver picked up {atsign} within {args.timeout:g}s; is "
                             f"`noports plane up --dir {cfg.directory}` running?") from None
        log.info("%s: atserver listens on port %d", atsign, port)
        store = _open_store(cfg)
        try:
            store.set(atsign, f"{cfg.host}:{port}")
        finally:
            store.close()
        log.info("%s: registered in the directory as %s:%d", atsign, cfg.host, port)
    except BaseException:
        _rollback(cfg, atsign)
        raise
    return secret, port


def _activate(args: argparse.Namespace, atsign: str, secret: str, root: tuple[str, int],
              ctx: ssl.SSLContext, keys: AtKeys | None, keys_path: Path | None) -> AtKeys:
    from noports.atclient import AtClientError
    from noports.keys.onboarding import ActivationError, activate

    try:
        return activate(atsign, secret, root, ctx, keys=keys, keys_path=keys_path,
                        timeout=args.timeout)
    except (ActivationError, AtClientError) as exc:
        raise AdminError(f"activating {atsign} failed: {exc}") from None


def _host_and_activate(args: argparse.Namespace, cfg: PlaneConfig, atsign: str,
                       keys: AtKeys | None, keys_path: Path | None) -> AtKeys:
    """Provision `atsign` on the running plane and activate it; undo everything on failure."""
    keys_existed = keys_path is not None and keys_path.exists()
    secret, _port = _provision(args, cfg, atsign)
    try:
        return _activate(args, atsign, secret, cfg.root, _ssl_ctx(cfg), keys, keys_path)
    except BaseException:
        _rollback(cfg, atsign)
        if keys_path is not None and not keys_existed:
            with contextlib.suppress(FileNotFoundError):
                keys_path.unlink()
        raise


def _write_secret(path: Path, secret: str, force: bool) -> None:
    """Write a secret file created 0600 (temp + rename), refusing to clobber without force."""
    path = path.expanduser()
    if path.exists() and not force:
        raise AdminError(f"{path} already exists; use --force to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(secret + "\n")
    os.replace(tmp, path)


def cmd_atsign_create(args: argparse.Namespace) -> int:
    cfg = _plane(args)
    atsign = _atsign(args.atsign)
    if args.cram_secret_out is not None:
        # provision only: the device activates itself (its private keys never leave it)
        out = args.cram_secret_out.expanduser()
        if out.exists() and not args.force:
            raise AdminError(f"{out} already exists; use --force to overwrite it")
        secret, port = _provision(args, cfg, atsign)
        try:
            _write_secret(out, secret, force=True)
        except BaseException:
            _rollback(cfg, atsign)
            raise
        _out(args, f"{atsign} provisioned on {cfg.host}:{port}; one-time CRAM secret in {out} "
                   "(mode 0600)\n"
                   f"  on the device: noports atsign activate {atsign} --root "
                   f"{cfg.root_address} --ca ca.pem --cram-secret-file FILE\n"
                   f"  (copy {cfg.ca_file} and the secret file there, e.g. over ssh)")
        return 0
    keys_path = _keys_path(args, atsign)
    if keys_path.exists() and not args.force:
        raise AdminError(f"{keys_path} already exists; use --force to overwrite it (the keys "
                         "in it will stop working)")
    _host_and_activate(args, cfg, atsign, None, keys_path)
    _out(args, f"{atsign} created on {cfg.host} (directory {cfg.root_address})\n"
               f"  keys: {keys_path} (mode 0600)\n"
               f"  clients: export SSL_CERT_FILE={cfg.ca_file}")
    return 0


def _hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def _read_secret(path: Path) -> str:
    try:
        text = sys.stdin.read() if str(path) == "-" else path.expanduser().read_text("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise AdminError(f"cannot read the CRAM secret from {path}: {exc}") from None
    secret = text.strip()
    if not secret or any(c.isspace() for c in secret):
        raise AdminError(f"{path} does not hold a CRAM secret (one line, no spaces)")
    return secret


def cmd_atsign_activate(args: argparse.Namespace) -> int:
    from noports.keys.ca import client_context

    atsign = _atsign(args.atsign)
    keys_path = _keys_path(args, atsign)
    keys: AtKeys | None = None
    if args.keys_file is not None:
        try:
            keys = load_atkeys(args.keys_file, atsign=atsign)
        except AtKeysError as exc:
            raise AdminError(str(exc)) from None
        keys_path = None if args.no_copy else keys_path
    if keys_path is not None and keys_path.exists() and not args.force:
        raise AdminError(f"{keys_path} already exists; use --force to overwrite it")
    if args.ca is not None and not args.ca.expanduser().is_file():
        raise AdminError(f"CA certificate {args.ca} not found")
    secret = _read_secret(args.cram_secret_file)
    try:
        ctx = client_context(args.ca.expanduser() if args.ca else None)
    except (OSError, ssl.SSLError) as exc:
        raise AdminError(f"cannot load CA certificate {args.ca}: {exc}") from None
    _activate(args, atsign, secret, args.root, ctx, keys, keys_path)
    _out(args, f"{atsign} activated via {args.root[0]}:{args.root[1]}\n"
               f"  keys: {keys_path or args.keys_file} (mode 0600)")
    return 0


def cmd_atsign_import(args: argparse.Namespace) -> int:
    cfg = _plane(args)
    try:
        keys = load_atkeys(args.file, atsign=_atsign(args.atsign) if args.atsign else None)
    except AtKeysError as exc:
        raise AdminError(str(exc)) from None
    atsign = keys.atsign
    copy_to: Path | None = None
    if not args.no_copy:
        copy_to = _keys_path(args, atsign)
        if copy_to.exists() and copy_to.resolve() != args.file.expanduser().resolve():
            try:
                same = load_atkeys(copy_to, atsign=atsign) == keys
            except AtKeysError:
                same = False
            if same:
                copy_to = None
            elif not args.force:
                raise AdminError(f"{copy_to} exists with different keys; use --force to "
                                 "overwrite it, or --no-copy")
        elif copy_to.exists():
            copy_to = None
    _host_and_activate(args, cfg, atsign, keys, None)
    if copy_to is not None:
        save_atkeys(keys, copy_to)
    _out(args, f"{atsign} imported on {cfg.host} (directory {cfg.root_address})\n"
               f"  keys: {copy_to or args.file}\n"
               f"  clients: export SSL_CERT_FILE={cfg.ca_file}")
    return 0


def _width(text: str) -> int:
    """Terminal columns of `text` (emoji atSigns are double width)."""
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def cmd_atsign_list(args: argparse.Namespace) -> int:
    cfg = _plane(args)
    hosted = _atserver_admin().list_atsigns(cfg.state_dir)
    entries = _directory_entries(cfg)
    rows = {a: {"port": p, "directory": entries.get(a)} for a, p in sorted(hosted.items())}
    if args.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return 0
    if not rows:
        print("no atSigns hosted", file=sys.stderr)
        return 0
    width = max(_width(a) for a in rows)
    for atsign, row in rows.items():
        pad = " " * (width - _width(atsign))
        print(f"{atsign}{pad}  port {row['port'] or '-':<6}  directory "
              f"{row['directory'] or '-'}")
    return 0


def cmd_atsign_remove(args: argparse.Namespace) -> int:
    cfg = _plane(args)
    atsign = _atsign(args.atsign)
    try:
        hosted = _atserver_admin().remove_atsign(cfg.state_dir, atsign)
    except ValueError as exc:
        raise AdminError(str(exc)) from None
    store = _open_store(cfg)
    try:
        registered = store.delete(atsign)
    finally:
        store.close()
    if not hosted and not registered:
        raise AdminError(f"{atsign} is not hosted by this plane (see `noports atsign list`)")
    _out(args, f"{atsign} removed (its .atKeys file, if any, was left alone)")
    return 0


COMMANDS = {
    ("plane", "init"): cmd_plane_init,
    ("plane", "up"): cmd_plane_up,
    ("plane", "status"): cmd_plane_status,
    ("atsign", "create"): cmd_atsign_create,
    ("atsign", "import"): cmd_atsign_import,
    ("atsign", "activate"): cmd_atsign_activate,
    ("atsign", "list"): cmd_atsign_list,
    ("atsign", "remove"): cmd_atsign_remove,
}


COMMANDS.update(enroll_cli.COMMANDS)


def main(argv: Sequence[str] | None = None) -> int:
    """Console script `noports`; returns the exit code (2 for every expected failure)."""
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.debug else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="noports: %(message)s", stream=sys.stderr)
    try:
        return COMMANDS[(args.group, args.command)](args)
    except (AdminError, PlaneError, AtKeysError, enroll_cli.EnrollmentError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # never a traceback for the operator unless asked
        if args.debug:
            raise
        print(f"{PROG}: error: {type(exc).__name__}: {exc} (re-run with --debug for details)",
              file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
