"""``sshnpd``: the NoPorts device daemon.

Layout (sans-IO core, thin asyncio edges):

* :mod:`.config` - flags, config file, validation (no I/O beyond reading the config file);
* :mod:`.handler` - pure decisions: notification + config + state -> replies / session plans;
* :mod:`.authorized_keys` - the only code that rewrites ``authorized_keys`` (locked, atomic);
* :mod:`.sshkeys` - in-process ephemeral key generation and sshd host key loading;
* :mod:`.service` - the asyncio daemon: atServer monitor, session hand-over, signals;
* :mod:`.sessionorder` - the pure daemon <-> session host pipe messages;
* :mod:`.handoff` - starts the daemon's session host and hands it sessions;
* :mod:`.sessionhost` - the process that carries sessions, so they outlive the daemon
  (docs/decisions/0024-sessions-outlive-daemon.md);
* :mod:`.sessionhost_start` - its bare start, until the first session
  (docs/decisions/0032-sshnpd-idle-memory.md);
* :mod:`.cli` - ``sshnpd`` command line and logging set-up.
"""

from __future__ import annotations

DAEMON_VERSION = "0.1.0"
