"""An idle Redis worker's wake-up carries its claim (BLPOP and the claim script in one
pipeline): a job claimed that way which the worker will not run now goes back uncounted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from reliability.checker import read_ledger
from reliability.harness import make_target, wait_for, worker_argv

from forge.job import State

REDIS_URL = os.environ.get("FORGE_TEST_REDIS_URL")
pytestmark = pytest.mark.skipif(not REDIS_URL, reason="FORGE_TEST_REDIS_URL is not set")


def _events(proc: subprocess.Popen, name: str) -> dict:
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("{") and json.loads(line)["event"] == name:
            return json.loads(line)
    raise AssertionError(f"the worker ended before {name}")


def _blocked(pid: int) -> bool:
    """Whether the worker has been waiting in poll() (an idle Redis worker: its BLPOP) for two
    looks 50 ms apart (any other call it makes when idle is one short round trip)."""
    def polling() -> bool:
        return Path(f"/proc/{pid}/syscall").read_text().split()[0] == "7"  # poll

    if not polling():
        return False
    time.sleep(0.05)
    return polling()


@pytest.mark.parametrize("how", ["pause", "stop"])
def test_job_claimed_on_waking_by_a_worker_paused_or_stopping_meanwhile_goes_back_uncounted(
        tmp_path: Path, how: str) -> None:
    """SIGUSR2 / SIGTERM reach a Redis worker blocked in its wake-up (it is not interrupted
    mid-reply); the job dispatched right after wakes it and is claimed in the same pipeline.
    The worker must hand that claim back: pending, no attempt counted, run once later."""
    t = make_target("redis", tmp_path / "t", REDIS_URL)
    try:
        from forge.queue import QueuedCommand

        worker = subprocess.Popen(worker_argv("--sleep=30", "--json"), env=t.env, stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, text=True)
        try:
            _events(worker, "worker_started")
            wait_for(lambda: _blocked(worker.pid), timeout=30)  # in its wake-up's BLPOP
            worker.send_signal(signal.SIGUSR2 if how == "pause" else signal.SIGTERM)
            job = t.queue().dispatch(QueuedCommand("probe:run").with_args(["woken"]))
            if how == "pause":
                _events(worker, "paused")
            else:
                assert worker.wait(timeout=30) == 0
            # The pause is reported, and the stop made, only once the wake-up (and its claim) returned.
            info = t.backend.find(job)
            kinds = [e.event for e in info.events]
            assert "claimed" in kinds, kinds  # it was claimed on waking (the dispatch woke it)...
            assert info.state == State.PENDING and info.attempts == 0  # ...and handed back, uncounted
            assert not read_ledger(t.ledger)  # it never ran
            if how == "pause":
                worker.send_signal(signal.SIGCONT)
            else:
                worker = subprocess.Popen(worker_argv("--stop-when-empty", "--json"), env=t.env,
                                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            wait_for(lambda: t.backend.find(job).state == State.DONE, timeout=60)
            starts = [r for r in read_ledger(t.ledger) if r["kind"] == "start"]
            assert [(r["job"], r["attempt"]) for r in starts] == [(job, 1)]
        finally:
            if worker.poll() is None:
                worker.send_signal(signal.SIGTERM)
                worker.communicate(timeout=30)
    finally:
        t.close()
