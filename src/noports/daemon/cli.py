"""``sshnpd`` command line: flags of the official daemon plus ours, config file, logging.

Why ``-h`` is not help: the official daemon uses ``-h`` for ``--hide`` and scripts that start
it rely on that; help is ``--help``. Bad input gives one line on stderr and exit status 2,
never a traceback; secrets never come from argv (the .atKeys file holds them).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

from . import DAEMON_VERSION
from .config import (
    DEFAULT_HOST_KEYS,
    ConfigError,
    DaemonConfig,
    build_config,
    load_config_file,
)

log = logging.getLogger("noports.sshnpd")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    """All options default to SUPPRESS so a config file can fill what argv leaves out."""
    S = argparse.SUPPRESS
    p = _Parser(prog="sshnpd", add_help=False, argument_default=S,
                description="NoPorts device daemon: answers sshnp clients over the atProtocol "
                            "and joins their sessions to the local sshd, with no listening "
                            "port.")
    p.add_argument("--help", action="help", help="show this help and exit")
    p.add_argument("--version", action="version", version=f"sshnpd {DAEMON_VERSION}")
    p.add_argument("--config", metavar="FILE",
                   help="config file (key=value, .toml or .json) mirroring the long flags, or "
                        "the official daemon's sshnpd.yaml layout (.yaml/.yml); flags "
                        "override it")
    p.add_argument("-a", "--atsign", help="this device's atSign (required)")
    p.add_argument("-m", "--managers", "--manager", dest="managers", action="append",
                   metavar="ATSIGNS", help="client atSign(s) allowed to use this device; "
                                           "comma-separated and/or repeated (required)")
    p.add_argument("-d", "--device", help="device name (default: default)")
    p.add_argument("--permit-open", "--po", dest="permit_open", action="append",
                   metavar="HOST:PORT", help="targets clients may reach, comma-separated, * "
                                             "wildcards (default: localhost:22)")
    p.add_argument("--local-sshd-port", type=int, metavar="PORT",
                   help="port of the local sshd (default: 22)")
    p.add_argument("-s", "--sshpublickey", action="store_true",
                   help="accept clients' ssh public keys into authorized_keys")
    p.add_argument("--no-sshpublickey", dest="sshpublickey", action="store_false")
    p.add_argument("-S", "--sshpublickey-permissions", metavar="OPTIONS",
                   help="authorized_keys options for keys accepted with -s")
    p.add_argument("-h", "--hide", action="store_true",
                   help="do not share username and device_info with the managers")
    p.add_argument("-u", "--un-hide", "--username", dest="un_hide", action="store_true",
                   help=S)  # deprecated official flag: sharing is the default
    p.add_argument("-k", "--key-file", metavar="FILE",
                   help="the device's .atKeys (default ~/.atsign/keys/<@atsign>_key.atKeys)")
    p.add_argument("--root-domain", metavar="HOST[:PORT]",
                   help="atDirectory (default root.atsign.org:64)")
    p.add_argument("--ca-file", metavar="FILE",
                   help="CA certificate(s) to trust for a self-hosted plane")
    p.add_argument("--authorized-keys", metavar="PATH",
                   help="authorized_keys file to manage (default ~/.ssh/authorized_keys)")
    p.add_argument("--sshd-host-keys", metavar="GLOB",
                   help=f"sshd host public keys to pin (default {DEFAULT_HOST_KEYS})")
    p.add_argument("--ephemeral-permissions", metavar="OPTIONS",
                   help="extra authorized_keys options for ephemeral session keys")
    p.add_argument("--ssh-algorithm", choices=("ssh-ed25519", "ssh-rsa"),
                   help="ephemeral key type (default ssh-ed25519)")
    p.add_argument("--device-group", "--dg", dest="device_group",
                   help="device group name reported in pings (default __none__)")
    p.add_argument("--ephemeral-key-ttl", type=float, metavar="SECONDS",
                   help="seconds an ephemeral key stays authorized (default 15)")
    p.add_argument("--max-sessions", type=int, metavar="N",
                   help="concurrent sessions (default 64)")
    p.add_argument("--request-window", type=float, metavar="SECONDS",
                   help="refuse session requests whose timestamp (clientNonce) differs from "
                        "this device's clock by more than this (default 60)")
    p.add_argument("--any-client-timezone", action="store_true",
                   help="also accept zone-less timestamps (official clients send local time) "
                        "off by a whole time zone offset; the window still applies to the rest")
    p.add_argument("--storage-path", metavar="DIR",
                   help="directory for state kept across restarts: the replay memory "
                        "(default ~/.atsign/storage/<@atsign>/..sshnpd/<device>)")
    p.add_argument("--monitor-heartbeat", type=float, metavar="SECONDS",
                   help="send noop:0 on the notification connection after this long without "
                        "traffic; no answer within min(5, SECONDS/2) = dead connection, "
                        "reconnect (back-off capped at 4 s) (default 15)")
    p.add_argument("--session-host-idle", dest="session_host_idle", type=float,
                   metavar="SECONDS",
                   help="after this long without sessions, replace the session host by a "
                        "fresh one that loads its session code with the next session "
                        "(~13 MiB less memory while idle); 0 = keep it loaded (default 300)")
    p.add_argument("-p", "--policy-manager", dest="policy_manager", help=S)
    p.add_argument("--doctor", action="store_true",
                   help="check config, keys and file modes, sshd, authorized_keys, atDirectory "
                        "and atServer reachability, TLS trust, clock skew and the service; "
                        "print what to fix; exit 0 when healthy, 1 otherwise")
    p.add_argument("--service-name", metavar="NAME",
                   help="--doctor: systemd unit to check (default sshnpd)")
    p.add_argument("--pid-file", metavar="FILE",
                   help="--doctor without systemd: the runner's pid file "
                        "(default /run/noports/sshnpd.pid)")
    p.add_argument("--log-format", choices=("text", "json"), help="log format (default text)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    # test-only (docs/official-peers.md): reply to sshnp as official daemons do
    p.add_argument("--test-official-reply", dest="official_reply", action="store_true",
                   help=S)
    return p


_DOCTOR_ONLY = ("doctor", "service_name", "pid_file")


def parse_args(argv: Sequence[str] | None) -> DaemonConfig:
    """argv (+ config file) -> DaemonConfig; ConfigError for anything unusable."""
    return _parse(argv)[0]


def _parse(argv: Sequence[str] | None) -> tuple[DaemonConfig, dict[str, Any]]:
    ns = vars(build_parser().parse_args(argv))
    extra = {k: ns.pop(k) for k in _DOCTOR_ONLY if k in ns}
    if ns.pop("policy_manager", None) is not None:
        raise ConfigError("-p/--policy-manager (NPA policy service) is not supported; use -m")
    ns.pop("un_hide", None)
    settings: dict[str, Any] = {}
    if "config" in ns:
        settings.update(load_config_file(ns.pop("config")))
    official = bool(ns.pop("official_reply", False))
    settings.update(ns)
    cfg = build_config(settings)
    if official:
        cfg = dataclasses.replace(cfg, official_reply=True)
    return cfg, extra


# --- logging ---------------------------------------------------------------------------------

_EXTRA_FIELDS = ("event", "sender", "session")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg and our extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(), "logger": record.name,
            "msg": record.getMessage()}
        for name in _EXTRA_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                out[name] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def setup_logging(fmt: str, verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


# --- main ------------------------------------------------------------------------------------

async def _amain(cfg: DaemonConfig) -> int:
    from noports.keys.atkeys import AtKeysError, load_atkeys
    from noports.keys.ca import client_context

    from .service import Daemon, DaemonError

    try:
        keys = load_atkeys(cfg.keys_path, cfg.atsign)
    except (AtKeysError, OSError) as exc:
        log.error("cannot load keys: %s", exc)
        return 2
    try:
        ssl_ctx = client_context(cfg.ca_file)
    except (OSError, ValueError) as exc:
        log.error("cannot load --ca-file %s: %s", cfg.ca_file, exc)
        return 2
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("sshnpd %s starting for %s device %r", DAEMON_VERSION, cfg.atsign, cfg.device)
    try:
        return await Daemon(cfg, keys, ssl_ctx=ssl_ctx).run(stop)
    except DaemonError as exc:
        log.error("%s", exc)
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    try:
        cfg, extra = _parse(argv)
    except ConfigError as exc:
        print(f"sshnpd: error: {exc}", file=sys.stderr)
        return 2
    if extra.get("doctor"):
        from pathlib import Path

        from .doctor import run_doctor
        logging.basicConfig(level=logging.DEBUG if cfg.verbose else logging.WARNING)
        return run_doctor(cfg, service=extra.get("service_name") or "sshnpd",
                          pid_file=Path(extra.get("pid_file") or "/run/noports/sshnpd.pid"))
    setup_logging(cfg.log_format, cfg.verbose)
    try:
        return asyncio.run(_amain(cfg))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
