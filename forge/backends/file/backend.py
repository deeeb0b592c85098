"""The job-file directory: a crash-safe queue with no server.

Layout under the queue directory (0700, files 0600)::

    tmp/                              jobs being written (never read by workers)
    q/<queue>/pending/<key>-<id>-<n>.job    waiting; key = available-at in microseconds
    q/<queue>/reserved/<id>-<n>.job         claimed for attempt n, locked by its job process
    q/<queue>/done/<time>-<id>-<n>.job      finished, kept for the retention
    q/<queue>/failed/<time>-<id>-<n>.job    failed for good
    q/<queue>/paused                        marker: workers skip this queue
    unique/<hash>.json                      unique-key holders
    idem/<id>.job                           idempotency keys: hard links to their jobs' files
    logs/<id>.log                           captured job output
    quarantine/                             files that were not valid jobs, with .reason files
    restart                                 queue:restart marker

A job's state and attempt count live in its file's directory and name, so every transition
is one atomic ``rename``. A claim opens and ``flock``s the pending file, then renames it to
``reserved/`` with the attempt count incremented: the lock is taken before the file is
visible as reserved, and held by the job's process for as long as it runs, so a reserved
file whose lock can be taken belongs to a dead worker. Pending names sort by key, so FIFO is
a sorted listing (``layout``). A worker lists a pending directory once into a heap and
claims from it; the names inotify reports arriving are pushed onto the heap, and the
directory is listed again only when the kernel's event queue overflowed or there is no
inotify. Workers sharing a queue would race for the same head: one that loses skips a few
due names at random (and retries them shortly), so FIFO among due jobs may be off by a few.
The claim and acknowledge path works with names and directory descriptors (``*at`` calls),
never with paths built per job.

The tree is private to its owner, and that is checked on what is opened, not on paths looked
up again (``fsio``): every directory of the layout is opened without following a symlink
and ``fstat``ed, when a process first uses it and again at each maintenance pass (one that
another user owns is refused, one of ours open to others is closed again), and every file
is checked on its open descriptor before it is read, written or run.

What lives where: this module is the façade, ``FileBackend``, which owns one ``FileLayout``
(``layout``: the root, its settings, the directories opened so far) and composes the parts
over it, each a module with the Redis package's name for the same concern: ``store``
(dispatch, unique keys; idempotency keys in ``idempotency``), ``claim`` (claims, outcomes, and
``JobFiles``: opening, refusing and quarantining files), ``upkeep`` (maintenance and recovery,
markers, the worker registry, cancel requests, logs), ``admin`` (find, jobs, page, stats, retry,
forget, flush, prune_done, clear, cancel) and ``limits``. Every method of the façade delegates
to one of them. Only ``layout`` and ``store`` are imported with the façade: a dispatch needs no
more; the other parts are imported and made on first use. Job-file names, the cached pending
listing and a queue's directories are in ``layout``; small-file I/O helpers and flags in
``fsio``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from forge.backends.base import Claim, JobPage, QueueStats
from forge.backends.file.layout import FileLayout
from forge.backends.file.store import Store
from forge.backends.retention import DONE_RETENTION, LOG_CAP
from forge.errors import RetryBlocked
from forge.job import Event, Job, JobInfo, State

if TYPE_CHECKING:
    from forge.backends.file.admin import Admin, Listings
    from forge.backends.file.claim import Claimer, JobFiles
    from forge.backends.file.limits import Block, FileHolds, Limiter
    from forge.backends.file.upkeep import Upkeep
    from forge.config import Connection
    from forge.limits.spec import LimitsConfig, Need

__all__ = ["LOG_CAP", "FileBackend"]


class FileBackend:
    """The ``Backend`` over a job-file directory (see the module docstring): a façade whose
    methods delegate to the parts composed over its ``layout``. Each method's contract is the
    protocol's (``forge.backends.base``)."""

    #: Which backend this is, for the few callers that keep their own records beside the jobs
    #: (stats journal, progress records): they use ``layout`` on a file backend.
    driver = "file"

    lease_based = False

    def __init__(self, root: str | os.PathLike[str], *, done_retention: float = DONE_RETENTION,
                 lock: str = "flock") -> None:
        self.layout = FileLayout(root, done_retention=done_retention, lock_mode=lock)
        #: The queue directory (``layout.root``), its path as a string, and its owner's uid.
        self.root: Path = self.layout.root
        self.uid = self.layout.uid
        self.store = Store(self.layout, self.find)

    @classmethod
    def from_connection(cls, conn: Connection, *, done_retention: float = DONE_RETENTION,
                        quick: bool = False) -> FileBackend:
        """The backend of a configured ``file`` connection (``quick`` changes nothing here)."""
        assert conn.path is not None
        return cls(conn.path, done_retention=done_retention, lock=conn.lock)

    @property
    def done_retention(self) -> float:
        """Seconds a done job is kept (``forge.backends.retention``)."""
        return self.layout.done_retention

    @property
    def lock_mode(self) -> str:
        """"flock" (a claim is its job file's lock) or "lease" (the claimed event's deadline)."""
        return self.layout.lock_mode

    # -- the parts, made on first use -------------------------------------------------------

    @cached_property
    def files(self) -> JobFiles:
        """Opening, refusing and quarantining job files (``claim.JobFiles``)."""
        from forge.backends.file.claim import JobFiles

        return JobFiles(self.layout)

    @cached_property
    def claimer(self) -> Claimer:
        """Claims and outcomes (``claim.Claimer``); outcomes are journaled for the stats."""
        from forge.backends.file.claim import Claimer
        from forge.stats.journal import record_outcome

        def journal(claim: Claim, event: Event | None) -> None:
            record_outcome(self, claim, event)

        return Claimer(self.layout, self.files, self.store, journal)

    @cached_property
    def upkeep(self) -> Upkeep:
        """Maintenance, markers, the worker registry, cancel requests and logs (``upkeep``)."""
        from forge.backends.file.upkeep import Upkeep

        return Upkeep(self.layout, self.files, self.claimer, self.store, self)

    @cached_property
    def admin(self) -> Admin:
        """Inspection and management (``admin``)."""
        from forge.backends.file.admin import Admin

        return Admin(self.layout, self.files, self.store)

    @cached_property
    def limiter(self) -> Limiter:
        """Limited claims and holds (``limits``)."""
        from forge.backends.file.limits import Limiter

        return Limiter(self.layout, self.files, self.claimer)

    @property
    def listings(self) -> Listings:
        """The reusable directory listings behind ``page`` (a dashboard's stats read them too)."""
        return self.admin.listings

    # -- the hot path -------------------------------------------------------------------------

    def push(self, jobs: Sequence[Job]) -> list[bool]:
        """``QueueStore.push`` (``store``)."""
        return self.store.push(jobs)

    def claim(self, queues: Sequence[str], worker: str, timeout: float) -> Claim | None:
        """``QueueStore.claim`` (``claim``)."""
        return self.claimer.claim(queues, worker, timeout)

    def heartbeat(self, claim: Claim) -> bool:
        """``QueueStore.heartbeat``: always True, the claim is a lock held by this process."""
        return True

    def ack(self, claim: Claim, event: Event) -> None:
        """``QueueStore.ack`` (``claim``)."""
        self.claimer.ack(claim, event)

    def release(self, claim: Claim, event: Event | None, delay: float, *, counted: bool = True) -> None:
        """``QueueStore.release`` (``claim``)."""
        self.claimer.release(claim, event, delay, counted=counted)

    def fail(self, claim: Claim, event: Event) -> None:
        """``QueueStore.fail`` (``claim``)."""
        self.claimer.fail(claim, event)

    def wait(self, queues: Sequence[str], timeout: float) -> None:
        """``QueueStore.wait`` (``claim``: inotify)."""
        self.claimer.wait(queues, timeout)

    def next_due(self, queues: Sequence[str]) -> float | None:
        """``QueueStore.next_due`` (``claim``: from the cached listings)."""
        return self.claimer.next_due(queues)

    def maintain(self, default_tries: int = 1) -> dict[str, int]:
        """``QueueStore.maintain`` (``upkeep``)."""
        return self.upkeep.maintain(default_tries)

    def cancel_requested(self, job_id: str) -> bool:
        """``QueueStore.cancel_requested`` (``upkeep``)."""
        return self.upkeep.cancel_requested(job_id)

    def restart_requested_at(self) -> float | None:
        """``QueueStore.restart_requested_at`` (``upkeep``)."""
        return self.upkeep.restart_requested_at()

    def close(self) -> None:
        """``QueueStore.close``: stop waiting for slots, close every cached descriptor and the
        inotify watch. The backend can still be used: it opens what it needs again."""
        if "limiter" in self.__dict__:
            self.limiter.drop_waits()
        self.layout.drop_dirfds()
        if "claimer" in self.__dict__:
            self.claimer.close()

    # -- operations ---------------------------------------------------------------------------

    def find(self, job_id: str) -> JobInfo | None:
        """``QueueOperations.find`` (``admin``)."""
        return self.admin.find(job_id)

    def jobs(self, *, queue: str | None = None, state: State | None = None,
             command: str | None = None, limit: int | None = None) -> Iterator[JobInfo]:
        """``QueueOperations.jobs`` (``admin``)."""
        return self.admin.jobs(queue=queue, state=state, command=command, limit=limit)

    def page(self, queue: str, state: State, *, offset: int = 0, limit: int = 50,
             command: str | None = None) -> JobPage:
        """``QueueOperations.page`` (``admin``)."""
        return self.admin.page(queue, state, offset=offset, limit=limit, command=command)

    def stats(self, queues: Sequence[str] | None = None) -> list[QueueStats]:
        """``QueueOperations.stats`` (``admin``)."""
        return self.admin.stats(queues)

    def queues(self) -> list[str]:
        """``QueueOperations.queues`` (``layout``)."""
        return self.layout.queues()

    def quarantined(self) -> int:
        """How many files are in quarantine/ (``admin``)."""
        return self.admin.quarantined()

    def retry(self, job_ids: Sequence[str] | None, *, queue: str | None = None,
              reason: str | None = None, command: str | None = None) -> Iterator[JobInfo | RetryBlocked]:
        """``QueueOperations.retry`` (``admin``)."""
        return self.admin.retry(job_ids, queue=queue, reason=reason, command=command)

    def forget(self, job_id: str) -> bool:
        """``QueueOperations.forget`` (``admin``)."""
        return self.admin.forget(job_id)

    def flush(self, *, older_than: float | None = None, queue: str | None = None) -> int:
        """``QueueOperations.flush`` (``admin``)."""
        return self.admin.flush(older_than=older_than, queue=queue)

    def prune_done(self, *, older_than: float | None = None) -> int:
        """``QueueOperations.prune_done`` (``admin``)."""
        return self.admin.prune_done(older_than=older_than)

    def clear(self, queue: str) -> int:
        """``QueueOperations.clear`` (``admin``)."""
        return self.admin.clear(queue)

    def pause(self, queue: str) -> None:
        """``QueueOperations.pause`` (``upkeep``: the queue's ``paused`` marker)."""
        self.upkeep.pause(queue)

    def resume(self, queue: str) -> None:
        """``QueueOperations.resume`` (``upkeep``)."""
        self.upkeep.resume(queue)

    def paused(self) -> set[str]:
        """``QueueOperations.paused`` (``layout``)."""
        return self.layout.paused()

    def forget_queue(self, queue: str) -> bool:
        """Remove an empty queue's directory; False if it holds any job (``upkeep``)."""
        return self.upkeep.forget_queue(queue)

    def request_restart(self) -> float:
        """``QueueOperations.request_restart`` (``upkeep``)."""
        return self.upkeep.request_restart()

    def ids_with_prefix(self, prefix: str, limit: int = 100) -> list[str]:
        """``QueueOperations.ids_with_prefix`` (``admin``)."""
        return self.admin.ids_with_prefix(prefix, limit)

    def cancel(self, job_id: str) -> JobInfo | None:
        """``QueueOperations.cancel`` (``admin``)."""
        return self.admin.cancel(job_id)

    def request_cancel(self, job_id: str) -> None:
        """``QueueOperations.request_cancel`` (``upkeep``)."""
        self.upkeep.request_cancel(job_id)

    def clear_cancel(self, job_id: str) -> None:
        """``QueueOperations.clear_cancel`` (``upkeep``)."""
        self.upkeep.clear_cancel(job_id)

    def put_worker(self, name: str, record: bytes, ttl: float) -> None:
        """``QueueOperations.put_worker`` (``upkeep``)."""
        self.upkeep.put_worker(name, record, ttl)

    def drop_worker(self, name: str) -> None:
        """``QueueOperations.drop_worker`` (``upkeep``)."""
        self.upkeep.drop_worker(name)

    def worker_records(self) -> list[bytes]:
        """``QueueOperations.worker_records`` (``upkeep``)."""
        return self.upkeep.worker_records()

    def append_log(self, job_id: str, data: bytes) -> None:
        """``QueueOperations.append_log`` (``upkeep``)."""
        self.upkeep.append_log(job_id, data)

    def read_log(self, job_id: str, offset: int = 0) -> bytes:
        """``QueueOperations.read_log`` (``upkeep``)."""
        return self.upkeep.read_log(job_id, offset)

    # -- limits (``forge.limits``: called by the worker's gate and by direct runs) -------------

    @property
    def limits_wake_at(self) -> float | None:
        """After a limited claim that found nothing: when a rate frees a token next, if known."""
        return self.limiter.limits_wake_at if "limiter" in self.__dict__ else None

    @property
    def limits_blocked(self) -> bool:
        """After a limited claim that found nothing: whether a due job was held back."""
        return self.limiter.limits_blocked if "limiter" in self.__dict__ else False

    def claim_limited(self, queues: Sequence[str], worker: str, timeout: float,
                      cfg: LimitsConfig) -> Claim | None:
        """``claim`` through the limits (``limits``): the first due job whose holds are free."""
        return self.limiter.claim_limited(queues, worker, timeout, cfg)

    def take_holds(self, needs: Sequence[Need], holder: dict[str, Any],
                   now: float) -> tuple[FileHolds | None, Block | None]:
        """Take every hold in ``needs`` or none (``limits``)."""
        return self.limiter.take_holds(needs, holder, now)

    def release_holds(self, holds: Any, *, wake: bool = True) -> None:
        """Free what a claim held; idempotent (``limits``)."""
        self.limiter.release_holds(holds, wake=wake)

    def renew_holds(self, claim: Claim) -> bool:
        """Always True: an flock needs no renewal."""
        return True

    def hand_back(self, claim: Claim) -> None:
        """Put a job a plain claim took back, its attempt un-counted (``limits``)."""
        self.limiter.hand_back(claim)

    def limit_scopes(self) -> list[str]:
        """Every scope that has held a slot or a rate here (``limits``)."""
        return self.limiter.limit_scopes()

    def slot_holders(self, scope: str) -> list[dict[str, Any]]:
        """Who holds each of a scope's locked slots (``limits``)."""
        return self.limiter.slot_holders(scope)

    def rate_state(self, scope: str) -> float | None:
        """When a rate's bucket is next empty of debt, or None (``limits``)."""
        return self.limiter.rate_state(scope)

    def lock_scope(self, need: Need, holder: dict[str, Any]) -> FileHolds | None:
        """Take a slot for a run outside any worker, or None (``limits``)."""
        return self.limiter.lock_scope(need, holder)
