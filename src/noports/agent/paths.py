"""Where the agent lives: a private per-user (per AWX job) directory, checked before use.

Why a directory and not just a socket path: the socket, its lock file and the agent's log
sit together in one place only the owning user can enter (0700, owned by us), which is the
first of two locks on the door (the second is the SO_PEERCRED check of every connection).
Under AWX the plugin points it into the job's own ssh control dir, so two jobs never share
an agent. ``$SSHNP_AGENT_DIR`` overrides the default for ``sshnp-connect`` users.
"""

from __future__ import annotations

import os
import stat

ENV_DIR = "SSHNP_AGENT_DIR"
ENV_IDLE = "SSHNP_AGENT_IDLE"
SOCKET = "agent.sock"
LOCK = "agent.lock"
LOG = "agent.log"
DEFAULT_IDLE_S = 60.0


class AgentDirError(Exception):
    """The directory cannot be used; the text says why and what to check."""


def default_dir() -> str:
    """``$SSHNP_AGENT_DIR``, else ``$XDG_RUNTIME_DIR/sshnp-agent``, else
    ``~/.ansible/cp/sshnp-agent`` (the ssh plugin's control dir, per user)."""
    env = os.environ.get(ENV_DIR)
    if env:
        return os.path.expanduser(env)
    run = os.environ.get("XDG_RUNTIME_DIR")
    if run and os.path.isdir(run):
        return os.path.join(run, "sshnp-agent")
    return os.path.join(os.path.expanduser("~"), ".ansible", "cp", "sshnp-agent")


def check_private(st: os.stat_result, uid: int) -> str | None:
    """Why a directory with this stat is not private to ``uid``, or None (pure)."""
    if not stat.S_ISDIR(st.st_mode):
        return "not a directory"
    if st.st_uid != uid:
        return f"owned by uid {st.st_uid}, not {uid}"
    if st.st_mode & 0o077:
        return f"mode {stat.S_IMODE(st.st_mode):04o} lets others in (want 0700)"
    return None


def ensure_dir(path: str) -> str:
    """Create (0700) or check ``path``; AgentDirError when it is not ours alone."""
    path = os.path.abspath(os.path.expanduser(path))
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.lstat(path)
    except OSError as exc:
        raise AgentDirError(f"cannot create {path}: {exc.strerror or exc}") from None
    why = check_private(st, os.getuid())
    if why:
        raise AgentDirError(f"{path} is {why}")
    if not os.access(path, os.W_OK | os.X_OK):
        raise AgentDirError(f"{path} is not writable")
    return path
