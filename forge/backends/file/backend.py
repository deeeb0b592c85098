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
a sorted listing (``_filenames``). A worker lists a pending directory once into a heap and
claims from it; the names inotify reports arriving are pushed onto the heap, and the
directory is listed again only when the kernel's event queue overflowed or there is no
inotify. Workers sharing a queue would race for the same head: one that loses skips a few
due names at random (and retries them shortly), so FIFO among due jobs may be off by a few.
The claim and acknowledge path works with names and directory descriptors (``*at`` calls),
never with paths built per job.

The tree is private to its owner, and that is checked on what is opened, not on paths looked
up again (``_fileio``): every directory of the layout is opened without following a symlink
and ``fstat``ed, when a process first uses it and again at each maintenance pass (one that
another user owns is refused, one of ours open to others is closed again), and every file
is checked on its open descriptor before it is read, written or run.

What lives where: this module is the core (the backend object, the directory layout and its
preparation, outcomes: ack, release, fail) and composes the rest, each a mixin working on the
same state: ``FileWriter`` (``_filewrite``: dispatch, unique keys; idempotency keys in ``_fileidem``), ``FileClaimer``
(``_fileclaim``: listings, claims, refusing and quarantining files), ``FileUpkeep``
(``_fileupkeep``: maintenance and recovery, pause/resume/restart, logs) and ``FileAdmin``
(``_fileadmin``: ``find``, ``jobs``, ``stats``, ``retry``, ``forget``, ``flush``,
``prune_done``, ``clear``). Job-file names, the cached pending listing and a queue's
directories are in ``_filenames``; small-file I/O helpers, flags and limits in ``_fileio``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
import time
from collections.abc import Sequence
from pathlib import Path

from forge import _linux
from forge.backends.base import Claim
from forge.backends.file.admin import FileAdmin
from forge.backends.file.claim import FileClaimer
from forge.backends.file.fsio import micros, private_dir, unusable
from forge.backends.file.layout import STATES, QueueDirs, pending_name, safe_queue
from forge.backends.file.limits import FileLimiter
from forge.backends.file.store import FileWriter
from forge.backends.file.upkeep import FileUpkeep
from forge.backends.retention import DONE_RETENTION, LOG_CAP, keeps_done
from forge.config import Connection, validate_queue_name
from forge.job import Event
from forge.stats.journal import record_outcome

__all__ = ["LOG_CAP", "FileBackend"]

#: The queue directory's fixed sub-directories, created (0700) and checked by every backend.
SUBDIRS = ("tmp", "q", "unique", "idem", "logs", "quarantine", "workers", "cancel")


class FileBackend(FileWriter, FileClaimer, FileUpkeep, FileAdmin, FileLimiter):
    """The ``Backend`` over a job-file directory (see the module docstring); inspection and
    management (find, jobs, stats, retry, forget, flush, prune_done, clear) come from
    ``FileAdmin``."""

    lease_based = False

    def __init__(self, root: str | os.PathLike[str], *, done_retention: float = DONE_RETENTION,
                 lock: str = "flock") -> None:
        self.root = Path(root)
        self._root = str(self.root)
        self.done_retention = done_retention
        self.lock_mode = lock
        self.uid = os.getuid()
        self._queues: dict[str, QueueDirs] = {}  # set up (created, opened) this process
        self._inotify: _linux.Inotify | None = None
        self._inotify_failed = False
        self._watched: set[str] = set()
        self._last_key = 0
        self._last_base = 0
        self._swept_at = 0.0  # the last sweep of idem/ (FileUpkeep.maintain)
        self._dirfds: dict[str, int] = {}
        self._tmp = f"{self._root}/tmp"
        self._prepare_root()

    @classmethod
    def from_connection(cls, conn: Connection, *, done_retention: float = DONE_RETENTION,
                        quick: bool = False) -> FileBackend:
        assert conn.path is not None
        return cls(conn.path, done_retention=done_retention, lock=conn.lock)

    # -- layout ---------------------------------------------------------------------------

    def _prepare_root(self) -> None:
        """Create or check the queue directory and its fixed sub-directories (``private_dir``):
        the root first, so that once it is closed to others nobody else can change its entries
        while they are checked."""
        fd = private_dir(self._root, self.uid, root=True)
        try:
            for sub in SUBDIRS:
                os.close(private_dir(f"{self._root}/{sub}", self.uid, name=sub, dir_fd=fd))
        finally:
            os.close(fd)

    def _check_layout(self) -> None:
        """Check the whole tree again (a worker's maintenance does, every few seconds): a
        directory made accessible to others since is closed again, one that another user
        put in place of ours is refused."""
        self._prepare_root()
        for name in self.queues():
            for state in STATES:
                fd = self._state_fd(name, state)
                if fd is not None:
                    os.close(fd)

    def _qdir(self, queue: str) -> str:
        """A queue's directory (not created), after checking the name."""
        return f"{self._root}/q/{validate_queue_name(queue)}"

    def _queue(self, name: str) -> QueueDirs:
        """The queue, its directories created, checked and opened on first use in this process."""
        q = self._queues.get(name)
        if q is None:
            q = self._queues[name] = QueueDirs(self._root, name, self.uid)
        return q

    def _forget_queue(self, name: str) -> None:
        q = self._queues.pop(name, None)
        if q is not None:
            q.close()

    def quarantined(self) -> int:
        """How many files are in quarantine/ (not counting their ``.reason`` files)."""
        try:
            return sum(1 for n in os.listdir(f"{self._root}/quarantine") if not n.endswith(".reason"))
        except FileNotFoundError:
            return 0

    def queues(self) -> list[str]:
        try:
            return sorted(n for n in os.listdir(f"{self._root}/q") if safe_queue(n))
        except FileNotFoundError:
            return []

    def _state_fd(self, queue: str, state: str) -> int | None:
        """A descriptor of a queue's ``state`` directory, it and the queue's own directory
        checked as ``private_dir`` does; None if either does not exist."""
        qdir = self._qdir(queue)
        try:
            qfd = private_dir(qdir, self.uid, create=False)
            try:
                return private_dir(f"{qdir}/{state}", self.uid, name=state, dir_fd=qfd, create=False)
            finally:
                os.close(qfd)
        except FileNotFoundError:
            return None

    def _names(self, queue: str, state: str) -> list[str]:
        """The names in a queue's ``state`` directory (none if the queue does not exist)."""
        fd = self._state_fd(queue, state)
        if fd is None:
            return []
        try:
            return os.listdir(fd)
        except OSError as exc:
            raise unusable(exc, f"{self._qdir(queue)}/{state}", "list") from None
        finally:
            os.close(fd)

    def _key(self, t: float) -> int:
        """The sort key for a job due at ``t``: FIFO among jobs this process files for the same
        or later times, even within one clock tick; an earlier time still sorts earlier."""
        base = micros(t)
        key = self._last_key + 1 if self._last_base <= base <= self._last_key else base
        self._last_base, self._last_key = base, key
        return key

    # -- outcomes -------------------------------------------------------------------------

    def heartbeat(self, claim: Claim) -> bool:
        return True

    def _finish(self, claim: Claim, event: Event | None, state: str | None, dest: str = "") -> None:
        """Record ``event`` in the claimed file, then move it to ``state``/``dest`` (or delete
        it when ``state`` is None), and let go of it.

        On an error (a full disk, EIO) the file is put back as it was and stays claimed (the
        lock is kept), so the caller can call again until it lands: nothing is recorded twice.
        """
        fd, q, reserved = claim.handle
        size = os.fstat(fd).st_size
        try:
            if self.lock_mode == "lease":
                self._still_ours(fd, q, reserved)
            if event is not None:
                data = event.to_json()
                if os.write(fd, data) != len(data):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"{q.reserved}/{reserved}")
            if state is None:
                os.unlink(reserved, dir_fd=q.fds[1])
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f"{self._root}/logs/{claim.job.id}.log")
            else:
                os.rename(reserved, dest, src_dir_fd=q.fds[1], dst_dir_fd=q.dir_fd(state))
        except FileNotFoundError:
            os.close(fd)  # no longer ours: recovered after a lease lapsed, or already recorded
            raise
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
            if exc.filename is None:
                exc.filename = f"{q.reserved}/{reserved}"
            raise
        os.close(fd)

    def _still_ours(self, fd: int, q: QueueDirs, reserved: str) -> None:
        """Lease mode: lock the claimed file again (as recovery does) and make sure it was not
        recovered meanwhile, so a worker thawed after its lease lapsed records nothing."""
        for _ in range(200):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:  # another worker is looking at it this instant
                time.sleep(0.005)
        else:
            raise OSError(errno.EAGAIN, "the claimed file stays locked by another process", reserved)
        if os.stat(reserved, dir_fd=q.fds[1]).st_ino != os.fstat(fd).st_ino:
            raise FileNotFoundError(errno.ENOENT, "recovered by another worker", reserved)

    def ack(self, claim: Claim, event: Event) -> None:
        if keeps_done(self.done_retention):
            self._finish(claim, event, "done", pending_name(micros(time.time()), claim.job.id, claim.attempt))
        else:
            self._finish(claim, event, None)
        if claim.job.unique_key is not None:
            self._free_unique(claim.job)
        record_outcome(self, claim, event)

    def release(self, claim: Claim, event: Event | None, delay: float, *, counted: bool = True) -> None:
        attempts = claim.attempt if event is not None and counted else claim.attempt - 1
        key = self._key(time.time() + delay)
        self._finish(claim, event, "pending", pending_name(key, claim.job.id, attempts))
        record_outcome(self, claim, event)

    def fail(self, claim: Claim, event: Event) -> None:
        self._finish(claim, event, "failed", pending_name(micros(time.time()), claim.job.id, claim.attempt))
        if claim.job.unique_key is not None:
            self._free_unique(claim.job)
        record_outcome(self, claim, event)

    def wait(self, queues: Sequence[str], timeout: float) -> None:
        self._watch(queues)
        if timeout <= 0:
            return
        if self._inotify is None:
            time.sleep(timeout)
            return
        with contextlib.suppress(InterruptedError):
            select.select([self._inotify], [], [], timeout)

    def close(self) -> None:
        self.drop_waits()
        self._drop_dirfds()
        if self._inotify is not None:
            self._inotify.close()
            self._inotify = None
