"""Job file names, a worker's cached listing of a pending directory, and a queue's directories.

A pending, done or failed job file is named ``<key>-<id>-<n>.job``: ``key`` is 16 decimal
digits of microseconds (when the job becomes due, or when it finished), ``id`` the job's
UUID and ``n`` the attempts made so far. Fixed-width keys make names sort by key, so a
directory's FIFO order is its sorted listing and "is it due?" is a string comparison of the
first 16 characters. A reserved file is ``<id>-<n>.job``, ``n`` being the attempt it runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import heapq
import os
import re
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

from forge.backends.file.fsio import private_dir
from forge.config import validate_queue_name
from forge.errors import UsageError

# ASCII digits and \Z (not \d and $, which also take other scripts' digits and a trailing
# newline): a name forge did not write is quarantined, never parsed.
PENDING_RE = re.compile(r"([0-9]{16})-([0-9a-f-]{36})-([0-9]{1,6})\.job\Z")
RESERVED_RE = re.compile(r"([0-9a-f-]{36})-([0-9]{1,6})\.job\Z")
# Every name of a listing joined with "/" (which no file name contains), checked in one
# possessive regex pass: several times faster than a match per name.
_ALL_PENDING_RE = re.compile(r"(?:[0-9]{16}-[0-9a-f-]{36}-[0-9]{1,6}\.job/)*+")

#: After a collision on the head of the listing, skip up to this many due names (at random).
SKIP_MAX = 16
#: Names skipped after a collision are tried again after this many further names.
RETRY_AFTER = 16


def key_str(us: int) -> str:
    return f"{us:016d}"


#: The largest key a name holds (2286-11-20T17:46:39.999999Z): a later time is filed at it.
MAX_KEY = 10**16 - 1


def pending_name(key: int, job_id: str, attempts: int) -> str:
    return f"{min(key, MAX_KEY):016d}-{job_id}-{attempts}.job"


def reserved_name(job_id: str, attempt: int) -> str:
    return f"{job_id}-{attempt}.job"


def key_of(name: str) -> int:
    return int(name[:16])


def split_pending(name: str) -> tuple[str, int]:
    """(job id, attempts) of a name already known to match ``PENDING_RE``."""
    return name[17:53], int(name[54:-4])


def valid_pending(names: list[str]) -> list[str]:
    """The names that match ``PENDING_RE``: all of them, usually, found in one pass."""
    if not names or _ALL_PENDING_RE.fullmatch("/".join(names) + "/"):
        return names
    return [n for n in names if PENDING_RE.match(n)]


def due_bound(now_key: str) -> str:
    """A string that every pending name due at ``now_key`` sorts below, and every later one
    above: after the 16-digit key comes "-", which sorts just below "."."""
    return now_key + "."


def ordered(names: list[str], *, reverse: bool = False) -> Iterator[str]:
    """``names`` in sorted order (descending if ``reverse``), sorting lazily: a caller that
    stops after the first few pays O(n log k), not a full sort."""
    n = len(names)
    pick = heapq.nlargest if reverse else heapq.nsmallest
    start, k = 0, 64
    while start < n:
        if start + k >= n // 8:  # most of it is wanted after all: sort the rest once
            yield from sorted(names, reverse=reverse)[start:]
            return
        yield from pick(start + k, names)[start:]
        start += k
        k *= 4


class Listing:
    """A worker's cached view of one pending directory: a heap of valid names, names
    skipped after collisions, and whether the directory may hold names that are not in the
    heap (``dirty``: list it again before concluding it is empty)."""

    __slots__ = ("heap", "skipped", "since_skip", "dirty")

    def __init__(self) -> None:
        self.heap: list[str] = []
        self.skipped: deque[str] = deque()
        self.since_skip = 0
        self.dirty = True

    def reset(self, names: list[str]) -> None:
        heapq.heapify(names)  # O(n): a claim needs only the head, not a sorted backlog
        self.heap = names
        self.skipped.clear()
        self.dirty = False

    def add(self, name: str) -> None:
        heapq.heappush(self.heap, name)

    def next_due(self, now: str) -> tuple[str, bool] | None:
        """The next name to try, due at or before the key string ``now``, and whether it
        comes from the head of the listing (a miss there is a collision); None if none."""
        heap = self.heap
        head_due = bool(heap) and heap[0][:16] <= now
        if self.skipped and (self.since_skip >= RETRY_AFTER or not head_due):
            return self.skipped.popleft(), False
        if not head_due:
            return None
        self.since_skip += 1
        return heapq.heappop(heap), True

    def skip(self, now: str) -> None:
        """Set aside a few due names at random after a collision, so workers sharing this
        listing spread out instead of racing for the same head; they are retried soon."""
        heap, skipped = self.heap, self.skipped
        if not skipped:
            self.since_skip = 0
        import random  # here: a dispatch never needs it (1 ms of start-up)

        for _ in range(random.randint(1, SKIP_MAX)):
            if not heap or heap[0][:16] > now:
                break
            skipped.append(heapq.heappop(heap))

    def first_key(self) -> int | None:
        if self.skipped:
            return key_of(self.skipped[0])
        return key_of(self.heap[0]) if self.heap else None


def merge_names(listing: Listing, names: Iterable[str]) -> bool:
    """Add names reported by inotify; False if one is not a job name (list it again)."""
    ok = True
    for name in names:
        if PENDING_RE.match(name):
            listing.add(name)
        elif not name.startswith("."):
            ok = False
    return ok


STATES = ("pending", "reserved", "done", "failed")


class QueueDirs:
    """One queue's directories, set up once per backend: validated name, paths as strings,
    open directory descriptors for ``*at`` calls, and the worker's cached pending listing.
    Each directory is created or checked as ``_fileio.private_dir`` does (ours, a real
    directory, closed to others), the queue's own directory included."""

    __slots__ = ("name", "path", "pending", "reserved", "done", "failed", "paused", "fds", "listing")

    def __init__(self, root: str, name: str, uid: int) -> None:
        self.name = validate_queue_name(name)
        self.path = f"{root}/q/{name}"
        self.pending, self.reserved, self.done, self.failed = (f"{self.path}/{s}" for s in STATES)
        self.paused = f"{self.path}/paused"
        self.listing = Listing()
        self.fds: list[int] = []
        qfd = private_dir(self.path, uid)
        try:
            for s in STATES:
                self.fds.append(private_dir(f"{self.path}/{s}", uid, name=s, dir_fd=qfd))
        except BaseException:
            self.close()
            raise
        finally:
            os.close(qfd)

    @property
    def pfd(self) -> int:
        return self.fds[0]

    def dir_fd(self, state: str) -> int:
        return self.fds[STATES.index(state)]

    def close(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = []


def safe_queue(name: str) -> bool:
    try:
        validate_queue_name(name)
        return True
    except UsageError:
        return False


def with_due(job: Any, m: re.Match[str] | None) -> Any:
    """``job`` as due when its pending name says (a release or retry moves the name, not the
    record's ``available_at``): what ``queue:show`` and ``queue:list`` show as available."""
    if m is None:
        return job
    due = int(m.group(1)) / 1e6
    return job if abs(due - job.available_at) <= 0.001 else dataclasses.replace(job, available_at=due)
