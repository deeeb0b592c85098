"""``queue:work --json``: one JSON object per event, whose keys (and their order) log shippers read."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from forge.queue import CommandQueue, QueuedCommand

JOB = ["event", "ts", "job_id", "command", "queue", "attempt", "started"]
FAILED = [*JOB, "duration_ms", "reason", "error", "exit_code"]


def test_job_events_keep_their_keys_in_order(probe_project: Path) -> None:
    q = CommandQueue()
    ok = q.dispatch(QueuedCommand("probe:run"))
    retried = q.dispatch(QueuedCommand("probe:run").with_args(["--exit-code", "3"]).with_max_attempts(2)
                         .with_backoff(0))
    res = subprocess.run([sys.executable, "-m", "forge", "queue:work", "--stop-when-empty", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    events = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    of = {(e["event"], e.get("job_id"), e.get("attempt")): e for e in events}
    assert list(of[("starting", ok, 1)]) == JOB
    assert list(of[("done", ok, 1)]) == [*JOB, "duration_ms"]
    released = of[("released", retried, 1)]
    assert list(released) == [*FAILED, "retry_in"]
    assert (released["reason"], released["error"], released["exit_code"]) == ("exit_code", "exited with code 3", 3)
    failed = of[("failed", retried, 2)]
    assert list(failed) == FAILED and failed["exit_code"] == 3
    assert list(events[-1]) == ["event", "ts", "reason", "jobs", "connection", "location"]
    assert events[-1]["event"] == "worker_stopped" and events[-1]["jobs"] == 3
