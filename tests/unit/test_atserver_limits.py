"""Hostile input into the sans-IO session: line limits before parsing, pre-auth verbs, client
regexes on RE2, bounded integers, notification ids owned by their sender, secrets scrubbed
from the SQLite file. Each hostile case also checks that another client is still served."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from noports import crypto
from noports.atserver import clientregex
from noports.atserver.host import Host, ServerConfig
from noports.atserver.session import VERBS, Session, classify
from noports.atserver.store import Store
from noports.atserver.wire import RemoteReply

SECRET = "cram-" + uuid.uuid4().hex


class FakeRemote:
    async def request(self, me, other, line, *, handshake, timeout=10.0):
        return RemoteReply(code="AT0015", message="nope")

    async def verify_pol(self, me, from_atsign, cookie, proof):
        return True


async def _nosleep(_s: float) -> None:
    return None


@pytest.fixture()
def host(tmp_path):
    store = Store(tmp_path / "atserver.db")
    store.add_hosted("@alice", 0, SECRET)
    h = Host("@alice", store, ServerConfig(), remote=FakeRemote(), sleep=_nosleep)
    h.ensure_startup_keys()
    yield h
    store.close()


def run(coro):
    return asyncio.run(coro)


def handle(s: Session, line: str):
    return run(s.handle(line))


def body(reply) -> str:
    return reply.text.split("\n", 1)[0]


def owner(host: Host) -> Session:
    s = Session(host)
    ch = body(handle(s, "from:@alice"))[5:]
    assert body(handle(s, "cram:" + crypto.cram_digest(SECRET, ch))) == "data:success"
    return s


def pol(host: Host, atsign: str) -> Session:
    s = Session(host)
    handle(s, f"from:{atsign}")
    assert handle(s, "pol").text == f"{atsign}@"
    return s


def served(host: Host) -> None:
    """Another (legitimate) client is still served."""
    s = owner(host)
    assert body(handle(s, "noop:0")) == "data:ok"
    assert body(handle(Session(host), "info")).startswith("data:{")


def drain(s: Session) -> list:
    out = []
    while (item := s.next_line()) is not None:
        out.append(item)
    return out


# --- framing and line limits -------------------------------------------------------------------

def test_framing_splits_lines_across_feeds(host):
    s = Session(host)
    s.feed(b"no")
    assert s.next_line() is None
    s.feed(b"op:0\r\n\ninfo\nfr")
    noop, empty, info = drain(s)  # an empty line is answered as the official server does
    assert (noop, info) == ("noop:0", "info")
    assert empty.text == "error:AT0003-Exception: invalid command\n@" and not empty.close
    s.feed(b"om:@alice\n")
    assert drain(s) == ["from:@alice"]


def test_unauthenticated_line_limit_refuses_before_parsing(host):
    s = Session(host)
    s.feed(b"stats:" + b"1," * 100_000)  # 200 KB, no newline yet: refused on size alone
    [r] = drain(s)
    assert r.close and body(r).startswith("error:AT0005")
    assert "8192 bytes before authentication (--max-unauth-line)" in r.text
    served(host)


def test_unauthenticated_long_complete_line_refused_and_closed(host):
    s = Session(host)
    s.feed(b"notify:all:" + b"a," * 5000 + b":key\n")
    [r] = drain(s)
    assert r.close and "--max-unauth-line" in r.text
    served(host)


def test_authenticated_connection_gets_the_big_limit(host):
    s = owner(host)
    value = "v" * 50_000
    s.feed(f"update:public:big@alice {value}\n".encode())
    [line] = drain(s)
    assert body(handle(s, line)).startswith("data:")
    assert body(handle(Session(host), "lookup:big@alice")) == "data:" + value
    s.feed(b"x" * (host.config.max_buffer + 1))
    [r] = drain(s)
    assert r.close and "(--max-buffer)" in r.text


def test_invalid_utf8_line_is_an_error_not_a_close(host):
    s = Session(host)
    s.feed(b"\xff\xfe\ninfo\n")
    r, line = drain(s)
    assert body(r).startswith("error:AT0003") and not r.close
    assert line == "info"


def test_owner_verbs_refused_before_parse_when_unauthenticated(host):
    s = Session(host)
    for line in ["stats:" + "1," * 3000, "notify:all:" + "a," * 3000 + ":key",
                 "update:bad syntax", "monitor (a", "sync:from:x"]:
        r = handle(s, line)
        assert body(r) == "error:AT0401-Exception: Command cannot be executed without auth", line
        assert not r.close
    served(host)


def test_per_verb_line_limit_names_the_verb_and_limit(host):
    s = owner(host)
    r = handle(s, "stats:" + "1," * 1000)
    assert body(r).startswith("error:AT0003")
    assert "a stats request is at most 1024 bytes, this one has 2006" in r.text
    assert not r.close
    r = handle(s, "noop:" + "9" * 5000)
    assert "a noop request is at most 256 bytes" in r.text and not r.close
    assert body(handle(s, "noop:0")) == "data:ok"


def test_verb_table_is_explicit_and_classify_matches_the_grammar():
    from noports.atprotocol import grammar

    def dispatch(line: str) -> str:  # the grammar's own accept order (docs/reference/atprotocol.md#command-dispatch step 3)
        c = grammar.convert_command(line)
        return next(v for v, accept in grammar._HANDLERS if accept(c))

    for line in ["from:@a", "cram:x", "pkam:x", "pol", "update:public:k@a v",
                 "update:meta:k@a:ttl:1", "update:json:{}", "llookup:k@a", "plookup:k@a",
                 "lookup:k@a", "scan", "scan x", "delete:k@a", "stats", "stats:3",
                 "config:block:show", "monitor", "notify:@b:key", "notify:list",
                 "notify:status:1", "notify:fetch:1", "notify:remove:1", "notify:all:@b:key",
                 "sync:from:1:limit:1", "batch:[]", "info", "info:brief", "noop:0",
                 "enroll:request:{}", "otp:get", "keys:get:x"]:
        verb = dispatch(line)
        assert classify(line) == verb, line
        assert verb in VERBS
    assert classify("bogus") is None


# --- client regexes ----------------------------------------------------------------------------

def test_catastrophic_pattern_answers_and_others_are_served(host):
    s = owner(host)
    for i in range(20):
        handle(s, f"update:public:{'a' * 40}{i}@alice v")
    anon = Session(host)
    r = handle(anon, "scan (.+)+(.+)+X")
    assert r.text == "data:[]\n@"
    r = handle(anon, r"scan (a+)+\d+@alice$")
    assert len(json.loads(body(r)[5:])) == 20
    served(host)


@pytest.mark.parametrize("pattern, why", [
    (r"(a)\1", "backreferences are not supported"),
    (r"(?=a)b", "lookahead/lookbehind is not supported"),
    (r"(?<!a)b", "lookahead/lookbehind is not supported"),
    ("x{1001}", "repetition counts above 1000 are not supported"),
    ("((a{100}){100})", "repetition counts above 1000 are not supported"),
    ("(", "not a valid regular expression"),
])
def test_patterns_re2_cannot_take_are_refused_by_name(host, pattern, why):
    s = owner(host)
    for line in [f"scan {pattern}", f"monitor {pattern}", f"sync:from:-1:limit:5:{pattern}"]:
        r = handle(s, line)
        assert body(r).startswith("error:AT0022"), (line, r.text)
        assert why in r.text and not r.close
        assert not s.monitoring
    r = handle(s, f"notify:list:{pattern}")
    assert body(r).startswith("error:AT0022") and why in r.text
    served(host)


def test_dart_semantics_kept():
    rx = clientregex.compile_client(r"^phone\.wavi$")
    assert clientregex.search(rx, "phone.wavi@alice") is False
    assert clientregex.search(rx, "phone.wavi")
    assert clientregex.search(clientregex.compile_client(r"a\sb"), "a\u00a0b")  # Dart \s
    assert not clientregex.search(clientregex.compile_client(r"\w"), "\u00e9")  # ASCII \w
    assert not clientregex.search(clientregex.compile_client("ABC"), "abc")  # case-sensitive
    assert clientregex.search(clientregex.compile_client("[]a]"), "]")  # JS: ']' first literal


# --- no traceback for odd numbers --------------------------------------------------------------

@pytest.mark.parametrize("line, code, text", [
    ("noop:" + "9" * 200, "AT0022", "noop delayMillis must be an integer"),
    ("scan x{99999999999}", "data", ""),
    ("notify:ttln:18446744073709551616:@bob:key", "AT0022", "ttln 18446744073709551616 is out"),
    ("sync:from:99999999999999999999999:limit:5", "AT0022", "sync from commit id"),
    ("sync:from:1:limit:99999999999999999999999", "AT0022", "sync limit"),
    ("update:ttl:18446744073709551616:public:x@alice v", "AT0003", "TTL"),
    ("notify:ttl:18446744073709551616:@bob:key", "AT0003", "TTL"),
])
def test_huge_numbers_get_an_error_reply_not_a_traceback(host, caplog, line, code, text):
    s = owner(host)
    r = handle(s, line)
    assert not r.close, r.text
    if code == "data":
        assert body(r).startswith("data:")
    else:
        assert body(r).startswith(f"error:{code}") and text in r.text, r.text
    assert "AT0011" not in r.text
    assert not [rec for rec in caplog.records if rec.levelname == "ERROR"]
    r = handle(s, "monitor:99999999999999999999")
    assert r.text is None and s.monitoring
    served(host)


# --- notification ids belong to their sender ---------------------------------------------------

def test_notification_id_cannot_be_taken_over(host):
    bob = pol(host, "@bob")
    assert body(handle(bob, "notify:id:n1:@alice:msg.app@bob:hello")) == "data:success"
    attacker = pol(host, "@attacker")
    r = handle(attacker, "notify:id:n1:@alice:msg.app@attacker:evil")
    assert body(r).startswith("error:AT0009") and "n1 is already used" in r.text
    me = owner(host)
    # the owner's own notify cannot reuse it either (kind or sender differ)
    assert body(handle(me, "notify:id:n1:@alice:self.app@alice:x")).startswith("error:AT0009")
    assert body(handle(me, "notify:id:n1:@bob:out.app@alice:x")).startswith("error:AT0009")
    got = json.loads(body(handle(me, "notify:fetch:n1"))[5:])
    assert got["fromAtSign"] == "@bob" and got["value"] == "hello"
    # bob's retry of the same notification is still accepted (at-least-once delivery)
    assert body(handle(bob, "notify:id:n1:@alice:msg.app@bob:hello")) == "data:success"
    assert body(handle(attacker, "notify:id:n2:@alice:msg.app@attacker:ok")) == "data:success"
    served(host)


# --- secrets scrubbed from the file -------------------------------------------------------------

def test_cram_secret_gone_from_db_bytes_after_activation(host):
    db = host.store.path
    files = [db, db.with_name(db.name + "-wal")]

    def raw() -> bytes:
        return b"".join(f.read_bytes() for f in files if f.exists())

    assert SECRET.encode() in raw()  # the check can fail: the secret is there before
    s = owner(host)
    pub, _priv = crypto.generate_rsa_keypair()
    assert body(handle(s, f"update:privatekey:at_pkam_publickey {pub}")) == "data:-1"
    assert body(handle(s, "delete:privatekey:at_secret")) == "data:-1"
    assert SECRET.encode() not in raw()
    assert body(handle(Session(host), "from:@alice")).startswith("data:")


# --- property: random bytes never raise, one reply per line ------------------------------------

_HOST_CACHE: dict[str, Host] = {}

chunks = st.lists(st.one_of(
    st.binary(max_size=64),
    st.sampled_from([b"\n", b"noop:0\n", b"from:@alice\n", b"pol\n", b"scan (.+)+X\n",
                     b"stats:1,1\n", b"notify:list:(?=a)\n", b"\xff\n", b"info\n",
                     b"x" * 9000, b"@exit\n", b"monitor\n", b"noop:" + b"9" * 40 + b"\n"]),
), max_size=12)


@settings(derandomize=True, max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(state=st.sampled_from(["none", "owner", "pol"]), data=chunks)
def test_random_bytes_never_raise_and_get_one_reply_per_line(host, state, data):
    async def go() -> None:
        s = Session(host, emit=lambda _line: None)
        if state == "owner":
            ch = (await s.handle("from:@alice")).text.split("\n")[0][5:]
            await s.handle("cram:" + crypto.cram_digest(SECRET, ch))
        elif state == "pol":
            await s.handle("from:@good")
            await s.handle("pol")
        for chunk in data:
            s.feed(chunk)
            while (item := s.next_line()) is not None:
                reply = item if not isinstance(item, str) else await s.handle(item)
                if reply.text is None:
                    assert reply.close or s.monitoring
                else:
                    b, _prompt = reply.text.rsplit("\n", 1)
                    assert b.startswith(("data:", "error:")), reply.text[:200]
                    assert "AT0011" not in b, b
                if reply.close:
                    s.close()
                    return
        s.close()

    run(go())


def test_deleted_private_key_bytes_are_zeroed_in_the_file(tmp_path):
    store = Store(tmp_path / "atserver.db")
    secret = "priv-" + uuid.uuid4().hex * 4
    store.put("@alice", "privatekey:other", "keep", {}, commit=False)
    store.put("@alice", "privatekey:gone", secret, {}, commit=False)
    store.scrub()
    assert secret.encode() in store.path.read_bytes()
    store.delete("@alice", "privatekey:gone", commit=False)
    store.scrub()
    wal = store.path.with_name(store.path.name + "-wal")
    assert secret.encode() not in store.path.read_bytes()
    assert not wal.exists() or secret.encode() not in wal.read_bytes()
    assert store.get("@alice", "privatekey:other").value == "keep"
    store.close()


def test_fan_out_verbs_are_capped(host):
    s = owner(host)
    many = ",".join(f"@r{i}" for i in range(257))
    r = handle(s, f"notify:all:{many}:key.app:v")
    assert body(r).startswith("error:AT0022") and "at most 256 per request" in r.text
    items = json.dumps([{"id": i, "command": "noop:0"} for i in range(1001)])
    r = handle(s, f"batch:{items}")
    assert body(r).startswith("error:AT0022") and "at most 1000" in r.text
    served(host)


def test_slow_to_parse_line_does_not_hold_the_loop(host):
    """notify:all's grammar is the slowest (super-linear): it is parsed off the event loop."""
    s = owner(host)
    ticks = 0

    async def ticker(stop: asyncio.Event) -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            await asyncio.sleep(0)

    async def go() -> str:
        stop = asyncio.Event()
        t = asyncio.create_task(ticker(stop))
        await asyncio.sleep(0)
        start = ticks
        r = await s.handle("notify:all:" + ",a" * 600)
        during = ticks - start
        stop.set()
        await t
        assert during > 1, "the loop did not run while the line was parsed"
        return r.text

    text = run(go())
    assert text.startswith(("data:", "error:"))
    served(host)
