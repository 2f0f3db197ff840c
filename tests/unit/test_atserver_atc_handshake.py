"""The empty line official C clients (at_c) send after the `@` prompt of every connection.

at_c writes `\\r\\n` and waits for one reply before `from:`; the official atServer dispatches
the empty command and answers AT0003 `invalid command`. Sans-IO: bytes fed into a Session,
replies taken out, no sockets. Hostile: a stream of empty lines before authentication is
bounded (MAX_EMPTY_LINES_UNAUTH) and other clients keep being served.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest

from noports import crypto
from noports.atserver.host import Host, ServerConfig
from noports.atserver.session import MAX_EMPTY_LINES_UNAUTH, Reply, Session
from noports.atserver.store import Store

SECRET = "cram-" + uuid.uuid4().hex
OFFICIAL_EMPTY_REPLY = "error:AT0003-Exception: invalid command\n@"


@pytest.fixture()
def host(tmp_path):
    store = Store(tmp_path / "atserver.db")
    store.add_hosted("@alice", 0, SECRET)
    h = Host("@alice", store, ServerConfig())
    h.ensure_startup_keys()
    yield h
    store.close()


def replies(s: Session, data: bytes) -> list[str]:
    """Feed bytes; every reply the session produces (lines are handled as the edge does)."""
    s.feed(data)
    out: list[str] = []
    while (item := s.next_line()) is not None:
        reply = item if isinstance(item, Reply) else asyncio.run(s.handle(item))
        out.append(reply.text or "")
        if reply.close:
            out.append("<closed>")
            break
    return out


@pytest.mark.parametrize("data", [b"\r\n", b"\n", b"  \r\n", b"\t\n"])
def test_empty_line_gets_the_official_reply(host: Host, data: bytes) -> None:
    assert replies(Session(host), data) == [OFFICIAL_EMPTY_REPLY]


def test_crlf_split_across_writes_is_one_reply(host: Host) -> None:
    s = Session(host)
    assert replies(s, b"\r") == []
    assert replies(s, b"\n") == [OFFICIAL_EMPTY_REPLY]


def test_empty_line_then_cram_login_with_crlf(host: Host) -> None:
    """at_c's whole sequence (`\\r\\n`, `from:alice\\r\\n`, auth) on one session."""
    s = Session(host)
    assert replies(s, b"\r\n") == [OFFICIAL_EMPTY_REPLY]
    [challenge] = replies(s, b"from:alice\r\n")
    assert challenge.startswith("data:") and challenge.endswith("\n@")
    digest = crypto.cram_digest(SECRET, challenge[5:].split("\n")[0])
    assert replies(s, f"cram:{digest}\r\n".encode()) == ["data:success\n@alice@"]
    # authenticated: still the official reply, with the owner's prompt, and no limit
    out = replies(s, b"\r\n" * (MAX_EMPTY_LINES_UNAUTH + 5))
    assert len(out) == MAX_EMPTY_LINES_UNAUTH + 5
    assert set(out) == {"error:AT0003-Invalid syntax : invalid command\n@alice@"}


def test_many_empty_lines_before_auth_are_bounded(host: Host) -> None:
    s = Session(host)
    out = replies(s, b"\n" * 100_000)
    assert out[:MAX_EMPTY_LINES_UNAUTH] == [OFFICIAL_EMPTY_REPLY] * MAX_EMPTY_LINES_UNAUTH
    assert out[MAX_EMPTY_LINES_UNAUTH:] == [
        f"error:AT0003-Exception: more than {MAX_EMPTY_LINES_UNAUTH} empty lines before "
        "authentication; closing\n@", "<closed>"]
    assert s.next_line() is None  # the rest of the flood was dropped, not queued
    # another client is still served
    other = Session(host)
    assert replies(other, b"\r\n") == [OFFICIAL_EMPTY_REPLY]
    assert replies(other, b"from:@alice\n")[0].startswith("data:")
