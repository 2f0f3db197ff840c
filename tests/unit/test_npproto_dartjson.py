"""dart_json_encode must equal Dart's jsonEncode byte for byte (hand-written expectations)."""

import json

import pytest

from noports.npproto import DartJsonError, ProtocolError, dart_json_decode, dart_json_encode


@pytest.mark.parametrize(("value", "expected"), [
    ({}, "{}"),
    ([], "[]"),
    ({"a": 1, "b": True, "c": None, "d": False}, '{"a":1,"b":true,"c":null,"d":false}'),
    ({"z": 1, "a": 2}, '{"z":1,"a":2}'),  # insertion order, never sorted
    ({"port": -38051, "big": 2**63 - 1}, '{"port":-38051,"big":9223372036854775807}'),
    ("a/b", '"a/b"'),  # '/' is not escaped
    ("café ✓ 😀", '"café ✓ 😀"'),  # non-ASCII and astral chars as is
    ('q"b\\s', '"q\\"b\\\\s"'),
    ("\b\f\n\r\t", '"\\b\\f\\n\\r\\t"'),
    ("\x00\x01\x0b\x1f", '"\\u0000\\u0001\\u000b\\u001f"'),  # lower-case hex
    ("\x7f\x80\u2028", '"\x7f\x80\u2028"'),  # DEL, C1 and U+2028 are not escaped by Dart
    ("\ud800x", '"\\ud800x"'),  # a lone surrogate is escaped, like Dart does
    ([1, [2, {"k": "v"}]], '[1,[2,{"k":"v"}]]'),
    ((1, 2), "[1,2]"),
])
def test_matches_dart(value, expected):
    assert dart_json_encode(value) == expected


def test_openssh_private_key_newlines():
    pem = ("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA/+x=\n"
           "-----END OPENSSH PRIVATE KEY-----\n")
    expected = ('{"ephemeralPrivateKey":"-----BEGIN OPENSSH PRIVATE KEY-----\\n'
                'b3BlbnNzaC1rZXktdjEAAAAA/+x=\\n-----END OPENSSH PRIVATE KEY-----\\n"}')
    assert dart_json_encode({"ephemeralPrivateKey": pem}) == expected


def test_differs_from_python_default_where_it_matters():
    value = {"a": "é/😀", "b": [1, 2]}
    assert dart_json_encode(value) != json.dumps(value)  # spaces, \u escapes
    assert dart_json_encode(value) == '{"a":"é/😀","b":[1,2]}'


@pytest.mark.parametrize("bad", [1.0, {"timeout": 30.5}, [float("nan")]])
def test_floats_rejected_with_clear_error(bad):
    with pytest.raises(DartJsonError, match="float"):
        dart_json_encode(bad)


def test_float_error_names_the_path():
    with pytest.raises(DartJsonError, match=r"\$\.payload\.timeout"):
        dart_json_encode({"payload": {"timeout": 1.5}})


@pytest.mark.parametrize("bad", [{1: "x"}, {"s": {1, 2}}, {"b": b"bytes"}, 2**63])
def test_other_unencodable_values(bad):
    with pytest.raises(DartJsonError):
        dart_json_encode(bad)


def test_decode_roundtrip_keeps_order_and_text():
    text = '{"z":"a\\nb","a":[true,null,-1],"m":{"y":1,"x":"\\u0001/é"}}'
    assert dart_json_encode(dart_json_decode(text)) == text
    # a peer's extra whitespace or escaping normalises to Dart's form
    assert dart_json_encode(dart_json_decode('{ "k" : "\\/\\u00e9" }')) == '{"k":"/é"}'


@pytest.mark.parametrize("bad", ['{"t":1.0}', '{"t":1e3}', "[NaN]", "[Infinity]", "{", b"\xff"])
def test_decode_rejects(bad):
    with pytest.raises(ProtocolError):
        dart_json_decode(bad)
