"""``sshnp-connect``: the ProxyCommand that asks the agent for a tunnel (OpenSSH
``ProxyUseFdpass=yes``), hands ssh the connected socket and exits.

Why so small: OpenSSH starts one per host, so its start-up is paid N times. On the way to a
running agent it imports only ``os``, ``sys``, ``stat`` (``paths``), ``_socket`` and ``_json``
(``protocol``): the C modules under ``socket`` and ``json``, whose Python layers (enum,
selectors, re, collections) cost more than the rest of the connector (decision 0029); what
only the cold paths need (starting the agent, the fallback, ``--agent-stats``) is imported
there. It takes the arguments of ``sshnp --stdio`` plus its own ``--agent-*`` options; the
agent parses and checks the sshnp arguments, so they behave exactly as in ``sshnp --stdio``.

If there is no agent it starts one the way OpenSSH's ControlMaster=auto does (lock file,
detached process, wait for its socket). If the agent cannot be started or reached it warns
and starts today's standalone ``sshnp --stdio`` on a socket pair instead, so the user still
gets the tunnel (docs/agent.md#fallback).
"""

from __future__ import annotations

import _socket
import os
import sys

from . import paths
from . import protocol as proto

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing or socket costs start-up
if TYPE_CHECKING:
    from socket import socket

START_TIMEOUT_S = 20.0  # a cold interpreter + cryptography on a loaded 2-CPU box
EXIT_AGENT = 1


class Unavailable(Exception):
    """No agent to talk to; the text says why (the connector then runs standalone)."""


def _err(line: str) -> None:
    try:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def socket_address(d: str) -> str:
    """The socket's path, or a /proc/self/fd alias when the real one would not fit sun_path
    (108 bytes; AWX job dirs and pytest temp dirs are long)."""
    path = os.path.join(d, paths.SOCKET)
    if len(path.encode()) <= 100:
        return path
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)  # kept open for the life of the process
    return f"/proc/self/fd/{fd}/{paths.SOCKET}"


INT_SIZE = 4  # SCM_RIGHTS carries C ints


def send_fds(sock: socket, data: bytes, fds: list[int]) -> None:
    """``socket.send_fds`` on a ``_socket.socket`` (no ``array``: it imports collections)."""
    payload = b"".join(fd.to_bytes(INT_SIZE, sys.byteorder, signed=True) for fd in fds)
    sock.sendmsg([data], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, payload)])


def recv_fds(sock: socket, bufsize: int, maxfds: int) -> tuple[bytes, list[int]]:
    """``socket.recv_fds``: (data, received fds) from a ``_socket.socket``."""
    data, ancdata, _flags, _addr = sock.recvmsg(bufsize, _socket.CMSG_SPACE(maxfds * INT_SIZE))
    fds: list[int] = []
    for level, kind, cdata in ancdata:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            fds += [int.from_bytes(cdata[i:i + INT_SIZE], sys.byteorder, signed=True)
                    for i in range(0, len(cdata) - INT_SIZE + 1, INT_SIZE)]
    return data, fds


def try_connect(d: str) -> socket | None:
    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        s.connect(socket_address(d))
        return s
    except (FileNotFoundError, ConnectionRefusedError):
        s.close()
        return None
    except OSError as exc:
        s.close()
        raise Unavailable(f"cannot connect to {os.path.join(d, paths.SOCKET)}: "
                          f"{exc.strerror or exc}") from None


def _spawn_agent(d: str, idle: float) -> int:
    log = os.open(os.path.join(d, paths.LOG), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    null = os.open(os.devnull, os.O_RDONLY)
    try:
        argv = [sys.executable, "-m", "noports.agent", "--dir", d, "--idle", f"{idle:g}"]
        return os.posix_spawn(sys.executable, argv, os.environ, setsid=True, file_actions=[
            (os.POSIX_SPAWN_DUP2, null, 0), (os.POSIX_SPAWN_DUP2, log, 1),
            (os.POSIX_SPAWN_DUP2, log, 2)])
    except OSError as exc:
        raise Unavailable(f"cannot start {sys.executable} -m noports.agent: "
                          f"{exc.strerror or exc}") from None
    finally:
        os.close(log)
        os.close(null)


def _log_tail(d: str) -> str:
    try:
        with open(os.path.join(d, paths.LOG), "rb") as fh:
            fh.seek(0, 2)
            fh.seek(max(0, fh.tell() - 400))
            lines = fh.read().decode(errors="replace").strip().splitlines()
        return lines[-1] if lines else ""
    except OSError:
        return ""


def connect_or_start(d: str, idle: float) -> socket:
    """A connection to the agent in ``d``, starting it if needed (ControlMaster=auto style:
    whoever holds the lock starts it; the others wait for the socket)."""
    s = try_connect(d)
    if s is not None:
        return s
    import fcntl
    import time
    try:
        lock = os.open(os.path.join(d, paths.LOCK), os.O_WRONLY | os.O_CREAT, 0o600)
    except OSError as exc:
        raise Unavailable(f"cannot create the lock file in {d}: {exc.strerror or exc}"
                          ) from None
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                s = try_connect(d)
                if s is not None:
                    return s
                if time.monotonic() > deadline:
                    raise Unavailable(f"another process holds {paths.LOCK} in {d}") from None
                time.sleep(0.01)
        s = try_connect(d)  # started while we waited for the lock
        if s is not None:
            return s
        pid = _spawn_agent(d, idle)
        while time.monotonic() < deadline:
            s = try_connect(d)
            if s is not None:
                return s
            done, _status = os.waitpid(pid, os.WNOHANG)
            if done:
                tail = _log_tail(d)
                raise Unavailable("the agent exited at start" + (f": {tail}" if tail else ""))
            time.sleep(0.01)
        raise Unavailable(f"the agent did not open its socket within {START_TIMEOUT_S:g}s")
    finally:
        os.close(lock)  # releases the flock


def send_fd_to_ssh(fd: int) -> None:
    """OpenSSH ProxyUseFdpass: one byte with the fd as SCM_RIGHTS on our stdout."""
    out = _socket.socket(fileno=os.dup(1))
    try:
        send_fds(out, b"\0", [fd])
    finally:
        out.close()


def standalone(argv: list[str], reason: str | None) -> int:
    """Today's per-host client (``noports.agent.standalone``, the set-up of ``sshnp
    --stdio``) on one end of a socket pair; ssh gets the other."""
    if reason:
        _err(f"sshnp: warning: the sshnp agent is not available ({reason}); running a "
             "standalone sshnp for this host")
    a, b = _socket.socketpair()
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.posix_spawn(sys.executable, [sys.executable, "-m", "noports.agent.standalone",
                                            "--stdio", *argv], os.environ, setsid=True,
                           file_actions=[(os.POSIX_SPAWN_DUP2, a.fileno(), 0),
                                         (os.POSIX_SPAWN_DUP2, null, 1)])
        finally:
            os.close(null)
        send_fd_to_ssh(b.fileno())
    except OSError as exc:
        _err(f"sshnp: error: tunnel: cannot hand the tunnel to ssh: {exc.strerror or exc} "
             "(sshnp-connect needs ProxyUseFdpass=yes; use sshnp --stdio otherwise)")
        return 9
    return 0


def converse(s: socket, request: bytes, log_hint: str) -> tuple[proto.Reply, int | None]:
    """Send the request, echo progress and warnings to stderr, return the final reply and
    the fd that came with it."""
    s.sendall(request)
    lines = proto.LineBuffer()
    fd: int | None = None
    while True:
        data, fds = recv_fds(s, 65536, 1)
        for extra in fds:
            if fd is None:
                fd = extra
            else:
                os.close(extra)
        if not data:
            raise proto.ProtocolError(f"the agent closed the connection without an answer "
                                      f"(see {log_hint})")
        for line in lines.feed(data):
            reply = proto.parse_reply(line)
            if reply.kind == "progress":
                _err(reply.text)
            elif reply.kind == "warning":
                _err(f"sshnp: warning: {reply.text}")
            else:
                return reply, fd


def _split(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    own: dict[str, str] = {}
    rest: list[str] = []
    it = iter(argv)
    for a in it:
        name, eq, value = a.partition("=")
        if name in ("--agent-dir", "--agent-idle"):
            own[name] = value if eq else next(it, "")
        elif a in ("--no-agent", "--agent-stats"):
            own[a] = "1"
        else:
            rest.append(a)
    return own, rest


USAGE = """usage: sshnp-connect [--agent-dir DIR] [--agent-idle S] [--no-agent] [--agent-stats]
                     <the arguments of sshnp --stdio, without --stdio>

OpenSSH ProxyCommand (with ProxyUseFdpass=yes) that gets the tunnel from the per-user sshnp
agent, starting it if needed, and hands ssh the connected socket (docs/agent.md). The sshnp
arguments are those of `sshnp --help`.

  --agent-dir DIR  the agent's private directory (default $SSHNP_AGENT_DIR, else
                   $XDG_RUNTIME_DIR/sshnp-agent, else ~/.ansible/cp/sshnp-agent)
  --agent-idle S   idle seconds before an agent this run starts exits (default 60)
  --no-agent       run the standalone client for this connection
  --agent-stats    print the running agent's counters as JSON
"""


def main(argv: list[str] | None = None) -> int:
    own, rest = _split(list(sys.argv[1:] if argv is None else argv))
    if "-h" in rest or "--help" in rest:
        sys.stdout.write(USAGE)
        return 0
    if "--no-agent" in own:
        return standalone(rest, None)
    try:
        idle = float(own.get("--agent-idle") or os.environ.get(paths.ENV_IDLE)
                     or paths.DEFAULT_IDLE_S)
    except ValueError:
        _err(f"sshnp: error: arguments: --agent-idle expects seconds, got "
             f"{own.get('--agent-idle')!r}")
        return 2
    stats = "--agent-stats" in own
    try:
        d = paths.ensure_dir(own.get("--agent-dir") or paths.default_dir())
        if stats:  # asking for counters never starts an agent
            s = try_connect(d)
            if s is None:
                raise Unavailable(f"no agent is running in {d}")
        else:
            s = connect_or_start(d, idle)
    except (paths.AgentDirError, Unavailable) as exc:
        if stats:
            _err(f"sshnp: error: agent: {exc}")
            return EXIT_AGENT
        return standalone(rest, str(exc))
    log_hint = os.path.join(d, paths.LOG)
    try:
        request = proto.encode_request("stats" if stats else "open", rest, os.getcwd())
        reply, fd = converse(s, request, log_hint)
    except (OSError, proto.ProtocolError) as exc:
        _err(f"sshnp: error: agent: {exc}")
        return EXIT_AGENT
    finally:
        s.close()
    if reply.kind == "error":
        _err(f"sshnp: error: {reply.text}")
        return reply.exit_code
    if stats:
        import json
        sys.stdout.write(json.dumps(reply.info) + "\n")
        return 0
    if fd is None:
        _err(f"sshnp: error: agent: the agent answered without a tunnel socket (see {log_hint})")
        return EXIT_AGENT
    try:
        send_fd_to_ssh(fd)
    except OSError as exc:
        _err(f"sshnp: error: tunnel: cannot hand the tunnel to ssh: {exc.strerror or exc} "
             "(sshnp-connect needs ProxyUseFdpass=yes; use sshnp --stdio otherwise)")
        return 9
    finally:
        os.close(fd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
