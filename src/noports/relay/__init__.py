"""Socket rendezvous (srvd data plane) and the client-side relay pump.

See docs/relay.md. Control-plane code (``request_ports`` handling) builds on
:class:`Rendezvous`; relay authentication is pluggable via :data:`SideAuthenticator`.
"""

from .pump import PumpStats, connect_relay, pump_socket, pump_stdio, run_sshrv
from .server import RelayCapacityError, RelayConfig, Rendezvous, SessionSummary
from .session import (
    AuthLineReader,
    AuthLineTooLong,
    RelaySession,
    SessionPolicy,
    Side,
    SideAuthenticator,
)
from .splice import DEFAULT_MODE, Splice, splice_sockets, splice_stdio

__all__ = [
    "DEFAULT_MODE",
    "AuthLineReader",
    "AuthLineTooLong",
    "PumpStats",
    "RelayCapacityError",
    "RelayConfig",
    "RelaySession",
    "Rendezvous",
    "SessionPolicy",
    "SessionSummary",
    "Side",
    "SideAuthenticator",
    "Splice",
    "connect_relay",
    "pump_socket",
    "pump_stdio",
    "run_sshrv",
    "splice_sockets",
    "splice_stdio",
]
