"""Probe commands for the worker and reliability tests.

``probe:run`` appends one line per run to the ledger named by ``FORGE_PROBE_LEDGER``:
``job_id attempt pid start end`` (start and end as Unix times), written in one append
when the run ends, plus a ``start`` line when it begins so that runs killed midway show up.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Annotated

import typer

from forge import command


def _ledger(kind: str, payload: dict) -> None:
    path = os.environ.get("FORGE_PROBE_LEDGER")
    if not path:
        return
    line = json.dumps({"kind": kind, "job": os.environ.get("FORGE_JOB_ID"),
                       "attempt": int(os.environ.get("FORGE_JOB_ATTEMPT", "0")),
                       "queue": os.environ.get("FORGE_QUEUE"), "pid": os.getpid(), **payload})
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


@command("probe:run")
def run(
    args: Annotated[list[str] | None, typer.Argument(help="Recorded as given.")] = None,
    sleep: Annotated[float, typer.Option(help="Seconds to sleep.")] = 0.0,
    exit_code: Annotated[int, typer.Option(help="Exit with this code.")] = 0,
    fail: Annotated[bool, typer.Option("--fail", help="Raise an exception.")] = False,
    kill_worker: Annotated[bool, typer.Option("--kill-worker", help="SIGKILL the worker: its supervisor and this job process.")] = False,
    crash: Annotated[bool, typer.Option("--crash", help="SIGKILL this job process only.")] = False,
    ignore_term: Annotated[bool, typer.Option("--ignore-term", help="Ignore SIGTERM.")] = False,
    grandchild: Annotated[str | None, typer.Option(help="Start a sleeping grandchild; write its pid here.")] = None,
    say: Annotated[str | None, typer.Option(help="Print this.")] = None,
    print_mb: Annotated[int, typer.Option(help="Print this many MiB of numbered lines, then log 'printed'.")] = 0,
    ignore_chld: Annotated[bool, typer.Option("--ignore-chld", help="Leave SIGCHLD ignored.")] = False,
    run_false: Annotated[bool, typer.Option("--run-false", help="Exit with the code of `false` run as a child.")] = False,
) -> int:
    """Record this run in the probe ledger, then do what the options say."""
    start = time.time()
    _ledger("start", {"start": start, "args": args or []})
    if say:
        print(say)
    if print_mb:
        sys.stdout.flush()
        for i in range(print_mb * 1024 * 1024 // 32):
            os.write(1, f"{i:031d}\n".encode())
        _ledger("printed", {"start": start})
    if ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if ignore_chld:
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    if run_false:
        exit_code = subprocess.run(["false"]).returncode
    if grandchild:
        child = subprocess.Popen([sys.executable, "-c",
                                  "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
        with open(grandchild, "w") as fh:
            fh.write(str(child.pid))
    if kill_worker:
        os.kill(os.getppid(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)
    if crash:
        os.kill(os.getpid(), signal.SIGKILL)
    if sleep:
        time.sleep(sleep)
    _ledger("end", {"start": start, "end": time.time(), "args": args or []})
    if fail:
        raise RuntimeError("probe failed on purpose")
    return exit_code


@command("probe:env")
def env() -> None:
    """Print the job's FORGE_* environment as JSON."""
    print(json.dumps({k: v for k, v in os.environ.items() if k.startswith("FORGE_JOB") or k == "FORGE_QUEUE"}))


@command("probe:noop")
def noop() -> None:
    """Do nothing (for throughput tests)."""


@command("probe:tick")
def tick(ms: Annotated[int, typer.Argument(help="Milliseconds to sleep.")] = 0) -> None:
    """Record a start and an end line in the ledger, sleeping ``ms`` between (cheap: for soaks)."""
    start = time.time()
    _ledger("start", {"start": start, "args": []})
    if ms:
        time.sleep(ms / 1000)
    _ledger("end", {"start": start, "end": time.time(), "args": []})
