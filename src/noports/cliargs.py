"""Small helpers shared by the command-line tools (noports, atdirectory, srvd) and atserver.

Why a module of its own: each tool had private copies of the same few lines. It imports
nothing from the rest of the package, so any tool can use it without import cycles or
pulling in an optional subsystem.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def arg_type(convert: Callable[[str], T], what: str, valid: Callable[[T], bool],
             error: str) -> Callable[[str], T]:
    """An argparse ``type=``: ``convert(text)``, then ``valid(value)``.

    Failures raise ArgumentTypeError, whose text argparse prints verbatim after the option
    name: ``not {what}: 'TEXT'`` when ``convert`` fails, else ``error`` formatted with
    ``text`` and ``value``. The wording is a parameter because each tool keeps its own
    (users and tests see it).
    """
    def parse(text: str) -> T:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None
        if not valid(value):
            raise argparse.ArgumentTypeError(error.format(text=text, value=value))
        return value
    return parse


def port_type(error: str) -> Callable[[str], int]:
    """An argparse ``type=`` for a TCP port 0-65535 (0 = let the OS choose); see arg_type."""
    return arg_type(int, "a port number", lambda v: 0 <= v <= 65535, error)


def pid_alive(pid: object) -> bool:
    """Whether process `pid` exists (signal 0; owned by another user still counts).

    Anything but a positive int (a missing or corrupt pid in a state file) is "not alive".
    """
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
