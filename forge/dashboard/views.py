"""What each dashboard page shows, gathered from the store as plain data (no web code here).

``Views`` wraps one ``QueueManager``; every method reads the store once and returns dicts and
lists that the templates render. Store calls are blocking: the web layer runs them in a worker
thread, one at a time (``lock``), so the backend objects are never used by two threads at once.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from forge.dashboard import listing
from forge.dashboard.stats_view import StatsCache
from forge.job import JobInfo, State
from forge.queue.manager import QueueManager

#: Newest failed jobs read to group failures (grouping more would read every record).
FAILED_WINDOW = 5000
#: Bytes of a job's log shown when its page opens (the rest streams in as it is written).
LOG_TAIL = 64 * 1024
PAGE_SIZES = (25, 50, 100, 200)


@dataclass
class Views:
    """What the dashboard's pages show, read from one connection's store (blocking calls: the app
    runs them in a thread under ``lock``, one at a time)."""

    manager: QueueManager
    stats: StatsCache = field(init=False)
    dirs: listing.Listings | None = field(init=False, default=None)
    lock: threading.Lock = field(default_factory=threading.Lock)
    _scheduler: Any = None
    _scheduler_loaded: bool = False

    def __post_init__(self) -> None:
        self.stats = StatsCache(self.manager)
        self.dirs = listing.Listings(self.backend) if type(self.backend).__name__ == "FileBackend" else None

    def queue_stats(self, queues: list[str] | None = None) -> list[Any]:
        """``QueueManager.stats``, from the reusable listings on the file backend."""
        if self.dirs is not None:
            return self.dirs.stats(queues)
        return self.manager.stats(queues)

    @property
    def backend(self) -> Any:
        """The connection's queue backend."""
        return self.manager.backend

    # -- overview -----------------------------------------------------------------------

    def queues(self) -> list[dict[str, Any]]:
        """One row per queue: its counts by state, whether it is paused, the age of its oldest
        pending job (seconds) and its per-minute series (None while they are not computed)."""
        now = time.time()
        series = self.stats.series()
        out = []
        for s in self.queue_stats():
            out.append({
                "name": s.queue, "pending": s.pending, "delayed": s.delayed, "reserved": s.reserved,
                "failed": s.failed, "done": s.done, "paused": s.paused,
                "oldest_pending": None if s.oldest_pending_at is None else max(now - s.oldest_pending_at, 0.0),
                "series": None if series is None else series.get(s.queue) or self.stats.empty(),
            })
        return out

    def workers(self) -> list[dict[str, Any]]:
        """One row per live worker: its name, host, pid, queues, state, current job and for how
        long, uptime, counts and heartbeat age."""
        now = time.time()
        return [{"name": w.name, "host": w.host, "pid": w.pid, "queues": ", ".join(w.queues),
                 "state": str(w.state), "job_id": w.job_id, "job_command": w.job_command,
                 "job_for": None if w.job_since is None else max(now - w.job_since, 0.0),
                 "up_for": max(now - w.started_at, 0.0), "done": w.done, "failed": w.failed,
                 "heartbeat_ago": max(now - w.heartbeat_at, 0.0)}
                for w in self.manager.workers()]

    def scheduler(self) -> Any:
        """The project's scheduler (loaded once), or None when it has no schedule or it fails to load."""
        if not self._scheduler_loaded:
            self._scheduler_loaded = True
            try:
                from forge.scheduler import Scheduler

                sch, _ = Scheduler.load(settings=self.manager.settings, check_args=False,
                                        backend=self.backend)
                self._scheduler = sch if sch.entries else None
            except Exception:  # no scheduler, or a schedule that does not load: no table
                self._scheduler = None
        return self._scheduler

    def schedules(self) -> list[dict[str, Any]]:
        """The status rows of the project's schedule entries; empty without a scheduler or when
        reading the status fails."""
        sch = self.scheduler()
        if sch is None:
            return []
        try:
            return list(sch.status())
        except Exception:
            return []

    def overview(self) -> dict[str, Any]:
        """The overview page's data: queues, workers, schedules, quarantined files and the stats
        window."""
        return {"queues": self.queues(), "workers": self.workers(), "schedules": self.schedules(),
                "quarantined": self.manager.quarantined(), "stats_available": self.stats.available,
                "stats_window": self.stats.window_label}

    # -- job lists ----------------------------------------------------------------------

    def job_list(self, queue: str, state: State, *, offset: int, limit: int,
                 command: str | None) -> dict[str, Any]:
        """One page of ``queue``'s jobs in ``state`` (of ``command`` only, if given), with the
        queue's counts by state and whether it is paused; running jobs carry their progress."""
        counts = {str(s): 0 for s in listing.STATES}
        paused = False
        for s in self.queue_stats([queue]):
            counts = {"reserved": s.reserved, "pending": s.pending, "delayed": s.delayed,
                      "failed": s.failed, "done": s.done}
            paused = s.paused
        pg = listing.page(self.backend, queue, state, offset=offset, limit=limit, command=command, dirs=self.dirs)
        infos = with_progress(self.backend, pg.jobs) if state == State.RESERVED else pg.jobs
        return {"queue": queue, "state": str(state), "page": pg, "counts": counts, "paused": paused,
                "jobs": [job_row(j) for j in infos], "command": command or "", "limit": limit}

    # -- one job ------------------------------------------------------------------------

    def job(self, job_id: str) -> dict[str, Any] | None:
        """The detail of job ``job_id`` with its progress, or None if the store has no such job."""
        info = self.backend.find(job_id)
        if info is None:
            return None
        return job_detail(with_progress(self.backend, [info])[0])

    def log(self, job_id: str, offset: int) -> bytes:
        """The log from ``offset`` up to its last whole UTF-8 character: a character the job
        is still writing (split between two reads of its output) is sent whole next time."""
        data = self.backend.read_log(job_id, offset)
        return data[:utf8_whole(data)]

    def log_tail(self, job_id: str) -> tuple[str, int]:
        """The end of the job's log (from a line's start) and the byte offset where it ends."""
        data = self.backend.read_log(job_id, 0)
        data = data[:utf8_whole(data)]
        end = len(data)
        if end > LOG_TAIL:
            data = data[-LOG_TAIL:]
            nl = data.find(b"\n")
            data = data[nl + 1:] if nl >= 0 else data
        return data.decode(errors="replace"), end

    # -- failures -----------------------------------------------------------------------

    def failed_groups(self, queue: str | None = None) -> dict[str, Any]:
        """The newest ``FAILED_WINDOW`` failed jobs (of ``queue`` only, if given) grouped by
        command, reason and first error line, largest group first, with the total number of
        failed jobs."""
        groups: dict[tuple[str, str, str], dict[str, Any]] = {}
        scanned = 0
        for info in self.manager.jobs(queue=queue, state=State.FAILED, limit=FAILED_WINDOW):
            scanned += 1
            key = group_key(info)
            g = groups.get(key)
            if g is None:
                g = groups[key] = {"key": encode_group(key), "command": key[0], "reason": key[1],
                                   "error": key[2], "count": 0, "queues": set(), "latest": info.updated_at,
                                   "earliest": info.updated_at, "sample": info.id}
            g["count"] += 1
            g["queues"].add(info.job.queue)
            if info.updated_at is not None:
                g["earliest"] = info.updated_at if g["earliest"] is None else min(g["earliest"], info.updated_at)
        rows = sorted(groups.values(), key=lambda g: (-g["count"], g["command"]))
        for g in rows:
            g["queues"] = ", ".join(sorted(g["queues"]))
        total = sum(s.failed for s in self.queue_stats([queue] if queue else None))
        return {"groups": rows, "scanned": scanned, "total": total, "window": FAILED_WINDOW, "queue": queue}

    def group_ids(self, key: tuple[str, str, str], queue: str | None = None) -> list[str]:
        """Ids of the failed jobs in a group (among the newest ``FAILED_WINDOW``)."""
        return [i.id for i in self.manager.jobs(queue=queue, state=State.FAILED, limit=FAILED_WINDOW)
                if group_key(i) == key]


def utf8_whole(data: bytes) -> int:
    """The length of ``data`` without a UTF-8 character cut off at its end (at most 3 bytes)."""
    for back in range(1, min(4, len(data)) + 1):
        b = data[-back]
        if b < 0x80:  # ASCII: nothing cut
            return len(data)
        if b >= 0xC0:  # the lead byte of the last character: whole if all its bytes are here
            need = 2 if b < 0xE0 else 3 if b < 0xF0 else 4
            return len(data) if back >= need else len(data) - back
    return len(data)  # continuation bytes only, or not UTF-8: as it is


def group_key(info: JobInfo) -> tuple[str, str, str]:
    """The failure group of a job: its command, its failure reason and the first line of its
    error (at most 300 characters); empty strings where it has none."""
    f = info.failure
    error = (f.error or "") if f else ""
    return info.job.command, (f.reason or "") if f else "", error.strip().split("\n", 1)[0][:300]


def encode_group(key: Sequence[str]) -> str:
    """A group key as compact JSON text (a form field); ``decode_group`` reads it back."""
    return json.dumps(list(key), separators=(",", ":"))


def decode_group(text: str) -> tuple[str, str, str] | None:
    """The group key ``encode_group`` wrote, or None for any other text."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if isinstance(value, list) and len(value) == 3 and all(isinstance(v, str) for v in value):
        return value[0], value[1], value[2]
    return None


def with_progress(backend: Any, infos: list[JobInfo]) -> list[JobInfo]:
    """``infos`` with their latest progress (``forge.jobprogress``), when this forge records it."""
    try:
        from forge.jobprogress.store import with_progress as fill
    except ImportError:
        return infos
    return fill(backend, infos)


def progress_of(info: JobInfo) -> dict[str, Any] | None:
    """The job's latest reported progress (``forge.progress``), when the store has one."""
    p = getattr(info, "progress", None)
    if p is None:
        return None
    d = p if isinstance(p, dict) else getattr(p, "to_dict", lambda: None)()
    if not isinstance(d, dict):
        return None
    percent = d.get("percent")
    if percent is None and d.get("total"):
        try:
            percent = 100.0 * float(d.get("done") or 0) / float(d["total"])
        except (TypeError, ValueError, ZeroDivisionError):
            percent = None
    eta, at = d.get("eta_seconds"), d.get("updated_at")
    if isinstance(eta, int | float) and isinstance(at, int | float):
        eta = max(eta - max(time.time() - at, 0.0), 0.0)  # the ETA was as of the report
    if info.state != State.RESERVED:
        eta = None
    return {"done": d.get("done"), "total": d.get("total"),
            "percent": None if percent is None else max(0.0, min(100.0, float(percent))),
            "message": d.get("message") or "", "eta": eta if isinstance(eta, int | float) else None,
            "updated_at": at}


def job_row(info: JobInfo) -> dict[str, Any]:
    """A job as one row of a list: id, command, args, queue, state, attempts, the time that
    matters for its state, progress and, when failed, the reason and error."""
    f = info.failure if info.state == State.FAILED else None
    when = info.updated_at if info.state in (State.DONE, State.FAILED, State.RESERVED) else info.job.available_at
    return {"id": info.id, "command": info.job.command, "args": list(info.job.args), "queue": info.job.queue,
            "state": str(info.state), "attempts": info.attempts, "max_attempts": info.job.max_attempts,
            "when": when, "dispatched_at": info.job.dispatched_at, "progress": progress_of(info),
            "reason": f.reason if f else None, "error": (f.error or "") if f else None}


def job_detail(info: JobInfo) -> dict[str, Any]:
    """A job's detail page data: its row plus the record, pretty-printed metadata and payload,
    history, the last worker and whether it finished."""
    job = info.job
    worker = next((e.worker for e in reversed(info.events) if e.worker), None)
    return {**job_row(info), "job": job, "metadata": json.dumps(dict(job.metadata), indent=2, ensure_ascii=False,
                                                                 default=str) if job.metadata else "",
            "events": list(info.events), "worker": worker, "updated_at": info.updated_at,
            "finished": info.state in (State.DONE, State.FAILED),
            "payload": json.dumps(_payload(info), indent=2, ensure_ascii=False, default=str)}


def _payload(info: JobInfo) -> dict[str, Any]:
    d = info.job.to_dict()
    d.pop("metadata", None)
    return d
