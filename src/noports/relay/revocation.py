"""srvd side of key revocation: end live relay sessions of atSigns that revoked a device key.

Why (decision 0021): revoking a device's enrollment stops its authentication at the atServer
and closes its atServer connections at once, but a relay session it already holds carries
only encrypted bytes between two sockets that authenticated minutes ago; the relay must end it.
The relay does not know which enrollment (device) of an atSign a session belongs to — socket
authentication signs with the atSign's shared encryption key — so it ends, fail-closed, every
session of that atSign opened before the revocation; the other devices' clients reconnect.

How it learns: every atServer of ours keeps ``public:revocations.__manage@<atsign>`` =
``{"lastRevokedAt": <ms>, "enrollmentId": "<id>"}``, rewritten on each revocation. The watcher
polls it (``plookup:bypassCache:true``, no cache) every ``interval`` seconds for the atSigns of
live sessions only, so the cost is one small lookup per party per interval and a revocation
ends sessions within one interval plus a lookup (default 10 s, goal 30 s, limit 5 min).
:func:`sessions_to_end` is the pure decision; :class:`RevocationWatcher` the loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

KEY_NAME = "revocations.__manage"
DEFAULT_INTERVAL_S = 10.0
MAX_PARALLEL = 16


@dataclass(frozen=True)
class LiveSession:
    session_id: str
    parties: frozenset[str]
    opened_ms: int  # wall clock


def parse_marker(value: str | None) -> int | None:
    """``lastRevokedAt`` of a revocation marker (None: no marker / unreadable)."""
    if not value or len(value) > 4096:
        return None
    try:
        obj = json.loads(value)
        t = obj.get("lastRevokedAt") if isinstance(obj, dict) else None
    except ValueError:
        return None
    return t if isinstance(t, int) and t >= 0 else None


def sessions_to_end(sessions: Iterable[LiveSession], revoked_at: Mapping[str, int | None],
                    seen_at_open: Mapping[tuple[str, str], int | None]) -> list[tuple[str, str]]:
    """(session id, reason) of each session one of whose parties revoked a key after it opened.

    A session ends when a party's marker is newer than the session's opening time, or differs
    from the marker first seen for that session (robust against clock skew between the
    relay and the party's atServer).
    """
    out = []
    for s in sessions:
        for who in sorted(s.parties):
            t = revoked_at.get(who)
            if t is None:
                continue
            first = seen_at_open.get((s.session_id, who), t)
            if t >= s.opened_ms or t != first:
                out.append((s.session_id, f"{who} revoked a device key"))
                break
    return out


Lookup = typing.Callable[[str], typing.Awaitable[typing.Optional[str]]]  # noqa: UP006,UP007,UP045 - runtime alias, Python 3.8


@dataclass
class RevocationWatcher:
    """Polls the parties' revocation markers and closes affected sessions."""

    lookup: Lookup  # atSign -> marker value or None
    live: Callable[[], list[LiveSession]]
    close: Callable[[str, str], object]
    interval: float = DEFAULT_INTERVAL_S
    _first: dict[tuple[str, str], int | None] = field(default_factory=dict)
    ended: int = 0

    async def _marker(self, sem: asyncio.Semaphore, who: str
                      ) -> tuple[str, int | None] | None:
        """(who, lastRevokedAt or None when there is no marker), or None when the look-up
        failed: an unknown marker must not be remembered as "none" for a session, or the
        next successful look-up of an old marker would look like a change and end it."""
        async with sem:
            try:
                return who, parse_marker(await asyncio.wait_for(self.lookup(who),
                                                                max(5.0, self.interval)))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if getattr(exc, "code", None) == "AT0015":
                    return who, None  # no marker published: nothing revoked
                log.debug("revocation marker of %s: %s", who, type(exc).__name__)
                return None  # unreachable: decide nothing about this party this round

    async def check_once(self) -> list[str]:
        sessions = self.live()
        if not sessions:
            self._first.clear()
            return []
        sem = asyncio.Semaphore(MAX_PARALLEL)
        parties = sorted({p for s in sessions for p in s.parties})
        found = await asyncio.gather(*(self._marker(sem, p) for p in parties))
        markers = dict(m for m in found if m is not None)
        for s in sessions:
            for p in s.parties:
                if p in markers:  # only a look-up that answered says what was there at open
                    self._first.setdefault((s.session_id, p), markers[p])
        ids = {s.session_id for s in sessions}
        self._first = {k: v for k, v in self._first.items() if k[0] in ids}
        ended = []
        for sid, reason in sessions_to_end(sessions, markers, self._first):
            log.warning("ending session %s: %s", sid, reason)
            self.close(sid, reason)
            ended.append(sid)
        self.ended += len(ended)
        return ended

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.check_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # the watcher must never stop the relay
                log.exception("revocation check failed")


def for_srvd(srvd: object, client: object, interval: float | None = None) -> RevocationWatcher:
    """A watcher over a :class:`noports.relay.srvd.Srvd`'s open sessions."""
    import os

    if interval is None:
        interval = float(os.environ.get("NOPORTS_SRVD_REVOCATION_INTERVAL",
                                        DEFAULT_INTERVAL_S))

    async def lookup(who: str) -> str | None:
        value = await client.command(  # type: ignore[attr-defined]
            f"plookup:bypassCache:true:{KEY_NAME}{who}", retry=True)
        return None if value == "null" else value

    def live() -> list[LiveSession]:
        now_ms, mono = time.time() * 1000, time.monotonic()
        out = []
        for sid, o in list(srvd._open.items()):  # type: ignore[attr-defined]
            parties = {o.sender} | ({o.atsign_b} if o.atsign_b else set())
            out.append(LiveSession(sid, frozenset(parties),
                                   int(now_ms - (mono - o.opened) * 1000)))
        return out

    def close(sid: str, reason: str) -> None:
        srvd.relay.close_session(sid, reason)  # type: ignore[attr-defined]

    return RevocationWatcher(lookup, live, close, interval)
