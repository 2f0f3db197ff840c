"""The blocking atProtocol client's framing: replies, prompts, split reads, error formats."""

from __future__ import annotations

import socket

import pytest

from noports.atclient import (
    AtConnectError,
    AtProtocolError,
    AtTimeoutError,
    ReplyReader,
    parse_error,
)
from noports.atclient import connection as conn_mod
from noports.atclient.connection import strip_prompt


class FakeSock:
    """Scripted `recv`: returns the given chunks one per call; then EOF (or timeouts)."""

    def __init__(self, *chunks: bytes | str, then_timeout: bool = False) -> None:
        self.chunks = [c.encode() if isinstance(c, str) else c for c in chunks]
        self.then_timeout = then_timeout
        self.timeouts: list[float | None] = []
        self._timeout: float | None = 10.0

    def recv(self, n: int) -> bytes:
        if self.chunks:
            return self.chunks.pop(0)
        if self.then_timeout:
            raise TimeoutError("timed out")
        return b""

    def settimeout(self, t: float | None) -> None:
        self.timeouts.append(t)
        self._timeout = t

    def gettimeout(self) -> float | None:
        return self._timeout


def test_initial_prompt():
    r = ReplyReader(FakeSock("@"))
    assert r.read_prompt() == "@"


def test_initial_prompt_missing():
    with pytest.raises(AtProtocolError, match="did not greet"):
        ReplyReader(FakeSock("hello\n")).read_prompt()


def test_simple_reply_unauthenticated():
    r = ReplyReader(FakeSock("data:_abc@alice:123\n@"))
    assert r.read_reply("@") == "data:_abc@alice:123"


def test_reply_with_authenticated_prompt():
    r = ReplyReader(FakeSock("data:-1\n@alice@"))
    assert r.read_reply("@alice@") == "data:-1"


@pytest.mark.parametrize("chunks", [
    ["d", "ata:1", "2\n", "@al", "ice", "@"],
    ["data:12\n@alice@"],
    ["data:12", "\n", "@", "alice@"],
    ["data:12\n", "@alice@"],
    [b"data:1", b"2\n@alice", b"@"],
])
def test_split_reads(chunks):
    r = ReplyReader(FakeSock(*chunks))
    assert r.read_reply("@alice@") == "data:12"


def test_multibyte_utf8_split_across_reads():
    raw = "data:@alice🛠\n@".encode()
    cut = raw.index(b"\xf0") + 2  # in the middle of the emoji
    r = ReplyReader(FakeSock(raw[:cut], raw[cut:]))
    assert r.read_reply("@") == "data:@alice🛠"


def test_two_replies_in_one_read_are_kept_apart():
    r = ReplyReader(FakeSock("data:one\n@alice@data:two\n@alice@"))
    assert r.read_reply("@alice@") == "data:one"
    assert r.read_reply("@alice@") == "data:two"


def test_prompt_depends_on_body():
    """cram success switches the prompt from '@' to '@alice@' in the same reply."""
    sock = FakeSock("data:success\n@", "alice@")
    r = ReplyReader(sock)
    body = r.read_reply(lambda b: "@alice@" if b == "data:success" else "@")
    assert body == "data:success"
    assert sock.chunks == []  # the whole prompt was consumed


def test_short_prompt_accepted_after_grace():
    """A server that answers with '@' where we expected '@alice@' does not make us hang."""
    sock = FakeSock("error:AT0401-Exception: pkam authentication failed\n@", then_timeout=True)
    r = ReplyReader(sock)
    assert r.read_reply("@alice@").startswith("error:AT0401")
    assert conn_mod.PROMPT_GRACE in sock.timeouts  # waited briefly, then restored
    assert sock.timeouts[-1] == 10.0


def test_other_complete_prompt_accepted():
    r = ReplyReader(FakeSock("data:ok\n@bob@data:next\n@bob@"))
    assert r.read_reply("@") == "data:ok"
    assert r.read_reply("@") == "data:next"


def test_stray_prompt_in_front_is_stripped():
    r = ReplyReader(FakeSock("@alice@data:x\n@alice@"))
    assert r.read_reply("@alice@") == "data:x"


@pytest.mark.parametrize("body, expected", [
    ("@alice@data:x", "data:x"),
    ("alice@data:x", "data:x"),
    ("data:x@y:z", "data:x@y:z"),
    ("error:AT0015-key not found : a@b does not exist", "error:AT0015-key not found : a@b "
                                                       "does not exist"),
    ("@bob@", "@bob@"),
])
def test_strip_prompt(body, expected):
    assert strip_prompt(body) == expected


def test_crlf_reply_from_directory():
    r = ReplyReader(FakeSock("127.0.0.1:25000\r\n@"))
    assert r.read_reply("@") == "127.0.0.1:25000"


def test_eof_is_connect_error():
    with pytest.raises(AtConnectError, match="closed the connection"):
        ReplyReader(FakeSock("data:1")).read_reply("@")


def test_timeout_is_timeout_error():
    with pytest.raises(AtTimeoutError):
        ReplyReader(FakeSock(then_timeout=True)).read_reply("@")


def test_read_line_for_monitor():
    r = ReplyReader(FakeSock('notification: {"id":"1"}\nnotifi', 'cation: {"id":"2"}\n'))
    assert r.read_line() == 'notification: {"id":"1"}'
    assert r.read_line() == 'notification: {"id":"2"}'


# --- error formats ------------------------------------------------------------------------

@pytest.mark.parametrize("text, code, message", [
    ("AT0015-key not found : foo@alice does not exist in keystore", "AT0015",
     "key not found : foo@alice does not exist in keystore"),
    ("AT0401-Exception: Authentication Failed", "AT0401", "Exception: Authentication Failed"),
    ("AT0026:enrollment_id: X is pending", "AT0026", "enrollment_id: X is pending"),
    ('{"errorCode":"AT0015","errorDescription":"key not found : x@y does not exist"}',
     "AT0015", "key not found : x@y does not exist"),
    ('{"errorCode":"AT0003","errorDescription":"Invalid syntax"}', "AT0003", "Invalid syntax"),
    ("something odd", "", "something odd"),
    ("{not json", "", "{not json"),
])
def test_parse_error(text, code, message):
    err = parse_error(text)
    assert (err.code, err.message) == (code, message)
    assert isinstance(err, AtProtocolError)


def test_error_str_includes_code():
    assert str(parse_error("AT0015-key not found")) == "AT0015: key not found"


# --- AtConnection.command over a socketpair (no TLS needed for the framing) ---------------

class _PlainConnection(conn_mod.AtConnection):
    def __init__(self, sock: socket.socket) -> None:  # bypass TLS connect
        self.host, self.port, self.timeout, self.atsign = "test", 1, 2.0, None
        self._sock = sock
        self._reader = ReplyReader(sock, peer="test:1")
        self._reader.read_prompt()


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    a.settimeout(2)
    b.settimeout(2)
    yield a, b
    a.close()
    b.close()


def test_command_returns_text_after_data(pair):
    client, server = pair
    server.sendall(b"@")
    c = _PlainConnection(client)
    server.sendall(b"data:hello world\n@")
    assert c.command("lookup:x@y") == "hello world"
    assert server.recv(100) == b"lookup:x@y\n"


def test_command_raises_legacy_and_json_errors(pair):
    client, server = pair
    server.sendall(b"@")
    c = _PlainConnection(client)
    server.sendall(b"error:AT0015-key not found : x@y does not exist\n@")
    with pytest.raises(AtProtocolError) as ei:
        c.command("llookup:x@y")
    assert ei.value.code == "AT0015"
    server.sendall(b'error:{"errorCode":"AT0003","errorDescription":"Invalid syntax"}\n@')
    with pytest.raises(AtProtocolError) as ei:
        c.command("bogus")
    assert ei.value.code == "AT0003"


def test_command_rejects_newlines(pair):
    client, server = pair
    server.sendall(b"@")
    c = _PlainConnection(client)
    with pytest.raises(ValueError):
        c.command("update:a@b x\ny")


def test_cram_switches_prompt(pair):
    client, server = pair
    server.sendall(b"@")
    c = _PlainConnection(client)
    server.sendall(b"data:_s@alice:proof\n@")
    server.sendall(b"data:success\n@alice@")
    c.authenticate_cram("alice", "secret")
    assert c.atsign == "@alice"
    sent = server.recv(1000).decode()
    assert sent.startswith("from:@alice\n")
    from noports.crypto import cram_digest
    assert f"cram:{cram_digest('secret', '_s@alice:proof')}\n" in sent
    server.sendall(b"data:-1\n@alice@")
    assert c.command("update:privatekey:at_pkam_publickey K") == "-1"


def test_connect_refused_is_clear():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(AtConnectError, match="connection refused"):
        conn_mod.AtConnection("127.0.0.1", port, timeout=2)


def test_unresolvable_host_is_clear():
    with pytest.raises(AtConnectError, match="cannot resolve"):
        conn_mod.AtConnection("no-such-host.invalid", 1, timeout=2)
