"""``python -m noports.agent.standalone --stdio <sshnp args>``: today's per-host client on a
socket handed over by ``sshnp-connect`` when there is no agent (docs/agent.md#fallback).

Why not ``sshnp --stdio`` itself: OpenSSH's ProxyUseFdpass gives the connector one socket,
so the client's stdin and stdout would be the same socket, and ``serve_stdio``'s pipe
transports (one reading, one writing the same fd) misread each other's events. This is the
same set-up as ``sshnp --stdio`` (same arguments, watchdog, messages and exit codes), served
with ``serve_socket`` on fd 0.
"""

from __future__ import annotations

import asyncio
import socket
import sys

from noports.client import watchdog
from noports.client.errors import EXIT_INTERRUPTED, EXIT_USAGE, SshnpError, UsageError
from noports.client.progress import Progress


async def _serve(params: object, progress: Progress, sock: socket.socket) -> int:
    from noports.client.flow import open_session
    try:
        session = await open_session(params, progress=progress)  # type: ignore[arg-type]
    finally:
        watchdog.disarm()
    try:
        await session.tunnel.serve_socket(sock)
    finally:
        session.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    from noports.client.cli import _setup_logging, parse_args
    from noports.client.flow import prestart_session_key, setup_limit
    progress = Progress()
    try:
        opts = parse_args(list(sys.argv[1:] if argv is None else argv))
    except UsageError as exc:
        progress.error(str(exc))
        return EXIT_USAGE
    params = opts.params
    if params is None or opts.output != "stdio":
        progress.error("arguments: the standalone fallback runs only in --stdio mode")
        return EXIT_USAGE
    progress.quiet = opts.quiet
    _setup_logging(opts.verbose)
    if params.tunnel_mode == "aes":
        prestart_session_key()
    watchdog.arm(setup_limit(params))
    try:
        return asyncio.run(_serve(params, progress, socket.socket(fileno=0)))
    except SshnpError as exc:
        progress.error(str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    finally:
        watchdog.disarm()


if __name__ == "__main__":
    sys.exit(main())
