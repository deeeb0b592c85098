"""Issue 11, item 5: a dispatch killed part-way, then run again. Real processes, real signals,
a real queue directory and a real Redis (``FORGE_TEST_REDIS_URL``).

A ``--from-file`` batch is not atomic (the file backend renames job files into view one at a
time; Redis stores 1,000 lines per script), so what makes it safe is that running the same
batch again queues only the lines that are missing: each line's job id is derived from the
batch (the file's content, or ``--batch-id``) and its line number, and a dispatch whose id
exists stores nothing.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from conftest import forge_cmd
from test_reliability import STATE_DIRS, STRACE, env_with, inject, trace_steps, valid_jobs

from forge.job import State

pytestmark = pytest.mark.slow

LINES = 8000


def batch_file(path: Path, n: int = LINES) -> Path:
    path.write_text("".join(json.dumps({"command": "probe:run", "args": [f"line-{i}"]}) + "\n"
                            for i in range(1, n + 1)))
    return path


def stored_lines(target: Any) -> Counter[str]:
    """How many jobs the store holds for each line, in any state."""
    return Counter(info.job.args[0] for info in target.backend.jobs())


def waiting(target: Any) -> int:
    return sum(s.size for s in target.backend.stats())


def test_a_batch_killed_part_way_then_run_again_queues_each_line_once(queue_target: Any,
                                                                      tmp_path: Path) -> None:
    """SIGKILL ``queue:dispatch --from-file`` once some of its jobs are visible, run it again
    and kill it half-way, then run it to the end. Before the fix the first kill alone left up
    to 2,000 of 10,000 lines queued on the file backend, 6,000 on Redis, and every run queued
    them again."""
    batch = batch_file(tmp_path / "batch.jsonl")
    argv = [*forge_cmd(), "queue:dispatch", "--from-file", str(batch)]
    seen = []
    for threshold in (1, LINES // 2):
        proc = subprocess.Popen(argv, env=queue_target.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 120
            while waiting(queue_target) < threshold and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.005)
            proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == -signal.SIGKILL  # killed before it finished
        seen.append(waiting(queue_target))
        assert threshold <= seen[-1] < LINES, seen
        counts = stored_lines(queue_target)
        assert set(counts.values()) == {1}, Counter(counts.values())  # nothing twice, even when killed

    again = subprocess.run(argv, env=queue_target.env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    counts = stored_lines(queue_target)
    assert len(counts) == LINES and set(counts.values()) == {1}, Counter(counts.values())
    ids = again.stdout.split()
    assert len(ids) == LINES == len(set(ids))  # each line's id, in line order, queued now or before
    assert {info.id for info in queue_target.backend.jobs()} == set(ids)
    assert f"{seen[-1]} of {LINES}" in again.stderr  # says how many were there already

    third = subprocess.run(argv, env=queue_target.env, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0 and third.stdout.split() == ids
    assert sum(stored_lines(queue_target).values()) == LINES
    print(f"\nFIGURES scenario=batch-killed backend={queue_target.kind} lines={LINES} "
          f"queued_at_kills={','.join(map(str, seen))} duplicates=0 missing=0", file=sys.stderr)


def test_a_batch_run_again_after_its_jobs_ran_queues_nothing(queue_target: Any, tmp_path: Path) -> None:
    """The identity holds while the job is kept, whatever its state: run, done or failed."""
    batch = tmp_path / "batch.jsonl"
    batch.write_text(json.dumps({"command": "probe:run", "args": ["ok"]}) + "\n"
                     + json.dumps({"command": "probe:run", "args": ["bad", "--fail"]}) + "\n")
    argv = [*forge_cmd(), "queue:dispatch", "--from-file", str(batch)]
    first = subprocess.run(argv, env=queue_target.env, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    work = subprocess.run([*forge_cmd(), "queue:work", "--stop-when-empty", "--sleep=0.1"],
                          env=queue_target.env, capture_output=True, text=True, timeout=60)
    assert work.returncode == 0, work.stderr
    assert {i.state for i in queue_target.backend.jobs()} == {State.DONE, State.FAILED}
    again = subprocess.run(argv, env=queue_target.env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and again.stdout == first.stdout
    assert waiting(queue_target) == 0 and "2 of 2" in again.stderr
    other = subprocess.run([*argv, "--batch-id=second-run"], env=queue_target.env, capture_output=True,
                           text=True, timeout=60)
    assert other.returncode == 0 and waiting(queue_target) == 2  # another batch id: queued again


IDEM_SYSCALLS = "write,fsync,fdatasync,syncfs,link,linkat,rename,renameat,renameat2,unlink,unlinkat,flock"


@pytest.mark.skipif(STRACE is None, reason="strace is not installed (apt-get install strace)")
@pytest.mark.parametrize("how", ["single", "batch"])
def test_an_idempotent_dispatch_killed_at_each_step_then_run_again_stores_one_job(
        probe_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    """SIGKILL ``queue:dispatch --idempotency-key`` (or a two-line ``--from-file``) on entry to
    each system call it makes in the queue directory, then run it again: exactly one job per
    key, complete, whatever the step (the key is never taken without a job, nor a job visible
    without its key)."""
    monkeypatch.setenv("XDG_CACHE_HOME", "/proc/forge-no-cache")  # nor the path: always the full one
    batch = tmp_path / "two.jsonl"
    batch.write_text('{"command": "probe:noop"}\n{"command": "probe:noop", "queue": "other"}\n')
    argv = ([*forge_cmd(), "queue:dispatch", "--idempotency-key=tick-7", "probe:noop"] if how == "single"
            else [*forge_cmd(), "queue:dispatch", "--from-file", str(batch)])
    qdir = tmp_path / "trace-q"
    steps = trace_steps(argv, env_with(FORGE_QUEUE_DIR=str(qdir)), IDEM_SYSCALLS,
                        lambda line: str(qdir) in line, tmp_path / "trace")
    kinds = {s[0] for s in steps}
    assert {"write", "fsync"} <= kinds and kinds & {"rename", "renameat", "renameat2"}, steps
    expected = 1 if how == "single" else 2
    for i, (name, n, line) in enumerate(steps):
        qdir = tmp_path / f"q{i}"
        env = env_with(FORGE_QUEUE_DIR=str(qdir))
        killed = inject(f"{name}:signal=KILL:when={n}", argv, env)
        assert killed.returncode == -signal.SIGKILL, (line, killed.returncode, killed.stderr)
        again = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
        assert again.returncode == 0, (line, again.stderr)
        ids = again.stdout.split()
        jobs = [j for state in STATE_DIRS for j in valid_jobs(qdir, state)]
        assert sorted(j.id for j in jobs) == sorted(ids) and len(ids) == expected, (line, jobs, ids)
        assert not list(qdir.glob("quarantine/*")), line
        from forge.backends.file.backend import FileBackend

        b = FileBackend(qdir)
        try:  # every job is claimable (its key link is accepted), and its key stays taken
            claims = [b.claim(["default", "other"], "check", 10) for _ in range(expected)]
            assert sorted(c.job.id for c in claims if c) == sorted(ids), line
        finally:
            b.close()
        third = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
        assert third.returncode == 0 and third.stdout.split() == ids, line
        assert len([j for state in STATE_DIRS for j in valid_jobs(qdir, state)]) == expected, line
    print(f"\nFIGURES scenario=idempotent-dispatch-killed how={how} steps={len(steps)} duplicates=0 "
          "missing=0", file=sys.stderr)
