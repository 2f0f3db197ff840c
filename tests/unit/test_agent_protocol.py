"""The connector <-> agent protocol and the agent directory rule, pure (noports.agent)."""

from __future__ import annotations

import contextlib
import os
import stat

import pytest
from hypothesis import given
from hypothesis import strategies as st

from noports.agent import paths
from noports.agent import protocol as proto


def test_request_round_trip() -> None:
    line = proto.encode_request("open", ["-f", "@a", "-t", "@b"], "/home/u")
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    req = proto.parse_request(line[:-1])
    assert req == proto.Request("open", ["-f", "@a", "-t", "@b"], "/home/u")


@pytest.mark.parametrize("line, why", [
    (b"not json", "not a JSON line"),
    (b"[1]", "not a JSON object"),
    (b'{"v": 2, "op": "open"}', "unsupported protocol version"),
    (b'{"v": 1, "op": "rm -rf"}', "unknown op"),
    (b'{"v": 1, "op": "open", "argv": "-f @a"}', "argv must be a list"),
    (b'{"v": 1, "op": "open", "argv": [1]}', "argv items must be strings"),
    (b'{"v": 1, "op": "open", "argv": ["a\\u0000b"]}', "without NUL"),
    (b'{"v": 1, "op": "open", "argv": [], "cwd": "rel"}', "cwd must be an absolute path"),
    (b'{"v": 1, "op": "open", "argv": ' + str(["x"] * 300).replace("'", '"').encode() + b"}",
     "at most 256"),
    (b"\xff\xfe", "not a JSON line"),
])
def test_bad_requests_name_what_is_wrong(line: bytes, why: str) -> None:
    with pytest.raises(proto.ProtocolError, match=why):
        proto.parse_request(line)


def test_line_buffer_cuts_partial_input_and_bounds_lines() -> None:
    buf = proto.LineBuffer(limit=10)
    assert buf.feed(b"abc") == []
    assert buf.feed(b"\nde\nf") == [b"abc", b"de"]
    assert buf.feed(b"g\n") == [b"fg"]
    with pytest.raises(proto.ProtocolError, match="longer than 10 bytes"):
        buf.feed(b"x" * 11)  # refused before any newline arrives: the buffer stays bounded
    with pytest.raises(proto.ProtocolError, match="longer than 10 bytes"):
        proto.LineBuffer(limit=10).feed(b"y" * 20 + b"\n")


@given(st.binary(max_size=300), st.integers(min_value=1, max_value=40))
def test_line_buffer_never_holds_more_than_its_limit(data: bytes, limit: int) -> None:
    buf = proto.LineBuffer(limit=limit)
    try:
        for i in range(0, len(data), 7):
            for line in buf.feed(data[i:i + 7]):
                assert len(line) <= limit and b"\n" not in line
    except proto.ProtocolError:
        return
    assert len(buf.buf) <= limit


@given(st.binary(max_size=200))
def test_parse_request_only_raises_protocol_error(line: bytes) -> None:
    with contextlib.suppress(proto.ProtocolError):
        proto.parse_request(line)


def test_replies_round_trip_and_are_checked() -> None:
    r = proto.parse_reply(proto.encode_error("relay: relay @r did not answer", 5)[:-1])
    assert (r.kind, r.text, r.exit_code) == ("error", "relay: relay @r did not answer", 5)
    ok = proto.parse_reply(proto.encode_ok(setup_s=0.05)[:-1])
    assert ok.kind == "ok" and ok.info == {"setup_s": 0.05}
    assert proto.parse_reply(proto.encode_warning("key changed")[:-1]).text == "key changed"
    with pytest.raises(proto.ProtocolError, match="unknown reply kind"):
        proto.parse_reply(b'{"t": "shell"}')
    with pytest.raises(proto.ProtocolError, match="exit code 0"):
        proto.parse_reply(b'{"t": "error", "text": "x", "exit": 0}')
    with pytest.raises(proto.ProtocolError, match="longer than"):
        proto.encode_ok(blob="x" * proto.MAX_LINE)


def _st(mode: int, uid: int) -> os.stat_result:
    return os.stat_result((mode, 0, 0, 1, uid, 0, 0, 0, 0, 0))


def test_agent_directory_must_be_private() -> None:
    assert paths.check_private(_st(stat.S_IFDIR | 0o700, 1000), 1000) is None
    assert "owned by uid 0" in paths.check_private(_st(stat.S_IFDIR | 0o700, 0), 1000)
    assert "0750" in paths.check_private(_st(stat.S_IFDIR | 0o750, 1000), 1000)
    assert "not a directory" in paths.check_private(_st(stat.S_IFREG | 0o600, 1000), 1000)


def test_agent_directory_env_override(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv(paths.ENV_DIR, str(tmp_path / "ag"))
    assert paths.default_dir() == str(tmp_path / "ag")
    d = paths.ensure_dir(paths.default_dir())
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    os.chmod(d, 0o755)
    with pytest.raises(paths.AgentDirError, match="lets others in"):
        paths.ensure_dir(d)


# --- the connector's lean side (decision 0029): same bytes as json, fewer imports -------------

@given(st.lists(st.text(max_size=40), max_size=8), st.text(max_size=40))
def test_encode_request_is_byte_identical_to_json(argv: list[str], cwd: str) -> None:
    import json
    want = json.dumps({"v": proto.VERSION, "op": "open", "argv": argv, "cwd": cwd},
                      separators=(",", ":")).encode() + b"\n"
    assert proto.encode_request("open", argv, cwd) == want


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20)
                    | st.floats(allow_nan=False),
                    lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12))
def test_fast_loads_reads_what_json_reads(value: object) -> None:
    import json
    for text in (json.dumps(value), json.dumps(value, indent=1) + "\n ",
                 json.dumps(value, ensure_ascii=False)):
        assert proto._fast_loads(text) == json.loads(text)


@pytest.mark.parametrize("text", ["", "{", '{"t": "ok"} x', "\ufeff{}", '{"a": NaN',
                                  '{"a": "\x01"}', "[1,]"])
def test_fast_loads_fails_as_json_does(text: str) -> None:
    import json
    with pytest.raises(ValueError) as fast:
        proto._fast_loads(text)
    with pytest.raises(ValueError) as slow:
        json.loads(text)
    assert str(fast.value) == str(slow.value)


def test_connector_hot_path_imports_no_python_layers() -> None:
    """What a connector run loads on its way to a running agent: not socket, json, re,
    collections, enum, typing (each import is paid once per host per run)."""
    import ast
    import subprocess
    import sys
    code = ("import sys\n"
            "from noports.agent import connect, protocol as proto\n"
            "a, b = connect._socket.socketpair()\n"
            "r, w = connect.os.pipe()\n"
            "connect.send_fds(a, proto.encode_request('open', ['-q'], '/'), [r])\n"
            "data, fds = connect.recv_fds(b, 65536, 1)\n"
            "assert proto.parse_request(data[:-1]).argv == ['-q'] and len(fds) == 1\n"
            "connect.os.write(w, b'x'); assert connect.os.read(fds[0], 1) == b'x'\n"
            "reply = proto.parse_reply(b'{\"t\":\"ok\",\"setup_s\":0.1,\"steps\":{\"a\":1}}')\n"
            "assert reply.kind == 'ok' and reply.info['steps'] == {'a': 1}\n"
            "print(repr(sorted(sys.modules)))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    loaded = set(ast.literal_eval(out))
    assert {"noports.agent.connect", "_socket", "_json"} <= loaded
    assert not {"socket", "json", "re", "collections", "enum", "typing", "selectors",
                "array"} & loaded, sorted(loaded)
