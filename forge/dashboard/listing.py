"""One page of a queue's jobs in one state, at any depth, cheaply on both backends.

``Backend.jobs`` reads every record it yields, so skipping to job 90,000 through it would read
90,000 records. A page is found from what each store keeps sorted without reading records:

* the file backend names every waiting, failed and done job file ``<key>-<id>-<n>.job``, so a
  directory listing (one ``listdir``) sorted by name is the listing order; only the page's own
  files are opened;
* Redis keeps ``pending`` as a list and ``delayed``/``failed``/``done``/``reserved`` as sorted
  sets: ``LRANGE``/``ZRANGE`` take an offset directly; only the page's records are fetched.

Pages are by offset in that order (page 3 of pending is jobs 100-149 from the head). A
``command`` filter has to read records: it scans forward from the offset, at most
``SCAN_BUDGET`` records per page, and says where it stopped (``next_offset``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from forge.job import JobInfo, State

#: Records a filtered page reads at most before it returns what it found.
SCAN_BUDGET = 2000
#: The states a job list shows, in the order of its tabs.
STATES = (State.RESERVED, State.PENDING, State.DELAYED, State.FAILED, State.DONE)


@dataclass(frozen=True)
class Page:
    """Jobs ``offset`` .. of one queue and state; ``next_offset`` None on the last page."""

    jobs: list[JobInfo]
    total: int
    offset: int
    limit: int
    next_offset: int | None
    scanned: int = 0

    @property
    def prev_offset(self) -> int | None:
        return None if self.offset == 0 else max(0, self.offset - self.limit)


def page(backend: Any, queue: str, state: State, *, offset: int = 0, limit: int = 50,
         command: str | None = None, dirs: Listings | None = None) -> Page:
    """The page of ``queue``'s jobs in ``state`` starting at ``offset`` (listing order: reserved,
    pending and delayed oldest first, failed and done newest first). ``dirs``: the file
    backend's reusable listings (a dashboard keeps one)."""
    kind = type(backend).__name__
    if kind == "FileBackend":
        return _file_page(backend, queue, state, offset, limit, command, dirs)
    if kind == "RedisBackend":
        return _redis_page(backend, queue, state, offset, limit, command)
    return _generic_page(backend, queue, state, offset, limit, command)


def _matches(info: JobInfo | None, state: State, command: str | None) -> bool:
    return info is not None and info.state == state and (not command or info.job.command == command)


def _file_page(b: Any, queue: str, state: State, offset: int, limit: int, command: str | None,
               dirs: Listings | None = None) -> Page:
    from forge.backends.file.layout import PENDING_RE

    qdir = b._qdir(queue)
    if state == State.RESERVED:
        entries = b._reserved_by_claim_time([queue])
        return _scan(entries, len(entries), offset, limit, command,
                     lambda e: b._info(e[0], state, e[1], e[2]), state)
    dirs = dirs or Listings(b)
    sdir = "pending" if state in (State.PENDING, State.DELAYED) else str(state)
    d = dirs.dir(queue, sdir)
    newest_first = state in (State.FAILED, State.DONE)

    def read(name: str) -> JobInfo | None:
        m = PENDING_RE.match(name)
        if not m:
            return None
        updated = int(m.group(1)) / 1e6 if newest_first else None
        return b._info(f"{qdir}/{sdir}/{name}", state, int(m.group(3)), updated)

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
    return Page(jobs, total, offset, limit, nxt, len(chosen))


def _pick(names: list[str], offset: int, n: int, newest_first: bool) -> list[str]:
    """``sorted(names, reverse=newest_first)[offset:offset + n]``, in O(len log k) when the
    page is near either end (the usual first and last pages)."""
    import heapq

    total = len(names)
    near, far = (heapq.nlargest, heapq.nsmallest) if newest_first else (heapq.nsmallest, heapq.nlargest)
    if offset + n <= total // 8:
        return near(offset + n, names)[offset:]
    if total - offset <= total // 8:
        return far(total - offset, names)[::-1][:n]
    return sorted(names, reverse=newest_first)[offset:offset + n]


class _Positions:
    """``entries[pos]`` for ``_scan`` without building the list."""

    def __init__(self, at: Any, n: int) -> None:
        self.at, self.n = at, n

    def __getitem__(self, pos: int) -> str:
        return str(self.at(pos))

    def __len__(self) -> int:
        return self.n


class _Dir:
    """One listing of a job directory: its valid names, sorted on demand (and then kept)."""

    __slots__ = ("ino", "mtime", "names", "_sorted", "at", "settled")

    def __init__(self, ino: int, mtime: int, names: list[str], at: float, settled: bool) -> None:
        self.ino, self.mtime, self.names, self.at, self.settled = ino, mtime, names, at, settled
        self._sorted: list[str] | None = None

    def sorted(self) -> list[str]:
        if self._sorted is None:
            self._sorted = sorted(self.names)
        return self._sorted

    def due(self, bound: str) -> tuple[int, str | None]:
        """How many names sort below ``bound``, and the first of them."""
        if self._sorted is not None:
            from bisect import bisect_left

            n = bisect_left(self._sorted, bound)
            return n, (self._sorted[0] if n else None)
        below = [x for x in self.names if x < bound]
        return len(below), (min(below) if below else None)


class Listings:
    """Sorted listings of a file backend's job directories, reused while a directory is
    unchanged: same inode and mtime, checked with one ``fstat`` on the descriptor the backend
    opens (and checks for ownership) anyway. A dashboard looks at the same directories every
    couple of seconds; listing and sorting 100,000 names costs tens of milliseconds, an
    ``fstat`` microseconds. A listing is kept only if the directory had not changed for
    ``SETTLED`` seconds when it was made: a later change then gets a later mtime, even on a
    clock of coarse ticks. Pending names sort by due time, so the due ones are a prefix."""

    SETTLED = 1.0

    def __init__(self, backend: Any) -> None:
        self.b = backend
        self._cache: dict[tuple[str, str], _Dir] = {}

    #: Within one request a listing is reused even while it changes (two looks at a directory
    #: this close together are one look).
    RECENT = 0.25

    def dir(self, queue: str, sdir: str) -> _Dir:
        """The listing of ``queue``'s ``sdir`` directory: reused if still valid, else made."""
        import os

        from forge.backends.file.fsio import unusable
        from forge.backends.file.layout import valid_pending

        fd = self.b._state_fd(queue, sdir)
        if fd is None:
            self._cache.pop((queue, sdir), None)
            return _Dir(0, 0, [], 0.0, False)
        try:
            st = os.fstat(fd)
            hit = self._cache.get((queue, sdir))
            if (hit is not None and hit.ino == st.st_ino and hit.mtime == st.st_mtime_ns
                    and (hit.settled or time.monotonic() - hit.at < self.RECENT)):
                return hit
            names = valid_pending(os.listdir(fd))
            settled = time.time_ns() - st.st_mtime_ns > self.SETTLED * 1e9
            d = self._cache[(queue, sdir)] = _Dir(st.st_ino, st.st_mtime_ns, names, time.monotonic(), settled)
            return d
        except OSError as exc:
            raise unusable(exc, f"{self.b._qdir(queue)}/{sdir}", "list") from None
        finally:
            os.close(fd)

    def sorted(self, queue: str, sdir: str) -> list[str]:
        """The valid job-file names of ``queue``'s ``sdir`` directory, ascending (do not modify)."""
        return self.dir(queue, sdir).sorted()

    @staticmethod
    def bound() -> str:
        from forge.backends.file.fsio import micros
        from forge.backends.file.layout import due_bound, key_str

        return due_bound(key_str(micros(time.time())))

    @staticmethod
    def due_count(pending_sorted: list[str]) -> int:
        from bisect import bisect_left

        return bisect_left(pending_sorted, Listings.bound())

    def stats(self, queues: list[str] | None = None) -> list[Any]:
        """What ``FileBackend.stats`` returns (``_fileadmin``), from the reusable listings:
        pending (due), delayed, reserved, done and failed counts, the oldest due job, paused."""
        from forge.backends.base import QueueStats

        paused = self.b.paused()
        out = []
        bound = self.bound()
        for q in queues or self.b.queues():
            pending = self.dir(q, "pending")
            if pending.settled:
                pending.sorted()  # looked at again and again: sort once, then bisect
            due, first = pending.due(bound)
            out.append(QueueStats(
                queue=q, pending=due, delayed=len(pending.names) - due,
                reserved=sum(1 for n in self.b._names(q, "reserved") if n.endswith(".job")),
                done=len(self.dir(q, "done").names), failed=len(self.dir(q, "failed").names),
                oldest_pending_at=int(first[:16]) / 1e6 if first else None, paused=q in paused))
        return out


def _scan(entries: Any, total: int, offset: int, limit: int, command: str | None, read: Any,
          state: State) -> Page:
    """Read ``entries`` from ``offset`` until ``limit`` match (or the scan budget is spent)."""
    jobs: list[JobInfo] = []
    pos = offset
    budget = SCAN_BUDGET if command else limit
    while pos < total and len(jobs) < limit and pos - offset < budget:
        info = read(entries[pos])
        pos += 1
        if _matches(info, state, command):
            jobs.append(info)
    return Page(jobs, total, offset, limit, pos if pos < total else None, pos - offset)


def _redis_page(b: Any, queue: str, state: State, offset: int, limit: int, command: str | None) -> Page:
    from forge.backends.redis.layout import us

    with b._io():
        now_us = us(b._server_now())
        key = b._key("q", queue, "")
        r = b._r
        if state == State.PENDING:
            total = r.llen(key + "pending") + r.zcount(key + "delayed", "-inf", now_us)
        elif state == State.DELAYED:
            total = r.zcount(key + "delayed", f"({now_us}", "+inf")
        else:
            total = r.zcard(key + str(state))
        jobs: list[JobInfo] = []
        pos = offset
        budget = SCAN_BUDGET if command else limit
        while len(jobs) < limit and pos < total and pos - offset < budget:
            n = limit if not command else min(200, budget - (pos - offset))
            if state == State.RESERVED:  # scored by lease expiry: claim order is close to it
                ids = r.zrange(key + "reserved", pos, pos + n - 1)
            else:
                ids = b._ids(queue, state, now_us, pos, n)
            if not ids:
                break
            for found in b._fetch_keyed(ids):
                if len(jobs) >= limit:
                    break  # the page is full: the next one starts here
                pos += 1
                info = found[1] if found else None
                if _matches(info, state, command):
                    jobs.append(info)  # type: ignore[arg-type]
            if not command:
                pos = max(pos, offset + len(ids))
                break
    return Page(jobs, total, offset, limit, pos if pos < total else None, pos - offset)


def _generic_page(b: Any, queue: str, state: State, offset: int, limit: int, command: str | None) -> Page:
    """Another backend: through ``Backend.jobs`` (reads every record up to the page)."""
    jobs = list(b.jobs(queue=queue, state=state, command=command, limit=offset + limit + 1))
    more = len(jobs) > offset + limit
    total = next((getattr(s, str(state), 0) for s in b.stats([queue])), len(jobs))
    return Page(jobs[offset:offset + limit], total, offset, limit, offset + limit if more else None)

