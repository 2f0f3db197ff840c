"""atProtocol errors and their two wire formats (docs/reference/atprotocol.md#error-replies-and-codes).

Errors are ordinary exceptions carrying the at_commons error code so that any layer can
raise them and the connection layer can render them with :func:`error_reply` in the format
the client understands (legacy ``error:AT0015-...`` or JSON for newer Dart clients).
"""

from __future__ import annotations

import re

from noports.npproto.dartjson import dart_json_encode

ERROR_TEXT: dict[str, str] = {
    "AT0001": "Server exception",
    "AT0002": "DataStore exception",
    "AT0003": "Invalid syntax",
    "AT0004": "Socket error",
    "AT0005": "Buffer limit exceeded",
    "AT0006": "Outbound connection limit exceeded",
    "AT0007": "Secondary server not found",
    "AT0008": "Handshake failure",
    "AT0009": "UnAuthorized client in request",
    "AT0010": "Internal server error",
    "AT0011": "Internal server exception",
    "AT0012": "Inbound connection limit exceeded",
    "AT0013": "Connection Exception",
    "AT0014": "Unknown AtClient exception",
    "AT0015": "key not found",
    "AT0016": "Invalid key",
    "AT0021": "Unable to connect to secondary",
    "AT0022": "Illegal arguments",
    "AT0023": "Timeout waiting for response",
    "AT0024": "Server is paused",
    "AT0025": "Apkam Auth Denied",
    "AT0026": "Apkam Auth Failed",
    "AT0027": "Apkam Access Revoked",
    "AT0028": "Too Many Requests",
    "AT0029": "Apkam Enrollment Expired",
    "AT0030": "Invalid Enrollment Status",
    "AT0031": "Cannot revoke self enrollment",
    "AT0401": "Client authentication failed",
}

# Codes after which the reference server closes the connection (docs/reference/atprotocol.md#error-replies-and-codes "Closing behaviour").
CLOSING_CODES = frozenset({"AT0002", "AT0005", "AT0013", "AT0024"})

# Clients announcing a version above this get JSON error bodies (global_exception_handler).
_JSON_ERRORS_AFTER = (3, 0, 37)
_SEMVER = re.compile(r"^\s*v?(\d+)\.(\d+)\.(\d+)")


class AtError(Exception):
    """An atProtocol error: ``code`` (e.g. ``AT0003``), ``message`` and whether to close."""

    def __init__(self, code: str, message: str, close: bool = False) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.close = close

    def __repr__(self) -> str:
        return f"AtError({self.code!r}, {self.message!r}, close={self.close!r})"


def _description(err: AtError, authenticated: bool) -> str:
    # Authenticated connections see the standard text; others see Dart's Exception.toString().
    if authenticated:
        return f"{ERROR_TEXT.get(err.code, ERROR_TEXT['AT0011'])} : {err.message}"
    return f"Exception: {err.message}"


def error_reply(err: AtError, *, json_style: bool, authenticated: bool) -> str:
    """Render ``err`` as a reply body (no newline, no prompt) in the client's format."""
    description = _description(err, authenticated)
    if json_style:
        body = dart_json_encode({"errorCode": err.code, "errorDescription": description})
        return f"error:{body}"
    return f"error:{err.code}-{description}"


def wants_json_errors(client_config: dict | None) -> bool:
    """True if the ``from`` clientConfig announces a version > 3.0.37 (JSON error format)."""
    if not isinstance(client_config, dict):
        return False
    version = client_config.get("version")
    if not isinstance(version, str):
        return False
    m = _SEMVER.match(version)
    if m is None:
        return False
    return tuple(int(g) for g in m.groups()) > _JSON_ERRORS_AFTER


def invalid_syntax(msg: str) -> AtError:
    """AT0003: the command does not match the verb grammar."""
    return AtError("AT0003", msg)


def unauthenticated(msg: str) -> AtError:
    """AT0401: verb needs an authenticated connection, or authentication failed."""
    return AtError("AT0401", msg)


def key_not_found(key: str) -> AtError:
    """AT0015 with the keystore's message text."""
    return AtError("AT0015", f"{key} does not exist in keystore")


def invalid_key(msg: str) -> AtError:
    """AT0016: malformed key, wrong owner or key type not allowed."""
    return AtError("AT0016", msg)


def illegal_argument(msg: str) -> AtError:
    """AT0022: e.g. noop duration above the maximum."""
    return AtError("AT0022", msg)


def unauthorized(msg: str) -> AtError:
    """AT0009: the caller may not do this (e.g. notify as another atSign)."""
    return AtError("AT0009", msg)


def buffer_overflow(msg: str) -> AtError:
    """AT0005: request larger than the inbound buffer; the server then closes."""
    return AtError("AT0005", msg, close=True)


def internal(msg: str) -> AtError:
    """AT0011 for unexpected failures; the reference server closes the connection."""
    return AtError("AT0011", msg, close=True)


class RemoteError(Exception):
    """Another atServer could not be reached or handshaked; ``code`` is the atProtocol code.

    Lives here (not in the asyncio ``atserver.s2s`` edge) so that sans-IO code such as the
    session logic can catch it without importing asyncio machinery; s2s re-exports it.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
