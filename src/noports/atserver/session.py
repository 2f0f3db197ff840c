"""Per-connection protocol logic of the atServer: command in, reply text out (no sockets).

Why this shape: the reply framing (one write of `<body>\\n<prompt>`, bare pol reply, no prompts
in monitor mode), the authentication states and every verb's semantics are what the Python SDK
and Dart clients depend on byte for byte (reference §2, §3, §7). Keeping them in a class that
only needs a :class:`~noports.atserver.host.Host` (storage, clock, remote access) lets the unit
tests drive every verb with a fake clock and no network. The asyncio edge (server.py) feeds
complete lines to :meth:`Session.handle` and writes what it returns; asynchronous monitor lines
go through the `emit` callback.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from noports import crypto
from noports.atprotocol import keys as K
from noports.atprotocol import metadata as M
from noports.atprotocol import notifications as N
from noports.atprotocol.errors import (
    AtError,
    error_reply,
    illegal_argument,
    invalid_key,
    invalid_syntax,
    key_not_found,
    unauthenticated,
    unauthorized,
    wants_json_errors,
)
from noports.atprotocol.grammar import Command, parse_command

from .host import Host
from .s2s import RemoteError
from .store import KeyRecord, NotificationRow

log = logging.getLogger("noports.atserver.session")

_PRIVILEGED = frozenset({
    "llookup", "plookup", "update", "update_json", "update_meta", "delete", "stats", "config",
    "monitor", "sync", "batch", "notify_fetch", "notify_remove", "otp", "keys", "notify_all",
})
_UNSUPPORTED = frozenset({"otp", "keys", "config"})
PROOF_TTL_MS = 60_000


@dataclass(frozen=True)
class Reply:
    """What to write (already framed, one write) and whether to close afterwards."""

    text: str | None
    close: bool = False


def dumps(obj: Any) -> str:
    """Compact JSON like Dart's jsonEncode (no spaces, non-ASCII kept)."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def remove_nulls(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: remove_nulls(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, list):
        return [remove_nulls(v) for v in obj]
    return obj


def fresh_meta_storage(atsign: str, now: int, **fields: Any) -> dict[str, Any]:
    """Storage form of brand-new metadata (used for server-written keys)."""
    meta = M.apply_update(None, {}, now_ms=now, atsign=atsign)
    for k, v in fields.items():
        setattr(meta, k, v)
    return M.to_storage(meta)


class Session:
    """One inbound connection's protocol state machine."""

    def __init__(self, host: Host, emit: Callable[[str], None] | None = None,
                 session_id: str | None = None) -> None:
        self.host = host
        self.me = host.atsign
        self.sid = session_id or "_" + str(uuid.uuid4())
        self.emit = emit or (lambda _line: None)
        self.authenticated = False
        self.auth_type: str | None = None  # cram | pkam
        self.enrollment_id: str | None = None
        self.pol_atsign: str | None = None
        self.json_errors = False
        self.closed = False
        # pending `from`: ("self", challenge, expires) or ("pol", atsign, cookie, proof, expires)
        self._pending: tuple[Any, ...] | None = None
        self.monitoring = False
        self._monitor_regex: re.Pattern[str] | None = None
        self._monitor_self = False

    # --- framing ------------------------------------------------------------------------

    def prompt(self) -> str:
        if self.monitoring:
            return ""
        if self.authenticated:
            return f"{self.me}@"
        if self.pol_atsign:
            return f"{self.pol_atsign}@"
        return "@"

    def _ok(self, body: str) -> Reply:
        return Reply(f"{body}\n{self.prompt()}")

    def _data(self, value: Any) -> Reply:
        return self._ok(f"data:{'null' if value is None else value}")

    def error(self, err: AtError) -> Reply:
        body = error_reply(err, json_style=self.json_errors, authenticated=self.authenticated)
        prompt = "" if self.monitoring else (f"{self.me}@" if self.authenticated else "@")
        return Reply(f"{body}\n{prompt}", close=err.close)

    # --- entry point --------------------------------------------------------------------

    async def handle(self, line: str) -> Reply:
        """Execute one request line; never raises (unexpected failures → AT0011 + close)."""
        try:
            cmd = parse_command(line)
            if cmd.verb == "exit":
                self.closed = True
                return Reply(None, close=True)
            if cmd.verb in _PRIVILEGED and not self.authenticated:
                raise unauthenticated("Command cannot be executed without auth")
            handler = getattr(self, "_v_" + cmd.verb, None)
            if handler is None or cmd.verb in _UNSUPPORTED:
                raise invalid_syntax(f"{cmd.verb} is not supported by this server")
            return await handler(cmd)
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

    # --- authentication -----------------------------------------------------------------

    async def _v_from(self, cmd: Command) -> Reply:
        p = cmd.params
        cfg = p.get("clientConfig")
        if cfg is not None:
            try:
                parsed = json.loads(cfg)
            except ValueError:
                parsed = None
            self.json_errors = wants_json_errors(parsed if isinstance(parsed, dict) else None)
        at = K.fix_atsign(p["atSign"])
        proof = str(uuid.uuid4())
        expires = self.host.now() + PROOF_TTL_MS
        if at == self.me:
            challenge = f"{self.sid}{self.me}:{proof}"
            self._pending = ("self", challenge, expires)
            return self._data(challenge)
        cookie = f"{self.sid}{at}"
        self._pending = ("pol", at, cookie, proof, expires)
        return self._data(f"proof:{cookie}:{proof}")

    def _self_challenge(self) -> str:
        if not self._pending or self._pending[0] != "self" or self._pending[-1] < self.host.now():
            raise unauthenticated("Authentication Failed: no valid from: challenge")
        return self._pending[1]

    async def _v_cram(self, cmd: Command) -> Reply:
        challenge = self._self_challenge()
        rec = self.host.get("privatekey:at_secret")
        if rec is None or not rec.value:
            raise key_not_found("privatekey:at_secret")
        digest = cmd.params["digest"]
        # crypto.cram_matches uses hmac.compare_digest, which rejects non-ASCII str
        if not digest.isascii() or not crypto.cram_matches(rec.value, challenge, digest):
            raise unauthenticated("Authentication Failed")
        self.authenticated = True
        self.auth_type = "cram"
        return self._data("success")

    async def _v_pkam(self, cmd: Command) -> Reply:
        p = cmd.params
        challenge = self._self_challenge()
        enrollment_id = p.get("enrollmentId")
        if enrollment_id:
            pub = self._approved_apkam_key(enrollment_id)
        else:
            rec = self.host.get("privatekey:at_pkam_publickey")
            if rec is None or not rec.value:
                raise key_not_found("privatekey:at_pkam_publickey")
            pub = rec.value
        algo = (p.get("signingAlgo") or "rsa2048").lower()
        hash_name = (p.get("hashingAlgo") or "sha256").lower()
        if not crypto.verify(pub, challenge, p["signature"], hash_name, algo):
            raise unauthenticated("pkam authentication failed")
        self.authenticated = True
        self.auth_type = "pkam"
        self.enrollment_id = enrollment_id or None
        return self._data("success")

    def _enrollment_key(self, enrollment_id: str) -> str:
        return K.normalize_key(f"{enrollment_id}.new.enrollments.__manage{self.me}")

    def _approved_apkam_key(self, enrollment_id: str) -> str:
        rec = self.host.get(self._enrollment_key(enrollment_id))
        if rec is None or not rec.value or not self._active(rec):
            raise AtError("AT0028", f"enrollment_id: {enrollment_id} is expired or invalid")
        try:
            obj = json.loads(rec.value)
            state = obj["approval"]["state"]
            pub = obj["apkamPublicKey"]
        except (ValueError, KeyError, TypeError) as exc:
            raise AtError("AT0028", f"enrollment_id: {enrollment_id} is invalid") from exc
        if state == "approved" and isinstance(pub, str):
            return pub
        code = {"pending": "AT0026", "revoked": "AT0027"}.get(state, "AT0025")
        raise AtError(code, f"enrollment_id: {enrollment_id} is {state}")

    async def _v_enroll(self, cmd: Command) -> Reply:
        """Only `enroll:request` on a CRAM-authenticated connection (auto-approved, §3.4).

        That is what current Dart onboarding does; OTP-based requests and the management
        operations (approve/deny/revoke/list/fetch) are not supported.
        """
        p = cmd.params
        if (p.get("operation") or "").lower() != "request":
            raise invalid_syntax(f"enroll:{p.get('operation')} is not supported by this server")
        if not (self.authenticated and self.auth_type == "cram"):
            raise unauthenticated("enroll:request is only supported on a CRAM-authenticated "
                                  "connection by this server")
        try:
            params = json.loads(p.get("enrollParams") or "")
            if not isinstance(params, dict):
                raise ValueError("not an object")
        except ValueError as exc:
            raise invalid_syntax("enroll:request needs a JSON object") from exc
        apkam = params.get("apkamPublicKey")
        if not isinstance(apkam, str) or not apkam:
            raise AtError("AT0022", "apkamPublicKey is required")
        eid = str(uuid.uuid4())
        now = self._now()
        record = {
            "sessionId": self.sid, "appName": params.get("appName"),
            "deviceName": params.get("deviceName"),
            "namespaces": {"__manage": "rw", "*": "rw"}, "apkamPublicKey": apkam,
            "requestType": "newEnrollment", "approval": {"state": "approved"},
            "encryptedAPKAMSymmetricKey": params.get("encryptedAPKAMSymmetricKey"),
        }
        store, me = self.host.store, self.me
        meta = fresh_meta_storage(me, now)
        store.put(me, self._enrollment_key(eid), dumps(remove_nulls(record)), meta,
                  commit=False)
        store.put(me, "privatekey:at_pkam_publickey", apkam, meta, commit=False)
        for field_name, suffix in (("encryptedDefaultEncryptionPrivateKey",
                                    "default_enc_private_key"),
                                   ("encryptedDefaultSelfEncryptionKey",
                                    "default_self_enc_key")):
            if isinstance(params.get(field_name), str):
                store.put(me, K.normalize_key(f"{eid}.{suffix}.__manage{me}"),
                          dumps({"value": params[field_name]}), meta, commit=False)
        return self._data(dumps({"enrollmentId": eid, "status": "approved"}))

    async def _v_pol(self, cmd: Command) -> Reply:
        pend = self._pending
        if not pend or pend[0] != "pol" or pend[-1] < self.host.now():
            raise unauthenticated("pol without a preceding from:@<atsign>")
        _kind, at, cookie, proof, _exp = pend
        remote = self.host.remote
        if remote is None:
            raise AtError("AT0021", "no outbound connectivity configured")
        try:
            ok = await remote.verify_pol(self.me, at, cookie, proof)
        except RemoteError as err:
            log.info("pol from %s on %s: verification lookup failed: %s", at, self.me, err.code)
            ok = False
        if not ok:
            raise unauthenticated("Pol Authentication Failed")
        self._pending = None
        self.pol_atsign = at
        return Reply(f"{at}@")

    # --- keys helpers -------------------------------------------------------------------

    def _now(self) -> int:
        return self.host.now()

    def _key(self, p: dict[str, str], *, with_cached: bool = False) -> str:
        """Rebuild `[cached:][public:][@for:]<atKey>[@atSign]` as the Dart handlers do."""
        at_key = p["atKey"]
        k = ""
        if with_cached and p.get("isCached") and not at_key.lower().startswith("cached:"):
            k += "cached:"
        if (p.get("publicScope") or p.get("isPublic")) and "public:" not in at_key.lower():
            k += "public:"
        if p.get("forAtSign"):
            k += K.fix_atsign(p["forAtSign"]) + ":"
        k += at_key
        if p.get("atSign"):
            k += K.fix_atsign(p["atSign"])
        return K.normalize_key(k)

    def _check_owner(self, p: dict[str, str]) -> None:
        if p.get("atSign") and K.fix_atsign(p["atSign"]) != self.me:
            raise invalid_key(f"Invalid key: atSign {K.fix_atsign(p['atSign'])} is not "
                              f"the current atSign {self.me}")

    def _meta(self, rec: KeyRecord) -> Any:
        return M.from_storage(rec.meta) if rec.meta else M.apply_update(
            None, {}, now_ms=self._now(), atsign=self.me)

    def _active(self, rec: KeyRecord) -> bool:
        return M.is_active(self._meta(rec), self._now())

    def _put(self, key: str, value: str | None, meta: Any, op: str = "+") -> int:
        st = M.to_storage(meta)
        cid = self.host.store.put(self.me, key, value, st, commit=K.is_committed(key), op=op,
                                  expires_at=_ms(getattr(meta, "expires_at", None)),
                                  available_at=_ms(getattr(meta, "available_at", None)),
                                  ts=self._now())
        return cid

    def _render(self, key: str, rec: KeyRecord, operation: str | None) -> Reply:
        if not self._active(rec):
            return self._data(None)
        meta = self._meta(rec)
        if operation == "meta":
            return self._data(dumps(remove_nulls(M.to_json(meta))))
        if operation == "all":
            return self._data(dumps(remove_nulls(
                {"key": key, "data": rec.value, "metaData": M.to_json(meta)})))
        return self._data(rec.value)

    # --- CRUD ---------------------------------------------------------------------------

    async def _v_update(self, cmd: Command) -> Reply:
        p = cmd.params
        self._check_owner(p)
        key = self._key(p)
        return await self._do_update(key, p, p.get("value"), p.get("forAtSign"), value_given=True)

    async def _v_update_meta(self, cmd: Command) -> Reply:
        p = cmd.params
        self._check_owner(p)
        key = self._key(p)
        rec = self.host.get(key)
        return await self._do_update(key, p, rec.value if rec else None, p.get("forAtSign"),
                                     value_given=False, op="#")

    async def _v_update_json(self, cmd: Command) -> Reply:
        try:
            obj = json.loads(cmd.params["json"])
        except ValueError as exc:
            raise invalid_syntax("update:json: invalid JSON") from exc
        if not isinstance(obj, dict) or not isinstance(obj.get("atKey"), str):
            raise invalid_syntax("update:json needs an object with atKey")
        meta_in = obj.get("metadata") or {}
        p: dict[str, str] = {}
        if isinstance(meta_in, dict):
            for name, v in meta_in.items():
                if v is None:
                    continue
                p[name] = str(v).lower() if isinstance(v, bool) else str(v)
        shared_with = obj.get("sharedWith")
        shared_by = obj.get("sharedBy") or self.me
        p["atKey"] = obj["atKey"]
        p["atSign"] = str(shared_by)
        if shared_with:
            p["forAtSign"] = str(shared_with)
        if meta_in.get("isPublic") if isinstance(meta_in, dict) else False:
            p["publicScope"] = "public"
        self._check_owner(p)
        key = self._key(p)
        value = obj.get("value")
        return await self._do_update(key, p, None if value is None else str(value),
                                     p.get("forAtSign"), value_given=True)

    async def _do_update(self, key: str, p: dict[str, str], value: str | None,
                         for_atsign: str | None, *, value_given: bool, op: str = "+") -> Reply:
        K.validate_update_key(key, self.me)
        try:
            update = M.params_to_update(p)
        except ValueError as exc:
            raise invalid_syntax(f"Invalid syntax. {exc}") from exc
        rec = self.host.get(key)
        existing = self._meta(rec) if rec else None
        now = self._now()
        meta = M.apply_update(existing, update, now_ms=now, atsign=self.me)
        cid = self._put(key, value, meta, op=op)
        self.host.stats_changed()
        to = K.fix_atsign(for_atsign) if for_atsign else None
        if self.host.config.autonotify and to and to != self.me:
            self._autonotify(key, to, "update", value, meta)
        return self._data(cid)

    def _autonotify(self, key: str, to: str, op: str, value: str | None, meta: Any) -> None:
        """Push the change to the sharedWith atSign's cache (reference §3.2 autoNotify)."""
        now = self._now()
        n = N.Notification(
            id=str(uuid.uuid4()), from_atsign=self.me, to_atsign=to, key=key,
            value=value if op == "update" else None, operation=op, message_type="key",
            epoch_millis=now, expires_at=now + self.host.config.notification_expiry_ms,
            is_encrypted=bool(getattr(meta, "is_encrypted", False)) if meta else False,
            metadata=_notif_meta(meta) if meta is not None else {},
            ttl_ms=self.host.config.notification_expiry_ms,
        )
        self._store_sent(n, now)

    async def _v_llookup(self, cmd: Command) -> Reply:
        p = cmd.params
        key = self._key(p, with_cached=True)
        rec = self.host.get(key)
        if rec is None:
            raise key_not_found(key)
        return self._render(key, rec, p.get("operation"))

    async def _v_lookup(self, cmd: Command) -> Reply:
        p = cmd.params
        owner = K.fix_atsign(p["atSign"])
        at_key = p["atKey"]
        op = p.get("operation")
        if owner == self.me:
            if self.authenticated:
                key = K.normalize_key(f"{self.me}:{at_key}{self.me}")
            elif self.pol_atsign:
                key = K.normalize_key(f"{self.pol_atsign}:{at_key}{self.me}")
            else:
                key = K.normalize_key(f"public:{at_key}{self.me}")
            rec = self.host.get(key)
            if rec is None:
                raise key_not_found(key)
            return self._render(key, rec, op)
        if not self.authenticated:
            raise unauthenticated(f"lookup of {owner}'s keys needs an authenticated connection")
        cache_key = K.normalize_key(f"cached:{self.me}:{at_key}{owner}")
        return await self._remote_lookup(owner, at_key, cache_key, op,
                                         bypass=p.get("bypassCache", "").lower() == "true",
                                         handshake=True)

    async def _v_plookup(self, cmd: Command) -> Reply:
        p = cmd.params
        owner = K.fix_atsign(p["atSign"])
        at_key = p["atKey"]
        op = p.get("operation")
        if owner == self.me:
            key = K.normalize_key(f"public:{at_key}{self.me}")
            rec = self.host.get(key)
            if rec is None:
                raise key_not_found(key)
            return self._render(key, rec, op)
        cache_key = K.normalize_key(f"cached:public:{at_key}{owner}")
        return await self._remote_lookup(owner, at_key, cache_key, op,
                                         bypass=p.get("bypassCache", "").lower() == "true",
                                         handshake=False)

    async def _remote_lookup(self, owner: str, at_key: str, cache_key: str, op: str | None, *,
                             bypass: bool, handshake: bool) -> Reply:
        """Cached remote lookup (reference §6.5)."""
        now = self._now()
        if not bypass:
            rec = self.host.get(cache_key)
            if rec is not None and self._active(rec):
                meta = self._meta(rec)
                ttr = getattr(meta, "ttr", None)
                refresh = _ms(getattr(meta, "refresh_at", None))
                if ttr == -1 or refresh is None or now <= refresh:
                    return self._render(cache_key, rec, op)
        remote = self.host.remote
        if remote is None:
            raise AtError("AT0021", "no outbound connectivity configured")
        r = await remote.request(self.me, owner, f"lookup:all:{at_key}{owner}",
                                 handshake=handshake)
        if not r.ok:
            if r.code == "AT0015":
                self.host.store.delete(self.me, cache_key, commit=False)
                raise key_not_found(f"{at_key}{owner}")
            raise AtError(r.code or "AT0011", r.message)
        if r.data is None or r.data == "null":
            self.host.store.delete(self.me, cache_key, commit=False)
            raise key_not_found(f"{at_key}{owner}")
        try:
            obj = json.loads(r.data)
            if not isinstance(obj, dict):
                raise ValueError("not an object")
        except ValueError as exc:
            raise AtError("AT0014", f"unexpected lookup reply from {owner}") from exc
        remote_meta = obj.get("metaData") if isinstance(obj.get("metaData"), dict) else {}
        value = obj.get("data")
        ttr = _int_or_none(remote_meta.get("ttr"))
        if handshake:
            if ttr not in (None, 0):
                self._cache_put(cache_key, value, remote_meta, owner)
        else:
            self._cache_put(cache_key, value, remote_meta, owner,
                            default_ttr_ms=self.host.config.plookup_refresh_ms)
        if op == "meta":
            return self._data(dumps(remove_nulls(remote_meta)))
        if op == "all":
            return self._data(dumps(remove_nulls(obj)))
        return self._data(value)

    def _cache_put(self, cache_key: str, value: Any, dart_meta: dict[str, Any], owner: str, *,
                   default_ttr_ms: int | None = None) -> None:
        if len(cache_key) > 255:
            return
        p = _dart_meta_params(dart_meta)
        if default_ttr_ms is not None and _int_or_none(dart_meta.get("ttr")) in (None, 0):
            p["ttr"] = str(default_ttr_ms)
        try:
            update = M.params_to_update(p)
            meta = M.apply_update(None, update, now_ms=self._now(), atsign=owner)
        except (ValueError, AtError):
            return
        self._put(cache_key, None if value is None else str(value), meta)

    async def _v_delete(self, cmd: Command) -> Reply:
        p = cmd.params
        at_key = p["atKey"]
        if at_key.lower() == "privatekey:at_secret":
            self.host.store.delete(self.me, "privatekey:at_secret", commit=False)
            self.host.store.put(self.me, "privatekey:at_secret_deleted", "true", {},
                                commit=False)
            return self._data(-1)
        self._check_owner(p)
        key = self._key(p, with_cached=True)
        me = self.me
        bare = key[len("public:"):] if key.startswith("public:") else key
        protected = {f"signing_publickey{me}", f"signing_privatekey{me}",
                     f"{me}:signing_privatekey{me}", f"publickey{me}", "at_pkam_publickey",
                     "privatekey:at_pkam_publickey"}
        if bare in protected:
            raise unauthorized("Cannot delete protected key")
        if K.key_type(key, self.me) == K.KeyType.INVALID:
            raise invalid_key(f"Invalid key: {key}")
        rec = self.host.get(key)
        cid = self.host.store.delete(self.me, key, commit=K.is_committed(key), ts=self._now())
        self.host.stats_changed()
        to = K.fix_atsign(p["forAtSign"]) if p.get("forAtSign") else None
        if (self.host.config.autonotify and to and to != self.me
                and not key.startswith("cached:")):
            self._autonotify(key, to, "delete", None, self._meta(rec) if rec else None)
        return self._data(cid)

    async def _v_scan(self, cmd: Command) -> Reply:
        p = cmd.params
        rx_text = p.get("regex")
        try:
            rx = re.compile(rx_text) if rx_text else None
        except re.error as exc:
            raise illegal_argument(f"invalid regex {rx_text!r}: {exc}") from exc
        if p.get("forAtSign"):
            other = K.fix_atsign(p["forAtSign"])
            if other != self.me:
                if not self.authenticated:
                    raise unauthenticated("scan of another atSign needs authentication")
                remote = self.host.remote
                if remote is None:
                    raise AtError("AT0021", "no outbound connectivity configured")
                verb = f"scan {rx_text}" if rx_text else "scan"
                r = await remote.request(self.me, other, verb, handshake=True)
                if not r.ok:
                    raise AtError(r.code or "AT0011", r.message)
                return self._data(r.data)
        show_hidden = p.get("showhidden", "").lower() == "true"
        out: list[str] = []
        now = self._now()
        for rec in self.host.store.all_keys(self.me):
            k = rec.key
            meta = self._meta(rec)
            if not M.is_active(meta, now):
                continue
            if self.authenticated:
                if not K.scan_visible(k, show_hidden=show_hidden):
                    continue
                shown = k
            elif self.pol_atsign:
                prefix = f"{self.pol_atsign}:"
                if not k.startswith(prefix):
                    continue
                shown = k[len(prefix):]
            else:
                if not k.startswith("public:") or k.startswith("public:_"):
                    continue
                shown = k[len("public:"):]
            if rx is not None and not _safe_search(rx, shown):
                continue
            out.append(shown)
        return self._data(dumps(out))

    # --- notifications ------------------------------------------------------------------

    def _store_sent(self, n: Any, now: int) -> None:
        row = NotificationRow(
            atsign=self.me, id=n.id, kind="sent", from_atsign=n.from_atsign,
            to_atsign=n.to_atsign, key=n.key, status="queued", retry_count=0, next_attempt=now,
            epoch_ms=n.epoch_millis, expires_at=n.expires_at, data=N.to_storage(n))
        self.host.store.put_notification(row)
        self.host.nudge()

    def store_received(self, n: Any, kind: str = "received") -> NotificationRow:
        """Persist a received/self notification and hand it to live monitors."""
        row = NotificationRow(
            atsign=self.me, id=n.id, kind=kind, from_atsign=n.from_atsign,
            to_atsign=n.to_atsign, key=n.key, status="delivered", retry_count=0,
            next_attempt=0, epoch_ms=n.epoch_millis, expires_at=n.expires_at,
            data=N.to_storage(n))
        self.host.store.put_notification(row)
        self.host.publish(row, n)
        return row

    async def _v_notify(self, cmd: Command) -> Reply:
        p = cmd.params
        if not self.authenticated and not self.pol_atsign:
            raise unauthenticated("Command cannot be executed without auth")
        now = self.host.next_epoch()
        ttln = _int_or_none(p.get("ttln")) or self.host.config.notification_expiry_ms
        if self.authenticated:
            if p.get("atSign") and K.fix_atsign(p["atSign"]) != self.me:
                raise unauthorized(f"{K.fix_atsign(p['atSign'])} is not the current atSign")
            if not p.get("forAtSign"):
                raise invalid_syntax("Invalid syntax. notify needs a recipient @<atSign>")
            to = K.fix_atsign(p["forAtSign"])
            n = self._build_notification(p, from_atsign=self.me, to=to, now=now, ttln=ttln)
            if to == self.me:
                self.store_received(n)
            else:
                self._store_sent(n, now)
            return self._data(n.id)
        # receiving side: a pol-authenticated peer delivers a notification to us
        sender = self.pol_atsign
        assert sender is not None
        if p.get("atSign") and K.fix_atsign(p["atSign"]) != sender:
            raise unauthorized(f"{sender} cannot notify on behalf of {K.fix_atsign(p['atSign'])}")
        to = K.fix_atsign(p["forAtSign"]) if p.get("forAtSign") else self.me
        if to != self.me:
            raise unauthorized(f"notification for {to} delivered to {self.me}")
        n = self._build_notification(p, from_atsign=sender, to=self.me, now=now, ttln=ttln)
        if self._is_redelivery(n):
            return self._data("success")
        self.store_received(n)
        self._cache_from_notification(n, p)
        return self._data("success")

    def _is_redelivery(self, n: Any) -> bool:
        """Same id, sender and content as one already stored: a retry after a lost ack.

        Delivery is at-least-once (the sender retries when it did not see `data:success`);
        ignoring exact duplicates keeps monitors and replay free of repeats. A reused id with
        different content (old SDKs reuse ids) is still stored, overwriting as the reference
        server does.
        """
        old = self._notif_row(n.id)
        if old is None or old.kind != "received" or old.from_atsign != n.from_atsign:
            return False
        d = old.data if isinstance(old.data, dict) else {}
        return (d.get("key"), d.get("value"), d.get("operation")) == (
            n.key, n.value, n.operation)

    def _build_notification(self, p: dict[str, str], *, from_atsign: str, to: str, now: int,
                            ttln: int) -> Any:
        key = N.notification_key(p, from_atsign=from_atsign)
        update = M.params_to_update(p)
        meta = M.apply_update(None, update, now_ms=now, atsign=from_atsign)
        message_type = (p.get("messageType") or "key").lower()
        if key.startswith("public:") or p.get("publicScope"):
            is_enc = False
        elif message_type == "text":
            is_enc = (p.get("isEncrypted") or "false").lower() == "true"
        else:
            is_enc = (p.get("isEncrypted") or "true").lower() != "false"
        return N.Notification(
            id=p.get("id") or str(uuid.uuid4()), from_atsign=from_atsign, to_atsign=to,
            key=key, value=p.get("value") if message_type != "text" else None,
            operation=(p.get("operation") or "update").lower(), message_type=message_type,
            epoch_millis=now, expires_at=now + ttln, is_encrypted=is_enc,
            metadata=_notif_meta(meta, p), notifier=p.get("notifier") or "SYSTEM",
            strategy=(p.get("strategy") or "all").lower(),
            priority=(p.get("priority") or "low").lower(), ttl_ms=ttln,
        )

    def _cache_from_notification(self, n: Any, p: dict[str, str]) -> None:
        """Receiver-side cache of shared keys pushed with a ttr (reference §3.3)."""
        if (p.get("messageType") or "key").lower() != "key":
            return
        cache_key = K.normalize_key("cached:" + n.key)
        if len(cache_key) > 255:
            raise invalid_key(f"cached key too long: {len(cache_key)} > 255")
        ttr = _int_or_none(p.get("ttr"))
        if n.operation == "delete":
            rec = self.host.get(cache_key)
            if rec is not None and getattr(self._meta(rec), "ccd", False):
                self.host.store.delete(self.me, cache_key, commit=False)
                self.host.stats_changed()
            return
        if ttr in (None, 0):
            return
        update = M.params_to_update(p)
        if p.get("value") is not None:
            meta = M.apply_update(None, update, now_ms=self._now(), atsign=n.from_atsign)
            self._put(cache_key, p["value"], meta)
            self.host.stats_changed()
        else:
            rec = self.host.get(cache_key)
            if rec is not None:
                meta = M.apply_update(self._meta(rec), update, now_ms=self._now(),
                                      atsign=n.from_atsign)
                self._put(cache_key, rec.value, meta)
                self.host.stats_changed()

    def _notif_row(self, nid: str) -> NotificationRow | None:
        return self.host.store.get_notification(self.me, nid)

    async def _v_notify_status(self, cmd: Command) -> Reply:
        row = self._notif_row(cmd.params["notificationId"])
        if row is None:
            return self._data(None)
        if row.expires_at is not None and row.expires_at < self._now():
            return self._data("expired")
        return self._data(row.status)

    async def _v_notify_list(self, cmd: Command) -> Reply:
        p = cmd.params
        if not self.authenticated and not self.pol_atsign:
            return self._data(None)
        rx_text = p.get("regex")
        try:
            rx = re.compile(rx_text) if rx_text else None
        except re.error as exc:
            raise illegal_argument(f"invalid regex {rx_text!r}: {exc}") from exc
        now = self._now()
        if self.authenticated:
            rows = self.host.store.notifications(self.me, ("received",), now=now)
        else:
            rows = self.host.store.notifications(self.me, ("sent",), now=now,
                                                 to_atsign=self.pol_atsign)
        from_ms = _date_ms(p.get("fromDate"))
        to_ms = _date_ms(p.get("toDate"), end=True)
        items = []
        for row in rows:
            if from_ms is not None and row.epoch_ms < from_ms:
                continue
            if to_ms is not None and row.epoch_ms > to_ms:
                continue
            if rx is not None and not (_safe_search(rx, row.key)
                                       or _safe_search(rx, row.from_atsign.lstrip("@"))):
                continue
            items.append(N.from_storage(row.data))
        if not items:
            return self._data(None)
        body = N.notify_list_json(items)
        return self._data(body if isinstance(body, str) else dumps(body))

    async def _v_notify_remove(self, cmd: Command) -> Reply:
        self.host.store.remove_notification(self.me, cmd.params["id"])
        return self._data("success")

    async def _v_notify_fetch(self, cmd: Command) -> Reply:
        nid = cmd.params["notificationId"]
        row = self._notif_row(nid)
        if row is None:
            return self._data(dumps({"id": nid,
                                     "notificationStatus": "NotificationStatus.expired"}))
        ttype = {"sent": "sent", "received": "received", "self": "self"}[row.kind]
        d = {
            "id": row.id, "fromAtSign": row.from_atsign, "toAtSign": row.to_atsign,
            "notification": row.key, "type": f"NotificationType.{ttype}",
            "notificationStatus": f"NotificationStatus.{row.status}",
            "notificationDateTime": M.dart_date(row.epoch_ms),
            "expiresAt": M.dart_date(row.expires_at) if row.expires_at else "null",
            "retryCount": str(row.retry_count),
        }
        for k in ("operation", "messageType", "priority", "strategy", "notifier", "value"):
            v = row.data.get(k) if isinstance(row.data, dict) else None
            if v is not None:
                d[k] = str(v)
        return self._data(dumps(d))

    async def _v_notify_all(self, cmd: Command) -> Reply:
        p = cmd.params
        if p.get("atSign") and K.fix_atsign(p["atSign"]) != self.me:
            raise unauthorized("notify:all must be sent by the current atSign")
        result: dict[str, str] = {}
        for r in (p.get("forAtSign") or "").split(","):
            if not r.strip():
                continue
            to = K.fix_atsign(r)
            now = self.host.next_epoch()
            q = dict(p, forAtSign=to)
            n = self._build_notification(q, from_atsign=self.me, to=to, now=now,
                                         ttln=self.host.config.notification_expiry_ms)
            if to == self.me:
                self.store_received(n)
            else:
                self._store_sent(n, now)
            result[to] = n.id
        return self._ok(f"data: {dumps(result)}")

    # --- monitor ------------------------------------------------------------------------

    async def _v_monitor(self, cmd: Command) -> Reply:
        p = cmd.params
        rx_text = p.get("regex") or ".*"
        try:
            rx = re.compile(rx_text)
        except re.error as exc:
            raise illegal_argument(f"invalid regex {rx_text!r}: {exc}") from exc
        self._monitor_regex = rx
        self._monitor_self = bool(p.get("selfNotifications"))
        self.monitoring = True
        epoch = _int_or_none(p.get("epochMillis"))
        # replay then register without yielding to the loop: no gap, no duplicate
        if epoch is not None:
            kinds = ("received", "self") if self._monitor_self else ("received",)
            for row in self.host.store.notifications(self.me, kinds, after_epoch=epoch,
                                                     now=self._now()):
                self._emit_notification(row, N.from_storage(row.data), replay=True)
        self.host.monitors.add(self)
        return Reply(None)

    def _matches(self, row: NotificationRow) -> bool:
        rx = self._monitor_regex
        if rx is None:
            return True
        return _safe_search(rx, row.key) or _safe_search(rx, row.from_atsign.lstrip("@"))

    def _emit_notification(self, row: NotificationRow, n: Any, *, replay: bool) -> None:
        if self._matches(row):
            self.emit(N.monitor_line(n, replay=replay).rstrip("\n") + "\n")

    def deliver_notification(self, row: NotificationRow, n: Any) -> None:
        """Called by the host for every newly stored received/self notification."""
        if not self.monitoring or self.closed:
            return
        if row.kind == "self" and not self._monitor_self:
            return
        self._emit_notification(row, n, replay=False)

    def deliver_stats(self, last_commit_id: int, now: int) -> None:
        if self.monitoring and not self.closed:
            self.emit(N.stats_line(self.me, last_commit_id, now).rstrip("\n") + "\n")

    def close(self) -> None:
        """Connection gone: stop receiving monitor lines."""
        self.closed = True
        self.host.monitors.discard(self)

    # --- utility verbs ------------------------------------------------------------------

    async def _v_noop(self, cmd: Command) -> Reply:
        ms = int(cmd.params["delayMillis"])
        if ms > self.host.config.noop_max_ms:
            raise illegal_argument(f"noop:{ms} where the duration maximum is "
                                   f"{self.host.config.noop_max_ms} milliseconds")
        if ms > 0:
            sleep = self.host.sleep or asyncio.sleep
            await sleep(ms / 1000)
        return self._data("ok")

    async def _v_info(self, cmd: Command) -> Reply:
        up = max(0, self._now() - self.host.started_ms)
        if cmd.params.get("brief"):
            return self._data(dumps({"version": self.host.config.version,
                                     "uptimeAsMillis": up}))
        s = up // 1000
        words = f"{s // 3600} hours {(s % 3600) // 60} minutes {s % 60} seconds"
        return self._data(dumps({"version": self.host.config.version, "uptimeAsWords": words}))

    async def _v_stats(self, cmd: Command) -> Reply:
        raw = cmd.params.get("statId", "").lstrip(":")
        ids = [i for i in raw.split(",") if i] if raw else ["1", "2", "3", "7", "11"]
        names = {"1": "activeInboundConnections", "2": "activeOutboundConnections",
                 "3": "lastCommitID", "7": "secondaryServerVersion", "11": "NotificationCount"}
        out = []
        for i in ids:
            if i not in names:
                continue
            if i == "3":
                value: Any = self.host.store.last_commit_id(self.me)
            elif i == "7":
                value = self.host.config.version
            elif i == "11":
                value = self.host.store.count_notifications(self.me)
            elif i == "1":
                value = len(self.host.monitors)
            else:
                value = 0
            out.append({"id": i, "name": names[i], "value": str(value)})
        return self._ok("data: " + dumps(out))

    async def _v_sync(self, cmd: Command) -> Reply:
        p = cmd.params
        start = int(p["from_commit_seq"])
        limit = max(1, min(int(p.get("limit") or 25), 100))
        rx_text = p.get("regex")
        try:
            rx = re.compile(rx_text) if rx_text else None
        except re.error as exc:
            raise illegal_argument(f"invalid regex {rx_text!r}: {exc}") from exc
        latest: dict[str, tuple[int, str]] = {}
        for cid, key, op in self.host.store.commit_entries(self.me):
            if cid > start:
                latest[key] = (cid, op)
        out = []
        for key, (cid, op) in sorted(latest.items(), key=lambda kv: kv[1][0]):
            if rx is not None and not _safe_search(rx, key):
                continue
            rec = self.host.get(key)
            entry: dict[str, Any] = {"atKey": key, "commitId": cid, "operation": op}
            if rec is not None and op != "-":
                entry["value"] = rec.value
                entry["metadata"] = {k: str(v) for k, v in
                                     remove_nulls(M.to_json(self._meta(rec))).items()}
            out.append(entry)
            if len(out) >= limit:
                break
        return self._data(dumps(out))

    async def _v_batch(self, cmd: Command) -> Reply:
        try:
            items = json.loads(cmd.params["json"])
            if not isinstance(items, list):
                raise ValueError
        except ValueError as exc:
            raise invalid_syntax("batch: expected a JSON list") from exc
        results = []
        for it in items:
            if not isinstance(it, dict) or not isinstance(it.get("command"), str):
                continue
            sub = it["command"]
            if convert_verb(sub) in ("batch", "monitor"):
                results.append({"id": it.get("id"), "response": {
                    "error_code": "AT0003", "error_message": "not allowed in batch"}})
                continue
            r = await self.handle(sub)
            body = (r.text or "").split("\n", 1)[0]
            if body.startswith("data:"):
                results.append({"id": it.get("id"), "response": {"data": body[5:]}})
            else:
                results.append({"id": it.get("id"), "response": {
                    "error_code": body[6:12], "error_message": body[13:]}})
        return self._data(dumps(results))


def convert_verb(line: str) -> str:
    return line.strip().split(":", 1)[0].lower()


# --- small helpers -----------------------------------------------------------------------------

def _ms(v: Any) -> int | None:
    """Epoch ms from an int / None (metadata dates are epoch ms in our Metadata)."""
    if v is None:
        return None
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def _int_or_none(v: Any) -> int | None:
    if v is None or v == "" or v == "null":
        return None
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


_META_PARAM_NAMES = ("ttl", "ttb", "ttr", "ccd", "dataSignature", "sharedKeyStatus", "isBinary",
                     "isEncrypted", "sharedKeyEnc", "pubKeyCS", "encoding", "encKeyName",
                     "encAlgo", "ivNonce", "skeEncKeyName", "skeEncAlgo")


def _dart_meta_params(d: dict[str, Any]) -> dict[str, str]:
    """Dart metadata JSON (as returned by lookup:all) → update-verb style string params."""
    p: dict[str, str] = {}
    for name in _META_PARAM_NAMES:
        v = d.get(name)
        if v is None:
            continue
        p[name] = str(v).lower() if isinstance(v, bool) else str(v)
    return p


def _notif_meta(meta: Any, p: dict[str, str] | None = None) -> dict[str, Any]:
    """The metadata a notification carries (and forwards, reference §6.6)."""
    if meta is None:
        return {}
    j = remove_nulls(M.to_json(meta))
    keep = ("ttl", "ttb", "ttr", "ccd", "isEncrypted", "sharedKeyEnc", "pubKeyCS", "encKeyName",
            "encAlgo", "ivNonce", "skeEncKeyName", "skeEncAlgo", "dataSignature", "isBinary",
            "encoding", "sharedKeyStatus")
    return {k: j[k] for k in keep if k in j}


def _safe_search(rx: re.Pattern[str], text: str) -> bool:
    try:
        return rx.search(text) is not None
    except (RecursionError, re.error):
        return False


def _date_ms(text: str | None, end: bool = False) -> int | None:
    if not text:
        return None
    import datetime as dt

    try:
        y, m, d = (int(x) for x in text.split("-"))
        day = dt.datetime(y, m, d, tzinfo=dt.timezone.utc)
    except (ValueError, TypeError):
        return None
    ms = int(day.timestamp() * 1000)
    return ms + 86_400_000 - 1 if end else ms
