"""Directory stores (SQLite), validation, store specs and the CLI's management commands."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from noports.directory import cli
from noports.directory.store import (
    DirectoryStore,
    DirectoryStoreError,
    InvalidAddressError,
    InvalidAtSignError,
    SqliteDirectoryStore,
    normalise_atsign,
    open_store,
    redact_url,
    validate_address,
)


@pytest.mark.parametrize(("given", "key"), [("@Alice", "alice"), ("alice", "alice"),
                                            ("@ALICE🛠", "alice🛠"), (" bob ", "bob")])
def test_normalise_atsign(given: str, key: str) -> None:
    assert normalise_atsign(given) == key


@pytest.mark.parametrize("bad", ["", "@", "a b", "a:b", "a\tb", "@@a", "a@b", "x" * 300])
def test_invalid_atsigns_are_rejected_with_a_reason(bad: str) -> None:
    with pytest.raises(InvalidAtSignError, match="invalid atSign"):
        normalise_atsign(bad)


@pytest.mark.parametrize(("given", "norm"), [("localhost:6464", "localhost:6464"),
                                             ("vip.ve.atsign.zone:025000",
                                              "vip.ve.atsign.zone:25000"),
                                             ("10.0.0.1:1", "10.0.0.1:1"),
                                             ("h:65535", "h:65535")])
def test_valid_addresses(given: str, norm: str) -> None:
    assert validate_address(given) == norm


@pytest.mark.parametrize(("bad", "why"), [("localhost", "exactly one"), ("::1:64", "exactly one"),
                                          (":64", "host"), ("h:0", "1-65535"),
                                          ("h:65536", "1-65535"), ("h:x", "number"),
                                          ("h:-1", "number"), ("a b:1", "host"),
                                          ("h:", "number")])
def test_invalid_addresses(bad: str, why: str) -> None:
    with pytest.raises(InvalidAddressError, match=why):
        validate_address(bad)


def test_sqlite_crud_and_official_key_layout(tmp_path: Path) -> None:
    db = tmp_path / "d.db"
    store = SqliteDirectoryStore(db)
    assert isinstance(store, DirectoryStore)
    store.set("@Alice🛠", "vip.ve.atsign.zone:25000")
    store.set("bob", "h:1")
    store.set("BOB", "h:2")  # update, same key
    assert store.get("alice🛠") == "vip.ve.atsign.zone:25000"
    assert store.get("@BOB") == "h:2"
    assert store.get("carol") is None
    assert store.list() == {"alice🛠": "vip.ve.atsign.zone:25000", "bob": "h:2"}
    assert store.delete("@bob") is True
    assert store.delete("bob") is False
    store.close()
    raw = sqlite3.connect(db)
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert raw.execute("SELECT atsign FROM directory").fetchall() == [("alice🛠",)]


def test_sqlite_rejects_bad_input_without_writing(tmp_path: Path) -> None:
    store = SqliteDirectoryStore(tmp_path / "d.db")
    with pytest.raises(InvalidAddressError):
        store.set("alice", "nope")
    with pytest.raises(InvalidAtSignError):
        store.set("a b", "h:1")
    assert store.list() == {}


def test_sqlite_unusable_file_is_a_store_error(tmp_path: Path) -> None:
    bad = tmp_path / "garbage.db"
    bad.write_bytes(b"this is not a database" * 100)
    with pytest.raises(DirectoryStoreError, match="garbage.db"):
        SqliteDirectoryStore(bad)


def test_open_store_specs(tmp_path: Path) -> None:
    a = open_store(f"sqlite://{tmp_path}/a.db")
    assert isinstance(a, SqliteDirectoryStore) and a.path == tmp_path / "a.db"
    b = open_store(str(tmp_path / "b.db"))
    assert isinstance(b, SqliteDirectoryStore) and b.path == tmp_path / "b.db"


@pytest.mark.parametrize(("spec", "why"), [("", "empty"), ("sqlite://relative.db", "three"),
                                           ("mysql://x", "unsupported scheme"),
                                           ("ftp://u:secret@h/x", "unsupported scheme")])
def test_bad_store_specs(spec: str, why: str) -> None:
    with pytest.raises(DirectoryStoreError, match=why) as info:
        open_store(spec)
    assert "secret" not in str(info.value)


def test_unreachable_redis_is_a_clear_store_error() -> None:
    with pytest.raises(DirectoryStoreError, match="cannot use Redis store") as info:
        open_store("redis://:hunter2@127.0.0.1:1/0")
    assert "hunter2" not in str(info.value)


def test_redact_url() -> None:
    assert redact_url("redis://:pw@h:6379/0") == "redis://:***@h:6379/0"
    assert redact_url("redis://u:pw@h/1") == "redis://u:***@h/1"
    assert redact_url("redis://h:6379/0") == "redis://h:6379/0"


# --------------------------------------------------------------------------- CLI (in-process)


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_register_lookup_list_unregister(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    st = ["--state-dir", str(tmp_path)]
    assert run_cli(capsys, "register", "@Alice🛠", "localhost:25000", *st)[0] == 0
    assert run_cli(capsys, "register", "bob", "10.1.2.3:6464", *st)[0] == 0
    rc, out, _ = run_cli(capsys, "lookup", "ALICE🛠", *st)
    assert (rc, out) == (0, "localhost:25000\n")
    rc, out, _ = run_cli(capsys, "list", *st)
    assert out == "@alice🛠 localhost:25000\n@bob 10.1.2.3:6464\n"
    rc, out, _ = run_cli(capsys, "list", "--json", *st)
    assert '"@bob": "10.1.2.3:6464"' in out
    assert run_cli(capsys, "unregister", "@bob", *st)[0] == 0
    rc, _, err = run_cli(capsys, "unregister", "@bob", *st)
    assert rc == 1 and "not registered" in err
    rc, _, err = run_cli(capsys, "lookup", "bob", *st)
    assert rc == 1 and "not registered" in err
    assert (tmp_path / "directory.db").exists()


@pytest.mark.parametrize(("argv", "why"), [
    (["register", "alice", "nohostport"], "invalid address"),
    (["register", "alice", "h:99999"], "1-65535"),
    (["register", "a b", "h:1"], "invalid atSign"),
    (["lookup", "alice", "--store", "bogus://x"], "unsupported scheme"),
    (["list", "--store", "redis://127.0.0.1:1/0"], "cannot use Redis store"),
])
def test_cli_errors_are_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        argv: list[str], why: str) -> None:
    rc, out, err = run_cli(capsys, *argv, "--state-dir", str(tmp_path))
    assert rc == 2
    assert err.startswith("atdirectory: error: ") and why in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_cli_default_subcommand_is_serve() -> None:
    assert cli._normalise_argv([]) == ["serve"]
    assert cli._normalise_argv(["--port", "0"]) == ["serve", "--port", "0"]
    assert cli._normalise_argv(["--log-level", "DEBUG", "--port", "0"]) == [
        "--log-level", "DEBUG", "serve", "--port", "0"]
    assert cli._normalise_argv(["list"]) == ["list"]
    assert cli._normalise_argv(["--help"]) == ["--help"]


def test_cli_help_mentions_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for name in cli.SUBCOMMANDS:
        assert name in out


def test_cli_bad_port_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["serve", "--port", "70000"])
    assert info.value.code == 2
    assert "port must be 0-65535" in capsys.readouterr().err
