"""Blocking TLS connections to an atDirectory and an atServer, with exact framing.

Framing (reference atprotocol.md §2.3): every server reply is `<body>\\n<prompt>` where the
prompt is `@` on unauthenticated connections and `@<atsign>@` once authenticated; TLS may split
that into several reads, so the reader buffers until the whole prompt has arrived. Error bodies
come in the legacy form `error:AT0015-key not found : ...`, the handler form
`error:AT0026:message` and the JSON form `error:{"errorCode":..,"errorDescription":..}` (§2.5).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import socket
import ssl
from collections.abc import Callable, Iterator
from typing import Protocol

from noports import crypto

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 10.0
# After `\n@` while expecting `@alice@`: how long to wait for the rest before accepting `@`.
PROMPT_GRACE = 0.25

_LEGACY_ERROR = re.compile(r"^(AT\d{4})\s*[-:]\s*(.*)$", re.DOTALL)
_PROMPT = re.compile(rb"^@(?:[^@\s]+@)?")


class AtClientError(Exception):
    """Base class: something went wrong talking to an atDirectory or atServer."""


class AtConnectError(AtClientError):
    """Could not connect (refused, unresolvable, TLS not trusted) or the peer hung up."""


class AtTimeoutError(AtClientError):
    """The peer did not answer in time."""


class AtSecondaryNotFound(AtClientError):
    """The directory has no entry for the atSign (it answered `null`)."""


class AtProtocolError(AtClientError):
    """The server answered `error:...`; `code` is e.g. 'AT0015' ('' when it sent none)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}" if code else message)
        self.code = code
        self.message = message


def parse_error(text: str) -> AtProtocolError:
    """Parse what follows `error:` in any of the three formats the servers use."""
    text = text.strip()
    if text.startswith("{"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            obj = None
        if isinstance(obj, dict):
            return AtProtocolError(str(obj.get("errorCode", "") or ""),
                                   str(obj.get("errorDescription", "") or ""))
    m = _LEGACY_ERROR.match(text)
    if m:
        return AtProtocolError(m.group(1), m.group(2))
    return AtProtocolError("", text)


def strip_prompt(body: str) -> str:
    """Drop a stray prompt glued to the front of a reply (`@alice@data:x` -> `data:x`).

    Same rule as Dart's at_lookup `_stripPrompt`: everything up to the last `@` in the part
    before the first `:`.
    """
    colon = body.find(":")
    head = body if colon < 0 else body[:colon]
    at = head.rfind("@")
    if colon >= 0 and at >= 0:
        return body[at + 1:]
    return body


def _verb(cmd: str) -> str:
    """The verb of a command, for logs and error messages (never arguments: they may be secret)."""
    return re.split(r"[:\s]", cmd.strip(), maxsplit=1)[0] or "?"


class SocketLike(Protocol):
    def recv(self, bufsize: int) -> bytes: ...


class ReplyReader:
    """Cuts an atProtocol byte stream into replies; works on any object with `recv`.

    Kept separate from the socket so the framing can be tested with scripted reads.
    """

    def __init__(self, sock: SocketLike, peer: str = "server") -> None:
        self._sock = sock
        self._buf = bytearray()
        self.peer = peer

    def _fill(self, grace: float | None = None) -> bool:
        """Read more bytes. With `grace`, a short wait that may legitimately find nothing."""
        settimeout = getattr(self._sock, "settimeout", None)
        gettimeout = getattr(self._sock, "gettimeout", None)
        old = gettimeout() if (grace is not None and gettimeout) else None
        try:
            if grace is not None and settimeout:
                settimeout(grace)
            chunk = self._sock.recv(65536)
        except TimeoutError:
            if grace is not None:
                return False
            raise AtTimeoutError(f"no reply from {self.peer} in time") from None
        except ssl.SSLError as exc:
            raise AtConnectError(f"TLS error talking to {self.peer}: {exc}") from None
        except OSError as exc:
            raise AtConnectError(f"connection to {self.peer} failed: {exc}") from None
        finally:
            if grace is not None and settimeout:
                settimeout(old)
        if not chunk:
            if grace is not None:
                return False
            raise AtConnectError(f"{self.peer} closed the connection")
        self._buf += chunk
        return True

    def read_prompt(self) -> str:
        """Consume the greeting prompt (`@`) a server sends when a connection opens."""
        while not self._buf:
            self._fill()
        if self._buf[:1] != b"@":
            raise AtProtocolError("", f"{self.peer} did not greet with the '@' prompt: "
                                  f"{bytes(self._buf[:80])!r}")
        del self._buf[:1]
        return "@"

    def read_line(self) -> str:
        """One `\\n`-terminated line without any prompt handling (monitor streams)."""
        while b"\n" not in self._buf:
            self._fill()
        i = self._buf.index(b"\n")
        line = bytes(self._buf[:i]).decode("utf-8", "replace").rstrip("\r")
        del self._buf[:i + 1]
        return line

    def read_reply(self, expected_prompt: str | Callable[[str], str] = "@") -> str:
        """Read `<body>\\n<prompt>` and return the body (prompt stripped).

        `expected_prompt` may depend on the body (a successful `cram`/`pkam` switches the prompt
        from `@` to `@alice@`), hence the callable form.
        """
        while b"\n" not in self._buf:
            self._fill()
        i = self._buf.index(b"\n")
        body = strip_prompt(bytes(self._buf[:i]).decode("utf-8", "replace").rstrip("\r"))
        del self._buf[:i + 1]
        prompt = expected_prompt(body) if callable(expected_prompt) else expected_prompt
        self._consume_prompt(prompt.encode("utf-8"))
        return body

    def _consume_prompt(self, expected: bytes) -> None:
        while True:
            buf = bytes(self._buf)
            if buf.startswith(expected):
                del self._buf[:len(expected)]
                return
            if expected.startswith(buf):
                # incomplete: `@` may be the whole prompt of a server that disagrees with us
                # about authentication, so only wait briefly in that one case
                if buf == b"@" and not self._fill(grace=PROMPT_GRACE):
                    del self._buf[:1]
                    return
                if buf != b"@":
                    self._fill()
                continue
            m = _PROMPT.match(buf)
            if m and (m.end() > 1 or len(buf) > 1):
                # a different, complete prompt (e.g. `@` where we expected `@alice@`)
                del self._buf[:m.end()]
                return
            if buf.startswith(b"@") and not re.search(rb"[@\s]", buf[1:]):
                self._fill()  # `@bo` of a different prompt still arriving
                continue
            return  # no prompt at all: leave the bytes for the next reply


class AtConnection:
    """One TLS connection to an atServer (or any atProtocol server that sends `@` prompts)."""

    def __init__(self, host: str, port: int, ssl_ctx: ssl.SSLContext | None = None,
                 timeout: float = DEFAULT_TIMEOUT, connect_timeout: float | None = None) -> None:
        self.host = host
        self.port = int(port)
        self.timeout = timeout
        self.atsign: str | None = None  # set once authenticated
        self._sock = _open_tls(host, self.port, ssl_ctx, connect_timeout or timeout, timeout)
        self._reader = ReplyReader(self._sock, peer=f"{host}:{self.port}")
        try:
            self._reader.read_prompt()
        except BaseException:
            self._sock.close()
            raise

    @property
    def peer(self) -> str:
        return f"{self.host}:{self.port}"

    def _prompt(self) -> str:
        return f"{self.atsign}@" if self.atsign else "@"

    def send(self, cmd: str) -> None:
        """Send one raw command line (no reply read); for streaming verbs like monitor."""
        if "\n" in cmd.rstrip("\n"):
            raise ValueError("atProtocol commands cannot contain newlines")
        log.debug("%s -> %s", self.peer, _verb(cmd))
        try:
            self._sock.sendall(cmd.rstrip("\n").encode("utf-8") + b"\n")
        except TimeoutError:
            raise AtTimeoutError(f"timed out sending to {self.peer}") from None
        except OSError as exc:
            raise AtConnectError(f"connection to {self.peer} failed: {exc}") from None

    def command(self, cmd: str, prompt_after: Callable[[str], str] | None = None) -> str:
        """Run one command; return the text after `data:`, raise AtProtocolError on `error:`."""
        self.send(cmd)
        try:
            body = self._reader.read_reply(prompt_after or self._prompt())
        except AtTimeoutError:
            raise AtTimeoutError(f"no reply from {self.peer} to {_verb(cmd)!r} within "
                                 f"{self.timeout:g}s") from None
        if body.startswith("data:"):
            return body[len("data:"):]
        if body.startswith("error:"):
            err = parse_error(body[len("error:"):])
            log.debug("%s <- error %s", self.peer, err.code)
            raise err
        raise AtProtocolError("", f"unexpected reply from {self.peer} to {_verb(cmd)!r}: "
                              f"{body[:200]!r}")

    def _auth_prompt(self, atsign: str) -> Callable[[str], str]:
        return lambda body: f"{atsign}@" if body.startswith("data:success") else self._prompt()

    def challenge(self, atsign: str) -> str:
        """`from:@alice` -> the challenge to answer with cram or pkam."""
        return self.command(f"from:{_at(atsign)}")

    def authenticate_cram(self, atsign: str, secret: str) -> None:
        """CRAM: sha512_hex(secret + challenge). The secret never leaves this process."""
        atsign = _at(atsign)
        digest = crypto.cram_digest(secret, self.challenge(atsign))
        reply = self.command(f"cram:{digest}", prompt_after=self._auth_prompt(atsign))
        if reply != "success":
            raise AtProtocolError("", f"cram authentication as {atsign} failed: {reply[:100]}")
        self.atsign = atsign
        log.debug("%s: authenticated as %s (cram)", self.peer, atsign)

    def authenticate_pkam(self, atsign: str, pkam_private: str,
                          enrollment_id: str | None = None) -> None:
        """Legacy PKAM (RSA-SHA256 over the challenge), or APKAM with `enrollment_id`."""
        atsign = _at(atsign)
        signature = crypto.sign(pkam_private, self.challenge(atsign))
        cmd = (f"pkam:signingAlgo:rsa2048:hashingAlgo:sha256:enrollmentId:{enrollment_id}:"
               f"{signature}" if enrollment_id else f"pkam:{signature}")
        reply = self.command(cmd, prompt_after=self._auth_prompt(atsign))
        if reply != "success":
            raise AtProtocolError("", f"pkam authentication as {atsign} failed: {reply[:100]}")
        self.atsign = atsign
        log.debug("%s: authenticated as %s (pkam)", self.peer, atsign)

    def monitor(self, regex: str | None = None, since_ms: int | None = None) -> Iterator[dict]:
        """Start `monitor` and yield each notification's JSON (blocks; reply has no prompts)."""
        cmd = "monitor" + (f":{since_ms}" if since_ms is not None else "")
        if regex:
            cmd += f" {regex}"
        self.send(cmd)
        while True:
            line = strip_prompt(self._reader.read_line())
            if line.startswith("notification:"):
                try:
                    yield json.loads(line[len("notification:"):].strip())
                except json.JSONDecodeError:
                    log.warning("%s: unparsable notification line", self.peer)
            elif line.startswith("error:"):
                raise parse_error(line[len("error:"):])

    def close(self) -> None:
        """Say `@exit` (best effort) and close."""
        try:
            self._sock.settimeout(1.0)
            self._sock.sendall(b"@exit\n")
        except OSError:
            pass
        with contextlib.suppress(OSError):
            self._sock.close()

    def __enter__(self) -> AtConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _at(atsign: str) -> str:
    atsign = atsign.strip()
    return atsign if atsign.startswith("@") else "@" + atsign


def _open_tls(host: str, port: int, ssl_ctx: ssl.SSLContext | None, connect_timeout: float,
              timeout: float) -> ssl.SSLSocket:
    """TCP connect + TLS handshake, turning every failure into one clear sentence."""
    ctx = ssl_ctx or ssl.create_default_context()
    where = f"{host}:{port}"
    try:
        raw = socket.create_connection((host, port), timeout=connect_timeout)
    except socket.gaierror as exc:
        raise AtConnectError(f"cannot resolve {host!r} ({exc.strerror})") from None
    except ConnectionRefusedError:
        raise AtConnectError(f"cannot connect to {where}: connection refused "
                             "(is the server running?)") from None
    except TimeoutError:
        raise AtTimeoutError(f"cannot connect to {where}: timed out after "
                             f"{connect_timeout:g}s") from None
    except OSError as exc:
        raise AtConnectError(f"cannot connect to {where}: {exc.strerror or exc}") from None
    try:
        sock = ctx.wrap_socket(raw, server_hostname=host)
    except ssl.SSLCertVerificationError as exc:
        raw.close()
        raise AtConnectError(
            f"TLS certificate of {where} is not trusted: {exc.verify_message}; trust the "
            "server's CA (--ca-file / ca_file, or export SSL_CERT_FILE=<plane>/tls/ca.pem)") from None
    except TimeoutError:
        raw.close()
        raise AtTimeoutError(f"TLS handshake with {where} timed out") from None
    except (ssl.SSLError, OSError) as exc:
        raw.close()
        raise AtConnectError(f"TLS handshake with {where} failed: {exc}") from None
    sock.settimeout(timeout)
    return sock


def find_secondary(root_host: str, root_port: int, atsign: str,
                   ssl_ctx: ssl.SSLContext | None = None,
                   timeout: float = DEFAULT_TIMEOUT) -> tuple[str, int]:
    """Ask an atDirectory where `atsign`'s atServer is (reference §1.1): `(host, port)`.

    One connection per lookup, like the Dart clients, so the directory's
    three-not-found-then-close rule never bites a long-lived process.
    """
    sock = _open_tls(root_host, int(root_port), ssl_ctx, timeout, timeout)
    peer = f"directory {root_host}:{root_port}"
    try:
        reader = ReplyReader(sock, peer=peer)
        reader.read_prompt()
        name = _at(atsign)[1:].lower()  # the directory's key: no '@', lower-case
        sock.sendall(name.encode("utf-8") + b"\n")
        body = reader.read_reply("@").strip()
        with contextlib.suppress(OSError):
            sock.sendall(b"@exit\n")
    except TimeoutError:
        raise AtTimeoutError(f"no answer from {peer} for {_at(atsign)}") from None
    except OSError as exc:
        raise AtConnectError(f"{peer} failed: {exc}") from None
    finally:
        sock.close()
    if body == "null":
        raise AtSecondaryNotFound(f"{_at(atsign)} is not registered in {peer}")
    if body.startswith("error:"):  # a limit of the directory, named in the text
        raise AtProtocolError("", f"{peer} refused the lookup of {_at(atsign)}: {body[6:200]}")
    host, sep, port = body.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise AtProtocolError("", f"{peer} returned a malformed address for {_at(atsign)}: "
                              f"{body[:100]!r}")
    return host, int(port)
