"""atKey rules: key types, normalisation, commit-log and scan visibility (docs/reference/atprotocol.md#keys).

The key-type regexes are a port of at_commons ``Regexes``/``RegexUtil.keyType`` with
``enforceNamespace: false`` (what the server uses), so that the server accepts and rejects
exactly the keys the Dart server does.
"""

from __future__ import annotations

import enum

import regex

from ._dartre import compile_dart
from .atsign import InvalidAtSign, normalize_atsign
from .errors import AtError, invalid_key

MAX_KEY_LENGTH = 248
MAX_CACHED_KEY_LENGTH = 255


class KeyType(enum.Enum):
    """at_commons ``KeyType``; ``dart_name`` is what error messages print."""

    PUBLIC = "publicKey"
    PRIVATE = "privateKey"
    SELF = "selfKey"
    SHARED = "sharedKey"
    CACHED_PUBLIC = "cachedPublicKey"
    CACHED_SHARED = "cachedSharedKey"
    LOCAL = "localKey"
    RESERVED = "reservedKey"
    INVALID = "invalidKey"

    @property
    def dart_name(self) -> str:
        return f"KeyType.{self.value}"


# --- at_commons Regexes (at_key_regex_utils.dart) ----------------------------------------
_CHARS_IN_ATSIGN = r"[\w\-_]"
_CHARS_IN_ENTITY = r"""[\w\.\-_'*"]"""
# Dart matches UTF-16 surrogate pairs \ud83c-\ud83e + [\ud000-\udfff] == U+1F000..U+1FBFF.
_EMOJI = r"((\u00a9|\u00ae|[\u2000-\u3300]|[\ufe00-\ufe0f]|[\U0001F000-\U0001FBFF]))"
_OWNER_NO_AT = f"(({_CHARS_IN_ATSIGN}|{_EMOJI}){{1,55}})"
_OWNER = f"@(?<owner>{_OWNER_NO_AT})"
_OWNER_NO_GROUP = f"@({_CHARS_IN_ATSIGN}|{_EMOJI}){{1,55}}"
_SHARED_WITH = f"((?<sharedWith>({_CHARS_IN_ATSIGN}|{_EMOJI}){{1,55}}):)"
_ENTITY = f"(?<entity>({_CHARS_IN_ENTITY}|{_EMOJI})+)"

_RESERVED_NO_SUFFIX = (
    r"(((?<=privatekey:)(at_pkam_publickey|at_pkam_privatekey|privatekey|self_encryption_key"
    r"|at_secret|at_secret_deleted|signing_keypair_generated|commitLogCompactionStats"
    r"|accessLogCompactionStats|notificationCompactionStats)$)|^(configkey)$"
    f"|(?:^_({_CHARS_IN_ENTITY})+)$)"
)
# NOTE: Dart writes 'shared_key\\\\.' in a non-raw string, i.e. the regex `shared_key\\.`
# (a literal backslash then any char), so `shared_key.bob@alice` is *not* matched here; it is
# a self key. Ported as-is.
_RESERVED_WITH_SUFFIX = (
    "(("
    "(?<=private:)blocklist"
    "|(?<=public:)signing_publickey"
    f"|(?<={_OWNER_NO_GROUP}:)signing_privatekey"
    f"|(?<=^@({_SHARED_WITH}))shared_key"
    "|(?<=public:)publickey"
    f"|(shared_key\\\\.{_OWNER_NO_AT})"
    f")(?={_OWNER}))"
)
_RESERVED = f"(?<atKey>({_RESERVED_NO_SUFFIX}|{_RESERVED_WITH_SUFFIX}))"
_PUBLIC = f"(?<visibility>(public:){{1}}){_ENTITY}{_OWNER}"
_PRIVATE = f"(?<visibility>(private:){{1}})(@{_SHARED_WITH})?{_ENTITY}{_OWNER}"
_SELF = f"(@{_SHARED_WITH})?(_*{_ENTITY}){_OWNER}"
_CACHED_SHARED = f"(cached:)(@{_SHARED_WITH})(_*{_ENTITY}){_OWNER}"
_CACHED_PUBLIC = f"(?<visibility>(cached:public:){{1}}){_ENTITY}{_OWNER}"
_LOCAL = f"(?<visibility>(local:){{1}}){_ENTITY}{_OWNER}"

_RE_RESERVED = compile_dart(_RESERVED)
_RE_PUBLIC = compile_dart(_PUBLIC)
_RE_PRIVATE = compile_dart(_PRIVATE)
_RE_SELF = compile_dart(_SELF)
_RE_CACHED_PUBLIC = compile_dart(_CACHED_PUBLIC)
_RE_CACHED_SHARED = compile_dart(_CACHED_SHARED)
_RE_LOCAL = compile_dart(_LOCAL)

_TIMEOUT_S = 2.0
_HAS_OWNER = regex.compile(r"@[^@:]+\Z")


def _first_match_is_whole(pattern: regex.Pattern, key: str) -> regex.Match | None:
    """Dart ``RegexUtil.matchAll``: the *first* match must span the entire input."""
    try:
        m = pattern.search(key, timeout=_TIMEOUT_S)
    except TimeoutError:
        return None
    if m is not None and m.start() == 0 and m.end() == len(key):
        return m
    return None


def _is_reserved(key: str) -> bool:
    try:
        return _RE_RESERVED.search(key, timeout=_TIMEOUT_S) is not None
    except TimeoutError:
        return False


def key_type(key: str, owner: str | None = None) -> KeyType:
    """Classify ``key`` like ``AtKey.getKeyType(key, enforceNameSpace: false)``.

    ``owner`` (an atSign) is appended before typing when the key carries no ``@owner``
    suffix, mirroring how handlers default ``sharedBy`` to the current atSign; reserved keys
    such as ``privatekey:at_secret`` are checked on the key as given.
    """
    if _is_reserved(key):
        return KeyType.RESERVED
    if owner and _HAS_OWNER.search(key) is None:
        key = key + fix_atsign(owner)
        if _is_reserved(key):
            return KeyType.RESERVED
    if _first_match_is_whole(_RE_PUBLIC, key):
        return KeyType.PUBLIC
    if _first_match_is_whole(_RE_PRIVATE, key):
        return KeyType.PRIVATE
    if _first_match_is_whole(_RE_SELF, key):
        groups: dict[str, str] = {}
        for m in _RE_SELF.finditer(key, timeout=_TIMEOUT_S):
            for name, value in m.groupdict().items():
                groups.setdefault(name, value or "")
        shared_with = groups.get("sharedWith", "")
        key_owner = groups.get("owner", "")
        if key_owner and shared_with and key_owner != shared_with:
            return KeyType.SHARED
        return KeyType.SELF
    if _first_match_is_whole(_RE_CACHED_PUBLIC, key):
        return KeyType.CACHED_PUBLIC
    if _first_match_is_whole(_RE_CACHED_SHARED, key):
        return KeyType.CACHED_SHARED
    if _first_match_is_whole(_RE_LOCAL, key):
        return KeyType.LOCAL
    return KeyType.INVALID


def normalize_key(key: str) -> str:
    """Storage form of a key (``HiveKeyStoreHelper.prepareKey`` + lower-casing)."""
    return key.strip().replace(" ", "").lower()


def fix_atsign(s: str) -> str:
    """``AtUtils.fixAtSign`` as the server applies it: the one rule of :mod:`.atsign`.

    Raises AtError AT0011 (InvalidAtSignException is unmapped; the server closes).
    """
    try:
        return normalize_atsign(s)
    except InvalidAtSign as exc:
        raise AtError("AT0011", f"invalid @sign: {exc.reason}", close=True) from None


def format_atsign(s: str | None) -> str | None:
    """Port of ``AtUtils.formatAtSign``: only prefixes ``@`` (no validation, no lower-casing).

    Handlers use this (not :func:`fix_atsign`) when assembling keys from regex groups.
    """
    if not s:
        return None
    return s if s.startswith("@") else "@" + s


def is_committed(key: str) -> bool:
    """Whether a write to ``key`` goes to the commit log (else the reply is ``data:-1``)."""
    k = key.lower()
    if k.startswith(("private:", "privatekey:", "local:")):
        return False
    return not (k.startswith("public:_") and not k.startswith("public:__"))


def _strip_prefixes(key: str) -> str:
    """Entity part with visibility/cached/sharedWith prefixes removed (owner kept)."""
    k = key
    for prefix in ("cached:", "public:", "private:", "local:"):
        if k.lower().startswith(prefix):
            k = k[len(prefix) :]
    if k.startswith("@") and ":" in k:
        k = k.split(":", 1)[1]
    return k


def is_hidden(key: str) -> bool:
    """Hidden keys have an entity starting with ``_`` (``_x@a``, ``public:_x@a``, ``@b:_x@a``)."""
    return _strip_prefixes(key).startswith("_")


def scan_visible(key: str, *, show_hidden: bool) -> bool:
    """Port of ``ScanVerbHandler._isPrivateKeyForAtSign`` (negated) for the owner's scan."""
    k = key.lower()
    if show_hidden and (k.startswith("public:__") or k.startswith("_")):
        return True
    return not k.startswith(("private:", "privatekey:", "public:_", "_"))


def namespace(key: str) -> str | None:
    """Namespace = last ``.segment`` of the entity (``phone.wavi@alice`` → ``wavi``)."""
    entity = _strip_prefixes(key)
    at = entity.rfind("@")
    if at > 0:
        entity = entity[:at]
    if ":" in entity:
        entity = entity.rsplit(":", 1)[1]
    if "." not in entity:
        return None
    ns = entity.rsplit(".", 1)[1]
    return ns or None


def key_owner(key: str) -> str | None:
    """The ``@owner`` suffix of a key (with ``@``), or None if the key has none."""
    m = _HAS_OWNER.search(key)
    if m is None or m.start() == 0:
        return None
    return m.group(0)


_UPDATABLE = frozenset({KeyType.SELF, KeyType.SHARED, KeyType.PUBLIC, KeyType.RESERVED})


def validate_update_key(key: str, owner: str) -> None:
    """Reject keys the update/update:meta handlers refuse (AT0016), in Dart's order.

    ``key`` is the fully built key (``[public:][@to:]<atKey>[@owner]``); ``owner`` is the
    server's atSign.
    """
    suffix = key_owner(key)
    if suffix is not None and suffix.lower() != owner.lower():
        raise invalid_key(
            f"Invalid update command - sharedBy atsign {suffix}"
            f" should be same as current atsign {owner}"
        )
    kt = key_type(key)
    if kt not in _UPDATABLE:
        raise invalid_key(f"You may not update keys of type {kt.dart_name}")
    limit = MAX_CACHED_KEY_LENGTH if key.lower().startswith("cached:") else MAX_KEY_LENGTH
    if len(key) > limit:
        raise invalid_key(f"key length {len(key)} is greater than max allowed {limit} chars")
