"""The shared fixtures' own rules (tests/conftest.py): a Redis test is skipped when
FORGE_TEST_REDIS_URL is unset and fails when it is set but the server does not answer, so a
broken server can never pass as a row of skips; the event waits end instead of hanging; and the
one polling wait (tests/waitfor.py) returns as soon as its condition holds and otherwise fails
saying what it waited for."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import blocked_waiting, next_event, started
from waitfor import wait_for

TESTS = Path(__file__).resolve().parent
# One Redis test through each fixture path: the backend pair, redis_backend, queue_target.
REDIS_TESTS = [
    "tests/test_contract.py::test_empty_queue_claims_nothing[redis]",
    "tests/test_redis_backend.py::test_push_is_idempotent_per_job_id",
    "tests/test_reliability_dispatch.py::test_a_batch_run_again_after_its_jobs_ran_queues_nothing[redis]",
]


def _pytest(url: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "FORGE_TEST_REDIS_URL"}
    if url is not None:
        env["FORGE_TEST_REDIS_URL"] = url
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", *REDIS_TESTS],
                          cwd=TESTS.parent, env=env, capture_output=True, text=True, timeout=300)


def test_an_unreachable_redis_fails_every_redis_test() -> None:
    res = _pytest("redis://127.0.0.1:1/0")  # nothing listens on port 1
    assert res.returncode == 1, res.stdout[-2000:]
    assert f"{len(REDIS_TESTS)} failed" in res.stdout or f"{len(REDIS_TESTS)} error" in res.stdout, res.stdout[-2000:]
    assert "skipped" not in res.stdout and "unreachable" in res.stdout, res.stdout[-2000:]


def test_an_unset_redis_url_skips_the_redis_tests() -> None:
    res = _pytest(None)
    assert res.returncode == 0, res.stdout[-2000:]
    assert f"{len(REDIS_TESTS)} skipped" in res.stdout and "FORGE_TEST_REDIS_URL is not set" in res.stdout, \
        res.stdout[-2000:]


def _json_printer(*lines: str, then: str = "time.sleep(60)") -> subprocess.Popen[str]:
    code = "import sys, time\n" + "".join(f"print({line!r}, flush=True)\n" for line in lines) + then
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)


def test_next_event_returns_the_named_event_and_kills_a_process_that_never_sends_it() -> None:
    proc = _json_printer("not json", '{"event": "worker_started", "pid": 1}', '{"event": "starting", "job_id": "j"}')
    try:
        assert started(proc, timeout=30) is proc
        assert next_event(proc, "starting", timeout=30) == {"event": "starting", "job_id": "j"}
        with pytest.raises(AssertionError, match="no done event in 0.5 s"):
            next_event(proc, "done", timeout=0.5)
        assert proc.wait(timeout=10) != 0  # killed by the timeout, not left hanging
    finally:
        proc.kill()
        proc.wait()


def test_blocked_waiting_tells_a_waiting_process_from_a_busy_one() -> None:
    waiting = subprocess.Popen([sys.executable, "-c", "import select, os; r, w = os.pipe(); select.select([r], [], [], 60)"])
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        from reliability.hosts import cpu_seconds

        wait_for(lambda: blocked_waiting(waiting.pid), timeout=30)
        wait_for(lambda: cpu_seconds(busy.pid) > 0.2, timeout=30)  # in its loop, past start-up
        assert not any(blocked_waiting(busy.pid) for _ in range(5))
        assert not blocked_waiting(2**22 + 12345)  # no such process
    finally:
        for p in (waiting, busy):
            p.kill()
            p.wait()


def test_wait_for_returns_the_first_true_value_at_once_and_fails_naming_what_it_awaited() -> None:
    looks = iter([0, "", None, [], "ready", "later"])
    began = time.monotonic()
    assert wait_for(lambda: next(looks), timeout=60, interval=0.001) == "ready"
    assert time.monotonic() - began < 30  # at the first true value, not at the timeout
    assert wait_for(lambda: 5, timeout=0) == 5  # looked at once even when the time is up

    began = time.monotonic()
    with pytest.raises(AssertionError, match=r"^timed out after 0\.3 s waiting for the moon \(the last look gave \[\]\)$"):
        wait_for(lambda: [], timeout=0.3, interval=0.01, what="the moon")
    assert time.monotonic() - began >= 0.3  # not before the timeout
    with pytest.raises(AssertionError, match=r"waiting for .*lambda: 1 > 2"):  # unnamed: its source says
        wait_for(lambda: 1 > 2, timeout=0)
