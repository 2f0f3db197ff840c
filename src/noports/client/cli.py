"""``sshnp``: SSH to a device that accepts no inbound connections (docs/sshnp.md).

Three outputs: exec OpenSSH through a tunnel on an ephemeral 127.0.0.1 port (default), print
that ssh command and keep the tunnel in the background (``-x``), or carry the tunnel on
stdin/stdout for use as an OpenSSH ``ProxyCommand`` (``--stdio``). Imports are lazy so that
``--stdio`` (started once per host by Ansible) costs as little as possible.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import logging
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import watchdog
from .errors import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_TUNNEL,
    EXIT_USAGE,
    SshnpError,
    TunnelError,
    UsageError,
)
from .params import (
    DEFAULT_CIPHERS,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_DAEMON_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_RELAY_TIMEOUT,
    DEFAULT_TUNNEL_MODE,
    TUNNEL_MODES,
    SessionParams,
    parse_root,
)
from .progress import Progress

log = logging.getLogger("noports.client")

#: option name -> (type, repeatable); the keys a profile file may set
_OPTION_TYPES: dict[str, tuple[str, bool]] = {
    "from": ("str", False), "to": ("str", False), "device": ("str", False),
    "srvd": ("list", True), "remote_user": ("str", False), "local_port": ("int", False),
    "identity_file": ("path", False), "send_ssh_public_key": ("bool", False),
    "ssh_option": ("str", True), "key_file": ("path", False), "root_domain": ("str", False),
    "ca_file": ("path", False), "tunnel_mode": ("str", False), "known_hosts": ("path", False),
    "relay_timeout": ("float", False), "daemon_timeout": ("float", False),
    "connect_timeout": ("float", False), "idle_timeout": ("float", False),
    "remote_sshd_port": ("int", False), "ssh_binary": ("str", False),
    "ciphers": ("list", False), "quiet": ("bool", False), "verbose": ("int", False),
    "only443": ("bool", False), "relay_auth_mode": ("str", False),
    "relay_select": ("str", False),
}
#: official spellings accepted in profiles
_ALIASES = {"remote_user_name": "remote_user", "local_ssh_options": "ssh_option",
            "host": "srvd", "sshrvd": "srvd", "atsign": "from", "ssh_options": "ssh_option"}

DEFAULTS: dict[str, Any] = {
    "device": "default", "local_port": 0, "send_ssh_public_key": False, "root_domain":
    "root.atsign.org", "tunnel_mode": DEFAULT_TUNNEL_MODE, "relay_timeout":
    DEFAULT_RELAY_TIMEOUT, "daemon_timeout": DEFAULT_DAEMON_TIMEOUT, "connect_timeout":
    DEFAULT_CONNECT_TIMEOUT, "idle_timeout": DEFAULT_IDLE_TIMEOUT, "remote_sshd_port": 22,
    "ssh_binary": None, "quiet": False, "verbose": 0, "ciphers": list(DEFAULT_CIPHERS),
    "only443": False, "relay_auth_mode": "payload", "relay_select": "fastest",
}


@dataclass
class CliOptions:
    """Parsed command line: the session parameters plus how to present the tunnel."""

    params: SessionParams | None
    output: str  # "exec" | "print" | "stdio" | "list"
    local_port: int = 0
    ssh_options: list[str] = field(default_factory=list)
    command: list[str] = field(default_factory=list)
    ssh_binary: str = "ssh"
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    quiet: bool = False
    verbose: int = 0
    raw: dict[str, Any] = field(default_factory=dict)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="sshnp", description="SSH to a NoPorts device through a socket "
                 "rendezvous; see docs/sshnp.md.", allow_abbrev=False)
    S = argparse.SUPPRESS
    a = ap.add_argument
    a("-f", "--from", dest="from", default=S, help="client atSign (yours)")
    a("-t", "--to", dest="to", default=S, help="device atSign")
    a("-d", "--device", default=S, help="device name (default: default)")
    a("-r", "--srvd", action="append", default=S,
      help="relay atSign(s), comma separated or repeated; with several, the fastest is used "
           "first (see --relay-select); one that does not answer within --relay-timeout, "
           "cannot be reached or is unknown to the directory is skipped for the next")
    a("--relay-select", choices=("fastest", "ordered"), default=S,
      help="several -r relays: fastest = measure each (discover probe, timed TCP connect) "
           "and try the fastest first (default); ordered = try them in the order given")
    a("--443", "--only-443", dest="only443", action="store_const", const=True, default=S,
      help="single-port relay (srvd --443): client and device reach the relay only on its "
           "one port (tcp/443), authenticated by ESCR; for networks that allow only 443 out")
    a("--relay-auth-mode", choices=("payload", "escr"), default=S,
      help="how sockets authenticate to the relay: payload (signed line, default) or escr "
           "(signed answer to the relay's challenge; implied by --443)")
    a("-u", "--remote-user", "--remote-user-name", dest="remote_user", default=S,
      help="user on the device (default: the username the device shares)")
    a("-l", "--local-port", type=int, default=S, help="local tunnel port (0 = ephemeral)")
    a("-i", "--identity-file", default=S, help="your ssh private key for the inner OpenSSH")
    a("-s", "--send-ssh-public-key", action="store_const", const=True, default=S,
      help="send <identity-file>.pub to the device first (daemon needs -s)")
    a("-o", "--ssh-option", "--local-ssh-options", dest="ssh_option", action="append",
      default=S, help="extra OpenSSH -o option (repeatable)")
    a("-x", "--output-execution-command", dest="print_command", action="store_true",
      default=False, help="print the ssh command; keep the tunnel in the background")
    a("-k", "--key-file", default=S, help="client .atKeys (default ~/.atsign/keys/"
      "<@from>_key.atKeys)")
    a("--root-domain", default=S, help="atDirectory host[:port] (default root.atsign.org:64)")
    a("--list-devices", "--ls", dest="list_devices", action="store_true", default=False,
      help="list the devices that share their info with you, and ping them")
    a("-v", "--verbose", action="count", default=S, help="debug logging (repeat for more)")
    a("-q", "--quiet", action="store_const", const=True, default=S,
      help="no progress lines (errors are still printed)")
    a("--ca-file", default=S, help="PEM CA that signed the atServers' TLS certificates")
    a("--tunnel-mode", choices=TUNNEL_MODES, default=S,
      help=f"aes: encrypted relay stream (default {DEFAULT_TUNNEL_MODE}); ssh: outer SSH")
    a("--stdio", action="store_true", default=False,
      help="carry the tunnel on stdin/stdout (OpenSSH ProxyCommand mode); with "
      "ProxyUseFdpass=yes the per-user agent sets it up and ssh gets its socket")
    a("--profile", "--profile-name", dest="profile", default=None,
      help="load ~/.config/sshnp/<NAME>.env")
    a("--config", "--config-file", dest="config", default=None, help="load this profile file")
    a("--known-hosts", default=S, help="known_hosts file to update with the pinned device "
      "host keys (default: a per-device file under ~/.atsign/sshnp/known_hosts.d)")
    a("--relay-timeout", type=float, default=S, help="seconds to wait for each relay (20)")
    a("--daemon-timeout", "--dpt", dest="daemon_timeout", type=float, default=S,
      help="seconds to wait for the device (15)")
    a("--connect-timeout", type=float, default=S, help="TCP/TLS connect timeout (10); "
      "set-up as a whole is limited to 2 x this + --relay-timeout per relay + "
      "--daemon-timeout + 10 s")
    a("--idle-timeout", type=float, default=S,
      help="seconds the local port waits for ssh to connect (30)")
    a("--remote-sshd-port", type=int, default=S, help="device sshd port (22)")
    a("--ssh-binary", default=S, help="OpenSSH client to run (default: ssh on PATH)")
    a("--ciphers", action="append", default=S,
      help="aes mode stream ciphers to offer, best first (default "
      f"{','.join(DEFAULT_CIPHERS)})")
    a("command", nargs=argparse.REMAINDER, help="remote command (exec mode)")
    return ap


# --- profiles -------------------------------------------------------------------------------

def config_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "sshnp"


def profile_path(name: str) -> Path:
    if not name or "/" in name or name.startswith("."):
        raise UsageError(f"--profile: bad profile name {name!r}")
    d = config_dir()
    for cand in (d / f"{name}.env", d / name):
        if cand.is_file():
            return cand
    raise UsageError(f"--profile: no profile {name!r} ({d / (name + '.env')} does not exist)")


def _convert(key: str, typ: str, value: str, where: str) -> Any:
    try:
        if typ == "int":
            return int(value)
        if typ == "float":
            return float(value)
        if typ == "bool":
            low = value.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(value)
    except ValueError:
        raise UsageError(f"{where}: {key} expects {typ}, got {value!r}") from None
    return value


def parse_profile(text: str, source: str = "<profile>") -> dict[str, Any]:
    """``key = value`` lines (long option names, any case, ``-``/``_``); ``#`` comments.

    Repeatable keys (``srvd``, ``ssh-option``) accumulate; lists also split on commas.
    """
    out: dict[str, Any] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[7:].strip()
        key, sep, value = line.partition("=")
        if not sep:
            raise UsageError(f"{source}:{n}: expected key=value, got {raw.strip()!r}")
        key = key.strip().lower().replace("-", "_")
        key = _ALIASES.get(key, key)
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        if key not in _OPTION_TYPES:
            raise UsageError(f"{source}:{n}: unknown option {key!r}")
        typ, repeat = _OPTION_TYPES[key]
        if typ == "list":
            items = [v.strip() for v in value.split(",") if v.strip()]
            out[key] = [*out.get(key, []), *items] if repeat else items
        elif repeat:
            out.setdefault(key, []).append(value)
        else:
            out[key] = _convert(key, typ, value, f"{source}:{n}")
    return out


def load_profile_file(path: Path) -> dict[str, Any]:
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read profile {path}: {exc.strerror or exc}") from None
    return parse_profile(text, str(path))


def _split_list(values: list[str]) -> list[str]:
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


_PARSERS: list[argparse.ArgumentParser] = []


def _parser() -> argparse.ArgumentParser:
    """One parser per process: the agent parses every tunnel request's arguments, and
    building the parser costs more than parsing with it (every default is SUPPRESS, so
    parses share no state)."""
    if not _PARSERS:
        _PARSERS.append(build_parser())
    return _PARSERS[0]


def parse_args(argv: list[str]) -> CliOptions:
    """Flags override the profile, which overrides the defaults."""
    ns = vars(_parser().parse_args(argv))
    merged: dict[str, Any] = dict(DEFAULTS)
    if ns.get("config"):
        merged.update(load_profile_file(Path(ns["config"])))
    if ns.get("profile"):
        merged.update(load_profile_file(profile_path(ns["profile"])))
    for key in _OPTION_TYPES:
        if key in ns:
            val = ns[key]
            merged[key] = _split_list(val) if _OPTION_TYPES[key][0] == "list" else val
    command = list(ns.get("command") or [])
    if command and command[0] == "--":
        command = command[1:]
    output = "list" if ns["list_devices"] else "stdio" if ns["stdio"] else \
        "print" if ns["print_command"] else "exec"
    if ns["stdio"] and ns["print_command"]:
        raise UsageError("--stdio and -x cannot be combined")
    if output in ("stdio", "print") and command:
        raise UsageError(f"a remote command makes no sense with "
                         f"{'--stdio' if output == 'stdio' else '-x'}: {' '.join(command)}")
    if not merged.get("from"):
        raise UsageError("-f/--from (your atSign) is required")
    opts = CliOptions(params=None, output=output, local_port=int(merged["local_port"]),
                      ssh_options=list(merged.get("ssh_option") or []), command=command,
                      ssh_binary=merged.get("ssh_binary") or _default_ssh(),
                      idle_timeout=float(merged["idle_timeout"]), quiet=bool(merged["quiet"]),
                      verbose=int(merged["verbose"] or 0), raw=merged)
    if not 0 <= opts.local_port < 65536:
        raise UsageError(f"--local-port: not a TCP port: {opts.local_port}")
    if output == "list":
        return opts
    if not merged.get("to"):
        raise UsageError("-t/--to (the device atSign) is required")
    if not merged.get("srvd"):
        raise UsageError("-r/--srvd (relay atSign) is required")
    mode = merged["tunnel_mode"]
    opts.params = SessionParams(
        client_atsign=merged["from"], device_atsign=merged["to"], relays=merged["srvd"],
        device=merged["device"], remote_user=merged.get("remote_user"),
        key_file=_path(merged.get("key_file")), root=parse_root(merged["root_domain"]),
        ca_file=_path(merged.get("ca_file")), tunnel_mode=mode,
        remote_sshd_port=int(merged["remote_sshd_port"]),
        identity_file=_path(merged.get("identity_file")),
        send_ssh_public_key=bool(merged["send_ssh_public_key"]),
        relay_timeout=float(merged["relay_timeout"]),
        daemon_timeout=float(merged["daemon_timeout"]),
        connect_timeout=float(merged["connect_timeout"]),
        ciphers=tuple(merged["ciphers"]),
        need_remote_user=not (output == "stdio" and mode == "aes"),
        only443=bool(merged["only443"]), relay_auth_mode=str(merged["relay_auth_mode"]),
        relay_select=str(merged["relay_select"]),
        known_hosts_file=_path(merged.get("known_hosts")))
    return opts


def _path(value: Any) -> Path | None:
    return Path(value).expanduser() if value else None


def _default_ssh() -> str:
    import shutil
    return shutil.which("ssh") or "/usr/bin/ssh"


# --- outputs ---------------------------------------------------------------------------------

def _bind_local(port: int) -> Any:
    from .npt_tunnel import bind_local
    return bind_local(port, backlog=1)


async def _accept(listener: Any, idle_timeout: float, progress: Progress) -> Any:
    """The first local connection (then stop listening), or None after ``idle_timeout``."""
    import asyncio
    loop = asyncio.get_running_loop()
    try:
        conn, _addr = await asyncio.wait_for(loop.sock_accept(listener), idle_timeout)
    except asyncio.TimeoutError:
        progress(f"nobody connected to the tunnel within {idle_timeout:g}s; closing it")
        return None
    finally:
        listener.close()
    return conn


async def _drop_accept(accept: Any, listener: Any) -> None:
    """Stop listening and close the connection the accept task may already hold (the early
    ssh's), so the port is free to listen on again."""
    import asyncio
    accept.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        conn = await accept
        if conn is not None:
            conn.close()
    listener.close()


async def _serve_once(listener: Any, session: Any, idle_timeout: float,
                      progress: Progress) -> None:
    """Accept the first local connection and pump it through the session."""
    conn = await _accept(listener, idle_timeout, progress)
    if conn is not None:
        await session.tunnel.serve_socket(conn)


def _ssh_argv(opts: CliOptions, session: Any, port: int) -> list[str]:
    from .sshcmd import ssh_command
    p = opts.params
    assert p is not None
    return ssh_command(ssh_binary=opts.ssh_binary, port=port, user=session.remote_user,
                       alias=session.host_key_alias, known_hosts=session.known_hosts,
                       identity_file=p.identity_file, ssh_options=opts.ssh_options,
                       command=opts.command)


def _early_ssh_argv(opts: CliOptions, port: int) -> list[str] | None:
    """The ssh command, known before the session exists (pinned known_hosts path, given
    user), so ssh can start while the control plane works; None if the user is unknown."""
    from .knownhosts import device_known_hosts_path, host_key_alias
    from .sshcmd import ssh_command
    p = opts.params
    assert p is not None
    if not p.remote_user:
        return None
    alias = host_key_alias(p.device_atsign, p.device)
    known = p.known_hosts_file or device_known_hosts_path(p.home_cache, alias)
    return ssh_command(ssh_binary=opts.ssh_binary, port=port, user=p.remote_user,
                       alias=alias, known_hosts=known, identity_file=p.identity_file,
                       ssh_options=opts.ssh_options, command=opts.command)


async def _spawn_ssh(argv: list[str]) -> Any:
    import asyncio
    try:
        return await asyncio.create_subprocess_exec(*argv)
    except OSError as exc:
        raise TunnelError(f"cannot run {argv[0]}: {exc.strerror or exc}", step="ssh",
                          hint="install OpenSSH or pass --ssh-binary") from None


def _kill(proc: Any) -> None:
    if proc is not None and proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()


async def _exec_main(opts: CliOptions, progress: Progress) -> int:
    """Default: tunnel on an ephemeral loopback port, OpenSSH as a child; its exit code.

    ssh is started as soon as its command line is known, i.e. before the session is ready:
    its start-up (config, keys) then overlaps the control plane, and its connection simply
    waits in our accept queue until the tunnel can carry it (ssh reads known_hosts only after
    key exchange, by which time the pinned keys are written).
    """
    import asyncio
    import signal

    from .flow import open_session
    assert opts.params is not None
    listener = _bind_local(opts.local_port)
    port = listener.getsockname()[1]
    loop = asyncio.get_running_loop()
    accept = loop.create_task(_accept(listener, opts.idle_timeout, progress))
    proc = None
    early = _early_ssh_argv(opts, port)
    try:
        if early is not None:
            proc = await _spawn_ssh(early)
        setup = loop.create_task(open_session(opts.params, progress=progress))
        if proc is not None:
            ssh_done = loop.create_task(proc.wait())
            await asyncio.wait({setup, ssh_done}, return_when=asyncio.FIRST_COMPLETED)
            if not setup.done():  # ssh gave up before the tunnel existed (bad -o, ...)
                setup.cancel()
                with contextlib.suppress(BaseException):
                    await setup
                return proc.returncode
        session = await setup
    except BaseException as exc:
        watchdog.disarm()
        _kill(proc)
        accept.cancel()
        listener.close()
        if proc is not None and not isinstance(exc, asyncio.CancelledError):
            # reap ssh while the loop lives (else asyncio warns "Loop ... is closed" at exit)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(proc.wait(), 5)
        raise
    watchdog.disarm()
    argv = _ssh_argv(opts, session, port)
    if proc is None or argv != early:  # not started yet, or no pinned keys after all
        if proc is not None:
            progress("device sent no host keys: restarting ssh without pinning")
            _kill(proc)
            await proc.wait()
            await _drop_accept(accept, listener)
            listener = _bind_local(port)
            accept = loop.create_task(_accept(listener, opts.idle_timeout, progress))
        proc = await _spawn_ssh(argv)
    progress(f"{argv[0]} connected through 127.0.0.1:{port}")
    # Ctrl-C belongs to ssh (and the remote side) from now on; we stay until ssh exits.
    loop.add_signal_handler(signal.SIGINT, lambda: None)

    async def serve() -> None:
        conn = await accept
        if conn is not None:
            await session.tunnel.serve_socket(conn)

    serving = loop.create_task(serve())
    code = None
    try:
        code = await proc.wait()
        return code
    finally:
        # winding down (asyncio.run cancels and awaits what is left) must not hang either
        watchdog.arm_exit(code if code is not None else EXIT_TUNNEL)
        serving.cancel()
        if serving.done() and not serving.cancelled() and serving.exception() is not None:
            # the tunnel failed under ssh (relay lost): ssh says "closed", we say why
            exc = serving.exception()
            if isinstance(exc, SshnpError):
                progress.error(str(exc))
            else:
                log.debug("tunnel ended with %r", exc)
        session.close()


async def _print_child(opts: CliOptions, progress: Progress, report_fd: int,
                       reported: list[bool]) -> int:
    """-x, in the forked child: set up, report the ssh command, then serve in the background."""
    from .flow import open_session
    assert opts.params is not None
    listener = _bind_local(opts.local_port)
    port = listener.getsockname()[1]
    try:
        session = await open_session(opts.params, progress=progress)
    except BaseException:
        listener.close()
        raise
    finally:
        watchdog.disarm()
    from .sshcmd import printable
    line = printable(_ssh_argv(opts, session, port))
    # let go of the caller's terminal/pipes first, or `$(sshnp -x ...)` would wait for us
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    progress.quiet = True
    os.write(report_fd, b"OK " + line.encode() + b"\n")
    reported.append(True)
    os.close(report_fd)
    try:
        await _serve_once(listener, session, opts.idle_timeout, progress)
    finally:
        session.close()
    return 0


def _print_main(opts: CliOptions, progress: Progress) -> int:
    """Fork before any event loop or thread exists; the child owns the tunnel."""
    import asyncio
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(r)
        os.setsid()
        code = EXIT_FAILURE
        reported: list[bool] = []
        from .flow import setup_limit
        assert opts.params is not None
        watchdog.arm(setup_limit(opts.params))  # the child's set-up: see watchdog.py
        try:
            code = asyncio.run(_print_child(opts, progress, w, reported))
        except SshnpError as exc:
            progress.error(str(exc))
            code = exc.exit_code
        except BaseException as exc:  # pragma: no cover - bug path
            progress.error(f"unexpected error: {type(exc).__name__}: {exc}")
        finally:
            if not reported:  # after reporting, w is closed (and its number maybe reused)
                with contextlib.suppress(OSError):
                    os.write(w, f"ERR {code}\n".encode())
        os._exit(code)
    os.close(w)
    chunks = []
    while True:
        b = os.read(r, 65536)
        if not b:
            break
        chunks.append(b)
    os.close(r)
    text = b"".join(chunks).decode(errors="replace")
    if text.startswith("OK "):
        sys.stdout.write(text[3:].splitlines()[0] + "\n")
        sys.stdout.flush()
        return 0
    os.waitpid(pid, 0)
    try:
        return int(text.split()[1])
    except (IndexError, ValueError):
        return EXIT_TUNNEL


#: after ssh's SIGHUP, how long the tunnel may take to finish its clean end
HUP_GRACE_S = 10.0


async def _stdio_main(params: SessionParams, progress: Progress) -> int:
    """ProxyCommand mode. OpenSSH closes our stdin/stdout and then sends SIGHUP when it exits
    (a plain ssh, ControlPersist expiry, ``ssh -O exit``): that is a normal end, so SIGHUP
    must not kill us before the end-of-stream frame is sent and the device's is checked;
    it only bounds how long that may take (``HUP_GRACE_S``)."""
    import asyncio

    from .flow import open_session
    try:
        session = await open_session(params, progress=progress)
    finally:
        watchdog.disarm()
    loop = asyncio.get_running_loop()
    if hasattr(session.tunnel, "on_failure"):
        session.tunnel.on_failure = progress.error
    serving = loop.create_task(session.tunnel.serve_stdio())
    hung_up: list[Any] = []

    def on_hup() -> None:
        if not hung_up:
            log.debug("SIGHUP: finishing the tunnel (at most %gs)", HUP_GRACE_S)
            hung_up.append(loop.call_later(HUP_GRACE_S, serving.cancel))

    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        loop.add_signal_handler(signal.SIGHUP, on_hup)
    try:
        await serving
    except asyncio.CancelledError:
        if not hung_up or not serving.cancelled():
            raise
        log.info("the tunnel did not finish within %gs of ssh's hang-up; dropped it",
                 HUP_GRACE_S)
        return EXIT_TUNNEL
    finally:
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.remove_signal_handler(signal.SIGHUP)
        for timer in hung_up:
            timer.cancel()
        session.close()
    return 0


def run_stdio(params: SessionParams, *, quiet: bool = False) -> int:
    """ProxyCommand mode as a library call: tunnel on fds 0/1, errors on stderr; exit code."""
    import asyncio
    progress = Progress(quiet=quiet)
    try:
        return asyncio.run(_stdio_main(params, progress))
    except SshnpError as exc:
        if not exc.reported:
            progress.error(str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _setup_logging(verbose: int, prog: str = "sshnp") -> None:
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, stream=sys.stderr,
                        format=f"{prog} %(asctime)s %(name)s %(levelname)s: %(message)s")


def fdpass_stdio() -> bool:
    """True when OpenSSH runs us with ``ProxyUseFdpass=yes``: stdin and stdout are then the
    same unix socket (one socketpair end), never two pipes, and ssh wants a socket back."""
    try:
        st0, st1 = os.fstat(0), os.fstat(1)
    except OSError:
        return False
    import stat
    return (stat.S_ISSOCK(st0.st_mode) and (st0.st_dev, st0.st_ino) == (st1.st_dev, st1.st_ino))


def main(argv: list[str] | None = None) -> int:
    """Console entry point (``sshnp``); returns the exit code (see docs/sshnp.md)."""
    progress = Progress()
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        opts = parse_args(args)
    except UsageError as exc:
        progress.error(str(exc))
        return EXIT_USAGE
    if opts.output == "stdio" and fdpass_stdio():
        # ProxyUseFdpass: the per-user agent sets the tunnel up (started on demand) and ssh
        # gets its socket; no process per host remains (docs/agent.md#with-plain-openssh)
        from noports.agent.connect import main as connect_main
        return connect_main([a for a in args if a != "--stdio"])
    progress.quiet = opts.quiet
    _setup_logging(opts.verbose)
    with contextlib.suppress(AttributeError, ValueError, OSError):  # kill -USR1: stacks
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        if opts.params is not None and opts.params.tunnel_mode == "aes" \
                and opts.output != "print":  # -x forks first; its child generates the key
            from .flow import prestart_session_key
            prestart_session_key()
        if opts.output == "print":
            return _print_main(opts, progress)
        import asyncio
        if opts.params is not None and opts.output != "list":
            # bounds set-up even if the event loop itself gets stuck (watchdog.py)
            from .flow import setup_limit
            watchdog.arm(setup_limit(opts.params))
        if opts.output == "stdio":
            assert opts.params is not None
            return asyncio.run(_stdio_main(opts.params, progress))
        if opts.output == "list":
            from .devices import list_devices
            return asyncio.run(list_devices(opts, progress))
        return asyncio.run(_exec_main(opts, progress))
    except SshnpError as exc:
        if not exc.reported:
            progress.error(str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        progress.error("interrupted")
        return EXIT_INTERRUPTED
    except Exception as exc:  # a bug: say so, one line, no traceback unless -v
        log.debug("unexpected error", exc_info=True)
        progress.error(f"unexpected error ({type(exc).__name__}: {exc}); please report it; "
                       "run with -vv for details")
        return EXIT_FAILURE
    finally:
        watchdog.disarm()


if __name__ == "__main__":
    sys.exit(main())
