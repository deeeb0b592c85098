"""The worker registry: each live worker publishes a small heartbeat record; ``queue:workers`` reads them.

A worker puts its ``WorkerRecord`` into its backend (a JSON file per worker under the queue
directory, or a Redis key with a TTL under the prefix) when it starts, when its state changes
and at least every ``interval`` seconds, and removes it on a clean exit. A record whose
heartbeat is older than its ``stale_after`` is a dead worker's: readers drop it (and, on the
file backend, a record of this host whose pid is gone is dropped at once).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from dataclasses import asdict, dataclass, replace
from enum import StrEnum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from forge.backends.base import Backend

RECORD_VERSION = 1
#: Least time between two records of one worker.
MIN_GAP = 0.2


class WorkerState(StrEnum):
    """What a worker is doing, as its record says (``queue:workers``)."""

    IDLE = "idle"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPING = "stopping"


@dataclass(frozen=True)
class WorkerRecord:
    """What ``queue:workers`` shows of one worker (times are Unix seconds)."""

    name: str
    host: str
    pid: int
    queues: tuple[str, ...]
    state: WorkerState
    started_at: float
    heartbeat_at: float
    stale_after: float
    job_id: str | None = None
    job_command: str | None = None
    job_since: float | None = None
    done: int = 0
    failed: int = 0

    def to_json(self) -> bytes:
        """The record as stored: JSON with the format's version ``v`` first."""
        return json.dumps({"v": RECORD_VERSION, **asdict(self)}).encode()

    @classmethod
    def from_json(cls, data: bytes) -> WorkerRecord | None:
        """The record of stored JSON, or None for one of another version or not a record."""
        try:
            d = json.loads(data)
            if not isinstance(d, dict) or d.pop("v", None) != RECORD_VERSION:
                return None
            d["queues"] = tuple(d["queues"])
            d["state"] = WorkerState(d["state"])
            return cls(**d)
        except (ValueError, TypeError, KeyError):
            return None

    def stale(self, now: float) -> bool:
        """Whether it is a dead worker's: its heartbeat older than ``stale_after``, or (on
        this host) its process gone."""
        if now - self.heartbeat_at > self.stale_after:
            return True
        if self.host == socket.gethostname():  # this host: a worker whose process is gone is dead
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                pass
        return False


def live_workers(backend: Backend) -> list[WorkerRecord]:
    """The live workers of a connection, by host and name."""
    now = time.time()
    records = (WorkerRecord.from_json(r) for r in backend.worker_records())
    return sorted((r for r in records if r is not None and not r.stale(now)), key=lambda r: (r.host, r.name))


class Heartbeat:
    """Publishes one worker's record: ``update`` on state changes, ``beat`` from its loop."""

    def __init__(self, backend: Backend, name: str, queues: tuple[str, ...], interval: float) -> None:
        self._backend = backend
        self.interval = interval
        now = time.time()
        self._record = WorkerRecord(name, socket.gethostname(), os.getpid(), queues, WorkerState.IDLE, now, now,
                                    stale_after=max(15.0, 5 * interval))
        self._changes: dict[str, Any] = {}  # applied when the record is read (a worker updates it thrice a job)
        self._next = 0.0
        self._last = float("-inf")

    @property
    def record(self) -> WorkerRecord:
        """The record with every ``update`` so far."""
        if self._changes:
            self._record = replace(self._record, **self._changes)
            self._changes = {}
        return self._record

    def update(self, **changes: Any) -> None:
        """Change the record; it is published by the next ``beat``, at most every ``MIN_GAP``
        seconds (a worker draining thousands of jobs a second writes five records a second,
        and a job shorter than that may never show)."""
        self._changes.update(changes)
        self._next = min(self._next, self._last + MIN_GAP)
        self.beat()

    def beat(self) -> None:
        """Publish the record if ``interval`` has passed since the last time; never raises
        (a store outage is the worker's to report; the record just goes stale meanwhile)."""
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + self.interval
        self._last = now
        self._changes["heartbeat_at"] = time.time()
        with contextlib.suppress(Exception):
            self._backend.put_worker(self.record.name, self.record.to_json(), self.record.stale_after)

    def remove(self) -> None:
        """Drop the record (a clean exit); never raises."""
        with contextlib.suppress(Exception):
            self._backend.drop_worker(self.record.name)
