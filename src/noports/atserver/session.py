"""Per-connection protocol logic of the atServer: bytes in, framed replies out (no sockets).

Why this shape: the reply framing (one write of `<body>\\n<prompt>`, bare pol reply, no prompts
in monitor mode), the authentication states and every verb's semantics are what the Python SDK
and Dart clients depend on byte for byte (docs/reference/atprotocol.md#atserver-transport,
docs/reference/atprotocol.md#verbs, docs/reference/atprotocol.md#notifications). The session owns
the input
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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from noports import trace
from noports.atprotocol.errors import (
    AtError,
    RemoteError,
    buffer_overflow,
    invalid_syntax,
    unauthenticated,
)
from noports.atprotocol.grammar import Command, parse_command

from . import (
    enrollment,
    verbs_auth,
    verbs_enroll,
    verbs_keys,
    verbs_misc,
    verbs_monitor,
    verbs_notify,
)
from .context import Conn, Reply, dumps, remove_nulls
from .host import Host, fresh_meta_storage
from .store import NotificationRow

log = logging.getLogger("noports.atserver.session")

__all__ = ["VERBS", "Reply", "Session", "Verb", "dumps", "fresh_meta_storage", "remove_nulls"]

Handler = Callable[[Conn, Command], Awaitable[Reply]]

ANY = "any"      # the handler decides (pre-auth verbs; pol-only rules live in the handler)
OWNER = "owner"  # needs cram/pkam authentication (docs/reference/atprotocol.md#connection-states `requiresAuth`)


@dataclass(frozen=True)
class Verb:
    """One row of the verb table."""

    handler: Handler | None  # None: recognised but not supported by this server
    access: str = ANY
    line_limit: int | None = None  # bytes; None = the server's --max-buffer


# Line limits of verbs whose syntax has no free-form value: a key is at most 255 characters
# (docs/reference/atprotocol.md#keys), a pkam line with an RSA-4096 signature and an enrollment id under 1 KiB, a
# client regex a few hundred bytes in practice. The grammar's regexes cost up to quadratic
# time in the line length, so these also bound the parse.
TINY, SHORT, KEYED = 256, 1024, 2048
# enroll:request/approve carry an APKAM public key and RSA-encrypted AES keys (~1.5 KiB).
ENROLL = 6144
# Lines up to this size parse in well under a millisecond; longer ones (and every notify:all,
# whose grammar is the slowest) are parsed in a worker thread (`regex` releases the GIL), so
# no line stalls the event loop for other connections.
PARSE_INLINE_MAX = 512
# Empty lines answered before cram/pkam/pol: at_c sends one per connection; the next one past
# this limit closes the connection (docs/atserver.md "Limits").
MAX_EMPTY_LINES_UNAUTH = 16
_PARSE_POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="atserver-parse")

VERBS: dict[str, Verb] = {
    # authentication (pre-auth)
    "from": Verb(verbs_auth.v_from, ANY, KEYED),
    "cram": Verb(verbs_auth.v_cram, ANY, SHORT),
    "pkam": Verb(verbs_auth.v_pkam, ANY, KEYED),
    "pol": Verb(verbs_auth.v_pol, ANY, TINY),
    "enroll": Verb(verbs_enroll.v_enroll, ANY, ENROLL),
    # keys
    "update": Verb(verbs_keys.v_update, OWNER),
    "update_json": Verb(verbs_keys.v_update_json, OWNER),
    "update_meta": Verb(verbs_keys.v_update_meta, OWNER, 65536),
    "llookup": Verb(verbs_keys.v_llookup, OWNER, KEYED),
    "lookup": Verb(verbs_keys.v_lookup, ANY, KEYED),
    "plookup": Verb(verbs_keys.v_plookup, OWNER, KEYED),
    "delete": Verb(verbs_keys.v_delete, OWNER, KEYED),
    "scan": Verb(verbs_keys.v_scan, ANY, KEYED),
    # notifications (notify itself: pol peers deliver, owners send; checked in the handler)
    "notify": Verb(verbs_notify.v_notify),
    "notify_list": Verb(verbs_notify.v_notify_list, ANY, KEYED),
    "notify_status": Verb(verbs_notify.v_notify_status, ANY, SHORT),
    "notify_fetch": Verb(verbs_notify.v_notify_fetch, OWNER, SHORT),
    "notify_remove": Verb(verbs_notify.v_notify_remove, OWNER, SHORT),
    "notify_all": Verb(verbs_notify.v_notify_all, OWNER, 65536),
    # monitor
    "monitor": Verb(verbs_monitor.v_monitor, OWNER, KEYED),
    # utility
    "noop": Verb(verbs_misc.v_noop, ANY, TINY),
    "info": Verb(verbs_misc.v_info, ANY, TINY),
    "stats": Verb(verbs_misc.v_stats, OWNER, SHORT),
    "sync": Verb(verbs_misc.v_sync, OWNER, KEYED),
    "batch": Verb(verbs_misc.v_batch, OWNER),
    # recognised by the grammar, not supported here
    "config": Verb(None, OWNER, SHORT),
    "otp": Verb(verbs_enroll.v_otp, OWNER, TINY),
    "keys": Verb(None, OWNER, KEYED),
}

# Which table row a line belongs to, from its first bytes only (same accept order as the
# grammar, docs/reference/atprotocol.md#command-dispatch step 3), so limits and auth are checked before the line is parsed.
_PREFIXES: tuple[tuple[str, str], ...] = (
    ("from:", "from"), ("cram:", "cram"), ("pkam:", "pkam"), ("update:meta", "update_meta"),
    ("update:", "update"), ("llookup:", "llookup"), ("plookup:", "plookup"),
    ("lookup:", "lookup"), ("scan", "scan"), ("delete:", "delete"), ("stats", "stats"),
    ("config:", "config"), ("monitor", "monitor"), ("notify:list", "notify_list"),
    ("notify:status", "notify_status"), ("notify:all", "notify_all"),
    ("notify:remove", "notify_remove"), ("notify:fetch", "notify_fetch"),
    ("notify:", "notify"), ("batch:", "batch"), ("sync:from", "sync"), ("noop:", "noop"),
    ("enroll:", "enroll"), ("otp:", "otp"), ("keys:", "keys"),
)


def classify(line: str) -> str | None:
    """Verb-table row of a request line (None: not a known verb), looking at its head only."""
    head = line[:32].lstrip()
    i = head.find(":")
    head = head.lower() if i < 0 else head[:i].lower().replace(" ", "") + head[i:]
    if head in ("pol", "info"):
        return head
    if head.startswith("info:"):
        return "info"
    for prefix, verb in _PREFIXES:
        if head.startswith(prefix):
            return verb
    return None


class Session(Conn):
    """One inbound connection's protocol state machine."""

    def __init__(self, host: Host, emit: Callable[[str], None] | None = None,
                 session_id: str | None = None) -> None:
        super().__init__(host, emit, session_id)
        self._buf = bytearray()
        self._scanned = 0  # bytes of _buf already known to hold no newline
        self.empty_lines = 0  # empty lines answered before authentication

    # --- input framing ------------------------------------------------------------------

    def line_limit(self) -> int:
        """Longest request line accepted in the current state (bytes, without the newline).

        Before cram/pkam/pol only the short pre-auth verbs can succeed, so a connection that
        has not proved who it is may not make the server hold more than --max-unauth-line.
        """
        cfg = self.host.config
        if self.authenticated or self.pol_atsign:
            return cfg.max_buffer
        return min(cfg.max_unauth_line, cfg.max_buffer)

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
            return self._empty_line()

    def _empty_line(self) -> Reply:
        """The reply to an empty line (`\\n`, `\\r\\n`, blanks): the official server's.

        at_c sends `\\r\\n` right after the `@` prompt of every connection and reads one
        reply (within 3 s) before `from:`; the official server dispatches the empty command,
        finds no verb and answers AT0003 `invalid command`. Replying is what makes at_c work;
        before authentication the count is bounded (MAX_EMPTY_LINES_UNAUTH), so a stream of
        newlines cannot make the server write ~40 bytes per byte received indefinitely.
        """
        self.requests += 1
        if not (self.authenticated or self.pol_atsign):
            self.empty_lines += 1
            if self.empty_lines > MAX_EMPTY_LINES_UNAUTH:
                self._buf.clear()
                self._scanned = 0
                return self.error(AtError(
                    "AT0003", f"more than {MAX_EMPTY_LINES_UNAUTH} empty lines before "
                    "authentication; closing", close=True))
        return self.error(invalid_syntax("invalid command"))

    def auth_timed_out(self) -> Reply:
        """The closing reply for a connection that did not authenticate in time.

        A connection that has made requests is a client between two of them (e.g. another
        atServer's pooled connection for public lookups): a line it did not ask for would be
        read as the reply to its next request, so it is closed without one and reconnects.
        """
        if self.requests:
            return Reply(None, close=True)
        t = self.host.config.auth_timeout_s
        return self.error(AtError("AT0401", f"not authenticated within {t:g} s "
                                            "(--auth-timeout); closing", close=True))

    def _overflow(self, limit: int) -> Reply:
        self._buf.clear()
        self._scanned = 0
        flag = "--max-buffer" if limit == self.host.config.max_buffer else "--max-unauth-line"
        if flag == "--max-unauth-line":
            msg = (f"Message exceeds the buffer limit of {limit} bytes before authentication "
                   f"({flag})")
        else:
            msg = f"Message exceeds the buffer limit of {limit} bytes ({flag})"
        return self.error(buffer_overflow(msg))

    # --- entry point --------------------------------------------------------------------

    async def handle(self, line: str) -> Reply:
        """Execute one request line; never raises (unexpected failures → AT0011 + close)."""
        self.requests += 1
        if self.revoked:
            self.closed = True
            return self.error(AtError("AT0027", "Apkam Access Revoked: this connection's "
                                                "enrollment was revoked", close=True))
        try:
            self._admit(line)
            if len(line) <= PARSE_INLINE_MAX and not line[:10].lower().startswith("notify:all"):
                cmd = parse_command(line)
            else:
                loop = asyncio.get_running_loop()
                cmd = await loop.run_in_executor(_PARSE_POOL, parse_command, line)
            if cmd.verb == "exit":
                self.closed = True
                return Reply(None, close=True)
            verb = VERBS.get(cmd.verb)
            if trace.enabled():  # the verb and, past login, the start of the line
                trace.mark("atserver.cmd", f"{self.me} {cmd.verb} " + (
                    line[:60] if self.authenticated or self.pol_atsign else ""))
            if verb is not None and verb.access == OWNER and not self.authenticated:
                raise unauthenticated("Command cannot be executed without auth")
            if verb is None or verb.handler is None:
                raise invalid_syntax(f"{cmd.verb} is not supported by this server")
            return await verb.handler(self, cmd)
        except AtError as err:
            # Bad input never costs the client its connection (the reference closes on an
            # invalid atSign); only overflow and truly unexpected failures close.
            close = err.code == "AT0005" or isinstance(err, enrollment.ClosingError)
            return self.error(AtError(err.code, err.message, close=close))
        except RemoteError as err:
            return self.error(AtError(err.code, err.message))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the connection and server must survive
            log.exception("internal error on %s handling a %s command", self.me,
                          line.split(":", 1)[0][:20] if isinstance(line, str) else "?")
            return self.error(AtError("AT0011", f"Internal server exception: {type(exc).__name__}",
                                      close=True))

    def _admit(self, line: str) -> None:
        """Auth and size checks from the verb table, before the line is parsed (docs/reference/atprotocol.md#command-dispatch step 4)."""
        name = classify(line)
        if name is None:
            return  # parse_command answers "invalid command"
        verb = VERBS[name]
        if verb.access == OWNER and not self.authenticated:
            raise unauthenticated("Command cannot be executed without auth")
        if verb.line_limit is not None and len(line) > verb.line_limit:
            size = len(line.encode("utf-8"))
            if size > verb.line_limit:
                raise invalid_syntax(f"Invalid syntax. a {name} request is at most "
                                     f"{verb.line_limit} bytes, this one has {size}")

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
