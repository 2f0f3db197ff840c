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


def test_a_failed_session_does_not_cancel_the_shared_key_pair():
    """The flow cancels its key future when a set-up fails (asyncio.wrap_future passes that
    on): an unknown client atSign on one host then failed every later host of the agent."""
    import asyncio
    import threading

    from noports.agent.keypool import KeyPool
    gate = threading.Event()

    def make():
        gate.wait(10)
        return "pub", object()

    pool = KeyPool(make)

    async def failing_session() -> None:
        waiting = asyncio.ensure_future(asyncio.wrap_future(pool.take()))
        await asyncio.sleep(0)
        waiting.cancel()  # flow.cleanup() of a failed set-up
        await asyncio.gather(waiting, return_exceptions=True)

    asyncio.run(failing_session())
    gate.set()
    assert pool.take().result(timeout=10)[0] == "pub"
