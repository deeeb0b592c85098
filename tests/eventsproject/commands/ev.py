"""Commands and listeners for tests/test_events.py: jobs that succeed or fail, a durable
listener that records every event it is given, and in-process listeners (a recording one, a
failing one and a slow one), each switched on by an environment variable of the worker."""

from __future__ import annotations

import json
import os
import time

import forge
from forge import command


def _append(path: str, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


@command("ev:job")
def job(code: int = 0, sleep: float = 0.0, mark: str = "", go: str = "") -> int:
    """Exit with --code after --sleep seconds; append the job's id and attempt to --mark first,
    then wait (up to 60 s) for the file --go to exist."""
    if mark:
        _append(mark, f"{os.environ['FORGE_JOB_ID']} {os.environ['FORGE_JOB_ATTEMPT']}")
    end = time.monotonic() + 60
    while go and not os.path.exists(go) and time.monotonic() < end:
        time.sleep(0.01)
    if sleep:
        time.sleep(sleep)
    return code


@command("ev:record")
def record(tag: str = "") -> None:
    """A durable listener: append the event this job was dispatched for to $EV_LEDGER."""
    event = forge.events.current()
    assert event is not None, "no FORGE_EVENT"
    _append(os.environ["EV_LEDGER"], json.dumps({**event.to_dict(), "tag": tag,
                                                 "listener_job": os.environ["FORGE_JOB_ID"]}))


@forge.on("job.*")
def local_record(event: forge.events.Event) -> None:
    path = os.environ.get("EV_LOCAL")
    if path:
        _append(path, json.dumps({"event": event.name, "id": event.id, "job_id": event.get("job_id"),
                                  "pid": os.getpid()}))


@forge.on(["job.succeeded", "job.failed", "job.released"])
def local_fail(event: forge.events.Event) -> None:
    if os.environ.get("EV_FAIL"):
        raise RuntimeError(f"listener broke on {event.name}")


@forge.on("job.succeeded")
def local_slow(event: forge.events.Event) -> None:
    if os.environ.get("EV_SLOW"):
        try:
            time.sleep(30)
        except BaseException:  # even one that swallows the first cut-off is cut off
            time.sleep(30)
