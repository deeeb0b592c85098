"""The backend seam: a hot-path protocol, an operations protocol, and the types they pass.

A queue store is two things, as Laravel's queue and its failed-job provider are:

* ``QueueStore``, the hot path: what dispatching and running jobs call, on every job (push,
  claim, heartbeat, ack, release, fail, wait, next_due, maintain, the cheap checks a worker
  makes between jobs);
* ``QueueOperations``: inspecting and managing the store from outside the hot path (find,
  jobs, page, stats, retry, forget, flush, prune, clear, pause/resume, cancel, worker records,
  job logs).

``Backend`` is both; every backend implements both and passes the same contract suite
(``tests/test_contract.py``). Backends move ``Job`` records and ``Event`` history; the domain
(``forge.job``) owns their JSON form. Every method is safe to call from many processes (and
hosts) at once.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from forge.errors import RetryBlocked
from forge.job import Event, Job, JobInfo, State

#: Seconds between SIGTERM and SIGKILL when a job overruns its timeout.
KILL_GRACE = 3.0
#: Extra seconds a lease lasts past the job's latest possible end.
LEASE_MARGIN = 5.0
#: Records a ``page`` with a ``command`` filter reads at most before it returns what it found.
PAGE_SCAN_BUDGET = 2000


@dataclass
class Claim:
    """A job held by one worker for one attempt.

    What the worker reads: ``job``; ``attempt``, counted durably when the claim was made;
    ``claimed_at`` and ``deadline`` (Unix times); ``lease_until``, set by lease-based backends
    (the worker must call ``heartbeat`` before it passes and kill the job if it cannot);
    ``fence``, the run's fencing token (``FORGE_JOB_TOKEN``): an integer that grows with every
    claim of the job (the claim's time in microseconds, on the store's clock); ``holds``, what a
    claim through limits holds besides the job (``forge.limits``: slots), opaque to the worker,
    which hands it back to the backend once the outcome is recorded (None for a plain claim).

    What only the backend that made the claim reads: ``handle``, its own state of the claim
    (the file backend's ``FileHandle``: the locked job file; Redis: the claim's token), and
    ``ref``, the claim named in a string (in logs and records). Nobody else may rely on either.
    """

    job: Job
    attempt: int
    claimed_at: float
    deadline: float
    lease_until: float | None = None
    #: The backend's own state of this claim (see the class docstring); opaque to the worker.
    handle: Any = None
    ref: str = ""
    fence: int = 0
    holds: Any = None

    @property
    def queue(self) -> str:
        """The name of the claimed job's queue."""
        return self.job.queue


@dataclass(frozen=True)
class QueueStats:
    """Counts of one queue's jobs by state, its oldest due job's time, and whether it is paused."""

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
        """The fields as a JSON-ready dict (``queue:stats --json``)."""
        return dict(self.__dict__)


@dataclass(frozen=True)
class JobPage:
    """Jobs ``offset`` .. of one queue and state in listing order (``QueueOperations.page``).

    ``total`` is the number of jobs in that queue and state (all of them, not only those a
    ``command`` filter matches); ``next_offset`` is where the next page starts, None on the last
    page; ``scanned`` is how many positions this page looked at.
    """

    jobs: list[JobInfo]
    total: int
    offset: int
    limit: int
    next_offset: int | None
    scanned: int = 0

    @property
    def prev_offset(self) -> int | None:
        """Where the previous page starts; None on the first page."""
        return None if self.offset == 0 else max(0, self.offset - self.limit)


class QueueStore(Protocol):
    """The hot path: dispatching, claiming, and recording outcomes."""

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
        ``max_attempts`` or else ``default_tries``, are used up), promote due delayed jobs,
        prune done jobs past the retention and stale temp files. Idempotent; any worker may run
        it at any time. Returns counts."""

    def cancel_requested(self, job_id: str) -> bool:
        """Whether ``request_cancel`` was called for the job (cheap: a worker asks twice a second)."""

    def restart_requested_at(self) -> float | None:
        """The time of the latest ``request_restart`` marker; None if there is none."""

    def close(self) -> None:
        """Release this process's descriptors and connections; the store is unchanged."""


class QueueOperations(Protocol):
    """Inspecting and managing the store: listings, counts, retries, deletion, pausing,
    cancelling, worker records and job logs."""

    def find(self, job_id: str) -> JobInfo | None:
        """The job with this id in any state, or None."""

    def jobs(
        self, *, queue: str | None = None, state: State | None = None,
        command: str | None = None, limit: int | None = None,
    ) -> Iterator[JobInfo]:
        """Jobs matching the filters: reserved, pending and delayed oldest first, then
        failed and done newest first. Reads only as many records as it yields."""

    def page(self, queue: str, state: State, *, offset: int = 0, limit: int = 50,
             command: str | None = None) -> JobPage:
        """The page of ``queue``'s jobs in ``state`` from position ``offset`` in listing order
        (as ``jobs``: reserved, pending and delayed oldest first, failed and done newest first),
        at most ``limit`` of them, at any depth without reading the records before the page.

        With ``command``, only that command's jobs are returned: the page scans forward from
        ``offset``, reading at most ``PAGE_SCAN_BUDGET`` records, and ``next_offset`` says
        where it stopped. A job that changes state while the page is read is left out.
        """

    def stats(self, queues: Sequence[str] | None = None) -> list[QueueStats]:
        """Counts per queue (these, or every queue) without reading job records."""

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
        """Delete failed jobs (of ``queue``, and older than ``older_than`` seconds, when
        given); returns how many."""

    def prune_done(self, *, older_than: float | None = None) -> int:
        """Delete done jobs (older than ``older_than`` seconds, when given); returns how many."""

    def clear(self, queue: str) -> int:
        """Delete the pending and delayed jobs of ``queue``; never touches running jobs.
        Returns how many."""

    def pause(self, queue: str) -> None:
        """Make workers skip ``queue`` until ``resume``; jobs can still be pushed to it."""

    def resume(self, queue: str) -> None:
        """Undo ``pause``; no error if the queue was not paused."""

    def paused(self) -> set[str]:
        """The names of the paused queues."""

    def request_restart(self) -> float:
        """Ask every worker to exit after its current job; returns the marker's time."""

    def ids_with_prefix(self, prefix: str, limit: int = 100) -> list[str]:
        """Ids of jobs (any state) starting with ``prefix`` (lowercase), sorted, at most ``limit``."""

    def cancel(self, job_id: str) -> JobInfo | None:
        """Fail a pending or delayed job with reason ``cancelled``, atomically (off its queue,
        its unique key freed). Returns it as failed; None if it is not waiting (running,
        finished, being claimed this instant, or unknown)."""

    def request_cancel(self, job_id: str) -> None:
        """Ask the worker running ``job_id`` to kill it and fail it with reason ``cancelled``."""

    def clear_cancel(self, job_id: str) -> None:
        """Remove the job's cancel request, if any (once the run it was for has ended)."""

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


class LimitedClaims(Protocol):
    """Claims through the limits (``forge.limits``): what a worker's gate calls once forge.toml
    or a job configures a limit. Part of every ``Backend``; a worker without limits configured
    never calls it (it claims plainly until a job with limits of its own appears)."""

    def claim_limited(self, queues: Sequence[str], worker: str, timeout: float, cfg: Any) -> Claim | None:
        """Like ``claim``, but only a job whose holds (slots, rate tokens of ``cfg`` and of the
        job) are all free, taken atomically with the claim and kept in ``Claim.holds``. A held
        job stays pending and spends no attempt; jobs of other keys behind it are not blocked."""

    @property
    def limits_wake_at(self) -> float | None:
        """After a limited claim that found nothing: when a rate frees a token next (Unix
        time), if known."""

    @property
    def limits_blocked(self) -> bool:
        """After a limited claim that found nothing: whether a due job was held back."""

    def release_holds(self, holds: Any, *, wake: bool = True) -> None:
        """Free what a claim held, once its outcome is recorded; idempotent. ``wake`` wakes one
        worker waiting for a freed slot."""

    def renew_holds(self, claim: Claim) -> bool:
        """Extend the holds' leases with the job's; False if they were lost."""

    def hand_back(self, claim: Claim) -> None:
        """Put back a job a plain claim took that has limits of its own, its attempt un-counted
        and nothing else changed."""


class Backend(QueueStore, QueueOperations, LimitedClaims, Protocol):
    """A queue store: the hot path, the operations and the limited claims (what
    ``open_backend`` returns)."""
