"""Exceptions of the NoPorts protocol layer.

One small hierarchy so callers (daemon, client, relay) can catch "the peer sent something we
will not act on" in one place and still tell signature and integrity failures apart.
"""

from __future__ import annotations


class ProtocolError(ValueError):
    """A message, key or value does not follow the NoPorts v5 formats; the text says where."""


class DartJsonError(ProtocolError):
    """A value cannot be encoded exactly as Dart's jsonEncode would (e.g. a float)."""


class SignatureError(ProtocolError):
    """A signed envelope is malformed or its signature does not verify."""


class ReplayError(ProtocolError):
    """A session request was seen before or its nonce is outside the accepted window."""


class IntegrityError(ProtocolError):
    """An authenticated stream was tampered with, reordered or truncated."""
