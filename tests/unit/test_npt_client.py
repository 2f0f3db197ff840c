"""npt client pieces without sockets: -T durations, the official flags, the features a
device must have, the hint naming --permit-open."""

from __future__ import annotations

import pytest

from noports.client.errors import UsageError
from noports.client.npt_cli import parse_args
from noports.client.npt_flow import NptTarget, npt_required_features, refusal_hint
from noports.npproto.nptcontrol import NEVER_S, parse_duration


@pytest.mark.parametrize(("text", "secs"), [("30s", 30), ("1h", 3600), ("1h,14m,30s", 4470),
                                            ("7d", 604800), ("90", 90), ("0", NEVER_S),
                                            ("500ms", 0.5)])
def test_durations(text: str, secs: float) -> None:
    assert parse_duration(text) == secs


@pytest.mark.parametrize("text", ["", "abc", "10x", "-5s", "1h;2m"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_required_features() -> None:
    assert npt_required_features(NptTarget("localhost", 80)) == [
        "srAuth", "srE2ee", "supportsPortChoice"]
    assert "adjustableTimeout" in npt_required_features(NptTarget("localhost", 80, 60.0))


def test_refusal_hint_names_permit_open() -> None:
    opts = parse_args(["-f", "@c", "-t", "@d", "-r", "@r", "-d", "pi", "-p", "8080"])
    hint = refusal_hint(opts.params, opts.target,
                        "pi@d refused: Daemon does not permit connections to localhost:8080")
    assert hint is not None and "--permit-open localhost:8080" in hint


def test_official_flags() -> None:
    o = parse_args(["-f", "@c", "-t", "@d", "-r", "@r1,@r2", "-d", "pi", "--rp", "80",
                    "--rh", "10.0.0.5", "--lp", "8080", "-T", "1h,14m,30s", "--dpt", "5"])
    assert o.params.relays == ["@r1", "@r2"] and o.params.device == "pi"
    assert (o.target.host, o.target.port, o.target.timeout_s) == ("10.0.0.5", 80, 4470.0)
    assert o.local_port == 8080 and o.params.daemon_timeout == 5.0
    assert parse_args(["-f", "@c", "-t", "@d", "-r", "@r", "-d", "pi", "-p", "80", "-h",
                       "box", "-K"]).target.timeout_s == 24 * 3600.0


@pytest.mark.parametrize(("argv", "text"), [
    (["-p", "80", "-x", "-K"], "mutually exclusive"),
    (["-p", "80", "--no-et"], "always encrypted"),
    (["-p", "0"], "not a TCP port"),
    (["-p", "80", "-T", "soon"], "-T/--timeout"),
    (["-p", "80", "--pid-file", "/tmp/x"], "only applies with -x"),
])
def test_bad_command_lines(argv: list[str], text: str) -> None:
    with pytest.raises(UsageError, match=text):
        parse_args(["-f", "@c", "-t", "@d", "-r", "@r", "-d", "pi", *argv])
