"""Errors of the sshnp client: every expected failure names its step and what to check.

Why a class per step: the CLI turns these into one-line messages and documented exit codes
(docs/sshnp.md), and the Ansible plugin turns them into ``AnsibleConnectionFailure`` with the
same text, so nobody ever has to read a traceback to learn that a relay did not answer.
"""

from __future__ import annotations

# Exit codes (documented in docs/sshnp.md). In exec mode a successful setup exits with ssh's
# own code instead (ssh uses 255 for its errors).
EXIT_OK = 0
EXIT_FAILURE = 1  # unexpected error (a bug): the message says so
EXIT_USAGE = 2  # bad flags / profile
EXIT_KEYS = 3  # .atKeys missing or unreadable, bad CA file
EXIT_ATSERVER = 4  # directory / atServer unreachable, TLS not trusted, PKAM refused
EXIT_RELAY = 5  # no relay answered or it refused (NACK), or its port could not be reached
EXIT_DEVICE_TIMEOUT = 6  # the device daemon did not answer in time
EXIT_DEVICE_REFUSED = 7  # the device answered with an error / lacks a needed feature
EXIT_SECURITY = 8  # bad signature, host key mismatch, malformed signed response
EXIT_TUNNEL = 9  # data path failed (outer ssh, local port, relay dropped)
EXIT_INTERRUPTED = 130


class SshnpError(Exception):
    """An expected failure: ``step`` failed with ``message``; ``hint`` says what to check."""

    exit_code = EXIT_FAILURE
    step = "sshnp"
    #: already printed (by the tunnel, before it closed stdout): do not print it again
    reported = False

    def __init__(self, message: str, *, hint: str | None = None, step: str | None = None,
                 exit_code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        if step is not None:
            self.step = step
        if exit_code is not None:
            self.exit_code = exit_code

    def __str__(self) -> str:
        text = f"{self.step}: {self.message}"
        if self.hint:
            text += f" ({self.hint})"
        return text


class UsageError(SshnpError):
    exit_code = EXIT_USAGE
    step = "arguments"


class KeysError(SshnpError):
    exit_code = EXIT_KEYS
    step = "keys"


class AtServerError(SshnpError):
    exit_code = EXIT_ATSERVER
    step = "atServer"


class RelayError(SshnpError):
    exit_code = EXIT_RELAY
    step = "relay"


def relay_refused(relay: str, reason: str) -> RelayError:
    """The relay's NACK (``nack.<sid>.sshrvd``): its own words, made printable and short,
    since they come from another party and end up on the user's terminal."""
    text = "".join(c if c.isprintable() else "?" for c in reason.strip())[:300]
    return RelayError(f"relay {relay} refused: {text or '(no reason given)'}")


class DeviceTimeout(SshnpError):
    exit_code = EXIT_DEVICE_TIMEOUT
    step = "device"


class DeviceRefused(SshnpError):
    exit_code = EXIT_DEVICE_REFUSED
    step = "device"


class SecurityError(SshnpError):
    exit_code = EXIT_SECURITY
    step = "verify"


class TunnelError(SshnpError):
    exit_code = EXIT_TUNNEL
    step = "tunnel"
