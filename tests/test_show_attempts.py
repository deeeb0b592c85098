"""issue 13: ``queue:show`` splits a job's output by attempt, from the log offset each attempt's
``claimed`` event records (file and Redis), without writing anything into the log itself."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import add_commands
from reliability.harness import Target, worker_argv

FLAKY = '''
import os
from forge import command

@command("flaky:run")
def run() -> int:
    """Print what this attempt is, then fail: raise on attempts 1 and 2, exit 3 on attempt 3."""
    n = int(os.environ["FORGE_JOB_ATTEMPT"])
    for i in range(3):
        print(f"attempt-{n}-line-{i}")
    if n < 3:
        raise ValueError(f"boom on attempt {n}")
    return 3
'''


@pytest.fixture
def target(queue_target: Target, tmp_path: Path) -> Target:
    """conftest's ``queue_target`` (either backend) with the commands of ``FLAKY`` added."""
    add_commands(Path(queue_target.env["FORGE_CONFIG"]), tmp_path / "commands", {"flaky.py": FLAKY})
    return queue_target


def forge(t: Target, *args: str) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "forge", *args], env=t.env, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    return res


def failed_three_times(t: Target) -> str:
    job = forge(t, "queue:dispatch", "--tries=3", "flaky:run").stdout.strip()
    res = subprocess.run(worker_argv("--stop-when-empty", "--sleep=0.1", "--name=host-a:41"), env=t.env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return job


def test_show_has_a_header_and_the_output_of_each_attempt(target: Target) -> None:
    job = failed_three_times(target)
    log = target.backend.read_log(job).decode()
    # The log is the job's output only, in order: queue:log prints nothing forge added.
    assert forge(target, "queue:log", job).stdout == log
    assert [ln for ln in log.splitlines() if ln.startswith("attempt-")] == \
        [f"attempt-{n}-line-{i}" for n in (1, 2, 3) for i in range(3)]

    shown = forge(target, "queue:show", job).stdout
    part = shown.split("Output (tail), by attempt:\n", 1)[1]
    headers = [ln for ln in part.splitlines() if ln.startswith("--- attempt")]
    assert len(headers) == 3, part
    for n, h in enumerate(headers, 1):
        assert h.startswith(f"--- attempt {n} of 3, started "), h
        assert re.search(r"started \d{4}-\d\d-\d\d \d\d:\d\d:\d\d, worker host-a:41: ", h), h
    assert re.search(r": failed \(exit code 1, exception\) after [\d.]+ m?s; to be retried ---$", headers[0]), headers[0]
    assert re.search(r": failed \(exit code 1, exception\) after [\d.]+ m?s; to be retried ---$", headers[1]), headers[1]
    assert re.search(r": failed \(exit code 3, exit_code\) after [\d.]+ m?s ---$", headers[2]), headers[2]
    sections = re.split(r"^--- attempt .*$\n", part, flags=re.M)[1:]
    for n, text in enumerate(sections, 1):
        own = [ln for ln in text.splitlines() if ln.startswith("attempt-")]
        assert own == [f"attempt-{n}-line-{i}" for i in range(3)], (n, text)
    assert "ValueError: boom on attempt 1" in sections[0] and "boom on attempt 2" not in sections[0]
    assert "ValueError: boom on attempt 2" in sections[1]
    assert "Traceback" not in sections[2]
    assert "frames of forge and Typer" in sections[0]
    assert not re.search(r'File ".*/forge/', part)

    data = json.loads(forge(target, "queue:show", job, "--json").stdout)
    attempts = data["attempts"]
    assert [a["attempt"] for a in attempts] == [1, 2, 3]
    assert [a["outcome"] for a in attempts] == ["released", "released", "failed"]
    assert [a["exit_code"] for a in attempts] == [1, 1, 3]
    assert [a["reason"] for a in attempts] == ["exception", "exception", "exit_code"]
    assert all(a["max_attempts"] == 3 and a["worker"] == "host-a:41" for a in attempts)
    assert all(a["started_at"].endswith("Z") and a["ended_at"] >= a["started_at"] for a in attempts)
    offsets = [a["log_offset"] for a in attempts]
    assert offsets[0] == 0 and offsets == sorted(offsets)
    assert sum(a["log_bytes"] for a in attempts) == len(log.encode())
    raw = log.encode()
    for n, a in enumerate(attempts, 1):
        chunk = raw[a["log_offset"]:a["log_offset"] + a["log_bytes"]].decode()
        assert f"attempt-{n}-line-0" in chunk and f"attempt-{n % 3 + 1}-line-0" not in chunk
        assert f"attempt-{n}-line-2" in a["output_tail"]
    # The claimed events carry the offsets; the whole tail stays at top level as before.
    claimed = [e for e in data["job"]["events"] if e["event"] == "claimed"]
    assert [e["log_offset"] for e in claimed] == offsets
    assert data["output_tail"].rstrip().endswith("attempt-3-line-2")


def test_show_of_a_job_before_its_first_attempt_has_no_output_section(target: Target) -> None:
    job = forge(target, "queue:dispatch", "flaky:run").stdout.strip()
    shown = forge(target, "queue:show", job).stdout
    assert "Output" not in shown
    assert json.loads(forge(target, "queue:show", job, "--json").stdout)["attempts"] == []


def test_after_queue_retry_the_runs_are_numbered_and_each_keeps_its_output(target: Target) -> None:
    job = failed_three_times(target)
    forge(target, "queue:retry", job)
    res = subprocess.run(worker_argv("--stop-when-empty", "--sleep=0.1", "--name=host-b:7"), env=target.env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    data = json.loads(forge(target, "queue:show", job, "--json").stdout)
    runs = [(a["run"], a["attempt"], a["worker"], a["outcome"]) for a in data["attempts"]]
    assert runs[:3] == [(1, 1, "host-a:41", "released"), (2, 2, "host-a:41", "released"),
                        (3, 3, "host-a:41", "failed")]
    assert runs[3] == (4, 1, "host-b:7", "released")  # the retry starts again at attempt 1
    assert "attempt-1-line-0" in data["attempts"][3]["output_tail"]
    shown = forge(target, "queue:show", job).stdout
    headers = [ln for ln in shown.splitlines() if ln.startswith("--- ")]
    assert len(headers) == 6 and headers[3].startswith("--- run 4, attempt 1 of 3, started ")
    assert "worker host-b:7: failed (exit code 1, exception)" in headers[3] and headers[3].endswith("; to be retried ---")
    # Only the last five attempts' output is shown; queue:log has all of it, as written.
    part = shown.split("Output (tail), by attempt:\n", 1)[1]
    first = part.split(headers[0] + "\n", 1)[1].split(headers[1], 1)[0]
    assert first.strip() == f"(output of the 1 earlier attempt not shown: `forge queue:log {job}` prints all of it)"
    assert forge(target, "queue:log", job).stdout.count("attempt-1-line-0") == 2


def test_attempt_n_of_m_counts_the_workers_tries_when_the_job_has_none(target: Target) -> None:
    job = forge(target, "queue:dispatch", "flaky:run").stdout.strip()  # no --tries: the worker's
    res = subprocess.run(worker_argv("--stop-when-empty", "--sleep=0.1", "--tries=2"), env=target.env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    headers = [ln for ln in forge(target, "queue:show", job).stdout.splitlines() if ln.startswith("--- ")]
    assert [h.split(",")[0] for h in headers] == ["--- attempt 1 of 2", "--- attempt 2 of 2"]
    attempts = json.loads(forge(target, "queue:show", job, "--json").stdout)["attempts"]
    assert [(a["max_attempts"], a["outcome"]) for a in attempts] == [(2, "released"), (2, "failed")]
