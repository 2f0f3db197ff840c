"""The control plane of one npt session: the sshnp flow with an ``npt_request`` (K5', M4).

Why a subclass of the sshnp flow: relay request, ping, device key, the signed answer and
every failure message are the same (docs/reference/noports-protocol.md#npt-sessions); what
differs is the request (``requestedHost``/``requestedPort``/``timeout``), the features the
device must have (``supportsPortChoice``, plus ``adjustableTimeout`` for a non-default
``-T``) and what a ready session is: the control socket plus the session key, no ssh.
"""

from __future__ import annotations

import contextlib
import socket
from dataclasses import dataclass, field
from typing import Any

from noports.npproto import keys as npkeys
from noports.npproto.envelope import relay_auth_payload, sign_envelope
from noports.npproto.messages import (
    FEATURE_ADJUSTABLE_TIMEOUT,
    FEATURE_PORT_CHOICE,
    FEATURE_SR_AUTH,
    FEATURE_SR_E2EE,
    DeviceInfo,
    NptRequest,
    RelayResponse,
    SessionResponse,
)

from . import checks
from .errors import DeviceRefused
from .flow import _Flow, open_session
from .params import SessionParams
from .progress import Progress

#: the official npt's default -T: the daemon ends a session unused for this long
DEFAULT_NPT_TIMEOUT_S = 30.0


@dataclass
class NptTarget:
    """What the device is asked to connect: ``host:port`` on its side, and the idle time-out."""

    host: str = "localhost"
    port: int = 22
    timeout_s: float = DEFAULT_NPT_TIMEOUT_S


@dataclass
class NptSession:
    """A ready npt session: the authenticated control socket and the session secrets."""

    session_id: str
    relay_atsign: str
    relay: RelayResponse
    control: socket.socket
    auth_line: bytes
    cipher: str
    key: bytes
    iv: bytes
    target: NptTarget
    timings: dict[str, float] = field(default_factory=dict)

    def __repr__(self) -> str:
        return (f"NptSession({self.session_id}, relay={self.relay.host}:{self.relay.port_a}, "
                f"cipher={self.cipher})")

    def close(self) -> None:
        from noports.relay.pump import abort_pump
        abort_pump(self.control)
        with contextlib.suppress(OSError):
            self.control.close()


def npt_required_features(target: NptTarget) -> list[str]:
    """As the official npt: relay auth, encryption, port choice (+ adjustable time-out)."""
    req = [FEATURE_SR_AUTH, FEATURE_SR_E2EE, FEATURE_PORT_CHOICE]
    if target.timeout_s != DEFAULT_NPT_TIMEOUT_S:
        req.append(FEATURE_ADJUSTABLE_TIMEOUT)
    return req


def refusal_hint(p: SessionParams, target: NptTarget, text: str) -> str | None:
    """What to check when the daemon refused: its permit-open list names the target."""
    if "does not permit connections" in text or "not permitted connections" in text:
        return (f"{target.host}:{target.port} is not in the daemon's permit-open list: "
                f"start sshnpd on {p.device_atsign} with --permit-open "
                f"{target.host}:{target.port} (-h/--remote-host must match the entry exactly, "
                "e.g. localhost is not 127.0.0.1)")
    return None


class NptFlow(_Flow):
    """The sshnp flow, asking for an npt session; set ``target`` before running it."""

    target: NptTarget = NptTarget()

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._nonces: dict[str, str] = {}

    def session_request(self, sid: str, rr: RelayResponse, cnonce: str, pub: str | None,
                        extra: dict[str, Any] | None = None) -> tuple[str, str]:
        p, t = self.p, self.target
        self._nonces[sid] = cnonce
        req = NptRequest(
            session_id=sid, rvd_host=rr.host, rvd_port=rr.port_b, requested_port=t.port,
            requested_host=t.host, authenticate_to_rvd=True, client_nonce=cnonce,
            rvd_nonce=rr.rvd_nonce, encrypt_rvd_traffic=True, client_ephemeral_pk=pub,
            client_ephemeral_pk_type="rsa2048", timeout_ms=int(t.timeout_s * 1000),
            np_ciphers=list(p.ciphers), extra=extra or {})
        return (npkeys.npt_request_key(p.device_atsign, p.device, p.client_atsign),
                sign_envelope(req.to_dict(), self.keys.encrypt_private))

    def check_features(self, info: DeviceInfo) -> None:
        missing = info.missing_features(npt_required_features(self.target))
        if missing:
            p = self.p
            raise DeviceRefused(
                f"{p.device}{p.device_atsign} (version {info.version or '?'}) does not "
                f"support {', '.join(missing)}", step="device features",
                hint="npt needs a daemon with port choice (sshnpd 5.x or ours); "
                "adjustableTimeout only matters for a non-default -T")

    async def verify_response(self, sid: str, value: str) -> SessionResponse:
        try:
            return await super().verify_response(sid, value)
        except DeviceRefused as exc:
            hint = refusal_hint(self.p, self.target, exc.message)
            if hint is not None:
                exc.hint = hint
            raise

    async def finish(self, sid: str, relay: str, rr: RelayResponse, resp: SessionResponse,
                     relay_sock: socket.socket, session_priv: Any) -> NptSession:
        p = self.p
        try:
            key, iv, cipher_id, _d2c = checks.session_secrets(p, resp, session_priv)  # npt offers no twin keys
        except BaseException:
            relay_sock.close()
            raise
        auth = sign_envelope(relay_auth_payload(sid, self._nonces[sid], rr.rvd_nonce),
                             self.keys.encrypt_private).encode() + b"\n"
        self.mark("tunnel_ready")
        self.progress(f"npt session ready ({cipher_id}) via {relay} to "
                      f"{self.target.host}:{self.target.port} on {p.device}{p.device_atsign}")
        return NptSession(session_id=sid, relay_atsign=relay, relay=rr, control=relay_sock,
                          auth_line=auth, cipher=cipher_id, key=key, iv=iv,
                          target=self.target, timings=self.timings)


async def open_npt_session(params: SessionParams, target: NptTarget, *,
                           progress: Progress | None = None, client: Any = None,
                           connect_relay: Any = None) -> NptSession:
    """Run the control plane for one npt session and return it ready to serve."""

    class _Bound(NptFlow):
        pass

    _Bound.target = target
    return await open_session(params, progress=progress, client=client,
                              connect_relay=connect_relay, flow_class=_Bound)


__all__ = ["DEFAULT_NPT_TIMEOUT_S", "NptFlow", "NptSession", "NptTarget", "open_npt_session",
           "npt_required_features", "refusal_hint"]
