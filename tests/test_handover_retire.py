"""A job process that fails its check after a job ends without taking the next request, and
the worker hands that request to a fresh job process (forge.worker.jobproc: the outcome is reported
before the state is put back, so the worker may send the next request meanwhile)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from conftest import add_commands, require_redis
from reliability.checker import read_ledger
from reliability.harness import make_target, worker_argv

from forge.job import State

REDIS_URL = os.environ.get("FORGE_TEST_REDIS_URL")

# Puts 5,000 variables in the environment (put back one by one: slow) and lowers a resource
# limit (not put back: the job process must retire after it).
SLOW_RETIRE = '''
import os, resource
from forge import command

@command("retire:slow")
def slow() -> None:
    """Leave a slow restore and a changed rlimit behind."""
    os.environ.update({f"FORGE_RETIRE_{i}": "x" for i in range(5_000)})
    soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
    resource.setrlimit(resource.RLIMIT_CORE, (0 if soft else 1 if hard else 0, hard))
'''


@pytest.mark.parametrize("kind", ["file", "redis"])
def test_request_sent_while_a_retiring_job_process_restores_runs_once_in_a_fresh_one(
        tmp_path: Path, kind: str) -> None:
    if kind == "redis":
        require_redis()
    t = make_target(kind, tmp_path / "t", REDIS_URL)
    try:
        add_commands(Path(t.env["FORGE_CONFIG"]), tmp_path / "extra", {"retire.py": SLOW_RETIRE})
        from forge.queue import QueuedCommand

        q = t.queue()
        first = q.dispatch(QueuedCommand("retire:slow"))
        second = q.dispatch(QueuedCommand("probe:run").with_args(["after"]))
        res = subprocess.run(worker_argv("--stop-when-empty", "--sleep=0.1", "--json"), env=t.env,
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        info = t.backend.find(first)
        assert info.state == State.DONE, (info.events, t.backend.read_log(first)[-2000:])
        assert t.backend.find(second).state == State.DONE
        starts = [r for r in read_ledger(t.ledger) if r["kind"] == "start"]
        assert len(starts) == 1 and starts[0]["job"] == second  # it ran, once
    finally:
        t.close()
