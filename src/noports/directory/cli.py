"""``atdirectory``: run the self-hosted root server and manage its registrations.

Why one CLI for both: operators register an atServer (``atdirectory register @alice host:port``)
against the same store the server reads; with SQLite (WAL) that works while the server runs.
Every expected failure is a one-line message and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import ssl
import sys
from collections.abc import Sequence
from pathlib import Path

from noports.cliargs import arg_type, port_type
from noports.keys.ca import TlsFiles, ensure_plane_tls, server_context

from .protocol import MissPolicy
from .server import ServerConfig, serve
from .store import (
    DirectoryStore,
    DirectoryStoreError,
    InvalidAddressError,
    InvalidAtSignError,
    normalise_atsign,
    open_store,
)

log = logging.getLogger("noports.directory")

PROG = "atdirectory"
SUBCOMMANDS = ("serve", "register", "unregister", "lookup", "list")
EXIT_USAGE = 2


class CliError(Exception):
    """An expected failure: printed as one line, exit code 2."""


def default_state_dir() -> Path:
    """``$NOPORTS_STATE_DIR/atdirectory``, else ``$XDG_STATE_HOME/noports/atdirectory``."""
    if os.environ.get("NOPORTS_STATE_DIR"):
        return Path(os.environ["NOPORTS_STATE_DIR"]) / "atdirectory"
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "noports" / "atdirectory"


def _add_store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-dir", type=Path, default=None,
                   help="directory for the default SQLite store and TLS material "
                        "(default: $NOPORTS_STATE_DIR/atdirectory, else "
                        "$XDG_STATE_HOME/noports/atdirectory, else "
                        "~/.local/state/noports/atdirectory)")
    p.add_argument("--store", default=None, metavar="SPEC",
                   help="registration store: sqlite:///ABS/PATH.db, a file path (SQLite), or "
                        "redis://[:PASSWORD@]HOST:PORT/DB (official root layout) "
                        "(default: SQLite file directory.db in --state-dir)")
    p.add_argument("--store-password-file", default=None, metavar="FILE", type=Path,
                   help="file holding the Redis password (keep it out of the URL: argv is "
                        "visible to every user); $NOPORTS_REDIS_PASSWORD also works")


_non_negative = arg_type(float, "a number", lambda v: math.isfinite(v) and v >= 0,
                         "must be a finite number >= 0: {text!r}")
_positive = arg_type(float, "a number", lambda v: math.isfinite(v) and v > 0,
                     "must be a finite number > 0: {text!r}")
_positive_int = arg_type(int, "an integer", lambda v: v >= 1, "must be at least 1: {text!r}")
_line_bytes = arg_type(int, "an integer", lambda v: 2 <= v <= 65536,
                       "must be 2-65536: {text!r}")
_port = port_type("port must be 0-65535: {text!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Self-hosted atDirectory (atProtocol root server): answers 'which host:port "
                    "serves this atSign?' over TLS. Without a subcommand, 'serve' is assumed.")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="logging level on stderr (default: INFO)")
    # Also accepted after the subcommand (the value given last wins).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", default=argparse.SUPPRESS,
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="logging level on stderr (default: INFO)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    d = MissPolicy()
    sp = sub.add_parser("serve", parents=[common], help="run the TLS root server (default command)",
                        description="Run the TLS root server until SIGTERM/SIGINT. Prints "
                                    "'atdirectory listening on HOST:PORT' on stderr once bound.")
    sp.add_argument("--host", default="127.0.0.1",
                    help="address to bind (default: 127.0.0.1; 0.0.0.0 for all IPv4)")
    sp.add_argument("--port", type=_port, default=64,
                    help="TCP port (default: 64, the official root port, needs privileges; "
                         "0 = let the OS choose)")
    _add_store_args(sp)
    sp.add_argument("--tls-dir", type=Path, default=None,
                    help="directory with ca.pem, server.pem (fullchain) and server.key "
                         "(default: STATE_DIR/tls). Missing files are generated (plane CA + "
                         "certificate for --host, localhost, 127.0.0.1 and every --tls-name); "
                         "the certificate is re-issued by that CA when a name is missing. "
                         "Without ca.key, an existing server.pem/server.key is used as is")
    sp.add_argument("--tls-name", action="append", default=[], metavar="NAME",
                    help="extra DNS name or IP for the generated server certificate "
                         "(repeatable; use the name clients dial)")
    c = ServerConfig()
    lim = sp.add_argument_group(
        "connection limits (counted from TCP accept, before TLS; a refused or cut-off peer "
        "gets one 'error:<what>: limit <flag> <value>' line before the close)")
    lim.add_argument("--max-connections", type=_positive_int, default=c.max_connections,
                     metavar="N",
                     help="open connections in total; when full, a new connection closes the "
                          "oldest one never answered (told 'server busy' and the limit), and "
                          "is refused only if every open one was answered "
                          f"(default: {c.max_connections})")
    lim.add_argument("--max-connections-per-ip", type=_positive_int,
                     default=c.max_connections_per_ip, metavar="N",
                     help="open connections from one IPv4 address or IPv6 /64 (default: "
                          f"{c.max_connections_per_ip}; 200 concurrent sshnp sessions from one "
                          "controller stay far below it)")
    lim.add_argument("--handshake-timeout", type=_positive, default=c.handshake_timeout,
                     metavar="SECONDS",
                     help="TLS handshake deadline from TCP accept "
                          f"(default: {c.handshake_timeout:g})")
    lim.add_argument("--request-timeout", type=_positive, default=c.request_timeout,
                     metavar="SECONDS",
                     help="deadline for the first request line after the prompt, for any "
                          "partial line to be completed, and for a reply to be taken by the "
                          f"peer (default: {c.request_timeout:g})")
    lim.add_argument("--idle-timeout", type=_non_negative, default=c.idle_timeout,
                     metavar="SECONDS",
                     help="close connections idle this long after an answered request; "
                          "0 = never (default: 0, because the Python SDK keeps one root "
                          "connection per process and hangs if it is closed)")
    lim.add_argument("--max-line-bytes", type=_line_bytes, default=c.max_line_bytes,
                     metavar="N",
                     help="longest request line, newline included "
                          f"(default: {c.max_line_bytes}, the official root's)")
    lim.add_argument("--max-pending-bytes", type=_positive_int, default=c.max_pending_bytes,
                     metavar="N",
                     help="pipelined request bytes buffered per connection "
                          f"(default: {c.max_pending_bytes})")
    g = sp.add_argument_group("anti-enumeration (misses = lookups answered null)")
    g.add_argument("--miss-burst", type=_non_negative, default=d.conn_burst, metavar="N",
                   help=f"misses per connection answered without delay (default: {d.conn_burst:g})")
    g.add_argument("--miss-refill", type=_non_negative, default=d.conn_refill_per_s,
                   metavar="PER_S",
                   help="per-connection free misses regained per second "
                        f"(default: {d.conn_refill_per_s:g})")
    g.add_argument("--ip-miss-burst", type=_non_negative, default=d.ip_burst, metavar="N",
                   help="misses per peer IP (all its connections) answered without delay "
                        f"(default: {d.ip_burst:g})")
    g.add_argument("--ip-miss-refill", type=_non_negative, default=d.ip_refill_per_s,
                   metavar="PER_S",
                   help=f"per-IP free misses regained per second (default: {d.ip_refill_per_s:g})")
    g.add_argument("--miss-base-delay", type=_non_negative, default=d.base_delay,
                   metavar="SECONDS",
                   help="delay of the first miss beyond the free ones; doubles per further miss "
                        f"(default: {d.base_delay:g})")
    g.add_argument("--miss-max-delay", type=_non_negative, default=d.max_delay, metavar="SECONDS",
                   help="cap on the delay of one miss reply; 0 disables delays "
                        f"(default: {d.max_delay:g})")

    rp = sub.add_parser("register", parents=[common], help="register (or update) an atSign's atServer address",
                        description="Map ATSIGN to HOST:PORT in the store. The running server "
                                    "sees the change on the next lookup.")
    rp.add_argument("atsign", metavar="ATSIGN", help="atSign, with or without '@' (case-insensitive)")
    rp.add_argument("address", metavar="HOST:PORT", help="where the atSign's atServer listens")
    _add_store_args(rp)

    up = sub.add_parser("unregister", parents=[common], help="remove an atSign's registration",
                        description="Remove ATSIGN from the store; exit code 1 if it was not "
                                    "registered.")
    up.add_argument("atsign", metavar="ATSIGN")
    _add_store_args(up)

    lp = sub.add_parser("lookup", parents=[common], help="print an atSign's registered HOST:PORT",
                        description="Print ATSIGN's HOST:PORT from the store (not over the "
                                    "network); exit code 1 if it is not registered.")
    lp.add_argument("atsign", metavar="ATSIGN")
    _add_store_args(lp)

    ls = sub.add_parser("list", parents=[common], help="list all registrations",
                        description="Print one 'ATSIGN HOST:PORT' line per registration "
                                    "(atSigns with '@'), or a JSON object with --json.")
    ls.add_argument("--json", action="store_true", help="print a JSON object instead")
    _add_store_args(ls)
    return parser


def _normalise_argv(argv: Sequence[str]) -> list[str]:
    """Insert the default 'serve' subcommand after the global options when none is given."""
    args = list(argv)
    i = 0
    while i < len(args):
        a = args[i]
        if a in ("-h", "--help") or a in SUBCOMMANDS:
            return args
        if a == "--log-level":
            i += 2
            continue
        if a.startswith("--log-level="):
            i += 1
            continue
        break
    return args[:i] + ["serve"] + args[i:]


def _state_dir(args: argparse.Namespace) -> Path:
    return (args.state_dir or default_state_dir()).expanduser()


def _open(args: argparse.Namespace) -> DirectoryStore:
    spec = args.store or f"sqlite://{(_state_dir(args) / 'directory.db').resolve()}"
    password = None
    if args.store_password_file is not None:
        try:
            password = args.store_password_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise DirectoryStoreError(f"cannot read --store-password-file "
                                      f"{args.store_password_file}: {exc.strerror}") from None
    return open_store(spec, password=password)


def _tls_context(args: argparse.Namespace) -> tuple[ssl.SSLContext, TlsFiles]:
    tls_dir = (args.tls_dir or _state_dir(args) / "tls").expanduser().resolve()
    files = TlsFiles(tls_dir)
    if files.cert.exists() and files.key.exists() and not files.ca_key.exists():
        # Operator-supplied certificate (no CA key here): use as is, never overwrite.
        log.info("using operator-supplied TLS certificate in %s", tls_dir)
    else:
        names = [n for n in [args.host, "localhost", "127.0.0.1", *args.tls_name]
                 if n not in ("0.0.0.0", "::", "")]
        try:
            files = ensure_plane_tls(tls_dir, list(dict.fromkeys(names)))
        except (OSError, ValueError) as exc:
            raise CliError(f"cannot prepare TLS material in {tls_dir}: {exc}") from exc
    try:
        return server_context(files, request_client_cert=False), files
    except (OSError, ssl.SSLError) as exc:
        raise CliError(f"cannot load TLS certificate/key from {tls_dir}: {exc}") from exc


def _cmd_serve(args: argparse.Namespace) -> int:
    try:
        policy = MissPolicy(conn_burst=args.miss_burst, conn_refill_per_s=args.miss_refill,
                            ip_burst=args.ip_miss_burst, ip_refill_per_s=args.ip_miss_refill,
                            base_delay=min(args.miss_base_delay, args.miss_max_delay),
                            max_delay=args.miss_max_delay)
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    ctx, files = _tls_context(args)
    store = _open(args)
    log.info("store: %r; TLS: %s (clients trust %s)", store, files.cert, files.ca_cert)
    config = ServerConfig(host=args.host, port=args.port,
                          max_connections=args.max_connections,
                          max_connections_per_ip=args.max_connections_per_ip,
                          handshake_timeout=args.handshake_timeout,
                          request_timeout=args.request_timeout, idle_timeout=args.idle_timeout,
                          max_line_bytes=args.max_line_bytes,
                          max_pending_bytes=args.max_pending_bytes)

    def on_listening(sockets: list[tuple[str, int]]) -> None:
        for host, port in sockets:
            print(f"atdirectory listening on {host}:{port}", file=sys.stderr, flush=True)

    try:
        asyncio.run(serve(store, ctx, config, policy, on_listening))
    except OSError as exc:
        hint = ""
        if args.port and args.port < 1024 and exc.errno == 13:
            hint = " (ports below 1024 need root or CAP_NET_BIND_SERVICE; try --port 6464)"
        raise CliError(f"cannot listen on {args.host}:{args.port}: "
                       f"{exc.strerror or exc}{hint}") from exc
    finally:
        store.close()
    return 0


def _cmd_register(args: argparse.Namespace) -> int:
    store = _open(args)
    try:
        store.set(args.atsign, args.address)
        print(f"registered @{normalise_atsign(args.atsign)} -> {store.get(args.atsign)}")
    finally:
        store.close()
    return 0


def _cmd_unregister(args: argparse.Namespace) -> int:
    store = _open(args)
    try:
        if store.delete(args.atsign):
            print(f"unregistered {args.atsign}")
            return 0
        print(f"{args.atsign} was not registered", file=sys.stderr)
        return 1
    finally:
        store.close()


def _cmd_lookup(args: argparse.Namespace) -> int:
    store = _open(args)
    try:
        address = store.get(args.atsign)
    finally:
        store.close()
    if address is None:
        print(f"{args.atsign} is not registered", file=sys.stderr)
        return 1
    print(address)
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    store = _open(args)
    try:
        entries = store.list()
    finally:
        store.close()
    if args.json:
        print(json.dumps({f"@{k}": v for k, v in entries.items()}, ensure_ascii=False, indent=2))
    else:
        for key, address in entries.items():
            print(f"@{key} {address}")
    return 0


COMMANDS = {"serve": _cmd_serve, "register": _cmd_register, "unregister": _cmd_unregister,
            "lookup": _cmd_lookup, "list": _cmd_list}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``atdirectory`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(_normalise_argv(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=getattr(logging, args.log_level),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except (CliError, DirectoryStoreError, InvalidAtSignError, InvalidAddressError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
