"""APKAM enrollment on the atServer, without sockets: codes, requests, approval, revocation,
and the hostile cases (wrong, huge, replayed and expired codes, guessing, request floods)."""

from __future__ import annotations

import asyncio
import json

import pytest

from noports import crypto
from noports.atserver import enrollment as E
from noports.atserver.host import Host, ServerConfig
from noports.atserver.session import Session
from noports.atserver.store import Store

SECRET = "s3cret" * 10
T0 = 1_700_000_000_000
ME = "@alice"


class Clock:
    def __init__(self) -> None:
        self.t = T0

    def __call__(self) -> int:
        return self.t


@pytest.fixture()
def env(tmp_path):
    store = Store(tmp_path / "atserver.db")
    store.add_hosted(ME, 0, SECRET)
    clock = Clock()
    host = Host(ME, store, ServerConfig(), clock=clock)
    host.ensure_startup_keys()
    yield host, clock
    store.close()


def handle(s: Session, line: str):
    return asyncio.run(s.handle(line))


def body(reply) -> str:
    return reply.text.split("\n", 1)[0]


def data(reply) -> str:
    b = body(reply)
    assert b.startswith("data:"), b
    return b[5:]


def cram(host: Host) -> Session:
    s = Session(host)
    ch = data(handle(s, f"from:{ME}"))
    assert data(handle(s, "cram:" + crypto.cram_digest(SECRET, ch))) == "success"
    return s


def pkam(host: Host, priv: str, eid: str) -> tuple[Session, str]:
    s = Session(host)
    ch = data(handle(s, f"from:{ME}"))
    sig = crypto.sign(priv, ch)
    return s, body(handle(s, f"pkam:signingAlgo:rsa2048:hashingAlgo:sha256:enrollmentId:{eid}:"
                             f"{sig}"))


def request(host: Host, otp: str, *, device: str = "dev1", s: Session | None = None):
    pub, priv = crypto.generate_rsa_keypair()
    params = {"appName": "noports", "deviceName": device, "namespaces": {"sshnp": "rw"},
              "otp": otp, "apkamPublicKey": pub, "encryptedAPKAMSymmetricKey": "QUJD"}
    r = handle(s or Session(host), "enroll:request:" + json.dumps(params))
    return r, priv


def enroll_pending(host: Host, op: Session) -> tuple[str, str]:
    otp = data(handle(op, "otp:get"))
    r, priv = request(host, otp)
    out = json.loads(data(r))
    assert out["status"] == "pending"
    return out["enrollmentId"], priv


def test_otp_request_approve_then_pkam_with_enrollment(env):
    host, _ = env
    op = cram(host)
    otp = data(handle(op, "otp:get"))
    assert len(otp) == 6 and set(otp) <= set(E.OTP_ALPHABET)
    eid, priv = enroll_pending(host, op)
    # pending: pkam refused with the reference's "pending" code
    _, reply = pkam(host, priv, eid)
    assert reply.startswith("error:AT0026") and "pending" in reply
    listed = json.loads(data(handle(op, 'enroll:list:{"enrollmentStatusFilter":["pending"]}')))
    key = f"{eid}.new.enrollments.__manage{ME}"
    assert listed[key]["deviceName"] == "dev1" and listed[key]["status"] == "pending"
    # the approving client is told through a self notification
    n = json.loads(data(handle(op, "notify:list:enrollments")))
    assert any(f"{eid}.new.enrollments.__manage" in x["key"] for x in n)
    approve = {"enrollmentId": eid, "encryptedDefaultEncryptionPrivateKey": "RUs=",
               "encryptedDefaultSelfEncryptionKey": "U0U="}
    assert json.loads(data(handle(op, "enroll:approve:" + json.dumps(approve))))["status"] \
        == "approved"
    dev, reply = pkam(host, priv, eid)
    assert reply == "data:success"
    assert dev.enrollment_namespaces == {"sshnp": "rw"}
    # a device enrollment without __manage cannot issue codes or manage enrollments
    assert body(handle(dev, "otp:get")).startswith("error:AT0009")
    assert body(handle(dev, "enroll:list")).startswith("error:AT0009")
    fetched = json.loads(data(handle(op, "enroll:fetch:" + json.dumps({"enrollmentId": eid}))))
    assert fetched["status"] == "approved"


def test_revoke_closes_live_connections_and_refuses_pkam(env):
    host, _ = env
    op = cram(host)
    eid, priv = enroll_pending(host, op)
    handle(op, "enroll:approve:" + json.dumps({"enrollmentId": eid}))
    dev, reply = pkam(host, priv, eid)
    assert reply == "data:success"
    hung_up: list[bool] = []
    dev.hangup = lambda: hung_up.append(True)
    assert handle(dev, "monitor").text is None  # monitor mode: no reply
    assert dev in host.monitors
    r = json.loads(data(handle(op, "enroll:revoke:" + json.dumps({"enrollmentId": eid}))))
    assert r["status"] == "revoked"
    assert hung_up == [True] and dev not in host.monitors
    after = handle(dev, "scan")
    assert body(after).startswith("error:AT0027") and after.close
    _, reply = pkam(host, priv, eid)
    assert reply.startswith("error:AT0027") and "revoked" in reply
    # the revocation is published for relays (decision 0021)
    rec = host.get(f"public:revocations.__manage{ME}")
    assert rec is not None and json.loads(rec.value)["enrollmentId"] == eid
    # unrevoke and delete follow the allowed transitions only
    assert body(handle(op, "enroll:approve:" + json.dumps({"enrollmentId": eid}))) \
        .startswith("error:AT0030")
    pubkey = f"public:noports.dev1.pkam.__pkams.__public_keys{ME}"
    assert host.get(pubkey) is None
    handle(op, "enroll:unrevoke:" + json.dumps({"enrollmentId": eid}))
    assert pkam(host, priv, eid)[1] == "data:success" and host.get(pubkey) is not None
    handle(op, "enroll:revoke:" + json.dumps({"enrollmentId": eid}))
    assert json.loads(data(handle(op, "enroll:delete:" + json.dumps({"enrollmentId": eid}))))[
        "status"] == "deleted"
    assert host.store.get_enrollment(ME, eid) is None


def test_revoking_the_cram_enrollment_also_removes_its_legacy_pkam_key(env):
    host, _ = env
    op = cram(host)
    pub, priv = crypto.generate_rsa_keypair()
    r = json.loads(data(handle(op, "enroll:request:" + json.dumps(
        {"appName": "a", "deviceName": "d", "apkamPublicKey": pub}))))
    eid = r["enrollmentId"]
    legacy = Session(host)
    ch = data(handle(legacy, f"from:{ME}"))
    assert data(handle(legacy, "pkam:" + crypto.sign(priv, ch))) == "success"
    handle(op, "enroll:revoke:" + json.dumps({"enrollmentId": eid}))
    again = Session(host)
    ch = data(handle(again, f"from:{ME}"))
    assert body(handle(again, "pkam:" + crypto.sign(priv, ch))).startswith("error:")


def test_own_enrollment_needs_force_to_revoke(env):
    host, _ = env
    op = cram(host)
    pub, priv = crypto.generate_rsa_keypair()
    r = json.loads(data(handle(op, "enroll:request:" + json.dumps(
        {"appName": "a", "deviceName": "d", "apkamPublicKey": pub}))))
    mgr, reply = pkam(host, priv, r["enrollmentId"])
    assert reply == "data:success"
    eid, _ = enroll_pending(host, mgr)  # an APKAM __manage enrollment may issue codes
    assert body(handle(mgr, "enroll:deny:" + json.dumps({"enrollmentId": eid}))) \
        .startswith("data:")
    own = json.dumps({"enrollmentId": r["enrollmentId"]})
    assert body(handle(mgr, "enroll:revoke:" + own)).startswith("error:AT0031")


def test_otp_is_single_use_and_expires(env):
    host, clock = env
    op = cram(host)
    otp = data(handle(op, "otp:get:ttl:60000"))
    r, _ = request(host, otp)
    assert json.loads(data(r))["status"] == "pending"
    replay, _ = request(host, otp)
    assert body(replay).startswith("error:AT0011") and "invalid otp" in body(replay)
    old = data(handle(op, "otp:get:ttl:60000"))
    clock.t += 60_001
    late, _ = request(host, old.lower())  # case does not matter, time does
    assert "invalid otp" in body(late)
    assert body(handle(op, "otp:get:ttl:3600001")).startswith("error:AT0022")
    assert "1 h" in body(handle(op, "otp:get:ttl:99999999"))
    assert body(handle(Session(host), "otp:get")).startswith("error:AT0401")


def test_guessing_codes_is_throttled_and_other_clients_are_served(env):
    host, clock = env
    op = cram(host)
    good = data(handle(op, "otp:get"))
    attacker = Session(host)
    for i in range(E.MAX_BAD_OTP_PER_CONN):
        r, _ = request(host, "ZZZZZ" + "ABC"[i], s=attacker)
        assert "invalid otp" in body(r)
    assert r.close and "closing after repeated wrong codes" in body(r)
    for i in range(E.MAX_BAD_OTP_PER_WINDOW - E.MAX_BAD_OTP_PER_CONN):
        request(host, f"YYYYY{i}")
    blocked, _ = request(host, good)  # even the right code waits: no oracle while blocked
    assert body(blocked).startswith("error:AT0028") and "refused for" in body(blocked)
    # the operator and other verbs keep working meanwhile
    assert body(handle(op, "scan")).startswith("data:")
    assert body(handle(Session(host), f"lookup:signing_publickey{ME}")).startswith("data:")
    clock.t += E.BAD_OTP_WINDOW_MS + 1
    ok, _ = request(host, good)
    assert json.loads(data(ok))["status"] == "pending"


@pytest.mark.parametrize("params, needle", [
    ({"otp": "A" * 33}, "too long"),
    ({"otp": "ABCDEF", "appName": "x" * 65}, "appName"),
    ({"otp": "ABCDEF", "deviceName": "a b"}, "deviceName"),
    ({"otp": "ABCDEF", "namespaces": {f"n{i}": "rw" for i in range(17)}}, "namespaces"),
    ({"otp": "ABCDEF", "namespaces": {"x": "admin"}}, "access must be r or rw"),
    ({"otp": "ABCDEF", "apkamPublicKey": "A" * 5000}, "apkamPublicKey"),
    ({"otp": "ABCDEF", "apkamPublicKey": "<script>"}, "apkamPublicKey"),
    ({}, "needs a one-time code"),
])
def test_bad_requests_name_the_problem(env, params, needle):
    host, _ = env
    base = {"appName": "a", "deviceName": "d", "namespaces": {"x": "rw"},
            "apkamPublicKey": "QUJD", "encryptedAPKAMSymmetricKey": "QUJD"}
    r = handle(Session(host), "enroll:request:" + json.dumps({**base, **params}))
    assert body(r).startswith("error:") and needle in body(r)


def test_huge_and_malformed_enroll_lines_are_refused_before_parsing(env):
    host, _ = env
    s = Session(host)
    r = handle(s, "enroll:request:" + "{" * 7000)
    assert "at most" in body(r) and not r.close
    assert body(handle(s, "enroll:request:[1,2]")).startswith("error:AT0003")
    assert body(handle(s, "enroll:list")).startswith("error:AT0401")
    assert body(handle(s, "enroll:approve:{}")).startswith("error:AT0401")
    op = cram(host)
    r = handle(op, "enroll:fetch:{}")
    assert body(r).startswith("error:AT0022") and "enrollmentId" in body(r) and not r.close
    assert data(handle(s, f"from:{ME}"))  # still served


def test_pending_requests_are_capped(env, monkeypatch):
    host, _ = env
    op = cram(host)
    monkeypatch.setattr(E, "MAX_PENDING", 3)
    for _ in range(3):
        enroll_pending(host, op)
    otp = data(handle(op, "otp:get"))
    r, _ = request(host, otp)
    assert "too many pending enrollment requests" in body(r)
    assert body(handle(op, "enroll:list")).startswith("data:")


def test_enrollments_survive_a_new_store_connection(tmp_path):
    store = Store(tmp_path / "atserver.db")
    store.add_hosted(ME, 0, SECRET)
    host = Host(ME, store, ServerConfig())
    op = cram(host)
    eid, _ = enroll_pending(host, op)
    otp = data(handle(op, "otp:get"))
    store.close()
    again = Store(tmp_path / "atserver.db")
    assert again.get_enrollment(ME, eid).state == "pending"
    assert again.consume_otp(ME, E.otp_digest(otp), host.now()) is not None
    assert again.consume_otp(ME, E.otp_digest(otp), host.now()) is None
    again.close()


def test_throttle_window_is_sliding():
    t = E.Throttle(limit=2, window_ms=100)
    t.failed(0)
    t.failed(50)
    assert t.blocked_for(60) == 40
    assert t.blocked_for(101) == 0


# --- srvd side (decision 0021): which live sessions a revocation ends --------------------------

def test_sessions_opened_before_a_revocation_end_others_stay():
    from noports.relay.revocation import LiveSession, parse_marker, sessions_to_end

    old = LiveSession("s1", frozenset({"@client", "@dev"}), 1000)
    new = LiveSession("s2", frozenset({"@client", "@dev"}), 5000)
    other = LiveSession("s3", frozenset({"@client", "@other"}), 1000)
    marker = parse_marker(json.dumps({"lastRevokedAt": 2000, "enrollmentId": "x"}))
    assert marker == 2000
    ended = sessions_to_end([old, new, other], {"@dev": marker, "@client": None}, {})
    assert ended == [("s1", "@dev revoked a device key")]
    # a marker that changed since the session was first checked ends it whatever the clocks say
    assert sessions_to_end([new], {"@dev": 3000}, {("s2", "@dev"): 2000}) == [
        ("s2", "@dev revoked a device key")]
    for bad in (None, "", "x" * 5000, "[]", '{"lastRevokedAt":"1"}', '{"lastRevokedAt":-1}'):
        assert parse_marker(bad) is None


def test_watcher_closes_and_survives_lookup_failures():
    from noports.relay.revocation import LiveSession, RevocationWatcher

    closed: list[tuple[str, str]] = []

    async def lookup(who: str) -> str | None:
        if who == "@broken":
            raise ConnectionError("down")
        return json.dumps({"lastRevokedAt": 10}) if who == "@dev" else None

    sessions = [LiveSession("a", frozenset({"@dev"}), 5),
                LiveSession("b", frozenset({"@broken", "@c"}), 5)]
    w = RevocationWatcher(lookup, lambda: sessions, lambda sid, r: closed.append((sid, r)))
    assert asyncio.run(w.check_once()) == ["a"]
    assert closed == [("a", "@dev revoked a device key")] and w.ended == 1


def test_a_failed_lookup_at_open_is_not_taken_for_no_marker():
    """An old marker (revoked long before the session opened) that could not be read on the
    first check must not end the session when a later check reads it; a marker that really
    appears (or changes) after that still does."""
    from noports.atclient.connection import AtProtocolError
    from noports.relay.revocation import LiveSession, RevocationWatcher

    state = {"down": True, "marker": json.dumps({"lastRevokedAt": 10})}
    closed: list[str] = []

    async def lookup(who: str) -> str | None:
        if who == "@none":
            raise AtProtocolError("AT0015", "no marker")
        if state["down"]:
            raise ConnectionError("atServer unreachable")
        return state["marker"]

    sessions = [LiveSession("s", frozenset({"@dev", "@none"}), 5000)]
    w = RevocationWatcher(lookup, lambda: sessions, lambda sid, r: closed.append(sid))
    assert asyncio.run(w.check_once()) == []          # @dev unknown, @none has no marker
    state["down"] = False
    assert asyncio.run(w.check_once()) == []          # the old marker is not a change
    assert asyncio.run(w.check_once()) == [] and closed == []
    state["marker"] = json.dumps({"lastRevokedAt": 20})  # revoked again: a real change
    assert asyncio.run(w.check_once()) == ["s"] and closed == ["s"]


def test_cli_names_what_is_missing(tmp_path, capsys):
    from noports import admin

    argv = ["enroll", "request", "@fleet", "--root", "127.0.0.1:1", "--device", "d1",
            "--keys-dir", str(tmp_path)]
    assert admin.main(argv) == 2
    assert "no pending enrollment: give the one-time code with --otp-file" in \
        capsys.readouterr().err
    code = tmp_path / "code"
    code.write_text("AB CD\n")
    assert admin.main([*argv, "--otp-file", str(code)]) == 2
    assert "one code (no spaces)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        admin.main(["enroll", "otp", "@fleet", "--root", "127.0.0.1:1", "--ttl", "3601"])
    assert "a code lives 1..3600 s" in capsys.readouterr().err
