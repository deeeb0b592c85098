"""Where outcomes are recorded: ``record_outcome`` (called by the backends' ack, release and
fail) and ``journal_for`` (the journal of a backend, file or Redis).

The journal is a compact history kept apart from the job records, so the stats reach past
``done_retention`` (done jobs are deleted after it) and read one small line per attempt
instead of a job file: bounded by ``RETENTION`` and a cap per minute (see each journal).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Protocol, cast

from forge.stats import records as rec

if TYPE_CHECKING:
    from forge.backends.base import Backend, Claim, QueueStore
    from forge.backends.file.layout import FileLayout
    from forge.job import Event

#: How long outcome records are kept (seconds), whatever ``done_retention`` is:
#: ``FORGE_STATS_RETENTION`` (seconds) overrides it. A record is about 75 bytes, so a day of
#: a million attempts keeps about 75 MB (in Redis's memory, on the Redis backend). The totals
#: behind the Prometheus counters are kept for ever (a few numbers per queue).
RETENTION = 86400.0


class Journal(Protocol):
    """Where a connection's outcome records are kept (``queue:stats`` and the metrics read it)."""

    def write(self, line: bytes, record: rec.Record) -> None:
        """Append one record (``line`` is its encoded form)."""

    def read(self, since: float, until: float) -> list[rec.Record]:
        """The records with ``since <= t <= until``, in no particular order."""

    def totals(self) -> dict[str, rec.QueueTotals]:
        """Per-queue totals over all history (monotonic but for a lost store)."""

    def close(self) -> None:
        """Release what the journal holds open (files, nothing on Redis)."""


def retention() -> float:
    """Seconds of records kept: ``FORGE_STATS_RETENTION`` if it is a positive number, else a day."""
    raw = os.environ.get("FORGE_STATS_RETENTION")
    if raw:
        try:
            value = float(raw)
            if value > 0:
                return value
        except ValueError:
            pass
    return RETENTION


def journal_for(backend: QueueStore) -> Journal:
    """The journal of ``backend`` (made once per backend object)."""
    j = getattr(backend, "_forge_stats_journal", None)
    if j is None:
        if getattr(backend, "driver", "") == "redis":
            from forge.stats.redisjournal import RedisJournal

            j = RedisJournal(backend, retention())
        elif _file_layout(backend) is not None:  # the file backend: its journal lives in its tree
            from forge.stats.filejournal import FileJournal

            def every_ten_minutes(name: str) -> None:
                if name.endswith("0"):  # progress records of deleted jobs (Redis ones expire)
                    from forge.jobprogress.store import sweep

                    sweep(cast("Backend", backend))

            lay = _file_layout(backend)
            assert lay is not None
            j = FileJournal(lay.path, lay.uid, retention(), on_new_minute=every_ten_minutes)
        else:
            raise TypeError(f"no stats journal for {type(backend).__name__}")
        backend._forge_stats_journal = j  # type: ignore[attr-defined]
    return j


def _file_layout(backend: object) -> FileLayout | None:
    """The file backend's layout (where its journal lives); None for another backend."""
    from forge.backends.file.layout import FileLayout

    lay = getattr(backend, "layout", None)
    return lay if isinstance(lay, FileLayout) else None


def record_outcome(backend: QueueStore, claim: Claim, event: Event | None) -> None:
    """Journal the end of ``claim``'s attempt (``event``: done, released or failed). Best
    effort: the outcome itself is already recorded; a journal that cannot be written (a full
    disk, Redis gone this instant) loses this record, never the job."""
    if event is None or event.event not in rec.OUTCOMES:
        return
    line, record = _record(claim, event)
    try:
        journal_for(backend).write(line, record)
    except Exception:  # noqa: BLE001 - best effort, see above
        pass


def _record(claim: Claim, event: Event) -> tuple[bytes, rec.Record]:
    job = claim.job
    # A job recovered after its worker died: its claim time is not known here.
    first = claim.attempt == 1 and event.reason != "abandoned"
    wait = claim.claimed_at - job.available_at if first else None
    record: rec.Record = [event.at, job.queue, job.command, event.event, claim.attempt, wait, event.duration]
    return rec.encode(event.at, job.queue, job.command, event.event, claim.attempt, wait, event.duration), record


def finish_with_outcome(backend: Any, finish_args: Any, claim: Claim, event: Event) -> bool:
    """Redis: run the backend's ``finish`` script with the outcome's journal line in the same
    script (``RedisJournal.finish_and_write``); returns whether the finish took effect."""
    if event.event not in rec.OUTCOMES:
        from forge.backends.redis import lua

        with backend.server.io():
            return bool(backend.server.run(lua.FINISH, *finish_args))
    line, record = _record(claim, event)
    return bool(journal_for(backend).finish_and_write(  # type: ignore[attr-defined]
        "finish", finish_args, claim.job.id, claim.handle, line, record))


def ack_claim_with_outcome(backend: Any, args: Any, claim: Claim, event: Event, *, quick: bool = False) -> Any:
    """Redis: ``ack_claim`` (acknowledge ``claim``, claim the next job) with the ack's journal
    line in the same script; returns ``ack_claim``'s reply (``quick``: ``Server.run``'s)."""
    line, record = _record(claim, event)
    return journal_for(backend).finish_and_write(  # type: ignore[attr-defined]
        "ack_claim", args, claim.job.id, claim.handle, line, record, quick=quick)


def write_record(backend: Backend, t: float, queue: str, command: str, outcome: str, attempt: int = 1,
                 wait: float | None = None, runtime: float | None = None) -> None:
    """Journal one outcome with a chosen time (for imports, tests and benchmarks); raises on errors."""
    if outcome not in rec.OUTCOMES:
        raise ValueError(f"outcome must be one of {', '.join(rec.OUTCOMES)}")
    record: rec.Record = [t, queue, command, outcome, attempt, wait, runtime]
    j = journal_for(backend)
    line = rec.encode(t, queue, command, outcome, attempt, wait, runtime)
    j.write(line, record)
