"""The example project's commands in commands/, run through forge.call as the worker will."""

from __future__ import annotations

import csv
import io
import json
import os
import time
from datetime import date
from pathlib import Path

import pytest
from conftest import ROOT

import forge

USERS = ROOT / "users.csv"


@pytest.fixture
def storage() -> Path:
    return Path(os.environ["FORGE_STORAGE"])


def read_jsonl(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- import:data -----------------------------------------------------------------------------


def test_import_data_imports_valid_rows(storage: Path) -> None:
    result = forge.call("import:data", [str(USERS), "--batch=2"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1] == "Imported 9 rows from users.csv (1 skipped)"
    assert "users.csv:7: skipped invalid row" in result.output  # names the bad line
    rows = read_jsonl(storage / "imports" / "users.jsonl")
    assert len(rows) == 9
    assert rows[0] == {"id": "1", "name": "Ada Lovelace", "email": "ada@example.com"}
    assert all("@" in str(r["email"]) for r in rows)
    assert not list((storage / "imports").glob("*.partial"))


def test_import_data_is_idempotent(storage: Path) -> None:
    for _ in range(2):
        assert forge.call("import:data", [str(USERS)]).ok
    assert len(read_jsonl(storage / "imports" / "users.jsonl")) == 9


@pytest.mark.parametrize("batch", ["1", "4", "1000"])
def test_import_data_batch_size_does_not_change_the_result(storage: Path, batch: str) -> None:
    assert forge.call("import:data", [str(USERS), "--batch", batch]).ok
    assert len(read_jsonl(storage / "imports" / "users.jsonl")) == 9


def test_import_data_dry_run_writes_nothing(storage: Path) -> None:
    result = forge.call("import:data", [str(USERS), "--dry-run"])
    assert result.ok and "Would import 9 rows from users.csv (1 skipped)" in result.output
    assert not (storage / "imports").exists()


def test_import_data_missing_file_is_a_usage_error(tmp_path: Path) -> None:
    result = forge.call("import:data", [str(tmp_path / "nope.csv")])
    assert result.exit_code == 2
    assert result.error and "nope.csv" in result.error and "does not exist" in result.error


def test_import_data_missing_columns(tmp_path: Path, storage: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("id,name\n1,Ada\n")
    result = forge.call("import:data", [str(bad)])
    assert result.exit_code == 1
    assert result.output == "bad.csv: missing column(s): email\n"
    assert not (storage / "imports" / "bad.jsonl").exists()


def test_import_data_rejects_bad_batch() -> None:
    assert forge.call("import:data", [str(USERS), "--batch=0"]).exit_code == 2


# --- report:generate -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sales", "inventory", "users"])
@pytest.mark.parametrize("fmt", ["csv", "json", "txt"])
def test_report_generate_writes_a_file(storage: Path, kind: str, fmt: str) -> None:
    assert forge.call("import:data", [str(USERS)]).ok
    result = forge.call("report:generate", [f"--type={kind}", "--format", fmt])
    assert result.exit_code == 0, result.output
    path = Path(result.output.strip())
    assert path == storage / "reports" / f"{kind}-{date.today().isoformat()}.{fmt}"
    text = path.read_text()
    if fmt == "json":
        data = json.loads(text)
        assert data["report"].startswith(kind) and data["rows"]
    elif fmt == "csv":
        assert list(csv.DictReader(io.StringIO(text)))
    else:
        assert text.startswith(f"{kind} report ")
    if kind == "users":
        assert "ada@example.com" in text


def test_report_generate_defaults_and_empty_users_report(storage: Path) -> None:
    path = Path(forge.call("report:generate").output.strip())
    assert path.name.startswith("sales-") and path.suffix == ".csv"
    empty = Path(forge.call("report:generate", ["--type", "users", "--format", "txt"]).output.strip())
    assert "(no rows)" in empty.read_text()


def test_report_generate_rejects_unknown_type() -> None:
    result = forge.call("report:generate", ["--type", "pdf"])
    assert result.exit_code == 2 and result.error and "--type" in result.error


# --- email:send ------------------------------------------------------------------------------


def test_email_send_appends_to_the_outbox(storage: Path) -> None:
    assert forge.call("email:send", ["--user=1"]).output == "Queued email for user 1\n"
    assert forge.call("email:send", ["--user", "2", "--subject", "Hi"]).ok
    mails = read_jsonl(storage / "outbox.jsonl")
    assert [(m["user"], m["subject"]) for m in mails] == [(1, "Hello from forge"), (2, "Hi")]
    assert all(m["created_at"] for m in mails)


@pytest.mark.parametrize("args", [[], ["--user", "0"], ["--user", "x"]])
def test_email_send_needs_a_user(args: list[str]) -> None:
    assert forge.call("email:send", args).exit_code == 2


# --- cleanup:temp-files ----------------------------------------------------------------------


def make_tmp_files(storage: Path) -> tuple[list[Path], list[Path]]:
    tmp = storage / "tmp"
    (tmp / "nested").mkdir(parents=True)
    old = [tmp / "old.txt", tmp / "nested" / "old.bin"]
    new = [tmp / "new.txt"]
    two_hours_ago = time.time() - 7200
    for path in old + new:
        path.write_text("x")
    for path in old:
        os.utime(path, (two_hours_ago, two_hours_ago))
    return old, new


def test_cleanup_deletes_only_old_files(storage: Path) -> None:
    old, new = make_tmp_files(storage)
    result = forge.call("cleanup:temp-files", ["--older-than", "1h"])
    assert result.output == "Deleted 2 temporary files older than 1h\n"
    assert not any(p.exists() for p in old) and all(p.exists() for p in new)
    assert (storage / "tmp" / "nested").is_dir()  # folders are kept


def test_cleanup_dry_run_deletes_nothing(storage: Path) -> None:
    old, new = make_tmp_files(storage)
    result = forge.call("cleanup:temp-files", ["--older-than=3h", "--dry-run"])
    assert result.output == "Would delete 0 temporary files older than 3h\n"
    result = forge.call("cleanup:temp-files", ["--dry-run"])
    assert result.output == "Would delete 2 temporary files older than 1h\n"
    assert all(p.exists() for p in old + new)


def test_cleanup_without_a_tmp_folder(storage: Path) -> None:
    assert forge.call("cleanup:temp-files").output == "Deleted 0 temporary files older than 1h\n"


def test_cleanup_rejects_a_bad_duration() -> None:
    result = forge.call("cleanup:temp-files", ["--older-than", "soon"])
    assert result.exit_code == 2 and result.error and "--older-than" in result.error


# --- demo:* ----------------------------------------------------------------------------------


def test_demo_sleep_sleeps() -> None:
    start = time.monotonic()
    result = forge.call("demo:sleep", ["0.2"])
    assert result.ok and result.output == "Sleeping 0.2 s\nDone\n"
    assert time.monotonic() - start >= 0.2


def test_demo_fail() -> None:
    raised = forge.call("demo:fail")
    assert raised.exit_code == 1 and raised.error == "RuntimeError: demo:fail failed on purpose"
    assert forge.call("demo:fail", ["--code", "5"]).exit_code == 5
    assert forge.call("demo:fail", ["--code=0"]).ok


def test_storage_defaults_to_the_current_directory(tmp_path: Path) -> None:
    """Without FORGE_STORAGE the commands write to ./storage (checked in a subprocess)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "FORGE_STORAGE"}
    result = subprocess.run(
        [sys.executable, "-m", "forge", "email:send", "--user", "3"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert read_jsonl(tmp_path / "storage" / "outbox.jsonl")[0]["user"] == 3
