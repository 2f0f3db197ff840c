"""Metadata update semantics, expiry and Dart JSON (docs/reference/atprotocol.md#crud-verbs, docs/reference/atprotocol.md#metadata)."""

from __future__ import annotations

import json

import pytest

from noports.atprotocol.errors import AtError
from noports.atprotocol.grammar import parse_command
from noports.atprotocol.metadata import (
    TTR_UNIT_MS,
    Metadata,
    apply_update,
    dart_date,
    from_storage,
    is_active,
    params_to_update,
    to_json,
    to_storage,
)

NOW = 1729504008982  # 2024-10-21 09:46:48.982Z
ME = "@alice"


def upd(line: str) -> dict:
    return params_to_update(parse_command(line).params)


def test_dart_date_reference_example() -> None:
    assert dart_date(NOW) == "2024-10-21 09:46:48.982Z"
    assert dart_date(0) == "1970-01-01 00:00:00.000Z"
    assert dart_date(-1) == "1969-12-31 23:59:59.999Z"
    assert dart_date(951782400000) == "2000-02-29 00:00:00.000Z"


def test_dart_date_out_of_datetime_range() -> None:
    assert dart_date(8_640_000_000_000_000) == "275760-09-13 00:00:00.000Z"
    year1 = -62135596800000  # datetime(1, 1, 1, tzinfo=UTC)
    assert dart_date(year1) == "0001-01-01 00:00:00.000Z"
    year0 = year1 - 366 * 86_400_000  # proleptic year 0 is a leap year
    assert dart_date(year0) == "0000-01-01 00:00:00.000Z"
    assert dart_date(year0 - 365 * 86_400_000) == "-0001-01-01 00:00:00.000Z"
    assert dart_date(253402300800000) == "10000-01-01 00:00:00.000Z"


def test_params_to_update_types() -> None:
    u = upd(
        "update:ttl:1000:ttb:0:ttr:-1:ccd:TRUE:dataSignature:sig:isBinary:false"
        ":isEncrypted:True:sharedKeyEnc:ske:pubKeyCS:cs:encoding:base64:encKeyName:k"
        ":encAlgo:AES:ivNonce:iv:skeEncKeyName:s:skeEncAlgo:RSA:@bob:x@alice v"
    )
    assert u == {
        "ttl": 1000,
        "ttb": 0,
        "ttr": -1,
        "ccd": True,
        "data_signature": "sig",
        "is_binary": False,
        "is_encrypted": True,
        "shared_key_enc": "ske",
        "pub_key_cs": "cs",
        "encoding": "base64",
        "enc_key_name": "k",
        "enc_algo": "AES",
        "iv_nonce": "iv",
        "ske_enc_key_name": "s",
        "ske_enc_algo": "RSA",
    }


def test_params_to_update_absent_and_null() -> None:
    assert upd("update:x@alice v") == {}
    u = upd("update:meta:xy@alice:dataSignature:null:ivNonce:abc")
    assert u == {"data_signature": None, "iv_nonce": "abc"}
    assert params_to_update({"sharedKeyStatus": "x"}) == {"shared_key_status": "x"}


@pytest.mark.parametrize(
    "params",
    [{"ttl": "-1"}, {"ttb": "-5"}, {"ttr": "-2"}, {"ttr": "-100"}, {"ttl": "x"}, {"ttl": "1" * 30}],
)
def test_params_to_update_invalid(params: dict[str, str]) -> None:
    with pytest.raises(AtError) as ei:
        params_to_update(params)
    assert ei.value.code == "AT0003"


@pytest.mark.parametrize(("ttr", "expected"), [("-1", -1), ("0", 0), ("1", 1)])
def test_params_ttr_valid(ttr: str, expected: int) -> None:
    assert params_to_update({"ttr": ttr}) == {"ttr": expected}


def test_apply_update_new_key() -> None:
    m = apply_update(None, {"is_encrypted": True}, now_ms=NOW, atsign=ME)
    assert m.created_at == NOW and m.updated_at == NOW
    assert m.created_by == ME and m.updated_by == ME
    assert m.version == 0
    assert m.status == "active"
    assert m.expires_at is None and m.available_at is None and m.refresh_at is None
    assert m.is_encrypted is True
    assert m.ccd is None  # no ttr -> ccd dropped


def test_apply_update_merge_keeps_and_resets() -> None:
    first = apply_update(
        None,
        {"data_signature": "sig", "iv_nonce": "iv1", "is_encrypted": True},
        now_ms=NOW,
        atsign=ME,
    )
    second = apply_update(
        first, {"iv_nonce": "iv2", "data_signature": None}, now_ms=NOW + 5, atsign=ME
    )
    assert second.iv_nonce == "iv2"
    assert second.data_signature is None
    assert second.is_encrypted is True  # absent keeps
    assert second.created_at == NOW
    assert second.updated_at == NOW + 5
    assert second.version == 1
    third = apply_update(second, {}, now_ms=NOW + 9, atsign=ME)
    assert third.version == 2
    assert first.version == 0  # inputs are not mutated


def test_apply_update_dates() -> None:
    m = apply_update(None, {"ttl": 1000, "ttb": 200, "ttr": 30}, now_ms=NOW, atsign=ME)
    assert m.available_at == NOW + 200
    assert m.expires_at == NOW + 1000 + 200
    assert m.refresh_at == NOW + 30 * TTR_UNIT_MS
    assert m.ccd is False  # ttr set -> ccd defaults false


def test_apply_update_ttl_zero_means_no_expiry() -> None:
    m = apply_update(None, {"ttl": 0}, now_ms=NOW, atsign=ME)
    assert m.ttl == 0
    assert m.expires_at is None


def test_apply_update_existing_ttl_recomputes_expiry() -> None:
    first = apply_update(None, {"ttl": 1000}, now_ms=NOW, atsign=ME)
    second = apply_update(first, {}, now_ms=NOW + 500, atsign=ME)
    assert second.expires_at == NOW + 1500


def test_apply_update_ttr_minus_one_caches_forever() -> None:
    m = apply_update(None, {"ttr": -1, "ccd": True}, now_ms=NOW, atsign=ME)
    assert m.ttr == -1
    assert m.refresh_at is None
    assert m.ccd is True


def test_ccd_only_kept_with_ttr() -> None:
    assert apply_update(None, {"ccd": True}, now_ms=NOW, atsign=ME).ccd is None
    cached = apply_update(None, {"ttr": 10, "ccd": True}, now_ms=NOW, atsign=ME)
    again = apply_update(cached, {}, now_ms=NOW, atsign=ME)
    assert again.ccd is True and again.ttr == 10
    unset = apply_update(cached, {"ttr": 0}, now_ms=NOW, atsign=ME)
    assert unset.ttr is None and unset.ccd is None and unset.refresh_at is None


def test_is_active() -> None:
    assert is_active(None, NOW)
    assert is_active(Metadata(), NOW)
    m = apply_update(None, {"ttl": 1000, "ttb": 100}, now_ms=NOW, atsign=ME)
    assert not is_active(m, NOW)  # not yet born
    assert is_active(m, NOW + 100)
    assert is_active(m, NOW + 1100)  # expiresAt >= now
    assert not is_active(m, NOW + 1101)


def test_to_json_names_order_and_nulls() -> None:
    m = apply_update(
        None, {"ttr": 86400000, "is_encrypted": True, "shared_key_enc": "x"}, now_ms=NOW, atsign=ME
    )
    j = to_json(m)
    assert list(j) == [
        "createdBy",
        "updatedBy",
        "createdAt",
        "updatedAt",
        "refreshAt",
        "status",
        "version",
        "ttr",
        "ccd",
        "isEncrypted",
        "sharedKeyEnc",
    ]
    assert j["createdAt"] == "2024-10-21 09:46:48.982Z"
    assert j["ttr"] == 86400000
    assert j["ccd"] is False
    assert None not in j.values()
    json.dumps(j)


def test_to_json_full_field_names() -> None:
    m = Metadata(
        **{
            "available_at": 1,
            "expires_at": 2,
            "ttl": 1,
            "ttb": 2,
            "is_binary": True,
            "data_signature": "d",
            "pub_key_cs": "p",
            "encoding": "e",
            "enc_key_name": "k",
            "enc_algo": "a",
            "iv_nonce": "i",
            "ske_enc_key_name": "s",
            "ske_enc_algo": "r",
            "shared_key_status": "st",
        }
    )
    assert set(to_json(m)) == {
        "availableAt",
        "expiresAt",
        "ttl",
        "ttb",
        "isBinary",
        "dataSignature",
        "pubKeyCS",
        "encoding",
        "encKeyName",
        "encAlgo",
        "ivNonce",
        "skeEncKeyName",
        "skeEncAlgo",
        "sharedKeyStatus",
    }


def test_storage_roundtrip() -> None:
    m = apply_update(
        None,
        {"ttl": 5, "ttb": 1, "ttr": -1, "ccd": True, "iv_nonce": "iv", "is_binary": False},
        now_ms=NOW,
        atsign=ME,
    )
    d = to_storage(m)
    assert json.loads(json.dumps(d)) == d
    assert from_storage(json.loads(json.dumps(d))) == m
    assert from_storage({**d, "futureField": 1}) == m
    assert from_storage({}) == Metadata()


def test_one_metadata_field_list_for_grammar_server_and_client():
    """The client's update fragment is parsed back by the server's grammar into the same fields."""
    from noports.atclient import e2e
    from noports.atprotocol import grammar
    from noports.atprotocol.metadata import UPDATE_PARAMS, params_to_update

    for wire_name, _attr, _kind in UPDATE_PARAMS:
        assert f"(?<{wire_name}>" in grammar.META
    frag = e2e.metadata_fragment(ttl_ms=5, ttr_ms=-1, ccd=True, data_signature="c2ln",
                                 is_encrypted=True, iv_nonce="aXY=")
    assert frag == ":ttl:5:ttr:-1:ccd:true:dataSignature:c2ln:isEncrypted:true:ivNonce:aXY="
    cmd = grammar.parse_command(f"update{frag}:phone@alice 123")
    update = params_to_update(cmd.params)
    assert {k: update[k] for k in ("ttl", "ttr", "ccd", "data_signature", "is_encrypted",
                                   "iv_nonce")} == {
        "ttl": 5, "ttr": -1, "ccd": True, "data_signature": "c2ln", "is_encrypted": True,
        "iv_nonce": "aXY="}
