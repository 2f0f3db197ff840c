"""Property test: parse_command never raises anything but AtError, whatever the input."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from noports.atprotocol.errors import AtError
from noports.atprotocol.grammar import Command, _parse, parse_command
from noports.atprotocol.keys import key_type

SEEDS = [
    "update:dataSignature:abc:isEncrypted:true:k@a value",
    "notify:id:773e2e60-8f40:update:isEncrypted:true:ivNonce:aXY=:@b:kk@a:Y3Q=",
    "monitor:0 .*",
    "scan:showHidden:true .*",
    "from:@alice🛠",
    'from:@alice:clientConfig:{"version":"3.0.57"}',
    "pkam:signingAlgo:rsa2048:hashingAlgo:sha256:enrollmentId:x:sig",
    "update:privatekey:at_pkam_publickey MIIB..",
    "delete:privatekey:at_secret",
    "llookup:all:shared_key.bob@alice",
    "lookup:shared_key@bob",
    "plookup:publickey@bob",
    "update:meta:@bob:phone@alice:ttr:10",
    "notify:list:2024-01-01",
    "notify:all:@b,@c:k@a:v",
    "stats:3:.*",
    "config:block:add:@a @b",
    "sync:from:-1:limit:10",
    "enroll:request:{}",
    "otp:put:ABCDEF",
    "keys:get:keyName:x",
    "info:brief",
    "noop:0",
    "pol",
    "@exit",
]

ALPHABET = st.sampled_from(list(":@ .*_-,{}[]\\()?+$^|\n\t\r0123456789aZéß🛠\x00\ud800"))

text = st.text(max_size=200)
mutated = st.tuples(
    st.sampled_from(SEEDS),
    st.lists(
        st.tuples(st.integers(0, 300), st.integers(0, 5), st.text(ALPHABET, max_size=6)),
        max_size=5,
    ),
)


def _mutate(seed: str, edits: list[tuple[int, int, str]]) -> str:
    s = seed
    for pos, delete, insert in edits:
        p = pos % (len(s) + 1)
        s = s[:p] + insert + s[p + delete :]
    return s


def _check(line: str) -> None:
    # `_parse` is the real logic, without parse_command's catch-all safety net, so a bug
    # (IndexError, regex error, ...) in the grammar makes this fail.
    for parse in (_parse, parse_command):
        try:
            cmd = parse(line)
        except AtError as err:
            assert err.code == "AT0003"
            continue
        assert isinstance(cmd, Command)
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in cmd.params.items())


@settings(max_examples=400, deadline=None)
@given(text)
def test_random_text_only_raises_aterror(line: str) -> None:
    _check(line)


@settings(max_examples=600, deadline=None)
@given(mutated)
def test_mutated_commands_only_raise_aterror(case: tuple[str, list]) -> None:
    seed, edits = case
    _check(_mutate(seed, edits))


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(SEEDS), text)
def test_seed_with_random_tail(seed: str, tail: str) -> None:
    _check(seed + tail)
    _check(seed.upper() + tail)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_key_type_total(key: str) -> None:
    key_type(key)
    key_type(key, "@alice")


def test_seeds_parse() -> None:
    for seed in SEEDS:
        assert isinstance(parse_command(seed), Command), seed
