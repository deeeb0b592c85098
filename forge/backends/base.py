"""The ``Backend`` protocol: what a queue store must do, and the guarantees each method gives.

Backends move ``Job`` records and ``Event`` history; the domain (``forge.job``) owns their
JSON form. Every backend passes the same contract suite (``tests/test_contract.py``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from forge.errors import RetryBlocked
from forge.job import Event, Job, JobInfo, State

#: Seconds between SIGTERM and SIGKILL when a job overruns its timeout.
KILL_GRACE = 3.0
#: Extra seconds a lease lasts past the job's latest possible end.
LEASE_MARGIN = 5.0


@dataclass
class Claim:
    """A job held by one worker for one attempt.

    ``attempt`` was counted durably when the claim was made. ``fds`` are file descriptors
    whose lifetime keeps the claim alive (the file backend's locked job file): the process
    that holds them keeps the job from being recovered while it runs. ``lease_until`` is
    set by lease-based backends; the worker must call ``heartbeat`` before it passes and kill
    the job if it cannot. ``ref`` names the claim in a string (in the worker's records).
    ``fence`` is the run's fencing token (``FORGE_JOB_TOKEN``): an integer that
    grows with every claim of the job (the claim's time in microseconds, on the store's clock).
    """

    job: Job
    attempt: int
    claimed_at: float
    deadline: float
    lease_until: float | None = None
    fds: list[int] = field(default_factory=list)
    handle: Any = None
    ref: str = ""
    fence: int = 0
    #: What a claim through limits holds besides the job (``forge.limits``: slots), freed by
    #: the worker once the outcome is recorded; None for a plain claim.
    holds: Any = None

    @property
    def queue(self) -> str:
        return self.job.queue


@dataclass(frozen=True)
class QueueStats:
    queue: str
    pending: int = 0
    delayed: int = 0
    reserved: int = 0
    done: int = 0
    failed: int = 0
    oldest_pending_at: float | None = None
    paused: bool = False

    @property
    def size(self) -> int:
        """Jobs waiting to run (pending + delayed), Laravel's queue size."""
        return self.pending + self.delayed

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Backend(Protocol):
    """A queue store. All methods are safe to call from many processes (and hosts) at once."""

    #: True when liveness is a lease the worker must renew (the job must die with its worker);
    #: False when it is a lock held by the job's own process.
    lease_based: bool

    def push(self, jobs: Sequence[Job]) -> list[bool]:
        """Store every job durably before returning. Returns, per job, True if this call
        stored it. On an error nothing is stored; a process killed part-way may leave some
        of a batch stored on the file backend (a Redis push is one script): a batch that must
        survive a kill uses idempotent ids, and is pushed again.

        A job whose id was derived from an idempotency key (``forge.job.is_idempotent_id``)
        is stored only if no job with that id exists, in any state and any queue (or appears
        earlier in ``jobs``); else it is False and nothing is stored for it, its unique key
        is not checked, and the existing job is left as it is. The check and the creation
        are one atomic step: a kill at any point leaves the id either taken by a job that
        workers can see or free. Ids from ``new_id`` are always True.

        Raises ``DuplicateJob`` if a unique key is held (then nothing is stored),
        ``DispatchFailed`` on a storage error (nothing partial is visible to workers),
        ``QueueUnavailable`` if the store cannot be reached.
        """

    def claim(self, queues: Sequence[str], worker: str, timeout: float) -> Claim | None:
        """Atomically take the first due job of the first non-paused queue that has one.

        Strict priority in the order given, FIFO within a queue. The attempt counter is
        incremented durably as part of the claim. ``timeout`` applies to jobs without their
        own. Returns ``None`` when nothing is claimable now. Never returns the same job to
        two live claimers.
        """

    def heartbeat(self, claim: Claim) -> bool:
        """Extend a lease (no-op for lock-based backends). False if the claim was lost."""

    def ack(self, claim: Claim, event: Event) -> None:
        """The attempt succeeded: the job moves to done (kept for the retention), key freed."""

    def release(self, claim: Claim, event: Event | None, delay: float, *, counted: bool = True) -> None:
        """Back to pending after ``delay`` seconds. ``event=None`` or ``counted=False`` un-counts
        the attempt (the event, when given, is still recorded: a retry-later release)."""

    def fail(self, claim: Claim, event: Event) -> None:
        """The job moves to failed with the event's reason; its unique key is freed."""

    def wait(self, queues: Sequence[str], timeout: float) -> None:
        """Block until a job may have become claimable in ``queues``, or ``timeout`` passes."""

    def next_due(self, queues: Sequence[str]) -> float | None:
        """When the earliest delayed job of ``queues`` becomes due (Unix time), if known."""

    def maintain(self, default_tries: int = 1) -> dict[str, int]:
        """Recover abandoned claims (failing with reason ``abandoned`` those whose attempts,
        ``max_attempts`` or else ``default_tries``, are used up), promote due delayed jobs, prune expired done jobs and
        stale temp files. Idempotent; any worker may run it at any time. Returns counts."""

    def find(self, job_id: str) -> JobInfo | None:
        """The job with this id in any state, or None."""

    def jobs(
        self, *, queue: str | None = None, state: State | None = None,
        command: str | None = None, limit: int | None = None,
    ) -> Iterator[JobInfo]:
        """Jobs matching the filters: reserved, pending and delayed oldest first, then
        failed and done newest first. Reads only as many records as it yields."""

    def stats(self, queues: Sequence[str] | None = None) -> list[QueueStats]:
        """Counts per queue without reading job records."""

    def queues(self) -> list[str]:
        """Names of the queues that hold or have held jobs, sorted."""

    def retry(
        self, job_ids: Sequence[str] | None, *, queue: str | None = None,
        reason: str | None = None, command: str | None = None,
    ) -> Iterator[JobInfo | RetryBlocked]:
        """Move failed jobs (these ids, or all matching the filters when None) back to
        pending with attempts reset; yields each as it is retried (streaming). With None,
        only the jobs that were failed when the call started, each once.

        A unique job takes its key back atomically with the move (the key's ttl counting
        from the retry). If another live job holds the key (and its ttl has not passed), the
        job stays failed and a ``RetryBlocked`` naming the holder is yielded in its place
        (not raised): the other jobs are still retried."""

    def forget(self, job_id: str) -> bool:
        """Delete one failed job. False if there was none with this id."""

    def flush(self, *, older_than: float | None = None, queue: str | None = None) -> int:
        """Delete failed jobs (older than ``older_than`` seconds, when given)."""

    def prune_done(self, *, older_than: float | None = None) -> int:
        """Delete done jobs (older than ``older_than`` seconds, when given)."""

    def clear(self, queue: str) -> int:
        """Delete the pending and delayed jobs of ``queue``; never touches running jobs."""

    def pause(self, queue: str) -> None: ...

    def resume(self, queue: str) -> None: ...

    def paused(self) -> set[str]: ...

    def request_restart(self) -> float:
        """Ask every worker to exit after its current job; returns the marker's time."""

    def restart_requested_at(self) -> float | None: ...

    def ids_with_prefix(self, prefix: str, limit: int = 100) -> list[str]:
        """Ids of jobs (any state) starting with ``prefix`` (lowercase), sorted, at most ``limit``."""

    def cancel(self, job_id: str) -> JobInfo | None:
        """Fail a pending or delayed job with reason ``cancelled``, atomically (off its queue,
        its unique key freed). Returns it as failed; None if it is not waiting (running,
        finished, being claimed this instant, or unknown)."""

    def request_cancel(self, job_id: str) -> None:
        """Ask the worker running ``job_id`` to kill it and fail it with reason ``cancelled``."""

    def cancel_requested(self, job_id: str) -> bool:
        """Whether ``request_cancel`` was called for the job (cheap: a worker asks twice a second)."""

    def clear_cancel(self, job_id: str) -> None: ...

    def put_worker(self, name: str, record: bytes, ttl: float) -> None:
        """Publish (replace) a worker's record (opaque JSON, ``forge.worker.heartbeat``),
        atomically; a Redis record expires after ``ttl``, a file's reader judges its age."""

    def drop_worker(self, name: str) -> None:
        """Remove a worker's record (on a clean exit); no error if there is none."""

    def worker_records(self) -> list[bytes]:
        """Every published worker record, stale ones included (the reader drops those)."""

    def append_log(self, job_id: str, data: bytes) -> None:
        """Append captured job output (capped)."""

    def read_log(self, job_id: str, offset: int = 0) -> bytes:
        """Captured output from ``offset``; empty if none."""

    def close(self) -> None: ...
