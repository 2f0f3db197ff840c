"""``python -m noports.agent --dir D --idle S``: what ``sshnp-connect`` starts (docs/agent.md)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from . import paths
from .plane import DEFAULT_CACHE_TTL_S
from .server import Agent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m noports.agent",
                                 description="the sshnp controller agent (docs/agent.md)")
    ap.add_argument("--dir", default=None, help="private directory (default: "
                    f"${paths.ENV_DIR}, else $XDG_RUNTIME_DIR/sshnp-agent)")
    ap.add_argument("--idle", type=float, default=paths.DEFAULT_IDLE_S,
                    help="exit after this many seconds without a tunnel or request")
    ap.add_argument("--cache-ttl", type=float, default=DEFAULT_CACHE_TTL_S,
                    help="seconds public keys and device info are reused")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        stream=sys.stderr,
                        format="sshnp-agent %(asctime)s %(name)s %(levelname)s: %(message)s")
    try:
        d = paths.ensure_dir(args.dir or paths.default_dir())
    except paths.AgentDirError as exc:
        print(f"sshnp-agent: error: {exc}", file=sys.stderr)
        return 1
    return asyncio.run(Agent(d, args.idle, args.cache_ttl).run())


if __name__ == "__main__":
    sys.exit(main())
