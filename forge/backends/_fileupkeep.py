"""Keeping a job-file directory healthy, as a mixin of ``FileBackend``: ``maintain`` (jobs of
dead workers recovered or failed as abandoned, done jobs pruned, temp leftovers and the
idempotency keys of deleted jobs removed),
pause/resume and the restart marker, and the capped per-job output logs.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .. import _linux
from ..errors import UsageError
from ..job import CorruptJob, Event, Reason, backoff_delay, decode_file, valid_id
from ._fileidem import IDEM_DIR, SWEEP_EVERY
from ._fileidem import sweep as idem_sweep
from ._fileio import LOG_CAP, TMP_MAX_AGE, read_whole, write_new
from ._filenames import RESERVED_RE, QueueDirs
from .base import LEASE_MARGIN, Claim


class FileUpkeep:
    """Maintenance, markers and logs of a job-file directory (mixed into ``FileBackend``)."""

    root: Path
    _tmp: str
    lock_mode: str
    done_retention: float
    _swept_at: float

    if TYPE_CHECKING:  # provided by FileBackend, FileClaimer and FileAdmin
        def queues(self) -> list[str]: ...
        def _qdir(self, queue: str) -> str: ...
        def _queue(self, name: str) -> QueueDirs: ...
        def _names(self, queue: str, state: str) -> list[str]: ...
        def _open_job(self, directory: str, name: str) -> int | None: ...
        def _quarantine(self, directory: str, name: str, reason: str) -> None: ...
        def prune_done(self, *, older_than: float | None = None) -> int: ...
        def fail(self, claim: Claim, event: Event) -> None: ...
        def release(self, claim: Claim, event: Event | None, delay: float) -> None: ...
        def _global_lock(self, name: str, *, wait: bool = True) -> contextlib.AbstractContextManager[bool]: ...

    # -- maintenance ----------------------------------------------------------------------

    def maintain(self, default_tries: int = 1) -> dict[str, int]:
        counts = {"recovered": 0, "abandoned": 0, "pruned": 0, "temp_removed": 0, "keys_removed": 0}
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
        if now - self._swept_at > SWEEP_EVERY:
            with contextlib.suppress(OSError), self._global_lock("idem", wait=False) as locked:
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
