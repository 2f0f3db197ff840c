"""Pure, sans-IO NoPorts v5 protocol logic: JSON, key names, messages, envelopes, ciphers.

Nothing here opens sockets or talks to an atServer; the daemon, client and relay feed it
strings and bytes. See docs/reference/noports-protocol.md#control-plane, docs/reference/noports-protocol.md#socket-rendezvous for the formats.
"""

from .dartjson import dart_json_decode, dart_json_encode
from .envelope import (
    ReplayGuard,
    dart_iso,
    dart_iso_now,
    extract_auth_line,
    parse_dart_iso,
    relay_auth_line,
    sign_envelope,
    verify_envelope,
    verify_relay_auth,
)
from .errors import (
    DartJsonError,
    IntegrityError,
    ProtocolError,
    ReplayError,
    SignatureError,
)
from .messages import (
    CIPHER_AES_CTR,
    CIPHER_CHACHA20_POLY1305,
    DeviceInfo,
    NptRequest,
    RelayRequest,
    RelayResponse,
    SessionResponse,
    SshRequest,
    negotiate_cipher,
)
from .streamcipher import (
    SUPPORTED_CIPHERS,
    AeadStream,
    CtrDuplex,
    CtrStream,
    new_session_cipher,
)

__all__ = [
    "CIPHER_AES_CTR", "CIPHER_CHACHA20_POLY1305", "SUPPORTED_CIPHERS",
    "AeadStream", "CtrDuplex", "CtrStream", "DartJsonError", "DeviceInfo", "IntegrityError",
    "NptRequest", "ProtocolError", "RelayRequest", "RelayResponse", "ReplayError",
    "ReplayGuard", "SessionResponse", "SignatureError", "SshRequest", "dart_iso",
    "dart_iso_now", "dart_json_decode", "dart_json_encode", "extract_auth_line",
    "negotiate_cipher", "new_session_cipher", "parse_dart_iso", "relay_auth_line",
    "sign_envelope", "verify_envelope", "verify_relay_auth",
]
