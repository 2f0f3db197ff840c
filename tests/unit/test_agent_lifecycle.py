"""The agent's life-cycle helpers, on real processes and descriptors (no network):

* a tunnel failure after set-up is written where the connector's stderr went
  (``StderrOf``), and nowhere when that was /dev/null;
* ``sshnp --stdio`` knows it runs under OpenSSH's ``ProxyUseFdpass`` (one unix socket as
  stdin and stdout) and only then (two pipes);
* the agent raises its soft open-files limit to the hard limit.
"""

from __future__ import annotations

import resource
import socket
import subprocess
import sys

from noports.agent.server import StderrOf, raise_fd_limit


def test_a_late_tunnel_error_goes_where_the_connectors_stderr_went(tmp_path):
    log = tmp_path / "client.log"
    with open(log, "w") as err:
        err.write("sshnp [ 0.1s] tunnel ready\n")
        err.flush()
        p = subprocess.Popen(["sleep", "30"], stderr=err, stdin=subprocess.DEVNULL)
    try:
        where = StderrOf(p.pid)  # read while the connector is alive ...
    finally:
        p.kill()
        p.wait()
    where.error("tunnel: relay connection lost: relay @rv reset the connection")  # ... used later
    assert log.read_text().splitlines() == [
        "sshnp [ 0.1s] tunnel ready",
        "sshnp: error: tunnel: relay connection lost: relay @rv reset the connection"]
    p = subprocess.Popen(["sleep", "30"], stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        assert StderrOf(p.pid).path is None
    finally:
        p.kill()
        p.wait()
    StderrOf(p.pid).error("gone")  # a process that is gone: nothing, no exception


PROBE = "import sys; from noports.client.cli import fdpass_stdio; sys.exit(7 if fdpass_stdio() else 3)"


def test_sshnp_stdio_detects_proxyusefdpass():
    a, b = socket.socketpair()
    with a, b:  # what OpenSSH gives a ProxyCommand with ProxyUseFdpass=yes
        fdpass = subprocess.run([sys.executable, "-c", PROBE], stdin=b, stdout=b, timeout=60)
    assert fdpass.returncode == 7
    piped = subprocess.run([sys.executable, "-c", PROBE], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, timeout=60)  # without it: two pipes
    assert piped.returncode == 3


def test_the_agent_raises_its_open_files_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = min(256, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
    try:
        got = raise_fd_limit()
        assert got[0] == hard or hard == resource.RLIM_INFINITY
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == got[0] > low or hard == low
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
