"""Error codes and reply formats (docs/reference/atprotocol.md#error-replies-and-codes)."""

from __future__ import annotations

import json

import pytest

from noports.atprotocol import errors
from noports.atprotocol.errors import ERROR_TEXT, AtError, error_reply, wants_json_errors


def test_legacy_authenticated_reference_example() -> None:
    err = errors.key_not_found("foo@alice")
    assert (
        error_reply(err, json_style=False, authenticated=True)
        == "error:AT0015-key not found : foo@alice does not exist in keystore"
    )


def test_legacy_unauthenticated_uses_exception_tostring() -> None:
    err = errors.invalid_syntax("invalid command")
    assert error_reply(err, json_style=False, authenticated=False) == (
        "error:AT0003-Exception: invalid command"
    )


def test_json_style() -> None:
    err = AtError("AT0015", "x@alice does not exist in keystore")
    body = error_reply(err, json_style=True, authenticated=True)
    assert body.startswith('error:{"errorCode":"AT0015","errorDescription":')
    assert " " not in body.split('"errorDescription":')[0]  # compact JSON
    parsed = json.loads(body[len("error:") :])
    assert parsed == {
        "errorCode": "AT0015",
        "errorDescription": "key not found : x@alice does not exist in keystore",
    }
    unauth = json.loads(error_reply(err, json_style=True, authenticated=False)[6:])
    assert unauth["errorDescription"] == "Exception: x@alice does not exist in keystore"


def test_python_sdk_can_parse_legacy_code() -> None:
    # at_client/connections/response.py: text before the first '-' of the part before ':'.
    body = error_reply(errors.invalid_key("bad"), json_style=False, authenticated=True)
    assert body[len("error:") :].split(":")[0].split("-")[0] == "AT0016"


def test_reply_has_no_newline() -> None:
    body = error_reply(errors.unauthenticated("x"), json_style=False, authenticated=False)
    assert "\n" not in body


def test_error_table() -> None:
    assert ERROR_TEXT["AT0003"] == "Invalid syntax"
    assert ERROR_TEXT["AT0401"] == "Client authentication failed"
    assert ERROR_TEXT["AT0016"] == "Invalid key"
    assert ERROR_TEXT["AT0024"] == "Server is paused"
    assert len(ERROR_TEXT) == 28


@pytest.mark.parametrize(
    ("factory", "code", "close"),
    [
        (errors.invalid_syntax, "AT0003", False),
        (errors.unauthenticated, "AT0401", False),
        (errors.key_not_found, "AT0015", False),
        (errors.invalid_key, "AT0016", False),
        (errors.illegal_argument, "AT0022", False),
        (errors.unauthorized, "AT0009", False),
        (errors.buffer_overflow, "AT0005", True),
        (errors.internal, "AT0011", True),
    ],
)
def test_constructors(factory, code: str, close: bool) -> None:
    err = factory("m")
    assert isinstance(err, AtError)
    assert err.code == code
    assert err.close is close


def test_key_not_found_message() -> None:
    assert errors.key_not_found("k@a").message == "k@a does not exist in keystore"


def test_aterror_defaults() -> None:
    err = AtError("AT0003", "m")
    assert (err.code, err.message, err.close) == ("AT0003", "m", False)
    assert AtError("AT0013", "blocked", close=True).close


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (None, False),
        ({}, False),
        ({"version": "3.0.37"}, False),
        ({"version": "3.0.36"}, False),
        ({"version": "3.0.38"}, True),
        ({"version": "3.0.57"}, True),
        ({"version": "3.1.0"}, True),
        ({"version": "4.0.0"}, True),
        ({"version": "2.99.99"}, False),
        ({"version": "3.0.100"}, True),
        ({"version": "3.0.57-beta.1"}, True),
        ({"version": "garbage"}, False),
        ({"version": 3}, False),
        ({"version": None}, False),
        ({"version": ""}, False),
        ("3.0.57", False),
        ([1, 2], False),
    ],
)
def test_wants_json_errors(config, expected: bool) -> None:
    assert wants_json_errors(config) is expected
