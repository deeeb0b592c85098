"""The queued-commands library API: ``QueuedCommand``, ``CommandQueue``, ``QueueManager``, ``JobDispatch``.

>>> from forge.queue.manager import CommandQueue, QueuedCommand
>>> queue = CommandQueue("imports")
>>> job_id = queue.dispatch(QueuedCommand("import:data").with_args(["users.csv"]).with_max_attempts(5))

Everything is validated before anything is written; ``dispatch`` returns only once the job is
stored durably (see the README's delivery contract).
"""

from __future__ import annotations

import builtins
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

from forge.backends import _backends, connect  # forge.queue.connect; the tests clear _backends here
from forge.config import Settings, load_settings, validate_queue_name
from forge.errors import (
    AmbiguousJobId,
    InvalidCommand,
    JobNotFound,
    QueueError,
    RetryBlocked,
    UnknownQueuedCommand,
    UsageError,
)
from forge.job import Job, JobInfo, State, valid_id
from forge.queue.command import QueuedCommand, batch_key
from forge.queue.command import queue_name as _queue_name
from forge.queue.observers import installed as _observer
from forge.registry.argcheck import check_job_args, params_of
from forge.times import rfc3339  # re-exported: forge.queue.manager.rfc3339 stays importable

if TYPE_CHECKING:
    from forge.backends.base import Backend, QueueStats
    from forge.registry.spec import CommandRegistry
    from forge.worker.heartbeat import WorkerRecord

__all__ = ["CommandQueue", "JobDispatch", "QueueManager", "_backends", "batch_key", "connect", "rfc3339"]  # forge.queue re-exports them


_ID_PREFIX = re.compile(r"[0-9a-f-]{1,36}")


def _job_id(job_id: object) -> str:
    if not valid_id(job_id):
        raise InvalidCommand(f"Invalid job id {job_id!r}: expected a UUID like 3f2b9c1e-….",
                             hint="Run `forge queue:list` to see job ids.")
    return job_id  # type: ignore[return-value]


@dataclass(frozen=True)
class JobDispatch:
    """What ``CommandQueue.push`` returns: where and when a job was queued (RFC 3339 times)."""

    id: str
    command: str
    queue: str
    dispatched_at: str | None = None
    scheduled_at: str | None = None
    #: False when the command's idempotency key had been used: nothing was stored, and the
    #: record describes the job that holds the key (its times, when it could still be read).
    created: bool = True

    @classmethod
    def new(cls, job_id: str, command: str, queue: str) -> JobDispatch:
        """The record of a job dispatched now (not delayed)."""
        return cls(job_id, command, queue, rfc3339(time.time()))

    @property
    def job_id(self) -> str:
        """The job's id (the same as ``id``)."""
        return self.id

    def with_scheduled_at(self, when: str | datetime) -> JobDispatch:
        """The same record, due at ``when`` (an RFC 3339 string, or a datetime converted to one)."""
        text = when if isinstance(when, str) else rfc3339(when.timestamp())
        return replace(self, scheduled_at=text)

    def to_dict(self) -> dict[str, Any]:
        """The record as plain data, as ``queue:dispatch --json`` prints it."""
        return dict(self.__dict__)


class _Connected:
    """Resolves the settings and the backend of a connection (by name, or a backend object) lazily."""

    def __init__(self, connection: str | Backend | None, settings: Settings | None) -> None:
        self._settings = settings
        self._connection = connection
        self._backend: Backend | None = None if connection is None or isinstance(connection, str) else connection

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_settings()
        return self._settings

    @property
    def location(self) -> str:
        """Where the connection keeps its jobs, for people (``Connection.where``)."""
        if self._connection is not None and not isinstance(self._connection, str):
            return ""  # a backend object given directly: no configuration to describe
        return self.settings.connection_config(self._connection).where()

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            name = self._connection if isinstance(self._connection, str) else None
            self._backend = connect(name, self.settings)
        return self._backend


class CommandQueue(_Connected):
    """A named queue on a connection. Dispatch validates first, then stores durably."""

    def __init__(
        self,
        name: str | None = None,
        *,
        connection: str | Backend | None = None,
        settings: Settings | None = None,
        registry: CommandRegistry | None = None,
        check_args: bool = True,
    ) -> None:
        super().__init__(connection, settings)
        self.name = _queue_name(name or self.settings.default_queue)
        #: Whether the queue was named: if not, a command's declared queue wins (@command(queue=)).
        self._named = bool(name)
        self._registry = registry
        self._check_args = check_args

    @classmethod
    def default(cls) -> CommandQueue:
        """The default queue (``queue.default``) of the default connection."""
        return cls()

    @property
    def registry(self) -> CommandRegistry:
        """The registry that dispatches are checked against (the process's one registry unless one was given)."""
        if self._registry is None:
            from forge.registry.runner import default_registry

            self._registry = default_registry()
        return self._registry

    def _job(self, cmd: QueuedCommand, now: float) -> Job:
        if not isinstance(cmd, QueuedCommand):
            raise InvalidCommand(f"Expected a QueuedCommand, not {type(cmd).__name__}.")
        spec = self.registry.get(cmd.command) if isinstance(cmd.command, str) else None
        queue = self.name
        if spec is not None and spec.defaults:  # dispatch option > declared on @command > worker
            cmd = cmd.with_defaults(spec.defaults)
            if not self._named and cmd.queue is None and spec.defaults.queue:
                queue = spec.defaults.queue
        job = cmd.to_job(queue, now=now)
        if spec is None:
            raise self.registry.unknown(job.command, UnknownQueuedCommand)
        if self._check_args:
            check_job_args(spec, job.args, str(self.settings.root))
        if "forge.limits" in job.metadata or getattr(spec.target, "__forge_isolated__", None) is not None:
            from forge.limits.isolation import stamp  # limits of its own, or an isolated command

            args, root = job.args, str(self.settings.root)
            job = stamp(job, spec, self.settings, lambda: params_of(spec, args, root))
        return job

    def _prepare(self) -> None:
        """Before anything is written: the observer (``forge.events``) raises now what would
        otherwise fail after the write (a broken [[listeners]] table)."""
        observer = _observer()
        if observer is not None:
            observer.prepare(self.settings)

    def jobs_for(self, cmds: Iterable[QueuedCommand]) -> list[Job]:
        """The jobs for ``cmds``, each checked; an error names the index of the bad command
        (when there are several)."""
        self._prepare()
        now = time.time()
        items = builtins.list(cmds)
        if len(items) == 1:
            return [self._job(items[0], now)]
        jobs = []
        for n, c in enumerate(items):
            try:
                jobs.append(self._job(c, now))
            except UsageError as exc:
                exc.args = (f"Item {n} (of {len(items)}): {exc.message}",)
                raise
        return jobs

    def store(self, jobs: Sequence[Job]) -> builtins.list[bool]:
        """Store jobs that ``jobs_for`` built (and so validated) as one durable batch. True for
        each job stored, False for each whose idempotency key had been used (nothing stored).
        A broken [[listeners]] or [events] table stops it before the write, as it stops
        ``jobs_for`` (for jobs built some other way, as ``QueuedCommand.to_job``)."""
        self._prepare()
        created = list(self.backend.push(jobs)) if jobs else []
        self._dispatched(jobs, created)
        return created

    def _dispatched(self, jobs: Sequence[Job], created: Sequence[bool]) -> None:
        """Tell the observer (``forge.queue.observers``; ``forge.events`` raises ``job.dispatched``)
        which jobs were stored."""
        observer = _observer()
        if observer is not None:
            observer.dispatched(self.settings, self.backend, jobs, created)

    def dispatch(self, cmd: QueuedCommand) -> str:
        """Queue one command; returns the job id once the job is durably stored (with an
        idempotency key that was used already: the id of the job that holds it)."""
        self._prepare()
        job = self._job(cmd, time.time())
        self._dispatched([job], self.backend.push([job]))
        return job.id

    def dispatch_many(self, cmds: Iterable[QueuedCommand], *, batch_id: str | None = None) -> builtins.list[str]:
        """Validate every command, then store them all (one durable batch); returns their ids.

        With ``batch_id``, command ``n`` (from 0) that has no idempotency key of its own gets
        ``batch_key(batch_id, n)``: calling this again with the same commands, after an error
        or a kill part-way, stores only those that are missing.
        """
        jobs = self.jobs_for(_in_batch(cmds, batch_id))
        self._dispatched(jobs, self.backend.push(jobs))
        return [j.id for j in jobs]

    def push(self, cmd: QueuedCommand) -> JobDispatch:
        """Check ``cmd`` (its command, arguments and options) and store it durably; returns where
        and when it was queued once it is stored (``created`` False: its idempotency key had been
        used, nothing was stored, and the record is that of the job holding it).

        Raises before anything is stored: ``InvalidCommand`` (``UnknownQueuedCommand`` for a name
        that is not registered) for a job that must not be queued, ``DuplicateJob`` while a live
        job holds its unique key, ``DispatchFailed`` or ``QueueUnavailable`` if the write fails."""
        self._prepare()
        job = self._job(cmd, time.time())
        record = _dispatch_record(job)  # before the write: nothing may fail once the job is stored
        created = self.backend.push([job])
        self._dispatched([job], created)
        if created[0]:
            return record
        info = self.backend.find(job.id)
        return replace(_dispatch_record(info.job) if info else record, created=False)

    async def adispatch(self, cmd: QueuedCommand) -> str:
        """``dispatch`` in a worker thread, for asyncio code: the job id once it is durably stored."""
        import asyncio  # not at module level: it costs 30 ms of every CLI start

        return await asyncio.to_thread(self.dispatch, cmd)

    async def adispatch_many(self, cmds: Iterable[QueuedCommand], *,
                             batch_id: str | None = None) -> builtins.list[str]:
        """``dispatch_many`` in a worker thread, for asyncio code: the ids once all are durably stored."""
        import asyncio

        cmds = list(cmds)
        return await asyncio.to_thread(self.dispatch_many, cmds, batch_id=batch_id)

    def size(self) -> int:
        """Jobs waiting in this queue (pending + delayed)."""
        return self.stats().size

    def stats(self) -> QueueStats:
        """This queue's counts by state and its oldest pending job (``QueueStats``)."""
        return self.backend.stats([self.name])[0]

    def pending(self, limit: int | None = None) -> list[JobInfo]:
        """Waiting jobs, due ones first in FIFO order, then delayed ones."""
        out = list(self.backend.jobs(queue=self.name, state=State.PENDING, limit=limit))
        if limit is None or len(out) < limit:
            rest = None if limit is None else limit - len(out)
            out += list(self.backend.jobs(queue=self.name, state=State.DELAYED, limit=rest))
        return out

    def find(self, job_id: str) -> JobInfo | None:
        """The job with this id if it is on this queue (in any state), else None; ``InvalidCommand`` for a malformed id."""
        info = self.backend.find(_job_id(job_id))
        return info if info is not None and info.job.queue == self.name else None

    def pause(self) -> None:
        """Stop workers claiming from this queue (jobs can still be dispatched onto it)."""
        self.backend.pause(self.name)

    def resume(self) -> None:
        """Let workers claim from this queue again."""
        self.backend.resume(self.name)

    def is_paused(self) -> bool:
        """True if this queue is paused."""
        return self.name in self.backend.paused()

    def clear(self) -> int:
        """Delete this queue's pending and delayed jobs (never running ones); returns the count."""
        return self.backend.clear(self.name)

    def __repr__(self) -> str:
        return f"CommandQueue({self.name!r})"


def _in_batch(cmds: Iterable[QueuedCommand], batch_id: str | None) -> Iterable[QueuedCommand]:
    if batch_id is None:
        return cmds
    if not isinstance(batch_id, str) or not batch_id:
        raise InvalidCommand(f"The batch id must be a non-empty string, not {batch_id!r}.")
    return [c.with_idempotency_key(batch_key(batch_id, n))
            if isinstance(c, QueuedCommand) and c.idempotency_key is None else c
            for n, c in enumerate(cmds)]


def _dispatch_record(job: Job) -> JobDispatch:
    scheduled = rfc3339(job.available_at) if job.available_at > job.dispatched_at else None
    return JobDispatch(job.id, job.command, job.queue, rfc3339(job.dispatched_at), scheduled)


class QueueManager(_Connected):
    """Several queues on one connection, and the operations on failed and finished jobs."""

    def __init__(self, connection: str | Backend | None = None, *, settings: Settings | None = None,
                 registry: CommandRegistry | None = None) -> None:
        super().__init__(connection, settings)
        self._registry = registry
        self._queues: dict[str, CommandQueue] = {}

    def add_queue(self, name: str) -> CommandQueue:
        """The ``CommandQueue`` named ``name`` on this manager's connection (made once, then the same object)."""
        q = self._queues.get(name)
        if q is None:
            q = self._queues[name] = CommandQueue(
                name, connection=self.backend, settings=self.settings, registry=self._registry
            )
        return q

    def queue(self, name: str) -> CommandQueue | None:
        """The queue added under ``name`` with ``add_queue``, or None."""
        return self._queues.get(name)

    def list(self) -> builtins.list[str]:
        """Names of the queues added here and of those that hold jobs."""
        return sorted(set(self._queues) | set(self.backend.queues()))

    def stats(self, queues: Sequence[str] | None = None) -> builtins.list[QueueStats]:
        """The stats of these queues (default: every queue of the connection)."""
        return self.backend.stats(queues)

    def jobs(self, *, queue: str | None = None, state: State | str | None = None,
             command: str | None = None, limit: int | None = None) -> Iterator[JobInfo]:
        """The jobs on the connection, filtered by queue, state and command, at most ``limit``;
        ``UsageError`` for an invalid queue name, ``ValueError`` for an unknown state."""
        st = State(state) if state is not None else None
        if queue is not None:
            _queue_name(queue)
        return self.backend.jobs(queue=queue, state=st, command=command, limit=limit)

    def find(self, job_id: str) -> JobInfo:
        """The job with this id in any state, with its latest progress (``JobNotFound`` if none)."""
        info = self.backend.find(_job_id(job_id))
        if info is None:
            raise JobNotFound(job_id)
        from forge.jobprogress.store import with_progress

        return with_progress(self.backend, [info])[0]

    def read_log(self, job_id: str, offset: int = 0) -> bytes:
        """The job's captured output from byte ``offset`` (empty if it printed nothing)."""
        return self.backend.read_log(job_id, offset)

    def failed(self, queue: str | None = None, limit: int | None = None) -> builtins.list[JobInfo]:
        """Failed jobs, newest first."""
        return list(self.jobs(queue=queue, state=State.FAILED, limit=limit))

    def iter_retry(self, job_ids: Sequence[str] | str | None = "all", *, queue: str | None = None,
                   reason: str | None = None, command: str | None = None,
                   on_blocked: Callable[[RetryBlocked], None] | None = None) -> Iterator[JobInfo]:
        """Move failed jobs back to pending (attempts reset), one at a time, as iterated;
        ``"all"`` retries the jobs failed when it started, each once.

        A unique job whose key another live job holds stays failed: it goes to
        ``on_blocked`` and the other jobs are still retried; without ``on_blocked``, the
        first such job is raised as ``RetryBlocked`` once the others have been retried."""
        if isinstance(job_ids, str) and job_ids != "all":
            job_ids = [job_ids]
        ids = None if job_ids in (None, "all") else [_job_id(i) for i in job_ids]  # type: ignore[union-attr]
        return self._retried(self.backend.retry(ids, queue=queue, reason=reason, command=command), on_blocked)

    @staticmethod
    def _retried(stream: Iterator[JobInfo | RetryBlocked],
                 on_blocked: Callable[[RetryBlocked], None] | None) -> Iterator[JobInfo]:
        first: RetryBlocked | None = None
        for item in stream:
            if not isinstance(item, RetryBlocked):
                yield item
            elif on_blocked is not None:
                on_blocked(item)
            elif first is None:
                first = item
        if first is not None:
            raise first

    def retry(self, job_ids: Sequence[str] | str | None = "all", *, queue: str | None = None,
              reason: str | None = None, command: str | None = None,
              on_blocked: Callable[[RetryBlocked], None] | None = None) -> builtins.list[str]:
        """Retry failed jobs (``"all"`` or a list of ids); returns the ids retried. A job
        left failed because another live job holds its unique key: see ``iter_retry``."""
        return [i.id for i in self.iter_retry(job_ids, queue=queue, reason=reason, command=command,
                                              on_blocked=on_blocked)]

    def resolve_id(self, text: str) -> str:
        """The job id that ``text`` names: a whole id, or a unique prefix of one (as git and
        docker take them). ``JobNotFound`` if none matches; ``AmbiguousJobId`` (a usage error
        listing the matches) if several do."""
        if valid_id(text):
            return text
        prefix = text.lower() if isinstance(text, str) else ""
        if not prefix or not _ID_PREFIX.fullmatch(prefix):
            _job_id(text)  # raises, with the usual message
        matches = self.backend.ids_with_prefix(prefix, limit=11)
        if not matches:
            raise JobNotFound(text)
        if len(matches) > 1:
            raise AmbiguousJobId(text, matches)
        return matches[0]

    def cancel(self, job_id: str, *, running: bool = False, wait: float = 30.0) -> JobInfo:
        """Take a pending or delayed job off its queue: it is failed with reason ``cancelled``.

        With ``running``, a running job is killed by its worker (SIGTERM, then SIGKILL after
        the kill grace) and failed with reason ``cancelled``; this waits up to ``wait``
        seconds for that. ``JobNotFound`` for an unknown id; ``UsageError`` for a job that is
        running (without ``running``) or finished."""
        job_id = _job_id(job_id)
        for _ in range(3):
            info = self.cancel_waiting(job_id)
            if info is not None:
                return info
            now = self.find(job_id)
            if now.state in (State.PENDING, State.DELAYED):
                time.sleep(0.01)  # a worker was claiming it this instant: look again
                continue
            if now.state != State.RESERVED:
                raise UsageError(f"Job {job_id} is {now.state}; only a waiting or running job can be cancelled.")
            if not running:
                raise UsageError(f"Job {job_id} is running.", hint=f"forge queue:cancel --running {job_id} kills it.")
            self.backend.request_cancel(job_id)
            until = time.monotonic() + wait
            while time.monotonic() < until:
                now = self.find(job_id)
                if now.state != State.RESERVED:
                    return now
                time.sleep(0.1)
            raise QueueError(f"Job {job_id} is still running after {wait:g} s: its worker has not acted on the"
                             " cancel (stopped, or on a host that cannot reach the queue).",
                             hint="It is killed when the worker next looks; `forge queue:workers` shows the workers.")
        raise UsageError(f"Job {job_id} could not be cancelled: it keeps being claimed.")

    def cancel_waiting(self, job_id: str) -> JobInfo | None:
        """Fail the job ``job_id`` with reason ``cancelled`` if it is pending or delayed, and
        tell the observer (``job.cancelled``, ``job.failed``); its record, or None if it was
        not waiting (running, finished, gone). ``cancel`` and the dashboard's cancel use this."""
        observer = _observer()
        if observer is not None:
            observer.prepare(self.settings)
        info = self.backend.cancel(_job_id(job_id))
        if info is not None and observer is not None:
            observer.cancelled(self.settings, self.backend, info)
        return info

    def quarantined(self) -> int:
        """Files the file backend set aside in quarantine/ (not jobs it could read); 0 on Redis."""
        count = getattr(self.backend, "quarantined", None)
        return int(count()) if callable(count) else 0

    @property
    def quarantine_dir(self) -> str | None:
        """Where quarantined files are (file backend), else None."""
        root = getattr(self.backend, "root", None)
        return f"{root}/quarantine" if root is not None and callable(getattr(self.backend, "quarantined", None)) else None

    def workers(self) -> builtins.list[WorkerRecord]:
        """The live workers of this connection (``forge.worker.heartbeat``)."""
        from forge.worker.heartbeat import live_workers

        return live_workers(self.backend)

    def forget(self, job_id: str) -> bool:
        """Delete one failed job; False if no failed job has this id."""
        return self.backend.forget(_job_id(job_id))

    def flush(self, hours: float | None = None, *, queue: str | None = None) -> int:
        """Delete failed jobs (only those older than ``hours``, when given)."""
        return self.backend.flush(older_than=None if hours is None else hours * 3600, queue=queue)

    def prune_failed(self, hours: float = 24) -> int:
        """Delete failed jobs older than ``hours``; returns how many."""
        return self.flush(hours)

    def prune_done(self, hours: float | None = None) -> int:
        """Delete finished jobs kept for inspection (only those older than ``hours``, when given); returns how many."""
        return self.backend.prune_done(older_than=None if hours is None else hours * 3600)

    def pause(self, queue: str) -> None:
        """Stop workers claiming from ``queue``; ``UsageError`` for an invalid name."""
        self.backend.pause(_queue_name(queue))

    def resume(self, queue: str) -> None:
        """Let workers claim from ``queue`` again; ``UsageError`` for an invalid name."""
        self.backend.resume(_queue_name(queue))

    def forget_queue(self, queue: str) -> bool:
        """Remove an empty queue (its name and pause marker); False if it holds any job."""
        return bool(self.backend.forget_queue(validate_queue_name(queue)))  # type: ignore[attr-defined]

    def restart(self) -> float:
        """Ask every worker on this connection to exit after its current job."""
        return self.backend.request_restart()
