"""``sshnp`` client: CLI and library for the Ansible connection plugin.

Library API (imports are lazy, so ``import noports.client`` is cheap)::

    from noports.client import SessionParams, open_session, run_stdio, host_key_alias

    params = SessionParams(client_atsign="@me", device_atsign="@dev", relays=["@relay"],
                           device="pi4", root=("root.example", 64))
    session = await open_session(params)          # control plane + relay + device
    await session.tunnel.serve_stdio()            # or serve_socket(sock)
    session.close()

    rc = run_stdio(params)                        # the same, blocking, ProxyCommand style

Failures raise :class:`SshnpError` subclasses whose ``str()`` names the failed step and what
to check, and whose ``exit_code`` is what the CLI exits with (docs/sshnp.md).
"""

from __future__ import annotations

from typing import Any

# The names are resolved lazily by __getattr__ below, which pylint does not follow.
# pylint: disable=undefined-all-variable
__all__ = [
    "Session", "SessionParams", "SshnpError", "host_key_alias", "open_session", "run_stdio",
    "update_known_hosts",
]

_LAZY = {
    "Session": ("flow", "Session"), "open_session": ("flow", "open_session"),
    "SessionParams": ("params", "SessionParams"), "SshnpError": ("errors", "SshnpError"),
    "host_key_alias": ("knownhosts", "host_key_alias"),
    "update_known_hosts": ("knownhosts", "update_known_hosts"),
    "run_stdio": ("cli", "run_stdio"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib
        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(f"{__name__}.{mod}"), attr)
    raise AttributeError(name)
