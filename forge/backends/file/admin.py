"""The file backend's inspection and management operations, as a mixin of ``FileBackend``.

``FileBackend`` (``file``) is the core, with dispatch and unique keys (``_filewrite``),
claiming (``_fileclaim``), maintenance and recovery, logs and pause/resume/restart
(``_fileupkeep``). This module holds what reads or rearranges job files from outside that
life cycle:

* inspection: ``find`` (``_locate``, ``_info``), ``jobs``, ``stats``;
* management: ``retry`` (``_retry_path``), ``forget``, ``flush``, ``prune_done``, ``clear``
  (``_delete_older``).

``FileAdmin`` keeps no state of its own: it works through the attributes and helpers the core
sets up (declared below for type checking), so it is only ever used as ``FileBackend``'s base.
Small-file helpers live in ``_fileio``, job-file names in ``_filenames``.
"""

from __future__ import annotations

import contextlib
import fcntl
import heapq
import os
import stat
import time
from collections.abc import Iterable, Iterator, Sequence
from itertools import repeat, takewhile
from typing import TYPE_CHECKING

from forge.backends.base import QueueStats
from forge.backends.file.fsio import micros, read_whole
from forge.backends.file.layout import (
    PENDING_RE,
    RESERVED_RE,
    due_bound,
    key_str,
    ordered,
    pending_name,
    valid_pending,
    with_due,
)
from forge.backends.retention import cutoff
from forge.config import validate_queue_name
from forge.errors import DuplicateJob, RetryBlocked, UsageError
from forge.job import (
    MAX_FILE_BYTES,
    CorruptJob,
    Event,
    Job,
    JobInfo,
    Reason,
    State,
    decode_file,
    valid_id,
)

_LIST_ORDER = (State.RESERVED, State.PENDING, State.DELAYED, State.FAILED, State.DONE)


class FileAdmin:
    """Inspection and management of a job-file directory (mixed into ``FileBackend``)."""

    _root: str
    uid: int

    if TYPE_CHECKING:  # provided by FileBackend
        def queues(self) -> list[str]: ...
        def paused(self) -> set[str]: ...
        def _qdir(self, queue: str) -> str: ...
        def _names(self, queue: str, state: str) -> list[str]: ...
        def _key(self, t: float) -> int: ...
        def _open_job(self, directory: str, name: str) -> int | None: ...
        def _free_unique(self, job: Job, *, locked: bool = False) -> None: ...
        def _retake_unique(self, job: Job) -> None: ...
        def _global_lock(self, name: str, *, wait: bool = True) -> contextlib.AbstractContextManager[bool]: ...

    # -- inspection -----------------------------------------------------------------------

    def _info(self, path: str, state: State, attempts: int, updated: float | None) -> JobInfo | None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != self.uid or st.st_size > MAX_FILE_BYTES:
                return None  # what another user planted is never shown as a job
            job, events = decode_file(read_whole(fd))
        except (OSError, CorruptJob):
            return None
        finally:
            os.close(fd)
        if state == State.RESERVED:
            claimed = [e for e in events if e.event == "claimed"]
            updated = claimed[-1].at if claimed else None
        elif state in (State.PENDING, State.DELAYED):
            job = with_due(job, PENDING_RE.match(os.path.basename(path)))
        return JobInfo(job, state, attempts, tuple(events), updated)

    def _locate(self, job_id: str) -> tuple[str, State, int, float | None] | None:
        now_key = micros(time.time())
        for q in self.queues():
            qdir = self._qdir(q)
            for name in self._names(q, "reserved"):
                if name.startswith(job_id):
                    m = RESERVED_RE.match(name)
                    if m:
                        return f"{qdir}/reserved/{name}", State.RESERVED, int(m.group(2)), None
            for sdir in ("pending", "failed", "done"):
                for name in self._names(q, sdir):
                    if name[17:53] == job_id:
                        m = PENDING_RE.match(name)
                        if not m:
                            continue
                        key = int(m.group(1))
                        if sdir == "pending":
                            state = State.DELAYED if key > now_key else State.PENDING
                            return f"{qdir}/{sdir}/{name}", state, int(m.group(3)), None
                        return f"{qdir}/{sdir}/{name}", State(sdir), int(m.group(3)), key / 1e6
        return None

    def find(self, job_id: str) -> JobInfo | None:
        if not valid_id(job_id):
            raise UsageError(f"Invalid job id {job_id!r}: expected a UUID like 3f2b…-….")
        for _ in range(3):  # the job may move between listing and reading; look again
            loc = self._locate(job_id)
            if loc is None:
                return None
            info = self._info(*loc)
            if info is not None:
                return info
        return None

    def jobs(self, *, queue: str | None = None, state: State | None = None,
             command: str | None = None, limit: int | None = None) -> Iterator[JobInfo]:
        queues = [validate_queue_name(queue)] if queue else self.queues()
        now_key = key_str(micros(time.time()))
        count = 0
        for st in _LIST_ORDER:
            if state is not None and st != state:
                continue
            entries: Iterable[tuple[str, int, float | None]]
            if st == State.RESERVED:
                entries = self._reserved_by_claim_time(queues)
            else:
                entries = self._by_name(queues, st, now_key)
            for path, attempts, updated in entries:
                info = self._info(path, st, attempts, updated)
                if info is None or (command and info.job.command != command):
                    continue
                yield info
                count += 1
                if limit is not None and count >= limit:
                    return

    def _reserved_by_claim_time(self, queues: list[str]) -> list[tuple[str, int, float | None]]:
        items = []
        for q in queues:
            d = f"{self._qdir(q)}/reserved"
            for n in self._names(q, "reserved"):
                m = RESERVED_RE.match(n)
                if m:
                    try:  # the claim's event append stamps mtime: claim order
                        since = os.lstat(f"{d}/{n}").st_mtime
                    except FileNotFoundError:
                        continue
                    items.append((since, n, f"{d}/{n}", int(m.group(2))))
        items.sort()
        return [(path, attempts, None) for _, _, path, attempts in items]

    def _by_name(self, queues: list[str], st: State, now_key: str) -> Iterator[tuple[str, int, float | None]]:
        """The job files of ``st`` in the order ``jobs`` lists them, from their names alone
        (which sort by key), merged over ``queues``: pending and delayed oldest first, failed
        and done newest first. Sorts lazily and checks only the names it yields."""
        newest_first = st in (State.FAILED, State.DONE)
        bound = due_bound(now_key)
        sdir = "pending" if st in (State.PENDING, State.DELAYED) else str(st)
        streams = []
        for q in queues:
            names = self._names(q, sdir)
            if st == State.DELAYED:
                names = [n for n in names if n > bound]
            d = f"{self._qdir(q)}/{sdir}"
            sorted_names = ordered(names, reverse=newest_first)
            if st == State.PENDING:  # the due ones sort first: stop at the first that is not
                sorted_names = takewhile(bound.__gt__, sorted_names)
            streams.append(zip(sorted_names, repeat(d)))
        if not streams:
            return
        merged = streams[0] if len(streams) == 1 else heapq.merge(*streams, reverse=newest_first)
        for name, d in merged:
            m = PENDING_RE.match(name)
            if m:
                updated = int(m.group(1)) / 1e6 if newest_first else None
                yield f"{d}/{name}", int(m.group(3)), updated

    def stats(self, queues: Sequence[str] | None = None) -> list[QueueStats]:
        now_key = key_str(micros(time.time()))
        paused = self.paused()
        out = []
        for q in queues or self.queues():
            names = valid_pending(self._names(q, "pending"))
            bound = due_bound(now_key)
            due = [n for n in names if n < bound]
            out.append(QueueStats(
                queue=q,
                pending=len(due),
                delayed=len(names) - len(due),
                reserved=sum(1 for n in self._names(q, "reserved") if n.endswith(".job")),
                done=sum(1 for n in self._names(q, "done") if n.endswith(".job")),
                failed=sum(1 for n in self._names(q, "failed") if n.endswith(".job")),
                oldest_pending_at=int(min(due)[:16]) / 1e6 if due else None,
                paused=q in paused,
            ))
        return out

    # -- management -----------------------------------------------------------------------

    def retry(self, job_ids: Sequence[str] | None, *, queue: str | None = None,
              reason: str | None = None, command: str | None = None) -> Iterator[JobInfo | RetryBlocked]:
        if job_ids is not None:
            for job_id in job_ids:
                loc = self._locate(job_id) if valid_id(job_id) else None
                if loc is not None and loc[1] == State.FAILED:
                    d, _, name = loc[0].rpartition("/")
                    info = self._retry_path(d, name)
                    if info is not None:
                        yield info
            return
        # Only the jobs failed when this call started, each once: a failed name's key is the
        # time it failed, so a job retried here that fails again meanwhile sorts after
        # ``until`` and is left failed (as on Redis). Without the bound, workers failing the
        # retried jobs feed the loop below forever.
        until = key_str(micros(time.time()))
        blocked: set[str] = set()  # names left failed (their key is held), reported once
        for q in [queue] if queue else self.queues():
            fdir = f"{self._qdir(q)}/failed"
            while True:  # again until a pass moves nothing: a scan may miss names moved meanwhile
                moved = 0
                try:
                    it = os.scandir(fdir)
                except FileNotFoundError:
                    break
                with it:
                    for entry in it:
                        name = entry.name
                        if name[:16] > until or name in blocked or not PENDING_RE.match(name):
                            continue
                        info = self._retry_path(fdir, name, reason=reason, command=command)
                        if isinstance(info, RetryBlocked):
                            blocked.add(name)
                        elif info is not None:
                            moved += 1
                        if info is not None:
                            yield info
                if not moved:
                    break

    def _retry_path(self, fdir: str, name: str, *, reason: str | None = None,
                    command: str | None = None) -> JobInfo | RetryBlocked | None:
        fd = self._open_job(fdir, name)
        if fd is None:
            return None
        try:
            job, events = decode_file(read_whole(fd))
            failure = next((e for e in reversed(events) if e.event == "failed"), None)
            if command and job.command != command:
                return None
            if reason and (failure is None or failure.reason != reason):
                return None
            if job.unique_key is None:
                return self._move_back(fd, fdir, name, job, events)
            # The key is taken back and the job moved under the lock that every removal of a
            # holder file takes: no dispatch can find the key held by a job still failed and
            # take it over before the job is pending again.
            with self._global_lock("unique"):
                if not os.path.lexists(f"{fdir}/{name}"):
                    return None  # another retry moved it meanwhile
                try:
                    self._retake_unique(job)
                except DuplicateJob as dup:
                    return RetryBlocked(job.id, job.unique_key, dup.job_id)
                try:
                    return self._move_back(fd, fdir, name, job, events)
                except BaseException:
                    self._free_unique(job, locked=True)
                    raise
        except (OSError, CorruptJob):
            return None
        finally:
            os.close(fd)

    def _move_back(self, fd: int, fdir: str, name: str, job: Job, events: list[Event]) -> JobInfo:
        """Record the retry in the failed file open at ``fd`` and move it back to pending/."""
        now = time.time()
        ev = Event("retried", 0, now)
        os.write(fd, ev.to_json())
        dest = f"{os.path.dirname(fdir)}/pending/{pending_name(self._key(now), job.id, 0)}"
        os.rename(f"{fdir}/{name}", dest)
        return JobInfo(job, State.PENDING, 0, (*events, ev), now)

    def forget(self, job_id: str) -> bool:
        loc = self._locate(job_id) if valid_id(job_id) else None
        if loc is None or loc[1] != State.FAILED:
            return False
        try:
            os.unlink(loc[0])
        except FileNotFoundError:
            return False
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{self._root}/logs/{job_id}.log")
        return True

    def _delete_older(self, state: str, older_than: float | None, queue: str | None = None) -> int:
        before = cutoff(time.time(), older_than)
        last = micros(before) if before is not None else None
        removed = 0
        for q in [queue] if queue else self.queues():
            d = f"{self._qdir(q)}/{state}"
            for name in self._names(q, state):
                m = PENDING_RE.match(name)
                if not m or (last is not None and int(m.group(1)) > last):
                    continue
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f"{d}/{name}")
                    removed += 1
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(f"{self._root}/logs/{m.group(2)}.log")
        return removed

    def flush(self, *, older_than: float | None = None, queue: str | None = None) -> int:
        return self._delete_older("failed", older_than, queue)

    def prune_done(self, *, older_than: float | None = None) -> int:
        return self._delete_older("done", older_than)

    def ids_with_prefix(self, prefix: str, limit: int = 100) -> list[str]:
        found: set[str] = set()
        for q in self.queues():
            for name in self._names(q, "reserved"):
                if name.startswith(prefix):
                    found.add(name[:36])
            for sdir in ("pending", "failed", "done"):
                for name in self._names(q, sdir):
                    if name[17:17 + len(prefix)] == prefix and PENDING_RE.match(name):
                        found.add(name[17:53])
                        if len(found) >= limit:
                            return sorted(found)
        return sorted(found)

    def cancel(self, job_id: str) -> JobInfo | None:
        """Fail a pending or delayed job with reason ``cancelled`` (see ``Backend.cancel``)."""
        loc = self._locate(job_id) if valid_id(job_id) else None
        if loc is None or loc[1] not in (State.PENDING, State.DELAYED):
            return None
        path, _, attempts, _ = loc
        pdir, name = os.path.split(path)
        fd = self._open_job(pdir, name)
        if fd is None:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a claimer holds it: it is starting
            job, events = decode_file(read_whole(fd))
            now = time.time()
            ev = Event("failed", attempts, now, reason=str(Reason.CANCELLED), error="cancelled (queue:cancel)")
            size = os.fstat(fd).st_size
            os.write(fd, ev.to_json())
            try:
                os.rename(path, f"{os.path.dirname(pdir)}/failed/{pending_name(micros(now), job.id, attempts)}")
            except BaseException:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, size)
                raise
            self._free_unique(job)
            return JobInfo(job, State.FAILED, attempts, (*events, ev), now)
        except (BlockingIOError, FileNotFoundError, CorruptJob):
            return None
        finally:
            os.close(fd)

    def clear(self, queue: str) -> int:
        removed = 0
        pdir = f"{self._qdir(queue)}/pending"
        for name in self._names(queue, "pending"):
            if not PENDING_RE.match(name):
                continue
            fd = self._open_job(pdir, name)
            if fd is None:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a claimer holds it: leave it
                job, _ = decode_file(read_whole(fd))
                os.unlink(f"{pdir}/{name}")
                removed += 1
                self._free_unique(job)
            except (BlockingIOError, FileNotFoundError, CorruptJob):
                pass
            finally:
                os.close(fd)
        return removed
