"""Per-connection protocol logic of the atServer: bytes in, framed replies out (no sockets).

Why this shape: the reply framing (one write of `<body>\\n<prompt>`, bare pol reply, no prompts
in monitor mode), the authentication states and every verb's semantics are what the Python SDK
and Dart clients depend on byte for byte (reference §2, §3, §7). The session owns the input
framing (:meth:`Session.feed` / :meth:`Session.next_line`, with the line limit of the current
auth state checked before anything is parsed) and dispatches through an explicit verb table
(:data:`VERBS`: handler, who may call it, its line limit); the verbs themselves live in one
module per family (verbs_auth, verbs_keys, verbs_notify, verbs_monitor, verbs_misc). The
asyncio edge (server.py) only moves bytes: it feeds what it reads and writes what comes back;
asynchronous monitor lines go through the `emit` callback.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from noports.atprotocol.errors import (
    AtError,
    buffer_overflow,
    invalid_syntax,
    unauthenticated,
)
from noports.atprotocol.grammar import Command, parse_command

from . import verbs_auth, verbs_keys, verbs_misc, verbs_monitor, verbs_notify
from .context import Conn, Reply, dumps, remove_nulls
from .host import Host, fresh_meta_storage
from .s2s import RemoteError
from .store import NotificationRow

log = logging.getLogger("noports.atserver.session")

__all__ = ["VERBS", "Reply", "Session", "Verb", "dumps", "fresh_meta_storage", "remove_nulls"]

Handler = Callable[[Conn, Command], Awaitable[Reply]]

ANY = "any"      # the handler decides (pre-auth verbs; pol-only rules live in the handler)
OWNER = "owner"  # needs cram/pkam authentication (reference §2.6 `requiresAuth`)


@dataclass(frozen=True)
class Verb:
    """One row of the verb table."""

    handler: Handler | None  # None: recognised but not supported by this server
    access: str = ANY
    line_limit: int | None = None  # bytes; None = the server's --max-buffer


VERBS: dict[str, Verb] = {
    # authentication
    "from": Verb(verbs_auth.v_from),
    "cram": Verb(verbs_auth.v_cram),
    "pkam": Verb(verbs_auth.v_pkam),
    "pol": Verb(verbs_auth.v_pol),
    "enroll": Verb(verbs_auth.v_enroll),
    # keys
    "update": Verb(verbs_keys.v_update, OWNER),
    "update_json": Verb(verbs_keys.v_update_json, OWNER),
    "update_meta": Verb(verbs_keys.v_update_meta, OWNER),
    "llookup": Verb(verbs_keys.v_llookup, OWNER),
    "lookup": Verb(verbs_keys.v_lookup),
    "plookup": Verb(verbs_keys.v_plookup, OWNER),
    "delete": Verb(verbs_keys.v_delete, OWNER),
    "scan": Verb(verbs_keys.v_scan),
    # notifications
    "notify": Verb(verbs_notify.v_notify),
    "notify_list": Verb(verbs_notify.v_notify_list),
    "notify_status": Verb(verbs_notify.v_notify_status),
    "notify_fetch": Verb(verbs_notify.v_notify_fetch, OWNER),
    "notify_remove": Verb(verbs_notify.v_notify_remove, OWNER),
    "notify_all": Verb(verbs_notify.v_notify_all, OWNER),
    # monitor
    "monitor": Verb(verbs_monitor.v_monitor, OWNER),
    # utility
    "noop": Verb(verbs_misc.v_noop),
    "info": Verb(verbs_misc.v_info),
    "stats": Verb(verbs_misc.v_stats, OWNER),
    "sync": Verb(verbs_misc.v_sync, OWNER),
    "batch": Verb(verbs_misc.v_batch, OWNER),
    # recognised by the grammar, not supported here
    "config": Verb(None, OWNER),
    "otp": Verb(None, OWNER),
    "keys": Verb(None, OWNER),
}


class Session(Conn):
    """One inbound connection's protocol state machine."""

    def __init__(self, host: Host, emit: Callable[[str], None] | None = None,
                 session_id: str | None = None) -> None:
        super().__init__(host, emit, session_id)
        self._buf = bytearray()
        self._scanned = 0  # bytes of _buf already known to hold no newline

    # --- input framing ------------------------------------------------------------------

    def line_limit(self) -> int:
        """Longest request line accepted in the current state (bytes, without the newline)."""
        return self.host.config.max_buffer

    def feed(self, data: bytes) -> None:
        """Append bytes read from the peer; take requests out with :meth:`next_line`."""
        self._buf += data

    def next_line(self) -> str | Reply | None:
        """The next complete request line, a Reply to send instead, or None (need more bytes).

        The limit is checked before a line is decoded or parsed. A Reply with close=True ends
        the connection (overflow); other Replies (undecodable line) are sent and reading goes on.
        """
        limit = self.line_limit()
        while True:
            i = self._buf.find(b"\n", self._scanned)
            if i < 0:
                self._scanned = len(self._buf)
                if len(self._buf) > limit:
                    return self._overflow(limit)
                return None
            raw = bytes(self._buf[:i])
            del self._buf[:i + 1]
            self._scanned = 0
            if len(raw) > limit:
                return self._overflow(limit)
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                return self.error(invalid_syntax("command is not valid UTF-8"))
            if line:
                return line

    def _overflow(self, limit: int) -> Reply:
        self._buf.clear()
        self._scanned = 0
        return self.error(buffer_overflow(f"Message exceeds the buffer limit of {limit} bytes"))

    # --- entry point --------------------------------------------------------------------

    async def handle(self, line: str) -> Reply:
        """Execute one request line; never raises (unexpected failures → AT0011 + close)."""
        try:
            cmd = parse_command(line)
            if cmd.verb == "exit":
                self.closed = True
                return Reply(None, close=True)
            verb = VERBS.get(cmd.verb)
            if verb is not None and verb.access == OWNER and not self.authenticated:
                raise unauthenticated("Command cannot be executed without auth")
            if verb is None or verb.handler is None:
                raise invalid_syntax(f"{cmd.verb} is not supported by this server")
            return await verb.handler(self, cmd)
        except AtError as err:
            # Bad input never costs the client its connection (the reference closes on an
            # invalid atSign); only overflow and truly unexpected failures close.
            return self.error(AtError(err.code, err.message, close=err.code == "AT0005"))
        except RemoteError as err:
            return self.error(AtError(err.code, err.message))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the connection and server must survive
            log.exception("internal error on %s handling a %s command", self.me,
                          line.split(":", 1)[0][:20] if isinstance(line, str) else "?")
            return self.error(AtError("AT0011", f"Internal server exception: {type(exc).__name__}",
                                      close=True))

    # --- monitor sink (called by the host) ----------------------------------------------

    def store_received(self, n: Any, kind: str = "received") -> NotificationRow:
        return verbs_notify.store_received(self, n, kind)

    def deliver_notification(self, row: NotificationRow, n: Any) -> None:
        verbs_monitor.deliver_notification(self, row, n)

    def deliver_stats(self, last_commit_id: int, now: int) -> None:
        verbs_monitor.deliver_stats(self, last_commit_id, now)

    def close(self) -> None:
        """Connection gone: stop receiving monitor lines."""
        self.closed = True
        self.host.monitors.discard(self)
