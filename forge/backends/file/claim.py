"""Claiming jobs from the file backend and recording their outcomes (``Claimer``): the cached
pending listings kept fresh by inotify, ``claim`` (open, ``flock``, rename to reserved/), ack,
release and fail; and the checks that refuse and quarantine any file that is not a job forge
wrote (``JobFiles``), which every part that opens job files uses.

See ``file``'s module docstring for why a lock taken before the rename makes a claim safe.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import select
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from forge import _linux
from forge.backends.base import KILL_GRACE, Claim
from forge.backends.file.fsio import (
    FILE_ERRNOS,
    O_READ,
    distrust,
    first_unwritable,
    marker_set,
    micros,
    open_error,
    read_whole,
    unusable,
    write_new,
)
from forge.backends.file.idempotency import IDEM_DIR, is_key_link
from forge.backends.file.layout import (
    PENDING_RE,
    RESERVED_RE,
    FileLayout,
    QueueDirs,
    key_str,
    merge_names,
    pending_name,
    reserved_name,
    split_pending,
    valid_pending,
)
from forge.backends.file.store import Store
from forge.backends.retention import keeps_done
from forge.errors import CorruptJob
from forge.job import MAX_FILE_BYTES, Event, Job, decode_job, is_idempotent_id

#: ``Claimer.claim_one``: another claimer got there first.
TAKEN = object()
#: How a job file's last line starts when the job has finished (events are written with
#: their name first). forge never puts such a file in pending/: a retry adds "retried".
_FINISHED = (b'{"event":"done"', b'{"event":"failed"')


def finished_event(data: bytes) -> str | None:
    """"done" or "failed" if the job file ``data`` ends with that event, else None."""
    end = data.rstrip(b"\n")
    last = end[end.rfind(b"\n") + 1:]
    if not last.startswith(_FINISHED):
        return None
    try:
        event = json.loads(last).get("event")
    except (ValueError, AttributeError):
        return None
    return event if event in ("done", "failed") else None


def claimable_job(data: bytes, job_id: str, queue: str) -> Job:
    """The job in a pending file just taken (``data``, named for ``job_id`` in ``queue``);
    raises CorruptJob when it cannot run: unreadable, misnamed, or finished already."""
    job = decode_job(data)
    if job.id != job_id or job.queue != queue:
        raise CorruptJob("file name does not match its contents")
    last = finished_event(data)
    if last is not None:
        raise CorruptJob(f"the job has finished (its last event is {last}): something other"
                         " than forge moved it back into pending/")
    return job


@dataclass(slots=True)
class FileHandle:
    """The file backend's own state of a claim (``Claim.handle``): the claimed file's open
    descriptor (locked while the claim holds, in flock mode), its queue, and its name in
    reserved/. Closed once the outcome is recorded."""

    fd: int
    q: QueueDirs
    name: str


def handle_of(claim: Claim) -> FileHandle:
    """The file backend's handle of ``claim``; ``TypeError`` for another backend's claim."""
    h = claim.handle
    if not isinstance(h, FileHandle):
        raise TypeError(f"not a file backend's claim: {claim.ref or claim.job.id}")
    return h


class OpenJob(NamedTuple):
    """A job file opened and checked (``JobFiles.lock_pending``): its descriptor and status."""

    fd: int
    st: os.stat_result


class JobFiles:
    """Opening a job file safely, and refusing and quarantining what is not a job forge wrote
    (a symlink, another user's file, a file with an unexpected hard link, one over the cap)."""

    def __init__(self, lay: FileLayout) -> None:
        self.lay = lay

    def log_size(self, job_id: str) -> int:
        """Where this attempt's output will start in the job's log (its size now, in bytes)."""
        try:
            return os.stat(f"{self.lay.path}/logs/{job_id}.log").st_size
        except OSError:
            return 0

    def job_stat(self, fd: int, name: str) -> os.stat_result:
        """The status of the open job file ``name``, after dropping a crash twin (see below)."""
        st = os.fstat(fd)
        if st.st_nlink >= 2:
            self._drop_crash_twin(name, st)
            st = os.fstat(fd)  # again in any case: another claimer may have dropped it
        return st

    def _drop_crash_twin(self, name: str, st: os.stat_result) -> None:
        """Unlink the temp-file name of job file ``name`` if it survived a crash.

        A dispatch fsyncs pending/ after its rename, not tmp/ (that would be a third fsync per
        dispatch); on a filesystem without a journal a crash can keep the temp name as well,
        and fsck then counts two links, whichever state the job had reached (a worker claims
        within milliseconds). That second link is ours and harmless; any other hard link still
        gets the file refused.
        """
        m = PENDING_RE.match(name) or RESERVED_RE.match(name)
        if m is None:
            return
        job_id = m.group(2) if m.re is PENDING_RE else m.group(1)
        try:
            tmp = job_id + ".tmp"
            tfd = self.lay.dirfd(self.lay.tmp)
            twin = os.stat(tmp, dir_fd=tfd, follow_symlinks=False)
            if (twin.st_ino, twin.st_dev) == (st.st_ino, st.st_dev):
                os.unlink(tmp, dir_fd=tfd)
        except OSError:
            pass

    def links(self, name: str, st: os.stat_result) -> int:
        """How many hard links job file ``name`` (status ``st``) may have: 2 if the second is
        its idempotency key's (``idempotency``), else 1."""
        if st.st_nlink != 2:
            return 1
        m = PENDING_RE.match(name) or RESERVED_RE.match(name)
        if m is None:
            return 1
        job_id = m.group(2) if m.re is PENDING_RE else m.group(1)
        if not is_idempotent_id(job_id):
            return 1
        try:
            return 2 if is_key_link(self.lay.dirfd(f"{self.lay.path}/{IDEM_DIR}"), job_id, st) else 1
        except OSError:
            return 1

    def refusal(self, st: os.stat_result, links: int = 1) -> str | None:
        """Why a file with status ``st`` is not a job file forge will read, or None."""
        reason = distrust(st, self.lay.uid, links)
        if reason is None and st.st_size > MAX_FILE_BYTES:
            return f"{st.st_size} bytes, over the {MAX_FILE_BYTES}-byte cap"
        return reason

    def open_job(self, directory: str, name: str) -> int | None:
        """Open a job file safely, or quarantine it with the reason; None if gone or refused."""
        try:
            opened = self._open_checked(directory, name, None, "read jobs in")
        except FileNotFoundError:
            return None
        return None if opened is None else opened.fd

    def lock_pending(self, q: QueueDirs, name: str) -> OpenJob | object | None:
        """The first step of every claim: open ``q``'s pending file ``name`` as ``open_job``
        does (the same checks, the same quarantine) and lock it without waiting. The open and
        locked file; ``TAKEN`` if another claimer got there first (the file is gone, or
        locked); None if it was refused."""
        try:
            opened = self._open_checked(q.pending, name, q.pfd, "claim jobs from")
        except FileNotFoundError:
            return TAKEN
        if opened is None:
            return None
        try:
            fcntl.flock(opened.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(opened.fd)
            return TAKEN
        except BaseException:
            os.close(opened.fd)
            raise
        return opened

    def _open_checked(self, directory: str, name: str, dir_fd: int | None, doing: str) -> OpenJob | None:
        """Open job file ``name`` of ``directory`` (through ``dir_fd`` if given) with
        ``O_NOFOLLOW``, and check what was opened (``refusal``). A file that is refused, or
        that cannot be opened for a reason of its own (``FILE_ERRNOS``: a symlink, a FIFO,
        another user's file), is quarantined: None. ``FileNotFoundError`` if it is gone; any
        other error is the directory's (``QueueUnavailable``, saying what we were ``doing``)."""
        try:
            fd = os.open(name if dir_fd is not None else f"{directory}/{name}", O_READ, dir_fd=dir_fd)
        except FileNotFoundError:
            raise  # gone: the caller says what that means
        except OSError as exc:
            if exc.errno not in FILE_ERRNOS:  # a read-only disk, I/O, no descriptors left
                raise unusable(exc, directory, doing) from None
            self.quarantine(directory, name, open_error(exc))
            return None
        try:
            st = self.job_stat(fd, name)
            reason = self.refusal(st, self.links(name, st))
        except BaseException:
            os.close(fd)
            raise
        if reason:
            os.close(fd)
            self.quarantine(directory, name, reason)
            return None
        return OpenJob(fd, st)

    def quarantine(self, directory: str, name: str, reason: str, *, label: str | None = None) -> None:
        """Move ``name`` out of ``directory`` into quarantine/ (named after ``label``, by
        default the queue), with a ``.reason`` file. A file that cannot be moved is an error
        (``QueueUnavailable``): left in place, it would be refused again at every claim while
        the queue looked empty."""
        path = f"{directory}/{name}"
        label = label or os.path.basename(os.path.dirname(directory))
        quarantine = f"{self.lay.path}/quarantine"
        dest = f"{quarantine}/{time.time_ns()}-{label}-{name}"
        try:
            os.rename(path, dest)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise unusable(exc, first_unwritable(directory, quarantine), "quarantine a file from") from None
        with contextlib.suppress(OSError):
            write_new(dest + ".reason", f"{path}: {reason}\n".encode())
        warnings.warn(f"Quarantined {name} ({reason}); see {dest}.", stacklevel=2)


class Claimer:
    """Claiming from a job-file directory and recording outcomes (ack, release, fail).

    Keeps this process's inotify watch of the pending directories it claims from (``watch``,
    ``refresh``), the listings in ``QueueDirs.listing``. ``journal`` is told of every outcome
    once it is recorded (``forge.stats.journal.record_outcome``).
    """

    def __init__(self, lay: FileLayout, files: JobFiles, store: Store,
                 journal: Callable[[Claim, Event | None], None]) -> None:
        self.lay = lay
        self.files = files
        self.store = store
        self.journal = journal
        self.inotify: _linux.Inotify | None = None
        self.inotify_failed = False
        self.watched: set[str] = set()

    def watch(self, queues: Sequence[str]) -> None:
        """Watch ``queues``' pending directories with inotify (once each); without inotify,
        listings are relisted when they run dry. ``QueueUnavailable`` if a directory may not be
        watched."""
        if self.inotify_failed or self.watched.issuperset(queues):
            return
        try:
            if self.inotify is None:
                self.inotify = _linux.Inotify()
            for name in queues:
                if name not in self.watched:
                    q = self.lay.queue(name)
                    self.inotify.watch(q.pending, name)
                    self.watched.add(name)
                    q.listing.dirty = True
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM):  # the directory, not inotify, is at fault
                raise unusable(exc, str(exc.filename or self.lay.path), "watch") from None
            self.inotify_failed = True
            self.watched.clear()
            if self.inotify is not None:
                self.inotify.close()
                self.inotify = None

    def refresh(self) -> None:
        """Bring the cached listings up to date with what inotify reported: new names are
        merged in; an overflow, an odd name or a lost watch calls for a full relisting."""
        if self.inotify is None:
            for q in self.lay.open_queues.values():
                q.listing.dirty = True
            return
        changed = self.inotify.drain()
        if changed is None:
            for q in self.lay.open_queues.values():
                q.listing.dirty = True
            return
        for name, names in changed.items():
            changed_q = self.lay.open_queues.get(name)
            if _linux.IGNORED in names:  # its directory was removed: set it up afresh
                self.watched.discard(name)
                self.lay.forget_queue(name)
            elif changed_q is not None and not merge_names(changed_q.listing, names):
                changed_q.listing.dirty = True

    def relist(self, q: QueueDirs) -> QueueDirs:
        """List ``q``'s pending directory into its cache (quarantining names that are not
        jobs'); returns the queue, set up afresh if its directory was replaced."""
        try:
            if os.stat(q.pending).st_ino != os.fstat(q.pfd).st_ino:
                raise FileNotFoundError
        except FileNotFoundError:
            self.lay.forget_queue(q.name)
            q = self.lay.queue(q.name)
        except OSError as exc:
            raise unusable(exc, q.pending, "list") from None
        try:
            names = os.listdir(q.pfd)
        except OSError as exc:
            raise unusable(exc, q.pending, "list") from None
        good = valid_pending(names)
        if len(good) != len(names):
            valid = set(good)
            for n in names:
                if n not in valid and not n.startswith("."):
                    self.files.quarantine(q.pending, n, "unexpected file name in pending/")
        q.listing.reset(good)
        return q

    def claim(self, queues: Sequence[str], worker: str, timeout: float) -> Claim | None:
        """``QueueStore.claim``: from the cached listings, in the order of ``queues``; each due
        name is tried with ``claim_one`` until one is claimed."""
        self.watch(queues)
        self.refresh()
        now = time.time()
        now_key = key_str(micros(now))
        for name in queues:
            q = self.lay.open_queues.get(name) or self.lay.queue(name)
            if marker_set(q.paused, self.lay.uid):
                continue
            relisted = False
            while True:
                listing = q.listing
                entry = listing.next_due(now_key)
                if entry is None:
                    if relisted or not listing.dirty:
                        break
                    q = self.relist(q)
                    relisted = True
                    continue
                try:
                    claim = self.claim_one(q, entry[0], worker, timeout, now)
                except BaseException:
                    listing.dirty = True  # the name was taken off the listing: list it again
                    raise
                if claim is TAKEN:
                    if entry[1]:  # lost the head to another worker: spread out
                        listing.skip(now_key)
                elif isinstance(claim, Claim):
                    return claim
        return None

    def next_due(self, queues: Sequence[str]) -> float | None:
        """When the earliest delayed job among ``queues`` becomes due (from cached listings)."""
        keys = [k for k in (self.lay.open_queues[q].listing.first_key() for q in queues if q in self.lay.open_queues)
                if k is not None]
        return min(keys) / 1_000_000 if keys else None

    def claim_one(self, q: QueueDirs, name: str, worker: str, timeout: float, now: float) -> Claim | object | None:
        """Claim the pending file ``name``: open and lock it, then rename it to reserved/ with
        the attempt counted. ``TAKEN`` if another claimer got it first, None if refused."""
        opened = self.files.lock_pending(q, name)
        if not isinstance(opened, OpenJob):
            return opened
        fd, st = opened
        pfd = q.fds[0]
        job_id, attempts = split_pending(name)
        attempt = attempts + 1
        reserved = reserved_name(job_id, attempt)
        try:
            os.rename(name, reserved, src_dir_fd=pfd, dst_dir_fd=q.fds[1])
        except FileNotFoundError:
            os.close(fd)
            return TAKEN
        except OSError as exc:
            os.close(fd)
            raise unusable(exc, first_unwritable(q.pending, q.reserved), "claim jobs from") from None
        try:
            job = claimable_job(read_whole(fd, st.st_size), job_id, q.name)
        except CorruptJob as exc:
            self.files.quarantine(q.reserved, reserved, str(exc))
            os.close(fd)
            return None
        return self.begin(fd, st.st_size, q, reserved, job, attempt, worker, timeout, now)

    def begin(self, fd: int, size: int, q: QueueDirs, reserved: str, job: Job, attempt: int, worker: str,
              timeout: float, now: float) -> Claim:
        """Record the claim of the locked file just renamed to ``reserved``: its ``claimed``
        event, whole or not at all, and the Claim. The one step of a plain and a limited claim.

        With flock the event is history only (the rename counted the attempt), so a full disk
        must not make an existing job unclaimable: the claim goes on without it. With leases
        the lease lives in this event, so a claim whose event did not land is no claim: ``fd``
        is closed and the ``OSError`` raised (the file, leased to nobody, is recovered by the
        next maintenance pass), or another worker would recover the job while this one runs it.
        ``size`` is the file's size when it was locked: a torn event is cut back to it.
        """
        effective = job.timeout if job.timeout is not None else timeout
        deadline = now + effective + KILL_GRACE
        data = Event("claimed", attempt, now, worker=worker, deadline=deadline,
                     log_offset=self.files.log_size(job.id)).to_json()
        try:
            if os.write(fd, data) != len(data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"{q.reserved}/{reserved}")
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)  # no torn line for the next event to join
            if self.lay.lock_mode == "lease":
                os.close(fd)
                raise
        if self.lay.lock_mode == "lease":
            # The lease is the claim now. A worker that is stopped (or on a host whose locks
            # this one cannot see) must not keep the job from the worker that recovers it once
            # the lease lapses; the lock is taken again only to record the outcome.
            fcntl.flock(fd, fcntl.LOCK_UN)
        return Claim(job, attempt, now, deadline, None, FileHandle(fd, q, reserved), f"{q.name}/{reserved}",
                     micros(now))

    def wait(self, queues: Sequence[str], timeout: float) -> None:
        """``QueueStore.wait``: sleep until inotify reports a change in ``queues``' pending
        directories (or, without inotify, for ``timeout``)."""
        self.watch(queues)
        if timeout <= 0:
            return
        if self.inotify is None:
            time.sleep(timeout)
            return
        with contextlib.suppress(InterruptedError):
            select.select([self.inotify], [], [], timeout)

    def close(self) -> None:
        """Stop watching (close the inotify descriptor)."""
        if self.inotify is not None:
            self.inotify.close()
            self.inotify = None

    # -- outcomes -------------------------------------------------------------------------

    def finish(self, claim: Claim, event: Event | None, state: str | None, dest: str = "") -> None:
        """Record ``event`` in the claimed file, then move it to ``state``/``dest`` (or delete
        it when ``state`` is None), and let go of it.

        On an error (a full disk, EIO) the file is put back as it was and stays claimed (the
        lock is kept), so the caller can call again until it lands: nothing is recorded twice.
        ``FileNotFoundError`` if the file is no longer ours (recovered, or recorded already).
        """
        h = handle_of(claim)
        fd, q, reserved = h.fd, h.q, h.name
        size = os.fstat(fd).st_size
        try:
            if self.lay.lock_mode == "lease":
                self._still_ours(fd, q, reserved)
            if event is not None:
                data = event.to_json()
                if os.write(fd, data) != len(data):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"{q.reserved}/{reserved}")
            if state is None:
                os.unlink(reserved, dir_fd=q.rfd)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.lay.log_path(claim.job.id))
            else:
                os.rename(reserved, dest, src_dir_fd=q.rfd, dst_dir_fd=q.dir_fd(state))
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
        if os.stat(reserved, dir_fd=q.rfd).st_ino != os.fstat(fd).st_ino:
            raise FileNotFoundError(errno.ENOENT, "recovered by another worker", reserved)

    def ack(self, claim: Claim, event: Event) -> None:
        """``QueueStore.ack``: to done/ (or deleted, as the retention says), the key freed."""
        if keeps_done(self.lay.done_retention):
            self.finish(claim, event, "done", pending_name(micros(time.time()), claim.job.id, claim.attempt))
        else:
            self.finish(claim, event, None)
        if claim.job.unique_key is not None:
            self.store.free_unique(claim.job)
        self.journal(claim, event)

    def release(self, claim: Claim, event: Event | None, delay: float, *, counted: bool = True) -> None:
        """``QueueStore.release``: back to pending/, due in ``delay`` seconds."""
        attempts = claim.attempt if event is not None and counted else claim.attempt - 1
        key = self.lay.key(time.time() + delay)
        self.finish(claim, event, "pending", pending_name(key, claim.job.id, attempts))
        self.journal(claim, event)

    def fail(self, claim: Claim, event: Event) -> None:
        """``QueueStore.fail``: to failed/, the key freed."""
        self.finish(claim, event, "failed", pending_name(micros(time.time()), claim.job.id, claim.attempt))
        if claim.job.unique_key is not None:
            self.store.free_unique(claim.job)
        self.journal(claim, event)
