"""sshnpd's idle path loads only what an idle daemon needs (issue 13, point 6: memory).

A fresh interpreter does what `sshnpd` does up to "ready" without the network: parse a
config, import the modules `_amain` imports, load a keys file, build the TLS context. Then it
reports ``sys.modules``. Heavy modules that only sessions, certificate making, the atServer,
the client or the admin tool need must not be there: each costs resident memory in every
device's daemon for as long as it runs (figures: docs/sshnpd.md "Memory").
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

IDLE_PATH = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from noports.daemon import cli
    from noports.keys.atkeys import generate_atkeys, load_atkeys, save_atkeys
    keys_path = Path(sys.argv[1]) / "@dev_key.atKeys"
    save_atkeys(generate_atkeys("@dev"), keys_path)
    cfg, _extra = cli._parse(["-a", "@dev", "-m", "@ops", "-d", "box", "-k", str(keys_path),
                              "--root-domain", "127.0.0.1:6464"])
    # what _amain does before it connects
    from noports.keys.ca import client_context
    from noports.daemon.service import Daemon
    load_atkeys(cfg.keys_path, cfg.atsign)
    client_context(None)
    print(json.dumps(sorted(sys.modules)))
""")

NOT_WHILE_IDLE = (
    "cryptography.x509",  # certificates are made by the plane tools, not read by the daemon
    "email",  # under cryptography.x509
    "noports.relay.server",  # srvd's side of the relay
    "noports.relay.session",
    "noports.relay.pump",  # loaded with the first session
    "noports.relay.splice",
    "noports.atserver",
    "noports.directory",
    "noports.client",
    "noports.admin",
    "noports.keys.enroll",
    "noports.keys.plane",
    "noports.daemon.doctor",
    "yaml",
    "tomllib",
    "tomli",
)


def test_idle_daemon_does_not_load_session_or_server_code(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-c", IDLE_PATH, str(tmp_path)], check=True,
                         capture_output=True, text=True, timeout=60).stdout
    loaded = set(json.loads(out))
    assert {"noports.daemon.service", "noports.atclient.aio", "ssl"} <= loaded  # it ran
    avoidable = NOT_WHILE_IDLE
    import cryptography

    if int(cryptography.__version__.split(".")[0]) < 35:
        # cryptography 3.x's OpenSSL backend imports x509 (and with it email) by itself
        avoidable = tuple(h for h in NOT_WHILE_IDLE if h not in ("cryptography.x509", "email"))
    heavy = sorted(m for m in loaded
                   if any(m == h or m.startswith(h + ".") for h in avoidable))
    assert not heavy, f"loaded by an idle sshnpd: {heavy}"
