"""srvd control side: turn ``request_ports`` notifications into rendezvous sessions.

The data plane (ports, authentication of sockets, splicing) is :class:`Rendezvous`; this
module decides *whether* to open a session and answers with ``ip,portA,portB,rvdNonce``
(docs/reference/noports-protocol.md#key-names K1/K2,
docs/reference/noports-protocol.md#message-catalogue M1/M2,
docs/reference/noports-protocol.md#socket-rendezvous).

Why split into :func:`decide` (pure) and :class:`Srvd` (async edge): authorization is the
security-relevant part and must be testable without sockets. Two deliberate deviations from
the official srvd, both wire-compatible
(docs/reference/noports-protocol.md#relay-allocation-and-pairing,
docs/reference/noports-protocol.md#compatibility-checklist):

* the allow-list is checked against the *authenticated sender* of the notification, never
  against the self-declared ``atSignA`` field, and ``atSignA`` must equal the sender (so a
  client cannot make the relay verify side A against somebody else's key);
* a session id that was seen before (open, closed, or being opened) is refused.

A refusal of a request from an allowed sender is answered with a NACK, as the official srvd
does: ``@C:nack.<sid>.sshrvd@R`` whose value is the reason (the client's subscription
``<sid>.sshrvd@`` matches it), naming the limit and the flag that sets it, so the user reads
"relay @r refused: ... (max 64; srvd --max-sessions-per-atsign)" instead of a timeout.
Senders the relay does not serve (not allowed, spoofed key, undecryptable value) and
duplicate session ids get nothing: the first learn nothing, and a re-delivered request must
not NACK a session that is being opened. Every refusal is logged with its reason. Values of
notifications and payload bytes are never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Container
from dataclasses import dataclass, field
from typing import Protocol, Union

from noports import trace
from noports.npproto import (
    RelayRequest,
    RelayResponse,
    dart_iso_now,
    dart_json_encode,
    escr,
    verify_relay_auth,
)
from noports.npproto.errors import ProtocolError
from noports.npproto.keys import (
    RELAY_NS,
    normalize_atsign,
    parse_relay_key,
    relay_subscription_regex,
    split_shared_key,
    validate_session_id,
)

from . import revocation
from .server import RelayCapacityError, RelayConfig, Rendezvous, SessionSummary
from .session import SideAuthenticator
from .singleport import EscrSession, SinglePortListener

log = logging.getLogger(__name__)

REPLY_TTL_MS = 10_000  # K2 ttl (srvd_impl.dart)
REPLY_TTLN_MS = 60_000  # notification expiry used by all NoPorts notifications
MAX_REQUEST_CHARS = 8192  # an M1 is ~250 chars; anything much larger is not a request
MAX_NONCE_CHARS = 256
OPEN = "open"  # the official ``-m`` default: any atSign may request sessions
DISCOVER_NAME = f"discover.{RELAY_NS}"


# --------------------------------------------------------------------------- pure part


@dataclass(frozen=True)
class SrvdPolicy:
    """Who may ask for sessions and under which conditions.

    ``allowed`` None means open (official default). ``require_socket_auth`` refuses requests
    that switch off socket authentication on either side (and therefore legacy requests).
    """

    relay_atsign: str
    allowed: frozenset[str] | None = None
    allow_legacy: bool = True
    require_socket_auth: bool = False
    max_sessions_per_sender: int = 1000
    single_port: bool = False  # srvd --443: requests with only443 are served

    def __post_init__(self) -> None:
        object.__setattr__(self, "relay_atsign", normalize_atsign(self.relay_atsign))
        if self.allowed is not None:
            object.__setattr__(self, "allowed",
                               frozenset(normalize_atsign(a) for a in self.allowed))


@dataclass(frozen=True)
class Accept:
    """Open a session. ``client_nonce`` is None for legacy requests (no socket auth)."""

    session_id: str
    sender: str
    device: str
    atsign_a: str
    atsign_b: str | None
    client_nonce: str | None
    auth_a: bool
    auth_b: bool
    legacy: bool = False
    escr_key: str | None = None  # relayAuthAesKey when relayAuthMode is escr
    only443: bool = False  # a single-port session (ESCR on the one port)
    json_reply: bool = False  # sendJsonResponse: answer JSON, not CSV


@dataclass(frozen=True)
class Refuse:
    """Do not open a session. ``reason`` is logged; when ``nack`` is set (the requester is
    served by this relay and named a usable session id) it goes back to the requester as
    the NACK ``nack.<session_id>.sshrvd``."""

    reason: str
    session_id: str | None = None
    nack: str | None = None


Decision = Union[Accept, Refuse]  # noqa: UP007 (runtime alias: `|` on classes needs 3.10)


def decide(key: str, sender: str, value: str | None, policy: SrvdPolicy, *,
           known_sessions: Container[str] = (), sender_sessions: int = 0) -> Decision:
    """Judge one notification received by the relay; never raises for bad input.

    ``sender`` is the notification's authenticated ``from`` atSign; ``known_sessions`` the
    session ids already seen; ``sender_sessions`` how many sessions the sender has open.
    Authorization comes first, so an unauthorized sender learns nothing from the parsing.
    """
    try:
        who = normalize_atsign(sender)
    except ProtocolError:
        return Refuse(f"invalid sender {sender!r}")
    if policy.allowed is not None and who not in policy.allowed:
        return Refuse(f"sender {who} is not allowed to request sessions")
    try:
        rk = parse_relay_key(key)
    except ProtocolError as exc:
        return Refuse(f"not a relay request: {exc}")
    if rk.recipient != policy.relay_atsign:
        return Refuse(f"request is addressed to {rk.recipient}, not {policy.relay_atsign}")
    if rk.sender != who:
        return Refuse(f"key names sender {rk.sender} but the notification is from {who}")
    if value is None:
        return Refuse("request has no (decryptable) value")
    if len(value) > MAX_REQUEST_CHARS:
        return Refuse(f"request value longer than {MAX_REQUEST_CHARS} characters")
    if rk.legacy:
        try:
            sid = validate_session_id(value.strip())
        except ProtocolError as exc:
            return Refuse(f"legacy request: {exc}")
        if not policy.allow_legacy or policy.require_socket_auth:
            flag = "--require-socket-auth" if policy.require_socket_auth else "--no-legacy"
            return _nack(sid, f"legacy (unauthenticated) requests are disabled (srvd {flag})")
        accept = Accept(sid, who, rk.device, who, None, None, False, False, legacy=True)
    else:
        try:
            req = RelayRequest.from_json(value)
            sid = validate_session_id(req.session_id)
        except ProtocolError as exc:
            return Refuse(f"malformed request: {exc}")
        except Exception as exc:  # any decoder surprise is a refusal, not a crash
            return Refuse(f"malformed request: {type(exc).__name__}")
        try:
            atsign_a = normalize_atsign(req.atsign_a)
            atsign_b = normalize_atsign(req.atsign_b)
        except ProtocolError as exc:
            return _nack(sid, f"malformed request: {exc}")
        if atsign_a != who:
            return _nack(sid, f"atSignA {atsign_a} is not the sender {who}")
        if not 0 < len(req.client_nonce) <= MAX_NONCE_CHARS:
            return _nack(sid, "clientNonce is empty or too long")
        if policy.require_socket_auth and not (req.authenticate_socket_a
                                               and req.authenticate_socket_b):
            return _nack(sid, "the request disables socket authentication, which this relay "
                              "requires (srvd --require-socket-auth)")
        newer = _newer_fields(req.extra, policy)
        if isinstance(newer, str):
            return _nack(sid, newer)
        escr_key, only443, json_reply = newer
        if only443 and not (req.authenticate_socket_a and req.authenticate_socket_b):
            return _nack(sid, "single-port (only443) sessions need both sides to authenticate")
        accept = Accept(sid, who, rk.device, atsign_a, atsign_b, req.client_nonce,
                        req.authenticate_socket_a, req.authenticate_socket_b,
                        escr_key=escr_key, only443=only443, json_reply=json_reply)
    if accept.session_id in known_sessions:
        return Refuse(f"duplicate session id {accept.session_id}")
    if sender_sessions >= policy.max_sessions_per_sender:
        return _nack(accept.session_id,
                     f"{who} already has {sender_sessions} sessions "
                     f"(max {policy.max_sessions_per_sender}; srvd --max-sessions-per-atsign)")
    return accept


def _newer_fields(extra: dict[str, object], policy: SrvdPolicy
                  ) -> tuple[str | None, bool, bool] | str:
    """The 2025-26 request fields (docs/reference/noports-protocol.md#newer-protocol-versions):
    ``(relayAuthAesKey or None, only443, sendJsonResponse)``, or why they are refused.

    ``relayAuthMode`` absent means ``payload`` (the v5 line). ``escr`` is served on the single
    port only; on per-session ports this relay keeps the payload line (today's official client
    declares ``payload`` there too and uses ESCR only on the 443 path).
    """
    mode = extra.get("relayAuthMode", "payload")
    only443 = extra.get("only443", False) is True
    json_reply = extra.get("sendJsonResponse", False) is True
    if mode not in escr.MODES:
        return f"unknown relayAuthMode {str(mode)[:40]!r} (want payload or escr)"
    if only443 and not policy.single_port:
        return ("this relay has no single port for only443 sessions "
                "(start srvd with --443)")
    if only443 and mode != "escr":
        return "only443 sessions authenticate with relayAuthMode escr"
    if mode == "escr" and not only443:
        return ("relayAuthMode escr is served on the single port only (send only443, or "
                "relayAuthMode payload for per-session ports)")
    key = extra.get("relayAuthAesKey")
    if mode == "escr" and not escr.valid_relay_auth_key(key):
        return "relayAuthMode escr needs relayAuthAesKey: base64 of a 32-byte AES key"
    return (key if mode == "escr" else None), only443, json_reply  # type: ignore[return-value]


def is_discover(key: str, policy: SrvdPolicy) -> bool:
    """``@R:discover.sshrvd@C``: a client measuring relays (official RelaySelector)."""
    try:
        sk = split_shared_key(key)
    except ProtocolError:
        return False
    return sk.name == DISCOVER_NAME and sk.recipient == policy.relay_atsign


def discover_reply(advertise: str, port: int) -> str:
    """What a relay tells a measuring client: where to time a TCP connect.

    ``port`` is the single port, or 0 when there is none (then the client times this
    answer itself; the official client skips a relay it cannot connect to)."""
    return dart_json_encode({"ipaddr": advertise, "port": port})


def _nack(session_id: str, reason: str) -> Refuse:
    """A refusal the requester is told about (the same text as the log)."""
    return Refuse(reason, session_id, reason)


def nack_key_name(session_id: str) -> str:
    """Name part of the NACK ``@C:nack.<sid>.sshrvd@R`` (sent with namespace None)."""
    return f"nack.{validate_session_id(session_id)}.{RELAY_NS}"


def reply_key_name(session_id: str) -> str:
    """Name part of K2 ``@C:<sid>.sshrvd@R`` (sent with namespace None)."""
    return f"{validate_session_id(session_id)}.{RELAY_NS}"


def reply_text(advertise: str, port_a: int, port_b: int, rvd_nonce: str | None, *,
               json_reply: bool = False) -> str:
    """M2 ``ip,portA,portB,rvdNonce`` (``,null`` for legacy requests), or the JSON form
    today's clients ask for with ``sendJsonResponse`` (no event logging here)."""
    if json_reply and rvd_nonce is not None:
        return dart_json_encode({"address": advertise, "portA": port_a, "portB": port_b,
                                 "rvdNonce": rvd_nonce, "supportsEventLogging": False})
    return RelayResponse(advertise, port_a, port_b, rvd_nonce).to_csv()


def side_authenticator(session_id: str, client_nonce: str, rvd_nonce: str,
                       public_key: str) -> SideAuthenticator:
    """Checks one side's auth line against the relay's own payload and that side's key."""

    def authenticate(line: bytes) -> bool:
        return verify_relay_auth(line, session_id, client_nonce, rvd_nonce, public_key)

    return authenticate


def validate_advertise(host: str) -> str:
    """The advertised host goes into a CSV reply: no commas, no whitespace, not empty."""
    if not host or any(c in host for c in ", \t\r\n"):
        raise ValueError(f"advertised address {host!r} must be a host name or IP without "
                         "commas or whitespace")
    return host


def parse_allow_list(text: str) -> frozenset[str]:
    """One atSign per line (commas also separate); ``#`` starts a comment."""
    out: set[str] = set()
    for raw in text.splitlines():
        line = raw.split("#", 1)[0]
        for item in line.replace(",", " ").split():
            out.add(normalize_atsign(item))
    return frozenset(out)


# --------------------------------------------------------------------------- async edge


class _Client(Protocol):
    """What srvd needs from :class:`noports.atclient.aio.AtClient` (fakes in unit tests)."""

    async def public_key(self, atsign: str) -> str: ...

    async def notify(self, to: str, key_name: str, value: str, *, namespace: str | None = ...,
                     ttl_ms: int | None = ..., ttln_ms: int | None = ...) -> str: ...


class _Relay(Protocol):
    async def open_session(self, session_id: str, auth_a: SideAuthenticator | None,
                           auth_b: SideAuthenticator | None) -> tuple[int, int]: ...

    def close_session(self, session_id: str, reason: str = ...) -> bool: ...


@dataclass
class _Open:
    sender: str
    device: str
    atsign_b: str | None
    ports: tuple[int, int]
    opened: float = field(default_factory=time.monotonic)


class Srvd:
    """Handles relay requests against a :class:`Rendezvous`.

    ``relay`` None builds a Rendezvous from ``relay_config`` wired to :meth:`session_closed`;
    an injected relay must call :meth:`session_closed` itself.
    """

    def __init__(self, client: _Client, policy: SrvdPolicy, advertise: str, *,
                 relay: _Relay | None = None, relay_config: RelayConfig | None = None,
                 key_timeout: float = 10.0, reply_timeout: float = 10.0,
                 max_inflight: int = 64, remember: int = 65_536,
                 single_port: int | None = None, single_port_public: int | None = None,
                 reply_delay: float = 0.0) -> None:
        self.client = client
        self.policy = policy
        self.advertise = validate_advertise(advertise)
        self.relay: _Relay = relay if relay is not None else Rendezvous(
            relay_config, on_session_closed=self.session_closed)
        self.key_timeout = key_timeout
        self.reply_timeout = reply_timeout
        self._max_inflight = max_inflight
        self._sem: asyncio.Semaphore | None = None  # made in the loop (3.8/3.9 bind at creation)
        self._remember = remember
        self._seen: OrderedDict[str, None] = OrderedDict()  # every session id ever handled
        self._open: dict[str, _Open] = {}
        self._inflight: dict[str, str] = {}  # sid -> sender, while keys/ports are fetched
        self._tasks: set[asyncio.Task[None]] = set()
        self.refused = 0
        self.nacked = 0
        self.opened = 0
        #: srvd --443: the port bound (0 = any, for tests) and the one advertised
        self.single_port = single_port
        self.single_port_public = single_port_public
        self.listener: SinglePortListener | None = None
        self.reply_delay = reply_delay  # test knob: a relay that answers late
        if isinstance(self.relay, Rendezvous):
            self.relay.key_lookup = self._lookup_public

    # -- bookkeeping ---------------------------------------------------------------------------

    def _sender_sessions(self, sender: str) -> int:
        return (sum(1 for o in self._open.values() if o.sender == sender)
                + sum(1 for s in self._inflight.values() if s == sender))

    def _mark_seen(self, sid: str) -> None:
        self._seen[sid] = None
        while len(self._seen) > self._remember:
            self._seen.popitem(last=False)

    def session_closed(self, summary: SessionSummary) -> None:
        """Rendezvous callback: log who the session was for and forget it."""
        info = self._open.pop(summary.session_id, None)
        who = f"{info.sender} -> {info.atsign_b or '?'} (device {info.device})" if info else "?"
        log.info("session %s for %s closed (%s): %d pair(s), A->B %d B->A %d bytes, %.1fs",
                 summary.session_id, who, summary.reason, summary.pairs, summary.bytes_ab,
                 summary.bytes_ba, summary.duration)

    # -- one request ---------------------------------------------------------------------------

    async def _lookup_public(self, atsign: str, name: str) -> str:
        """ESCR: the value an atSign published at ``public:<name>`` (plookup)."""
        value = await self.client.get_public(name, atsign)  # type: ignore[attr-defined]
        if not value:
            raise LookupError(f"{atsign} has no public:{name}")
        return str(value)

    def start_single_port(self, host: str) -> int:
        """Bind the single port (srvd --443); returns the port bound."""
        assert isinstance(self.relay, Rendezvous) and self.single_port is not None
        self.listener = SinglePortListener(self.relay, host, self.single_port)
        self.listener.start()
        if self.single_port_public is None:
            self.single_port_public = self.listener.port
        return self.listener.port

    async def _answer_discover(self, who: str) -> None:
        if self.policy.allowed is not None and who not in self.policy.allowed:
            log.info("discover from %s ignored: not allowed", who)
            return
        if self.reply_delay:
            await asyncio.sleep(self.reply_delay)
        port = self.single_port_public if self.listener is not None else 0
        try:
            await asyncio.wait_for(self.client.notify(
                who, DISCOVER_NAME, discover_reply(self.advertise, port or 0), namespace=None,
                ttl_ms=REPLY_TTL_MS, ttln_ms=REPLY_TTLN_MS), self.reply_timeout)
        except Exception as exc:
            log.warning("discover reply to %s failed (%s)", who, type(exc).__name__)

    async def handle(self, key: str, sender: str, value: str | None) -> str | None:
        """Process one notification; return the reply sent, or None when refused/failed."""
        try:
            who = normalize_atsign(sender)
        except ProtocolError:
            who = "?"
        if who != "?" and is_discover(key, self.policy):
            await self._answer_discover(who)
            return None
        decision = decide(key, sender, value, self.policy,
                          known_sessions=self._seen, sender_sessions=self._sender_sessions(who))
        if isinstance(decision, Refuse):
            self.refused += 1
            log.warning("refused request %s from %s: %s", key[:200], sender[:100],
                        decision.reason)
            if decision.nack is not None and decision.session_id is not None:
                await self._send_nack(who, decision.session_id, decision.nack)
            return None
        d = decision
        self._mark_seen(d.session_id)
        self._inflight[d.session_id] = d.sender
        try:
            return await self._open_and_reply(d)
        finally:
            self._inflight.pop(d.session_id, None)

    async def _public_key(self, atsign: str) -> str | None:
        try:
            return await asyncio.wait_for(self.client.public_key(atsign), self.key_timeout)
        except Exception as exc:
            log.warning("cannot fetch the public key of %s: %s", atsign, type(exc).__name__)
            return None

    async def _open_and_reply(self, d: Accept) -> str | None:
        rvd_nonce = None if d.legacy else dart_iso_now()
        auth_a = auth_b = None
        if self.reply_delay:
            await asyncio.sleep(self.reply_delay)
        if d.only443:
            return await self._open_single_port(d, rvd_nonce)
        if d.auth_a or d.auth_b:
            assert d.client_nonce is not None and rvd_nonce is not None
            for flag, atsign, side in ((d.auth_a, d.atsign_a, "A"), (d.auth_b, d.atsign_b, "B")):
                if not flag:
                    continue
                assert atsign is not None
                pk = await self._public_key(atsign)
                if pk is None:
                    self.refused += 1
                    log.warning("refused session %s: no public key for side %s (%s)",
                                d.session_id, side, atsign)
                    await self._send_nack(d.sender, d.session_id,
                                          f"cannot fetch the public key of {atsign} "
                                          f"(side {side}) to authenticate its socket")
                    return None
                auth = side_authenticator(d.session_id, d.client_nonce, rvd_nonce, pk)
                if side == "A":
                    auth_a = auth
                else:
                    auth_b = auth
        try:
            ports = await self.relay.open_session(d.session_id, auth_a, auth_b)
        except (RelayCapacityError, ValueError, OSError) as exc:
            self.refused += 1
            log.warning("refused session %s from %s: %s", d.session_id, d.sender, exc)
            why = (str(exc) if isinstance(exc, RelayCapacityError)
                   else f"cannot open ports: {exc}")
            await self._send_nack(d.sender, d.session_id, why)
            return None
        return await self._reply(d, ports, rvd_nonce)

    async def _open_single_port(self, d: Accept, rvd_nonce: str | None) -> str | None:
        assert d.escr_key is not None and d.atsign_b is not None and rvd_nonce is not None
        port = self.single_port_public
        if self.listener is None or port is None or not isinstance(self.relay, Rendezvous):
            await self._send_nack(d.sender, d.session_id, "this relay has no single port")
            return None
        try:
            ports = await self.relay.open_escr_session(
                EscrSession(d.session_id, d.escr_key, d.atsign_a, d.atsign_b), (port, port))
        except (RelayCapacityError, ValueError) as exc:
            self.refused += 1
            log.warning("refused session %s from %s: %s", d.session_id, d.sender, exc)
            await self._send_nack(d.sender, d.session_id, str(exc))
            return None
        return await self._reply(d, ports, rvd_nonce)

    async def _reply(self, d: Accept, ports: tuple[int, int],
                     rvd_nonce: str | None) -> str | None:
        self._open[d.session_id] = _Open(d.sender, d.device, d.atsign_b, ports)
        self._inflight.pop(d.session_id, None)  # counted once: as open from here on
        reply = reply_text(self.advertise, ports[0], ports[1], rvd_nonce,
                           json_reply=d.json_reply)
        trace.mark("srvd.reply_out", d.session_id)
        try:
            await asyncio.wait_for(
                self.client.notify(d.sender, reply_key_name(d.session_id), reply,
                                   namespace=None, ttl_ms=REPLY_TTL_MS, ttln_ms=REPLY_TTLN_MS),
                self.reply_timeout)
        except Exception as exc:
            log.warning("session %s: reply to %s failed (%s); closing it", d.session_id,
                        d.sender, type(exc).__name__)
            self.relay.close_session(d.session_id, "reply could not be sent")
            return None
        self.opened += 1
        trace.mark("srvd.reply_acked", d.session_id)
        log.info("session %s opened for %s -> %s (device %s%s): port A %d, port B %d, "
                 "socket auth A=%s B=%s", d.session_id, d.sender, d.atsign_b or "?", d.device,
                 ", legacy" if d.legacy else ", single port, ESCR" if d.only443 else "",
                 ports[0], ports[1], d.auth_a, d.auth_b)
        return reply

    async def _send_nack(self, to: str, session_id: str, reason: str) -> None:
        """Tell the requester why (best effort: a failed NACK is logged, never raised)."""
        try:
            await asyncio.wait_for(
                self.client.notify(to, nack_key_name(session_id), reason, namespace=None,
                                   ttl_ms=REPLY_TTL_MS, ttln_ms=REPLY_TTLN_MS),
                self.reply_timeout)
            self.nacked += 1
        except Exception as exc:
            log.warning("session %s: NACK to %s failed (%s)", session_id, to,
                        type(exc).__name__)

    # -- service loop --------------------------------------------------------------------------

    async def _guarded(self, key: str, sender: str, value: str | None) -> None:
        try:
            await self.handle(key, sender, value)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug must cost one request, never the relay
            log.exception("request %s from %s failed unexpectedly", key[:200], sender[:100])
        finally:
            assert self._sem is not None
            self._sem.release()

    async def dispatch(self, key: str, sender: str, value: str | None) -> None:
        """Handle a request concurrently (bounded by ``max_inflight``)."""
        if self._sem is None:
            self._sem = asyncio.Semaphore(self._max_inflight)
        await self._sem.acquire()
        task = asyncio.get_running_loop().create_task(self._guarded(key, sender, value))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def serve(self, monitor_factory: Callable[[str], object],
                    stop: asyncio.Event, *, ready_timeout: float = 30.0) -> None:
        """Consume notifications from ``monitor_factory(regex)`` until ``stop`` is set."""
        mon = monitor_factory(relay_subscription_regex())
        await mon.wait_ready(ready_timeout)  # type: ignore[attr-defined]
        log.info("srvd %s ready: advertising %s, %s", self.policy.relay_atsign, self.advertise,
                 "open to any atSign" if self.policy.allowed is None
                 else f"{len(self.policy.allowed)} allowed atSign(s)")

        async def consume() -> None:
            async for n in mon:  # type: ignore[attr-defined]
                if getattr(n, "operation", "update") != "update":
                    continue
                if getattr(n, "error", None):
                    log.warning("ignored notification %s from %s: %s", n.key[:200],
                                n.from_atsign, n.error)
                    continue
                trace.mark("srvd.in", n.key)
                await self.dispatch(n.key, n.from_atsign, n.value)

        consumer = asyncio.get_running_loop().create_task(consume())
        stopper = asyncio.get_running_loop().create_task(stop.wait())
        # ends sessions of atSigns that revoke a device key (decision 0021)
        revoker = asyncio.get_running_loop().create_task(revocation.for_srvd(self, self.client)
                                                         .run())
        try:
            done, _pending = await asyncio.wait({consumer, stopper},
                                                return_when=asyncio.FIRST_COMPLETED)
            if consumer in done and not stop.is_set():
                consumer.result()  # surface a fatal monitor error
                log.error("monitor ended unexpectedly")
        finally:
            for t in (consumer, stopper, revoker):
                t.cancel()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await mon.aclose()  # type: ignore[attr-defined]

    async def aclose(self) -> None:
        """Cancel requests in progress and close every session."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        if self.listener is not None:
            self.listener.close()
        aclose = getattr(self.relay, "aclose", None)
        if aclose is not None:
            await aclose()
