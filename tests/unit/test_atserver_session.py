"""Session logic of the atServer, verb by verb, without sockets (fake clock, fake remote)."""

from __future__ import annotations

import asyncio
import json

import pytest

from noports import crypto
from noports.atserver.host import Host, ServerConfig
from noports.atserver.session import Session
from noports.atserver.store import Store
from noports.atserver.wire import RemoteReply

SECRET = "s3cret" * 10
T0 = 1_700_000_000_000


class Clock:
    def __init__(self) -> None:
        self.t = T0

    def __call__(self) -> int:
        return self.t


class FakeRemote:
    """Records requests; answers from a dict keyed by (other, line)."""

    def __init__(self) -> None:
        self.answers: dict[tuple[str, str], RemoteReply] = {}
        self.calls: list[tuple[str, str, str, bool]] = []
        self.pol_ok = True

    async def request(self, me, other, line, *, handshake, timeout=10.0):
        self.calls.append((me, other, line, handshake))
        return self.answers.get((other, line), RemoteReply(code="AT0015", message="nope"))

    async def verify_pol(self, me, from_atsign, cookie, proof):
        self.calls.append((me, from_atsign, f"verify {cookie}", True))
        return self.pol_ok


def run(coro):
    return asyncio.run(coro)


@pytest.fixture()
def env(tmp_path):
    store = Store(tmp_path / "atserver.db")
    store.add_hosted("@alice", 0, SECRET)
    clock = Clock()
    remote = FakeRemote()
    slept: list[float] = []

    async def fake_sleep(s: float) -> None:
        slept.append(s)

    host = Host("@alice", store, ServerConfig(), clock=clock, remote=remote, sleep=fake_sleep)
    host.ensure_startup_keys()
    yield host, clock, remote, slept
    store.close()


def handle(session: Session, line: str):
    return run(session.handle(line))


def body(reply) -> str:
    return reply.text.split("\n", 1)[0]


def cram_auth(host: Host) -> Session:
    s = Session(host)
    challenge = body(handle(s, "from:@alice"))[len("data:"):]
    r = handle(s, "cram:" + crypto.cram_digest(SECRET, challenge))
    assert r.text == "data:success\n@alice@"
    return s


# --- framing, prompts, errors -----------------------------------------------------------------

def test_unauthenticated_prompt_and_from_challenge(env):
    host, *_ = env
    s = Session(host, session_id="_sid")
    r = handle(s, "from:@alice")
    assert r.text.startswith("data:_sid@alice:") and r.text.endswith("\n@")
    assert r.text.count("\n") == 1


def test_cram_success_and_failure(env):
    host, *_ = env
    s = Session(host)
    ch = body(handle(s, "from:alice"))[5:]
    r = handle(s, "cram:" + crypto.cram_digest("wrong", ch))
    assert r.text == "error:AT0401-Exception: Authentication Failed\n@"
    assert not r.close
    r = handle(s, "cram:" + crypto.cram_digest(SECRET, ch))
    assert r.text == "data:success\n@alice@"


def test_cram_without_from_is_unauthenticated(env):
    host, *_ = env
    r = handle(Session(host), "cram:abcd")
    assert body(r).startswith("error:AT0401")


def test_pkam_rsa_sha256_and_sha512(env):
    host, *_ = env
    s = cram_auth(host)
    pub, priv = crypto.generate_rsa_keypair()
    assert body(handle(s, f"update:privatekey:at_pkam_publickey {pub}")) == "data:-1"
    for extra, hname in (("", "sha256"), ("signingAlgo:rsa2048:hashingAlgo:sha512:", "sha512")):
        s2 = Session(host)
        ch = body(handle(s2, "from:@alice"))[5:]
        r = handle(s2, f"pkam:{extra}" + crypto.sign(priv, ch, hname))
        assert r.text == "data:success\n@alice@"
    s3 = Session(host)
    handle(s3, "from:@alice")
    assert body(handle(s3, "pkam:" + crypto.sign(priv, "other"))).startswith("error:AT0401")


def test_pkam_without_key_is_key_not_found(env):
    host, *_ = env
    s = Session(host)
    handle(s, "from:@alice")
    assert body(handle(s, "pkam:AAAA")).startswith("error:AT0015")


def test_privileged_verbs_need_auth(env):
    host, *_ = env
    s = Session(host)
    for cmd in ("llookup:phone@alice", "update:phone@alice 1", "delete:phone@alice",
                "monitor", "stats:3", "plookup:publickey@bob"):
        r = handle(s, cmd)
        assert r.text == "error:AT0401-Exception: Command cannot be executed without auth\n@", cmd


def test_invalid_syntax_and_json_errors(env):
    host, *_ = env
    s = Session(host)
    assert body(handle(s, "bogus")) == "error:AT0003-Exception: invalid command"
    handle(s, 'from:@alice:clientConfig:{"version":"3.0.57"}')
    r = handle(s, "bogus")
    err = json.loads(body(r)[len("error:"):])
    assert err["errorCode"] == "AT0003"


def test_invalid_key_is_at0016(env):
    host, *_ = env
    s = cram_auth(host)
    assert body(handle(s, "update:public:country,current@alice x")).startswith("error:AT0016")
    assert body(handle(s, "update:phone@bob 1")).startswith("error:AT0016")


def test_exit_closes_without_reply(env):
    host, *_ = env
    r = handle(Session(host), "@exit")
    assert r.text is None and r.close


# --- CRUD ---------------------------------------------------------------------------------

def test_update_llookup_meta_all_and_commit_ids(env):
    host, clock, *_ = env
    s = cram_auth(host)
    c1 = int(body(handle(s, "update:public:phone@alice 123"))[5:])
    c2 = int(body(handle(s, "update:isEncrypted:true:ivNonce:AAAA:phone.wavi@alice enc"))[5:])
    assert c2 == c1 + 1
    assert body(handle(s, "llookup:public:phone@alice")) == "data:123"
    meta = json.loads(body(handle(s, "llookup:meta:phone.wavi@alice"))[5:])
    assert meta["isEncrypted"] is True and meta["ivNonce"] == "AAAA"
    assert meta["createdBy"] == "@alice" and meta["version"] == 0
    allj = json.loads(body(handle(s, "llookup:all:public:phone@alice"))[5:])
    assert allj["key"] == "public:phone@alice" and allj["data"] == "123"
    assert "createdAt" in allj["metaData"]
    handle(s, "update:public:phone@alice 456")
    allj = json.loads(body(handle(s, "llookup:all:public:phone@alice"))[5:])
    assert allj["metaData"]["version"] == 1 and allj["data"] == "456"
    assert body(handle(s, "llookup:nothere@alice")) == (
        "error:AT0015-key not found : nothere@alice does not exist in keystore")


def test_keys_are_case_insensitive(env):
    host, *_ = env
    s = cram_auth(host)
    handle(s, "update:public:Phone@ALICE 1")
    assert body(handle(s, "llookup:public:phone@alice")) == "data:1"


def test_ttl_and_ttb_expiry(env):
    host, clock, *_ = env
    s = cram_auth(host)
    handle(s, "update:ttl:1000:temp@alice v")
    handle(s, "update:ttb:5000:later@alice v")
    assert body(handle(s, "llookup:temp@alice")) == "data:v"
    assert body(handle(s, "llookup:later@alice")) == "data:null"
    clock.t += 2000
    assert body(handle(s, "llookup:temp@alice")) == "data:null"
    assert "temp@alice" not in body(handle(s, "scan"))
    clock.t += 5000
    assert body(handle(s, "llookup:later@alice")) == "data:v"
    assert host.store.purge_expired_keys(clock.t) == 1


def test_update_meta_keeps_value(env):
    host, *_ = env
    s = cram_auth(host)
    handle(s, "update:k1@alice v")
    assert body(handle(s, "update:meta:k1@alice:ttr:-1")).startswith("data:")
    allj = json.loads(body(handle(s, "llookup:all:k1@alice"))[5:])
    assert allj["data"] == "v" and allj["metaData"]["ttr"] == -1


def test_delete_and_protected_keys(env):
    host, *_ = env
    s = cram_auth(host)
    handle(s, "update:k1@alice v")
    assert body(handle(s, "delete:k1@alice")).startswith("data:")
    assert body(handle(s, "llookup:k1@alice")).startswith("error:AT0015")
    for k in ("public:signing_publickey@alice", "@alice:signing_privatekey@alice",
              "public:publickey@alice"):
        assert body(handle(s, f"delete:{k}")).startswith("error:AT0009"), k
    assert body(handle(s, "delete:privatekey:at_secret")) == "data:-1"
    s2 = Session(host)
    ch = body(handle(s2, "from:@alice"))[5:]
    assert body(handle(s2, "cram:" + crypto.cram_digest(SECRET, ch))).startswith("error:AT0015")


def test_scan_visibility(env):
    host, *_ = env
    s = cram_auth(host)
    handle(s, "update:public:phone@alice 1")
    handle(s, "update:public:_hidden@alice 1")
    handle(s, "update:@bob:shared.app@alice 1")
    handle(s, "update:_secret@alice 1")
    keys = json.loads(body(handle(s, "scan"))[5:])
    assert "public:phone@alice" in keys and "@bob:shared.app@alice" in keys
    assert "_secret@alice" not in keys and "public:_hidden@alice" not in keys
    assert not any(k.startswith("privatekey:") for k in keys)
    keys = json.loads(body(handle(s, "scan:showHidden:true"))[5:])
    assert "_secret@alice" in keys
    keys = json.loads(body(handle(s, "scan phone"))[5:])
    assert keys == ["public:phone@alice"]
    anon = json.loads(body(handle(Session(host), "scan"))[5:])
    assert "phone@alice" in anon and "_hidden@alice" not in anon
    assert all(not k.startswith("@") for k in anon)


def test_unauthenticated_lookup_sees_public_only(env):
    host, *_ = env
    s = cram_auth(host)
    handle(s, "update:public:phone@alice 1")
    handle(s, "update:@alice:mine@alice 2")
    anon = Session(host)
    assert body(handle(anon, "lookup:phone@alice")) == "data:1"
    assert body(handle(anon, "lookup:mine@alice")).startswith("error:AT0015")
    assert body(handle(s, "lookup:mine@alice")) == "data:2"


# --- remote lookups (fake remote) ---------------------------------------------------------

def test_remote_lookup_caches_with_ttr(env):
    host, clock, remote, _ = env
    s = cram_auth(host)
    reply = {"key": "@alice:phone@bob", "data": "enc",
             "metaData": {"ttr": -1, "isEncrypted": True, "ivNonce": "AAAA"}}
    remote.answers[("@bob", "lookup:all:phone@bob")] = RemoteReply(data=json.dumps(reply))
    assert body(handle(s, "lookup:phone@bob")) == "data:enc"
    assert remote.calls[-1] == ("@alice", "@bob", "lookup:all:phone@bob", True)
    n = len(remote.calls)
    allj = json.loads(body(handle(s, "lookup:all:phone@bob"))[5:])
    assert allj["key"] == "cached:@alice:phone@bob" and len(remote.calls) == n
    assert body(handle(s, "llookup:cached:@alice:phone@bob")) == "data:enc"


def test_remote_lookup_not_found(env):
    host, _clock, remote, _ = env
    s = cram_auth(host)
    assert body(handle(s, "lookup:nothere@bob")).startswith("error:AT0015")


def test_plookup_unauthenticated_remote(env):
    host, _clock, remote, _ = env
    s = cram_auth(host)
    remote.answers[("@bob", "lookup:all:publickey@bob")] = RemoteReply(data=json.dumps(
        {"key": "public:publickey@bob", "data": "PUB", "metaData": {}}))
    assert body(handle(s, "plookup:publickey@bob")) == "data:PUB"
    assert remote.calls[-1][3] is False
    allj = json.loads(body(handle(s, "plookup:all:publickey@bob"))[5:])
    assert allj["data"] == "PUB" and allj["key"].endswith("publickey@bob")


# --- pol (receiving side) and notifications -----------------------------------------------

def pol_session(host: Host, other: str = "@bob") -> Session:
    s = Session(host, session_id="_x")
    r = handle(s, f"from:{other}")
    assert body(r).startswith(f"data:proof:_x{other}:")
    r = handle(s, "pol")
    assert r.text == f"{other}@"
    return s


def test_pol_success_and_failure(env):
    host, _clock, remote, _ = env
    s = pol_session(host)
    assert s.pol_atsign == "@bob"
    assert body(handle(s, "llookup:x1@alice")).startswith("error:AT0401")
    remote.pol_ok = False
    s2 = Session(host)
    handle(s2, "from:@eve")
    assert body(handle(s2, "pol")).startswith("error:AT0401")
    assert body(handle(Session(host), "pol")).startswith("error:AT0401")


def test_pol_lookup_sees_keys_shared_with_caller(env):
    host, *_ = env
    owner = cram_auth(host)
    handle(owner, "update:@bob:phone@alice forbob")
    handle(owner, "update:@carol:phone@alice forcarol")
    s = pol_session(host)
    r = handle(s, "lookup:all:phone@alice")
    assert r.text.endswith("\n@bob@")
    assert json.loads(body(r)[5:])["data"] == "forbob"
    assert json.loads(body(handle(s, "scan"))[5:]) == ["phone@alice"]


def test_notify_receive_store_cache_and_monitor(env):
    host, clock, *_ = env
    owner = cram_auth(host)
    lines: list[str] = []
    owner.emit = lines.append
    assert handle(owner, "monitor:0").text is None
    s = pol_session(host)
    r = handle(s, "notify:id:n1:update:ttr:-1:isEncrypted:true:ivNonce:IV==:"
                  "@alice:shared_key@bob:ENC")
    assert r.text == "data:success\n@bob@"
    note = [x for x in lines if '"id":"n1"' in x]
    assert len(note) == 1 and note[0].startswith("notification: {") and note[0].endswith("}\n")
    j = json.loads(note[0][len("notification: "):])
    assert j["key"] == "@alice:shared_key@bob" and j["from"] == "@bob" and j["value"] == "ENC"
    assert j["metadata"]["ivNonce"] == "IV=="
    assert body(handle(owner, "llookup:cached:@alice:shared_key@bob")) == "data:ENC"
    assert body(handle(owner, "lookup:shared_key@bob")) == "data:ENC"  # from cache
    # an identical re-delivery (lost ack) is acknowledged but not stored/published again
    lines.clear()
    r = handle(s, "notify:id:n1:update:ttr:-1:isEncrypted:true:ivNonce:IV==:"
                  "@alice:shared_key@bob:ENC")
    assert r.text == "data:success\n@bob@" and not [x for x in lines if '"id":"n1"' in x]
    # notify on behalf of someone else is refused
    assert body(handle(s, "notify:id:n2:update:@alice:k9@carol:x")).startswith("error:AT0009")


def test_notify_sender_side_queues_and_status(env):
    host, clock, *_ = env
    s = cram_auth(host)
    r = handle(s, "notify:id:abc-1:update:isEncrypted:true:ivNonce:AAAA:@bob:kk.app@alice:ct")
    assert body(r) == "data:abc-1"
    rows = host.store.pending_sent()
    assert [(x.id, x.to_atsign, x.status) for x in rows] == [("abc-1", "@bob", "queued")]
    assert body(handle(s, "notify:status:abc-1")) == "data:queued"
    assert body(handle(s, "notify:status:nope")) == "data:null"
    clock.t += 25 * 3600 * 1000
    assert body(handle(s, "notify:status:abc-1")) == "data:expired"


def test_self_notification_and_replay_strictly_greater(env):
    host, clock, *_ = env
    s = cram_auth(host)
    handle(s, "notify:id:s1:update:@alice:kk.app@alice:v1")
    clock.t += 10
    handle(s, "notify:id:s2:update:@alice:kk.app@alice:v2")
    rows = host.store.notifications("@alice", ("received",))
    e1 = rows[0].epoch_ms
    m = cram_auth(host)
    lines: list[str] = []
    m.emit = lines.append
    handle(m, f"monitor:{e1}")
    ids = [json.loads(x[len("notification: "):])["id"] for x in lines]
    assert ids == ["s2"]
    lines.clear()
    handle(m, "noop:0")  # replies in monitor mode carry no prompt
    assert body(handle(m, "noop:0")) == "data:ok" and handle(m, "noop:0").text == "data:ok\n"


def test_monitor_regex_and_stats_notification(env):
    host, clock, *_ = env
    s = cram_auth(host)
    m = cram_auth(host)
    lines: list[str] = []
    m.emit = lines.append
    handle(m, "monitor wavi")
    handle(s, "notify:id:a1:update:@alice:x1.other@alice:v")
    handle(s, "notify:id:a2:update:@alice:x1.wavi@alice:v")
    got = [json.loads(x[14:])["id"] for x in lines if x.startswith("notification: ")]
    assert "a2" in got and "a1" not in got
    lines.clear()
    handle(s, "update:k1@alice v")
    stats = [json.loads(x[14:]) for x in lines]
    assert stats and stats[-1]["id"] == "-1" and stats[-1]["key"] == "statsNotification.@alice"


def test_notify_list_and_remove(env):
    host, *_ = env
    s = cram_auth(host)
    handle(s, "notify:id:l1:update:@alice:kk.app@alice:v1")
    lst = json.loads(body(handle(s, "notify:list"))[5:])
    assert [x["id"] for x in lst] == ["l1"]
    assert body(handle(s, "notify:remove:l1")) == "data:success"
    assert body(handle(s, "notify:list")) == "data:null"


def test_autonotify_on_shared_update(env):
    host, *_ = env
    s = cram_auth(host)
    handle(s, "update:ttr:86400000:@bob:shared_key@alice ENCKEY")
    rows = host.store.pending_sent()
    assert len(rows) == 1 and rows[0].key == "@bob:shared_key@alice"
    assert rows[0].data["value"] == "ENCKEY"
    host.config.autonotify = False
    handle(s, "update:@bob:other@alice v")
    assert len(host.store.pending_sent()) == 1


# --- utility verbs ------------------------------------------------------------------------

def test_noop_info_stats(env):
    host, _clock, _remote, slept = env
    s = cram_auth(host)
    assert body(handle(s, "noop:1500")) == "data:ok" and slept == [1.5]
    assert body(handle(s, "noop:5001")).startswith("error:AT0022")
    info = json.loads(body(handle(Session(host), "info"))[5:])
    assert "version" in info
    handle(s, "update:k1@alice v")
    r = body(handle(s, "stats:3"))
    assert r.startswith("data: [")
    st = json.loads(r[len("data: "):])
    assert st[0]["id"] == "3" and st[0]["name"] == "lastCommitID"
    assert int(st[0]["value"]) == host.store.last_commit_id("@alice")


def test_unexpected_exception_is_at0011_and_close(env, monkeypatch):
    host, *_ = env
    s = cram_auth(host)

    def boom(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(host.store, "all_keys", boom)
    r = handle(s, "scan")
    assert body(r).startswith("error:AT0011") and r.close


def test_enroll_request_over_cram_then_apkam_pkam(env):
    host, *_ = env
    s = cram_auth(host)
    pub, priv = crypto.generate_rsa_keypair()
    params = {"appName": "app", "deviceName": "dev", "apkamPublicKey": pub,
              "encryptedDefaultEncryptionPrivateKey": "E1",
              "encryptedDefaultSelfEncryptionKey": "E2"}
    r = json.loads(body(handle(s, "enroll:request:" + json.dumps(params)))[5:])
    assert r["status"] == "approved"
    s2 = Session(host)
    ch = body(handle(s2, "from:@alice"))[5:]
    sig = crypto.sign(priv, ch)
    r2 = handle(s2, f"pkam:signingAlgo:rsa2048:hashingAlgo:sha256:"
                    f"enrollmentId:{r['enrollmentId']}:{sig}")
    assert r2.text == "data:success\n@alice@"
    s3 = Session(host)  # legacy pkam works too with the same key
    ch = body(handle(s3, "from:@alice"))[5:]
    assert body(handle(s3, "pkam:" + crypto.sign(priv, ch))) == "data:success"
    s4 = Session(host)
    handle(s4, "from:@alice")
    assert body(handle(s4, "pkam:enrollmentId:nope:AAAA")).startswith("error:AT0028")
    assert body(handle(Session(host), "enroll:request:{}")).startswith("error:AT0401")
    listed = json.loads(body(handle(s, "enroll:list"))[5:])  # enrollments: test_atserver_enroll
    assert [v["status"] for v in listed.values()] == ["approved"]


def test_invalid_atsign_keeps_connection_open(env):
    host, *_ = env
    s = Session(host)
    for cmd in ("from:@a!b", "lookup:xx@a&b", "notify:@b&:key@alice:v"):
        r = handle(s, cmd)
        assert body(r).startswith("error:") and not r.close, cmd
    assert body(handle(s, "from:@alice")).startswith("data:")


def test_monitor_gets_a_notification_before_its_commit_and_a_failed_commit_is_retried(
        env, monkeypatch):
    """Received notifications reach monitors before the fsync; the sender still hears
    ``success`` only once stored. A store that fails (disk full, I/O error) costs the
    sender an error and a retry (the monitor sees it twice: at-least-once), never the
    server or its other connections."""
    import sqlite3
    host, *_ = env
    owner = cram_auth(host)
    lines: list[str] = []
    owner.emit = lines.append
    handle(owner, "monitor:0")
    real_put = host.store.put_notification
    seen_by_monitor_at_commit: list[bool] = []

    def failing_put(row, **_kw):
        seen_by_monitor_at_commit.append(any(f'"id":"{row.id}"' in x for x in lines))
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(host.store, "put_notification", failing_put)
    note = "notify:id:r1:update:isEncrypted:true:ivNonce:IV==:@alice:ping.x@bob:ENC"
    r = handle(pol_session(host), note)
    assert body(r).startswith("error:"), r.text  # no "success": the sender will retry
    assert seen_by_monitor_at_commit == [True]
    monkeypatch.setattr(host.store, "put_notification", real_put)
    assert body(handle(owner, "noop:0")) == "data:ok"  # the owner is still served
    r = handle(pol_session(host), note)  # the sender's retry
    assert r.text == "data:success\n@bob@"
    assert host.store.get_notification("@alice", "r1") is not None
    assert len([x for x in lines if '"id":"r1"' in x]) == 2
    r = handle(pol_session(host), note)  # a lost ack's re-delivery: stored once, not pushed
    assert r.text == "data:success\n@bob@"
    assert len([x for x in lines if '"id":"r1"' in x]) == 2
