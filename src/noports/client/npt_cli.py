"""``npt``: a TCP port of a NoPorts device (any permitted ``host:port`` on its side) on a
local port, with the official npt's flags (docs/npt.md).

Two ways to run: in the foreground until the session ends (default; ``-K`` starts a new
session 5 s after one ends, on the same local port), or ``-x``: set up, print the local port
on stdout and exit, the tunnel staying in a background process that ends when the session
does (``-T`` after the last connection). ``--pid-file`` (ours) records that process, so a
script or an Ansible play can stop it early.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_TUNNEL,
    EXIT_USAGE,
    SshnpError,
    UsageError,
)
from .npt_flow import DEFAULT_NPT_TIMEOUT_S, NptTarget
from .params import (
    DEFAULT_CIPHERS,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_RELAY_TIMEOUT,
    SessionParams,
    parse_root,
)
from .progress import Progress

log = logging.getLogger("noports.npt")

KEEP_ALIVE_DEFAULT_TIMEOUT_S = 24 * 3600.0  # official: -K without -T
KEEP_ALIVE_RETRY_S = 5.0
DEFAULT_PING_TIMEOUT = 20.0  # official --daemon-ping-timeout


class NptProgress(Progress):
    """sshnp's progress lines, named ``npt``."""

    def __call__(self, message: str) -> None:
        line = f"npt [{self.elapsed():6.3f}s] {message}"
        self.lines.append(line)
        if not self.quiet:
            self._write(line)

    def error(self, message: str) -> None:
        self._write(f"npt: error: {message}")

    def warning(self, message: str) -> None:
        self.lines.append(f"npt: warning: {message}")
        self._write(f"npt: warning: {message}")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="npt", add_help=False, allow_abbrev=False,
                 description="Reach a TCP port on a NoPorts device's side (a service on its "
                 "loopback, or a host:port its sshnpd --permit-open allows) on a local port, "
                 "through a socket rendezvous; see docs/npt.md.")
    a = ap.add_argument
    a("--help", action="help", help="show this help and exit")
    a("-f", "--from", dest="from_", metavar="ATSIGN", required=True, help="this client's atSign")
    a("-t", "--to", metavar="ATSIGN", required=True, help="the device daemon's atSign")
    a("-r", "--srvd", action="append", required=True, metavar="ATSIGN",
      help="the socket rendezvous (relay) atSign; comma separated or repeated: tried in order")
    a("-d", "--device", required=True, help="the device name")
    a("-p", "--remote-port", "--rp", dest="remote_port", type=int, required=True,
      metavar="PORT",
      help="the port to reach on the device's side")
    a("-h", "--remote-host", "--rh", dest="remote_host", default="localhost", metavar="HOST",
      help="the host to reach, as the device resolves it (default localhost); must be in "
      "the daemon's --permit-open list exactly as written")
    a("-l", "--local-port", "--lp", dest="local_port", type=int, default=0, metavar="PORT",
      help="local port (on 127.0.0.1); 0 (default) asks the OS for a free one")
    a("-k", "--key-file", help="this client's .atKeys (default ~/.atsign/keys/"
      "<@from>_key.atKeys)")
    a("--root-domain", default="root.atsign.org", help="atDirectory host[:port] "
      "(default root.atsign.org:64)")
    a("--ca-file", help="PEM CA that signed the atServers' TLS certificates (ours)")
    a("--daemon-ping-timeout", "--dpt", dest="dpt", type=float, default=DEFAULT_PING_TIMEOUT,
      help="seconds to wait for the device daemon (20)")
    a("--relay-timeout", type=float, default=DEFAULT_RELAY_TIMEOUT,
      help="seconds to wait for each relay (20)")
    a("--connect-timeout", type=float, default=DEFAULT_CONNECT_TIMEOUT,
      help="TCP/TLS connect timeout (10)")
    a("-x", "--exit-when-connected", dest="exit_when_connected", action="store_true",
      help="set up, print the local port on stdout and exit; the tunnel stays in a "
      "background process until the session ends")
    a("--pid-file", help="with -x: write the background process's pid here (ours)")
    a("-K", "--keep-alive", dest="keep_alive", action="store_true",
      help="when a session ends, start a new one (after 5 s) on the same local port; "
      "without -T the timeout becomes 24h")
    a("-T", "--timeout", default=None, metavar="DURATION",
      help="end the session after this long without a connection, e.g. 30s, 1h, "
      "1h,14m,30s, 7d; 0 = a year (default 30s; operative on the device)")
    a("--encrypt-rvd-traffic", "--et", dest="encrypt", action="store_true", default=True,
      help="encrypt the relayed traffic (always on)")
    a("--no-encrypt-rvd-traffic", "--no-et", dest="encrypt", action="store_false",
      help="refused: the relayed traffic is always encrypted")
    a("--per-session-storage", "--pss", action="store_true", default=True,
      help="accepted for compatibility (no local storage is kept)")
    a("--no-per-session-storage", "--no-pss", dest="per_session_storage",
      action="store_false", help="accepted for compatibility")
    a("--ciphers", action="append", default=None,
      help=f"stream ciphers to offer, best first (default {','.join(DEFAULT_CIPHERS)}); "
      "an official daemon always uses aes-256-ctr")
    a("-v", "--verbose", action="count", default=0, help="debug logging")
    a("-q", "--quiet", action="store_true", help="no progress lines (errors still printed)")
    return ap


@dataclass
class NptOptions:
    params: SessionParams
    target: NptTarget
    local_port: int
    exit_when_connected: bool
    keep_alive: bool
    pid_file: Path | None
    quiet: bool
    verbose: int


def _split(values: list[str] | None) -> list[str]:
    return [v.strip() for item in values or [] for v in item.split(",") if v.strip()]


def parse_args(argv: list[str]) -> NptOptions:
    from noports.npproto.nptcontrol import parse_duration
    ns = build_parser().parse_args(argv)
    if not ns.encrypt:
        raise UsageError("--no-encrypt-rvd-traffic is not supported: npt traffic through "
                         "the relay is always encrypted")
    if ns.keep_alive and ns.exit_when_connected:
        raise UsageError("--keep-alive and --exit-when-connected are mutually exclusive")
    if ns.pid_file and not ns.exit_when_connected:
        raise UsageError("--pid-file only applies with -x/--exit-when-connected")
    if not 0 < ns.remote_port < 65536:
        raise UsageError(f"-p/--remote-port: not a TCP port: {ns.remote_port}")
    if not 0 <= ns.local_port < 65536:
        raise UsageError(f"-l/--local-port: not a TCP port: {ns.local_port}")
    if ns.timeout is None:
        timeout = KEEP_ALIVE_DEFAULT_TIMEOUT_S if ns.keep_alive else DEFAULT_NPT_TIMEOUT_S
    else:
        try:
            timeout = parse_duration(ns.timeout)
        except ValueError as exc:
            raise UsageError(f"-T/--timeout: {exc}") from None
    params = SessionParams(
        client_atsign=ns.from_, device_atsign=ns.to, relays=_split(ns.srvd),
        device=ns.device, key_file=Path(ns.key_file).expanduser() if ns.key_file else None,
        root=parse_root(ns.root_domain),
        ca_file=Path(ns.ca_file).expanduser() if ns.ca_file else None, tunnel_mode="aes",
        relay_timeout=ns.relay_timeout, daemon_timeout=ns.dpt,
        connect_timeout=ns.connect_timeout,
        ciphers=tuple(_split(ns.ciphers)) if ns.ciphers else DEFAULT_CIPHERS,
        need_remote_user=False)
    return NptOptions(params=params, target=NptTarget(ns.remote_host, ns.remote_port, timeout),
                      local_port=ns.local_port, exit_when_connected=ns.exit_when_connected,
                      keep_alive=ns.keep_alive,
                      pid_file=Path(ns.pid_file).expanduser() if ns.pid_file else None,
                      quiet=ns.quiet, verbose=ns.verbose)


# --- running ---------------------------------------------------------------------------------

async def _one_session(opts: NptOptions, listener: Any, progress: Progress,
                       ready: Any = None) -> str:
    from .npt_flow import open_npt_session
    from .npt_tunnel import MultiTunnel
    session = await open_npt_session(opts.params, opts.target, progress=progress)
    port = listener.getsockname()[1]
    progress(f"npt is listening on localhost:{port}")
    if ready is not None:
        ready(port)
    return await MultiTunnel(session, progress=progress,
                             connect_timeout=opts.params.connect_timeout).serve(listener)


async def _foreground(opts: NptOptions, progress: Progress) -> int:
    import asyncio

    from .npt_tunnel import bind_local
    listener = bind_local(opts.local_port)
    try:
        while True:
            try:
                reason = await _one_session(opts, listener, progress)
                progress(f"session ended: {reason}")
            except SshnpError as exc:
                if not opts.keep_alive:
                    raise
                progress.error(str(exc))
            if not opts.keep_alive:
                return 0
            progress(f"keep-alive: a new session in {KEEP_ALIVE_RETRY_S:g}s")
            await asyncio.sleep(KEEP_ALIVE_RETRY_S)
    finally:
        listener.close()


def _background(opts: NptOptions, progress: Progress) -> int:
    """-x: fork before any event loop exists; the child sets up and reports the port."""
    import asyncio
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(r)
        os.setsid()
        reported: list[bool] = []

        def ready(port: int) -> None:
            if opts.pid_file is not None:
                opts.pid_file.write_text(f"{os.getpid()}\n", encoding="utf-8")
            devnull = os.open(os.devnull, os.O_RDWR)  # let go of the caller's pipes
            for fd in (0, 1, 2):
                os.dup2(devnull, fd)
            os.close(devnull)
            progress.quiet = True
            os.write(w, f"OK {port}\n".encode())
            os.close(w)
            reported.append(True)

        async def child() -> int:
            import signal

            from .npt_tunnel import bind_local
            task = asyncio.current_task()
            assert task is not None
            # `kill <pid>` (an Ansible play's clean-up) ends the tunnel cleanly: pid file gone
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
            listener = bind_local(opts.local_port)
            try:
                await _one_session(opts, listener, progress, ready)
            finally:
                listener.close()
            return 0

        code = EXIT_FAILURE
        from .flow import prestart_session_key
        prestart_session_key()  # the per-session RSA key, while the control plane works
        try:
            code = asyncio.run(child())
        except SshnpError as exc:
            progress.error(str(exc))
            code = exc.exit_code
        except asyncio.CancelledError:  # SIGTERM
            code = 0 if reported else EXIT_INTERRUPTED
        except BaseException as exc:  # pragma: no cover - bug path
            progress.error(f"unexpected error: {type(exc).__name__}: {exc}")
        finally:
            if not reported:
                with contextlib.suppress(OSError):
                    os.write(w, f"ERR {code}\n".encode())
            if opts.pid_file is not None and reported:
                with contextlib.suppress(OSError):
                    opts.pid_file.unlink()
        os._exit(code)
    os.close(w)
    chunks = []
    while b := os.read(r, 4096):
        chunks.append(b)
    os.close(r)
    text = b"".join(chunks).decode(errors="replace")
    if text.startswith("OK "):
        sys.stdout.write(text.split()[1] + "\n")
        sys.stdout.flush()
        return 0
    os.waitpid(pid, 0)
    try:
        return int(text.split()[1])
    except (IndexError, ValueError):
        return EXIT_TUNNEL


def main(argv: list[str] | None = None) -> int:
    """Console entry point (``npt``); exit codes as sshnp's (docs/sshnp.md)."""
    progress = NptProgress()
    try:
        opts = parse_args(list(sys.argv[1:] if argv is None else argv))
    except UsageError as exc:
        progress.error(str(exc))
        return EXIT_USAGE
    progress.quiet = opts.quiet
    from .cli import _setup_logging  # the shared log format, "npt" in front
    _setup_logging(opts.verbose, "npt")
    try:
        if opts.exit_when_connected:
            return _background(opts, progress)  # forks first; the child makes the key
        import asyncio

        from .flow import prestart_session_key
        prestart_session_key()
        return asyncio.run(_foreground(opts, progress))
    except SshnpError as exc:
        progress.error(str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        progress.error("interrupted")
        return EXIT_INTERRUPTED
    except Exception as exc:  # a bug: one line, no traceback unless -v
        log.debug("unexpected error", exc_info=True)
        progress.error(f"unexpected error ({type(exc).__name__}: {exc}); please report it")
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
