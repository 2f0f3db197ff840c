"""Blocking TLS connections to an atDirectory and an atServer, with exact framing.

Framing (docs/reference/atprotocol.md#reply-framing-and-prompts): every server reply is `<body>\\n<prompt>` where the
prompt is `@` on unauthenticated connections and `@<atsign>@` once authenticated; TLS may split
that into several reads, so the reader buffers until the whole prompt has arrived. Error bodies
come in the legacy form `error:AT0015-key not found : ...`, the handler form
`error:AT0026:message` and the JSON form `error:{"errorCode":..,"errorDescription":..}` (docs/reference/atprotocol.md#error-replies-and-codes).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import socket
import ssl
from collections import deque
from collections.abc import Callable, Iterator
from typing import Protocol

from noports import crypto
from noports.atprotocol import wire
from noports.atprotocol.atsign import normalize_atsign
from noports.atprotocol.wire import Reply, ReplyFramer

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 10.0
# After `\n@` while expecting `@alice@`: how long to wait for the rest before accepting `@`.
PROMPT_GRACE = 0.25

strip_prompt = wire.strip_prompt  # re-exported (tests, e2e)


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
    """What follows `error:` (any of the three formats) as an exception; see `wire.parse_error`."""
    err = wire.parse_error(text)
    return AtProtocolError(err.code, err.message)


def _verb(cmd: str) -> str:
    """The verb of a command, for logs and error messages (never arguments: they may be secret)."""
    return re.split(r"[:\s]", cmd.strip(), maxsplit=1)[0] or "?"


class SocketLike(Protocol):
    def recv(self, bufsize: int) -> bytes: ...


class ReplyReader:
    """Blocking edge of `wire.ReplyFramer`: reads from any object with `recv` until it has a reply.

    Kept separate from the socket so the framing can be tested with scripted reads.
    """

    def __init__(self, sock: SocketLike, peer: str = "server") -> None:
        self._sock = sock
        self._framer = ReplyFramer()
        self._replies: deque[Reply] = deque()
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
        try:
            self._replies.extend(self._framer.feed(chunk))
        except wire.FramingError as exc:
            raise AtProtocolError("", f"{self.peer} sent an over-long reply ({exc})") from None
        return True

    def read_prompt(self) -> str:
        """Consume the greeting prompt (`@`) a server sends when a connection opens."""
        while not self._replies:
            if self._framer.flush_prompt() is not None:  # the lone `@` greeting
                return "@"
            self._fill()
        first = self._replies[0]
        if first.kind != "prompt":
            raise AtProtocolError("", f"{self.peer} did not greet with the '@' prompt: "
                                  f"{first.line[:80]!r}")
        self._replies.popleft()
        return "@"

    def next_reply(self) -> Reply:
        """The next reply that is not a prompt."""
        while True:
            while self._replies:
                reply = self._replies.popleft()
                if reply.kind != "prompt":
                    return reply
            self._fill()

    def read_line(self) -> str:
        """One `\\n`-terminated line without any prompt handling (monitor streams)."""
        return self.next_reply().line

    def read_reply(self, expected_prompt: str | Callable[[str], str] = "@") -> str:
        """Read `<body>\\n<prompt>` and return the body (prompt stripped).

        `expected_prompt` may depend on the body (a successful `cram`/`pkam` switches the prompt
        from `@` to `@alice@`), hence the callable form.
        """
        body = self.next_reply().line
        prompt = expected_prompt(body) if callable(expected_prompt) else expected_prompt
        self._consume_prompt(prompt)
        return body

    def _consume_prompt(self, expected: str) -> None:
        """Take the prompt that ends the reply just read, waiting for it only as needed."""
        while True:
            if self._replies:
                if self._replies[0].kind == "prompt":
                    self._replies.popleft()
                return  # otherwise no prompt at all: the next reply is already here
            pending = self._framer.pending
            if pending and not pending.startswith(b"@"):
                return
            if pending == b"@":
                # `@` may be the whole prompt of a server that disagrees with us about
                # authentication, so only wait briefly when we expect a longer one
                if expected == "@" or not self._fill(grace=PROMPT_GRACE):
                    self._framer.flush_prompt()
                    return
                continue
            self._fill()  # nothing yet, or `@bo` of a longer prompt still arriving


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
            reply = self._reader.next_reply()
            if reply.kind == "notification":
                try:
                    obj = json.loads(reply.text.strip())
                except (ValueError, RecursionError):  # a hostile line must not end the monitor
                    log.warning("%s: unparsable notification line", self.peer)
                    continue
                yield obj
            elif reply.kind == "error":
                raise parse_error(reply.text)

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
    return normalize_atsign(atsign)  # the one atSign rule; InvalidAtSign is a ValueError


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
    """Ask an atDirectory where `atsign`'s atServer is (docs/reference/atprotocol.md#directory-wire-protocol): `(host, port)`.

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
