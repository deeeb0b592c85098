"""Redis-backend specifics, against a real server (``FORGE_TEST_REDIS_URL``).

Unset: every test here is skipped. Set but unreachable: every test fails. Each test uses its
own random key prefix and deletes its keys afterwards. The shared behaviour (FIFO, retries,
unique keys, ...) is in ``test_contract.py``; this file covers what only Redis has: atomic
server-side claims across processes, leases, claim tokens, the key layout, blocking waits,
outages and a server restart.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import blocked_waiting, redis_answers
from conftest import make_job as job
from waitfor import wait_for

import forge.backends.redis.backend as rb
from forge.backends.redis import claim as rclaim
from forge.backends.redis import server as rserver
from forge.config import Connection
from forge.errors import ConfigError, DispatchFailed, DuplicateJob, QueueUnavailable, UsageError
from forge.job import Event, Reason, State
from forge.queue import CommandQueue, QueuedCommand

RedisBackend = rb.RedisBackend

pytestmark = pytest.mark.redis
WORKER = "w"


@pytest.fixture
def backend(redis_backend: Any) -> Any:
    """Every test here is Redis-only: ``backend`` is conftest's ``redis_backend``."""
    return redis_backend


@pytest.fixture
def short_leases(monkeypatch: pytest.MonkeyPatch) -> None:
    """Leases of a fraction of a second, so expiry can be tested without waiting 8 s."""
    monkeypatch.setattr(rclaim, "KILL_GRACE", 0.0)
    monkeypatch.setattr(rclaim, "LEASE_MARGIN", 0.1)
    monkeypatch.setattr(rserver, "LEASE_WINDOW", 0.4)




def done(c: Any) -> Event:
    return Event("done", c.attempt, time.time(), worker=WORKER)


def failed(c: Any, reason: str = Reason.EXCEPTION) -> Event:
    return Event("failed", c.attempt, time.time(), worker=WORKER, reason=reason, error="boom")


# -- layout ---------------------------------------------------------------------------------

KEY_RE = re.compile(
    r"^(job|info|log):[0-9a-f-]{36}$|^q:[A-Za-z0-9_.-]+:(pending|delayed|reserved|done|failed|notify)$"
    r"|^unique:[0-9a-f]{40}$|^(queues|paused|restart)$|^wclaim:\"[^\"]+\"$"
)


def test_keys_follow_the_documented_layout_and_records_are_json(backend: Any, redis_client: Any,
                                                                  redis_prefix: str) -> None:
    j = job(unique="report-1")
    backend.push([j, job("other", delay=60)])
    backend.pause("paused-q")
    backend.request_restart()
    c = backend.claim(["default"], WORKER, 60)
    backend.append_log(j.id, b"hello\n")
    keys = [k.decode() for k in redis_client.scan_iter(match=f"{redis_prefix}:*")]
    assert keys and all(KEY_RE.match(k[len(redis_prefix) + 1:]) for k in keys), keys
    head, claimed, _ = redis_client.get(f"{redis_prefix}:job:{j.id}").split(b"\n")
    assert json.loads(head) == j.to_dict()  # the file backend's JSON, never pickle
    ev = json.loads(claimed)
    assert (ev["event"], ev["attempt"], ev["worker"]) == ("claimed", 1, WORKER)
    assert ev["deadline"] - ev["at"] == pytest.approx(c.deadline - c.claimed_at, abs=0.001)
    assert redis_client.get(f"{redis_prefix}:unique:{rb._hash_key('report-1')}") == j.id.encode()


def test_push_is_idempotent_per_job_id(backend: Any) -> None:
    """A client retry after a lost reply must not queue the job twice."""
    j = job()
    backend.push([j])
    backend.push([j])
    assert backend.stats(["default"])[0].pending == 1


def test_an_existing_id_is_skipped_with_or_without_unique_keys_in_the_batch(backend: Any) -> None:
    """push checks existence two ways (SET NX of the record when no job of the batch has a
    unique key; EXISTS of the info before any write when one has): both skip an existing id
    and leave its unique key unchecked, and a repeat within one batch is stored once."""
    held = job(unique="held")
    backend.push([held])
    again = job(idem="k1")
    assert backend.push([again, again]) == [True, False]
    assert backend.push([again]) == [False]
    # held's id is skipped, its key (held by itself) unchecked, and the batch still goes in
    assert backend.push([held, job(unique="other")]) == [True, True]
    assert backend.push([again, job(unique="third")]) == [False, True]
    assert backend.stats(["default"])[0].pending == 4


def test_a_record_without_its_info_is_written_again(backend: Any, redis_client: Any, redis_prefix: str) -> None:
    """A record left without its info (a script cut short between the two writes) is no job: a
    retried push stores the job (the record's SET NX alone would have skipped it)."""
    j = job()
    redis_client.set(f"{redis_prefix}:job:{j.id}", b"partial")
    assert backend.push([j]) == [True]
    assert backend.find(j.id).state == State.PENDING
    assert backend.claim(["default"], WORKER, 60).job.to_dict() == j.to_dict()


def test_a_queue_is_listed_whenever_it_holds_jobs(backend: Any) -> None:
    """push lists a queue (P:queues) when its pending list was empty or the job is delayed; a
    queue forgotten once empty is listed again by its next job."""
    backend.push([job("q1"), job("q1")])
    backend.push([job("q2", delay=60)])
    assert {"q1", "q2"} <= set(backend.queues())
    backend.clear("q1")
    assert backend.forget_queue("q1")
    assert "q1" not in backend.queues()
    backend.push([job("q1")])
    assert "q1" in backend.queues()


def test_claim_times_follow_the_lease_formula(backend: Any) -> None:
    backend.push([job(timeout=10), job()])
    c = backend.claim(["default"], WORKER, 60)
    assert c.deadline - c.claimed_at == pytest.approx(10 + rb.KILL_GRACE, abs=0.01)
    assert c.lease_until - c.claimed_at == pytest.approx(10 + rb.KILL_GRACE + rb.LEASE_MARGIN, abs=0.01)
    assert abs(c.claimed_at - time.time()) < 1  # handed back on the local clock
    c2 = backend.claim(["default"], WORKER, 60)  # the worker's timeout applies: capped at the window
    assert c2.lease_until - c2.claimed_at == pytest.approx(rb.LEASE_WINDOW, abs=0.01)
    assert c.handle != c2.handle


# -- concurrency ----------------------------------------------------------------------------

def _claimer(url: str, prefix: str, out: str, stop: str) -> None:
    b = RedisBackend(url, prefix=prefix)
    Path(out + ".ready").touch()
    got = []
    while True:
        c = b.claim(["default"], f"p{os.getpid()}", 60)
        if c is None:
            if os.path.exists(stop) and b.claim(["default"], "last", 60) is None:
                break
            b.wait(["default"], 0.2)
            continue
        got.append(f"{c.job.id} {c.attempt}")
        b.ack(c, Event("done", c.attempt, time.time()))
    Path(out).write_text("\n".join(got))


def test_processes_claiming_concurrently_lose_and_duplicate_nothing(
        backend: Any, redis_url: str, redis_prefix: str, tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    stop, outs = str(tmp_path / "stop"), [tmp_path / f"c{i}" for i in range(4)]
    claimers = [ctx.Process(target=_claimer, args=(redis_url, redis_prefix, str(out), stop)) for out in outs]
    for p in claimers:
        p.start()
    wait_for(lambda: all(Path(f"{out}.ready").exists() for out in outs), timeout=60)
    dispatched = []
    for _ in range(40):  # dispatched while the four processes claim
        batch = [job() for _ in range(50)]
        backend.push(batch)
        dispatched += [j.id for j in batch]
    Path(stop).touch()
    for p in claimers:
        p.join(120)
    assert all(p.exitcode == 0 for p in claimers)
    claimed = [line.split() for out in outs for line in out.read_text().splitlines()]
    ids = [cid for cid, _ in claimed]
    assert len(ids) == len(set(ids)), "a job was claimed twice"
    assert set(ids) == set(dispatched), "a job was lost"
    assert {attempt for _, attempt in claimed} == {"1"}
    assert sum(1 for out in outs if out.read_text()) >= 2  # really concurrent
    s = backend.stats(["default"])[0]
    assert (s.pending, s.delayed, s.reserved, s.done) == (0, 0, 0, 2000)


# -- leases, heartbeats and claim tokens ----------------------------------------------------

def test_expired_lease_is_recovered_and_the_old_claim_is_fenced(backend: Any, short_leases: None) -> None:
    j = job(max_attempts=3, timeout=0.2)
    backend.push([j])
    old = backend.claim(["default"], WORKER, 60)
    assert backend.maintain(1)["recovered"] == 0  # lease still running
    wait_for(lambda: time.time() > old.lease_until + 0.05)
    counts = backend.maintain(1)
    assert counts["recovered"] == 1 and counts["abandoned"] == 0
    info = backend.find(j.id)
    assert info.state == State.PENDING and info.attempts == 1
    assert info.last_event.event == "released" and info.last_event.reason == Reason.ABANDONED
    new = backend.claim(["default"], WORKER, 60)
    assert (new.job.id, new.attempt) == (j.id, 2)
    # The first worker comes back: none of its outcomes may touch the job now.
    assert backend.heartbeat(old) is False
    backend.ack(old, done(old))
    backend.fail(old, failed(old))
    backend.release(old, None, 0)
    info = backend.find(j.id)
    assert info.state == State.RESERVED and info.attempts == 2
    assert backend.heartbeat(new) is True
    backend.ack(new, done(new))
    info = backend.find(j.id)
    assert info.state == State.DONE and info.attempts == 2
    assert [e.event for e in info.events] == ["claimed", "released", "claimed", "done"]


def test_exhausted_abandoned_job_fails_and_frees_its_key(backend: Any, short_leases: None) -> None:
    j = job(timeout=0.1, unique="once")
    backend.push([j])
    c = backend.claim(["default"], WORKER, 60)
    wait_for(lambda: time.time() > c.lease_until + 0.05)
    assert backend.maintain(1)["abandoned"] == 1
    info = backend.find(j.id)
    assert info.state == State.FAILED and info.failure.reason == Reason.ABANDONED
    backend.push([job(unique="once")])  # the key was freed


def test_heartbeat_extends_the_lease_but_never_past_the_deadline(backend: Any, redis_client: Any,
                                                                 redis_prefix: str, short_leases: None) -> None:
    long, short = job(timeout=60), job(timeout=0.5)
    backend.push([long, short])
    c = backend.claim(["default"], WORKER, 60)
    first = c.lease_until
    time.sleep(0.25)
    assert backend.heartbeat(c) is True and c.lease_until > first + 0.2
    server = redis_client.zscore(f"{redis_prefix}:q:default:reserved", long.id) / 1e6
    assert server == pytest.approx(c.lease_until, abs=0.05)
    time.sleep(0.25)  # past the first lease: the heartbeat kept the job
    assert backend.maintain(1)["recovered"] == 0
    assert backend.heartbeat(c) is True
    backend.ack(c, done(c))

    s = backend.claim(["default"], WORKER, 60)
    cap = s.deadline + rclaim.LEASE_MARGIN
    for _ in range(4):
        time.sleep(0.15)
        assert backend.heartbeat(s) is True
        assert s.lease_until <= cap + 0.01
    assert s.lease_until == pytest.approx(cap, abs=0.01)
    wait_for(lambda: time.time() > cap + 0.05)
    assert backend.maintain(1)["abandoned"] == 1
    assert backend.heartbeat(s) is False


def test_release_without_event_uncounts_the_attempt(backend: Any) -> None:
    j = job()
    backend.push([j])
    c = backend.claim(["default"], WORKER, 60)
    backend.release(c, None, 0)
    assert backend.find(j.id).attempts == 0
    assert backend.claim(["default"], WORKER, 60).attempt == 1


# -- ordering -------------------------------------------------------------------------------

def test_delayed_jobs_are_promoted_in_due_order(backend: Any) -> None:
    late, early, now = job(delay=0.5, command="late"), job(delay=0.3, command="early"), job(command="now")
    backend.push([late, early, now])
    assert backend.claim(["default"], WORKER, 60).job.id == now.id
    assert backend.claim(["default"], WORKER, 60) is None
    due = backend.next_due(["default"])
    assert due == pytest.approx(early.available_at, abs=0.05)
    assert backend.find(early.id).state == State.DELAYED
    wait_for(lambda: time.time() > late.available_at + 0.02)
    # Due but not yet moved: already reported as pending, and ahead of a job pushed now.
    assert backend.find(early.id).state == State.PENDING
    after = job(command="after")
    backend.push([after])
    assert [i.job.command for i in backend.jobs(state=State.PENDING)] == ["early", "late", "after"]
    got = [backend.claim(["default"], WORKER, 60).job.command for _ in range(3)]
    assert got == ["early", "late", "after"]
    assert backend.next_due(["default"]) is None


def test_strict_priority_and_pause(backend: Any) -> None:
    low, high = job("low", command="low"), job("high", command="high")
    backend.push([low])
    backend.push([high])
    assert backend.claim(["high", "low"], WORKER, 60).job.id == high.id
    backend.push([job("high", command="high2")])
    backend.pause("high")
    assert backend.paused() == {"high"} and backend.stats(["high"])[0].paused
    assert backend.claim(["high", "low"], WORKER, 60).job.id == low.id
    assert backend.claim(["high", "low"], WORKER, 60) is None
    backend.resume("high")
    assert backend.paused() == set()
    assert backend.claim(["high", "low"], WORKER, 60).job.command == "high2"


def test_jobs_merges_queues_by_time_and_reads_lazily(backend: Any) -> None:
    for i in range(6):
        backend.push([job("a" if i % 2 else "b", command=f"c{i}")])
    listed = [i.job.command for i in backend.jobs(state=State.PENDING)]
    assert listed == [f"c{i}" for i in range(6)]
    assert [i.job.command for i in backend.jobs(limit=2)] == ["c0", "c1"]
    for q in ("b", "a", "b"):
        c = backend.claim([q], WORKER, 60)
        backend.fail(c, failed(c))
    assert [i.job.command for i in backend.jobs(state=State.FAILED)] == ["c2", "c1", "c0"]


# -- unique keys ----------------------------------------------------------------------------

def test_unique_keys_all_or_nothing_and_ttl(backend: Any, redis_client: Any, redis_prefix: str) -> None:
    first = job(unique="nightly", ttl=0.4)
    backend.push([first])
    pttl = redis_client.pttl(f"{redis_prefix}:unique:{rb._hash_key('nightly')}")
    assert 0 < pttl <= 400
    bystander = job()
    with pytest.raises(DuplicateJob) as err:
        backend.push([bystander, job(unique="nightly")])
    assert err.value.job_id == first.id and err.value.key == "nightly"
    assert backend.find(bystander.id) is None  # nothing of the batch was stored
    with pytest.raises(DuplicateJob):
        backend.push([job(unique="pair"), job(unique="pair")])
    assert backend.stats(["default"])[0].pending == 1
    c = backend.claim(["default"], WORKER, 60)
    with pytest.raises(DuplicateJob):  # still held while running
        backend.push([job(unique="nightly")])
    time.sleep(0.5)
    backend.push([job(unique="nightly")])  # the ttl passed, though the first still runs
    backend.ack(c, done(c))  # must not free the second holder's key
    with pytest.raises(DuplicateJob):
        backend.push([job(unique="nightly")])


# -- markers, logs, retry -------------------------------------------------------------------

def test_restart_marker(backend: Any, redis_url: str, redis_prefix: str) -> None:
    assert backend.restart_requested_at() is None
    t = backend.request_restart()
    other = RedisBackend(redis_url, prefix=redis_prefix)  # another host sees the same marker
    try:
        assert other.restart_requested_at() == t
    finally:
        other.close()


def test_logs_are_capped_at_one_mib(backend: Any) -> None:
    j = job()
    backend.push([j])
    chunk = b"x" * 300_000
    for _ in range(4):
        backend.append_log(j.id, chunk)
    backend.append_log(j.id, b"tail")
    log = backend.read_log(j.id)
    assert len(log) == rb.LOG_CAP == 1024 * 1024
    assert backend.read_log(j.id, rb.LOG_CAP - 10) == b"x" * 10
    assert backend.read_log(j.id, rb.LOG_CAP + 5) == b""
    with pytest.raises(UsageError):
        backend.read_log("../etc/passwd")


def test_retry_streams_and_never_repeats_a_job(backend: Any) -> None:
    n = 250
    backend.push([job(command="bad" if i % 5 == 0 else "ok") for i in range(n)])
    for _ in range(n):
        c = backend.claim(["default"], WORKER, 60)
        backend.fail(c, failed(c))
    stream = backend.retry(None, command="ok")
    first = next(stream)
    assert first.state == State.PENDING and first.attempts == 0
    assert backend.stats(["default"])[0].failed > n // 2  # not all moved at once
    seen = [first.id]
    for info in stream:
        seen.append(info.id)
        c = backend.claim(["default"], WORKER, 60)  # fails again at once: not retried twice
        backend.fail(c, failed(c))
    assert len(seen) == len(set(seen)) == n - n // 5
    assert backend.find(first.id).events[-3].event == "retried"


# -- blocking wait --------------------------------------------------------------------------

def test_idle_wait_wakes_within_milliseconds_of_a_dispatch(backend: Any, redis_url: str,
                                                            redis_prefix: str) -> None:
    waiter = RedisBackend(redis_url, prefix=redis_prefix)
    woke: list[float] = []

    def idle() -> None:
        waiter.wait(["default"], 4.0)
        woke.append(time.monotonic())

    try:
        t = threading.Thread(target=idle)
        t.start()
        assert t.native_id is not None
        wait_for(lambda: blocked_waiting(t.native_id, {"7"}))  # in poll(): its BLPOP
        pushed = time.monotonic()
        backend.push([job()])
        t.join(5)
        assert woke and woke[0] - pushed < 0.1, woke
        assert waiter.claim(["default"], WORKER, 60) is not None
    finally:
        waiter.close()


def test_wait_is_capped_by_the_next_due_job(backend: Any) -> None:
    backend.push([job(delay=0.3)])
    backend.wait(["default"], 0.01)  # consume the dispatch's wake-up token
    t = time.monotonic()
    backend.wait(["default"], 4.0)
    assert 0.15 < time.monotonic() - t < 1.0
    assert backend.claim(["default"], WORKER, 60) is not None


# -- failures -------------------------------------------------------------------------------

def test_unreachable_server_is_queue_unavailable_with_the_password_masked() -> None:
    b = RedisBackend("redis://forge:s3cret@127.0.0.1:1/0", prefix="x", connect_timeout=1)
    t = time.monotonic()
    with pytest.raises(QueueUnavailable) as err:
        b.push([job()])
    assert time.monotonic() - t < 5
    assert "s3cret" not in str(err.value) and "***" in str(err.value)
    assert "\n" not in str(err.value) and err.value.exit_code == 6
    for call in (lambda: b.claim(["default"], WORKER, 60), lambda: b.stats(),
                 lambda: b.wait(["default"], 0.5), lambda: list(b.jobs())):
        with pytest.raises(QueueUnavailable):
            call()
    b.close()


def test_server_errors_are_translated() -> None:
    where = "Redis at redis://127.0.0.1:6379/0"
    busy = rb._translate(redis.exceptions.ResponseError("BUSY Redis is busy running a script."), where, False)
    assert isinstance(busy, QueueUnavailable)
    oom = rb._translate(redis.exceptions.OutOfMemoryError("OOM command not allowed"), where, True)
    assert isinstance(oom, DispatchFailed)
    late = rb._translate(redis.exceptions.TimeoutError("Timeout reading"), where, True)
    assert isinstance(late, QueueUnavailable) and "may or may not" in str(late)


def test_configuration(monkeypatch: pytest.MonkeyPatch, redis_url: str) -> None:
    with pytest.raises(ConfigError):
        RedisBackend("http://127.0.0.1:6379")
    conn = Connection("r", "redis", url=redis_url, prefix="p1", password_env="FORGE_TEST_NO_SUCH_PW")
    monkeypatch.delenv("FORGE_TEST_NO_SUCH_PW", raising=False)
    with pytest.raises(ConfigError, match="FORGE_TEST_NO_SUCH_PW"):
        RedisBackend.from_connection(conn)
    b = RedisBackend.from_connection(Connection("r", "redis", url=redis_url, prefix="p1"),
                                     done_retention=7.0)
    assert (b.prefix, b.done_retention, b.lease_based) == ("p1", 7.0, True)
    b.close()
    monkeypatch.setattr(rb, "_redis", None)
    with pytest.raises(ConfigError, match=r"pip install 'forge-jobs\[redis\]'"):
        RedisBackend(redis_url)


# -- a server restart under the backend -----------------------------------------------------

def _free_port() -> int:
    for port in range(6390, 6490):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.skip("no free port in 6390-6489")


def _start_server(port: int, data: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "yes", "--appendfsync", "always", "--dir", str(data)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    c = redis.Redis(port=port, socket_connect_timeout=0.2)
    try:
        wait_for(lambda: redis_answers(c), timeout=10)
    finally:
        c.close()
    return proc



@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_server_crash_and_restart_loses_nothing(redis_url: str, tmp_path: Path) -> None:
    port = _free_port()
    proc = _start_server(port, tmp_path)
    b = RedisBackend(f"redis://127.0.0.1:{port}/0", prefix="crash", connect_timeout=1)
    try:
        jobs = [job() for _ in range(20)]
        b.push(jobs[:10])
        for j in jobs[10:]:
            b.push([j])
        held = b.claim(["default"], WORKER, 60)

        proc.send_signal(signal.SIGKILL)  # a crash: only what was fsynced survives
        proc.wait()
        with pytest.raises(QueueUnavailable):
            b.push([job()])
        with pytest.raises(QueueUnavailable):
            b.claim(["default"], WORKER, 60)

        proc = _start_server(port, tmp_path)
        # The same backend object reconnects (and reloads its scripts) by itself.
        assert b.heartbeat(held) is True
        b.ack(held, done(held))
        got = [held.job.id]
        while (c := b.claim(["default"], WORKER, 60)) is not None:
            got.append(c.job.id)
            b.ack(c, done(c))
        assert sorted(got) == sorted(j.id for j in jobs) and len(got) == len(set(got))
        s = b.stats(["default"])[0]
        assert (s.pending, s.reserved, s.done) == (0, 0, 20)
        assert b.find(held.job.id).attempts == 1
    finally:
        b.close()
        proc.terminate()
        proc.wait(10)


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_workers_ride_out_a_server_restart(redis_url: str, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Two real `forge queue:work` processes drain one queue while the server crashes and
    comes back: every job runs, none twice (the outage is far shorter than a lease)."""
    port = _free_port()
    data = tmp_path / "redis"
    data.mkdir()
    proc = _start_server(port, data)
    commands = Path(__file__).resolve().parent / "project" / "commands"
    config = tmp_path / "forge.toml"
    config.write_text(
        f'[forge]\ncommands = ["{commands}"]\nplugins = false\n'
        '[queue]\nconnection = "redis"\ntries = 1\ntimeout = "60s"\nbackoff = [0]\n'
        f'[connections.redis]\ndriver = "redis"\nurl = "redis://127.0.0.1:{port}/0"\n'
        'prefix = "ride"\nconnect_timeout = "1s"\n')
    ledger = tmp_path / "ledger.jsonl"
    monkeypatch.setenv("FORGE_CONFIG", str(config))
    monkeypatch.setenv("FORGE_PROBE_LEDGER", str(ledger))
    ids = CommandQueue().dispatch_many(
        [QueuedCommand("probe:run").with_args([str(i), "--sleep", "0.03"]) for i in range(120)])
    workers = [subprocess.Popen([sys.executable, "-m", "forge", "queue:work", "--stop-when-empty"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for _ in range(2)]
    try:
        wait_for(lambda: ledger.exists() and len(ledger.read_text().splitlines()) > 20, timeout=60)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        time.sleep(1.0)
        proc = _start_server(port, data)
        outputs = [w.communicate(timeout=120)[0] for w in workers]
        assert all(w.returncode == 0 for w in workers), outputs
        assert any("unavailable" in out.lower() for out in outputs), outputs  # the outage was seen
        runs = [json.loads(line) for line in ledger.read_text().splitlines()]
        ended = [r["job"] for r in runs if r["kind"] == "end"]
        assert sorted(set(ended)) == sorted(ids) and len(ended) == len(ids)
        b = RedisBackend(f"redis://127.0.0.1:{port}/0", prefix="ride")
        s = b.stats(["default"])[0]
        b.close()
        assert (s.pending, s.reserved, s.failed, s.done) == (0, 0, 0, 120)
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.communicate()
        proc.terminate()
        proc.wait(10)
