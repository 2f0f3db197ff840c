"""A last-resort bound on sshnp's session set-up that holds even when the event loop is stuck.

Why a thread: every wait of the set-up has an asyncio timeout, but those only fire while the
event loop runs. A synchronous call that blocks the loop (a lock, a C library stuck) would
stop all of them, and sshnp would hang with its connections open. The watchdog runs beside
the loop: if set-up is still not done ``grace`` seconds after its limit
(:func:`noports.client.flow.setup_limit`), it prints every thread's stack (what hung), then
``sshnp: error: <step>: ...`` naming the step the set-up was waiting on, and exits.

CLI only: the library (``open_session``, the Ansible plugin) must never exit its caller.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading

GRACE_S = 15.0


class SetupWatchdog:
    def __init__(self, limit: float, grace: float = GRACE_S) -> None:
        self.after = limit + grace
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
        err = sys.stderr
        try:
            err.write(f"sshnp: set-up stalled for {self.after:g}s; stacks of its threads:\n")
            err.flush()
            faulthandler.dump_traceback(file=err, all_threads=True)
            err.write(f"sshnp: error: {step}: {what}: no progress for {self.after:g}s "
                      "(the client was blocked; please report the stacks above)\n")
            err.flush()
        finally:
            os._exit(cls.exit_code)


_CURRENT: list[SetupWatchdog] = []


def arm(limit: float, grace: float = GRACE_S) -> SetupWatchdog:
    """Start the watchdog of this process's set-up."""
    wd = SetupWatchdog(limit, grace).start()
    _CURRENT.append(wd)
    return wd


def disarm() -> None:
    """Set-up is over (session ready or failed): the watchdog of this process stands down."""
    while _CURRENT:
        _CURRENT.pop().disarm()
