"""The job-file directory: a crash-safe queue with no server.

Layout under the queue directory (0700, files 0600)::

    tmp/                              jobs being written (never read by workers)
    q/<queue>/pending/<key>-<id>-<n>.job    waiting; key = available-at in microseconds
    q/<queue>/reserved/<id>-<n>.job         claimed for attempt n, locked by its job process
    q/<queue>/done/<time>-<id>-<n>.job      finished, kept for the retention
    q/<queue>/failed/<time>-<id>-<n>.job    failed for good
    q/<queue>/paused                        marker: workers skip this queue
    unique/<hash>.json                      unique-key holders
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

What lives where: this module is the core (layout and preparation, dispatch and unique keys,
claiming, outcomes, maintenance and recovery, pause/resume/restart, logs). Inspection and
management (``find``, ``jobs``, ``stats``, ``retry``, ``forget``, ``flush``, ``prune_done``,
``clear``) are ``FileAdmin`` in ``_fileadmin``, which ``FileBackend`` inherits; job-file names
and the cached pending listing are in ``_filenames``; small-file I/O helpers in ``_fileio``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import select
import stat
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

from .. import _linux
from ..config import Connection, validate_queue_name
from ..errors import DispatchFailed, DuplicateJob, QueueUnavailable, UsageError
from ..job import (
    MAX_FILE_BYTES,
    MAX_PAYLOAD_BYTES,
    CorruptJob,
    Event,
    Job,
    Reason,
    State,
    backoff_delay,
    decode_file,
    decode_job,
    valid_id,
)
from ._fileadmin import FileAdmin
from ._fileio import micros, open_error, read_json, read_whole, write_new
from ._filenames import (
    RESERVED_RE,
    Listing,
    key_str,
    merge_names,
    pending_name,
    reserved_name,
    split_pending,
    valid_pending,
)
from .base import KILL_GRACE, LEASE_MARGIN, Claim

STATES = ("pending", "reserved", "done", "failed")
LOG_CAP = 1024 * 1024
TMP_MAX_AGE = 3600.0
UNIQUE_INFLIGHT = 60.0
_O_READ = os.O_RDWR | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_O_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_TAKEN = object()  # _claim_one: another claimer got there first


class _Queue:
    """One queue's directories, set up once per backend: validated name, paths as strings,
    open directory descriptors for ``*at`` calls, and the worker's cached pending listing."""

    __slots__ = ("name", "path", "pending", "reserved", "done", "failed", "paused", "fds", "listing")

    def __init__(self, root: str, name: str) -> None:
        self.name = validate_queue_name(name)
        self.path = f"{root}/q/{name}"
        self.pending, self.reserved, self.done, self.failed = (f"{self.path}/{s}" for s in STATES)
        self.paused = f"{self.path}/paused"
        self.listing = Listing()
        try:
            os.mkdir(self.path, 0o700)
        except FileExistsError:
            pass
        for d in (self.pending, self.reserved, self.done, self.failed):
            try:
                os.mkdir(d, 0o700)
            except FileExistsError:
                pass
        self.fds: list[int] = []
        try:
            for d in (self.pending, self.reserved, self.done, self.failed):
                self.fds.append(os.open(d, _O_DIR))
        except OSError:
            self.close()
            raise

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


class FileBackend(FileAdmin):
    """The ``Backend`` over a job-file directory (see the module docstring); inspection and
    management (find, jobs, stats, retry, forget, flush, prune_done, clear) come from
    ``FileAdmin``."""

    lease_based = False

    def __init__(self, root: str | os.PathLike[str], *, done_retention: float = 3600.0,
                 lock: str = "flock") -> None:
        self.root = Path(root)
        self._root = str(self.root)
        self.done_retention = done_retention
        self.lock_mode = lock
        self.uid = os.getuid()
        self._queues: dict[str, _Queue] = {}  # set up (created, opened) this process
        self._inotify: _linux.Inotify | None = None
        self._inotify_failed = False
        self._watched: set[str] = set()
        self._last_key = 0
        self._last_base = 0
        self._dirfds: dict[str, int] = {}
        self._tmp = f"{self._root}/tmp"
        self._prepare_root()

    @classmethod
    def from_connection(cls, conn: Connection, *, done_retention: float = 3600.0,
                        quick: bool = False) -> FileBackend:
        assert conn.path is not None
        return cls(conn.path, done_retention=done_retention, lock=conn.lock)

    # -- layout ---------------------------------------------------------------------------

    def _prepare_root(self) -> None:
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            st = os.lstat(self.root)
        except OSError as exc:
            raise QueueUnavailable(
                f"Cannot use queue directory {self.root}: {exc.strerror}.",
                hint="Set [connections.file] path in forge.toml or FORGE_QUEUE_DIR.",
            ) from None
        if not stat.S_ISDIR(st.st_mode):
            raise QueueUnavailable(f"Queue directory {self.root} is not a directory.")
        if st.st_uid != self.uid:
            raise QueueUnavailable(
                f"Queue directory {self.root} belongs to uid {st.st_uid}, not to you (uid {self.uid});"
                " refusing to use it."
            )
        if st.st_mode & 0o077:
            os.chmod(self.root, 0o700)
            warnings.warn(
                f"Queue directory {self.root} was accessible to other users"
                f" (mode {stat.S_IMODE(st.st_mode):o}); repaired to 700.",
                stacklevel=3,
            )
        for sub in ("tmp", "q", "unique", "logs", "quarantine"):
            (self.root / sub).mkdir(mode=0o700, exist_ok=True)

    def _qdir(self, queue: str) -> str:
        """A queue's directory (not created), after checking the name."""
        return f"{self._root}/q/{validate_queue_name(queue)}"

    def _queue(self, name: str) -> _Queue:
        """The queue, its directories created and opened on first use in this process."""
        q = self._queues.get(name)
        if q is None:
            try:
                q = self._queues[name] = _Queue(self._root, name)
            except OSError as exc:
                raise QueueUnavailable(f"Cannot create queue {name} in {self.root}: {exc.strerror}.") from None
        return q

    def _forget_queue(self, name: str) -> None:
        q = self._queues.pop(name, None)
        if q is not None:
            q.close()

    def queues(self) -> list[str]:
        try:
            return sorted(n for n in os.listdir(f"{self._root}/q") if _safe_queue(n))
        except FileNotFoundError:
            return []

    def _names(self, queue: str, state: str) -> list[str]:
        """The names in a queue's ``state`` directory (none if the queue does not exist)."""
        try:
            return os.listdir(f"{self._qdir(queue)}/{state}")
        except FileNotFoundError:
            return []

    def _key(self, t: float) -> int:
        """The sort key for a job due at ``t``: FIFO among jobs this process files for the same
        or later times, even within one clock tick; an earlier time still sorts earlier."""
        base = micros(t)
        key = self._last_key + 1 if self._last_base <= base <= self._last_key else base
        self._last_base, self._last_key = base, key
        return key

    # -- dispatch -------------------------------------------------------------------------

    def push(self, jobs: Sequence[Job]) -> None:
        if not jobs:
            return
        blobs = []
        for job in jobs:
            blob = job.to_json()
            if len(blob) > MAX_PAYLOAD_BYTES:
                raise UsageError(f"Job {job.id} is {len(blob)} bytes, over the {MAX_PAYLOAD_BYTES}-byte cap.")
            blobs.append(blob)
        for name in {job.queue for job in jobs}:
            self._queue(name)
        held: list[Job] = []
        try:
            for job in jobs:
                if job.unique_key is not None:
                    self._acquire_unique(job)
                    held.append(job)
            self._write_jobs(jobs, blobs)
        except BaseException:
            for job in held:
                self._free_unique(job)
            raise

    def _dirfd(self, path: str) -> int:
        """A cached descriptor of a forge directory (tmp/, unique/), for ``*at`` calls and
        directory fsyncs. Queue directories have theirs in ``_Queue``.

        A directory removed from under us fails every ``*at`` call with ENOENT (nothing can be
        created in a deleted directory), and ``_write_jobs`` then drops the cache and retries
        once, so a cached descriptor can never make a job land somewhere invisible.
        """
        fd = self._dirfds.get(path)
        if fd is None:
            fd = self._dirfds[path] = os.open(path, _O_DIR)
        return fd

    def _drop_dirfds(self) -> None:
        for fd in self._dirfds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._dirfds.clear()
        for name in list(self._queues):
            self._forget_queue(name)

    def _write_jobs(self, jobs: Sequence[Job], blobs: list[bytes]) -> None:
        try:
            self._write_jobs_once(jobs, blobs)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise self._dispatch_failed(exc) from None
            self._drop_dirfds()  # the queue directory was removed or replaced: start afresh
            try:
                self._prepare_root()
                for name in {job.queue for job in jobs}:
                    self._queue(name)
            except QueueUnavailable:
                raise self._dispatch_failed(exc) from None
            try:
                self._write_jobs_once(jobs, blobs)
            except OSError as exc2:
                raise self._dispatch_failed(exc2) from None

    def _dispatch_failed(self, exc: OSError) -> DispatchFailed:
        where = exc.filename or self.root
        if exc.filename and not os.path.isabs(str(exc.filename)):
            where = self.root / "tmp" / str(exc.filename)
        return DispatchFailed(
            f"Could not store the job in {where}: {exc.strerror or exc}.",
            hint="Free disk space or fix the queue directory's permissions; nothing was queued.",
        )

    def _write_jobs_once(self, jobs: Sequence[Job], blobs: list[bytes]) -> None:
        """Write temp files, make them durable, rename them into pending/, fsync the dirs.

        One job: fsync the file. A batch: one ``syncfs`` makes every temp file durable at once
        (instead of an fsync each) before any of them is renamed into view.

        A batch's cost is mostly the kernel creating the temp files. On ext4 without a journal
        that cost jumps ~10x for a few minutes after many files of the same block group were
        deleted (a prune, a clear): the inode allocator skips every inode freed in the last
        60 s (360 s while its inode-table block is dirty), looking each one up, for each new
        inode. No user-space order of calls avoids that; ``bench/queue_core.py`` measures it
        beside the raw rate. ``O_TMPFILE`` + ``linkat`` was measured at ~13% faster (raw batch) in the
        usual case but not used: without a journal the link count it sets needs a second
        syncfs, and a crash before the link leaks inodes nothing in forge can find and remove.
        """
        tfd = self._dirfd(self._tmp)
        temps: list[str] = []
        moved: list[tuple[str, int]] = []
        single = len(jobs) == 1
        open_, write, close, rename = os.open, os.write, os.close, os.rename
        try:
            for job, blob in zip(jobs, blobs, strict=True):
                tmp = job.id + ".tmp"
                fd = open_(tmp, _O_NEW, 0o600, dir_fd=tfd)
                temps.append(tmp)
                try:
                    n = write(fd, blob)
                    if n != len(blob):
                        view = memoryview(blob)[n:]
                        while view:
                            view = view[write(fd, view):]
                    if single:
                        os.fsync(fd)
                finally:
                    close(fd)
            if not single:
                _linux.syncfs(tfd)
            dirs: dict[int, None] = {}
            queues = self._queues
            for job, tmp in zip(jobs, temps, strict=True):
                pfd = queues[job.queue].pfd
                dest = pending_name(self._key(job.available_at), job.id, 0)
                rename(tmp, dest, src_dir_fd=tfd, dst_dir_fd=pfd)
                moved.append((dest, pfd))
                dirs[pfd] = None
            if any(j.unique_key for j in jobs):
                dirs[self._dirfd(f"{self._root}/unique")] = None
            for dfd in dirs:
                os.fsync(dfd)
        except OSError:
            for tmp in temps[len(moved):]:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=tfd)
            for dest, pfd in moved:
                with contextlib.suppress(OSError):
                    os.unlink(dest, dir_fd=pfd)
            raise

    # -- unique keys ----------------------------------------------------------------------

    def _unique_path(self, key: str) -> Path:
        import hashlib  # here: OpenSSL costs a dispatch without a unique key 2 ms

        return self.root / "unique" / (hashlib.sha256(key.encode()).hexdigest()[:40] + ".json")

    def _acquire_unique(self, job: Job) -> None:
        assert job.unique_key is not None
        path = self._unique_path(job.unique_key)
        now = time.time()
        expires = now + job.unique_ttl if job.unique_ttl else None
        record = json.dumps({"key": job.unique_key, "job_id": job.id, "created_at": now,
                             "expires_at": expires}).encode()
        # The record is written in full under a temp name and then link()ed into place: a
        # reader never sees a half-written holder (which it would take for a stale one).
        tmp = self.root / "tmp" / f"unique-{job.id}.tmp"
        try:
            write_new(tmp, record)
        except OSError as exc:
            raise DispatchFailed(f"Could not record unique key in {tmp}: {exc.strerror}.") from None
        try:
            for _ in range(5):
                try:
                    os.link(tmp, path)
                    return
                except FileExistsError:
                    pass
                except OSError as exc:
                    raise DispatchFailed(f"Could not record unique key in {path}: {exc.strerror}.") from None
                holder = read_json(path)
                if holder is not None and self._unique_live(holder, now):
                    raise DuplicateJob(job.unique_key, str(holder.get("job_id")))
                with self._global_lock("unique"):
                    if read_json(path) == holder:
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(path)
            raise DispatchFailed(f"Could not take unique key {job.unique_key!r}: it keeps changing hands.")
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def _unique_live(self, holder: dict, now: float) -> bool:
        expires = holder.get("expires_at")
        if isinstance(expires, int | float) and expires <= now:
            return False
        job_id = holder.get("job_id")
        info = self.find(job_id) if isinstance(job_id, str) and valid_id(job_id) else None
        if info is None:
            created = holder.get("created_at")
            return isinstance(created, int | float) and now - created < UNIQUE_INFLIGHT
        return info.state in (State.PENDING, State.DELAYED, State.RESERVED)

    def _free_unique(self, job: Job) -> None:
        if job.unique_key is None:
            return
        path = self._unique_path(job.unique_key)
        holder = read_json(path)
        if holder is not None and holder.get("job_id") == job.id:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    @contextlib.contextmanager
    def _global_lock(self, name: str) -> Iterator[None]:
        fd = os.open(self.root / f".{name}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # -- claiming -------------------------------------------------------------------------

    def _watch(self, queues: Sequence[str]) -> None:
        if self._inotify_failed or self._watched.issuperset(queues):
            return
        try:
            if self._inotify is None:
                self._inotify = _linux.Inotify()
            for name in queues:
                if name not in self._watched:
                    q = self._queue(name)
                    self._inotify.watch(q.pending, name)
                    self._watched.add(name)
                    q.listing.dirty = True
        except OSError:
            self._inotify_failed = True
            self._watched.clear()
            if self._inotify is not None:
                self._inotify.close()
                self._inotify = None

    def _refresh(self) -> None:
        """Bring the cached listings up to date with what inotify reported: new names are
        merged in; an overflow, an odd name or a lost watch calls for a full relisting."""
        if self._inotify is None:
            for q in self._queues.values():
                q.listing.dirty = True
            return
        changed = self._inotify.drain()
        if changed is None:
            for q in self._queues.values():
                q.listing.dirty = True
            return
        for name, names in changed.items():
            changed_q = self._queues.get(name)
            if _linux.IGNORED in names:  # its directory was removed: set it up afresh
                self._watched.discard(name)
                self._forget_queue(name)
            elif changed_q is not None and not merge_names(changed_q.listing, names):
                changed_q.listing.dirty = True

    def _relist(self, q: _Queue) -> _Queue:
        """List ``q``'s pending directory into its cache (quarantining names that are not
        jobs'); returns the queue, set up afresh if its directory was replaced."""
        try:
            if os.stat(q.pending).st_ino != os.fstat(q.pfd).st_ino:
                raise FileNotFoundError
        except FileNotFoundError:
            self._forget_queue(q.name)
            q = self._queue(q.name)
        names = os.listdir(q.pending)
        good = valid_pending(names)
        if len(good) != len(names):
            valid = set(good)
            for n in names:
                if n not in valid and not n.startswith("."):
                    self._quarantine(q.pending, n, "unexpected file name in pending/")
        q.listing.reset(good)
        return q

    def claim(self, queues: Sequence[str], worker: str, timeout: float) -> Claim | None:
        self._watch(queues)
        self._refresh()
        now = time.time()
        now_key = key_str(micros(now))
        for name in queues:
            q = self._queues.get(name) or self._queue(name)
            if os.path.exists(q.paused):
                continue
            relisted = False
            while True:
                listing = q.listing
                entry = listing.next_due(now_key)
                if entry is None:
                    if relisted or not listing.dirty:
                        break
                    q = self._relist(q)
                    relisted = True
                    continue
                claim = self._claim_one(q, entry[0], worker, timeout, now)
                if claim is _TAKEN:
                    if entry[1]:  # lost the head to another worker: spread out
                        listing.skip(now_key)
                elif isinstance(claim, Claim):
                    return claim
        return None

    def next_due(self, queues: Sequence[str]) -> float | None:
        """When the earliest delayed job among ``queues`` becomes due (from cached listings)."""
        keys = [k for k in (self._queues[q].listing.first_key() for q in queues if q in self._queues)
                if k is not None]
        return min(keys) / 1_000_000 if keys else None

    def _claim_one(self, q: _Queue, name: str, worker: str, timeout: float, now: float) -> Claim | object | None:
        """Claim the pending file ``name``: open and lock it, then rename it to reserved/ with
        the attempt counted. ``_TAKEN`` if another claimer got it first, None if refused."""
        pfd = q.fds[0]
        try:
            fd = os.open(name, _O_READ, dir_fd=pfd)
        except FileNotFoundError:
            return _TAKEN
        except OSError as exc:
            self._quarantine(q.pending, name, open_error(exc))
            return None
        st = os.fstat(fd)
        if st.st_nlink == 2 and self._drop_crash_twin(name, st):
            st = os.fstat(fd)
        reason = self._refusal(st)
        if reason:
            os.close(fd)
            self._quarantine(q.pending, name, reason)
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return _TAKEN
        job_id, attempts = split_pending(name)
        attempt = attempts + 1
        reserved = reserved_name(job_id, attempt)
        try:
            os.rename(name, reserved, src_dir_fd=pfd, dst_dir_fd=q.fds[1])
        except FileNotFoundError:
            os.close(fd)
            return _TAKEN
        try:
            job = decode_job(read_whole(fd, st.st_size))
            if job.id != job_id or job.queue != q.name:
                raise CorruptJob("file name does not match its contents")
        except CorruptJob as exc:
            self._quarantine(q.reserved, reserved, str(exc))
            os.close(fd)
            return None
        effective = job.timeout if job.timeout is not None else timeout
        deadline = now + effective + KILL_GRACE
        try:
            os.write(fd, Event("claimed", attempt, now, worker=worker, deadline=deadline).to_json())
        except OSError:
            # With flock the event is history only (the rename counted the attempt), so a full
            # disk must not make an existing job unclaimable. A lease lives in this event.
            if self.lock_mode == "lease":
                os.close(fd)
                raise
        return Claim(job, attempt, now, deadline, None, [fd], (fd, q, reserved), f"{q.name}/{reserved}")

    def adopt(self, ref: str) -> Claim | None:
        queue, _, name = ref.partition("/")
        m = RESERVED_RE.match(name)
        if m is None or not _safe_queue(queue):
            raise UsageError(f"Invalid claim reference {ref!r}.")
        q = self._queue(queue)
        fd = self._open_job(q.reserved, name)
        if fd is None:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.stat(name, dir_fd=q.fds[1]).st_ino != os.fstat(fd).st_ino:
                raise FileNotFoundError(name)
            job, events = decode_file(read_whole(fd))
        except (OSError, CorruptJob):
            os.close(fd)
            return None
        attempt = int(m.group(2))
        claimed = [e for e in events if e.event == "claimed" and e.attempt == attempt]
        at = claimed[-1].at if claimed else time.time()
        deadline = claimed[-1].deadline if claimed and claimed[-1].deadline else at
        return Claim(job, attempt, at, deadline, None, [fd], (fd, q, name), ref)

    def _drop_crash_twin(self, name: str, st: os.stat_result) -> bool:
        """Unlink the temp-file name of pending job ``name`` if it survived a crash.

        A dispatch fsyncs pending/ after its rename, not tmp/; on a filesystem without a
        journal a crash can keep the temp name too, and fsck then counts two links. That
        second link is ours and harmless; any other hard link still gets the file refused.
        """
        try:
            tmp = split_pending(name)[0] + ".tmp"
            tfd = self._dirfd(self._tmp)
            twin = os.stat(tmp, dir_fd=tfd, follow_symlinks=False)
            if (twin.st_ino, twin.st_dev) != (st.st_ino, st.st_dev):
                return False
            os.unlink(tmp, dir_fd=tfd)
        except (OSError, ValueError):
            return False
        return True

    def _refusal(self, st: os.stat_result) -> str | None:
        """Why a file with status ``st`` is not a job file forge will read, or None."""
        if not stat.S_ISREG(st.st_mode):
            return "not a regular file"
        if st.st_uid != self.uid:
            return f"owned by uid {st.st_uid}, not {self.uid}"
        if st.st_nlink != 1:
            return f"has {st.st_nlink} hard links"
        if st.st_size > MAX_FILE_BYTES:
            return f"{st.st_size} bytes, over the {MAX_FILE_BYTES}-byte cap"
        return None

    def _open_job(self, directory: str, name: str) -> int | None:
        """Open a job file safely, or quarantine it with the reason; None if gone or refused."""
        try:
            fd = os.open(f"{directory}/{name}", _O_READ)
        except FileNotFoundError:
            return None
        except OSError as exc:
            self._quarantine(directory, name, open_error(exc))
            return None
        reason = self._refusal(os.fstat(fd))
        if reason:
            os.close(fd)
            self._quarantine(directory, name, reason)
            return None
        return fd

    def _quarantine(self, directory: str, name: str, reason: str) -> None:
        path = f"{directory}/{name}"
        queue = os.path.basename(os.path.dirname(directory))
        dest = f"{self._root}/quarantine/{time.time_ns()}-{queue}-{name}"
        try:
            os.rename(path, dest)
        except OSError:
            return
        with contextlib.suppress(OSError):
            write_new(dest + ".reason", f"{path}: {reason}\n".encode())
        warnings.warn(f"Quarantined {name} ({reason}); see {dest}.", stacklevel=2)

    # -- outcomes -------------------------------------------------------------------------

    def heartbeat(self, claim: Claim) -> bool:
        return True

    def _finish(self, claim: Claim, event: Event | None, state: str | None, dest: str = "") -> None:
        """Record ``event`` in the claimed file, then move it to ``state``/``dest`` (or delete
        it when ``state`` is None), and let go of it."""
        fd, q, reserved = claim.handle
        try:
            if event is not None:
                os.write(fd, event.to_json())
            if state is None:
                os.unlink(reserved, dir_fd=q.fds[1])
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f"{self._root}/logs/{claim.job.id}.log")
            else:
                os.rename(reserved, dest, src_dir_fd=q.fds[1], dst_dir_fd=q.dir_fd(state))
        finally:
            os.close(fd)
            claim.fds.clear()

    def ack(self, claim: Claim, event: Event) -> None:
        if self.done_retention > 0:
            self._finish(claim, event, "done", pending_name(micros(time.time()), claim.job.id, claim.attempt))
        else:
            self._finish(claim, event, None)
        if claim.job.unique_key is not None:
            self._free_unique(claim.job)

    def release(self, claim: Claim, event: Event | None, delay: float) -> None:
        attempts = claim.attempt if event is not None else claim.attempt - 1
        key = self._key(time.time() + delay)
        self._finish(claim, event, "pending", pending_name(key, claim.job.id, attempts))

    def fail(self, claim: Claim, event: Event) -> None:
        self._finish(claim, event, "failed", pending_name(micros(time.time()), claim.job.id, claim.attempt))
        if claim.job.unique_key is not None:
            self._free_unique(claim.job)

    def wait(self, queues: Sequence[str], timeout: float) -> None:
        self._watch(queues)
        if timeout <= 0:
            return
        if self._inotify is None:
            time.sleep(timeout)
            return
        with contextlib.suppress(InterruptedError):
            select.select([self._inotify], [], [], timeout)

    # -- maintenance ----------------------------------------------------------------------

    def maintain(self, default_tries: int = 1) -> dict[str, int]:
        counts = {"recovered": 0, "abandoned": 0, "pruned": 0, "temp_removed": 0}
        now = time.time()
        for q in self.queues():
            for name in self._names(q, "reserved"):
                outcome = self._recover(q, name, now, default_tries)
                if outcome:
                    counts[outcome] += 1
        if self.done_retention >= 0:
            counts["pruned"] = self.prune_done(older_than=self.done_retention)
        with os.scandir(self._tmp) as it:
            for entry in it:
                with contextlib.suppress(OSError):
                    if now - entry.stat(follow_symlinks=False).st_mtime > TMP_MAX_AGE:
                        os.unlink(entry.path)
                        counts["temp_removed"] += 1
        return counts

    def _recover(self, queue: str, name: str, now: float, default_tries: int) -> str | None:
        q = self._queue(queue)
        m = RESERVED_RE.match(name)
        if m is None:
            self._quarantine(q.reserved, name, "unexpected file name in reserved/")
            return None
        fd = self._open_job(q.reserved, name)
        if fd is None:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:
            locked = False
        try:
            if os.stat(name, dir_fd=q.fds[1]).st_ino != os.fstat(fd).st_ino:
                os.close(fd)
                return None
            job, events = decode_file(read_whole(fd))
        except (OSError, CorruptJob) as exc:
            os.close(fd)
            if isinstance(exc, CorruptJob):
                self._quarantine(q.reserved, name, str(exc))
            return None
        attempt = int(m.group(2))
        if self.lock_mode == "lease":
            claimed = [e for e in events if e.event == "claimed" and e.attempt == attempt]
            deadline = claimed[-1].deadline if claimed else None
            expired = deadline is None or deadline + LEASE_MARGIN < now
            if not expired:
                os.close(fd)
                return None
        elif not locked:
            os.close(fd)
            return None
        claim = Claim(job, attempt, now, now, None, [fd], (fd, q, name))
        exhausted = attempt >= (job.max_attempts or default_tries)
        event = Event("failed" if exhausted else "released", attempt, now,
                      reason=Reason.ABANDONED, error="the worker died during this attempt")
        if exhausted:
            self.fail(claim, event)
            return "abandoned"
        self.release(claim, event, backoff_delay(job.backoff, attempt))
        return "recovered"

    # -- pause, resume, restart -----------------------------------------------------------

    def pause(self, queue: str) -> None:
        Path(self._queue(queue).paused).touch(mode=0o600)

    def resume(self, queue: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{self._qdir(queue)}/paused")

    def paused(self) -> set[str]:
        return {q for q in self.queues() if os.path.exists(self.root / "q" / q / "paused")}

    def request_restart(self) -> float:
        now = time.time()
        tmp = self.root / "tmp" / f"restart-{os.getpid()}-{time.monotonic_ns()}.tmp"
        write_new(tmp, repr(now).encode(), sync=True)
        os.rename(tmp, self.root / "restart")
        _linux.fsync_dir(self.root)
        return now

    def restart_requested_at(self) -> float | None:
        try:
            return float((self.root / "restart").read_text())
        except (OSError, ValueError):
            return None

    # -- logs -----------------------------------------------------------------------------

    def append_log(self, job_id: str, data: bytes) -> None:
        if not valid_id(job_id) or not data:
            return
        path = self.root / "logs" / f"{job_id}.log"
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            room = LOG_CAP - os.fstat(fd).st_size
            if room > 0:
                os.write(fd, data[:room])
        finally:
            os.close(fd)

    def read_log(self, job_id: str, offset: int = 0) -> bytes:
        if not valid_id(job_id):
            raise UsageError(f"Invalid job id {job_id!r}.")
        try:
            fd = os.open(self.root / "logs" / f"{job_id}.log", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return b""
        try:
            return os.pread(fd, LOG_CAP, offset)
        finally:
            os.close(fd)

    def close(self) -> None:
        self._drop_dirfds()
        if self._inotify is not None:
            self._inotify.close()
            self._inotify = None


def _safe_queue(name: str) -> bool:
    try:
        validate_queue_name(name)
        return True
    except UsageError:
        return False
