"""Which relay, and how to talk to it: relay choice among several ``-r``, single-port fields.

Several relays (issue 11 point 5, docs/decisions/0025-single-port-relay-and-escr.md): today's
official client (``RelaySelector``) asks each relay where it is with a ``discover.sshrvd``
notification, times a TCP connect to the address and port each answers, and takes the
fastest. We send the same probe and score each relay by what a session will cost: the round
trip of its answer (an overloaded or far-away srvd answers late, which a TCP connect alone
does not show) plus the timed connect when it names a port (port 0: no single port, the
answer alone). Waiting ends ``max(0.5 s, twice the first time)`` after the first relay is
measured, or after 5 s; a relay not measured by then is kept, last, as a fallback. ``--relay-select ordered``
keeps the old behaviour: the relays in the order given, each tried when the previous fails.
(The official selector also asks the device for its own latencies; official daemons answer
that with a message our daemon does not send yet, so we rank by the client's side only.)

Single port (``--443``): the request carries ``relayAuthMode: escr``, a fresh
``relayAuthAesKey``, ``only443`` and asks for the JSON reply, as the official client does; the
same key goes to the device in the session request so both sides can answer the relay's
challenges (:mod:`noports.npproto.escr`).

:func:`rank` is pure; :func:`probe` and :func:`probe_all` are the asyncio edge.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from noports.npproto import escr

from .params import SessionParams

log = logging.getLogger(__name__)

PROBE_TIMEOUT = 5.0  # seconds a relay gets to answer the discover probe
GRACE = 0.5  # once one relay is measured, the others get max(GRACE, 2 x its time) more
CONNECT_PROBE_TIMEOUT = 3.0  # seconds for the timed TCP connect
DISCOVER_NAME = "discover.sshrvd"


@dataclass(frozen=True)
class Probe:
    """What measuring one relay found. ``seconds`` is None when it could not be measured."""

    relay: str
    seconds: float | None
    how: str  # "connect host:port", "answer", or why it failed


def rank(relays: Sequence[str], probes: Sequence[Probe]) -> list[str]:
    """Relays fastest first; unmeasured ones keep their given order, after the measured.

    Ties keep the given order, so equal relays are tried as the user listed them.
    """
    by = {p.relay: p for p in probes}
    order = {r: i for i, r in enumerate(relays)}

    def key(r: str) -> tuple[int, float, int]:
        p = by.get(r)
        if p is None or p.seconds is None:
            return (1, 0.0, order[r])
        return (0, p.seconds, order[r])

    return sorted(relays, key=key)


def describe(probes: Sequence[Probe]) -> str:
    """One line for the progress output, e.g. ``@rv_a 2 ms (connect ...), @rv_b no answer``."""
    parts = []
    for p in probes:
        parts.append(f"{p.relay} {p.seconds * 1000:.0f} ms ({p.how})" if p.seconds is not None
                     else f"{p.relay} {p.how}")
    return ", ".join(parts)


def parse_discover(value: str) -> tuple[str, int]:
    """The relay's discover answer ``{"ipaddr": host, "port": n}`` (older: ``ip``)."""
    data = json.loads(value)
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    host = data.get("ipaddr", data.get("ip"))
    port = data.get("port", 0)
    if not isinstance(host, str) or not host or not isinstance(port, int) \
            or not 0 <= port < 65536:
        raise ValueError(f"unusable discover answer {value[:100]!r}")
    return host, port


async def timed_connect(host: str, port: int, timeout: float = CONNECT_PROBE_TIMEOUT) -> float:
    """Seconds a TCP connect to ``host:port`` takes (the official latency measure)."""
    loop = asyncio.get_running_loop()
    t0 = time.monotonic()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    family, type_, proto, _c, addr = infos[0]
    sock = socket.socket(family, type_, proto)
    sock.setblocking(False)
    try:
        await asyncio.wait_for(loop.sock_connect(sock, addr), timeout)
        return time.monotonic() - t0
    finally:
        sock.close()


async def probe(relay: str, ask: Callable[[str], Awaitable[str]], *,
                timeout: float = PROBE_TIMEOUT) -> Probe:
    """Measure one relay. ``ask(relay)`` sends the discover notification and returns the
    answer's value (the flow's router delivers it)."""
    t0 = time.monotonic()
    try:
        value = await asyncio.wait_for(ask(relay), timeout)
    except asyncio.TimeoutError:
        return Probe(relay, None, f"no answer within {timeout:g}s")
    except Exception as exc:  # an unknown atSign etc.: not measured, still a fallback
        return Probe(relay, None, f"probe failed ({type(exc).__name__})")
    rtt = time.monotonic() - t0
    try:
        host, port = parse_discover(value)
    except ValueError as exc:
        return Probe(relay, rtt, f"answer ({exc})")
    if port == 0:
        return Probe(relay, rtt, "answer")
    try:
        return Probe(relay, rtt + await timed_connect(host, port),
                     f"answer + connect {host}:{port}")
    except (OSError, asyncio.TimeoutError) as exc:
        return Probe(relay, None, f"cannot connect to {host}:{port} ({exc or 'timeout'})")


async def probe_all(relays: Sequence[str], ask: Callable[[str], Awaitable[str]], *,
                    timeout: float = PROBE_TIMEOUT, grace: float = GRACE) -> list[Probe]:
    """Probe every relay at once; stop waiting ``max(grace, 2 x first)`` after the first one
    is measured, so a relay that never answers (an srvd older than discover) costs little.

    Probes cut off that way count as unmeasured (kept, last, in the order given)."""
    loop = asyncio.get_running_loop()
    tasks = {loop.create_task(probe(r, ask, timeout=timeout)): r for r in relays}
    found: dict[str, Probe] = {}
    pending = set(tasks)
    deadline: float | None = None
    while pending:
        left = None if deadline is None else max(0.0, deadline - loop.time())
        done, pending = await asyncio.wait(pending, timeout=left,
                                           return_when=asyncio.FIRST_COMPLETED)
        if not done:
            break
        for t in done:
            p = t.result()
            found[p.relay] = p
            if p.seconds is not None and deadline is None:
                deadline = loop.time() + max(grace, 2 * p.seconds)
    for t in pending:
        t.cancel()
        found[tasks[t]] = Probe(tasks[t], None, "slower than the fastest")
    return [found[r] for r in relays]


# --- single-port (ESCR) request fields ----------------------------------------------------------

def escr_key_for(p: SessionParams) -> str | None:
    """A fresh ``relayAuthAesKey`` when this session authenticates to its relay with ESCR."""
    return escr.new_relay_auth_key() if p.only443 or p.relay_auth_mode == "escr" else None


def request_extra(p: SessionParams, escr_key: str | None, keys: Any) -> dict[str, Any]:
    """Fields today's official client adds to request_ports (only when ESCR is used, so
    requests to older relays stay byte-for-byte what they were)."""
    if escr_key is None:
        return {}
    return {"relayAuthMode": "escr", "relayAuthAesKey": escr_key, "only443": p.only443,
            "multipleAcksOk": True, "preFetch": [escr.apsk_uri(keys.atsign, keys.enrollment_id)],
            "sendJsonResponse": True}


def session_request_extra(escr_key: str | None) -> dict[str, Any]:
    """What the device needs to answer the relay's challenges as side B."""
    if escr_key is None:
        return {}
    return {"relayAuthMode": "escr", "relayAuthAesKey": escr_key}


async def ensure_signing_key(client: Any, keys: Any) -> str:
    from noports.keys.apsk import ensure_signing_key_published
    return await ensure_signing_key_published(client, keys)
