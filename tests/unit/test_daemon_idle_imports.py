"""sshnpd's idle path loads only what an idle daemon needs (issue 13, point 6: memory).

A fresh interpreter does what `sshnpd` does up to "ready" without the network: parse a
config, import the modules `_amain` imports, load a keys file, build the TLS context. Then it
reports ``sys.modules``. Heavy modules that only sessions, certificate making, the atServer,
the client or the admin tool need must not be there: each costs resident memory in every
device's daemon for as long as it runs (figures: docs/sshnpd.md "Memory").
"""

from __future__ import annotations

import json
import os
import select
import socket
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
    "noports.agent",
    "paramiko",  # the client's SSH library
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


def _read_line(fd: int, timeout: float = 30.0) -> bytes:
    """One line from a pipe, or fail after ``timeout`` (a hang, not a slow machine)."""
    buf = b""
    while not buf.endswith(b"\n"):
        ready, _w, _x = select.select([fd], [], [], timeout)
        assert ready, f"no line from the session host within {timeout:g}s (got {buf!r})"
        chunk = os.read(fd, 1)
        assert chunk, f"the session host closed its stdout (got {buf!r})"
        buf += chunk
    return buf


def test_idle_session_host_is_a_bare_interpreter_until_its_first_order(tmp_path: Path) -> None:
    """The host sshnpd starts (same argv and environment) maps neither ssl nor cryptography's
    bindings while it waits; its first order is then carried out whole by the session code."""
    from noports.daemon.handoff import host_argv, host_env
    from noports.daemon.sessionorder import HostEvent, SessionOrder
    from noports.daemon.sshkeys import generate_ephemeral_key

    ak = tmp_path / "authorized_keys"
    owner_line = generate_ephemeral_key().public_line + " owner@box\n"
    ak.write_text(owner_line)
    ephemeral = generate_ephemeral_key().public_line
    p = subprocess.Popen(host_argv("json", False, "@dev/box", str(ak)), env=host_env(),
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, cwd="/")
    try:
        assert p.stdin is not None and p.stdout is not None
        ready = HostEvent.from_line(_read_line(p.stdout.fileno()))
        assert (ready.event, ready.pid) == ("ready", p.pid)
        maps = Path(f"/proc/{p.pid}/maps").read_text()
        heavy = sorted({line.split()[-1] for line in maps.splitlines()
                        if any(h in line for h in ("/cryptography/", "_ssl.", "libssl",
                                                   "_asyncio.", "_hashlib."))})
        assert not heavy, f"an idle session host maps {heavy}"

        with socket.socket() as s:  # a port nothing listens on: the session fails at once
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        sid = "0b6f4a1e-2f53-4c1b-9a43-7cc3f1f0a0de"
        order = SessionOrder(
            session_id=sid, client="@ops", relay_host="127.0.0.1", relay_port=port,
            auth_line=b"signed-line", cipher_id=None, key=None, iv=None,
            public_line=ephemeral, authorized_keys=str(ak),
            local_sshd_port=port, permissions="", owner="@dev/box", key_ttl=15.0)
        p.stdin.write(order.to_line())
        p.stdin.flush()
        ev = HostEvent.from_line(_read_line(p.stdout.fileno()))
        assert (ev.event, ev.session_id) == ("failed", sid)
        assert ev.error.startswith(f"cannot connect to the local sshd on port {port}")
        assert ak.read_text() == owner_line  # the session's key line is gone again
        p.stdin.close()  # the daemon lets go: the host exits, nothing running
        assert p.wait(30) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)
