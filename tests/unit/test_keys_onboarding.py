"""Activation flow (docs/reference/atprotocol.md#onboarding) against a scripted in-process TLS directory + atServer.

The fake servers implement just enough of the wire protocol to check that `activate` sends the
legacy onboarding sequence in order, over TLS verified against a private CA. End-to-end runs
against the real atdirectory/atserver live in tests/integration/test_onboarding.py.
"""

from __future__ import annotations

import socket
import ssl
import threading
import uuid
from pathlib import Path

import pytest

from noports import crypto
from noports.atclient import AtConnectError, AtSecondaryNotFound, find_secondary
from noports.keys.atkeys import generate_atkeys, load_atkeys
from noports.keys.ca import client_context, ensure_plane_tls, server_context
from noports.keys.onboarding import ActivationError, activate, import_atkeys


class FakeServer:
    """Thread-per-connection TLS server; `handle(line, state) -> reply bytes | None`."""

    def __init__(self, ctx: ssl.SSLContext, handle) -> None:
        self.ctx = ctx
        self.handle = handle
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.log: list[str] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                raw, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        try:
            with self.ctx.wrap_socket(raw, server_side=True) as s:
                s.sendall(b"@")
                buf, state = b"", {}
                while True:
                    data = s.recv(4096)
                    if not data:
                        return
                    buf += data
                    while b"\n" in buf:
                        line, buf = buf.split(b"\n", 1)
                        text = line.decode()
                        self.log.append(text)
                        if text == "@exit":
                            return
                        reply = self.handle(text, state)
                        if reply is not None:
                            s.sendall(reply)
        except (OSError, ssl.SSLError):
            return

    def close(self) -> None:
        self.sock.close()


class FakeAtServer:
    """Legacy onboarding semantics of one atSign: CRAM secret, PKAM key, public key."""

    def __init__(self, ctx: ssl.SSLContext, atsign: str, secret: str) -> None:
        self.atsign = atsign
        self.secret: str | None = secret
        self.pkam_public: str | None = None
        self.public_key: str | None = None
        self.server = FakeServer(ctx, self.handle)

    def handle(self, line: str, st: dict) -> bytes:
        prompt = f"{self.atsign}@" if st.get("auth") else "@"

        def ok(v: str, p: str | None = None) -> bytes:
            return f"data:{v}\n{p or prompt}".encode()

        def err(code: str, msg: str) -> bytes:
            return f"error:{code}-{msg}\n{prompt}".encode()

        if line.startswith("from:"):
            st["challenge"] = f"_{uuid.uuid4()}{self.atsign}:{uuid.uuid4()}"
            return ok(st["challenge"])
        if line.startswith("cram:"):
            if self.secret is None:
                return err("AT0015", "privatekey:at_secret does not exist in keystore")
            if not crypto.cram_matches(self.secret, st["challenge"], line[5:]):
                return err("AT0401", "Exception: Authentication Failed")
            st["auth"] = True
            return ok("success", f"{self.atsign}@")
        if line.startswith("pkam:"):
            if not self.pkam_public or not crypto.verify(self.pkam_public, st["challenge"],
                                                         line[5:]):
                return err("AT0401", "Exception: pkam authentication failed")
            st["auth"] = True
            return ok("success", f"{self.atsign}@")
        if not st.get("auth"):
            return err("AT0401", "Exception: Command cannot be executed without auth")
        if line.startswith("update:privatekey:at_pkam_publickey "):
            self.pkam_public = line.split(" ", 1)[1]
            return ok("-1")
        if line.startswith(f"update:public:publickey{self.atsign} "):
            self.public_key = line.split(" ", 1)[1]
            return ok("3")
        if line == "delete:privatekey:at_secret":
            self.secret = None
            return ok("-1")
        return err("AT0003", "Invalid syntax")


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    files = ensure_plane_tls(tmp_path_factory.mktemp("tls"), ["127.0.0.1", "localhost"])
    return server_context(files, request_client_cert=False), client_context(files.ca_cert)


@pytest.fixture
def plane(tls):
    sctx, cctx = tls
    secret = crypto.generate_cram_secret()
    at = FakeAtServer(sctx, "@alice🛠", secret)
    entries = {"alice🛠": f"127.0.0.1:{at.server.port}"}

    def directory(line: str, st: dict) -> bytes:
        return f"{entries.get(line.lower(), 'null')}\r\n@".encode()

    d = FakeServer(sctx, directory)
    yield {"at": at, "dir": d, "root": ("127.0.0.1", d.port), "ctx": cctx, "secret": secret}
    at.server.close()
    d.close()


def test_find_secondary(plane):
    assert find_secondary(*plane["root"], "@Alice🛠", plane["ctx"]) == (
        "127.0.0.1", plane["at"].server.port)
    assert plane["dir"].log[0] == "alice🛠"  # no '@', lower-case (docs/reference/atprotocol.md#directory-wire-protocol)


def test_find_secondary_not_found(plane):
    with pytest.raises(AtSecondaryNotFound, match="@nobody is not registered"):
        find_secondary(*plane["root"], "@nobody", plane["ctx"])


def test_untrusted_ca_is_clear(plane, tmp_path):
    other = ensure_plane_tls(tmp_path / "other", ["127.0.0.1"])
    with pytest.raises(AtConnectError, match="not trusted.*SSL_CERT_FILE"):
        find_secondary(*plane["root"], "@alice🛠", client_context(other.ca_cert))


def test_activate_legacy_flow(plane, tmp_path: Path):
    keys_path = tmp_path / "k" / "@alice🛠_key.atKeys"
    keys = activate("@alice🛠", plane["secret"], plane["root"], plane["ctx"],
                    keys_path=keys_path)
    at = plane["at"]
    assert at.pkam_public == keys.pkam_public
    assert at.public_key == keys.encrypt_public
    assert at.secret is None  # CRAM secret deleted
    verbs = [line.split(":", 1)[0] if not line.startswith("update:") else
             line.split(" ", 1)[0] for line in at.server.log if line != "@exit"]
    assert verbs == ["from", "cram", "update:privatekey:at_pkam_publickey", "from", "pkam",
                     "update:public:publickey@alice🛠", "delete"]
    assert plane["secret"] not in "\n".join(at.server.log)  # only the digest travels
    assert load_atkeys(keys_path) == keys
    assert (keys_path.stat().st_mode & 0o777) == 0o600


def test_import_existing_keys(plane):
    keys = generate_atkeys("@alice🛠")
    out = import_atkeys(keys, plane["secret"], plane["root"], plane["ctx"])
    assert out == keys
    assert plane["at"].pkam_public == keys.pkam_public
    assert keys.pkam_private not in "\n".join(plane["at"].server.log)


def test_wrong_cram_secret(plane):
    with pytest.raises(ActivationError, match="CRAM authentication failed.*AT0401"):
        activate("@alice🛠", "0" * 128, plane["root"], plane["ctx"])
    assert plane["at"].pkam_public is None


def test_second_activation_fails_clearly(plane):
    activate("@alice🛠", plane["secret"], plane["root"], plane["ctx"])
    with pytest.raises(ActivationError, match="already activated"):
        activate("@alice🛠", plane["secret"], plane["root"], plane["ctx"])
