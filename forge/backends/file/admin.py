"""The file backend's inspection and management operations (``Admin``): what reads or
rearranges job files from outside the claim-and-outcome life cycle.

* inspection: ``find`` (``_locate``, ``_info``), ``jobs``, ``page``, ``stats``;
* management: ``retry`` (``_retry_path``), ``forget``, ``flush``, ``prune_done``, ``clear``
  (``_delete_older``), ``cancel``.

A worker never needs this module, nor does a dispatch (but one whose unique key is held, which
looks the holder up): ``FileBackend`` imports it on first use.
"""

from __future__ import annotations

import contextlib
import fcntl
import heapq
import os
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import repeat, takewhile
from typing import TypeGuard, TypeVar, overload

from forge.backends.base import PAGE_SCAN_BUDGET, JobPage, QueueStats
from forge.backends.file.claim import JobFiles
from forge.backends.file.fsio import micros, read_whole, unusable
from forge.backends.file.layout import (
    PENDING_RE,
    RESERVED_RE,
    FileLayout,
    due_bound,
    key_str,
    ordered,
    pending_name,
    valid_pending,
    with_due,
)
from forge.backends.file.store import Store
from forge.backends.retention import cutoff
from forge.config import validate_queue_name
from forge.errors import CorruptJob, DuplicateJob, RetryBlocked, UsageError
from forge.job import (
    MAX_FILE_BYTES,
    Event,
    Job,
    JobInfo,
    Reason,
    State,
    decode_file,
    valid_id,
)
from forge.privatefile import read_trusted

_E = TypeVar("_E")
_LIST_ORDER = (State.RESERVED, State.PENDING, State.DELAYED, State.FAILED, State.DONE)


class Admin:
    """Inspection and management of a job-file directory (``FileLayout``); keeps no state of
    its own but the reusable listings of ``page``."""

    def __init__(self, lay: FileLayout, files: JobFiles, store: Store) -> None:
        self.lay = lay
        self.files = files
        self.store = store
        self.listings = Listings(lay)

    # -- inspection -----------------------------------------------------------------------

    def _info(self, path: str, state: State, attempts: int, updated: float | None) -> JobInfo | None:
        """The job in the file at ``path`` as ``state``; None if it is gone, unreadable, not a
        regular file of ours (what another user planted is never shown as a job) or corrupt."""
        data = read_trusted(path, MAX_FILE_BYTES, uid=self.lay.uid, writable_by_others=True)
        if data is None:
            return None
        try:
            job, events = decode_file(data)
        except CorruptJob:
            return None
        if state == State.RESERVED:
            claimed = [e for e in events if e.event == "claimed"]
            updated = claimed[-1].at if claimed else None
        elif state in (State.PENDING, State.DELAYED):
            job = with_due(job, PENDING_RE.match(os.path.basename(path)))
        return JobInfo(job, state, attempts, tuple(events), updated)

    def _locate(self, job_id: str) -> tuple[str, State, int, float | None] | None:
        """Where the job's file is: its path, state, attempts and when it ended (None: no such
        job). A job moves by one rename, and the state directories are scanned in the order
        it moves through them (pending, reserved, failed, done), so a claim or an outcome
        during the scan is still seen; a move back (a release, a retry) may make one scan
        miss it: a miss is looked for again, twice."""
        for _ in range(3):
            loc = self._scan(job_id)
            if loc is not None:
                return loc
        return None

    def _scan(self, job_id: str) -> tuple[str, State, int, float | None] | None:
        now_key = micros(time.time())
        for q in self.lay.queues():
            qdir = self.lay.qdir(q)
            for sdir in ("pending", "reserved", "failed", "done"):
                for name in self.lay.names(q, sdir):
                    if sdir == "reserved":
                        if name.startswith(job_id) and (m := RESERVED_RE.match(name)):
                            return f"{qdir}/reserved/{name}", State.RESERVED, int(m.group(2)), None
                        continue
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
        """``QueueOperations.find``: located from the directory listings, then read; looked for
        again (up to three times) if it moved meanwhile. ``UsageError`` for an id that is not a
        UUID."""
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
        """``QueueOperations.jobs``: the order comes from the names alone (reserved: claim time);
        only the files yielded are read."""
        queues = [validate_queue_name(queue)] if queue else self.lay.queues()
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
            d = f"{self.lay.qdir(q)}/reserved"
            for n in self.lay.names(q, "reserved"):
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
            names = self.lay.names(q, sdir)
            if st == State.DELAYED:
                names = [n for n in names if n > bound]
            d = f"{self.lay.qdir(q)}/{sdir}"
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
        """``QueueOperations.stats``: counted from one listing of each state directory; no job file
        is read."""
        now_key = key_str(micros(time.time()))
        paused = self.lay.paused()
        out = []
        for q in queues or self.lay.queues():
            names = valid_pending(self.lay.names(q, "pending"))
            bound = due_bound(now_key)
            due = [n for n in names if n < bound]
            out.append(QueueStats(
                queue=q,
                pending=len(due),
                delayed=len(names) - len(due),
                reserved=sum(1 for n in self.lay.names(q, "reserved") if n.endswith(".job")),
                done=sum(1 for n in self.lay.names(q, "done") if n.endswith(".job")),
                failed=sum(1 for n in self.lay.names(q, "failed") if n.endswith(".job")),
                oldest_pending_at=int(min(due)[:16]) / 1e6 if due else None,
                paused=q in paused,
            ))
        return out

    # -- management -----------------------------------------------------------------------

    def retry(self, job_ids: Sequence[str] | None, *, queue: str | None = None,
              reason: str | None = None, command: str | None = None) -> Iterator[JobInfo | RetryBlocked]:
        """``QueueOperations.retry``: each failed file gets a ``retried`` event and is renamed back
        into pending/ (a unique job under the ``unique`` lock, its key taken back first)."""
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
        for q in [queue] if queue else self.lay.queues():
            fdir = f"{self.lay.qdir(q)}/failed"
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
        fd = self.files.open_job(fdir, name)
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
            with self.lay.global_lock("unique"):
                if not os.path.lexists(f"{fdir}/{name}"):
                    return None  # another retry moved it meanwhile
                try:
                    self.store.retake_unique(job)
                except DuplicateJob as dup:
                    return RetryBlocked(job.id, job.unique_key, dup.job_id)
                try:
                    return self._move_back(fd, fdir, name, job, events)
                except BaseException:
                    self.store.free_unique(job, locked=True)
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
        dest = f"{os.path.dirname(fdir)}/pending/{pending_name(self.lay.key(now), job.id, 0)}"
        os.rename(f"{fdir}/{name}", dest)
        return JobInfo(job, State.PENDING, 0, (*events, ev), now)

    def forget(self, job_id: str) -> bool:
        """``QueueOperations.forget``: the failed file and its log are deleted."""
        loc = self._locate(job_id) if valid_id(job_id) else None
        if loc is None or loc[1] != State.FAILED:
            return False
        try:
            os.unlink(loc[0])
        except FileNotFoundError:
            return False
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{self.lay.path}/logs/{job_id}.log")
        return True

    def _delete_older(self, state: str, older_than: float | None, queue: str | None = None) -> int:
        before = cutoff(time.time(), older_than)
        last = micros(before) if before is not None else None
        removed = 0
        for q in [queue] if queue else self.lay.queues():
            d = f"{self.lay.qdir(q)}/{state}"
            for name in self.lay.names(q, state):
                m = PENDING_RE.match(name)
                if not m or (last is not None and int(m.group(1)) > last):
                    continue
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f"{d}/{name}")
                    removed += 1
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(f"{self.lay.path}/logs/{m.group(2)}.log")
        return removed

    def flush(self, *, older_than: float | None = None, queue: str | None = None) -> int:
        """``QueueOperations.flush``: failed files whose name says they failed at or before the
        cutoff (``retention.cutoff``), with their logs."""
        return self._delete_older("failed", older_than, queue)

    def prune_done(self, *, older_than: float | None = None) -> int:
        """``QueueOperations.prune_done``: done files whose name says they finished at or before
        the cutoff, with their logs."""
        return self._delete_older("done", older_than)

    def ids_with_prefix(self, prefix: str, limit: int = 100) -> list[str]:
        """``QueueOperations.ids_with_prefix``: from the names of every state directory."""
        found: set[str] = set()
        for q in self.lay.queues():
            for name in self.lay.names(q, "reserved"):
                if name.startswith(prefix):
                    found.add(name[:36])
            for sdir in ("pending", "failed", "done"):
                for name in self.lay.names(q, sdir):
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
        fd = self.files.open_job(pdir, name)
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
            self.store.free_unique(job)
            return JobInfo(job, State.FAILED, attempts, (*events, ev), now)
        except (BlockingIOError, FileNotFoundError, CorruptJob):
            return None
        finally:
            os.close(fd)

    def clear(self, queue: str) -> int:
        """``QueueOperations.clear``: each pending file is deleted under its lock (one a claimer
        holds is left to it), its unique key freed."""
        removed = 0
        pdir = f"{self.lay.qdir(queue)}/pending"
        for name in self.lay.names(queue, "pending"):
            if not PENDING_RE.match(name):
                continue
            fd = self.files.open_job(pdir, name)
            if fd is None:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a claimer holds it: leave it
                job, _ = decode_file(read_whole(fd))
                os.unlink(f"{pdir}/{name}")
                removed += 1
                self.store.free_unique(job)
            except (BlockingIOError, FileNotFoundError, CorruptJob):
                pass
            finally:
                os.close(fd)
        return removed

    def quarantined(self) -> int:
        """How many files are in quarantine/ (not counting their ``.reason`` files)."""
        try:
            return sum(1 for n in os.listdir(f"{self.lay.path}/quarantine") if not n.endswith(".reason"))
        except FileNotFoundError:
            return 0

    # -- pages ----------------------------------------------------------------------------

    def page(self, queue: str, state: State, *, offset: int = 0, limit: int = 50,
             command: str | None = None) -> JobPage:
        """``QueueOperations.page``: found from the names of ``queue``'s ``state`` directory
        (one listing, kept while the directory is unchanged: ``Listings``); only the page's own
        files are opened (reserved jobs: sorted by claim time, one ``lstat`` each)."""
        qdir = self.lay.qdir(queue)
        if state == State.RESERVED:
            entries = self._reserved_by_claim_time([queue])
            return _scan(entries, len(entries), offset, limit, command,
                         lambda e: self._info(e[0], state, e[1], e[2]), state)
        sdir = "pending" if state in (State.PENDING, State.DELAYED) else str(state)
        d = self.listings.dir(queue, sdir)
        newest_first = state in (State.FAILED, State.DONE)

        def read(name: str) -> JobInfo | None:
            m = PENDING_RE.match(name)
            if not m:
                return None
            updated = int(m.group(1)) / 1e6 if newest_first else None
            return self._info(f"{qdir}/{sdir}/{name}", state, int(m.group(3)), updated)

        if d.settled or command:  # sort once (the sorted listing is kept) and slice
            names = d.sorted()
            due = Listings.due_count(names) if sdir == "pending" else 0
            lo, hi = (0, due) if state == State.PENDING else (due, len(names))
            total = hi - lo

            def at(pos: int) -> str:  # the pos-th name of this state in listing order
                return names[hi - 1 - pos] if newest_first else names[lo + pos]

            if command:
                return _scan(_Positions(at, total), total, offset, limit, command, read, state)
            chosen = [at(p) for p in range(offset, min(offset + limit, total))]
        else:  # a listing that is about to change: pick the page without sorting everything
            bound = Listings.bound()
            subset = d.names
            if state == State.PENDING:
                subset = [n for n in subset if n < bound]
            elif state == State.DELAYED:
                subset = [n for n in subset if n > bound]
            total = len(subset)
            chosen = _pick(subset, offset, limit, newest_first)
        jobs = [i for i in map(read, chosen) if i is not None]
        nxt = offset + limit if offset + limit < total else None
        return JobPage(jobs, total, offset, limit, nxt, len(chosen))


def _matches(info: JobInfo | None, state: State, command: str | None) -> TypeGuard[JobInfo]:
    return info is not None and info.state == state and (not command or info.job.command == command)


def _scan(entries: Sequence[_E], total: int, offset: int, limit: int, command: str | None,
          read: Callable[[_E], JobInfo | None], state: State) -> JobPage:
    """Read ``entries`` from ``offset`` until ``limit`` match (or the scan budget is spent)."""
    jobs: list[JobInfo] = []
    pos = offset
    budget = PAGE_SCAN_BUDGET if command else limit
    while pos < total and len(jobs) < limit and pos - offset < budget:
        info = read(entries[pos])
        pos += 1
        if _matches(info, state, command):
            jobs.append(info)
    return JobPage(jobs, total, offset, limit, pos if pos < total else None, pos - offset)


def _pick(names: list[str], offset: int, n: int, newest_first: bool) -> list[str]:
    """``sorted(names, reverse=newest_first)[offset:offset + n]``, in O(len log k) when the
    page is near either end (the usual first and last pages)."""
    total = len(names)
    near, far = (heapq.nlargest, heapq.nsmallest) if newest_first else (heapq.nsmallest, heapq.nlargest)
    if offset + n <= total // 8:
        return near(offset + n, names)[offset:]
    if total - offset <= total // 8:
        return far(total - offset, names)[::-1][:n]
    return sorted(names, reverse=newest_first)[offset:offset + n]


class _Positions(Sequence[str]):
    """``entries[pos]`` for ``_scan`` without building the list."""

    def __init__(self, at: Callable[[int], str], n: int) -> None:
        self.at, self.n = at, n

    @overload
    def __getitem__(self, pos: int) -> str: ...

    @overload
    def __getitem__(self, pos: slice) -> Sequence[str]: ...

    def __getitem__(self, pos: int | slice) -> str | Sequence[str]:
        if isinstance(pos, slice):
            return [self.at(p) for p in range(*pos.indices(self.n))]
        return self.at(pos)

    def __len__(self) -> int:
        return self.n


class ListedDir:
    """One listing of a job directory: its valid names, sorted on demand (and then kept)."""

    __slots__ = ("ino", "mtime", "names", "_sorted", "at", "settled")

    def __init__(self, ino: int, mtime: int, names: list[str], at: float, settled: bool) -> None:
        self.ino, self.mtime, self.names, self.at, self.settled = ino, mtime, names, at, settled
        self._sorted: list[str] | None = None

    def sorted(self) -> list[str]:
        """The names, ascending (sorted once, then kept; do not modify)."""
        if self._sorted is None:
            self._sorted = sorted(self.names)
        return self._sorted

    def due(self, bound: str) -> tuple[int, str | None]:
        """How many names sort below ``bound``, and the first of them."""
        if self._sorted is not None:
            n = bisect_left(self._sorted, bound)
            return n, (self._sorted[0] if n else None)
        below = [x for x in self.names if x < bound]
        return len(below), (min(below) if below else None)


class Listings:
    """Sorted listings of a file backend's job directories, reused while a directory is
    unchanged: same inode and mtime, checked with one ``fstat`` on the descriptor the layout
    opens (and checks for ownership) anyway. A dashboard looks at the same directories every
    couple of seconds; listing and sorting 100,000 names costs tens of milliseconds, an
    ``fstat`` microseconds. A listing is kept only if the directory had not changed for
    ``SETTLED`` seconds when it was made: a later change then gets a later mtime, even on a
    clock of coarse ticks. Pending names sort by due time, so the due ones are a prefix."""

    SETTLED = 1.0
    #: Within one request a listing is reused even while it changes (two looks at a directory
    #: this close together are one look).
    RECENT = 0.25

    def __init__(self, lay: FileLayout) -> None:
        self.lay = lay
        self._cache: dict[tuple[str, str], ListedDir] = {}

    def dir(self, queue: str, sdir: str) -> ListedDir:
        """The listing of ``queue``'s ``sdir`` directory: reused if still valid, else made;
        ``QueueUnavailable`` if it cannot be listed."""
        fd = self.lay.state_fd(queue, sdir)
        if fd is None:
            self._cache.pop((queue, sdir), None)
            return ListedDir(0, 0, [], 0.0, False)
        try:
            st = os.fstat(fd)
            hit = self._cache.get((queue, sdir))
            if (hit is not None and hit.ino == st.st_ino and hit.mtime == st.st_mtime_ns
                    and (hit.settled or time.monotonic() - hit.at < self.RECENT)):
                return hit
            names = valid_pending(os.listdir(fd))
            settled = time.time_ns() - st.st_mtime_ns > self.SETTLED * 1e9
            d = self._cache[(queue, sdir)] = ListedDir(st.st_ino, st.st_mtime_ns, names, time.monotonic(), settled)
            return d
        except OSError as exc:
            raise unusable(exc, f"{self.lay.qdir(queue)}/{sdir}", "list") from None
        finally:
            os.close(fd)

    def sorted(self, queue: str, sdir: str) -> list[str]:
        """The valid job-file names of ``queue``'s ``sdir`` directory, ascending (do not modify)."""
        return self.dir(queue, sdir).sorted()

    @staticmethod
    def bound() -> str:
        """``due_bound`` of now: every due pending name sorts below it."""
        return due_bound(key_str(micros(time.time())))

    @staticmethod
    def due_count(pending_sorted: list[str]) -> int:
        """How many of the sorted pending names are due now."""
        return bisect_left(pending_sorted, Listings.bound())

    def stats(self, queues: Sequence[str] | None = None) -> list[QueueStats]:
        """What ``stats`` returns, from the reusable listings (a dashboard's, polled): pending
        (due), delayed, reserved, done and failed counts, the oldest due job, paused. A change
        made within ``RECENT`` seconds of the last look may not be counted yet."""
        paused = self.lay.paused()
        out = []
        bound = self.bound()
        for q in queues or self.lay.queues():
            pending = self.dir(q, "pending")
            if pending.settled:
                pending.sorted()  # looked at again and again: sort once, then bisect
            due, first = pending.due(bound)
            out.append(QueueStats(
                queue=q, pending=due, delayed=len(pending.names) - due,
                reserved=sum(1 for n in self.lay.names(q, "reserved") if n.endswith(".job")),
                done=len(self.dir(q, "done").names), failed=len(self.dir(q, "failed").names),
                oldest_pending_at=int(first[:16]) / 1e6 if first else None, paused=q in paused))
        return out
