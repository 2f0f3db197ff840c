"""A small blocking atProtocol client for admin tools and tests.

Why not only the SDK (`at_client`): it cannot take a private CA per call (it always uses the
default trust store), keeps a process-wide root connection, cannot parse the JSON error format,
prints to stdout and has no raw-verb/monitor access. This client is deliberately tiny: TLS,
exact framing (docs/reference/atprotocol.md#atdirectory, docs/reference/atprotocol.md#reply-framing-and-prompts, docs/reference/atprotocol.md#error-replies-and-codes) and CRAM/PKAM authentication.
"""

from noports.atclient.connection import (
    AtClientError,
    AtConnectError,
    AtConnection,
    AtProtocolError,
    AtSecondaryNotFound,
    AtTimeoutError,
    ReplyReader,
    find_secondary,
    parse_error,
)

__all__ = [
    "AtClientError",
    "AtConnectError",
    "AtConnection",
    "AtProtocolError",
    "AtSecondaryNotFound",
    "AtTimeoutError",
    "ReplyReader",
    "find_secondary",
    "parse_error",
]
