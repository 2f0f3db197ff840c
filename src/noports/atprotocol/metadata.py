"""Key metadata: update semantics, expiry and the Dart JSON form (docs/reference/atprotocol.md#crud-verbs, docs/reference/atprotocol.md#metadata).

Ports ``AbstractUpdateVerbHandler`` (merge, "null" resets), ``validateCacheMetadata``
(ccd only with a ttr) and ``AtMetadataBuilder`` (dates, version) so records written by this
server look exactly like the Dart server's to ``llookup:meta``/``lookup:all``/``sync``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from .errors import invalid_syntax

# Dart DateTime range limit (±8.64e15 ms); larger values make Dart throw.
_MAX_MS = 8_640_000_000_000_000
# AtMetadataBuilder._getRefreshAt adds `Duration(seconds: ttr)` (code beats spec).
TTR_UNIT_MS = 1000


@dataclass
class Metadata:
    """AtMetaData with snake_case names; dates are epoch milliseconds (UTC) or None."""

    created_by: str | None = None
    updated_by: str | None = None
    created_at: int | None = None
    updated_at: int | None = None
    available_at: int | None = None
    expires_at: int | None = None
    refresh_at: int | None = None
    status: str | None = None
    version: int | None = None
    ttl: int | None = None
    ttb: int | None = None
    ttr: int | None = None
    ccd: bool | None = None
    is_binary: bool | None = None
    is_encrypted: bool | None = None
    data_signature: str | None = None
    shared_key_status: str | None = None
    shared_key_enc: str | None = None
    pub_key_cs: str | None = None
    encoding: str | None = None
    enc_key_name: str | None = None
    enc_algo: str | None = None
    iv_nonce: str | None = None
    ske_enc_key_name: str | None = None
    ske_enc_algo: str | None = None


# Dart JSON name -> attribute, in AtMetaData.toJson order.
JSON_FIELDS: dict[str, str] = {
    "createdBy": "created_by",
    "updatedBy": "updated_by",
    "createdAt": "created_at",
    "updatedAt": "updated_at",
    "availableAt": "available_at",
    "expiresAt": "expires_at",
    "refreshAt": "refresh_at",
    "status": "status",
    "version": "version",
    "ttl": "ttl",
    "ttb": "ttb",
    "ttr": "ttr",
    "ccd": "ccd",
    "isBinary": "is_binary",
    "isEncrypted": "is_encrypted",
    "dataSignature": "data_signature",
    "sharedKeyEnc": "shared_key_enc",
    "pubKeyCS": "pub_key_cs",
    "encoding": "encoding",
    "encKeyName": "enc_key_name",
    "encAlgo": "enc_algo",
    "ivNonce": "iv_nonce",
    "skeEncKeyName": "ske_enc_key_name",
    "skeEncAlgo": "ske_enc_algo",
    "sharedKeyStatus": "shared_key_status",
}
_DATE_FIELDS = frozenset({"created_at", "updated_at", "available_at", "expires_at", "refresh_at"})

#: The update verb's metadata parameters in VerbSyntax order: (wire name, Metadata attribute,
#: kind). The one list: the server's grammar (``grammar.META``), its update handling below and
#: the client's command builder (``atclient.e2e.metadata_fragment``) are all derived from it.
UPDATE_PARAMS: tuple[tuple[str, str, str], ...] = (
    ("ttl", "ttl", "int"),
    ("ttb", "ttb", "int"),
    ("ttr", "ttr", "int"),
    ("ccd", "ccd", "bool"),
    ("dataSignature", "data_signature", "str"),
    ("sharedKeyStatus", "shared_key_status", "str"),
    ("isBinary", "is_binary", "bool"),
    ("isEncrypted", "is_encrypted", "bool"),
    ("sharedKeyEnc", "shared_key_enc", "str"),
    ("pubKeyCS", "pub_key_cs", "str"),
    ("encoding", "encoding", "str"),
    ("encKeyName", "enc_key_name", "str"),
    ("encAlgo", "enc_algo", "str"),
    ("ivNonce", "iv_nonce", "str"),
    ("skeEncKeyName", "ske_enc_key_name", "str"),
    ("skeEncAlgo", "ske_enc_algo", "str"),
)
_INT_PARAMS = {w: a for w, a, kind in UPDATE_PARAMS if kind == "int"}
_BOOL_PARAMS = {w: a for w, a, kind in UPDATE_PARAMS if kind == "bool"}
_STR_PARAMS = {w: a for w, a, kind in UPDATE_PARAMS if kind == "str"}


def update_fragment(values: dict[str, object]) -> str:
    """``:ttl:1:isEncrypted:true:...`` for the given wire-named values, in VerbSyntax order.

    None values are left out; booleans are written ``true``/``false``, ints in decimal.
    """
    out = []
    for wire_name, _attr, kind in UPDATE_PARAMS:
        value = values.get(wire_name)
        if value is None:
            continue
        if kind == "bool":
            text = "true" if value else "false"
        elif kind == "int":
            text = str(int(value))  # type: ignore[call-overload]
        else:
            text = str(value)
        out.append(f":{wire_name}:{text}")
    return "".join(out)


def _parse_int(name: str, text: str) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise invalid_syntax(f"Invalid value for {name.upper()}: {text}") from None
    if abs(value) > _MAX_MS:
        raise invalid_syntax(f"Invalid value for {name.upper()}: {text}")
    return value


def params_to_update(params: dict[str, str]) -> dict[str, object]:
    """Typed metadata fields present in parsed update/update:meta/notify params.

    Keys are :class:`Metadata` attribute names; a value of ``None`` means "reset" (the
    literal ``null`` in the command); absent fields are to be kept.
    """
    out: dict[str, object] = {}
    for pname, attr in _INT_PARAMS.items():
        text = params.get(pname)
        if text is None:
            continue
        if text.strip().lower() == "null":
            out[attr] = None
            continue
        value = _parse_int(pname, text)
        if pname in ("ttl", "ttb") and value < 0:
            raise invalid_syntax(
                f"Valid value for {pname.upper()} should be greater than or equal to 0"
            )
        if pname == "ttr" and value <= -2:
            raise invalid_syntax("Valid values for TTR are -1 and greater than or equal to 1")
        out[attr] = value
    for pname, attr in _BOOL_PARAMS.items():
        text = params.get(pname)
        if text is None:
            continue
        low = text.strip().lower()
        out[attr] = None if low == "null" else low == "true"
    for pname, attr in _STR_PARAMS.items():
        text = params.get(pname)
        if text is None:
            continue
        out[attr] = None if text == "null" else text
    return out


def apply_update(existing: Metadata | None, update: dict, *, now_ms: int, atsign: str) -> Metadata:
    """Merge ``update`` (from :func:`params_to_update`) over ``existing`` and stamp it."""
    base = Metadata() if existing is None else Metadata(**asdict(existing))
    names = {f.name for f in fields(Metadata)}
    for attr, value in update.items():
        if attr in names and attr not in _DATE_FIELDS:
            setattr(base, attr, value)
    if base.ttr == 0:
        base.ttr = None  # ttr 0 means "not cached/refreshed"
    # validateCacheMetadata: ccd only makes sense with a ttr; default false then.
    if base.ttr is None:
        base.ccd = None
    elif base.ccd is None:
        base.ccd = False

    base.created_at = existing.created_at if existing and existing.created_at else now_ms
    base.created_by = existing.created_by if existing and existing.created_by else atsign
    base.updated_at = now_ms
    base.updated_by = atsign
    base.status = "active"
    base.version = 0 if existing is None or existing.version is None else existing.version + 1

    ttl, ttb, ttr = base.ttl, base.ttb, base.ttr
    if ttl is None or ttl < 0:
        base.expires_at = None
    else:
        base.expires_at = None if ttl == 0 else now_ms + ttl + (ttb or 0)
    base.available_at = now_ms + ttb if ttb is not None and ttb >= 0 else None
    if ttr is not None and ttr > 0:
        base.refresh_at = now_ms + ttr * TTR_UNIT_MS
    else:
        base.refresh_at = None  # -1: cache forever
    return base


def is_active(meta: Metadata | None, now_ms: int) -> bool:
    """Born (availableAt <= now) and not expired (expiresAt >= now); no metadata = active."""
    if meta is None:
        return True
    if meta.available_at is not None and meta.available_at > now_ms:
        return False
    return not (meta.expires_at is not None and meta.expires_at < now_ms)


def _civil_from_days(z: int) -> tuple[int, int, int]:
    # Howard Hinnant's algorithm; exact for any int, unlike datetime (years 1..9999).
    z += 719468
    era = z // 146097  # floor division (the C++ original emulates it for negatives)
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    y = yoe + era * 400
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    d = doy - (153 * mp + 2) // 5 + 1
    m = mp + 3 if mp < 10 else mp - 9
    return (y + 1 if m <= 2 else y), m, d


def dart_date(ms: int) -> str:
    """Dart ``DateTime.fromMillisecondsSinceEpoch(ms).toUtc().toString()``."""
    days, rem = divmod(int(ms), 86_400_000)
    y, mo, d = _civil_from_days(days)
    hh, rem = divmod(rem, 3_600_000)
    mm, rem = divmod(rem, 60_000)
    ss, milli = divmod(rem, 1000)
    ay = abs(y)
    year = str(ay) if ay >= 1000 else f"{ay:04d}"
    if y < 0:
        year = "-" + year
    return f"{year}-{mo:02d}-{d:02d} {hh:02d}:{mm:02d}:{ss:02d}.{milli:03d}Z"


def to_json(meta: Metadata) -> dict:
    """Dart ``AtMetaData.toJson`` with nulls removed (as in llookup/lookup replies)."""
    out: dict[str, object] = {}
    for jname, attr in JSON_FIELDS.items():
        value = getattr(meta, attr)
        if value is None:
            continue
        out[jname] = dart_date(value) if attr in _DATE_FIELDS else value
    return out


def to_storage(meta: Metadata) -> dict:
    """Lossless plain dict (attribute names, raw ints) for a JSON storage column."""
    return {k: v for k, v in asdict(meta).items() if v is not None}


def from_storage(d: dict) -> Metadata:
    """Inverse of :func:`to_storage`; unknown keys are ignored (forward compatibility)."""
    names = {f.name for f in fields(Metadata)}
    return Metadata(**{k: v for k, v in d.items() if k in names})
