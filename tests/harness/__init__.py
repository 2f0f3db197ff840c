"""The shared test harness: real programs in a "no open ports" world, for tests, benches, demo.

Import as ``tests.harness.<module>`` (pytest: ``pythonpath = ["."]``; scripts: ``python -m``
from the repository root; docs/decisions/0016). Modules, lowest first: ``plane`` (processes,
a plane on loopback), ``sshd``, ``topology`` (namespaces or loopback), ``world`` (one relay),
``fleet`` (Redis, shards, several relays), ``ansible`` (the roles' end-to-end world).
"""
