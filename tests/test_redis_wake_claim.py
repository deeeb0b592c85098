"""An idle Redis worker's wake-up carries its claim (BLPOP and the claim script in one
pipeline): a job claimed that way which the worker will not run now goes back uncounted."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
from conftest import blocked_waiting, next_event
from reliability.checker import read_ledger
from reliability.harness import make_target, worker_argv
from waitfor import wait_for

from forge.job import State

REDIS_URL = os.environ.get("FORGE_TEST_REDIS_URL")
pytestmark = pytest.mark.skipif(not REDIS_URL, reason="FORGE_TEST_REDIS_URL is not set")


@pytest.mark.parametrize("how", ["pause", "stop"])
def test_job_claimed_on_waking_by_a_worker_paused_or_stopping_meanwhile_goes_back_uncounted(
        tmp_path: Path, how: str) -> None:
    """SIGUSR2 / SIGTERM reach a Redis worker blocked in its wake-up (it is not interrupted
    mid-reply); the job dispatched right after wakes it and is claimed in the same pipeline.
    The worker must hand that claim back: pending, no attempt counted, run once later.

    A wake-up's BLPOP lasts at most ``BLOCK_CAP`` (5 s): when it times out between the signal
    and the dispatch (a loaded machine), the worker pauses or stops without claiming, and the
    case did not happen; it is then set up again, up to five times."""
    for attempt in range(5):
        if _claimed_on_waking(tmp_path / f"t{attempt}", how):
            return
    pytest.fail("the dispatch never reached the worker within its wake-up, in 5 tries")


def _claimed_on_waking(base: Path, how: str) -> bool:
    """One try: False if the wake-up ended before the dispatch (nothing claimed, nothing run)."""
    t = make_target("redis", base, REDIS_URL)
    try:
        from forge.queue import QueuedCommand

        q = t.queue()
        t.queue("warm").dispatch(QueuedCommand("probe:run"))  # the dispatch path is warm: no delay below
        worker = subprocess.Popen(worker_argv("--sleep=30", "--json"), env=t.env, stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, text=True)
        try:
            next_event(worker, "worker_started")
            wait_for(lambda: blocked_waiting(worker.pid, {"7"}), timeout=30)  # in poll(): its wake-up's BLPOP
            worker.send_signal(signal.SIGUSR2 if how == "pause" else signal.SIGTERM)
            job = q.dispatch(QueuedCommand("probe:run").with_args(["woken"]))
            if how == "pause":
                next_event(worker, "paused")
            else:
                assert worker.wait(timeout=30) == 0
            # The pause is reported, and the stop made, only once the wake-up (and its claim) returned.
            info = t.backend.find(job)
            kinds = [e.event for e in info.events]
            assert info.state == State.PENDING and info.attempts == 0  # not run, nor counted, either way
            assert not read_ledger(t.ledger)  # it never ran
            if "claimed" not in kinds:
                return False  # the wake-up timed out before the dispatch: try again
            if how == "pause":
                worker.send_signal(signal.SIGCONT)
            else:
                worker = subprocess.Popen(worker_argv("--stop-when-empty", "--json"), env=t.env,
                                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            wait_for(lambda: t.backend.find(job).state == State.DONE, timeout=60)
            starts = [r for r in read_ledger(t.ledger) if r["kind"] == "start"]
            assert [(r["job"], r["attempt"]) for r in starts] == [(job, 1)]
            return True
        finally:
            if worker.poll() is None:
                worker.send_signal(signal.SIGTERM)
                worker.communicate(timeout=30)
    finally:
        t.close()
