"""Claiming jobs from the file backend, as a mixin of ``FileBackend``: the cached pending
listings kept fresh by inotify, ``claim`` (open, ``flock``, rename to reserved/),
and the checks that refuse and quarantine any file that is not a job forge wrote.

See ``file``'s module docstring for why a lock taken before the rename makes a claim safe.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import time
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

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
    QueueDirs,
    key_str,
    merge_names,
    reserved_name,
    split_pending,
    valid_pending,
)
from forge.job import MAX_FILE_BYTES, CorruptJob, Event, Job, decode_job, is_idempotent_id

_TAKEN = object()  # _claim_one: another claimer got there first
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


class FileClaimer:
    """Claiming from a job-file directory (mixed into ``FileBackend``)."""

    _root: str
    _tmp: str
    uid: int
    lock_mode: str
    _queues: dict[str, QueueDirs]
    _inotify: _linux.Inotify | None
    _inotify_failed: bool
    _watched: set[str]

    if TYPE_CHECKING:  # provided by FileBackend and FileWriter
        def _queue(self, name: str) -> QueueDirs: ...
        def _forget_queue(self, name: str) -> None: ...
        def _dirfd(self, path: str) -> int: ...

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
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM):  # the directory, not inotify, is at fault
                raise unusable(exc, str(exc.filename or self._root), "watch") from None
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

    def _relist(self, q: QueueDirs) -> QueueDirs:
        """List ``q``'s pending directory into its cache (quarantining names that are not
        jobs'); returns the queue, set up afresh if its directory was replaced."""
        try:
            if os.stat(q.pending).st_ino != os.fstat(q.pfd).st_ino:
                raise FileNotFoundError
        except FileNotFoundError:
            self._forget_queue(q.name)
            q = self._queue(q.name)
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
            if marker_set(q.paused, self.uid):
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
                try:
                    claim = self._claim_one(q, entry[0], worker, timeout, now)
                except BaseException:
                    listing.dirty = True  # the name was taken off the listing: list it again
                    raise
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

    def _claim_one(self, q: QueueDirs, name: str, worker: str, timeout: float, now: float) -> Claim | object | None:
        """Claim the pending file ``name``: open and lock it, then rename it to reserved/ with
        the attempt counted. ``_TAKEN`` if another claimer got it first, None if refused."""
        pfd = q.fds[0]
        try:
            fd = os.open(name, O_READ, dir_fd=pfd)
        except FileNotFoundError:
            return _TAKEN
        except OSError as exc:
            if exc.errno not in FILE_ERRNOS:  # a read-only disk, I/O, no descriptors left
                raise unusable(exc, q.pending, "claim jobs from") from None
            self._quarantine(q.pending, name, open_error(exc))
            return None
        st = self._job_stat(fd, name)
        reason = self._refusal(st, self._links(name, st))
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
        except OSError as exc:
            os.close(fd)
            raise unusable(exc, first_unwritable(q.pending, q.reserved), "claim jobs from") from None
        try:
            job = claimable_job(read_whole(fd, st.st_size), job_id, q.name)
        except CorruptJob as exc:
            self._quarantine(q.reserved, reserved, str(exc))
            os.close(fd)
            return None
        effective = job.timeout if job.timeout is not None else timeout
        deadline = now + effective + KILL_GRACE
        try:
            os.write(fd, Event("claimed", attempt, now, worker=worker, deadline=deadline,
                               log_offset=self._log_size(job_id)).to_json())
        except OSError:
            # With flock the event is history only (the rename counted the attempt), so a full
            # disk must not make an existing job unclaimable. A lease lives in this event.
            if self.lock_mode == "lease":
                os.close(fd)
                raise
        if self.lock_mode == "lease":
            # The lease is the claim now. A worker that is stopped (or on a host whose locks
            # this one cannot see) must not keep the job from the worker that recovers it once
            # the lease lapses; the lock is taken again only to record the outcome.
            fcntl.flock(fd, fcntl.LOCK_UN)
        return Claim(job, attempt, now, deadline, None, (fd, q, reserved), f"{q.name}/{reserved}",
                     micros(now))

    def _log_size(self, job_id: str) -> int:
        """Where this attempt's output will start in the job's log (its size now, in bytes)."""
        try:
            return os.stat(f"{self._root}/logs/{job_id}.log").st_size
        except OSError:
            return 0

    def _job_stat(self, fd: int, name: str) -> os.stat_result:
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
            tfd = self._dirfd(self._tmp)
            twin = os.stat(tmp, dir_fd=tfd, follow_symlinks=False)
            if (twin.st_ino, twin.st_dev) == (st.st_ino, st.st_dev):
                os.unlink(tmp, dir_fd=tfd)
        except OSError:
            pass

    def _links(self, name: str, st: os.stat_result) -> int:
        """How many hard links job file ``name`` (status ``st``) may have: 2 if the second is
        its idempotency key's (``_fileidem``), else 1."""
        if st.st_nlink != 2:
            return 1
        m = PENDING_RE.match(name) or RESERVED_RE.match(name)
        if m is None:
            return 1
        job_id = m.group(2) if m.re is PENDING_RE else m.group(1)
        if not is_idempotent_id(job_id):
            return 1
        try:
            return 2 if is_key_link(self._dirfd(f"{self._root}/{IDEM_DIR}"), job_id, st) else 1
        except OSError:
            return 1

    def _refusal(self, st: os.stat_result, links: int = 1) -> str | None:
        """Why a file with status ``st`` is not a job file forge will read, or None."""
        reason = distrust(st, self.uid, links)
        if reason is None and st.st_size > MAX_FILE_BYTES:
            return f"{st.st_size} bytes, over the {MAX_FILE_BYTES}-byte cap"
        return reason

    def _open_job(self, directory: str, name: str) -> int | None:
        """Open a job file safely, or quarantine it with the reason; None if gone or refused."""
        try:
            fd = os.open(f"{directory}/{name}", O_READ)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno not in FILE_ERRNOS:
                raise unusable(exc, directory, "read jobs in") from None
            self._quarantine(directory, name, open_error(exc))
            return None
        st = self._job_stat(fd, name)
        reason = self._refusal(st, self._links(name, st))
        if reason:
            os.close(fd)
            self._quarantine(directory, name, reason)
            return None
        return fd

    def _quarantine(self, directory: str, name: str, reason: str, *, label: str | None = None) -> None:
        """Move ``name`` out of ``directory`` into quarantine/ (named after ``label``, by
        default the queue), with a ``.reason`` file. A file that cannot be moved is an error
        (``QueueUnavailable``): left in place, it would be refused again at every claim while
        the queue looked empty."""
        path = f"{directory}/{name}"
        label = label or os.path.basename(os.path.dirname(directory))
        quarantine = f"{self._root}/quarantine"
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
