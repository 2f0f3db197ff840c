"""Official peers against our programs (docs/official-peers.md).

1. at_c (the official C SDK, used by the C sshnpd and by embedded clients) logs in to our
   atServer: its exact byte sequence is replayed over real TLS, one ``sendall`` per write
   at_c makes (``connection.c`` connect, ``atclient_pkam_authenticate``): read the ``@``
   prompt, ``\\r\\n`` then one read, ``from:<atsign without @>\\r\\n``, ``pkam:<sig>\\r\\n``
   with the challenge signed SHA256withRSA by the official demo .atKeys. The root lookup is
   replayed the same way against our directory. Hostile: an empty-line flood before auth is
   cut at the limit and other clients are still served.
2. ``sshnp`` against a daemon that answers as official daemons do (no ``hostKeys``, no
   ``npCipher``, ``ephemeralPrivateKey: null``): our sshnpd with its hidden, test-only
   ``--official-reply`` switch. One test per output mode (exec with ``-u``, ``-x``,
   ``--stdio``, fixed ``-l`` local port).
"""

from __future__ import annotations

import shlex
import socket
import ssl
import subprocess
from pathlib import Path

import pytest
from plane_harness import DEMO_ATKEYS, Plane
from test_client_e2e import DEV, DEVICE, PY, Env

from noports import crypto
from noports.atserver.session import MAX_EMPTY_LINES_UNAUTH
from noports.keys.atkeys import load_atkeys
from noports.keys.ca import client_context
from noports.keys.onboarding import activate

pytestmark = [pytest.mark.integration]

ALICE = "@alice\U0001f6e0"  # an official demo atSign (emoji U+1F6E0), with its .atKeys
EMPTY_REPLY = b"error:AT0003-Exception: invalid command\n@"


# --- 1. at_c's login, byte for byte -------------------------------------------------------

@pytest.fixture(scope="module")
def plane(tmp_path_factory):
    p = Plane(tmp_path_factory.mktemp("atc"))
    p.start_directory()
    secret = crypto.generate_cram_secret()
    p.start_atserver("s1", {ALICE: secret})
    ctx = client_context(p.tls.ca_cert)
    assert p.directory is not None
    keys = load_atkeys(DEMO_ATKEYS / f"{ALICE}_key.atKeys")
    activate(ALICE, secret, (p.directory.host, p.directory.port), ctx, keys=keys)
    yield p, ctx, keys
    p.stop()


def _tls(ctx: ssl.SSLContext, host: str, port: int) -> ssl.SSLSocket:
    raw = socket.create_connection((host, port), timeout=10)
    return ctx.wrap_socket(raw, server_hostname=host)


def _read_reply(s: ssl.SSLSocket) -> bytes:
    """at_c's atclient_connection_send read loop: recv until a chunk holds `\\n`."""
    buf = b""
    while b"\n" not in buf:
        chunk = s.recv(4096)
        assert chunk, f"connection closed; got {buf!r}"
        buf += chunk
    return buf


def _connect_like_atc(ctx: ssl.SSLContext, host: str, port: int) -> tuple[ssl.SSLSocket, bytes]:
    """at_c connection.c: one read (the prompt), one write `\\r\\n`, ONE read (the reply)."""
    s = _tls(ctx, host, port)
    assert s.recv(256) == b"@"
    s.sendall(b"\r\n")
    first = s.recv(256)
    assert first.endswith(b"@"), f"reply not framed in one read: {first!r}"
    return s, first


def _atc_login(plane, pkam_line) -> tuple[bytes, bytes, bytes]:
    p, ctx, keys = plane
    d = p.directory
    bare = ALICE[1:].encode()
    root, first = _connect_like_atc(ctx, d.host, d.port)
    with root:
        assert first == b"null\r\n@"
        root.sendall(bare + b"\r\n")
        addr = _read_reply(root).split(b"\r\n")[0].split(b"\n")[0].decode()
    host, port = addr.rsplit(":", 1)
    s, empty = _connect_like_atc(ctx, host, int(port))
    with s:
        s.sendall(b"from:" + bare + b"\r\n")
        challenge = _read_reply(s)
        assert challenge.startswith(b"data:") and challenge.endswith(b"\n@"), challenge
        sig = crypto.sign(keys.pkam_private, challenge[5:].split(b"\n")[0])
        s.sendall(pkam_line(sig).encode() + b"\r\n")
        done = _read_reply(s)
        if done.startswith(b"data:success"):
            s.sendall(b"llookup:public:publickey" + ALICE.encode() + b"\r\n")
            assert _read_reply(s).startswith(b"data:")  # a normal owner session follows
    return empty, challenge, done


def test_atc_login_replay_legacy_pkam(plane) -> None:
    empty, _challenge, done = _atc_login(plane, lambda sig: f"pkam:{sig}")
    assert empty == EMPTY_REPLY
    assert done == f"data:success\n{ALICE}@".encode()


def test_atc_login_replay_pkam_with_algorithms(plane) -> None:
    """Current at_c: `pkam:signingAlgo:rsa2048:hashingAlgo:sha256:<sig>`."""
    empty, _c, done = _atc_login(
        plane, lambda sig: f"pkam:signingAlgo:rsa2048:hashingAlgo:sha256:{sig}")
    assert empty == EMPTY_REPLY
    assert done == f"data:success\n{ALICE}@".encode()


def test_atc_login_with_a_wrong_signature_is_refused(plane) -> None:
    bad = crypto.b64(b"\x00" * 256)
    empty, _c, done = _atc_login(plane, lambda _sig: f"pkam:{bad}")
    assert empty == EMPTY_REPLY
    assert done.startswith(b"error:AT0401") and done.endswith(b"\n@"), done


def test_empty_line_flood_is_cut_and_others_are_served(plane) -> None:
    p, ctx, _keys = plane
    port = p.servers[0].ports[ALICE.lower()]
    with _tls(ctx, "127.0.0.1", port) as s:
        assert s.recv(16) == b"@"
        s.sendall(b"\r\n" * 20_000)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
    assert got.count(EMPTY_REPLY) == MAX_EMPTY_LINES_UNAUTH
    assert got.endswith(f"error:AT0003-Exception: more than {MAX_EMPTY_LINES_UNAUTH} empty "
                        "lines before authentication; closing\n@".encode())
    assert len(got) < 1024  # 40 KB in, under 1 KB out: no amplification
    empty, _c, done = _atc_login(plane, lambda sig: f"pkam:{sig}")
    assert empty == EMPTY_REPLY and done.startswith(b"data:success")
