"""Progress lines on stderr: one per step, with the time since start.

Why not ``logging``: these are for the person at the terminal (and for the Ansible ``-vvv``
log), short and stable; ``-q`` silences them, errors are always printed. Debug detail goes
through ``logging`` (``-v``).
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO


class Progress:
    """Callable reporter: ``progress("asking relay @r for ports")``."""

    def __init__(self, quiet: bool = False, stream: TextIO | None = None,
                 start: float | None = None) -> None:
        self.quiet = quiet
        self.stream = stream
        self.start = time.monotonic() if start is None else start
        self.lines: list[str] = []  # what was reported (tests, error context)

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def __call__(self, message: str) -> None:
        line = f"sshnp [{self.elapsed():6.3f}s] {message}"
        self.lines.append(line)
        if not self.quiet:
            self._write(line)

    def error(self, message: str) -> None:
        self._write(f"sshnp: error: {message}")

    def warning(self, message: str) -> None:
        """Printed even with ``-q``: for what the user must see (a pinned host key replaced)."""
        self.lines.append(f"sshnp: warning: {message}")
        self._write(f"sshnp: warning: {message}")

    def _write(self, line: str) -> None:
        stream = self.stream or sys.stderr
        try:
            stream.write(line + "\n")
            stream.flush()
        except (OSError, ValueError):
            pass  # stderr closed (detached tunnel): nothing to tell anyone


class NullProgress(Progress):
    def __init__(self) -> None:
        super().__init__(quiet=True)

    def warning(self, message: str) -> None:
        """Library use (no terminal): warnings go to ``logging``, not to stderr."""
        self.lines.append(f"sshnp: warning: {message}")
        logging.getLogger("noports.client").warning("%s", message)
