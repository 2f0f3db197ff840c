"""The sshnp controller agent: one process per user (per AWX job) that holds the control-plane
session of each client atSign and pumps every tunnel in one event loop (docs/agent.md).

``protocol`` (pure framing and validation), ``paths`` (the private directory), ``connect``
(the tiny ProxyCommand connector), ``plane`` (the shared atServer client and monitor),
``server`` (the asyncio edge). The connector imports only ``protocol`` and ``paths``.
"""
