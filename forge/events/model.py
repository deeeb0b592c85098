"""The event record: a name from ``NAMES``, a unique id, when it happened, and its payload.

An event's id is derived from what it is about (``event_id``), so the same event raised twice
(a worker that records a job's outcome again after a crash, two schedulers that see one tick)
has the same id: durable listeners are dispatched with a key made of that id, and so once.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from forge.times import rfc3339  # times as forge's JSON outputs print them

if TYPE_CHECKING:
    from forge.job import Job

#: Every event forge raises, with what it means. ``job.*`` payloads carry the job's
#: ``job_id, command, args, queue, attempt, max_attempts, dispatched_at``; see the README.
NAMES: dict[str, str] = {
    "job.dispatched": "a job was stored (raised by the process that dispatched it)",
    "job.started": "a worker claimed a job and is about to run it (its listener jobs are stored first)",
    "job.succeeded": "a job's attempt exited 0 (its outcome is recorded just after)",
    "job.failed": "a job ended in the failed state (any reason: exception, exit code, timeout, cancelled, ...)",
    "job.released": "a job's attempt failed and it goes back to its queue for a retry",
    "job.timed_out": "a job overran its timeout and was killed (then job.failed or job.released)",
    "job.cancelled": "a job was cancelled (queue:cancel), waiting or running (then job.failed)",
    "job.retried_many": "a job was released for its Nth retry ([events.thresholds] retried_many = N)",
    "worker.started": "a worker started and is about to claim jobs",
    "worker.stopping": "a worker is stopping (signal, queue:restart, --max-jobs, ...), finishing its job",
    "worker.stopped": "a worker stopped",
    "schedule.tick_dispatched": "a schedule tick's job was dispatched (once per tick, whoever ran the scheduler)",
    "schedule.tick_skipped": 'a schedule tick was skipped (overlap = "skip": the last tick\'s job was still live)',
    "queue.waiting_too_long": "a queue's oldest pending job became older than [events.thresholds] waiting_too_long",
    "queue.too_long": "a queue came to hold more pending jobs than [events.thresholds] too_long",
}

#: The metadata key under which a listener job carries the event it was dispatched for.
META_KEY = "forge_event"
#: The environment variable that hands a listener job its event (a JSON object).
ENV_VAR = "FORGE_EVENT"
#: The longest ``error`` text an event carries (the job's record keeps the whole of it).
MAX_ERROR = 2000

_HOST: list[str] = []


def _host() -> str:
    if not _HOST:
        import socket

        _HOST.append(socket.gethostname())
    return _HOST[0]


def event_id(name: str, *about: object) -> str:
    """The id of event ``name`` about ``about`` (a job id and its claim's token, ...): a UUID
    (version 8) that is the same on every host and in every process."""
    import hashlib

    key = "\0".join([name, *map(str, about)])
    h = hashlib.sha256(b"forge event\0" + key.encode()).hexdigest()
    variant = "89ab"[int(h[16], 16) & 3]
    return f"{h[:8]}-{h[8:12]}-8{h[13:16]}-{variant}{h[17:20]}-{h[20:32]}"


@dataclass(frozen=True)
class Event:
    """One event. ``data`` is its payload (JSON values; times are RFC 3339 strings)."""

    name: str
    id: str
    at: float
    data: Mapping[str, Any] = field(default_factory=dict)
    host: str = field(default_factory=_host)
    pid: int = field(default_factory=os.getpid)

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def get(self, key: str, default: Any = None) -> Any:
        """The data value of ``key``, or ``default``."""
        return self.data.get(key, default)

    def to_dict(self) -> dict[str, Any]:
        """The event as listeners receive it: ``{"event", "id", "at", "host", "pid", **data}``."""
        return {"event": self.name, "id": self.id, "at": rfc3339(self.at), "host": self.host,
                "pid": self.pid, **self.data}

    def to_json(self) -> str:
        """``to_dict`` as compact JSON (values JSON cannot hold as their ``str``)."""
        return json.dumps(self.to_dict(), separators=(",", ":"), default=str)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Event:
        """The event of a ``to_dict`` (what a listener job gets in ``FORGE_EVENT``)."""
        data = {k: v for k, v in d.items() if k not in ("event", "id", "at", "host", "pid")}
        at = d.get("at")
        when = datetime.fromisoformat(at.replace("Z", "+00:00")).timestamp() if isinstance(at, str) else 0.0
        return cls(str(d.get("event", "")), str(d.get("id", "")), when, data, str(d.get("host", "")),
                   int(d.get("pid") or 0))


def current() -> Event | None:
    """In a listener job: the event it was dispatched for (from ``FORGE_EVENT``); else None."""
    raw = os.environ.get(ENV_VAR)
    if not raw:
        return None
    try:
        doc = json.loads(raw)
    except ValueError:
        return None
    return Event.from_dict(doc) if isinstance(doc, dict) else None


def valid_pattern(pattern: str) -> bool:
    """An event name, or a glob over names (``job.*``, ``*``) that matches at least one."""
    import fnmatch

    return pattern in NAMES or any(fnmatch.fnmatchcase(n, pattern) for n in NAMES)


def job_env(metadata: Mapping[str, Any]) -> dict[str, str]:
    """The environment a listener job runs with: its event in ``FORGE_EVENT`` (none for other jobs)."""
    doc = metadata.get(META_KEY)
    return {ENV_VAR: json.dumps(doc, separators=(",", ":"))} if isinstance(doc, dict) else {}


def job_data(job: Job, attempt: int) -> dict[str, Any]:
    """The payload every ``job.*`` event carries (raised by a worker, a dispatcher or a cancel)."""
    data = {"job_id": job.id, "command": job.command, "args": list(job.args), "queue": job.queue,
            "attempt": attempt, "max_attempts": job.max_attempts, "dispatched_at": rfc3339(job.dispatched_at),
            "metadata": {k: v for k, v in job.metadata.items() if k != META_KEY}}
    if META_KEY in job.metadata:
        data["listener_job"] = True
    return data
