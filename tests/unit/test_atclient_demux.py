"""The demultiplexer of the agent's single atServer connection (noports.atclient.mux.Demux).

Answers (``data:``/``error:``) go to the commands in the order they were sent; pushed
``notification:`` lines go to the monitor wherever they fall: between a command and its
answer, glued behind a prompt (the official server keeps prompts on monitor connections,
ours leaves them off), split anywhere by TLS. ``monitor`` answers only when it fails.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from noports.atclient.connection import AtProtocolError
from noports.atclient.mux import Answer, Demux, Pushed, Stray, answer_text
from noports.atprotocol.wire import FramingError, ReplyFramer


def run(demux: Demux, *chunks: bytes) -> list[tuple]:
    out = []
    for c in chunks:
        for ev in demux.feed(c):
            if isinstance(ev, Answer):
                out.append(("answer", ev.token, None if ev.reply is None else
                            (ev.reply.kind, ev.reply.text)))
            elif isinstance(ev, Pushed):
                out.append(("note", ev.reply.text.strip()))
            else:
                out.append(("stray", ev.reply.line))
    return out


def bytewise(data: bytes) -> list[bytes]:
    return [data[i:i + 1] for i in range(len(data))]


NOTE = b'notification: {"id":"n1"}\n'


@pytest.mark.parametrize("prompt", [b"", b"@alice@"])
@pytest.mark.parametrize("split", [False, True])
def test_a_notification_between_a_command_and_its_answer(prompt, split):
    d = Demux()
    d.expect("a")
    d.expect("b")
    stream = (NOTE + b"data:x\n" + prompt + NOTE.replace(b"n1", b"n2") + b"error:AT0015-key "
              b"not found\n" + prompt)
    chunks = bytewise(stream) if split else [stream]
    got = run(d, *chunks)
    assert got == [("note", '{"id":"n1"}'), ("answer", "a", ("data", "x")),
                   ("note", '{"id":"n2"}'), ("answer", "b", ("error", "AT0015-key not found"))]
    assert d.pending == []


def test_official_prompt_glued_in_front_of_the_next_notification():
    d = Demux()
    d.expect("noop")
    got = run(d, b"data:ok\n@alice@", b'notification: {"id":"x"}\n@alice@')
    assert got == [("answer", "noop", ("data", "ok")), ("note", '{"id":"x"}')]


def test_accepted_monitor_is_settled_by_the_next_answer():
    d = Demux()
    d.expect("mon", monitor=True)
    d.expect("probe")
    got = run(d, NOTE, b"data:ok\n")  # a replayed line, then the probe's answer
    assert got == [("note", '{"id":"n1"}'), ("answer", "mon", None),
                   ("answer", "probe", ("data", "ok"))]


def test_refused_monitor_takes_the_error_and_the_probe_its_own_answer():
    d = Demux()
    d.expect("mon", monitor=True)
    d.expect("probe")
    got = run(d, b"error:AT0401-Command cannot be executed without auth\ndata:ok\n")
    assert got == [("answer", "mon", ("error", "AT0401-Command cannot be executed without auth")),
                   ("answer", "probe", ("data", "ok"))]


def test_a_reply_nobody_asked_for_is_stray():
    d = Demux()
    assert run(d, b"data:surprise\n") == [("stray", "data:surprise")]
    d.expect("a")
    assert run(d, b"data:1\ndata:2\n") == [("answer", "a", ("data", "1")), ("stray", "data:2")]


def test_partial_line_waits_and_an_over_long_one_fails():
    d = Demux(ReplyFramer(1024))
    d.expect("a")
    assert run(d, b"data:abc") == []
    assert run(d, b"def\n") == [("answer", "a", ("data", "abcdef"))]
    with pytest.raises(FramingError):
        d.feed(b"notification: " + b"x" * 2048)


def test_drain_returns_the_commands_left_waiting():
    d = Demux()
    d.expect("a")
    d.expect("b")
    assert run(d, b"data:1\n") == [("answer", "a", ("data", "1"))]
    assert d.drain() == ["b"] and d.pending == []


def test_answer_text():
    from noports.atprotocol.wire import Reply
    assert answer_text(Reply("data", "x", "data:x"), "llookup:k", "p") == "x"
    assert answer_text(None, "monitor", "p") == ""
    with pytest.raises(AtProtocolError) as err:
        answer_text(Reply("error", "AT0015-key not found", ""), "llookup:k", "p")
    assert err.value.code == "AT0015"
    with pytest.raises(AtProtocolError, match="unexpected reply from p to 'llookup'"):
        answer_text(Reply("other", "null", "null"), "llookup:k", "p")


# --- property: any interleaving, any chunking ---------------------------------------------

TEXT = st.text(st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)),
               max_size=40).map(str.strip)
COMMAND = st.tuples(st.sampled_from(["data", "error"]), TEXT)


@st.composite
def conversations(draw):
    """(commands with answers, monitor positions, server byte stream, chunk cuts)."""
    cmds = draw(st.lists(COMMAND, min_size=0, max_size=12))
    monitor_at = draw(st.sets(st.integers(0, max(len(cmds) - 1, 0)))) if cmds else set()
    # after monitor the client's next command is its probe, `noop:0`: answered `data:ok`
    cmds = [("data", "ok") if i in monitor_at else c for i, c in enumerate(cmds)]
    prompt = draw(st.sampled_from(["", "@alice@", "@alice🛠@"]))
    notes_before = draw(st.lists(st.integers(0, 3), min_size=len(cmds) + 1,
                                 max_size=len(cmds) + 1))
    lines: list[str] = []
    expected_notes: list[str] = []
    n = 0

    def push(k: int) -> None:
        nonlocal n
        for _ in range(k):
            obj = json.dumps({"id": f"n{n}", "v": "é@:"}, ensure_ascii=False)
            lines.append(f"notification: {obj}\n")
            expected_notes.append(obj)
            n += 1

    for i, (kind, text) in enumerate(cmds):
        push(notes_before[i])
        lines.append(f"{kind}:{text}\n{prompt}")
    push(notes_before[-1])
    data = "".join(lines).encode()
    cuts = sorted(draw(st.sets(st.integers(0, max(len(data), 0)), max_size=8)))
    return cmds, monitor_at, data, cuts, expected_notes


@settings(max_examples=300, deadline=None)
@given(conversations())
def test_answers_in_order_and_every_notification_whatever_the_interleaving(conv):
    cmds, monitor_at, data, cuts, expected_notes = conv
    d = Demux()
    for i in range(len(cmds)):
        if i in monitor_at:  # the client sends monitor, then this command as its probe
            d.expect(("monitor", i), monitor=True)
        d.expect(i)
    chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    answers, notes = [], []
    for c in chunks:
        for ev in d.feed(c):
            assert not isinstance(ev, Stray), ev
            if isinstance(ev, Answer):
                answers.append((ev.token, None if ev.reply is None else
                                (ev.reply.kind, ev.reply.text)))
            else:
                notes.append(ev.reply.text.strip())
    want = []
    for i, (kind, text) in enumerate(cmds):
        if i in monitor_at:
            want.append((("monitor", i), None))
        want.append((i, (kind, text)))
    assert answers == want
    assert notes == expected_notes
    assert d.pending == []
