"""atKey rules (docs/reference/atprotocol.md#keys)."""

from __future__ import annotations

import pytest

from noports.atprotocol.errors import AtError
from noports.atprotocol.keys import (
    MAX_CACHED_KEY_LENGTH,
    MAX_KEY_LENGTH,
    KeyType,
    fix_atsign,
    format_atsign,
    is_committed,
    is_hidden,
    key_type,
    namespace,
    normalize_key,
    scan_visible,
    validate_update_key,
)

KT = KeyType


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        # docs/reference/atprotocol.md#key-type-rules functional-test examples
        ("public:country,current@alice", KT.INVALID),
        ("@🦄:emoji.name@alice🛠", KT.SHARED),
        ("public:country@@alice", KT.INVALID),
        # shapes of docs/reference/atprotocol.md#key-shapes
        ("public:phone.wavi@alice", KT.PUBLIC),
        ("public:_hidden@alice", KT.PUBLIC),
        ("phone.wavi@alice", KT.SELF),
        ("_hidden@alice", KT.SELF),
        ("@alice:phone@alice", KT.SELF),
        ("@bob:phone@alice", KT.SHARED),
        ("@bob:_x@alice", KT.SHARED),
        ("private:x@alice", KT.PRIVATE),
        ("private:_4af2@alice", KT.PRIVATE),
        ("cached:@alice:phone@bob", KT.CACHED_SHARED),
        ("cached:public:phone@bob", KT.CACHED_PUBLIC),
        ("local:x@alice", KT.LOCAL),
        ("x@alice🛠", KT.SELF),
        ("shared_key.bob@alice", KT.SELF),
        ("phone", KT.INVALID),
        ("phone@", KT.INVALID),
        ("@bob:@alice", KT.INVALID),
        ("x@" + "a" * 55, KT.SELF),
        ("x@" + "a" * 56, KT.INVALID),
        ("PUBLIC:Phone@Alice", KT.PUBLIC),  # case-insensitive like Dart
        ("phone wavi@alice", KT.INVALID),
        ("café@alice", KT.INVALID),  # Dart \w is ASCII only
        ("©️@alice", KT.SELF),  # allowed emoji range
        # reserved keys
        ("privatekey:at_secret", KT.RESERVED),
        ("privatekey:at_secret_deleted", KT.RESERVED),
        ("privatekey:at_pkam_publickey", KT.RESERVED),
        ("privatekey:signing_keypair_generated", KT.RESERVED),
        ("privatekey:commitLogCompactionStats", KT.RESERVED),
        ("configkey", KT.RESERVED),
        ("_latestNotificationIdv2", KT.RESERVED),
        ("private:blocklist@alice", KT.RESERVED),
        ("public:signing_publickey@alice", KT.RESERVED),
        ("@alice:signing_privatekey@alice", KT.RESERVED),
        ("@bob:shared_key@alice", KT.RESERVED),
        ("public:publickey@alice", KT.RESERVED),
        ("privatekey:other", KT.INVALID),
    ],
)
def test_key_type(key: str, expected: KeyType) -> None:
    assert key_type(key) is expected


def test_key_type_owner_fallback() -> None:
    assert key_type("phone") is KT.INVALID
    assert key_type("phone", "@alice") is KT.SELF
    assert key_type("public:phone", "alice") is KT.PUBLIC
    assert key_type("@bob:phone", "@alice") is KT.SHARED
    assert key_type("privatekey:at_secret", "@alice") is KT.RESERVED
    assert key_type("phone@bob", "@alice") is KT.SELF  # suffix present: owner unused


def test_dart_names() -> None:
    assert KT.PRIVATE.dart_name == "KeyType.privateKey"
    assert KT.INVALID.dart_name == "KeyType.invalidKey"
    assert KT.CACHED_PUBLIC.dart_name == "KeyType.cachedPublicKey"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("  Phone.Wavi@Alice  ", "phone.wavi@alice"),
        ("public: phone @alice", "public:phone@alice"),
        ("@Bob:X@alice🛠", "@bob:x@alice🛠"),
    ],
)
def test_normalize_key(raw: str, expected: str) -> None:
    assert normalize_key(raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("alice", "@alice"),
        ("@Alice", "@alice"),
        ("@alice🛠", "@alice🛠"),
        ("@colin.constable", "@colinconstable"),
    ],
)
def test_fix_atsign(raw: str, expected: str) -> None:
    assert fix_atsign(raw) == expected


@pytest.mark.parametrize("raw", ["", "@", "@a@b", "@a b", "@a:b", "@a\x01"])
def test_fix_atsign_rejects(raw: str) -> None:
    with pytest.raises(AtError):
        fix_atsign(raw)


@pytest.mark.parametrize(
    ("key", "committed"),
    [
        ("phone@alice", True),
        ("@bob:phone@alice", True),
        ("public:phone@alice", True),
        ("public:__synced@alice", True),
        ("public:_4af2@alice", False),
        ("private:x@alice", False),
        ("privatekey:at_pkam_publickey", False),
        ("local:x@alice", False),
        ("_hidden@alice", True),
    ],
)
def test_is_committed(key: str, committed: bool) -> None:
    assert is_committed(key) is committed


@pytest.mark.parametrize(
    ("key", "hidden"),
    [
        ("_x@alice", True),
        ("public:_x@alice", True),
        ("public:__x@alice", True),
        ("@bob:_x@alice", True),
        ("cached:@alice:_x@bob", True),
        ("x@alice", False),
        ("public:x_y@alice", False),
    ],
)
def test_is_hidden(key: str, hidden: bool) -> None:
    assert is_hidden(key) is hidden


@pytest.mark.parametrize(
    ("key", "plain", "with_hidden"),
    [
        ("phone@alice", True, True),
        ("@bob:phone@alice", True, True),
        ("public:phone@alice", True, True),
        ("cached:public:publickey@bob", True, True),
        ("private:x@alice", False, False),
        ("privatekey:at_secret", False, False),
        ("public:_x@alice", False, False),
        ("public:__x@alice", False, True),
        ("_x@alice", False, True),
    ],
)
def test_scan_visible(key: str, plain: bool, with_hidden: bool) -> None:
    assert scan_visible(key, show_hidden=False) is plain
    assert scan_visible(key, show_hidden=True) is with_hidden


@pytest.mark.parametrize(
    ("key", "ns"),
    [
        ("phone.wavi@alice", "wavi"),
        ("public:phone.wavi@alice", "wavi"),
        ("@bob:a.b.wavi@alice", "wavi"),
        ("phone@alice", None),
        ("shared_key.bob@alice", "bob"),
        ("privatekey:at_secret", None),
        ("x.y.__manage@alice", "__manage"),
    ],
)
def test_namespace(key: str, ns: str | None) -> None:
    assert namespace(key) == ns


@pytest.mark.parametrize(
    "key",
    [
        "phone@alice",
        "public:phone@alice",
        "@bob:phone@alice",
        "privatekey:at_pkam_publickey",
        "public:publickey@alice",
        "@bob:shared_key@alice",
    ],
)
def test_validate_update_key_ok(key: str) -> None:
    validate_update_key(key, "@alice")


@pytest.mark.parametrize(
    ("key", "message"),
    [
        (
            "phone@bob",
            "Invalid update command - sharedBy atsign @bob should be same as current atsign @alice",
        ),
        ("private:x@alice", "You may not update keys of type KeyType.privateKey"),
        ("local:x@alice", "You may not update keys of type KeyType.localKey"),
        ("cached:public:x@alice", "You may not update keys of type KeyType.cachedPublicKey"),
        ("cached:@alice:x@alice", "You may not update keys of type KeyType.cachedSharedKey"),
        ("public:country,current@alice", "You may not update keys of type KeyType.invalidKey"),
        ("phone", "You may not update keys of type KeyType.invalidKey"),
    ],
)
def test_validate_update_key_rejects(key: str, message: str) -> None:
    with pytest.raises(AtError) as ei:
        validate_update_key(key, "@alice")
    assert ei.value.code == "AT0016"
    assert ei.value.message == message


def test_validate_update_key_length() -> None:
    ok = "a" * (MAX_KEY_LENGTH - len("@alice")) + "@alice"
    validate_update_key(ok, "@alice")
    too_long = "a" + ok
    with pytest.raises(AtError) as ei:
        validate_update_key(too_long, "@alice")
    assert ei.value.code == "AT0016"
    assert "249" in ei.value.message
    assert MAX_CACHED_KEY_LENGTH == 255


def test_format_atsign() -> None:
    assert format_atsign("Bob") == "@Bob"
    assert format_atsign("@bob!") == "@bob!"
    assert format_atsign("") is None
    assert format_atsign(None) is None
