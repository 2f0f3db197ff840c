"""Notification wire shapes (docs/reference/atprotocol.md#notification-verbs, docs/reference/atprotocol.md#notification-delivery, docs/reference/atprotocol.md#notifications)."""

from __future__ import annotations

import json

import pytest

from noports.atprotocol.grammar import parse_command
from noports.atprotocol.notifications import (
    Notification,
    from_storage,
    monitor_line,
    notification_key,
    notify_list_json,
    s2s_notify_command,
    stats_line,
    to_storage,
)

ID = "773e2e60-8f40-4a8a-9c8b-1f5c2a6a0c11"
T = 1603714720965


def received(**kw) -> Notification:
    base = {
        "id": ID,
        "from_atsign": "@bob",
        "to_atsign": "@alice",
        "key": "@alice:phone@bob",
        "value": "Y3Q=",
        "epoch_millis": T,
        "is_encrypted": True,
        "metadata": {"ivNonce": "aXY=", "ttr": 10, "pubKeyCS": "cs"},
        "type": "received",
        "status": "delivered",
        "expires_at": T + 900000,
    }
    base.update(kw)
    return Notification(**base)


def parse_line(line: str) -> dict:
    assert line.startswith("notification: ")
    assert "\n" not in line
    return json.loads(line[len("notification: ") :])


def test_defaults() -> None:
    n = Notification(id="1", from_atsign="@a", to_atsign="@b", key="@b:k@a")
    assert (n.operation, n.message_type, n.notifier, n.strategy, n.priority) == (
        "update",
        "key",
        "SYSTEM",
        "all",
        "low",
    )
    assert (n.status, n.type, n.retry_count, n.latest_n) == ("queued", "sent", 1, 1)
    assert n.metadata == {} and n.value is None and n.is_encrypted is False


def test_monitor_line_live_exact() -> None:
    line = monitor_line(received(), replay=False)
    assert line == (
        'notification: {"id":"' + ID + '","from":"@bob","to":"@alice","key":"@alice:phone@bob",'
        '"value":"Y3Q=","operation":"update","epochMillis":1603714720965,'
        '"messageType":"MessageType.key","isEncrypted":true,'
        '"metadata":{"encKeyName":null,"encAlgo":null,"ivNonce":"aXY=","skeEncKeyName":null,'
        '"skeEncAlgo":null,"sharedKeyEnc":null}}'
    )


def test_monitor_line_replay_metadata() -> None:
    d = parse_line(monitor_line(received(), replay=True))
    assert list(d) == [
        "id",
        "from",
        "to",
        "key",
        "value",
        "operation",
        "epochMillis",
        "messageType",
        "isEncrypted",
        "metadata",
    ]
    assert list(d["metadata"]) == [
        "encKeyName",
        "encAlgo",
        "ivNonce",
        "skeEncKeyName",
        "skeEncAlgo",
        "availableAt",
        "expiresAt",
    ]
    assert d["metadata"]["availableAt"] == "null"  # Dart toString() of a null date
    assert d["metadata"]["expiresAt"] == "2020-10-26 12:33:40.965Z"


def test_monitor_line_text_delete_unencrypted_unicode() -> None:
    n = received(
        key="@alice:héllo 🛠",
        value=None,
        operation="delete",
        message_type="text",
        is_encrypted=False,
        metadata={},
    )
    line = monitor_line(n, replay=False)
    assert "🛠" in line  # ensure_ascii=False
    d = parse_line(line)
    assert d["messageType"] == "MessageType.text"
    assert d["operation"] == "delete"
    assert d["value"] is None
    assert d["isEncrypted"] is False


def test_stats_line() -> None:
    line = stats_line("@alice", 12, T)
    assert line == (
        'notification: {"id":"-1","from":"@alice","to":"@alice",'
        '"key":"statsNotification.@alice","value":"12","operation":"update",'
        '"epochMillis":1603714720965,"messageType":"MessageType.key","isEncrypted":false,'
        '"metadata":null}'
    )


@pytest.mark.parametrize(
    ("command", "from_atsign", "key"),
    [
        ("notify:@bob:phone@alice:v", "@alice", "@bob:phone@alice"),
        (f"notify:id:{ID}:update:isEncrypted:true:ivNonce:aXY=:@b:k.ns@a:ct", "@a", "@b:k.ns@a"),
        ("notify:messageType:text:@bob:hello", "@alice", "@bob:hello"),
        ("notify:messageType:text:@bob:hello world", "@alice", "@bob:hello world"),
        ("notify:update:@bob:public:x.ns@alice", "@alice", "public:x.ns@alice"),
        ("notify:public:location@alice:v", "@alice", "public:location@alice"),
        ("notify:@bob:phone:v", "@alice", "@bob:phone:v@alice"),  # value swallowed by atKey
        ("notify:@bob:phone", "@alice", "@bob:phone@alice"),
    ],
)
def test_notification_key(command: str, from_atsign: str, key: str) -> None:
    params = parse_command(command).params
    assert notification_key(params, from_atsign=from_atsign) == key


def test_s2s_reference_example() -> None:
    n = Notification(
        id="7f",
        from_atsign="@alice",
        to_atsign="@bob",
        key="@bob:shared_key@alice",
        value="YWJj",
        is_encrypted=True,
        ttl_ms=86400000,
        metadata={"ttr": 86400000, "ccd": False, "isEncrypted": True},
    )
    assert s2s_notify_command(n) == (
        "notify:id:7f:update:messageType:key:notifier:SYSTEM:ttln:86400000:ttr:86400000"
        ":ccd:false:isEncrypted:true:@bob:shared_key@alice:YWJj"
    )


def test_s2s_full_metadata_order_and_roundtrip() -> None:
    n = Notification(
        id="abc-1",
        from_atsign="@alice",
        to_atsign="@bob",
        key="@bob:phone.wavi@alice",
        value="v:with:colons",
        is_encrypted=True,
        ttl_ms=900000,
        metadata={
            "ttl": 5,
            "ttb": 0,
            "ttr": -1,
            "ccd": True,
            "sharedKeyEnc": "ske",
            "pubKeyCS": "cs",
            "encKeyName": "ek",
            "encAlgo": "AES",
            "ivNonce": "aXY=",
            "skeEncKeyName": "sk",
            "skeEncAlgo": "RSA",
            "dataSignature": "not-forwarded",
        },
    )
    cmd = s2s_notify_command(n)
    assert cmd == (
        "notify:id:abc-1:update:messageType:key:notifier:SYSTEM:ttln:900000:ttl:5:ttb:0"
        ":ttr:-1:ccd:true:isEncrypted:true:sharedKeyEnc:ske:pubKeyCS:cs:encKeyName:ek"
        ":encAlgo:AES:ivNonce:aXY=:skeEncKeyName:sk:skeEncAlgo:RSA"
        ":@bob:phone.wavi@alice:v:with:colons"
    )
    parsed = parse_command(cmd)
    assert parsed.verb == "notify"
    p = parsed.params
    assert p["id"] == "abc-1"
    assert p["ttr"] == "-1" and p["ccd"] == "true" and p["skeEncAlgo"] == "RSA"
    assert p["value"] == "v:with:colons"
    assert notification_key(p, from_atsign="@x") == "@bob:phone.wavi@alice"


def test_s2s_without_metadata_and_delete() -> None:
    n = Notification(
        id="1",
        from_atsign="@alice",
        to_atsign="@bob",
        key="@bob:phone@alice",
        operation="delete",
        ttl_ms=60000,
    )
    assert s2s_notify_command(n) == (
        "notify:id:1:delete:messageType:key:notifier:SYSTEM:ttln:60000:@bob:phone@alice"
    )
    assert parse_command(s2s_notify_command(n)).params["operation"] == "delete"


def test_s2s_text_message() -> None:
    n = Notification(
        id="2",
        from_atsign="@alice",
        to_atsign="@bob",
        key="@bob:hello there",
        message_type="text",
        ttl_ms=1,
    )
    cmd = s2s_notify_command(n)
    p = parse_command(cmd).params
    assert p["messageType"] == "text"
    assert notification_key(p, from_atsign="@alice") == "@bob:hello there"


def test_notify_list_json() -> None:
    assert notify_list_json([]) == "null"
    body = notify_list_json([received(), received(id="2")])
    arr = json.loads(body)
    assert [x["id"] for x in arr] == [ID, "2"]
    assert "availableAt" in arr[0]["metadata"]
    assert ", " not in body.replace('", "', "")  # compact


def test_storage_roundtrip() -> None:
    n = received(retry_count=3, latest_n=2, available_at=T, ttl_ms=5)
    d = to_storage(n)
    restored = from_storage(json.loads(json.dumps(d)))
    assert restored == n
    assert from_storage({**d, "unknown": 1}) == n


def test_is_expired() -> None:
    n = received()
    assert not n.is_expired(T)
    assert n.is_expired(T + 900001)
    assert not received(expires_at=None).is_expired(10**15)
