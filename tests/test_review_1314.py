"""Defects found by the review of issues 13 and 14, each through the CLI as a user meets it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import add_commands, require_redis
from reliability.harness import Target, worker_argv
from test_scheduler import Project, dispatched, entry_toml, ts
from test_scheduler_cli import tick_jobs

from forge.scheduler.entry import ScheduleEntry, ScheduleError

LOUD = '''
from forge import command

@command("loud:run")
def run() -> int:
    for i in range(30000):  # 2.5 MiB, more than the 1 MiB a job's log keeps
        print("x" * 80, i)
    return 1
'''


@pytest.fixture
def target(queue_target: Target, tmp_path: Path) -> Target:
    """conftest's ``queue_target`` (either backend) with the commands of ``LOUD`` added."""
    add_commands(Path(queue_target.env["FORGE_CONFIG"]), tmp_path / "commands", {"loud.py": LOUD})
    return queue_target


@pytest.fixture(params=["file", "redis"])
def proj(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Project]:
    if request.param == "redis":
        require_redis()
    p = Project(request.param, tmp_path / "p", monkeypatch)
    try:
        yield p
    finally:
        p.close()


def run(t: Target, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "forge", *args], env=t.env, capture_output=True, text=True,
                          timeout=120)


def test_show_does_not_claim_no_output_for_attempts_past_the_log_cap(target: Target) -> None:
    job = run(target, "queue:dispatch", "--tries=2", "loud:run").stdout.strip()
    res = subprocess.run(worker_argv("--stop-when-empty", "--sleep=0.1"), env=target.env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    show = run(target, "queue:show", job)
    assert show.returncode == 0, show.stderr
    section = show.stdout.split("Output (tail), by attempt:")[1]
    first, second = section.split("--- attempt 2 of 2")
    # attempt 1 filled the log: its tail is not the end of what it printed, and attempt 2 printed
    # 2.5 MiB that were not kept, which is not "no output"
    assert "(no output)" not in second
    assert "1 MiB" in first and "not kept" in first
    assert "1 MiB" in second and "not kept" in second


@pytest.mark.parametrize("name", ["a\nb", "\x1b[31mred", "tab\there", "x" * 1000])
def test_a_schedule_name_that_breaks_lines_or_keys_is_an_error_naming_it(name: str) -> None:
    with pytest.raises(ScheduleError, match="name"):
        ScheduleEntry.from_table({"name": name, "command": "report:generate", "cron": "* * * * *"})


@pytest.mark.parametrize("name", [5, "", ["a"], True])
def test_a_schedule_name_that_is_not_a_string_is_an_error_not_ignored(name: object) -> None:
    with pytest.raises(ScheduleError, match="name"):
        ScheduleEntry.from_table({"name": name, "command": "report:generate", "cron": "* * * * *"})


def test_unicode_and_punctuation_in_a_schedule_name_still_work() -> None:
    for name in ("ünïcode ✓", "../../etc", "nightly report; rm -rf /", "a" * 200):
        assert ScheduleEntry.from_table({"name": name, "command": "c", "cron": "@daily"}).name == name


def test_schedule_list_reports_a_newline_name_with_exit_2(tmp_path: Path) -> None:
    root = tmp_path / "p"
    (root / "commands").mkdir(parents=True)
    (root / "commands" / "r.py").write_text('from forge import command\n\n@command("r:run")\ndef r() -> None:\n    pass\n')
    (root / "forge.toml").write_text(
        f'[forge]\ncommands = ["commands"]\n[connections.file]\npath = "{tmp_path / "q"}"\n'
        '[[schedule]]\nname = "ok"\ncommand = "r:run"\ncron = "* * * * *"\n'
        '[[schedule]]\nname = "a\\nb"\ncommand = "r:run"\ncron = "* * * * *"\n')
    env = {"PATH": "/usr/bin:/bin", "FORGE_CONFIG": str(root / "forge.toml"), "FORGE_NO_PLUGINS": "1",
           "XDG_CACHE_HOME": str(tmp_path / "cache")}
    res = subprocess.run([sys.executable, "-m", "forge", "schedule:list", "--json"], env=env, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 2, res.stderr
    doc = json.loads(res.stdout)
    assert [e["name"] for e in doc["entries"]] == ["ok"]
    assert "control character" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_reverting_a_rename_does_not_dispatch_again_the_ticks_the_new_name_ran(proj: Project) -> None:
    """A -> B -> A: B ran 03:05; A, back in the schedule, must not run 03:05 again (nor catch
    up the ticks while it was gone), then ticks on as before."""
    a = entry_toml("A", 'cron = "*/5 * * * *"', timezone="UTC", catch_up="all", max_lateness="6h")
    t = ts("2026-03-01T03:00:00")
    proj.schedule(a)
    assert dispatched(proj.scheduler().run(now=t + 5)) == [("A", t)]
    proj.schedule(a.replace('"A"', '"B"'))
    assert dispatched(proj.scheduler().run(now=t + 303)) == [("B", t + 300)]
    proj.schedule(a)  # the deploy is reverted
    sch = proj.scheduler()
    assert [x for x in sch.plan(now=t + 330) if x.action == "dispatch"] == []
    assert dispatched(sch.run(now=t + 330)) == []
    assert dispatched(proj.scheduler().run(now=t + 603)) == [("A", t + 600)]
    assert sorted(tick_jobs(proj)) == ["A@2026-03-01T03:00:00Z", "A@2026-03-01T03:10:00Z",
                                       "B@2026-03-01T03:05:00Z"]


@pytest.mark.parametrize("at", ["9999-12-31T23:59", "0001-01-01T00:00"])
def test_dry_run_at_a_time_out_of_range_is_a_usage_error(tmp_path: Path, at: str) -> None:
    root = tmp_path / "p"
    (root / "commands").mkdir(parents=True)
    (root / "commands" / "r.py").write_text('from forge import command\n\n@command("r:run")\ndef r() -> None:\n    pass\n')
    (root / "forge.toml").write_text(
        f'[forge]\ncommands = ["commands"]\n[connections.file]\npath = "{tmp_path / "q"}"\n'
        '[[schedule]]\nname = "ok"\ncommand = "r:run"\ncron = "0 3 * * *"\ntimezone = "Europe/Berlin"\n')
    env = {"PATH": "/usr/bin:/bin", "FORGE_CONFIG": str(root / "forge.toml"), "FORGE_NO_PLUGINS": "1",
           "XDG_CACHE_HOME": str(tmp_path / "cache")}
    res = subprocess.run([sys.executable, "-m", "forge", "schedule:run", "--dry-run", f"--at={at}"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2, res.stderr
    assert "--at" in res.stderr and "Traceback" not in res.stderr and "Error" in res.stderr


@pytest.mark.parametrize("argv", [["queue:list", "--connection="], ["queue:dispatch", "--connection=", "r:run"],
                                  ["schedule:list", "--connection="], ["schedule:run", "--connection="]])
def test_an_empty_connection_option_is_a_usage_error(tmp_path: Path, argv: list[str]) -> None:
    root = tmp_path / "p"
    (root / "commands").mkdir(parents=True)
    (root / "commands" / "r.py").write_text('from forge import command\n\n@command("r:run")\ndef r() -> None:\n    pass\n')
    (root / "forge.toml").write_text(f'[forge]\ncommands = ["commands"]\n[connections.file]\npath = "{tmp_path / "q"}"\n')
    env = {"PATH": "/usr/bin:/bin", "FORGE_CONFIG": str(root / "forge.toml"), "FORGE_NO_PLUGINS": "1",
           "XDG_CACHE_HOME": str(tmp_path / "cache")}
    res = subprocess.run([sys.executable, "-m", "forge", *argv], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert "--connection must not be empty" in res.stderr
    assert not (tmp_path / "q").exists() or not list((tmp_path / "q").rglob("*.job"))


def test_queue_show_and_queue_failed_print_a_jobs_control_characters_escaped(tmp_path: Path) -> None:
    """A job's output and error reach an operator's terminal through queue:show and
    queue:failed: escape sequences in them are written out as text (queue:log keeps them)."""
    from forge.backends.file.backend import FileBackend
    from forge.job import Event
    from forge.queue import QueuedCommand

    qdir = tmp_path / "q"
    b = FileBackend(qdir)
    job = QueuedCommand("demo:x").to_job("default")
    b.push([job])
    c = b.claim(["default"], "w", 60)
    assert c is not None
    b.append_log(job.id, b"before\x1b]0;pwned\x07\x1b[2Jafter\r\n")
    b.fail(c, Event("failed", 1, time.time(), worker="w", reason="exception", exit_code=1,
                    error="boom\x1b[31m red", output_tail="before\x1b[2Jafter"))
    b.close()
    env = {**os.environ, "FORGE_QUEUE_DIR": str(qdir)}
    show = subprocess.run([sys.executable, "-m", "forge", "queue:show", job.id], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert show.returncode == 0, show.stderr
    assert "\x1b" not in show.stdout and "\x07" not in show.stdout
    assert "before\\x1b]0;pwned\\x07\\x1b[2Jafter" in show.stdout
    failed = subprocess.run([sys.executable, "-m", "forge", "queue:failed"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)
    assert failed.returncode == 0, failed.stderr
    assert "\x1b" not in failed.stdout and "boom\\x1b[31m red" in failed.stdout
    log = subprocess.run([sys.executable, "-m", "forge", "queue:log", job.id], cwd=tmp_path, env=env,
                         capture_output=True, timeout=60)
    assert b"\x1b]0;pwned\x07" in log.stdout  # the log itself is kept exactly


def test_an_empty_delay_between_commas_is_a_usage_error() -> None:
    from forge.errors import UsageError
    from forge.retry.backoff import parse as parse_backoff

    assert parse_backoff("1,5,") == (1.0, 5.0)
    for bad in ("1,,2", ",5", " , "):
        with pytest.raises(UsageError, match="delay"):
            parse_backoff(bad)
