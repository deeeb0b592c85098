"""The job-file directory's layout: ``FileLayout`` (the state every part of the file backend
shares), job file names, a worker's cached listing of a pending directory, a queue's directories.

A pending, done or failed job file is named ``<key>-<id>-<n>.job``: ``key`` is 16 decimal
digits of microseconds (when the job becomes due, or when it finished), ``id`` the job's
UUID and ``n`` the attempts made so far. Fixed-width keys make names sort by key, so a
directory's FIFO order is its sorted listing and "is it due?" is a string comparison of the
first 16 characters. A reserved file is ``<id>-<n>.job``, ``n`` being the attempt it runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import heapq
import os
import re
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path

from forge.backends.file.fsio import O_DIR, marker_set, micros, open_lock, private_dir, unusable
from forge.config import validate_queue_name
from forge.errors import UsageError
from forge.job import Job

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
    """A key as the 16 decimal digits that start a job file's name."""
    return f"{us:016d}"


#: The largest key a name holds (2286-11-20T17:46:39.999999Z): a later time is filed at it.
MAX_KEY = 10**16 - 1


def pending_name(key: int, job_id: str, attempts: int) -> str:
    """The name of a pending, done or failed job file (a key past ``MAX_KEY`` is filed at it)."""
    return f"{min(key, MAX_KEY):016d}-{job_id}-{attempts}.job"


def reserved_name(job_id: str, attempt: int) -> str:
    """The name of a reserved job file, running attempt ``attempt``."""
    return f"{job_id}-{attempt}.job"


def key_of(name: str) -> int:
    """The key of a pending, done or failed job file's name."""
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
        """Replace the cached names with a fresh listing (valid names only); not dirty."""
        heapq.heapify(names)  # O(n): a claim needs only the head, not a sorted backlog
        self.heap = names
        self.skipped.clear()
        self.dirty = False

    def add(self, name: str) -> None:
        """Add one valid name (reported by inotify)."""
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
        """The key of the next name this listing would offer (due or not); None if empty."""
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
    Each directory is created or checked as ``fsio.private_dir`` does (ours, a real
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
        """The descriptor of the pending directory."""
        return self.fds[0]

    @property
    def rfd(self) -> int:
        """The descriptor of the reserved directory."""
        return self.fds[1]

    def dir_fd(self, state: str) -> int:
        """The descriptor of the ``state`` directory (one of ``STATES``)."""
        return self.fds[STATES.index(state)]

    def close(self) -> None:
        """Close the directories' descriptors (the queue is set up afresh on its next use)."""
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = []


def safe_queue(name: str) -> bool:
    """Whether ``name`` (an entry of q/) is a valid queue name: anything else is not a queue."""
    try:
        validate_queue_name(name)
        return True
    except UsageError:
        return False


def with_due(job: Job, m: re.Match[str] | None) -> Job:
    """``job`` as due when its pending name says (a release or retry moves the name, not the
    record's ``available_at``): what ``queue:show`` and ``queue:list`` show as available."""
    if m is None:
        return job
    due = int(m.group(1)) / 1e6
    return job if abs(due - job.available_at) <= 0.001 else dataclasses.replace(job, available_at=due)


#: The queue directory's fixed sub-directories, created (0700) and checked by every backend.
SUBDIRS = ("tmp", "q", "unique", "idem", "logs", "quarantine", "workers", "cancel")


class FileLayout:
    """The state every part of one ``FileBackend`` shares: where the tree is, whose it is, its
    settings, and the directories this process has set up (opened and checked) so far.

    Creating one creates or checks the root and its fixed sub-directories (``prepare_root``),
    raising ``QueueUnavailable`` if they cannot be used. Paths are strings (``path``, ``tmp``);
    ``root`` is the same directory as a ``Path``.
    """

    def __init__(self, root: str | os.PathLike[str], *, done_retention: float, lock_mode: str) -> None:
        self.root = Path(root)
        self.path = str(self.root)
        self.tmp = f"{self.path}/tmp"
        self.uid = os.getuid()
        self.done_retention = done_retention
        #: "flock" (the job's lock is the claim) or "lease" (the claimed event's deadline is).
        self.lock_mode = lock_mode
        #: The queues set up (created, opened) in this process, by name.
        self.open_queues: dict[str, QueueDirs] = {}
        self._dirfds: dict[str, int] = {}
        self._last_key = 0
        self._last_base = 0
        self.prepare_root()

    def prepare_root(self) -> None:
        """Create or check the queue directory and its fixed sub-directories (``private_dir``):
        the root first, so that once it is closed to others nobody else can change its entries
        while they are checked."""
        fd = private_dir(self.path, self.uid, root=True)
        try:
            for sub in SUBDIRS:
                os.close(private_dir(f"{self.path}/{sub}", self.uid, name=sub, dir_fd=fd))
        finally:
            os.close(fd)

    def check(self) -> None:
        """Check the whole tree again (a worker's maintenance does, every few seconds): a
        directory made accessible to others since is closed again, one that another user
        put in place of ours is refused (``QueueUnavailable``)."""
        self.prepare_root()
        for name in self.queues():
            for state in STATES:
                fd = self.state_fd(name, state)
                if fd is not None:
                    os.close(fd)

    def qdir(self, queue: str) -> str:
        """A queue's directory (not created), after checking the name (``UsageError``)."""
        return f"{self.path}/q/{validate_queue_name(queue)}"

    def queue(self, name: str) -> QueueDirs:
        """The queue, its directories created, checked and opened on first use in this process."""
        q = self.open_queues.get(name)
        if q is None:
            q = self.open_queues[name] = QueueDirs(self.path, name, self.uid)
        return q

    def forget_queue(self, name: str) -> None:
        """Close a queue's directories in this process (it is set up afresh on its next use)."""
        q = self.open_queues.pop(name, None)
        if q is not None:
            q.close()

    def queues(self) -> list[str]:
        """Names of the queues that have a directory (valid names only), sorted."""
        try:
            return sorted(n for n in os.listdir(f"{self.path}/q") if safe_queue(n))
        except FileNotFoundError:
            return []

    def paused(self) -> set[str]:
        """The queues whose ``paused`` marker is set (by us: a planted one counts for nothing)."""
        return {q for q in self.queues() if marker_set(f"{self.qdir(q)}/paused", self.uid)}

    def state_fd(self, queue: str, state: str) -> int | None:
        """A descriptor of a queue's ``state`` directory, it and the queue's own directory
        checked as ``private_dir`` does; None if either does not exist. The caller closes it."""
        qdir = self.qdir(queue)
        try:
            qfd = private_dir(qdir, self.uid, create=False)
            try:
                return private_dir(f"{qdir}/{state}", self.uid, name=state, dir_fd=qfd, create=False)
            finally:
                os.close(qfd)
        except FileNotFoundError:
            return None

    def names(self, queue: str, state: str) -> list[str]:
        """The names in a queue's ``state`` directory (none if the queue does not exist);
        ``QueueUnavailable`` if it cannot be listed."""
        fd = self.state_fd(queue, state)
        if fd is None:
            return []
        try:
            return os.listdir(fd)
        except OSError as exc:
            raise unusable(exc, f"{self.qdir(queue)}/{state}", "list") from None
        finally:
            os.close(fd)

    def key(self, t: float) -> int:
        """The sort key for a job due at ``t``: FIFO among jobs this process files for the same
        or later times, even within one clock tick; an earlier time still sorts earlier."""
        base = micros(t)
        key = self._last_key + 1 if self._last_base <= base <= self._last_key else base
        self._last_base, self._last_key = base, key
        return key

    def dirfd(self, path: str) -> int:
        """A cached descriptor of a forge directory (tmp/, unique/, idem/), for ``*at`` calls
        and directory fsyncs. Queue directories have theirs in ``QueueDirs``.

        A directory removed from under us fails every ``*at`` call with ENOENT (nothing can be
        created in a deleted directory); a writer then calls ``drop_dirfds`` and tries once
        more, so a cached descriptor can never make a job land somewhere invisible.
        """
        fd = self._dirfds.get(path)
        if fd is None:
            fd = self._dirfds[path] = os.open(path, O_DIR)
        return fd

    def drop_dirfds(self) -> None:
        """Close every cached directory descriptor, the queues' included."""
        for fd in self._dirfds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._dirfds.clear()
        for name in list(self.open_queues):
            self.forget_queue(name)

    @contextlib.contextmanager
    def global_lock(self, name: str, *, wait: bool = True) -> Iterator[bool]:
        """Hold the connection-wide lock ``name`` (``.<name>.lock``); without ``wait``, yield
        False (not holding it) if another process does. ``QueueUnavailable`` if the lock file
        cannot be trusted."""
        fd = open_lock(self.root / f".{name}.lock", self.uid)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)

    def log_path(self, job_id: str) -> str:
        """Where a job's captured output is kept."""
        return f"{self.path}/logs/{job_id}.log"
