"""Keeping a job-file directory healthy, as a mixin of ``FileBackend``: ``maintain`` (the tree's
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
from pathlib import Path
from typing import TYPE_CHECKING

from forge import _linux
from forge.backends.base import LEASE_MARGIN, Claim
from forge.backends.file.fsio import (
    FILE_ERRNOS,
    O_PEEK,
    TMP_MAX_AGE,
    distrust,
    first_unwritable,
    marker_set,
    micros,
    open_error,
    read_whole,
    unusable,
    write_new,
)
from forge.backends.file.idempotency import IDEM_DIR, SWEEP_EVERY
from forge.backends.file.idempotency import sweep as idem_sweep
from forge.backends.file.layout import RESERVED_RE, QueueDirs, pending_name
from forge.backends.retention import LOG_CAP, keeps_done, prune_age
from forge.errors import QueueUnavailable, UsageError
from forge.job import CorruptJob, Event, Job, Reason, decode_file, valid_id


class FileUpkeep:
    """Maintenance, markers and logs of a job-file directory (mixed into ``FileBackend``)."""

    root: Path
    _root: str
    _tmp: str
    uid: int
    lock_mode: str
    done_retention: float
    _swept_at: float

    if TYPE_CHECKING:  # provided by FileBackend, FileClaimer, FileWriter and FileAdmin
        def _check_layout(self) -> None: ...
        def _finish(self, claim: Claim, event: Event | None, state: str | None, dest: str = "") -> None: ...
        def _free_unique(self, job: Job) -> None: ...
        def queues(self) -> list[str]: ...
        def _qdir(self, queue: str) -> str: ...
        def _forget_queue(self, name: str) -> None: ...
        def _queue(self, name: str) -> QueueDirs: ...
        def _names(self, queue: str, state: str) -> list[str]: ...
        def _open_job(self, directory: str, name: str) -> int | None: ...
        def _quarantine(self, directory: str, name: str, reason: str, *, label: str | None = None) -> None: ...
        def prune_done(self, *, older_than: float | None = None) -> int: ...
        def fail(self, claim: Claim, event: Event) -> None: ...
        def release(self, claim: Claim, event: Event | None, delay: float, *, counted: bool = True) -> None: ...
        def _global_lock(self, name: str, *, wait: bool = True) -> contextlib.AbstractContextManager[bool]: ...

    # -- maintenance ----------------------------------------------------------------------

    def maintain(self, default_tries: int = 1) -> dict[str, int]:
        counts = {"recovered": 0, "abandoned": 0, "completed": 0, "pruned": 0, "temp_removed": 0,
                  "keys_removed": 0}
        self._check_layout()
        now = time.time()
        try:
            for q in self.queues():
                for name in self._names(q, "reserved"):
                    outcome = self._recover(q, name, now, default_tries)
                    if outcome:
                        counts[outcome] += 1
            age = prune_age(self.done_retention)
            if age is not None:
                counts["pruned"] = self.prune_done(older_than=age)
            with os.scandir(self._tmp) as it:
                for entry in it:
                    with contextlib.suppress(OSError):
                        if now - entry.stat(follow_symlinks=False).st_mtime > TMP_MAX_AGE:
                            os.unlink(entry.path)
                            counts["temp_removed"] += 1
        except OSError as exc:  # a directory forge cannot write: not an empty queue
            where = str(exc.filename) if exc.filename and os.path.isabs(str(exc.filename)) else self._root
            raise unusable(exc, os.path.dirname(where) if os.path.isfile(where) else where, "maintain") from None
        if now - self._swept_at > SWEEP_EVERY:
            with contextlib.suppress(OSError, QueueUnavailable), self._global_lock("idem", wait=False) as locked:
                if locked:  # a dispatcher holds it: next time
                    self._swept_at = now
                    counts["keys_removed"] = idem_sweep(f"{self.root}/{IDEM_DIR}")
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
            if not expired or not locked:  # not locked: its worker is recording it right now
                os.close(fd)
                return None
        elif not locked:
            os.close(fd)
            return None
        claim = Claim(job, attempt, now, now, None, (fd, q, name))
        last = events[-1].event if events else None
        try:
            if last in ("done", "failed"):
                # Its outcome is recorded and only the move was lost (a crash between the two),
                # or someone else moved a finished job here: file it, never run it again.
                if last == "failed":
                    state: str | None = "failed"
                else:  # as ack: kept in done/ for the retention, or deleted at once
                    state = "done" if keeps_done(self.done_retention) else None
                self._finish(claim, None, state, pending_name(micros(now), job.id, attempt))
                self._free_unique(job)
                return "completed"
            from forge.retry.policy import recovery  # here: recovering is rare

            exhausted, delay = recovery(job, attempt, default_tries, now)
            event = Event("failed" if exhausted else "released", attempt, now,
                          reason=Reason.ABANDONED, error="the worker died during this attempt")
            if exhausted:
                self.fail(claim, event)
            else:
                self.release(claim, event, delay)
        except OSError as exc:
            raise unusable(exc, first_unwritable(q.reserved, q.pending, q.done, q.failed), "recover jobs in") from None
        hook = getattr(self, "on_recovered", None)  # forge.events: the worker's job events
        if hook is not None:
            hook(job, attempt, event)
        return "abandoned" if exhausted else "recovered"

    # -- pause, resume, restart -----------------------------------------------------------

    def pause(self, queue: str) -> None:
        q = self._queue(queue)
        fd, _ = self._open_private(q.path, "paused", os.O_WRONLY, label=queue)
        os.close(fd)

    def resume(self, queue: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{self._qdir(queue)}/paused")

    def forget_queue(self, queue: str) -> bool:
        """Remove an empty queue's directory (and its pause marker); False if it holds any job.
        Each state directory is removed with rmdir, which fails on a directory that is not
        empty, so a job pushed meanwhile is never lost: the queue then stays."""
        path = self._qdir(queue)
        self._forget_queue(queue)
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

    def paused(self) -> set[str]:
        return {q for q in self.queues() if marker_set(f"{self._qdir(q)}/paused", self.uid)}

    def request_restart(self) -> float:
        now = time.time()
        tmp = self.root / "tmp" / f"restart-{os.getpid()}-{time.monotonic_ns()}.tmp"
        write_new(tmp, repr(now).encode(), sync=True)
        os.rename(tmp, self.root / "restart")
        _linux.fsync_dir(self.root)
        return now

    def restart_requested_at(self) -> float | None:
        try:
            fd = os.open(f"{self._root}/restart", O_PEEK)
        except OSError:
            return None
        try:
            if distrust(os.fstat(fd), self.uid):
                return None  # planted by someone else: only ours counts (ours replaces it)
            return float(os.read(fd, 64))
        except (OSError, ValueError):
            return None
        finally:
            os.close(fd)

    # -- the worker registry and cancel requests -------------------------------------------

    def _put_small(self, directory: str, name: str, data: bytes) -> None:
        """Replace ``directory/name`` with ``data`` atomically: a new file in tmp/, renamed."""
        tmp = f"{self._tmp}/{directory}-{os.getpid()}-{time.monotonic_ns()}.tmp"
        write_new(tmp, data)
        try:
            os.rename(tmp, f"{self._root}/{directory}/{name}")
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
            if distrust(os.fstat(fd), self.uid):
                return None
            return os.read(fd, 65536)
        except OSError:
            return None
        finally:
            os.close(fd)

    def put_worker(self, name: str, record: bytes, ttl: float) -> None:
        self._put_small("workers", _safe_file(name), record)

    def drop_worker(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{self._root}/workers/{_safe_file(name)}")

    def worker_records(self) -> list[bytes]:
        folder = f"{self._root}/workers"
        try:
            names = sorted(os.listdir(folder))
        except FileNotFoundError:
            return []
        records = (self._read_small(f"{folder}/{n}") for n in names if n.endswith(".json"))
        return [r for r in records if r]

    def request_cancel(self, job_id: str) -> None:
        self._put_small("cancel", f"{job_id}.json", repr(time.time()).encode())

    def cancel_requested(self, job_id: str) -> bool:
        return self._read_small(f"{self._root}/cancel/{job_id}.json") is not None

    def clear_cancel(self, job_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{self._root}/cancel/{job_id}.json")

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
            found = distrust(st, self.uid)
            if found is None:
                return fd, st
            os.close(fd)
            reason = found
        self._quarantine(directory, name, reason, label=label)
        fd = os.open(path, flags | os.O_EXCL, 0o600)
        return fd, os.fstat(fd)

    def append_log(self, job_id: str, data: bytes) -> None:
        if not valid_id(job_id) or not data:
            return
        fd, st = self._open_private(f"{self._root}/logs", f"{job_id}.log", os.O_WRONLY | os.O_APPEND, label="logs")
        try:
            room = LOG_CAP - st.st_size
            if room > 0:
                os.write(fd, data[:room])
        finally:
            os.close(fd)

    def read_log(self, job_id: str, offset: int = 0) -> bytes:
        if not valid_id(job_id):
            raise UsageError(f"Invalid job id {job_id!r}.")
        logs, name = f"{self._root}/logs", f"{job_id}.log"
        try:
            fd = os.open(f"{logs}/{name}", O_PEEK)
        except FileNotFoundError:
            return b""
        except OSError as exc:
            if exc.errno not in FILE_ERRNOS:
                raise unusable(exc, logs, "read logs in") from None
            self._quarantine(logs, name, open_error(exc), label="logs")
            return b""
        try:
            reason = distrust(os.fstat(fd), self.uid)
            if reason is not None:  # never show what another user wrote as the job's output
                self._quarantine(logs, name, reason, label="logs")
                return b""
            return os.pread(fd, LOG_CAP, offset)
        finally:
            os.close(fd)


def _safe_file(name: str) -> str:
    """A worker's name (``host:pid``, or anything --name gave) as a file name of its own."""
    import base64

    return base64.urlsafe_b64encode(name.encode()).decode().rstrip("=") + ".json"
