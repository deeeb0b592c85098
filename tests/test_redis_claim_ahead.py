"""A draining Redis worker claims its next job while the current one runs (``Worker._claim_ahead``):
every job still runs once, in order; a claim held so goes back uncounted when the worker stops,
pauses, restarts or is killed, and to another worker when the current job runs long; a job that
kills its worker is not claimed ahead again.

The workers are real ``queue:work`` processes. Where a test must hold a claim for longer than
the default bound (50 ms) to act while it is held, the worker is started through ``_LAUNCH``,
which sets ``WorkerOptions.ahead_hold`` and ``ahead_after`` (no CLI flag sets them)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import next_event
from reliability.checker import read_ledger
from reliability.harness import make_target, worker_argv
from waitfor import wait_for

from forge.job import State
from forge.queue import QueuedCommand

REDIS_URL = os.environ.get("FORGE_TEST_REDIS_URL")
pytestmark = pytest.mark.skipif(not REDIS_URL, reason="FORGE_TEST_REDIS_URL is not set")
#: conftest's queue_target on Redis: the probe project, closed after the test.
REDIS_TARGET = pytest.mark.parametrize("queue_target", ["redis"], indirect=True)

_LAUNCH = """\
import dataclasses, sys
from forge.worker import supervisor
hold, after = float(sys.argv[1]), float(sys.argv[2])
post = supervisor.Worker.__post_init__
def __post_init__(self):
    self.options = dataclasses.replace(self.options, ahead_hold=hold, ahead_after=after)
    post(self)
supervisor.Worker.__post_init__ = __post_init__
sys.argv = ["forge", "queue:work", *sys.argv[3:]]
from forge.cli.main import main
main()
"""


def _worker(t: Any, *args: str, hold: float | None = None, after: float = 5.0) -> subprocess.Popen:
    """A ``queue:work --json`` process; with ``hold``, its claims ahead are held that long
    (and made after any run shorter than ``after``)."""
    argv = worker_argv("--json", *args) if hold is None else [
        sys.executable, "-c", _LAUNCH, str(hold), str(after), "--json", *args]
    return subprocess.Popen(argv, env=t.env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def _stop(worker: subprocess.Popen) -> None:
    if worker.poll() is None:
        worker.send_signal(signal.SIGTERM)
        worker.communicate(timeout=60)


def _starts(t: Any, job: str | None = None) -> list[dict[str, Any]]:
    return [r for r in read_ledger(t.ledger) if r["kind"] == "start" and (job is None or r["job"] == job)]


def _ends(t: Any, job: str) -> list[dict[str, Any]]:
    return [r for r in read_ledger(t.ledger) if r["kind"] == "end" and r["job"] == job]


def _held_ahead(t: Any, job: str) -> bool:
    """Whether ``job`` is claimed and has not started (a claim held ahead)."""
    return t.backend.find(job).state == State.RESERVED and not _starts(t, job)


@REDIS_TARGET
def test_a_drain_of_short_jobs_runs_each_once_in_order(queue_target: Any) -> None:
    t = queue_target
    q = t.queue()
    jobs = [q.dispatch(QueuedCommand("probe:run").with_args([str(i)])) for i in range(150)]
    worker = _worker(t, "--stop-when-empty")
    try:
        assert worker.wait(timeout=120) == 0
    finally:
        _stop(worker)
    starts = _starts(t)
    assert [r["job"] for r in starts] == jobs  # each once, in dispatch order
    assert {r["attempt"] for r in starts} == {1}
    stats = t.backend.stats(["default"])[0]
    assert (stats.pending, stats.reserved, stats.failed, stats.done) == (0, 0, 0, 150)


def _long_between_short(t: Any) -> tuple[str, str, str]:
    """A short job, a long one (60 s), and one to be claimed ahead while the long one runs."""
    q = t.queue()
    short = q.dispatch(QueuedCommand("probe:run").with_args(["short"]))
    long = q.dispatch(QueuedCommand("probe:run").with_args(["long", "--sleep", "60"]))
    held = q.dispatch(QueuedCommand("probe:run").with_args(["held"]))
    return short, long, held


@pytest.mark.parametrize("how", ["stop", "pause", "restart"])
@REDIS_TARGET
def test_a_claim_held_ahead_goes_back_uncounted_when_the_worker_stops_pauses_or_restarts(
        queue_target: Any, how: str) -> None:
    t = queue_target
    short, long, held = _long_between_short(t)
    worker = _worker(t, "--sleep=1", hold=120)
    try:
        wait_for(lambda: _starts(t, long), timeout=60)
        wait_for(lambda: _held_ahead(t, held), timeout=30)
        if how == "restart":
            t.backend.request_restart()
        else:
            worker.send_signal(signal.SIGTERM if how == "stop" else signal.SIGUSR2)
        # The restart marker is read every 0.1 s at most, between jobs (RESTART checks): past
        # 0.1 s of the long job's run, the worker reads it before it takes its next job.
        began = _starts(t, long)[0]["start"]
        wait_for(lambda: time.time() - began > 0.15, timeout=5)
        # The long job runs on to its end; end it early (a crash: released, then failed at tries=1).
        os.kill(_starts(t, long)[0]["pid"], signal.SIGKILL)
        if how == "pause":
            next_event(worker, "paused")
        else:
            out = worker.communicate(timeout=60)[0]
            assert worker.returncode == 0, out
        info = t.backend.find(held)
        assert info.state == State.PENDING and info.attempts == 0, out if how != "pause" else ""
        assert "claimed" in [e.event for e in info.events]  # it was held, then handed back
        assert "failed" not in [e.event for e in info.events] and not _starts(t, held)
        if how == "pause":
            worker.send_signal(signal.SIGCONT)
        else:
            worker = _worker(t, "--stop-when-empty")
        wait_for(lambda: t.backend.find(held).state == State.DONE, timeout=60)
        assert [r["attempt"] for r in _starts(t, held)] == [1]
    finally:
        _stop(worker)


@REDIS_TARGET
def test_max_jobs_claims_nothing_ahead_of_its_last_job(queue_target: Any) -> None:
    t = queue_target
    q = t.queue()
    jobs = [q.dispatch(QueuedCommand("probe:run").with_args([str(i)])) for i in range(5)]
    worker = _worker(t, "--max-jobs=3", hold=120)
    try:
        assert worker.wait(timeout=60) == 0
    finally:
        _stop(worker)
    assert [r["job"] for r in _starts(t)] == jobs[:3]
    for job in jobs[3:]:
        info = t.backend.find(job)
        assert info.state == State.PENDING and info.attempts == 0 and "claimed" not in [e.event for e in info.events]


@REDIS_TARGET
def test_a_claim_held_ahead_of_a_long_job_goes_to_an_idle_worker_within_the_bound(queue_target: Any) -> None:
    t = queue_target
    short, long, held = _long_between_short(t)
    first = _worker(t, "--sleep=1", hold=0.05)  # the default bound
    second: subprocess.Popen | None = None
    try:
        wait_for(lambda: _starts(t, long), timeout=60)
        # Claimed ahead as the long job started, then handed back, uncounted, at the head.
        wait_for(lambda: "claimed" in [e.event for e in t.backend.find(held).events], timeout=30)
        wait_for(lambda: t.backend.find(held).state == State.PENDING, timeout=5)
        assert t.backend.find(held).attempts == 0
        second = _worker(t, "--sleep=1")
        wait_for(lambda: t.backend.find(held).state == State.DONE, timeout=60)
        (run,) = _starts(t, held)
        assert run["attempt"] == 1 and run["ppid"] == second.pid  # the second worker ran it
        assert not _ends(t, long)  # while the long job still runs
    finally:
        for w in (first, second):
            if w is not None:
                _stop(w)


def _short_lease(t: Any) -> None:
    config = Path(t.env["FORGE_CONFIG"])
    text = config.read_text()
    config.write_text(text.replace(f'prefix = "{t.prefix}"\n', f'prefix = "{t.prefix}"\nlease = "10s"\n'))


@REDIS_TARGET
def test_a_killed_worker_s_claim_held_ahead_is_recovered_uncounted(queue_target: Any) -> None:
    t = queue_target
    _short_lease(t)
    short, long, held = _long_between_short(t)
    worker = _worker(t, "--sleep=1", hold=120)
    other: subprocess.Popen | None = None
    try:
        wait_for(lambda: _starts(t, long), timeout=60)
        wait_for(lambda: _held_ahead(t, held), timeout=30)
        worker.kill()
        worker.wait(timeout=30)
        os.kill(_starts(t, long)[0]["pid"], signal.SIGKILL)  # the job process outlives its worker
        other = _worker(t, "--sleep=1")
        wait_for(lambda: t.backend.find(held).state == State.DONE, timeout=60)
        assert [r["attempt"] for r in _starts(t, held)] == [1]  # it never ran before: uncounted
        events = [e.event for e in t.backend.find(held).events]
        assert "failed" not in events and "released" not in events
        assert t.backend.find(long).state == State.FAILED  # it did run: abandoned, counted (tries=1)
    finally:
        for w in (worker, other):
            if w is not None:
                _stop(w)


@REDIS_TARGET
def test_a_job_that_kills_its_worker_is_claimed_ahead_once_at_most(queue_target: Any) -> None:
    t = queue_target
    _short_lease(t)
    q = t.queue()
    q.dispatch(QueuedCommand("probe:run").with_args(["a"]))
    q.dispatch(QueuedCommand("probe:run").with_args(["b"]))
    poison = q.dispatch(QueuedCommand("probe:run").with_args(["poison", "--kill-worker"]))
    workers: list[subprocess.Popen] = []
    try:
        # Each worker it kills is replaced, until the job is failed (abandoned).
        def failed() -> bool:
            if t.backend.find(poison).state == State.FAILED:
                return True
            if not workers or workers[-1].poll() is not None:
                assert len(workers) < 4, "the poison job ran again and again"
                workers.append(_worker(t, "--sleep=1", hold=120))
            return False

        wait_for(failed, timeout=120, interval=0.2)
        info = t.backend.find(poison)
        assert info.attempts == 1 and len(_starts(t, poison)) <= 2
    finally:
        for w in workers:
            _stop(w)


@REDIS_TARGET
def test_a_job_dispatched_to_a_higher_queue_while_a_claim_is_held_ahead_runs_first(queue_target: Any) -> None:
    # Strict priority across a worker's queues: a high job dispatched while a default job runs
    # runs next, before any other default job, as it does without claiming ahead (a claim
    # ahead is made as the current job starts, before the high job exists).
    t = queue_target
    q = t.queue()
    short = q.dispatch(QueuedCommand("probe:run").with_args(["short"]))
    long = q.dispatch(QueuedCommand("probe:run").with_args(["long", "--sleep", "60"]))
    later = q.dispatch(QueuedCommand("probe:run").with_args(["later"]))
    worker = _worker(t, "--queue=high,default", "--sleep=1", hold=120)
    try:
        # The short job's done is reported once the call made as the long job started
        # (its ack, and a claim ahead if one is made) has returned.
        assert next_event(worker, "done")["job_id"] == short
        high = t.queue("high").dispatch(QueuedCommand("probe:run").with_args(["high"]))
        wait_for(lambda: _starts(t, long), timeout=60)
        os.kill(_starts(t, long)[0]["pid"], signal.SIGKILL)  # the long job ends (crashed)
        wait_for(lambda: t.backend.find(later).state == State.DONE, timeout=60)
        order = [r["job"] for r in _starts(t) if r["job"] in (high, later)]
        assert order == [high, later]
    finally:
        _stop(worker)


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_an_ack_left_waiting_by_an_outage_during_the_next_job_is_not_lost(tmp_path: Path) -> None:
    # The ack of a job goes with the call made as the next job starts; if the server is down
    # then, it waits (retried at the watch's flush, every 0.5 s). A next job shorter than that
    # must not replace it with its own ack: the first job would stay reserved and be recovered
    # as abandoned (failed at tries=1, run again otherwise), though it succeeded.
    from test_redis_backend import _free_port, _start_server

    port = _free_port()
    data = tmp_path / "data"
    data.mkdir()
    server = _start_server(port, data)
    t = make_target("redis", tmp_path / "t", f"redis://127.0.0.1:{port}/0")
    try:
        q = t.queue()
        q.dispatch(QueuedCommand("probe:run").with_args(["a"]))  # claimed plainly: no run before it
        short = q.dispatch(QueuedCommand("probe:run").with_args(["short"]))  # claimed with a's ack
        first = q.dispatch(QueuedCommand("probe:run").with_args(["first", "--sleep", "0.3"]))  # ahead
        second = q.dispatch(QueuedCommand("probe:run").with_args(["second"]))  # ahead, as the first starts
        worker = _worker(t, "--sleep=1", hold=120)
        try:
            # The short job's done: the call made as the first job started (that ack, the
            # second's claim ahead) has returned. The server goes down while the first runs, so
            # the call made as the second starts (the first's ack) fails.
            next_event(worker, "done")
            assert next_event(worker, "done")["job_id"] == short
            server.kill()
            server.wait()
            # The second job has run and its outcome is recorded: the worker, between jobs,
            # cannot send its waiting ack (it retries until the server is back).
            next_event(worker, "record_failed")
            assert _ends(t, second)
            server = _start_server(port, data)
            done: set[str] = set()
            while second not in done:
                done.add(next_event(worker, "done")["job_id"])
            assert first in done
            assert t.backend.find(first).state == State.DONE
            assert t.backend.find(second).state == State.DONE
        finally:
            _stop(worker)
    finally:
        t.close()
        server.kill()
        server.wait()
