"""`atserver` command line: serve, add, list, remove.

Why this shape: parents (the demo, tests, onboarding) start `atserver serve` and parse one
stderr line per atSign, `atserver @alice listening on HOST:PORT`; secrets never travel in argv
(the CRAM secret is read from a file or generated and written to a 0600 file / stdout).
Bad input gives a one-line error and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from noports import crypto

from . import admin
from .host import ServerConfig


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    try:
        p = int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad port in {text!r}") from None
    if not 0 < p < 65536:
        raise argparse.ArgumentTypeError(f"port out of range in {text!r}")
    return host.strip("[]"), p


def _port(text: str) -> int:
    try:
        p = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port: {text!r}") from None
    if not 0 <= p < 65536:
        raise argparse.ArgumentTypeError(f"port out of range: {p}")
    return p


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {v}")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if math.isnan(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0: {text}")
    return v


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="atserver", description="atServer hosting one or many atSigns")
    parser.add_argument("--log-level", default=os.environ.get("ATSERVER_LOG_LEVEL", "INFO"))
    sub = parser.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    sp = sub.add_parser("serve", help="run the server for every atSign in the state dir")
    sp.add_argument("--state-dir", type=Path, required=True)
    sp.add_argument("--tls-dir", type=Path, required=True,
                    help="CA + server certificate directory (created if missing)")
    sp.add_argument("--root", type=_hostport, default=None, metavar="HOST:PORT",
                    help="atDirectory address (for server-to-server lookups and notifications)")
    sp.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    sp.add_argument("--public-host", default=None,
                    help="host name the directory advertises (default: the bind host)")
    sp.add_argument("--no-autonotify", action="store_true",
                    help="do not notify sharedWith atSigns when shared keys change")
    sp.add_argument("--notification-expiry-mins", type=int, default=24 * 60)
    sp.add_argument("--max-retries", type=int, default=30)
    sp.add_argument("--retry-max-ms", type=int, default=5000,
                    help="cap of the exponential delivery back-off")
    lim = sp.add_argument_group("limits (docs/atserver.md, Limits)")
    lim.add_argument("--max-buffer", type=_positive_int, default=10_240_000, metavar="BYTES",
                     help="max bytes of one command once authenticated (larger: AT0005 and "
                          "close; default 10240000)")
    lim.add_argument("--max-unauth-line", type=_positive_int, default=8192, metavar="BYTES",
                     help="max bytes of one command before cram/pkam/pol (default 8192)")
    lim.add_argument("--max-connections", type=_positive_int, default=2048, metavar="N",
                     help="open connections in total, counted from TCP accept before TLS; "
                          "when full, a new connection closes the oldest one not yet "
                          "authenticated (told AT0012 and the limit), and is refused with "
                          "AT0012 only if every open one is authenticated (default 2048)")
    lim.add_argument("--max-connections-per-ip", type=_positive_int, default=1024, metavar="N",
                     help="open connections per source address (IPv6: per /64; default 1024)")
    lim.add_argument("--tls-handshake-timeout", type=_positive_float, default=10.0,
                     metavar="SECONDS", help="deadline of the TLS handshake (default 10)")
    lim.add_argument("--auth-timeout", type=_positive_float, default=60.0, metavar="SECONDS",
                     help="a connection not authenticated (cram/pkam/pol) this long after "
                          "accept is sent AT0401 and closed (default 60)")
    sp.add_argument("--stats-interval", type=float, default=15.0,
                    help="seconds between stats notifications to monitors (0 = only on writes)")
    sp.add_argument("--static", action="append", default=[], metavar="ATSIGN=HOST:PORT",
                    help="fixed address for an atSign, bypassing the directory (tests)")

    ap = sub.add_parser("add", help="host an atSign (the running server picks it up)")
    ap.add_argument("--state-dir", type=Path, required=True)
    ap.add_argument("atsign")
    ap.add_argument("--port", type=_port, default=0, help="0 = OS-chosen, then persisted")
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--cram-secret-file", type=Path,
                   help="read the CRAM secret from this file ('-' = stdin)")
    g.add_argument("--generate", action="store_true", help="generate a fresh CRAM secret")
    ap.add_argument("--secret-out", type=Path, default=None,
                    help="with --generate: write the secret to this file (mode 0600)")
    ap.add_argument("--print-secret", action="store_true",
                    help="with --generate: print the secret on stdout")
    ap.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                    help="wait until a running server listens and print the port")

    lp = sub.add_parser("list", help="list hosted atSigns and ports")
    lp.add_argument("--state-dir", type=Path, required=True)

    rp = sub.add_parser("remove", help="stop hosting an atSign and delete its data")
    rp.add_argument("--state-dir", type=Path, required=True)
    rp.add_argument("atsign")
    rp.add_argument("--keep-data", action="store_true")
    return parser


def _write_secret(path: Path, secret: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secret + "\n")
    os.chmod(path, 0o600)


def _cmd_add(args: argparse.Namespace) -> int:
    if args.generate:
        if args.secret_out is None and not args.print_secret:
            raise admin.AdminError("--generate needs --secret-out FILE or --print-secret")
        secret = crypto.generate_cram_secret()
    else:
        if args.secret_out or args.print_secret:
            raise admin.AdminError("--secret-out/--print-secret only go with --generate")
        src = args.cram_secret_file
        secret = sys.stdin.readline() if str(src) == "-" else src.read_text(encoding="utf-8")
        secret = secret.strip()
    admin.add_atsign(args.state_dir, args.atsign, secret, args.port)
    if args.generate:
        if args.secret_out is not None:
            _write_secret(args.secret_out, secret)
        if args.print_secret:
            print(secret, flush=True)
    at = admin.normalize_atsign(args.atsign)
    if args.wait > 0:
        port = admin.wait_for_port(args.state_dir, at, args.wait)
        print(f"{at} {port}", file=sys.stderr if args.print_secret else sys.stdout)
    else:
        print(f"added {at}", file=sys.stderr)
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from .server import ServeOptions, announce_stderr, serve

    static: dict[str, tuple[str, int]] = {}
    for item in args.static:
        at, sep, addr = item.partition("=")
        if not sep:
            raise admin.AdminError(f"--static expects ATSIGN=HOST:PORT, got {item!r}")
        try:
            static[admin.normalize_atsign(at)] = _hostport(addr)
        except argparse.ArgumentTypeError as exc:
            raise admin.AdminError(str(exc)) from None
    cfg = ServerConfig(autonotify=not args.no_autonotify,
                       notification_expiry_ms=args.notification_expiry_mins * 60_000,
                       max_retries=args.max_retries, retry_max_ms=args.retry_max_ms,
                       max_buffer=args.max_buffer, stats_interval_s=args.stats_interval,
                       max_unauth_line=args.max_unauth_line,
                       max_connections=args.max_connections,
                       max_connections_per_ip=args.max_connections_per_ip,
                       tls_handshake_timeout_s=args.tls_handshake_timeout,
                       auth_timeout_s=args.auth_timeout)
    opts = ServeOptions(state_dir=args.state_dir, tls_dir=args.tls_dir, root=args.root,
                        bind_host=args.host, public_host=args.public_host, config=cfg,
                        static_map=static, announce=announce_stderr)
    asyncio.run(serve(opts))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        if args.cmd == "serve":
            return _cmd_serve(args)
        if args.cmd == "add":
            return _cmd_add(args)
        if args.cmd == "list":
            for at, port in admin.list_atsigns(args.state_dir).items():
                print(f"{at} {port}")
            return 0
        if args.cmd == "remove":
            if not admin.remove_atsign(args.state_dir, args.atsign, purge=not args.keep_data):
                print(f"atserver: {args.atsign} is not hosted", file=sys.stderr)
                return 1
            return 0
    except admin.AdminError as exc:
        print(f"atserver: error: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError, TimeoutError) as exc:
        print(f"atserver: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
