"""``srvd``: the socket rendezvous daemon (docs/reference/noports-protocol.md#srvd-flags, docs/reference/noports-protocol.md#socket-rendezvous).

Flags follow the official srvd where they exist (``-a``, ``-k``, ``-i/--ip``, ``-m``,
``--root-domain``, ``-v``); the rest (``--bind``, ``--ca-file``, ``--allow-list``, limits) are
ours. Why ``-m`` is compared with the notification's sender and not with ``atSignA``: see
:mod:`noports.relay.srvd`. Secrets come only from the .atKeys file, never from argv.

Exit codes: 0 after SIGTERM/SIGINT, 1 on a fatal runtime error, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import random
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from noports.cliargs import arg_type
from noports.npproto.errors import ProtocolError
from noports.npproto.keys import normalize_atsign

from .server import RelayConfig
from .srvd import OPEN, Srvd, SrvdPolicy, parse_allow_list, validate_advertise

log = logging.getLogger("noports.relay.srvd")

PROG = "srvd"
EXIT_USAGE = 2
CONNECT_ATTEMPTS = 8


class CliError(Exception):
    """An expected failure: printed as one line, exit code 2."""


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        return text, 64
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST[:PORT], got {text!r}")
    return host.strip("[]"), int(port)


_positive_int = arg_type(int, "an integer", lambda v: v > 0, "must be > 0: {text!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description="NoPorts socket rendezvous: answers request_ports "
        "notifications with two ports and splices the sockets that authenticate on them.")
    p.add_argument("-a", "--atsign", required=True, help="the relay's atSign")
    p.add_argument("-k", "--key-file", type=Path, default=None,
                   help="its .atKeys file (default ~/.atsign/keys/<atsign>_key.atKeys)")
    p.add_argument("--root-domain", type=_host_port, default=("root.atsign.org", 64),
                   metavar="HOST[:PORT]", help="atDirectory (default root.atsign.org:64)")
    p.add_argument("--ca-file", type=Path, default=None,
                   help="CA certificate(s) to trust for the plane (default: system store)")
    p.add_argument("-i", "--ip", required=True, metavar="ADDRESS",
                   help="host name or IP sent to clients in replies (advertised address)")
    p.add_argument("--bind", default="0.0.0.0", metavar="ADDR",
                   help="address the per-session ports listen on (default 0.0.0.0)")
    p.add_argument("-m", "--manager", action="append", default=[], metavar="ATSIGN",
                   help="atSign allowed to request sessions (repeatable, commas allowed); "
                        "'open' = anyone (the default when neither -m nor --allow-list)")
    p.add_argument("--allow-list", type=Path, default=None, metavar="FILE",
                   help="file of allowed atSigns, one per line, '#' comments; re-read on SIGHUP")
    p.add_argument("--require-socket-auth", action="store_true",
                   help="refuse requests that do not authenticate both sockets "
                        "(and legacy requests)")
    p.add_argument("--no-legacy", action="store_true",
                   help="refuse legacy '<device>.sshrvd' requests")
    p.add_argument("--max-sessions", type=_positive_int, default=10_000,
                   help="sessions open at once, relay-wide (default 10000); a request beyond "
                        "it is refused with a NACK naming this flag")
    p.add_argument("--max-sessions-per-atsign", type=_positive_int, default=1000,
                   help="sessions one requesting atSign may have open or being opened "
                        "(default 1000); beyond it: NACK naming this flag")
    p.add_argument("--idle-timeout", type=float, default=3600.0,
                   help="close a pair that relayed nothing for this many seconds (default 3600)")
    p.add_argument("--443", "--bind443", dest="bind443", action="store_true",
                   help="also serve single-port sessions (the official --443): one listening "
                        "port carries both sides of every session whose request asks for it "
                        "(only443), each socket found by its ESCR authentication; for devices "
                        "and clients that may only connect out to tcp/443")
    p.add_argument("--443-bind-port", "--bindPort", dest="bind_port", type=_port, default=443,
                   metavar="PORT", help="the port the single-port listener binds (default 443; "
                   "e.g. 8443 behind a forward from 443; 0 = any free port, for tests)")
    p.add_argument("--443-public-port", dest="public_port", type=_port, default=None,
                   metavar="PORT", help="the port sent to clients for single-port sessions "
                   "(default: the bound port; the official srvd always sends 443)")
    p.add_argument("--test-reply-delay", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


_port = arg_type(int, "a port number", lambda v: 0 <= v < 65536, "must be 0..65535: {text!r}")


def _allowed(args: argparse.Namespace) -> frozenset[str] | None:
    managers: list[str] = [m for raw in args.manager for m in raw.replace(",", " ").split()]
    is_open = any(m.lower() == OPEN for m in managers)
    named = [m for m in managers if m.lower() != OPEN]
    if is_open and (named or args.allow_list):
        raise CliError("'-m open' cannot be combined with other -m values or --allow-list")
    if is_open or (not named and args.allow_list is None):
        return None
    try:
        allowed = {normalize_atsign(m) for m in named}
        if args.allow_list is not None:
            allowed |= read_allow_list(args.allow_list)
    except ProtocolError as exc:
        raise CliError(str(exc)) from None
    if not allowed:
        raise CliError("the allow-list is empty: nobody could use this relay")
    return frozenset(allowed)


def read_allow_list(path: Path) -> frozenset[str]:
    try:
        return parse_allow_list(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CliError(f"{path}: cannot read the allow-list: {exc.strerror or exc}") from None
    except ProtocolError as exc:
        raise CliError(f"{path}: {exc}") from None


async def _connect(args: argparse.Namespace, keys, ssl_ctx, stop: asyncio.Event):  # noqa: ANN001, ANN202
    """Connect with bounded, jittered retries (the plane may start after us)."""
    from noports.atclient.aio import AtClient, AtClientError

    for attempt in range(CONNECT_ATTEMPTS):
        try:
            return await AtClient.connect(keys.atsign, keys, args.root_domain, ssl_ctx)
        except (AtClientError, OSError) as exc:
            if attempt == CONNECT_ATTEMPTS - 1:
                raise
            delay = min(30.0, 0.5 * 2 ** attempt) * random.uniform(0.5, 1.0)
            log.warning("cannot reach the atServer of %s (%s); retrying in %.1fs", keys.atsign,
                        exc, delay)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            if stop.is_set():
                return None
    return None


async def run(args: argparse.Namespace) -> int:
    from noports.keys.atkeys import AtKeysError, default_keys_path, load_atkeys
    from noports.keys.ca import client_context

    atsign = normalize_atsign(args.atsign)
    allowed = _allowed(args)
    advertise = validate_advertise(args.ip)
    try:
        keys = load_atkeys(args.key_file or default_keys_path(atsign), atsign)
    except AtKeysError as exc:
        raise CliError(str(exc)) from None
    if args.ca_file is not None and not args.ca_file.is_file():
        raise CliError(f"{args.ca_file}: no such CA file")
    ssl_ctx = client_context(args.ca_file)
    policy = SrvdPolicy(atsign, allowed, allow_legacy=not args.no_legacy,
                        require_socket_auth=args.require_socket_auth,
                        max_sessions_per_sender=args.max_sessions_per_atsign,
                        single_port=args.bind443)
    if allowed is None:
        log.warning("relay is open: any atSign may request sessions (use -m or --allow-list)")

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    client = await _connect(args, keys, ssl_ctx, stop)
    if client is None:
        return 0
    cfg = RelayConfig(bind_host=args.bind, max_sessions=args.max_sessions,
                      idle_timeout=args.idle_timeout if args.idle_timeout > 0 else None)
    srvd = Srvd(client, policy, advertise, relay_config=cfg,
                single_port=args.bind_port if args.bind443 else None,
                single_port_public=args.public_port, reply_delay=args.test_reply_delay)
    if args.bind443:
        try:
            port = srvd.start_single_port(args.bind)
        except OSError as exc:
            await client.close()
            raise CliError(f"--443: cannot listen on {args.bind}:{args.bind_port}: "
                           f"{exc.strerror or exc} (port 443 needs root or "
                           "CAP_NET_BIND_SERVICE; or use --443-bind-port)") from None
        log.info("single port %d (advertised as %d)", port, srvd.single_port_public)

    def reload_allow_list() -> None:
        if args.allow_list is None:
            log.info("SIGHUP: no --allow-list to re-read")
            return
        try:
            fresh = _allowed(args)
        except CliError as exc:
            log.error("SIGHUP: allow-list not reloaded: %s", exc)
            return
        srvd.policy = dataclasses.replace(srvd.policy, allowed=fresh)
        log.info("SIGHUP: allow-list reloaded (%d atSign(s))", len(fresh or ()))

    loop.add_signal_handler(signal.SIGHUP, reload_allow_list)
    try:
        await srvd.serve(client.monitor, stop)
    finally:
        await srvd.aclose()
        await client.close()
        log.info("srvd %s stopped (%d session(s) opened, %d request(s) refused)", atsign,
                 srvd.opened, srvd.refused)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        return asyncio.run(run(args))
    except (CliError, ValueError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 0
    except Exception as exc:  # fatal at runtime (e.g. the plane never came up): one line
        log.debug("fatal error", exc_info=True)
        print(f"{PROG}: fatal: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
