"""Writing jobs into the file backend (``Store``): ``push`` (a job's file written, made durable
and renamed into pending/), idempotency keys (``idempotency``) and unique keys.

A dispatch makes its jobs durable before any of them becomes visible: temp files in tmp/,
then an fsync (one job) or one ``syncfs`` (a batch), then the idempotency keys' links and an
fsync of idem/ (jobs with a key only), then the renames, then an fsync of each pending
directory. Unique keys are small holder files in unique/, taken with ``link`` so that exactly
one dispatch wins.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from forge import _linux
from forge.backends.file.fsio import (
    O_NEW,
    UNIQUE_INFLIGHT,
    first_unwritable,
    read_json,
    unusable,
    write_new,
)
from forge.backends.file.idempotency import IDEM_DIR
from forge.backends.file.idempotency import marker as idem_marker
from forge.backends.file.idempotency import taken as idem_taken
from forge.backends.file.layout import FileLayout, pending_name
from forge.errors import DispatchFailed, DuplicateJob, QueueError, QueueUnavailable, UsageError
from forge.job import MAX_PAYLOAD_BYTES, Job, JobInfo, State, is_idempotent_id, valid_id


class Store:
    """Dispatch and unique keys of a job-file directory (``FileLayout``).

    ``find`` looks a job up by id in any state (the backend's ``find``): a unique key is held
    only while the job that holds it is live.
    """

    def __init__(self, lay: FileLayout, find: Callable[[str], JobInfo | None]) -> None:
        self.lay = lay
        self._find = find

    # -- dispatch -------------------------------------------------------------------------

    def push(self, jobs: Sequence[Job]) -> list[bool]:
        """``QueueStore.push``: store the jobs durably (see the module docstring for the order of
        writes); per job, whether this call stored it."""
        if not jobs:
            return []
        for job in jobs:
            blob = job.to_json()
            if len(blob) > MAX_PAYLOAD_BYTES:
                raise UsageError(f"Job {job.id} is {len(blob)} bytes, over the {MAX_PAYLOAD_BYTES}-byte cap.")
        for name in {job.queue for job in jobs}:
            self.lay.queue(name)
        if not any(is_idempotent_id(job.id) for job in jobs):
            self._store(jobs)
            return [True] * len(jobs)
        try:
            with self.lay.global_lock("idem"):  # see idempotency: checking a key and taking it are one step
                mfd, tfd = self.lay.dirfd(f"{self.lay.path}/{IDEM_DIR}"), self.lay.dirfd(self.lay.tmp)
                seen: set[str] = set()
                stored = []
                for job in jobs:
                    keyed = is_idempotent_id(job.id)
                    stored.append(not keyed or (job.id not in seen and not idem_taken(mfd, tfd, job.id)))
                    seen.add(job.id)
                self._store([job for job, new in zip(jobs, stored, strict=True) if new])
        except OSError as exc:  # the lock or a key could not be read (_store raises queue errors)
            raise self._dispatch_failed(exc) from None
        return stored

    def _store(self, jobs: Sequence[Job]) -> None:
        """Take the jobs' unique keys, then write the jobs (see ``_write_jobs_once``)."""
        if not jobs:
            return
        held: list[Job] = []
        try:
            for job in jobs:
                if job.unique_key is not None:
                    self._take_unique(job)
                    held.append(job)
            self._write_jobs(jobs, [job.to_json() for job in jobs])
        except BaseException:
            for job in held:
                self.free_unique(job)
            raise

    def _write_jobs(self, jobs: Sequence[Job], blobs: list[bytes]) -> None:
        try:
            self._write_jobs_once(jobs, blobs)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise self._dispatch_failed(exc) from None
            self.lay.drop_dirfds()  # the queue directory was removed or replaced: start afresh
            try:
                self.lay.prepare_root()
                for name in {job.queue for job in jobs}:
                    self.lay.queue(name)
            except QueueUnavailable:
                raise self._dispatch_failed(exc) from None
            try:
                self._write_jobs_once(jobs, blobs)
            except OSError as exc2:
                raise self._dispatch_failed(exc2) from None

    def _dispatch_failed(self, exc: OSError) -> QueueError:
        """The error for a failed write: ``DispatchFailed`` (a full disk, an I/O error), or
        ``QueueUnavailable`` (exit code 6) naming the directory when it may not be written
        (permissions, a read-only disk)."""
        where = exc.filename or self.lay.root
        if exc.filename and not os.path.isabs(str(exc.filename)):
            where = self.lay.root / "tmp" / str(exc.filename)
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            err = unusable(exc, str(where if os.path.isdir(where) else os.path.dirname(where)), "store jobs in")
            err.hint = f"{err.hint} Nothing was queued."
            return err
        return DispatchFailed(
            f"Could not store the job in {where}: {exc.strerror or exc}.",
            hint="Free disk space or fix the queue directory's permissions; nothing was queued.",
        )

    def _write_jobs_once(self, jobs: Sequence[Job], blobs: list[bytes]) -> None:
        """Write temp files, make them durable, rename them into pending/, fsync the dirs.

        One job: fsync the file. A batch: one ``syncfs`` makes every temp file durable at once
        (instead of an fsync each) before any of them is renamed into view. A job with an
        idempotency key gets its key's link in idem/ before that (``idempotency``), made durable
        first, so no crash leaves a visible job without its key.

        A batch's cost is mostly the kernel creating the temp files. On ext4 without a journal
        that cost jumps ~10x for a few minutes after many files of the same block group were
        deleted (a prune, a clear): the inode allocator skips every inode freed in the last
        60 s (360 s while its inode-table block is dirty), looking each one up, for each new
        inode. No user-space order of calls avoids that; ``bench/queue_core.py`` measures it
        beside the raw rate. ``O_TMPFILE`` + ``linkat`` was measured at ~13% faster (raw batch) in the
        usual case but not used: without a journal the link count it sets needs a second
        syncfs, and a crash before the link leaks inodes nothing in forge can find and remove.
        """
        tfd = self.lay.dirfd(self.lay.tmp)
        temps: list[str] = []
        moved: list[tuple[str, int]] = []
        keys: list[str] = []
        single = len(jobs) == 1
        open_, write, close, rename = os.open, os.write, os.close, os.rename
        try:
            for job, blob in zip(jobs, blobs, strict=True):
                tmp = job.id + ".tmp"
                fd = open_(tmp, O_NEW, 0o600, dir_fd=tfd)
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
            keyed = [(job, tmp) for job, tmp in zip(jobs, temps, strict=True) if is_idempotent_id(job.id)]
            if keyed:  # the keys, durable before any job is visible (see idempotency)
                mfd = self.lay.dirfd(f"{self.lay.path}/{IDEM_DIR}")
                for job, tmp in keyed:
                    os.link(tmp, idem_marker(job.id), src_dir_fd=tfd, dst_dir_fd=mfd, follow_symlinks=False)
                    keys.append(idem_marker(job.id))
                os.fsync(mfd)
            dirs: dict[int, None] = {}
            queues = self.lay.open_queues
            for job, tmp in zip(jobs, temps, strict=True):
                pfd = queues[job.queue].pfd
                dest = pending_name(self.lay.key(job.available_at), job.id, 0)
                try:
                    rename(tmp, dest, src_dir_fd=tfd, dst_dir_fd=pfd)
                except OSError as exc:  # name the directory at fault, not the temp file
                    exc.filename = first_unwritable(queues[job.queue].pending, self.lay.tmp)
                    raise
                moved.append((dest, pfd))
                dirs[pfd] = None
            if any(j.unique_key for j in jobs):
                dirs[self.lay.dirfd(f"{self.lay.path}/unique")] = None
            for dfd in dirs:
                os.fsync(dfd)
        except OSError:
            for tmp in temps[len(moved):]:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=tfd)
            for dest, pfd in moved:
                with contextlib.suppress(OSError):
                    os.unlink(dest, dir_fd=pfd)
            for name in keys:  # after the job's own names: a key never outlives its job's file
                with contextlib.suppress(OSError):
                    os.unlink(name, dir_fd=self.lay.dirfd(f"{self.lay.path}/{IDEM_DIR}"))
            raise

    # -- unique keys ----------------------------------------------------------------------

    def unique_path(self, key: str) -> Path:
        """The holder file of unique key ``key`` (named by a hash of it)."""
        import hashlib  # here: OpenSSL costs a dispatch without a unique key 2 ms

        return self.lay.root / "unique" / (hashlib.sha256(key.encode()).hexdigest()[:40] + ".json")

    def retake_unique(self, job: Job) -> None:
        """Take the unique key of a failed ``job`` that is being retried; DuplicateJob if
        another live job holds it. The caller holds the ``unique`` lock until the job is back
        in pending/, so no dispatch can judge the key dead in between."""
        self._take_unique(job, locked=True)

    def _take_unique(self, job: Job, *, locked: bool = False) -> None:
        """Take ``job``'s unique key (for a dispatch, or with ``locked`` for a retry whose
        caller holds the ``unique`` lock); DuplicateJob if a live job holds it. A holder found
        in place is judged, and removed if dead, under the ``unique`` lock (``_drop_dead_holder``);
        a dispatch looks first without the lock, so that a key held by a live job costs no lock.
        After five tries the key is said to keep changing hands (DispatchFailed)."""
        key = job.unique_key
        assert key is not None
        path = self.unique_path(key)
        with self._holder_record(job) as tmp:
            for _ in range(5):
                if self._link_holder(tmp, path):
                    return
                if not locked:
                    self._refuse_if_live(path, key)
                with contextlib.nullcontext() if locked else self.lay.global_lock("unique"):
                    self._drop_dead_holder(path, key)
            raise DispatchFailed(f"Could not take unique key {key!r}: it keeps changing hands.")

    @contextlib.contextmanager
    def _holder_record(self, job: Job) -> Iterator[Path]:
        """A temp file holding ``job``'s holder record, written in full so that it can be
        ``link()``ed into place: a reader never sees a half-written holder (which it would
        take for a stale one). The key's ttl counts from now."""
        now = time.time()
        expires = now + job.unique_ttl if job.unique_ttl else None
        record = json.dumps({"key": job.unique_key, "job_id": job.id, "created_at": now,
                             "expires_at": expires}).encode()
        tmp = self.lay.root / "tmp" / f"unique-{job.id}.tmp"
        try:
            write_new(tmp, record)
        except OSError as exc:
            raise DispatchFailed(f"Could not record unique key in {tmp}: {exc.strerror}.") from None
        try:
            yield tmp
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    @staticmethod
    def _link_holder(tmp: Path, path: Path) -> bool:
        """Put the holder record in place unless a holder is there already (False)."""
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except OSError as exc:
            raise DispatchFailed(f"Could not record unique key in {path}: {exc.strerror}.") from None

    def _drop_dead_holder(self, path: Path, key: str) -> None:
        """Remove the holder file at ``path`` if the job it names is no longer live (or its
        ttl has passed); DuplicateJob if it is. The caller holds the ``unique`` lock, which
        every removal of a holder file and every retry takes: a verdict of dead cannot turn
        stale before the unlink, and the file unlinked is the one judged."""
        self._refuse_if_live(path, key)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    def _refuse_if_live(self, path: Path, key: str) -> None:
        """DuplicateJob if the holder file at ``path`` names a live job (``_unique_live``)."""
        holder = read_json(path)
        if holder is not None and self._unique_live(holder, time.time()):
            raise DuplicateJob(key, str(holder.get("job_id")))

    def _unique_live(self, holder: dict[str, Any], now: float) -> bool:
        """Whether the job a holder record names is live (or its dispatch may be in flight)."""
        expires = holder.get("expires_at")
        if isinstance(expires, int | float) and expires <= now:
            return False
        job_id = holder.get("job_id")
        info = self._find(job_id) if isinstance(job_id, str) and valid_id(job_id) else None
        if info is None:
            created = holder.get("created_at")
            return isinstance(created, int | float) and now - created < UNIQUE_INFLIGHT
        return info.state in (State.PENDING, State.DELAYED, State.RESERVED)

    def free_unique(self, job: Job, *, locked: bool = False) -> None:
        """Give up ``job``'s unique key if it still holds it: compare and delete, under the
        ``unique`` lock (``locked``: the caller holds it). Without the lock a dispatch could
        take the key over between the compare and the unlink, and lose it to the unlink."""
        if job.unique_key is None:
            return
        path = self.unique_path(job.unique_key)
        with contextlib.nullcontext() if locked else self.lay.global_lock("unique"):
            holder = read_json(path)
            if holder is not None and holder.get("job_id") == job.id:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
