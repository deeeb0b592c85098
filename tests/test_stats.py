"""queue:stats and queue:metrics against stores with known histories, on both backends.

Histories are written two ways: outcome records with chosen times through the journal's own
API (``forge.stats.write_record``, what the backends' ack/release/fail call), and real jobs
run by a real worker.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import make_job, redis_answers
from prometheus_client.parser import text_string_to_metric_families
from test_scheduler_cli import LIBFAKETIME, needs_faketime

from forge.queue import QueueManager
from forge.stats import compute_stats, write_record


def run(target: Any, *args: str, timeout: float = 120, env: dict[str, str] | None = None,
        prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*prefix, sys.executable, "-m", "forge", *args], env={**target.env, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def known_history(backend: Any, now: float) -> None:
    """Two queues; one record of "mail" outside the hour."""
    w = write_record
    w(backend, now - 100, "default", "a:x", "done", 1, 1.0, 2.0)
    w(backend, now - 200, "default", "a:x", "done", 1, 3.0, 4.0)
    w(backend, now - 300, "default", "a:x", "done", 1, 5.0, 6.0)
    w(backend, now - 400, "default", "a:x", "failed", 1, 7.0, 8.0)
    w(backend, now - 500, "default", "a:x", "released", 1, 9.0, 10.0)
    w(backend, now - 450, "default", "a:x", "done", 2, None, 1.0)
    w(backend, now - 30, "mail", "b:y", "done", 1, 0.5, 0.25)
    w(backend, now - 4000, "mail", "b:y", "done", 1, 0.5, 0.25)


def metric_values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_stats_of_a_known_history(queue_target: Any) -> None:
    b = queue_target.backend
    b.push([make_job("default", "probe:run")])
    now = time.time() + 120  # seen two minutes from now: the pending job is two minutes old
    known_history(b, now)
    m = QueueManager(b)
    s = compute_stats(m, since=3600, now=now)
    t = s["totals"]
    assert (t["done"], t["failed"], t["retried"]) == (5, 1, 1)
    assert t["failure_rate"] == round(1 / 6, 6)
    assert t["done_per_minute"] == round(5 / 60, 3)
    # nearest rank over [0.25, 1, 2, 4, 6, 8, 10] and [0.5, 1, 3, 5, 7, 9]
    assert (t["runtime"]["count"], t["runtime"]["p50"], t["runtime"]["p95"], t["runtime"]["p99"]) == (7, 4.0, 10.0, 10.0)
    assert (t["wait"]["count"], t["wait"]["p50"], t["wait"]["p95"], t["wait"]["max"]) == (6, 3.0, 9.0, 9.0)
    assert 119 < t["oldest_pending_age"] < 122 and t["pending"] == 1
    groups = {g["queue"]: g for g in s["groups"]}
    assert (groups["default"]["done"], groups["default"]["failed"], groups["default"]["retried"]) == (4, 1, 1)
    assert groups["mail"]["done"] == 1 and groups["mail"]["oldest_pending_age"] is None
    assert 119 < groups["default"]["oldest_pending_age"] < 122
    series = s["series"]
    assert s["window"]["step_seconds"] == 60 and 61 <= len(series) <= 62
    assert sum(p["done"] for p in series) == 5 and sum(p["failed"] for p in series) == 1
    assert series[-1]["done"] + series[-2]["done"] >= 1  # the mail job 30 s ago
    assert all(p["t"].endswith(":00.000Z") for p in series)

    by_cmd = compute_stats(m, since=3600, by="command", now=now)
    assert {g["command"]: g["done"] for g in by_cmd["groups"]} == {"a:x": 4, "b:y": 1}
    only_mail = compute_stats(m, since=2 * 3600, queues=["mail"], now=now)
    assert only_mail["totals"]["done"] == 2 and [g["queue"] for g in only_mail["groups"]] == ["mail"]
    assert compute_stats(m, since=60, now=now)["totals"]["done"] == 1


def test_metrics_of_a_known_history(queue_target: Any) -> None:
    from forge.stats.metrics import render_metrics

    b = queue_target.backend
    now = time.time()
    known_history(b, now)
    b.push([make_job("default", "probe:run"), make_job("default", "probe:run", delay=600)])
    v = metric_values(render_metrics(QueueManager(b)).decode())
    d, mail = (("queue", "default"),), (("queue", "mail"),)
    assert v[("forge_queue_jobs_pending", d)] == 1 and v[("forge_queue_jobs_delayed", d)] == 1
    assert v[("forge_queue_jobs_reserved", d)] == 0 and v[("forge_queue_jobs_failed", d)] == 0
    assert 0 <= v[("forge_queue_oldest_pending_age_seconds", d)] < 60
    assert v[("forge_queue_jobs_processed_total", d)] == 4
    assert v[("forge_queue_jobs_failures_total", d)] == 1
    assert v[("forge_queue_jobs_retries_total", d)] == 1
    assert v[("forge_queue_jobs_processed_total", mail)] == 2  # counters hold all history
    assert v[("forge_queue_job_runtime_seconds_count", d)] == 6
    assert v[("forge_queue_job_runtime_seconds_sum", d)] == pytest.approx(31.0)
    assert v[("forge_queue_job_runtime_seconds_bucket", (("le", "5.0"), ("queue", "default")))] == 3
    assert v[("forge_queue_job_runtime_seconds_bucket", (("le", "+Inf"), ("queue", "default")))] == 6
    assert v[("forge_queue_job_wait_seconds_count", d)] == 5
    assert v[("forge_queue_job_wait_seconds_sum", d)] == pytest.approx(25.0)
    assert not any(k[0] == "forge_worker_up" for k in v)  # no worker runs


def test_real_jobs_through_a_worker(queue_target: Any) -> None:
    """3 jobs succeed, 1 fails twice (a retry, then for good): stats and metrics from the CLI."""
    for _ in range(3):
        assert run(queue_target, "queue:dispatch", "probe:run").returncode == 0
    r = run(queue_target, "queue:dispatch", "--tries=2", "probe:run", "--", "--exit-code", "3")
    assert r.returncode == 0, r.stderr
    w = run(queue_target, "queue:work", "--stop-when-empty")
    assert w.returncode == 0, w.stdout + w.stderr
    r = run(queue_target, "queue:stats", "--since=10m", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["version"] == 2
    t = doc["stats"]["totals"]
    assert (t["done"], t["failed"], t["retried"]) == (3, 1, 1), (t, w.stdout)
    assert t["runtime"]["count"] == 5 and t["wait"]["count"] == 4 and t["wait"]["p50"] >= 0
    assert [g["command"] for g in json.loads(run(queue_target, "queue:stats", "--by=command", "--json").stdout)
            ["stats"]["groups"]] == ["probe:run"]
    human = run(queue_target, "queue:stats")
    assert human.returncode == 0 and "default" in human.stdout and "25.0%" in human.stdout
    r = run(queue_target, "queue:metrics")
    assert r.returncode == 0, r.stderr
    v = metric_values(r.stdout)
    d = (("queue", "default"),)
    assert v[("forge_queue_jobs_processed_total", d)] == 3 and v[("forge_queue_jobs_failures_total", d)] == 1
    assert v[("forge_queue_jobs_retries_total", d)] == 1
    assert v[("forge_queue_jobs_done", d)] == 3 and v[("forge_queue_jobs_failed", d)] == 1


def test_bad_input_is_a_usage_error(queue_target: Any, tmp_path: Path) -> None:
    for args, needle in ((["--since=soon"], "--since"), (["--since=0"], "--since"), (["--by=host"], "--by"),
                         (["--queue=../x"], "queue name")):
        r = run(queue_target, "queue:stats", *args)
        assert r.returncode == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) <= 2, r.stderr
    r = run(queue_target, "queue:stats", "--since=2d")  # past the journal's retention: said, not refused
    assert r.returncode == 0 and "FORGE_STATS_RETENTION" in r.stderr
    r = run(queue_target, "queue:metrics", "--output", str(tmp_path))
    assert r.returncode == 2 and "directory" in r.stderr
    out = tmp_path / "forge.prom"
    r = run(queue_target, "queue:metrics", "--output", str(out))
    assert r.returncode == 0 and r.stdout == ""
    assert "forge_queue_jobs_pending" in out.read_text() and not list(tmp_path.glob(".forge.prom*"))


#: libfaketime preloaded directly: the ``faketime`` wrapper names a semaphore after its pid and
#: fails ("sem_open: File exists") where a killed earlier run left one behind.
TWO_DAYS_LATER = {"LD_PRELOAD": LIBFAKETIME or "", "FAKETIME": "+2d"}


@needs_faketime
def test_file_journal_is_bounded_and_counters_survive_pruning(queue_target: Any) -> None:
    """Two days later (libfaketime): the minute files are gone, the counters are not."""
    if queue_target.kind != "file":
        pytest.skip("Redis keys expire by themselves (checked in the next test)")
    b = queue_target.backend
    now = time.time()
    known_history(b, now)
    stats_dir = queue_target.queue_dir / "stats"
    assert list(stats_dir.glob("*/*.log"))
    later = run(queue_target, "queue:metrics", env=TWO_DAYS_LATER)
    assert later.returncode == 0, later.stderr
    v = metric_values(later.stdout)
    assert v[("forge_queue_jobs_processed_total", (("queue", "default"),))] == 4
    assert not list(stats_dir.glob("*/*.log"))
    r = run(queue_target, "queue:stats", "--json", "--since=1h", env=TWO_DAYS_LATER)
    assert json.loads(r.stdout)["stats"]["totals"]["done"] == 0
    assert metric_values(run(queue_target, "queue:metrics").stdout)[
        ("forge_queue_jobs_processed_total", (("queue", "default"),))] == 4


def test_redis_journal_keys_expire(queue_target: Any) -> None:
    if queue_target.kind != "redis":
        pytest.skip("the file journal is checked above")
    b = queue_target.backend
    write_record(b, time.time(), "default", "a:x", "done", 1, 0.1, 0.2)
    keys = [k.decode() for k in b.server.r.scan_iter(match=f"{queue_target.prefix}:stats:m:*")]
    assert len(keys) == 1 and 86400 - 600 < b.server.r.ttl(keys[0]) <= 86400 + 120


def test_metrics_without_the_client_library_names_the_extra(queue_target: Any) -> None:
    code = ("import sys; sys.modules['prometheus_client'] = None; sys.argv = ['forge', 'queue:metrics']\n"
            "from forge.cli.main import main; sys.exit(main())")
    r = subprocess.run([sys.executable, "-c", code], env=queue_target.env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "pip install 'forge-jobs[metrics]'" in r.stderr and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_each_outcome_is_journaled_once_and_only_if_it_took_effect(queue_target: Any) -> None:
    """Through the backend's own API: ack, release and fail journal their outcome; an ack of
    a claim that no longer holds (done already) journals nothing."""
    import contextlib

    from forge.job import Event
    from forge.stats import journal_for

    b = queue_target.backend
    b.push([make_job("default", "probe:run", max_attempts=2), make_job("default", "probe:run")])
    first = b.claim(["default"], "w", 60.0)
    b.release(first, Event("released", 1, time.time(), reason="exit_code", exit_code=1, duration=0.5), 0.0)
    second = b.claim(["default"], "w", 60.0)
    done = Event("done", second.attempt, time.time(), exit_code=0, duration=0.25)
    b.ack(second, done)
    with contextlib.suppress(Exception):  # the file backend raises, Redis refuses quietly
        b.ack(second, done)
    third = b.claim(["default"], "w", 60.0)
    b.fail(third, Event("failed", third.attempt, time.time(), reason="exit_code", exit_code=1, duration=2.0))
    totals = journal_for(b).totals()["default"]
    assert (totals.done, totals.released, totals.failed) == (1, 1, 1)
    assert totals.runtime.count == 3 and totals.runtime.sum == pytest.approx(2.75)
    assert totals.wait.count == 2  # the two first attempts; the retry's wait is its backoff
    s = compute_stats(QueueManager(b), since=600)["totals"]
    assert (s["done"], s["retried"], s["failed"]) == (1, 1, 1)
    if hasattr(b, "ack_claim"):  # Redis: the ack and the next claim in one script
        b.push([make_job("default", "probe:run")])
        nxt = b.ack_claim(second, done, ["default"], "w", 60.0)  # second is done already
        assert nxt is not None and journal_for(b).totals()["default"].done == 1  # refused: not journaled
        assert b.ack_claim(nxt, Event("done", nxt.attempt, time.time(), exit_code=0, duration=0.5),
                           ["default"], "w", 60.0) is None
        totals = journal_for(b).totals()["default"]
        assert totals.done == 2 and totals.runtime.sum == pytest.approx(3.25)


@pytest.mark.skipif(__import__("shutil").which("redis-server") is None, reason="redis-server is not installed")
def test_redis_journal_survives_a_script_cache_flush(tmp_path: Path) -> None:
    """On a server of its own: outcomes are journaled while the server does not hold the
    scripts yet (a fresh or restarted server: the library is loaded by the first call), also
    after it lost them again (FUNCTION FLUSH, SCRIPT FLUSH)."""
    import socket

    import redis
    from waitfor import wait_for

    from forge.backends.redis.backend import RedisBackend
    from forge.job import Event
    from forge.stats import journal_for

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port, socket_connect_timeout=0.5)
    b = RedisBackend(f"redis://127.0.0.1:{port}/0", prefix="flush", connect_timeout=1)
    try:
        wait_for(lambda: redis_answers(client), timeout=20)
        b.push([make_job() for _ in range(3)])

        def finish_one() -> None:
            c = b.claim(["default"], "w", 60.0)
            b.ack(c, Event("done", c.attempt, time.time(), exit_code=0, duration=0.1))

        finish_one()  # the library loaded by the push
        client.function_flush()
        finish_one()  # loaded again by the claim
        client.function_flush()
        client.script_flush()
        c = b.claim(["default"], "w", 60.0)  # loaded again
        client.function_flush()
        b.ack(c, Event("done", c.attempt, time.time(), exit_code=0, duration=0.1))  # and by the ack
        assert journal_for(b).totals()["default"].done == 3
        assert b.stats(["default"])[0].done == 3
    finally:
        b.close()
        client.close()
        proc.terminate()
        proc.wait(10)

