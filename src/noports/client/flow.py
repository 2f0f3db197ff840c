"""The client side of one NoPorts v5 session (docs/reference/noports-protocol.md#session-step-by-step), with round trips overlapped.

Why this order (each step starts as early as its inputs exist, so the critical path is
connect -> relay request -> relay answer -> session request -> device answer):

* the per-session RSA key is generated in a thread while the network works (aes mode; the
  agent reuses one for a bounded time instead), and an X25519 key per session (~0.1 ms) lets
  our daemons seal the session key without it (npproto/kex.py, decision 0029);
* the command connection and the monitor connection authenticate concurrently; the monitor
  asks for a replay from just before we started, so nothing sent to us is missed even if
  its ``monitor`` command reaches the server after the first answer;
* the relay request goes out first on the command connection, then (FIFO) the fetch of the
  relay's shared key, so the monitor can decrypt the answer without waiting, then the ping,
  the device's shared key, public key (cached on disk) and username;
* relay port A is dialled and authenticated while the session request travels to the
  device; the ping answer is only checked, never waited for, unless the device is silent.

Relays are tried in order; one that does not answer in ``relay_timeout`` or whose port cannot
be reached is skipped (with a fresh session id once the device has been asked).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from noports.npproto import kex, twinkeys
from noports.npproto import keys as npkeys
from noports.npproto.envelope import dart_iso, relay_auth_payload, sign_envelope
from noports.npproto.errors import ProtocolError
from noports.npproto.escr import escr_auth_for
from noports.npproto.messages import (
    DeviceInfo,
    RelayRequest,
    RelayResponse,
    SessionResponse,
    SshRequest,
)

from . import checks, deviceinfo, pkcache, relays
from .errors import (
    AtServerError,
    DeviceRefused,
    DeviceTimeout,
    KeysError,
    RelayError,
    SecurityError,
    SshnpError,
    TunnelError,
    relay_refused,
)
from .knownhosts import update_known_hosts
from .params import SessionParams
from .progress import NullProgress, Progress

if TYPE_CHECKING:
    from noports.keys.atkeys import AtKeys

    from .tunnel import Tunnel

log = logging.getLogger(__name__)

NOTIFY_TTL_MS = 10_000
NOTIFY_TTLN_MS = 60_000
MONITOR_REPLAY_SLACK_MS = 2_000
SSH_KEY_PREFIXES = checks.SSH_KEY_PREFIXES


@dataclass
class Session:
    """An established session: the relay socket is authenticated and the tunnel is ready.

    Serve it with ``await session.tunnel.serve_socket(sock)`` or ``serve_stdio()``; close
    with :meth:`close`. ``known_hosts`` holds the pinned device host keys under
    ``host_key_alias`` (None when the device sent no keys: an official daemon).
    """

    params: SessionParams
    session_id: str
    relay_atsign: str
    relay: RelayResponse
    response: SessionResponse
    remote_user: str | None
    host_key_alias: str
    host_keys: list[str]
    known_hosts: Path | None
    cipher: str | None  # aes mode: "aes-256-ctr" / "chacha20-poly1305-v1"
    device_info: DeviceInfo | None
    tunnel: Tunnel
    timings: dict[str, float] = field(default_factory=dict)
    key_exchange: str | None = None  # aes mode: "x25519" (our daemons) or "rsa2048"

    def close(self) -> None:
        self.tunnel.close()


# --- helpers ---------------------------------------------------------------------------------

def load_client_keys(params: SessionParams) -> AtKeys:
    from noports.keys.atkeys import AtKeysError, load_atkeys
    path = params.keys_path
    try:
        keys = load_atkeys(path, params.client_atsign)
    except AtKeysError as exc:
        raise KeysError(str(exc), hint=f"activate {params.client_atsign} or pass -k "
                        "<file>.atKeys") from None
    return keys


def client_ssl_context(params: SessionParams) -> ssl.SSLContext:
    """What ``noports.keys.ca.client_context`` builds, without importing ``cryptography.x509``
    (~10 ms of start-up that ProxyCommand mode pays once per host)."""
    try:
        cafile = str(Path(params.ca_file).expanduser()) if params.ca_file else None
        ctx = ssl.create_default_context(cafile=cafile)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ctx
    except (OSError, ssl.SSLError) as exc:
        raise KeysError(f"cannot load CA file {params.ca_file}: {exc}",
                        hint="--ca-file must be a PEM file") from None


def _name(full_key: str) -> str:
    """``@to:name@from`` -> ``name`` (what AtClient.notify takes, namespace included)."""
    return npkeys.split_shared_key(full_key).name


def _plane_error(exc: BaseException, params: SessionParams, doing: str) -> SshnpError:
    """Map atclient exceptions to a step error with what to check."""
    from noports.atclient.aio import (
        AtConnectError,
        AtProtocolError,
        AtSecondaryNotFound,
        AtTimeoutError,
    )
    root = f"{params.root[0]}:{params.root[1]}"
    if _names_own_atsign(exc, params):
        return AtServerError(f"client atSign {params.client_atsign} is unknown: {exc}",
                             hint=f"check -f/--from (ansible_sshnp_client_atsign); is it "
                             f"registered in the directory {root} (--root-domain)?")
    if isinstance(exc, AtSecondaryNotFound):
        return AtServerError(f"{doing}: {exc}", hint=f"is the atSign registered in the "
                             f"directory {root} (--root-domain)?")
    if isinstance(exc, AtTimeoutError):
        return AtServerError(f"{doing}: {exc}", hint=f"is the atServer running and reachable; "
                             f"is --root-domain {root} right?")
    if isinstance(exc, AtConnectError):
        return AtServerError(f"{doing}: {exc}", hint=f"check --root-domain ({root}), "
                             "--ca-file and that the atServer is running")
    if isinstance(exc, AtProtocolError):
        hint = None
        if "pkam" in str(exc).lower():
            hint = f"do the .atKeys ({params.keys_path}) belong to {params.client_atsign}?"
        return AtServerError(f"{doing}: {exc}", hint=hint)
    return AtServerError(f"{doing}: {exc}")


def _names_own_atsign(exc: BaseException, params: SessionParams) -> bool:
    """Whether the directory does not know *our* atSign (the client connects lazily, so
    that surfaces at the first command, e.g. the relay request's notify)."""
    from noports.atclient.aio import AtSecondaryNotFound
    return isinstance(exc, AtSecondaryNotFound) and str(exc).startswith(
        f"{params.client_atsign} ")


def _names_the_recipient(exc: BaseException, params: SessionParams | None = None) -> bool:
    """Whether a failed notify is about the recipient atSign (unknown to the directory, no
    public key), not about our own atServer connection: a relay list moves on for those."""
    from noports.atclient.aio import AtProtocolError, AtSecondaryNotFound
    if params is not None and _names_own_atsign(exc, params):
        return False
    if isinstance(exc, AtSecondaryNotFound):
        return True
    return isinstance(exc, AtProtocolError) and exc.code in ("AT0007", "AT0015")


def _at_errors() -> tuple[type[BaseException], ...]:
    from noports.atclient.aio import AtClientError
    from noports.atclient.e2e import E2EError
    from noports.crypto import CryptoError
    return (AtClientError, E2EError, CryptoError, OSError)


class _Router:
    """Routes monitor notifications to the futures the flow waits on."""

    def __init__(self, params: SessionParams) -> None:
        self.params = params
        self.loop = asyncio.get_running_loop()
        self.relay_answers: dict[tuple[str, str], asyncio.Future[str]] = {}
        self.session_answers: dict[str, asyncio.Future[str]] = {}
        self.heartbeat: asyncio.Future[DeviceInfo] = self.loop.create_future()
        self.failed: BaseException | None = None

    def expect_relay(self, relay: str, sid: str) -> asyncio.Future[str]:
        fut = self.relay_answers[(relay, sid)] = self.loop.create_future()
        return fut

    def expect_session(self, sid: str) -> asyncio.Future[str]:
        fut = self.session_answers[sid] = self.loop.create_future()
        return fut

    def regex(self) -> str:
        dev = npkeys.validate_device_name(self.params.device)
        d = self.params.device_atsign
        return f"\\.sshrvd@|\\.{dev}\\.sshnp{d}"

    def deliver(self, n: Any) -> None:
        r = checks.route(self.params, n.key, n.from_atsign)
        if r is None:
            return
        sender = r.sender
        if r.kind in ("relay", "relay_nack"):
            fut = self.relay_answers.get((sender, r.session_id))
            if r.kind == "relay_nack":  # the relay refused, naming the limit
                if fut is not None and not fut.done() and n.value is not None:
                    fut.set_exception(relay_refused(sender, n.value))
                return
        elif r.kind == "session":
            fut = self.session_answers.get(r.session_id)
        else:  # heartbeat
            if n.value is not None and not self.heartbeat.done():
                try:
                    self.heartbeat.set_result(deviceinfo.parse_value(n.value)[1])
                except ProtocolError as exc:
                    log.debug("ignoring a malformed ping response: %s", exc)
            return
        if fut is None or fut.done():
            return
        if n.value is None:
            fut.set_exception(AtServerError(
                f"cannot read the notification {n.key} from {sender}: {n.error}",
                hint="the shared key between the two atSigns may be broken"))
        else:
            fut.set_result(n.value)

    def fail(self, exc: BaseException) -> None:
        self.failed = exc
        futs = [*self.relay_answers.values(), *self.session_answers.values()]
        for fut in futs:
            if not fut.done():
                fut.set_exception(exc)

    async def run(self, monitor: Any) -> None:
        try:
            async for n in monitor:
                self.deliver(n)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # monitor could not start: tell every waiter
            self.fail(_plane_error(exc, self.params, "monitor connection")
                      if isinstance(exc, _at_errors()) else exc)


def setup_limit(p: SessionParams) -> float:
    """The longest a session set-up may take, whatever it waits on: two connect timeouts
    (atServer connection, relay dial / outer SSH), each relay's timeout and the device's.

    Why one overall limit on top of each step's own: a step's bound covers one wait, but a
    queue of bounded waits (commands queued behind a stalled connection, each re-connecting)
    can add up to many times it; the limit guarantees an exit that names the step. Plus
    SETUP_SLACK_S for the local work (key generation, signatures) on a loaded machine."""
    return (2 * p.connect_timeout + len(p.relays) * p.relay_timeout + p.daemon_timeout
            + SETUP_SLACK_S)


SETUP_SLACK_S = 10.0


#: What the main path of the current set-up waits on, as (error class, step, description);
#: a plain list so the CLI's watchdog thread can read it even when the event loop is stuck.
CURRENT_STEP: list[tuple[type[SshnpError], str, str]] = [
    (AtServerError, "atServer", "starting")]


async def _await(fut: asyncio.Future[Any], timeout: float) -> Any:
    """Wait for ``fut`` without cancelling it on timeout (asyncio.TimeoutError then)."""
    return await asyncio.wait_for(asyncio.shield(fut), timeout)


# --- the flow ----------------------------------------------------------------------------------

class _Flow:
    def __init__(self, params: SessionParams, progress: Progress, client: Any,
                 keys: AtKeys, connect_relay: Any) -> None:
        self.p = params
        self.progress = progress
        self.client = client
        self.keys = keys
        self.connect_relay = connect_relay
        self.loop = asyncio.get_running_loop()
        self.router = _Router(params)
        self.timings: dict[str, float] = {}
        self.t0 = time.monotonic()
        self.tasks: list[asyncio.Task[Any]] = []
        self.device_pk_task: asyncio.Task[str] | None = None
        # started with the first relay request that went out, not per relay attempt
        self.side_tasks_started = False
        self.public_key_sent = False
        self.username_task: asyncio.Task[str | None] | None = None
        self.keygen: asyncio.Future[tuple[str, Any]] | None = None
        self.x25519: dict[str, Any] = {}  # session id -> this session's X25519 private key
        self.key_exchange: str | None = None
        self.ping_sent = False
        self.apsk_task: asyncio.Task[str] | None = None
        self.relay_peer = "the relay"
        # set when the plane says the device atSign does not exist (ping or public key
        # lookup): then no relay wait can succeed, and that, not the relay, is the news
        self.device_missing: asyncio.Future[SshnpError] = self.loop.create_future()
        self.at(AtServerError, f"connecting to the atServer of {params.client_atsign}")

    def at(self, cls: type[SshnpError], what: str, step: str | None = None) -> None:
        """Record what the main path waits on now (named if the set-up limit strikes)."""
        CURRENT_STEP[0] = (cls, step or cls.step, what)

    def mark(self, name: str) -> None:
        self.timings[name] = round(time.monotonic() - self.t0, 4)

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        t = self.loop.create_task(coro)
        self.tasks.append(t)
        return t

    async def notify(self, to: str, full_key: str, value: str, *, ttl: bool = True,
                     what: str,
                     recipient_error: Callable[[SshnpError], SshnpError] | None = None,
                     ) -> None:
        """Send a notification; failures become step errors. ``recipient_error`` maps a
        failure that is about ``to`` itself (unknown atSign, no public key) to another error."""
        try:
            await self.client.notify(to, _name(full_key), value,
                                     ttl_ms=NOTIFY_TTL_MS if ttl else None,
                                     ttln_ms=NOTIFY_TTLN_MS)
        except _at_errors() as exc:
            err = _plane_error(exc, self.p, f"sending {what} to {to}")
            if recipient_error is not None and _names_the_recipient(exc, self.p):
                raise recipient_error(err) from None
            raise err from None

    # -- side tasks ------------------------------------------------------------------------

    async def prefetch_shared(self, atsign: str) -> None:
        """Fetch the key `atsign` encrypts with for us, before its answer arrives."""
        with contextlib.suppress(Exception):
            await self.client.shared_key_by_other(atsign)

    async def device_pk(self, fresh: bool = False) -> str:
        d = self.p.device_atsign
        if not fresh:
            cached = pkcache.load_cached_pk(self.p.home_cache, d)
            if cached:
                return cached
        if fresh and hasattr(self.client, "_public_keys"):
            self.client._public_keys.pop(d, None)  # AtClient caches per process
        try:
            pk = await self.client.public_key(d)
        except _at_errors() as exc:
            err = _plane_error(exc, self.p, f"fetching the public key of {d}")
            if _names_the_recipient(exc, self.p):
                err = self.device_unknown(err)
            raise err from None
        pkcache.store_cached_pk(self.p.home_cache, d, pk)
        return pk

    async def username(self) -> str | None:
        try:
            value = await self.client.get_shared(f"username.{self.p.device}",
                                                 shared_by=self.p.device_atsign,
                                                 namespace="sshnp")
        except (*_at_errors(), ValueError) as exc:  # ValueError: client == device atSign
            log.debug("username lookup failed: %s", exc)
            return None
        return value.strip() if value and value.strip() else None

    def device_unknown(self, err: SshnpError) -> SshnpError:
        """The device atSign does not exist (as the plane says): one error, raised by
        whichever step noticed first, and the relay wait stops at once."""
        p = self.p
        out = DeviceRefused(f"device atSign {p.device_atsign} is unknown: {err.message}",
                            hint=f"check -t/--to (ansible_sshnp_device_atsign); is it "
                            f"registered in the directory {p.root[0]}:{p.root[1]}?")
        if not self.device_missing.done():
            self.device_missing.set_result(out)
        return out

    async def ping(self) -> None:
        try:
            await self.notify(self.p.device_atsign, npkeys.ping_key(
                self.p.device_atsign, self.p.device, self.p.client_atsign), npkeys.PING_VALUE,
                ttl=False, what="a ping", recipient_error=self.device_unknown)
            self.ping_sent = True
        except SshnpError as exc:
            log.debug("ping failed: %s", exc)

    async def send_public_key(self) -> None:
        ident = self.p.identity_file
        if ident is None:
            raise DeviceRefused("-s/--send-ssh-public-key needs -i/--identity-file",
                                step="arguments")
        pub = Path(str(Path(ident).expanduser()) + ".pub")
        try:
            line = pub.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise KeysError(f"cannot read {pub}: {exc.strerror or exc}",
                            hint="-s sends the public half of -i, <identity>.pub") from None
        line = checks.ssh_public_key_line(pub, line)
        await self.notify(self.p.device_atsign, npkeys.sshpublickey_key(
            self.p.device_atsign, self.p.device, self.p.client_atsign), line,
            what="the ssh public key")
        self.progress(f"sent {pub.name} to {self.p.device_atsign}")

    # -- main ------------------------------------------------------------------------------

    async def run(self) -> Session:
        p = self.p
        if p.tunnel_mode == "aes":
            pre = _take_prestarted()
            self.keygen = (asyncio.wrap_future(pre) if pre is not None
                           else self.loop.run_in_executor(None, _session_keypair))
        else:
            self.spawn(asyncio.to_thread(_warm_paramiko))
        monitor = self.client.monitor(self.router.regex(), since_ms=int(
            time.time() * 1000) - MONITOR_REPLAY_SLACK_MS)
        monitor.start()
        self.spawn(self.router.run(monitor))
        self.progress(f"connecting to the atServer of {p.client_atsign}")

        last: SshnpError | None = None
        order = await self.choose_relays()
        for i, relay in enumerate(order):
            try:
                return await self.attempt(relay)
            except RelayError as exc:
                last = exc
                more = i + 1 < len(order)
                self.progress(f"{exc.message}{'; trying the next relay' if more else ''}")
        assert last is not None
        if len(p.relays) > 1:
            raise RelayError(f"none of the relays {', '.join(p.relays)} worked; last: "
                             f"{last.message}", hint=last.hint)
        raise last

    async def choose_relays(self) -> list[str]:
        """Several -r relays: fastest first (``--relay-select fastest``), else as given."""
        p = self.p
        if len(p.relays) < 2 or p.relay_select != "fastest":
            return list(p.relays)
        self.at(RelayError, f"measuring relays {', '.join(p.relays)}")

        async def ask(relay: str) -> str:
            fut = self.router.expect_relay(relay, "discover")
            await self.client.notify(relay, relays.DISCOVER_NAME, "discover", namespace=None,
                                     ttln_ms=NOTIFY_TTLN_MS)
            return await asyncio.shield(fut)

        probes = await relays.probe_all(p.relays, ask,
                                        timeout=min(p.relay_timeout, relays.PROBE_TIMEOUT))
        order = relays.rank(p.relays, probes)
        self.mark("relays_measured")
        self.progress(f"relays measured: {relays.describe(probes)}; using {order[0]}")
        return order

    async def attempt(self, relay: str) -> Session:
        p = self.p
        sid = npkeys.new_session_id()
        # UTC ("Z"): a device in another time zone reads it right (sshnpd checks it, ±60 s)
        cnonce = dart_iso(datetime.now(timezone.utc))
        escr_key = relays.escr_key_for(p)  # single-port relay: ESCR with a fresh key
        m1 = RelayRequest(session_id=sid, atsign_a=p.client_atsign, atsign_b=p.device_atsign,
                          client_nonce=cnonce, extra=relays.request_extra(p, escr_key, self.keys))
        if escr_key is not None and self.apsk_task is None:
            self.apsk_task = self.spawn(relays.ensure_signing_key(self.client, self.keys))
        relay_fut = self.router.expect_relay(relay, sid)
        self.progress(f"asking relay {relay} for ports")
        self.at(AtServerError, f"sending the relay request to {relay}")
        # a relay atSign the plane does not know is skipped like a dead relay
        await self.notify(relay, npkeys.relay_request_key(relay, p.device, p.client_atsign),
                          m1.to_json(), what="the relay request",
                          recipient_error=lambda err: RelayError(
                              err.message, hint=f"is {relay} a relay atSign registered in "
                              f"the directory {p.root[0]}:{p.root[1]}?"))
        if not self.side_tasks_started:  # once per session, whichever relay got it first
            self.side_tasks_started = True
            self.mark("relay_request_sent")
            self.progress(f"connected as {p.client_atsign}; relay request sent")
            # FIFO on the command connection: most urgent first
            self.spawn(self.prefetch_shared(relay))
            self.spawn(self.ping())
            self.spawn(self.prefetch_shared(p.device_atsign))
            self.device_pk_task = self.spawn(self.device_pk())
            if p.need_remote_user and not p.remote_user:
                self.username_task = self.spawn(self.username())
        else:
            self.spawn(self.prefetch_shared(relay))
        self.at(RelayError, f"waiting for relay {relay} to answer")
        answer = await self.wait_relay(relay, relay_fut)
        rr = checks.relay_answer(relay, answer)
        self.mark("relay_answered")
        self.progress(f"relay {relay} opened {rr.host}:{rr.port_a}")

        if p.send_ssh_public_key and not self.public_key_sent:
            self.at(AtServerError, f"sending the ssh public key to {p.device_atsign}")
            await self.send_public_key()
            self.public_key_sent = True

        pub = priv = None
        if p.tunnel_mode == "aes":
            assert self.keygen is not None
            self.at(SecurityError, "generating the session key", step="session key")
            pub, priv = await self.keygen
        request_key, envelope = self.session_request(sid, rr, cnonce, pub,
                                                     relays.session_request_extra(escr_key))
        auth_line: Any = sign_envelope(relay_auth_payload(sid, cnonce, rr.rvd_nonce),
                                       self.keys.encrypt_private).encode() + b"\n"
        if escr_key is not None:
            assert self.apsk_task is not None
            self.at(AtServerError, f"publishing the ESCR signing key of {p.client_atsign}")
            try:
                await self.apsk_task
            except _at_errors() as exc:
                raise _plane_error(exc, self.p, "publishing the ESCR signing key") from None
            auth_line = escr_auth_for(self.keys, sid, escr_key, side_a=True)
        relay_sock_task = self.spawn(self.dial_relay(relay, rr, auth_line))
        session_fut = self.router.expect_session(sid)
        self.at(AtServerError, f"sending the session request to {p.device_atsign}")
        await self.notify(p.device_atsign, request_key, envelope, what="the session request")
        self.mark("session_request_sent")
        self.progress(f"session request sent to {p.device}{p.device_atsign}")

        self.at(DeviceTimeout, f"waiting for {p.device}{p.device_atsign} to answer")
        try:
            value = await self.wait_device(session_fut)
        except BaseException:
            relay_sock_task.cancel()
            raise
        self.mark("device_answered")
        resp = await self.verify_response(sid, value)
        self.progress(f"{p.device}{p.device_atsign} answered (signature verified)")
        self.at(RelayError, f"connecting to relay {relay} at {rr.host}:{rr.port_a}")
        try:
            relay_sock = await relay_sock_task
        except RelayError:
            raise
        self.mark("relay_connected")
        return await self.finish(sid, relay, rr, resp, relay_sock, priv)

    def session_request(self, sid: str, rr: RelayResponse, cnonce: str, pub: str | None,
                        extra: dict[str, Any] | None = None) -> tuple[str, str]:
        """(full atKey, signed envelope) of the session request: K5 with M3 (npt: K5').
        ``extra``: fields old peers ignore (ESCR's relay auth for a single-port relay)."""
        p = self.p
        req = SshRequest(
            session_id=sid, host=rr.host, port=rr.port_b, direct=True,
            authenticate_to_rvd=True, client_nonce=cnonce, rvd_nonce=rr.rvd_nonce,
            encrypt_rvd_traffic=p.tunnel_mode == "aes", client_ephemeral_pk=pub,
            client_ephemeral_pk_type="rsa2048" if pub else None,
            np_ciphers=list(p.ciphers) if p.tunnel_mode == "aes" else None,
            extra=dict(extra or {}))
        if p.tunnel_mode == "aes":  # a key per direction if the daemon agrees (AES-CTR)
            req.extra[twinkeys.OFFER] = True
            # our daemons seal the session key to this instead of the RSA key (decision 0029)
            self.x25519[sid], req.extra[kex.FIELD_PK] = kex.new_client_key()
        return (npkeys.ssh_request_key(p.device_atsign, p.device, p.client_atsign),
                sign_envelope(req.to_dict(), self.keys.encrypt_private))

    def check_features(self, info: DeviceInfo) -> None:
        """Fail early if the device's ping answer lacks a feature this session needs."""
        checks.check_features(self.p, info)

    async def wait_relay(self, relay: str, relay_fut: asyncio.Future[str]) -> str:
        """The relay's answer; an unknown device atSign (seen by the ping or the key lookup
        meanwhile) ends the wait at once and wins over the relay's refusal of it."""
        p = self.p
        missing = self.device_missing
        done, _pending = await asyncio.wait({relay_fut, missing}, timeout=p.relay_timeout,
                                            return_when=asyncio.FIRST_COMPLETED)
        if relay_fut.done() and not relay_fut.cancelled():
            relay_fut.exception()  # retrieved: no "never retrieved" noise at exit
        if missing.done():
            raise missing.result()
        if relay_fut not in done:
            raise RelayError(f"relay {relay} did not answer within {p.relay_timeout:g}s",
                             hint=f"is srvd running as {relay}, and does its -m allow "
                             f"{p.client_atsign}?")
        if relay_fut.exception() is not None and p.device_atsign in str(
                relay_fut.exception()):
            # the relay refused because of the device atSign: our own lookup says why
            lookups: set[asyncio.Future[Any]] = {missing}
            if self.device_pk_task is not None:
                lookups.add(self.device_pk_task)
            await asyncio.wait(lookups, timeout=2.0, return_when=asyncio.FIRST_COMPLETED)
            if missing.done():
                raise missing.result()
        return relay_fut.result()

    async def dial_relay(self, relay: str, rr: RelayResponse, auth_line: Any) -> socket.socket:
        try:
            return await self.connect_relay(rr.host, rr.port_a, auth_line,
                                            timeout=self.p.connect_timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            raise RelayError(f"cannot reach relay {relay} at {rr.host}:{rr.port_a}: "
                             f"{exc or type(exc).__name__}",
                             hint="is the relay's -i address reachable from here, and its "
                             "port range open?") from None

    async def wait_device(self, session_fut: asyncio.Future[str]) -> str:
        """The device's answer, failing early if its ping says it lacks a needed feature."""
        p = self.p
        deadline = self.loop.time() + p.daemon_timeout
        hb = self.router.heartbeat
        checked = False
        while True:
            left = deadline - self.loop.time()
            if left <= 0:
                break
            waiting: set[asyncio.Future[Any]] = {session_fut}
            if not checked:
                waiting.add(hb)
            done, _pending = await asyncio.wait(waiting, timeout=left,
                                                return_when=asyncio.FIRST_COMPLETED)
            if session_fut in done:
                return session_fut.result()
            if hb in done and not checked:
                checked = True
                self.check_features(hb.result())
        raise checks.device_timeout(p, pinged=hb.done())

    async def verify_response(self, sid: str, value: str) -> SessionResponse:
        checks.check_not_refused(self.p, value)  # before waiting for the key it does not need
        assert self.device_pk_task is not None
        self.at(AtServerError, f"fetching the public key of {self.p.device_atsign}")
        pk = await self.device_pk_task
        try:
            return checks.verify_response(self.p, sid, value, pk)
        except checks.BadSignature:
            # the cached key may be stale (device re-keyed): once more with a fresh one
            pk = await self.device_pk(fresh=True)
            return checks.verify_response(self.p, sid, value, pk)

    async def finish(self, sid: str, relay: str, rr: RelayResponse, resp: SessionResponse,
                     relay_sock: socket.socket, session_priv: Any) -> Session:
        p = self.p
        self.relay_peer = f"relay {relay} ({rr.host}:{rr.port_a})"
        pin = checks.host_key_pin(p, resp)
        alias, host_keys = pin.alias, pin.host_keys
        user = p.remote_user
        if user is None and self.username_task is not None:
            self.at(AtServerError, f"looking up the username on {p.device}{p.device_atsign}")
            user = await self.username_task
        try:
            checks.check_remote_user(p, user)
        except DeviceRefused:
            relay_sock.close()
            raise
        try:
            if p.tunnel_mode == "aes":
                tunnel, cipher = self.aes_tunnel(resp, relay_sock, session_priv)
            else:
                cipher = None
                self.at(TunnelError, "outer SSH handshake with the device's sshd")
                tunnel = await self.ssh_tunnel(resp, relay_sock, user or "", host_keys, alias)
                tunnel.peer = self.relay_peer  # type: ignore[attr-defined]
        except BaseException:
            relay_sock.close()
            raise
        self.mark("tunnel_ready")
        known = None
        if pin.target is not None:
            target = pin.target
            self.at(SecurityError, f"writing the pinned host keys to {target}",
                    step="known_hosts")
            try:
                known = update_known_hosts(target, alias, host_keys, on_change=lambda c:
                                           self.progress.warning(c.message()))
            except (OSError, ValueError) as exc:
                tunnel.close()
                raise SecurityError(f"cannot write the pinned host keys to {target}: {exc}",
                                    step="known_hosts") from None
        else:
            self.progress(f"warning: {p.device_atsign} sent no host keys (official daemon?); "
                          "ssh will trust the device's host key on first use")
        self.progress(f"tunnel ready ({p.tunnel_mode}{'/' + cipher if cipher else ''}) "
                      f"via {relay}")
        return Session(params=p, session_id=sid, relay_atsign=relay, relay=rr, response=resp,
                       remote_user=user, host_key_alias=alias, host_keys=host_keys,
                       known_hosts=known, cipher=cipher,
                       device_info=self.router.heartbeat.result()
                       if self.router.heartbeat.done() else None,
                       tunnel=tunnel, timings=self.timings, key_exchange=self.key_exchange)

    def aes_tunnel(self, resp: SessionResponse, relay_sock: socket.socket,
                   session_priv: Any) -> tuple[Tunnel, str]:
        from noports.npproto.streamcipher import new_session_cipher

        from .tunnel import AesTunnel
        key, iv, cipher_id, d2c = checks.session_secrets(
            self.p, resp, session_priv, self.x25519.get(resp.session_id))
        self.key_exchange = kex.KEX_X25519 if kex.in_response(resp.extra) else kex.KEX_RSA
        cipher = new_session_cipher(cipher_id, key, iv, is_client=True, d2c=d2c)
        return AesTunnel(relay_sock, cipher, peer=self.relay_peer), cipher_id

    async def ssh_tunnel(self, resp: SessionResponse, relay_sock: socket.socket, user: str,
                         host_keys: list[str], alias: str) -> Tunnel:
        from .tunnel import SshTunnel
        checks.check_ssh_mode(self.p, resp, host_keys)
        self.progress("outer SSH: handshake with the device's sshd")
        return await asyncio.to_thread(
            SshTunnel.connect, relay_sock, user, resp.ephemeral_private_key, host_keys,
            self.p.remote_sshd_port, self.p.connect_timeout, alias)

    async def cleanup(self) -> None:
        for t in self.tasks:
            if not t.done():
                t.cancel()
            elif not t.cancelled():
                # retrieved, so a side failure (e.g. the relay dial after the device refused)
                # is not logged at exit as "never retrieved", after and over the real error
                t.exception()
        if self.keygen is not None and not self.keygen.done():
            self.keygen.cancel()
        # answers nobody waits for any more (the monitor failing sets them all): retrieved
        for fut in (*self.router.relay_answers.values(), *self.router.session_answers.values()):
            if fut.done() and not fut.cancelled():
                fut.exception()
            else:
                fut.cancel()


_PRESTARTED: list[Any] = []


def prestart_session_key() -> None:
    """Start generating the session RSA key in a thread right at process start (the CLI
    calls this before its heavy imports; OpenSSL releases the GIL while it searches primes),
    so the key is ready by the time the relay answers."""
    import concurrent.futures
    import threading
    fut: concurrent.futures.Future[tuple[str, Any]] = concurrent.futures.Future()

    def work() -> None:
        try:
            fut.set_result(_session_keypair())
        except BaseException as exc:  # noqa: BLE001 - handed to the flow
            fut.set_exception(exc)

    threading.Thread(target=work, name="sshnp-session-key", daemon=True).start()
    _PRESTARTED.append(fut)


#: a long-lived process (the agent) sets this to hand each session its RSA pair as a
#: concurrent Future (a pair reused for a bounded time: noports.agent.keypool, decision 0029)
SESSION_KEY_SOURCE: list[Callable[[], Any]] = []


def _take_prestarted() -> Any:
    if SESSION_KEY_SOURCE:
        return SESSION_KEY_SOURCE[0]()
    return _PRESTARTED.pop() if _PRESTARTED else None


def _session_keypair() -> tuple[str, Any]:
    """The per-session RSA-2048 pair (docs/reference/noports-protocol.md#session-step-by-step step 2): (base64 SPKI, key object).

    The object is kept, so decrypting the session key later costs no key parsing.
    """
    from cryptography.hazmat.primitives.asymmetric import rsa

    from noports import crypto
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return crypto.public_key_b64(key.public_key()), key


#: Former second envelope signer, kept as a name for bench/ and old imports: it is
#: ``sign_envelope`` itself now that ``crypto.sign`` parses each private key once per process.
fast_sign_envelope = sign_envelope


def _warm_paramiko() -> None:
    """Import paramiko (~0.1 s) in a thread while the control plane works."""
    import paramiko  # noqa: F401


async def open_session(params: SessionParams, *, progress: Progress | None = None,
                       client: Any = None, connect_relay: Any = None,
                       flow_class: Any = None) -> Any:
    """Run the control-plane handshake and return a ready :class:`Session`.

    ``client`` (an :class:`noports.atclient.aio.AtClient`-like object) and ``connect_relay``
    are injectable for tests; by default a real client is made from ``params``.
    ``flow_class`` (a ``_Flow`` subclass) makes another kind of session: npt_flow.py. Raises an
    :class:`~noports.client.errors.SshnpError` subclass for every expected failure.
    """
    progress = progress or NullProgress()
    keys = None
    if client is None:
        keys = load_client_keys(params)
        from noports.atclient.aio import AtClient
        client = AtClient(params.client_atsign, keys, params.root, client_ssl_context(params),
                          timeout=params.connect_timeout)
    else:
        keys = getattr(client, "keys", None)
        if keys is None:
            raise KeysError("the injected client has no keys")
    if connect_relay is None:
        from noports.relay.pump import connect_relay as _cr
        connect_relay = _cr
    flow = (flow_class or _Flow)(params, progress, client, keys, connect_relay)
    limit = setup_limit(params)
    try:
        try:
            return await asyncio.wait_for(flow.run(), limit)
        except asyncio.TimeoutError:
            cls, step, what = CURRENT_STEP[0]
            raise cls(f"{what}: no progress within the set-up limit of {limit:g}s",
                      step=step, hint="the sum of --connect-timeout (twice), "
                      "--relay-timeout per relay and --daemon-timeout; run with -v to see "
                      "which wait stalled") from None
    except SshnpError:
        raise
    except _at_errors() as exc:
        raise _plane_error(exc, params, "control plane") from None
    finally:
        await flow.cleanup()
        # close the control plane in the background: the tunnel no longer needs it
        close = getattr(client, "close", None)
        if close is not None:
            task = asyncio.get_running_loop().create_task(close())
            _BACKGROUND.add(task)
            task.add_done_callback(_BACKGROUND.discard)


_BACKGROUND: set[asyncio.Task[Any]] = set()
