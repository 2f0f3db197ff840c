"""The one wire layer: the reply framer, parse_error, and that the three edges agree on it."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from noports.atclient import ReplyReader
from noports.atclient import parse_error as client_parse_error
from noports.atprotocol.wire import (
    FramingError,
    Reply,
    ReplyFramer,
    WireError,
    parse_error,
)
from noports.atserver.wire import parse_reply


def kinds(replies: list[Reply]) -> list[tuple[str, str]]:
    return [(r.kind, r.text) for r in replies]


def frame(*chunks: bytes, max_reply: int = 1 << 20) -> tuple[list[Reply], bytes]:
    f = ReplyFramer(max_reply)
    out: list[Reply] = []
    for c in chunks:
        out += f.feed(c)
    return out, f.pending


# --- framing --------------------------------------------------------------------------------

@pytest.mark.parametrize("stream, want, pending", [
    (b"@", [], b"@"),  # a lone `@` could still become `@alice@`
    (b"@data:x\n@", [("prompt", "@"), ("data", "x")], b"@"),
    (b"data:x\n@alice@data:y\n@alice@",
     [("data", "x"), ("prompt", "@alice@"), ("data", "y"), ("prompt", "@alice@")], b""),
    (b"error:AT0015-key not found\n@", [("error", "AT0015-key not found")], b"@"),
    (b'notification: {"id":"1"}\nnotification: {"id":"2"}\n',
     [("notification", ' {"id":"1"}'), ("notification", ' {"id":"2"}')], b""),
    (b"data:proof:_s@alice:u\n@@alice@",  # `from` then pol's bare answer `@alice@`
     [("data", "proof:_s@alice:u"), ("prompt", "@"), ("prompt", "@alice@")], b""),
    (b"@127.0.0.1:25000\r\n@", [("prompt", "@"), ("other", "127.0.0.1:25000")], b"@"),
    (b"@null\r\n@", [("prompt", "@"), ("other", "null")], b"@"),
    (b"alice@data:x\n", [("data", "x")], b""),  # the rest of a prompt split off: stripped
    (b"\r\n\n\ndata: {}\n", [("data", " {}")], b""),  # blank lines carry nothing
    (b"@al", [], b"@al"),
    ("data:@alice🛠\n".encode(), [("data", "@alice🛠")], b""),
])
def test_framer(stream, want, pending):
    replies, left = frame(stream)
    assert kinds(replies) == want
    assert left == pending


def test_flush_prompt_takes_only_a_lone_at():
    f = ReplyFramer()
    assert f.feed(b"data:x\n@") == [Reply("data", "x", "data:x")]
    assert f.flush_prompt() == Reply("prompt", "@", "@")
    assert f.flush_prompt() is None
    f.feed(b"@al")
    assert f.flush_prompt() is None and f.pending == b"@al"


def test_a_name_longer_than_any_atsign_is_not_a_prompt():
    replies, left = frame(b"@" + b"x" * 300 + b"@data:x\n")
    assert kinds(replies)[0] == ("prompt", "@")
    assert kinds(replies)[1] == ("data", "x")  # the stray rest is stripped like Dart does
    assert left == b""


def test_bounded_buffer_refuses_with_a_clear_error_and_stays_refused():
    f = ReplyFramer(max_reply=1000)
    assert f.feed(b"data:" + b"a" * 900) == []
    with pytest.raises(FramingError, match="reply longer than 1000 bytes"):
        f.feed(b"a" * 200)
    assert f.pending == b""  # nothing is kept of a refused stream
    with pytest.raises(FramingError, match="out of step"):
        f.feed(b"\n@")


def test_a_long_reply_within_the_bound_is_fine():
    body = b"data:" + b"v" * 5000 + b"\n@"
    replies, _ = frame(*[body[i:i + 7] for i in range(0, len(body), 7)], max_reply=6000)
    assert kinds(replies) == [("data", "v" * 5000)]


_DEEP = '{"errorCode":' + "[" * 100_000 + "]" * 100_000 + "}"


# --- one parse_error --------------------------------------------------------------------------

@pytest.mark.parametrize("text, code, message", [
    ("AT0015-key not found : x@y does not exist", "AT0015", "key not found : x@y does not exist"),
    ("AT0026:enrollment_id: X is pending", "AT0026", "enrollment_id: X is pending"),
    ("AT0015 key not found", "AT0015", "key not found"),
    ("AT0015", "AT0015", ""),
    ('{"errorCode":"AT0003","errorDescription":"Invalid syntax"}', "AT0003", "Invalid syntax"),
    ('{"errorDescription":"no code"}', "", "no code"),
    ("something odd", "", "something odd"),
    ("{not json", "", "{not json"),
    ("[1,2]", "", "[1,2]"),
    (_DEEP, "", _DEEP),  # nesting deeper than json can parse: RecursionError, not a crash
], ids=lambda v: v[:40] if isinstance(v, str) else None)
def test_parse_error_never_invents_a_code(text, code, message):
    assert parse_error(text) == WireError(code, message)
    # the client's exception and the atServer's RemoteReply are the same parse
    err = client_parse_error(text)
    assert (err.code, err.message) == (code, message)
    r = parse_reply(f"error:{text}\n@")
    assert (r.code, r.message, r.ok) == (code, message, False)


# --- the edges agree --------------------------------------------------------------------------

class _Chunks:
    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = list(chunks)

    def recv(self, n: int) -> bytes:
        return self.chunks.pop(0) if self.chunks else b""


STREAMS = [
    b"data:hello\n@alice@",
    b"@alice@data:x\n@alice@",
    b'error:{"errorCode":"AT0401","errorDescription":"nope"}\n@',
    b"error:AT0015-key not found : a@b does not exist\n@",
    "data:é🛠 value\n@".encode(),
]


@pytest.mark.parametrize("stream", STREAMS)
def test_blocking_client_and_server_side_read_the_same_reply(stream):
    framed = next(r for r in ReplyFramer().feed(stream) if r.kind != "prompt")
    body = ReplyReader(_Chunks([stream])).read_reply("@")
    assert body == framed.line
    remote = parse_reply(stream.decode())
    if framed.kind == "data":
        assert remote.data == framed.text
    else:
        assert remote.code == parse_error(framed.text).code


def test_remote_error_is_sans_io_and_still_importable_from_s2s():
    from noports.atprotocol.errors import RemoteError
    from noports.atserver.s2s import RemoteError as ViaS2s
    assert ViaS2s is RemoteError
    code = ("import sys, noports.atprotocol.errors, noports.atprotocol.wire, "
            "noports.atprotocol.atsign; assert 'asyncio' not in sys.modules, 'asyncio'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# --- properties -------------------------------------------------------------------------------

_TOKENS = st.sampled_from([b"@", b"@alice@", b"@bob@", b"data:", b"error:", b"notification:",
                           b"\n", b"\r\n", b":", b" ", b"AT0015-", b"{", b"}", "é🛠".encode(),
                           b"\xf0\x9f", b"\xff", b"x", b"null"])
_STREAM = st.lists(st.one_of(_TOKENS, st.binary(max_size=8)), max_size=40).map(b"".join)


@settings(derandomize=True, max_examples=250, deadline=None)
@given(_STREAM, st.lists(st.integers(min_value=0, max_value=400), max_size=12))
def test_property_any_split_gives_the_same_replies(stream, cuts):
    points = sorted({c % (len(stream) + 1) for c in cuts})
    chunks = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    whole, left_whole = frame(stream)
    split, left_split = frame(*chunks)
    assert split == whole
    assert left_split == left_whole


@settings(derandomize=True, max_examples=250, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=20), st.integers(min_value=1, max_value=128))
def test_property_only_framing_error_is_ever_raised(chunks, bound):
    f = ReplyFramer(max_reply=bound)
    for c in chunks:
        try:
            out = f.feed(c)
        except FramingError:
            return
        assert all(r.kind in ("prompt", "data", "error", "notification", "other") for r in out)
        assert len(f.pending) <= bound


_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"),
                max_size=30)


@settings(derandomize=True, max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["data", "error", "notification"]), _TEXT,
                          st.sampled_from(["@", "@alice@", "@np_client@"])), max_size=8))
def test_property_what_a_server_writes_comes_back(replies):
    """``<kind>:<text>\\n<prompt>`` written by a server frames back to the same kinds/texts."""
    stream = b"@" + b"".join(f"{k}:{t}\n{p}".encode() for k, t, p in replies)
    got = [(r.kind, r.text) for r in frame(stream)[0] if r.kind != "prompt"]
    assert got == [(k, t) for k, t, _p in replies]
