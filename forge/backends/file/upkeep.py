"""Keeping a job-file directory healthy (``Upkeep``): ``maintain`` (the tree's
ownership and modes checked again, jobs of dead workers recovered or failed as abandoned, done
jobs pruned, temp leftovers and the idempotency keys of deleted jobs removed), pause/resume and
the restart marker, and the capped per-job output logs.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from typing import TYPE_CHECKING

from forge import _linux
from forge.backends.base import LEASE_MARGIN, Claim
from forge.backends.file.claim import Claimer, FileHandle, JobFiles
from forge.backends.file.fsio import (
    FILE_ERRNOS,
    O_PEEK,
    TMP_MAX_AGE,
    distrust,
    first_unwritable,
    micros,
    open_error,
    read_whole,
    unusable,
    write_new,
)
from forge.backends.file.idempotency import IDEM_DIR, SWEEP_EVERY
from forge.backends.file.idempotency import sweep as idem_sweep
from forge.backends.file.layout import RESERVED_RE, FileLayout, pending_name
from forge.backends.file.store import Store
from forge.backends.retention import LOG_CAP, keeps_done, prune_age
from forge.errors import CorruptJob, QueueUnavailable, UsageError
from forge.job import Event, Reason, decode_file, valid_id

if TYPE_CHECKING:
    from forge.backends.base import QueueOperations


class Upkeep:
    """Maintenance and recovery, pause/resume/restart markers, the worker registry, cancel
    requests and job logs of a job-file directory (``FileLayout``).

    ``backend`` is the ``FileBackend`` this serves: maintenance prunes through its
    ``prune_done`` and calls its ``on_recovered`` hook (``forge.events``), when one is set, for
    every job it recovers.
    """

    def __init__(self, lay: FileLayout, files: JobFiles, claimer: Claimer, store: Store,
                 backend: QueueOperations) -> None:
        self.lay = lay
        self.files = files
        self.claimer = claimer
        self.store = store
        self.backend = backend
        self._swept_at = 0.0  # the last sweep of idem/ in this process

    # -- maintenance ----------------------------------------------------------------------

    def maintain(self, default_tries: int = 1) -> dict[str, int]:
        """``QueueStore.maintain``: the tree checked again, every reserved file whose lock (or, in
        lease mode, lease) is free recovered, done jobs pruned (``retention.prune_age``), temp
        files older than ``TMP_MAX_AGE`` removed, and every ``SWEEP_EVERY`` seconds the keys of
        deleted idempotent jobs. ``QueueUnavailable`` if the tree cannot be written."""
        counts = {"recovered": 0, "abandoned": 0, "completed": 0, "pruned": 0, "temp_removed": 0,
                  "keys_removed": 0}
        self.lay.check()
        now = time.time()
        try:
            for q in self.lay.queues():
                for name in self.lay.names(q, "reserved"):
                    outcome = self._recover(q, name, now, default_tries)
                    if outcome:
                        counts[outcome] += 1
            age = prune_age(self.lay.done_retention)
            if age is not None:
                counts["pruned"] = self.backend.prune_done(older_than=age)
            with os.scandir(self.lay.tmp) as it:
                for entry in it:
                    with contextlib.suppress(OSError):
                        if now - entry.stat(follow_symlinks=False).st_mtime > TMP_MAX_AGE:
                            os.unlink(entry.path)
                            counts["temp_removed"] += 1
        except OSError as exc:  # a directory forge cannot write: not an empty queue
            where = str(exc.filename) if exc.filename and os.path.isabs(str(exc.filename)) else self.lay.path
            raise unusable(exc, os.path.dirname(where) if os.path.isfile(where) else where, "maintain") from None
        if now - self._swept_at > SWEEP_EVERY:
            with contextlib.suppress(OSError, QueueUnavailable), self.lay.global_lock("idem", wait=False) as locked:
                if locked:  # a dispatcher holds it: next time
                    self._swept_at = now
                    counts["keys_removed"] = idem_sweep(f"{self.lay.root}/{IDEM_DIR}")
        return counts

    def _recover(self, queue: str, name: str, now: float, default_tries: int) -> str | None:
        q = self.lay.queue(queue)
        m = RESERVED_RE.match(name)
        if m is None:
            self.files.quarantine(q.reserved, name, "unexpected file name in reserved/")
            return None
        fd = self.files.open_job(q.reserved, name)
        if fd is None:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:
            locked = False
        try:
            if os.stat(name, dir_fd=q.rfd).st_ino != os.fstat(fd).st_ino:
                os.close(fd)
                return None
            job, events = decode_file(read_whole(fd))
        except (OSError, CorruptJob) as exc:
            os.close(fd)
            if isinstance(exc, CorruptJob):
                self.files.quarantine(q.reserved, name, str(exc))
            return None
        attempt = int(m.group(2))
        if self.lay.lock_mode == "lease":
            claimed = [e for e in events if e.event == "claimed" and e.attempt == attempt]
            deadline = claimed[-1].deadline if claimed else None
            expired = deadline is None or deadline + LEASE_MARGIN < now
            if not expired or not locked:  # not locked: its worker is recording it right now
                os.close(fd)
                return None
        elif not locked:
            os.close(fd)
            return None
        claim = Claim(job, attempt, now, now, None, FileHandle(fd, q, name))
        last = events[-1].event if events else None
        try:
            if last in ("done", "failed"):
                # Its outcome is recorded and only the move was lost (a crash between the two),
                # or someone else moved a finished job here: file it, never run it again.
                if last == "failed":
                    state: str | None = "failed"
                else:  # as ack: kept in done/ for the retention, or deleted at once
                    state = "done" if keeps_done(self.lay.done_retention) else None
                self.claimer.finish(claim, None, state, pending_name(micros(now), job.id, attempt))
                self.store.free_unique(job)
                return "completed"
            from forge.retry.policy import recovery  # here: recovering is rare

            exhausted, delay = recovery(job, attempt, default_tries, now)
            event = Event("failed" if exhausted else "released", attempt, now,
                          reason=Reason.ABANDONED, error="the worker died during this attempt")
            if exhausted:
                self.claimer.fail(claim, event)
            else:
                self.claimer.release(claim, event, delay)
        except OSError as exc:
            raise unusable(exc, first_unwritable(q.reserved, q.pending, q.done, q.failed), "recover jobs in") from None
        hook = getattr(self.backend, "on_recovered", None)  # forge.events: the worker's job events
        if hook is not None:
            hook(job, attempt, event)
        return "abandoned" if exhausted else "recovered"

    # -- pause, resume, restart -----------------------------------------------------------

    def pause(self, queue: str) -> None:
        """``QueueOperations.pause``: the queue's ``paused`` marker is created (a planted one is
        quarantined first)."""
        q = self.lay.queue(queue)
        fd, _ = self._open_private(q.path, "paused", os.O_WRONLY, label=queue)
        os.close(fd)

    def resume(self, queue: str) -> None:
        """``QueueOperations.resume``: the queue's ``paused`` marker is removed."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{self.lay.qdir(queue)}/paused")

    def forget_queue(self, queue: str) -> bool:
        """Remove an empty queue's directory (and its pause marker); False if it holds any job.
        Each state directory is removed with rmdir, which fails on a directory that is not
        empty, so a job pushed meanwhile is never lost: the queue then stays."""
        path = self.lay.qdir(queue)
        self.lay.forget_queue(queue)
        if not os.path.isdir(path):
            return True
        try:
            for state in ("pending", "reserved", "failed", "done"):
                with contextlib.suppress(FileNotFoundError):
                    os.rmdir(f"{path}/{state}")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{path}/paused")
            for name in os.listdir(path):  # lock files and the like, never jobs
                if name.endswith(".lock"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(f"{path}/{name}")
            os.rmdir(path)
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                return False
            raise
        return True

    def request_restart(self) -> float:
        """``QueueOperations.request_restart``: the ``restart`` marker is replaced atomically and
        durably with the time."""
        now = time.time()
        tmp = self.lay.root / "tmp" / f"restart-{os.getpid()}-{time.monotonic_ns()}.tmp"
        write_new(tmp, repr(now).encode(), sync=True)
        os.rename(tmp, self.lay.root / "restart")
        _linux.fsync_dir(self.lay.root)
        return now

    def restart_requested_at(self) -> float | None:
        """``QueueStore.restart_requested_at``: read from the ``restart`` marker (one that is not
        ours counts for nothing)."""
        try:
            fd = os.open(f"{self.lay.path}/restart", O_PEEK)
        except OSError:
            return None
        try:
            if distrust(os.fstat(fd), self.lay.uid):
                return None  # planted by someone else: only ours counts (ours replaces it)
            return float(os.read(fd, 64))
        except (OSError, ValueError):
            return None
        finally:
            os.close(fd)

    # -- the worker registry and cancel requests -------------------------------------------

    def _put_small(self, directory: str, name: str, data: bytes) -> None:
        """Replace ``directory/name`` with ``data`` atomically: a new file in tmp/, renamed."""
        tmp = f"{self.lay.tmp}/{directory}-{os.getpid()}-{time.monotonic_ns()}.tmp"
        write_new(tmp, data)
        try:
            os.rename(tmp, f"{self.lay.path}/{directory}/{name}")
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def _read_small(self, path: str) -> bytes | None:
        """A small file of ours (a worker record, a cancel request); None if missing or not
        a regular file of ours that only we may write (a planted one counts for nothing)."""
        try:
            fd = os.open(path, O_PEEK)
        except OSError:
            return None
        try:
            if distrust(os.fstat(fd), self.lay.uid):
                return None
            return os.read(fd, 65536)
        except OSError:
            return None
        finally:
            os.close(fd)

    def put_worker(self, name: str, record: bytes, ttl: float) -> None:
        """``QueueOperations.put_worker``: ``workers/<name>`` replaced atomically."""
        self._put_small("workers", _safe_file(name), record)

    def drop_worker(self, name: str) -> None:
        """``QueueOperations.drop_worker``."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{self.lay.path}/workers/{_safe_file(name)}")

    def worker_records(self) -> list[bytes]:
        """``QueueOperations.worker_records``: the records in ``workers/`` that are ours, sorted by
        name."""
        folder = f"{self.lay.path}/workers"
        try:
            names = sorted(os.listdir(folder))
        except FileNotFoundError:
            return []
        records = (self._read_small(f"{folder}/{n}") for n in names if n.endswith(".json"))
        return [r for r in records if r]

    def request_cancel(self, job_id: str) -> None:
        """``QueueOperations.request_cancel``: ``cancel/<id>.json`` written atomically."""
        self._put_small("cancel", f"{job_id}.json", repr(time.time()).encode())

    def cancel_requested(self, job_id: str) -> bool:
        """``QueueStore.cancel_requested``: whether ``cancel/<id>.json`` is there and ours."""
        return self._read_small(f"{self.lay.path}/cancel/{job_id}.json") is not None

    def clear_cancel(self, job_id: str) -> None:
        """``QueueOperations.clear_cancel``."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{self.lay.path}/cancel/{job_id}.json")

    # -- logs (and the marker files, which open the same way) -----------------------------

    def _open_private(self, directory: str, name: str, flags: int, *, label: str) -> tuple[int, os.stat_result]:
        """Open the file ``name`` that forge keeps in ``directory`` (a log, a marker), creating
        it (0600), with its status. Whatever else is found under that name (planted by another
        user while the directory was open to others: her file, a symlink, a FIFO, a hard link)
        is quarantined and the file created afresh, exclusively."""
        path = f"{directory}/{name}"
        flags |= os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(path, flags, 0o600)
        except OSError as exc:
            if exc.errno not in FILE_ERRNOS:
                raise unusable(exc, directory, "write to") from None
            reason = open_error(exc)
        else:
            st = os.fstat(fd)
            found = distrust(st, self.lay.uid)
            if found is None:
                return fd, st
            os.close(fd)
            reason = found
        self.files.quarantine(directory, name, reason, label=label)
        fd = os.open(path, flags | os.O_EXCL, 0o600)
        return fd, os.fstat(fd)

    def append_log(self, job_id: str, data: bytes) -> None:
        """``QueueOperations.append_log``: appended to ``logs/<id>.log`` up to ``LOG_CAP`` bytes in
        all; nothing for an invalid id or no data."""
        if not valid_id(job_id) or not data:
            return
        fd, st = self._open_private(f"{self.lay.path}/logs", f"{job_id}.log", os.O_WRONLY | os.O_APPEND, label="logs")
        try:
            room = LOG_CAP - st.st_size
            if room > 0:
                os.write(fd, data[:room])
        finally:
            os.close(fd)

    def read_log(self, job_id: str, offset: int = 0) -> bytes:
        """``QueueOperations.read_log``: at most ``LOG_CAP`` bytes from ``offset``; a log that is
        not ours is quarantined and reads as empty. ``UsageError`` for an invalid id."""
        if not valid_id(job_id):
            raise UsageError(f"Invalid job id {job_id!r}.")
        logs, name = f"{self.lay.path}/logs", f"{job_id}.log"
        try:
            fd = os.open(f"{logs}/{name}", O_PEEK)
        except FileNotFoundError:
            return b""
        except OSError as exc:
            if exc.errno not in FILE_ERRNOS:
                raise unusable(exc, logs, "read logs in") from None
            self.files.quarantine(logs, name, open_error(exc), label="logs")
            return b""
        try:
            reason = distrust(os.fstat(fd), self.lay.uid)
            if reason is not None:  # never show what another user wrote as the job's output
                self.files.quarantine(logs, name, reason, label="logs")
                return b""
            return os.pread(fd, LOG_CAP, offset)
        finally:
            os.close(fd)


def _safe_file(name: str) -> str:
    """A worker's name (``host:pid``, or anything --name gave) as a file name of its own."""
    import base64

    return base64.urlsafe_b64encode(name.encode()).decode().rstrip("=") + ".json"
