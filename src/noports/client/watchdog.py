"""A last-resort bound on sshnp's session set-up that holds even when the event loop is stuck.

Why a thread: every wait of the set-up has an asyncio timeout, but those only fire while the
event loop runs. A synchronous call that blocks the loop (a lock, a C library stuck) would
stop all of them, and sshnp would hang with its connections open. The watchdog runs beside
the loop: if set-up is still not done ``grace`` seconds after its limit
(:func:`noports.client.flow.setup_limit`), it prints every thread's stack (what hung), then
``sshnp: error: <step>: ...`` naming the step the set-up was waiting on, and exits.

The same thread bounds the wind-down after ssh exits (:func:`arm_exit`): asyncio.run()
cancels and awaits every task left, and one that ignored its cancellation once kept sshnp
alive for good (see noports.atclient.aio._bounded).

CLI only: the library (``open_session``, the Ansible plugin) must never exit its caller.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading

GRACE_S = 15.0


EXIT_LIMIT_S = 30.0


class SetupWatchdog:
    def __init__(self, limit: float, grace: float = GRACE_S, *,
                 exit_code: int | None = None) -> None:
        self.after = limit + grace
        self.exit_code = exit_code  # None: the code of the step's error
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="sshnp-watchdog", daemon=True)

    def start(self) -> SetupWatchdog:
        self._thread.start()
        return self

    def disarm(self) -> None:
        """Set-up finished (or failed with its own message): stand down."""
        self._done.set()

    def _watch(self) -> None:
        if not self._done.wait(self.after):
            self.fire()

    def fire(self) -> None:
        from .flow import CURRENT_STEP
        cls, step, what = CURRENT_STEP[0]
        if self.exit_code is not None:
            step, what = "exit", "winding down after ssh exited"
        err = sys.stderr
        try:
            err.write(f"sshnp: set-up stalled for {self.after:g}s; stacks of its threads:\n")
            err.flush()
            faulthandler.dump_traceback(file=err, all_threads=True)
            err.write(f"sshnp: error: {step}: {what}: no progress for {self.after:g}s "
                      "(the client was blocked; please report the stacks above)\n")
            err.flush()
        finally:
            os._exit(cls.exit_code if self.exit_code is None else self.exit_code)


_CURRENT: list[SetupWatchdog] = []


def arm(limit: float, grace: float = GRACE_S) -> SetupWatchdog:
    """Start the watchdog of this process's set-up."""
    wd = SetupWatchdog(limit, grace).start()
    _CURRENT.append(wd)
    return wd


def arm_exit(exit_code: int, limit: float = EXIT_LIMIT_S) -> SetupWatchdog:
    """Bound the wind-down after the session (tasks cancelled and awaited by asyncio.run):
    past ``limit`` s, stacks and exit with ``exit_code`` (ssh's own)."""
    wd = SetupWatchdog(limit, 0.0, exit_code=exit_code).start()
    _CURRENT.append(wd)
    return wd


def disarm() -> None:
    """Set-up is over (session ready or failed): the watchdog of this process stands down."""
    while _CURRENT:
        _CURRENT.pop().disarm()
