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
    sp.add_argument("--max-buffer", type=int, default=10_240_000,
                    help="max bytes of one command (larger: AT0005 and close)")
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
                       max_buffer=args.max_buffer, stats_interval_s=args.stats_interval)
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
