"""Keystore verbs: update, update:meta, update:json, llookup, lookup, plookup, delete, scan.

Why together: they share how a key is rebuilt from the request parameters
(`[cached:][public:][@for:]<atKey>[@atSign]`), who may see which key, and how a record is
rendered (value, meta or all; docs/reference/atprotocol.md#crud-verbs, docs/reference/atprotocol.md#verbs, docs/reference/atprotocol.md#remote-lookup-and-caching).
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from noports.atprotocol import keys as K
from noports.atprotocol import metadata as M
from noports.atprotocol import notifications as N
from noports.atprotocol.errors import (
    AtError,
    invalid_key,
    invalid_syntax,
    key_not_found,
    unauthenticated,
    unauthorized,
)
from noports.atprotocol.grammar import Command

from . import clientregex
from .context import Conn, Reply, dumps, int_or_none, ms_or_none, remove_nulls
from .store import KeyRecord
from .verbs_notify import notif_meta, store_sent


def build_key(s: Conn, p: dict[str, str], *, with_cached: bool = False) -> str:
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


def check_owner(s: Conn, p: dict[str, str]) -> None:
    if p.get("atSign") and K.fix_atsign(p["atSign"]) != s.me:
        raise invalid_key(f"Invalid key: atSign {K.fix_atsign(p['atSign'])} is not "
                          f"the current atSign {s.me}")


def render(s: Conn, key: str, rec: KeyRecord, operation: str | None) -> Reply:
    if not s.active(rec):
        return s.data(None)
    meta = s.meta(rec)
    if operation == "meta":
        return s.data(dumps(remove_nulls(M.to_json(meta))))
    if operation == "all":
        return s.data(dumps(remove_nulls(
            {"key": key, "data": rec.value, "metaData": M.to_json(meta)})))
    return s.data(rec.value)


# --- update -----------------------------------------------------------------------------------

async def v_update(s: Conn, cmd: Command) -> Reply:
    p = cmd.params
    check_owner(s, p)
    key = build_key(s, p)
    return await _do_update(s, key, p, p.get("value"), p.get("forAtSign"))


async def v_update_meta(s: Conn, cmd: Command) -> Reply:
    p = cmd.params
    check_owner(s, p)
    key = build_key(s, p)
    rec = s.host.get(key)
    return await _do_update(s, key, p, rec.value if rec else None, p.get("forAtSign"), op="#")


async def v_update_json(s: Conn, cmd: Command) -> Reply:
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
    shared_by = obj.get("sharedBy") or s.me
    p["atKey"] = obj["atKey"]
    p["atSign"] = str(shared_by)
    if shared_with:
        p["forAtSign"] = str(shared_with)
    if meta_in.get("isPublic") if isinstance(meta_in, dict) else False:
        p["publicScope"] = "public"
    check_owner(s, p)
    key = build_key(s, p)
    value = obj.get("value")
    return await _do_update(s, key, p, None if value is None else str(value), p.get("forAtSign"))


async def _do_update(s: Conn, key: str, p: dict[str, str], value: str | None,
                     for_atsign: str | None, *, op: str = "+") -> Reply:
    K.validate_update_key(key, s.me)
    try:
        update = M.params_to_update(p)
    except ValueError as exc:
        raise invalid_syntax(f"Invalid syntax. {exc}") from exc
    rec = s.host.get(key)
    existing = s.meta(rec) if rec else None
    now = s.now()
    meta = M.apply_update(existing, update, now_ms=now, atsign=s.me)
    cid = s.put(key, value, meta, op=op)
    s.host.stats_changed()
    to = K.fix_atsign(for_atsign) if for_atsign else None
    if s.host.config.autonotify and to and to != s.me:
        _autonotify(s, key, to, "update", value, meta)
    return s.data(cid)


def _autonotify(s: Conn, key: str, to: str, op: str, value: str | None, meta: Any) -> None:
    """Push the change to the sharedWith atSign's cache (docs/reference/atprotocol.md#crud-verbs autoNotify)."""
    now = s.now()
    expiry = s.host.config.notification_expiry_ms
    n = N.Notification(
        id=str(uuid.uuid4()), from_atsign=s.me, to_atsign=to, key=key,
        value=value if op == "update" else None, operation=op, message_type="key",
        epoch_millis=now, expires_at=now + expiry,
        is_encrypted=bool(getattr(meta, "is_encrypted", False)) if meta else False,
        metadata=notif_meta(meta) if meta is not None else {}, ttl_ms=expiry,
    )
    store_sent(s, n, now)


# --- lookups ----------------------------------------------------------------------------------

async def v_llookup(s: Conn, cmd: Command) -> Reply:
    p = cmd.params
    key = build_key(s, p, with_cached=True)
    rec = s.host.get(key)
    if rec is None:
        raise key_not_found(key)
    return render(s, key, rec, p.get("operation"))


async def v_lookup(s: Conn, cmd: Command) -> Reply:
    p = cmd.params
    owner = K.fix_atsign(p["atSign"])
    at_key = p["atKey"]
    op = p.get("operation")
    if owner == s.me:
        if s.authenticated:
            key = K.normalize_key(f"{s.me}:{at_key}{s.me}")
        elif s.pol_atsign:
            key = K.normalize_key(f"{s.pol_atsign}:{at_key}{s.me}")
        else:
            key = K.normalize_key(f"public:{at_key}{s.me}")
        rec = s.host.get(key)
        if rec is None:
            raise key_not_found(key)
        return render(s, key, rec, op)
    if not s.authenticated:
        raise unauthenticated(f"lookup of {owner}'s keys needs an authenticated connection")
    cache_key = K.normalize_key(f"cached:{s.me}:{at_key}{owner}")
    return await _remote_lookup(s, owner, at_key, cache_key, op,
                                bypass=p.get("bypassCache", "").lower() == "true",
                                handshake=True)


async def v_plookup(s: Conn, cmd: Command) -> Reply:
    p = cmd.params
    owner = K.fix_atsign(p["atSign"])
    at_key = p["atKey"]
    op = p.get("operation")
    if owner == s.me:
        key = K.normalize_key(f"public:{at_key}{s.me}")
        rec = s.host.get(key)
        if rec is None:
            raise key_not_found(key)
        return render(s, key, rec, op)
    cache_key = K.normalize_key(f"cached:public:{at_key}{owner}")
    return await _remote_lookup(s, owner, at_key, cache_key, op,
                                bypass=p.get("bypassCache", "").lower() == "true",
                                handshake=False)


async def _remote_lookup(s: Conn, owner: str, at_key: str, cache_key: str, op: str | None, *,
                         bypass: bool, handshake: bool) -> Reply:
    """Cached remote lookup (docs/reference/atprotocol.md#remote-lookup-and-caching)."""
    now = s.now()
    if not bypass:
        rec = s.host.get(cache_key)
        if rec is not None and s.active(rec):
            meta = s.meta(rec)
            ttr = getattr(meta, "ttr", None)
            refresh = ms_or_none(getattr(meta, "refresh_at", None))
            if ttr == -1 or refresh is None or now <= refresh:
                return render(s, cache_key, rec, op)
    remote = s.host.remote
    if remote is None:
        raise AtError("AT0021", "no outbound connectivity configured")
    r = await remote.request(s.me, owner, f"lookup:all:{at_key}{owner}", handshake=handshake)
    if not r.ok:
        if r.code == "AT0015":
            s.host.store.delete(s.me, cache_key, commit=False)
            raise key_not_found(f"{at_key}{owner}")
        raise AtError(r.code or "AT0011", r.message)
    if r.data is None or r.data == "null":
        s.host.store.delete(s.me, cache_key, commit=False)
        raise key_not_found(f"{at_key}{owner}")
    try:
        obj = json.loads(r.data)
        if not isinstance(obj, dict):
            raise ValueError("not an object")
    except ValueError as exc:
        raise AtError("AT0014", f"unexpected lookup reply from {owner}") from exc
    remote_meta = obj.get("metaData") if isinstance(obj.get("metaData"), dict) else {}
    value = obj.get("data")
    ttr = int_or_none(remote_meta.get("ttr"))
    if handshake:
        if ttr not in (None, 0):
            _cache_put(s, cache_key, value, remote_meta, owner)
    else:
        _cache_put(s, cache_key, value, remote_meta, owner,
                   default_ttr_ms=s.host.config.plookup_refresh_ms)
    if op == "meta":
        return s.data(dumps(remove_nulls(remote_meta)))
    if op == "all":
        return s.data(dumps(remove_nulls(obj)))
    return s.data(value)


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


def _cache_put(s: Conn, cache_key: str, value: Any, dart_meta: dict[str, Any], owner: str, *,
               default_ttr_ms: int | None = None) -> None:
    if len(cache_key) > 255:
        return
    p = _dart_meta_params(dart_meta)
    if default_ttr_ms is not None and int_or_none(dart_meta.get("ttr")) in (None, 0):
        p["ttr"] = str(default_ttr_ms)
    try:
        update = M.params_to_update(p)
        meta = M.apply_update(None, update, now_ms=s.now(), atsign=owner)
    except (ValueError, AtError):
        return
    s.put(cache_key, None if value is None else str(value), meta)


# --- delete, scan -----------------------------------------------------------------------------

async def v_delete(s: Conn, cmd: Command) -> Reply:
    p = cmd.params
    at_key = p["atKey"]
    if at_key.lower() == "privatekey:at_secret":
        s.host.store.delete(s.me, "privatekey:at_secret", commit=False)
        s.host.store.put(s.me, "privatekey:at_secret_deleted", "true", {}, commit=False)
        s.host.store.scrub()
        return s.data(-1)
    check_owner(s, p)
    key = build_key(s, p, with_cached=True)
    me = s.me
    bare = key[len("public:"):] if key.startswith("public:") else key
    protected = {f"signing_publickey{me}", f"signing_privatekey{me}",
                 f"{me}:signing_privatekey{me}", f"publickey{me}", "at_pkam_publickey",
                 "privatekey:at_pkam_publickey"}
    if bare in protected:
        raise unauthorized("Cannot delete protected key")
    if K.key_type(key, s.me) == K.KeyType.INVALID:
        raise invalid_key(f"Invalid key: {key}")
    rec = s.host.get(key)
    cid = s.host.store.delete(s.me, key, commit=K.is_committed(key), ts=s.now())
    s.host.stats_changed()
    to = K.fix_atsign(p["forAtSign"]) if p.get("forAtSign") else None
    if s.host.config.autonotify and to and to != s.me and not key.startswith("cached:"):
        _autonotify(s, key, to, "delete", None, s.meta(rec) if rec else None)
    return s.data(cid)


async def v_scan(s: Conn, cmd: Command) -> Reply:
    p = cmd.params
    rx_text = p.get("regex")
    rx = clientregex.compile_client(rx_text) if rx_text else None
    if p.get("forAtSign"):
        other = K.fix_atsign(p["forAtSign"])
        if other != s.me:
            if not s.authenticated:
                raise unauthenticated("scan of another atSign needs authentication")
            remote = s.host.remote
            if remote is None:
                raise AtError("AT0021", "no outbound connectivity configured")
            verb = f"scan {rx_text}" if rx_text else "scan"
            r = await remote.request(s.me, other, verb, handshake=True)
            if not r.ok:
                raise AtError(r.code or "AT0011", r.message)
            return s.data(r.data)
    show_hidden = p.get("showhidden", "").lower() == "true"
    out: list[str] = []
    now = s.now()
    for rec in s.host.store.all_keys(s.me):
        k = rec.key
        if not M.is_active(s.meta(rec), now):
            continue
        if s.authenticated:
            if not K.scan_visible(k, show_hidden=show_hidden):
                continue
            shown = k
        elif s.pol_atsign:
            prefix = f"{s.pol_atsign}:"
            if not k.startswith(prefix):
                continue
            shown = k[len(prefix):]
        else:
            if not k.startswith("public:") or k.startswith("public:_"):
                continue
            shown = k[len("public:"):]
        if rx is not None and not clientregex.search(rx, shown):
            continue
        out.append(shown)
    return s.data(dumps(out))
