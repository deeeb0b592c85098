"""queue:dispatch's one table of options (``forge.cli.dispatch_options``): the Typer command, the
fast path and ``--from-file`` read it, and an option gives the same job whichever way it comes;
the fast path says why it fell back to the full command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from forge.cli import fastpath
from forge.cli.dispatch_options import FAST, FILE_KEYS, OPTIONS
from forge.cli.main import exit_code_of_error, main, run_full
from forge.errors import EXIT_ERROR, EXIT_UNKNOWN_COMMAND, UnknownCommand, UnknownQueuedCommand
from forge.queue.manager import connect
from forge.registry.runner import click_command, default_registry

Capsys = pytest.CaptureFixture[str]
#: What differs between two dispatches of the same job: its identity and its times.
VOLATILE = ("id", "dispatched_at", "available_at", "idempotency_key", "unique_key")


def _job(job_id: str) -> dict[str, Any]:
    info = connect().find(job_id)
    assert info is not None, job_id
    d = info.job.to_dict()
    for key in VOLATILE:
        d.pop(key, None)
    return d


def _dispatched_id(capsys: Capsys) -> str:
    out = capsys.readouterr().out.split()
    assert len(out) == 1, out
    return out[0]


def test_the_typer_command_has_exactly_the_tables_options() -> None:
    cmd = click_command(default_registry().resolve("queue:dispatch"))
    params = {p.name: p for p in cmd.params}
    assert set(params) == {"command", "args", *(o.key for o in OPTIONS)}
    for o in OPTIONS:
        p = params[o.key]
        assert p.opts == [o.flag] and p.help == o.help, o.key
        assert p.is_flag == (o.kind == "flag") and p.multiple == (o.kind == "meta"), o.key  # type: ignore[attr-defined]
        if o.kind == "count":
            assert p.type.min == o.least and p.type.name == "int range", o.key  # type: ignore[attr-defined]
    assert [p.name for p in cmd.params][2:] == [o.key for o in OPTIONS]  # --help lists them in table order


def test_the_file_keys_are_the_tables() -> None:
    assert FILE_KEYS == {"command", "args", "queue", "delay", "tries", "timeout", "backoff", "meta", "unique_key",
                         "unique_ttl", "retry_until", "max_exceptions", "max_releases", "concurrency_key",
                         "concurrency", "rate_key", "rate", "burst", "isolated", "on_busy"}


#: Option values that each of the three ways takes: (CLI text or texts, --from-file JSON value).
VALUES: dict[str, list[tuple[Any, Any]]] = {
    "queue": [("low", "low"), ("high", "high")],
    "delay": [("90s", "90s"), ("5m", "5m")],
    "tries": [("1", 1), ("3", 3)],
    "timeout": [("90s", "90s"), ("10m", "10m")],
    "backoff": [("1,5", "1,5"), ("exp:2s..10m,jitter=full", "exp:2s..10m,jitter=full")],
    "retry_until": [("2031-01-01T09:00", "2031-01-01T09:00")],
    "max_exceptions": [("1", 1), ("4", 4)],
    "max_releases": [("0", 0), ("7", 7)],
    "meta": [(["tenant=acme"], {"tenant": "acme"}), (["n=3", "tags=[1,2]"], {"n": 3, "tags": [1, 2]})],
    "unique_ttl": [("1h", "1h")],
    "concurrency_key": [("tenant:42", "tenant:42")],
    "concurrency": [("2", 2)],
    "rate_key": [("api:x", "api:x")],
    "rate": [("100/m", "100/m")],
    "burst": [("3", 3)],
}


@st.composite
def option_sets(draw: Any) -> dict[str, tuple[Any, Any]]:
    chosen = draw(st.sets(st.sampled_from(sorted(VALUES))))
    if "concurrency" in chosen or "concurrency_key" in chosen:
        chosen |= {"concurrency_key", "concurrency"}  # a key needs its limit (no [limits.keys] here)
    if "burst" in chosen or "rate" in chosen or "rate_key" in chosen:
        chosen |= {"rate_key", "rate"}
    return {k: draw(st.sampled_from(VALUES[k])) for k in sorted(chosen)}


def _argv(options: dict[str, tuple[Any, Any]], unique: str) -> list[str]:
    argv = []
    for key, (text, _) in options.items():
        flag = _flag(key)
        assert flag in FAST  # the fast path takes every option of VALUES
        for item in text if isinstance(text, list) else [text]:
            argv.append(f"{flag}={item}")
    if "unique_ttl" in options:
        argv.append(f"--unique-key={unique}")
    return argv


def _flag(key: str) -> str:
    return next(o.flag for o in OPTIONS if o.key == key)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(options=option_sets())
def test_an_option_gives_the_same_job_via_typer_the_fast_path_and_from_file(
        tmp_path: Path, capsys: Capsys, options: dict[str, tuple[Any, Any]]) -> None:
    n = len(list(tmp_path.glob("line-*.jsonl")))
    command = ["email:send", "--user", "2"]
    assert main(["queue:dispatch", "email:send", "--user", "1"]) == 0  # the cache, for the fast path
    capsys.readouterr()
    assert run_full(["queue:dispatch", *_argv(options, f"typer-{n}"), *command]) == 0
    typer_job = _job(_dispatched_id(capsys))
    fast = fastpath.attempt(["queue:dispatch", *_argv(options, f"fast-{n}"), *command])
    assert fast is not None and fast.code == 0, fast
    fast_job = _job(_dispatched_id(capsys))
    line = {"command": "email:send", "args": command[1:], **{k: v for k, (_, v) in options.items()}}
    if "unique_ttl" in options:
        line["unique_key"] = f"file-{n}"
    source = tmp_path / f"line-{n}.jsonl"
    source.write_text(json.dumps(line) + "\n")
    assert run_full(["queue:dispatch", f"--from-file={source}"]) == 0
    file_job = _job(_dispatched_id(capsys))
    assert typer_job == fast_job == file_job
    if "queue" in options:
        assert typer_job["queue"] == options["queue"][1]
    if "tries" in options:
        assert typer_job["max_attempts"] == options["tries"][1]


@pytest.mark.parametrize("argv", [
    ["--at=2031-01-01T09:00"], ["--idempotency-key=k-1"], ["--connection=file"], ["--json"],
    ["--meta=a={\"b\": [1]}", "--meta", "c=d"],
])
def test_the_options_only_the_command_line_takes_agree_on_both_paths(capsys: Capsys, argv: list[str]) -> None:
    assert main(["queue:dispatch", "email:send", "--user", "1"]) == 0  # the cache, for the fast path
    capsys.readouterr()
    assert run_full(["queue:dispatch", *argv, "email:send", "--user", "5"]) == 0
    slow_out = capsys.readouterr().out
    if "--idempotency-key=k-1" in argv:
        argv = ["--idempotency-key=k-2"]
    fast = fastpath.attempt(["queue:dispatch", *argv, "email:send", "--user", "5"])
    assert fast is not None and fast.code == 0, fast
    fast_out = capsys.readouterr().out
    if "--json" in argv:
        slow, quick = json.loads(slow_out), json.loads(fast_out)
        assert set(slow) == set(quick) and slow["command"] == quick["command"] == "email:send"
        slow_out, fast_out = slow["id"], quick["id"]
    assert _job(slow_out.strip()) == _job(fast_out.strip())


@pytest.mark.parametrize(("argv", "reason"), [
    (["--wait", "email:send", "--user", "1"], "option --wait is not taken here"),
    (["--isolated", "email:send", "--user", "1"], "option --isolated is not taken here"),
    (["--json=1", "email:send", "--user", "1"], "--json given a value"),
    (["--queue"], "--queue without a value"),
    (["--queue=low"], "no COMMAND"),
    (["email:send", "--help"], "--help among the job's arguments"),
    (["--tries=0", "email:send", "--user", "1"], "Invalid value for '--tries': 0 is not in the range x>=1"),
    (["--tries=x", "email:send", "--user", "1"], "'x' is not a valid integer"),
    (["--delay=1m", "--at=2031-01-01T09:00", "email:send", "--user", "1"], "Pass --delay or --at, not both"),
    (["--unique-ttl=1h", "email:send", "--user", "1"], "--unique-ttl needs --unique-key"),
    (["--at=2001-01-01T09:00", "email:send", "--user", "1"], "--at is in the past"),
    (["queue:list"], "queue:list is not a cached project command"),
    (["email:send", "--user", "0"], "the cached spec of email:send cannot vouch for its arguments"),
])
def test_the_fast_path_says_why_it_falls_back(capsys: Capsys, argv: list[str], reason: str) -> None:
    assert main(["queue:dispatch", "email:send", "--user", "1"]) == 0  # the cache
    fast = fastpath.attempt(["queue:dispatch", *argv])
    assert fast is not None and not fast.handled and fast.stale is None
    assert fast.reason is not None and reason in fast.reason, fast.reason
    assert sum(s.pending for s in connect().stats()) == 1  # nothing queued by the fallback


def test_a_missing_cache_is_a_fallback_that_the_full_run_refreshes(capsys: Capsys) -> None:
    from forge.cli.fastpath import cache
    from forge.config import load_settings

    fast = fastpath.attempt(["queue:dispatch", "email:send", "--user", "1"])
    assert fast is not None and fast.reason == "the command cache is missing or stale" and fast.stale is not None
    assert cache.load(load_settings()) is None
    fast.after_full_run(2)  # a failed full run saves nothing
    assert cache.load(load_settings()) is None
    fast.after_full_run(0)
    assert cache.load(load_settings()) is not None
    assert fastpath.attempt(["queue:dispatch", "email:send", "--user", "1"]) == fastpath.FastResult(0)


def test_no_forge_toml_is_a_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FORGE_CONFIG")
    monkeypatch.chdir(tmp_path)
    fast = fastpath.attempt(["queue:dispatch", "email:send"])
    assert fast is not None and fast.reason == "no forge.toml"


def test_schedule_run_says_why_it_falls_back(capsys: Capsys) -> None:
    fast = fastpath.attempt(["schedule:run", "--dry-run"])
    assert fast is not None and fast.reason == "option --dry-run is not taken here"
    fast = fastpath.attempt(["schedule:run"])
    assert fast is not None and fast.reason == "the command cache is missing or stale"
    assert fastpath.attempt(["queue:list"]) is None  # no fast path at all


def _forge(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "forge", *args], cwd=cwd, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=60)


def test_verbose_prints_why_the_fast_path_fell_back(tmp_path: Path) -> None:
    quiet = _forge(tmp_path, "queue:dispatch", "email:send", "--user", "1")
    assert quiet.returncode == 0 and "debug:" not in quiet.stderr
    loud = _forge(tmp_path, "queue:dispatch", "--wait-timeout=1s", "email:send", "--user", "1", FORGE_VERBOSE="1")
    assert loud.returncode == 0, loud.stderr
    assert ("debug: queue:dispatch: the full command runs, not the fast path: option --wait-timeout is not"
            " taken here.") in loud.stderr.splitlines()
    fast = _forge(tmp_path, "queue:dispatch", "email:send", "--user", "1", FORGE_VERBOSE="1")
    assert fast.returncode == 0 and "debug:" not in fast.stderr  # it took the fast path: nothing to explain
    flag = _forge(tmp_path, "-v", "queue:dispatch", "email:send", "--user", "1")
    assert flag.returncode == 0 and ("debug: queue:dispatch: the full command runs, not the fast path: -v comes"
                                     " before it (FORGE_VERBOSE=1 shows why a fast path falls back).") in flag.stderr


@pytest.mark.parametrize(("args", "code"), [
    (["nope:cmd"], EXIT_ERROR), (["-v", "nope:cmd"], EXIT_ERROR), (["help", "nope:cmd"], EXIT_ERROR),
    (["some:cmd", "x"], EXIT_UNKNOWN_COMMAND),  # a command that called forge.call("nope:cmd")
])
def test_an_unknown_name_typed_exits_1_and_any_other_3(args: list[str], code: int) -> None:
    assert exit_code_of_error(UnknownCommand("nope:cmd"), args) == code
    assert exit_code_of_error(UnknownQueuedCommand("nope:cmd"), args) == EXIT_UNKNOWN_COMMAND


def test_unknown_names_exit_codes_end_to_end(capsys: Capsys) -> None:
    assert main(["nope:cmd"]) == EXIT_ERROR
    assert main(["help", "nope:cmd"]) == EXIT_ERROR
    assert main(["queue:dispatch", "nope:cmd"]) == EXIT_UNKNOWN_COMMAND
    assert 'Command "nope:cmd" is not defined' in capsys.readouterr().err
