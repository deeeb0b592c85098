"""The Backend contract, run against every backend (file always; Redis with FORGE_TEST_REDIS_URL).

Everything goes through the Backend API; jobs are built with ``QueuedCommand(...).to_job``.
A behaviour that differs between backends is a bug in one of them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import make_job as job
from waitfor import wait_for

from forge.backends.base import Backend, Claim
from forge.errors import (
    EXIT_DUPLICATE,
    EXIT_NOT_FOUND,
    DispatchFailed,
    DuplicateJob,
    QueueError,
    RetryBlocked,
)
from forge.job import Event, Job, Reason, State, idempotent_id, is_idempotent_id, new_id

WORKER = "test-worker"
TIMEOUT = 60.0
PROBE_COMMANDS = Path(__file__).resolve().parent / "project" / "commands"


def push(b: Backend, *jobs: Job) -> list[str]:
    b.push(list(jobs))
    return [j.id for j in jobs]


def claim(b: Backend, *queues: str) -> Claim | None:
    return b.claim(list(queues or ["default"]), WORKER, TIMEOUT)


def must_claim(b: Backend, *queues: str) -> Claim:
    c = claim(b, *queues)
    assert c is not None, "expected a claimable job"
    return c


def done(c: Claim) -> Event:
    return Event("done", c.attempt, time.time(), worker=WORKER, duration=0.01)


def failed(c: Claim, reason: str = Reason.EXCEPTION, error: str = "boom") -> Event:
    return Event("failed", c.attempt, time.time(), worker=WORKER, reason=reason, error=error)


def released(c: Claim) -> Event:
    return Event("released", c.attempt, time.time(), worker=WORKER, reason=Reason.EXCEPTION, error="x")


def stats(b: Backend, queue: str = "default") -> Any:
    return b.stats([queue])[0]


def cli_env(b: Any, tmp_path: Path) -> dict[str, str]:
    """The environment of a ``forge`` process working on ``b``'s queue with the probe commands
    (``tests/project/commands``), recording runs in ``tmp_path/ledger.jsonl``."""
    spec = b.test_spec
    if spec[0] == "file":
        conn = f'[connections.file]\npath = "{spec[1]}"\n'
    else:
        conn = f'[connections.redis]\nurl = "{spec[1]}"\nprefix = "{spec[2]}"\n'
    config = tmp_path / "cli-forge.toml"
    config.write_text(f'[forge]\ncommands = ["{PROBE_COMMANDS}"]\n'
                      f'[queue]\nconnection = "{spec[0]}"\ntries = 1\nbackoff = [0]\n{conn}')
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORGE_")}
    env.update(FORGE_CONFIG=str(config), FORGE_NO_PLUGINS="1", FORGE_PROBE_LEDGER=str(tmp_path / "ledger.jsonl"))
    return env


def forge_cli(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "forge", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


# -- push / claim ---------------------------------------------------------------------------


def test_empty_queue_claims_nothing(backend: Backend) -> None:
    assert claim(backend) is None
    assert backend.push([]) == []  # one flag per job stored


def test_fifo_within_a_queue(backend: Backend) -> None:
    ids = [push(backend, job(args=(str(i),)))[0] for i in range(5)]
    ids += push(backend, *[job(args=(str(i),)) for i in range(5, 10)])  # a batch keeps its order
    got = []
    for _ in range(10):
        c = must_claim(backend)
        got.append(c.job.id)
        backend.ack(c, done(c))
    assert got == ids
    assert claim(backend) is None


def test_claim_returns_the_job_as_pushed(backend: Backend) -> None:
    j = job(args=("1.5",), max_attempts=4, timeout=30)
    push(backend, j)
    c = must_claim(backend)
    assert c.job == j
    assert c.attempt == 1
    assert c.queue == "default"
    assert c.deadline >= c.claimed_at + 30
    assert backend.heartbeat(c) is True


def test_strict_priority_across_queues(backend: Backend) -> None:
    low = push(backend, job("low"), job("low"))
    high = push(backend, job("high"), job("high"))
    order = []
    for _ in range(4):
        c = must_claim(backend, "high", "low")
        order.append(c.job.id)
        backend.ack(c, done(c))
    assert order == high + low


def test_delayed_job_is_claimable_only_when_due(backend: Backend) -> None:
    (jid,) = push(backend, job(delay=0.3))
    assert claim(backend) is None
    info = backend.find(jid)
    assert info is not None and info.state == State.DELAYED
    s = stats(backend)
    assert (s.pending, s.delayed, s.size) == (0, 1, 1)
    due = backend.next_due(["default"])
    assert due is not None and abs(due - info.job.available_at) < 0.01
    time.sleep(0.35)
    assert backend.find(jid).state == State.PENDING  # type: ignore[union-attr]
    c = must_claim(backend)
    assert c.job.id == jid


def test_due_jobs_are_not_blocked_by_a_delayed_head(backend: Backend) -> None:
    push(backend, job(delay=60))
    (now_id,) = push(backend, job())
    c = must_claim(backend)
    assert c.job.id == now_id
    assert claim(backend) is None


# -- attempts -------------------------------------------------------------------------------


def test_attempts_are_counted_at_claim(backend: Backend) -> None:
    (jid,) = push(backend, job(max_attempts=5))
    c = must_claim(backend)
    assert c.attempt == 1
    info = backend.find(jid)
    assert info is not None and info.state == State.RESERVED and info.attempts == 1
    assert any(e.event == "claimed" and e.worker == WORKER for e in info.events)
    backend.release(c, released(c), 0)
    assert backend.find(jid).attempts == 1  # type: ignore[union-attr]
    c = must_claim(backend)
    assert c.attempt == 2
    backend.release(c, None, 0)  # un-counts: the attempt never ran
    assert backend.find(jid).attempts == 1  # type: ignore[union-attr]
    c = must_claim(backend)
    assert c.attempt == 2


def test_release_with_delay(backend: Backend) -> None:
    (jid,) = push(backend, job())
    c = must_claim(backend)
    backend.release(c, released(c), 0.3)
    assert backend.find(jid).state == State.DELAYED  # type: ignore[union-attr]
    assert claim(backend) is None
    time.sleep(0.35)
    assert must_claim(backend).job.id == jid


def test_a_release_due_after_2286_keeps_the_job_delayed(backend: Backend) -> None:
    """A retry due past the file backend's last key (2286-11-20) is filed at that key, never
    under a name too long to be a job's (issue 11, item 4)."""
    (jid,) = push(backend, job())
    c = must_claim(backend)
    backend.release(c, released(c), 9e9)
    info = backend.find(jid)
    assert info is not None and info.state == State.DELAYED and info.attempts == 1
    assert claim(backend) is None
    assert backend.maintain() is not None and backend.find(jid).state == State.DELAYED  # type: ignore[union-attr]


# -- outcomes -------------------------------------------------------------------------------


def test_ack_moves_to_done_and_find_still_answers(backend: Backend) -> None:
    (jid,) = push(backend, job())
    c = must_claim(backend)
    backend.ack(c, done(c))
    info = backend.find(jid)
    assert info is not None
    assert info.state == State.DONE and info.attempts == 1
    assert info.last_event is not None and info.last_event.event == "done"
    assert claim(backend) is None
    s = stats(backend)
    assert (s.pending, s.reserved, s.done) == (0, 0, 1)


def test_fail_records_reason_and_error(backend: Backend) -> None:
    (jid,) = push(backend, job())
    c = must_claim(backend)
    backend.fail(c, failed(c, Reason.EXIT_CODE, "exited with 3"))
    info = backend.find(jid)
    assert info is not None and info.state == State.FAILED and info.attempts == 1
    assert info.failure is not None
    assert info.failure.reason == "exit_code" and info.failure.error == "exited with 3"
    assert stats(backend).failed == 1
    assert claim(backend) is None


def fail_one(b: Backend, j: Job, reason: str = Reason.EXCEPTION) -> str:
    push(b, j)
    c = must_claim(b, j.queue)
    assert c.job.id == j.id
    b.fail(c, failed(c, reason))
    return j.id


def test_failed_jobs_newest_first(backend: Backend) -> None:
    ids = []
    for _ in range(3):
        ids.append(fail_one(backend, job()))
        time.sleep(0.002)
    got = [i.id for i in backend.jobs(state=State.FAILED)]
    assert got == ids[::-1]


def test_retry_by_id_resets_attempts(backend: Backend) -> None:
    a = fail_one(backend, job())
    b = fail_one(backend, job())
    retried = [i.id for i in backend.retry([a])]
    assert retried == [a]
    info = backend.find(a)
    assert info is not None and info.state == State.PENDING and info.attempts == 0
    assert backend.find(b).state == State.FAILED  # type: ignore[union-attr]
    c = must_claim(backend)
    assert c.job.id == a and c.attempt == 1
    assert list(backend.retry([new_id()])) == []  # unknown ids are skipped


def test_retry_all_and_filters(backend: Backend) -> None:
    exc = fail_one(backend, job(), Reason.EXCEPTION)
    code = fail_one(backend, job(), Reason.EXIT_CODE)
    other = fail_one(backend, job(command="email:send", args=("--user", "1")), Reason.EXCEPTION)
    assert [i.id for i in backend.retry(None, reason="exit_code")] == [code]
    assert [i.id for i in backend.retry(None, command="email:send")] == [other]
    assert {i.id for i in backend.retry(None)} == {exc}
    assert stats(backend).failed == 0 and stats(backend).pending == 3


def test_retry_filters_by_queue(backend: Backend) -> None:
    a = fail_one(backend, job("a"))
    fail_one(backend, job("b"))
    assert [i.id for i in backend.retry(None, queue="a")] == [a]
    assert stats(backend, "b").failed == 1


def test_retry_all_retries_each_job_failed_at_its_start_once_while_workers_fail_them(
        backend: Any, tmp_path: Path) -> None:
    """Issue 11 item 7: ``queue:retry all`` retries the jobs that were failed when it started,
    each once, and ends, while workers keep failing the retried jobs (``--tries=1``)."""
    n = 300
    ids = push(backend, *[job(command="probe:run", args=("--fail",)) for _ in range(n)])
    for _ in range(n):
        c = must_claim(backend)
        backend.fail(c, failed(c))
    env = cli_env(backend, tmp_path)
    outs = [tmp_path / f"worker-{i}.jsonl" for i in range(4)]
    workers = []
    for out in outs:
        with open(out, "wb") as fh:
            workers.append(subprocess.Popen([sys.executable, "-m", "forge", "queue:work", "--json", "--sleep=0.1"],
                                            env=env, stdin=subprocess.DEVNULL, stdout=fh,
                                            stderr=subprocess.STDOUT))

    def all_started() -> bool:
        if all("worker_started" in out.read_text() for out in outs):
            return True
        assert all(w.poll() is None for w in workers), [out.read_text() for out in outs]
        return False

    try:
        wait_for(all_started, timeout=60, interval=0.05, what="every worker's worker_started event")
        try:
            res = forge_cli(env, "queue:retry", "all", timeout=60)
        except subprocess.TimeoutExpired as exc:
            pytest.fail(f"queue:retry all did not end in 60 s ({len((exc.stdout or b'').split())} retries)")
    finally:
        for w in workers:
            w.terminate()
        for w in workers:
            try:
                w.wait(timeout=60)
            except subprocess.TimeoutExpired:
                w.kill()
                w.wait()
    assert res.returncode == 0, res.stderr
    printed = res.stdout.split()
    assert len(printed) == n and set(printed) == set(ids)
    for jid in ids:
        info = backend.find(jid)
        assert info is not None
        assert [e.event for e in info.events].count("retried") == 1, (jid, info.events)
    runs: dict[str, int] = {}
    for line in (tmp_path / "ledger.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["kind"] == "start":
            runs[record["job"]] = runs.get(record["job"], 0) + 1
    assert max(runs.values(), default=0) <= 1, sorted(runs.values())[-5:]


def test_forget(backend: Backend) -> None:
    jid = fail_one(backend, job())
    (pending,) = push(backend, job())
    assert backend.forget(pending) is False  # only failed jobs
    assert backend.forget(jid) is True
    assert backend.find(jid) is None
    assert backend.forget(jid) is False
    assert backend.find(pending) is not None


def test_flush_older_than_and_queue(backend: Backend) -> None:
    fail_one(backend, job("a"))
    fail_one(backend, job("a"))
    fail_one(backend, job("b"))
    assert backend.flush(older_than=3600) == 0
    assert backend.flush(queue="a") == 2
    time.sleep(0.05)
    assert backend.flush(older_than=0.01) == 1
    assert list(backend.jobs(state=State.FAILED)) == []


def test_prune_done(backend: Backend) -> None:
    for _ in range(2):
        push(backend, job())
        c = must_claim(backend)
        backend.ack(c, done(c))
    assert backend.prune_done(older_than=3600) == 0
    assert stats(backend).done == 2
    assert backend.prune_done() == 2
    assert stats(backend).done == 0


def test_clear_never_touches_reserved(backend: Backend) -> None:
    (running,) = push(backend, job())
    c = must_claim(backend)
    push(backend, job(), job(), job(delay=60))
    assert backend.clear("default") == 3
    assert claim(backend) is None
    info = backend.find(running)
    assert info is not None and info.state == State.RESERVED
    backend.ack(c, done(c))
    assert backend.find(running).state == State.DONE  # type: ignore[union-attr]


def test_pause_and_resume(backend: Backend) -> None:
    push(backend, job("a"), job("b"))
    backend.pause("a")
    assert "a" in backend.paused()
    assert stats(backend, "a").paused is True
    c = must_claim(backend, "a", "b")
    assert c.queue == "b"
    assert claim(backend, "a") is None
    backend.resume("a")
    assert backend.paused() == set()
    assert must_claim(backend, "a").queue == "a"


def test_restart_marker(backend: Backend) -> None:
    assert backend.restart_requested_at() is None
    t = backend.request_restart()
    got = backend.restart_requested_at()
    assert got is not None and abs(got - t) < 0.01 and abs(t - time.time()) < 5
    time.sleep(0.01)
    t2 = backend.request_restart()
    assert t2 > t and backend.restart_requested_at() == pytest.approx(t2)


# -- unique keys ----------------------------------------------------------------------------


def test_unique_key_held_while_pending_and_reserved(backend: Backend) -> None:
    (first,) = push(backend, job(unique="nightly"))
    with pytest.raises(DuplicateJob) as err:
        push(backend, job(unique="nightly"))
    assert isinstance(err.value, QueueError)
    assert err.value.key == "nightly" and err.value.job_id == first
    c = must_claim(backend)
    with pytest.raises(DuplicateJob):
        push(backend, job(unique="nightly"))
    backend.ack(c, done(c))
    push(backend, job(unique="nightly"))  # freed when the job finished
    assert stats(backend).pending == 1


def test_unique_key_freed_after_fail(backend: Backend) -> None:
    (first,) = push(backend, job(unique="k"))
    c = must_claim(backend)
    backend.fail(c, failed(c))
    (second,) = push(backend, job(unique="k"))  # freed: this one takes it
    with pytest.raises(DuplicateJob) as exc:
        push(backend, job(unique="k"))
    assert second in str(exc.value) and first not in str(exc.value)
    assert backend.find(first).state == State.FAILED


def test_unique_key_ttl_expires(backend: Backend) -> None:
    push(backend, job(unique="k", ttl=0.2))
    with pytest.raises(DuplicateJob):
        push(backend, job(unique="k"))
    time.sleep(0.3)
    push(backend, job(unique="k"))
    assert stats(backend).pending == 2


def test_duplicate_in_a_batch_stores_nothing(backend: Backend) -> None:
    push(backend, job(unique="held"))
    with pytest.raises(DuplicateJob):
        push(backend, job(), job(unique="free"), job(unique="held"))
    assert stats(backend).pending == 1
    push(backend, job(unique="free"))  # the batch's key was given back
    with pytest.raises(DuplicateJob):
        push(backend, job(unique="x"), job(unique="x"))
    assert stats(backend).pending == 2


def test_clear_frees_unique_keys(backend: Backend) -> None:
    push(backend, job(unique="k"))
    assert backend.clear("default") == 1
    push(backend, job(unique="k"))


def test_retry_leaves_a_unique_job_failed_while_a_live_job_holds_its_key(backend: Backend) -> None:
    """Issue 11 item 13b: a unique key is held by at most one live job, retries included."""
    old = fail_one(backend, job(unique="nightly"))  # failing freed the key
    other = fail_one(backend, job())
    (holder,) = push(backend, job(unique="nightly"))
    got = list(backend.retry([old, other]))
    assert [type(g) for g in got] == [RetryBlocked, type(backend.find(other))]
    blocked = got[0]
    assert isinstance(blocked, RetryBlocked) and isinstance(blocked, DuplicateJob)
    assert (blocked.failed_id, blocked.key, blocked.job_id) == (old, "nightly", holder)
    assert old in blocked.message and "nightly" in blocked.message and holder in blocked.message
    assert backend.find(old).state == State.FAILED  # type: ignore[union-attr]
    assert backend.find(other).state == State.PENDING  # type: ignore[union-attr]
    assert [type(g) for g in backend.retry(None)] == [RetryBlocked]
    with pytest.raises(DuplicateJob) as dup:
        push(backend, job(unique="nightly"))
    assert dup.value.job_id == holder
    c = must_claim(backend)
    assert c.job.id == holder
    backend.ack(c, done(c))  # the key is free again: the retry takes it
    assert [i.id for i in backend.retry([old])] == [old]  # type: ignore[union-attr]
    with pytest.raises(DuplicateJob) as dup:
        push(backend, job(unique="nightly"))
    assert dup.value.job_id == old


def test_retry_takes_back_a_unique_key_whose_ttl_passed_with_a_fresh_ttl(backend: Backend) -> None:
    old = fail_one(backend, job(unique="k", ttl=0.6))
    push(backend, job(unique="k", ttl=0.3))
    assert [type(g) for g in backend.retry([old])] == [RetryBlocked]
    time.sleep(0.35)  # the holder's ttl passed: the key is free although its job is pending
    assert [i.id for i in backend.retry([old])] == [old]  # type: ignore[union-attr]
    with pytest.raises(DuplicateJob) as dup:
        push(backend, job(unique="k"))
    assert dup.value.job_id == old
    time.sleep(0.65)  # the retried job's ttl counts from the retry
    push(backend, job(unique="k"))
    assert stats(backend).pending == 3


def test_queue_retry_cli_reports_a_job_whose_unique_key_is_taken_and_retries_the_rest(
        backend: Any, tmp_path: Path) -> None:
    old = fail_one(backend, job(unique="nightly"))
    other = fail_one(backend, job())
    (holder,) = push(backend, job(unique="nightly"))
    env = cli_env(backend, tmp_path)
    res = forge_cli(env, "queue:retry", old, other)
    assert res.returncode == EXIT_DUPLICATE, res.stderr
    assert res.stdout.split() == [other]
    (line,) = res.stderr.splitlines()
    assert old in line and '"nightly"' in line and holder in line, line
    assert backend.find(old).state == State.FAILED  # type: ignore[union-attr]
    res = forge_cli(env, "queue:retry", "all")
    assert res.returncode == EXIT_DUPLICATE and res.stdout == "", res.stderr
    assert old in res.stderr and len(res.stderr.splitlines()) == 1
    res = forge_cli(env, "queue:retry", old, new_id())  # a missing id wins: exit 5
    assert res.returncode == EXIT_NOT_FOUND and old in res.stderr and "not found" in res.stderr
    c = must_claim(backend)
    backend.ack(c, done(c))
    res = forge_cli(env, "queue:retry", "all")
    assert res.returncode == 0 and res.stdout.split() == [old], res.stderr
    res = forge_cli(env, "queue:dispatch", "--unique-key=nightly", "probe:run")
    assert res.returncode == EXIT_DUPLICATE and old in res.stderr


# -- logs, stats, listing -------------------------------------------------------------------


# -- idempotency keys (issue 11, item 5) ----------------------------------------------------


def test_an_idempotency_key_stores_one_job_while_it_is_kept_in_any_state(backend: Backend) -> None:
    first = job(idem="tick-1")
    other = job(args=("9",), idem="tick-1")  # whatever its content, the dispatch holding the key wins
    assert first.id == other.id == idempotent_id("tick-1") and is_idempotent_id(first.id)
    assert backend.push([first]) == [True]

    def refused(holder: Job, state: State) -> None:
        for again in (first, other):
            assert backend.push([again]) == [False]
        info = backend.find(first.id)
        assert info is not None and info.job.args == holder.args and info.state == state
        assert len(list(backend.jobs())) == 1

    refused(first, State.PENDING)
    c = must_claim(backend)
    assert c.job.id == first.id and c.attempt == 1  # the key's second name does not stop a claim
    refused(first, State.RESERVED)
    backend.release(c, released(c), 60)
    refused(first, State.DELAYED)
    assert backend.clear("default") == 1  # deleted: the key is free
    assert backend.push([other]) == [True]
    c = must_claim(backend)
    backend.ack(c, done(c))
    refused(other, State.DONE)  # kept for the retention
    assert backend.prune_done() == 1
    assert backend.push([first]) == [True]
    c = must_claim(backend)
    backend.fail(c, failed(c))
    refused(first, State.FAILED)
    assert [i.id for i in backend.retry([first.id])] == [first.id]
    refused(first, State.PENDING)  # retried: the same job, still holding its key
    c = must_claim(backend)
    backend.fail(c, failed(c))
    assert backend.forget(first.id) is True
    assert backend.push([other]) == [True]
    c = must_claim(backend)
    backend.fail(c, failed(c))
    assert backend.flush() == 1
    assert backend.push([first]) == [True]
    backend.maintain()
    refused(first, State.PENDING)


def test_an_idempotency_key_in_a_batch(backend: Backend) -> None:
    a, b = job(idem="a"), job(idem="b")
    assert backend.push([a, job(args=("1",), idem="a"), b]) == [True, False, True]  # twice in one batch: once
    c = job(idem="c")
    plain = job()
    assert backend.push([a, plain, b, c]) == [False, True, False, True]
    assert sorted(i.id for i in backend.jobs()) == sorted([a.id, b.id, c.id, plain.id])
    assert backend.push([job(queue="other", idem="a")]) == [False]  # one key per connection, not per queue
    assert backend.find(a.id).job.queue == "default"  # type: ignore[union-attr]
    assert stats(backend, "other").size == 0


def test_an_existing_idempotent_job_is_not_refused_for_its_unique_key(backend: Backend) -> None:
    keyed = job(unique="nightly", idem="night-1")
    assert backend.push([keyed]) == [True]
    assert backend.push([job(unique="nightly", idem="night-1")]) == [False]  # the same dispatch again
    with pytest.raises(DuplicateJob):
        backend.push([job(unique="nightly", idem="night-2")])  # another one, while the key is held
    with pytest.raises(DuplicateJob):
        backend.push([job(idem="night-3"), job(unique="nightly")])  # all or nothing, as ever
    assert backend.find(idempotent_id("night-3")) is None


def test_logs_append_and_read(backend: Backend) -> None:
    (jid,) = push(backend, job())
    assert backend.read_log(jid) == b""
    backend.append_log(jid, b"hello ")
    backend.append_log(jid, b"world\n")
    assert backend.read_log(jid) == b"hello world\n"
    assert backend.read_log(jid, 6) == b"world\n"
    assert backend.read_log(jid, 100) == b""


def test_stats_counts(backend: Backend) -> None:
    before = time.time()
    push(backend, job(), job(), job(), job(delay=60))
    c1 = must_claim(backend)
    backend.ack(c1, done(c1))
    c2 = must_claim(backend)
    backend.fail(c2, failed(c2))
    must_claim(backend)
    push(backend, job())
    (s,) = backend.stats(["default"])
    assert (s.queue, s.pending, s.delayed, s.reserved, s.done, s.failed) == ("default", 1, 1, 1, 1, 1)
    assert s.size == 2 and s.paused is False
    assert s.oldest_pending_at is not None and before <= s.oldest_pending_at <= time.time()
    assert [x.queue for x in backend.stats()] == ["default"]
    assert backend.queues() == ["default"]


def test_queues_sorted(backend: Backend) -> None:
    push(backend, job("zeta"), job("alpha"), job("mid.q-1"))
    assert backend.queues() == ["alpha", "mid.q-1", "zeta"]


def test_jobs_filters_order_and_limit(backend: Backend) -> None:
    (r,) = push(backend, job("a"))
    must_claim(backend, "a")
    p = push(backend, job("a"), job("a", command="email:send", args=("--user", "2")))
    (d,) = push(backend, job("a", delay=60))
    (other,) = push(backend, job("b"))
    f = fail_one(backend, job("c"))
    assert [i.id for i in backend.jobs(queue="a")] == [r, *p, d]
    states = [i.state for i in backend.jobs(queue="a")]
    assert states == [State.RESERVED, State.PENDING, State.PENDING, State.DELAYED]
    assert [i.id for i in backend.jobs(state=State.PENDING, queue="a")] == p
    assert [i.id for i in backend.jobs(state=State.DELAYED)] == [d]
    assert [i.id for i in backend.jobs(state=State.FAILED)] == [f]
    assert [i.id for i in backend.jobs(command="email:send")] == [p[1]]
    assert [i.id for i in backend.jobs(queue="a", limit=2)] == [r, p[0]]
    assert other in {i.id for i in backend.jobs()}
    assert len(list(backend.jobs())) == 6


def test_find_unknown(backend: Backend) -> None:
    assert backend.find(new_id()) is None


def test_wait_returns_after_timeout(backend: Backend) -> None:
    t = time.monotonic()
    backend.wait(["default"], 0.1)
    assert time.monotonic() - t < 2


# -- recovery -------------------------------------------------------------------------------

CLAIMER = """
import sys, time
kind, rest = sys.argv[1], sys.argv[2:]
if kind == "file":
    from forge.backends.file.backend import FileBackend
    b = FileBackend(rest[0])
else:
    from forge.backends.redis.backend import RedisBackend
    b = RedisBackend(rest[0], prefix=rest[1])
c = b.claim(["default"], "doomed", 0.1)
print(c.job.id if c else "none", c.attempt if c else 0, flush=True)
time.sleep(120)
"""


def claim_and_die(b: Any) -> tuple[str, int]:
    """Claim in a real process, then SIGKILL it mid-job."""
    proc = subprocess.Popen([sys.executable, "-c", CLAIMER, *b.test_spec], stdout=subprocess.PIPE,
                            text=True)
    try:
        line = proc.stdout.readline().split()  # type: ignore[union-attr]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()  # type: ignore[union-attr]
    assert line and line[0] != "none", line
    return line[0], int(line[1])


def maintain_until(b: Backend, key: str, default_tries: int = 1, within: float = 20.0) -> dict:
    """Lease backends recover only once the lease passes; lock backends at once."""
    end = time.monotonic() + within
    while True:
        counts = b.maintain(default_tries)
        if counts.get(key):
            return counts
        if time.monotonic() > end:
            raise AssertionError(f"maintain() never reported {key}: {counts}")
        time.sleep(0.2)


def test_abandoned_claim_is_recovered(backend: Any) -> None:
    (jid,) = push(backend, job(max_attempts=3))
    got, attempt = claim_and_die(backend)
    assert (got, attempt) == (jid, 1)
    assert backend.find(jid).state == State.RESERVED
    maintain_until(backend, "recovered", default_tries=1)
    info = backend.find(jid)
    assert info.state in (State.PENDING, State.DELAYED) and info.attempts == 1
    assert backend.maintain(1).get("recovered", 0) == 0  # idempotent
    c = must_claim(backend)
    assert c.job.id == jid and c.attempt == 2


def test_live_claim_is_not_recovered(backend: Backend) -> None:
    (jid,) = push(backend, job(max_attempts=3))
    c = must_claim(backend)
    counts = backend.maintain(1)
    assert counts.get("recovered", 0) == 0 and counts.get("abandoned", 0) == 0
    assert backend.find(jid).state == State.RESERVED  # type: ignore[union-attr]
    backend.ack(c, done(c))


def test_poison_job_ends_failed_abandoned(backend: Any) -> None:
    (jid,) = push(backend, job(max_attempts=2))
    claim_and_die(backend)
    maintain_until(backend, "recovered")
    got, attempt = claim_and_die(backend)
    assert (got, attempt) == (jid, 2)
    maintain_until(backend, "abandoned")
    info = backend.find(jid)
    assert info.state == State.FAILED and info.attempts == 2
    assert info.failure.reason == "abandoned"
    assert claim(backend) is None


def test_default_tries_applies_without_max_attempts(backend: Any) -> None:
    (jid,) = push(backend, job())
    claim_and_die(backend)
    maintain_until(backend, "recovered", default_tries=2)
    claim_and_die(backend)
    maintain_until(backend, "abandoned", default_tries=2)
    assert backend.find(jid).state == State.FAILED


def test_push_errors_are_queue_errors() -> None:
    assert issubclass(DispatchFailed, QueueError) and issubclass(DuplicateJob, QueueError)


def test_invalid_ids_and_queue_names(backend: Backend) -> None:
    from forge.errors import UsageError

    for call in (lambda: backend.find("../etc"), lambda: backend.read_log("x"),
                 lambda: backend.claim(["../x"], WORKER, 1), lambda: backend.pause("../x"),
                 lambda: list(backend.jobs(queue="../x"))):
        with pytest.raises(UsageError):
            call()
    assert backend.forget("bad") is False
    assert list(backend.retry(["bad"])) == []
    assert backend.append_log("bad", b"x") is None
    assert backend.next_due(["default"]) is None
    assert backend.clear("nope") == 0 and backend.flush() == 0
    assert backend.stats() == [] and backend.queues() == []
    assert backend.stats(["nope"])[0].size == 0
