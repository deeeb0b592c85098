"""What a worker and its job process share: one page of memory and the job's output buffer.

:class:`SharedState` is the page: flags the worker sets (stop, pause), the count of jobs
finished, how much of the running job's output is copied, and the running job's record (under
a seqlock, so the worker never reads half of one). :class:`OutputBuffer` is the memfd behind
the job's fds 1 and 2, copied into the job's log by both processes under a record lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import mmap
import os
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import _linux

if TYPE_CHECKING:
    from .backends.base import Backend


class SharedState:
    """One page shared by the worker and its job process.

    Bytes 0-1: flags the worker sets (stop, pause). 8: jobs finished (both sides add).
    16: bytes of the running job's output already copied to its log (under ``lockf``).
    24: a sequence number, odd while the record at 32 (length, then JSON) is being written.
    """

    SIZE = 16384
    _Q = struct.Struct("=Q")
    _I = struct.Struct("=I")

    def __init__(self) -> None:
        self.mm = mmap.mmap(-1, self.SIZE)

    def flag(self, index: int) -> bool:
        return self.mm[index] != 0

    def set_flag(self, index: int, value: bool) -> None:
        self.mm[index] = 1 if value else 0

    def _get(self, offset: int) -> int:
        return self._Q.unpack_from(self.mm, offset)[0]

    def _put(self, offset: int, value: int) -> None:
        self._Q.pack_into(self.mm, offset, value)

    @property
    def jobs_done(self) -> int:
        return self._get(8)

    def add_job(self) -> int:
        self._put(8, self._get(8) + 1)
        return self._get(8)

    @property
    def copied(self) -> int:
        return self._get(16)

    @copied.setter
    def copied(self, value: int) -> None:
        self._put(16, value)

    def set_record(self, record: dict[str, Any] | None) -> None:
        data = json.dumps(record).encode() if record is not None else b""
        data = data[: self.SIZE - 40]
        seq = self._get(24)
        seq += seq & 1  # a writer killed mid-write left it odd: start again from even
        self._put(24, seq + 1)
        self._I.pack_into(self.mm, 32, len(data))
        self.mm[36 : 36 + len(data)] = data
        self._put(24, seq + 2)

    def record(self) -> dict[str, Any] | None:
        for _ in range(1000):
            seq = self._get(24)
            if seq % 2:
                continue
            n = self._I.unpack_from(self.mm, 32)[0]
            data = bytes(self.mm[36 : 36 + n])
            if self._get(24) == seq:
                return json.loads(data) if data else None
        return None


STOP, PAUSE = 0, 1


_KEEP = 64 * 1024
_PUNCH_FROM = 1024 * 1024
_CHUNK = 1024 * 1024


class OutputBuffer:
    """The memfd behind a job's fds 1 and 2, and its copying into the job's log.

    Both processes copy (the worker periodically while a job runs, the job process when it
    ends), each under a POSIX record lock so that no byte is copied twice.
    """

    def __init__(self, shared: SharedState) -> None:
        self.fd = os.memfd_create("forge-job-output")
        self.shared = shared
        self.punched: tuple[str, int] = ("", 0)  # the job whose output this process freed, up to where

    def flush_to_log(self, backend: Backend, job_id: str, *, reset: bool = False,
                     still_running: Callable[[], bool] | None = None) -> None:
        """Append output not yet copied to ``job_id``'s log; ``reset`` empties the buffer.

        ``still_running`` is checked under the lock: the worker copies only if the job it
        read is still the one running (the job process may have moved on to the next).
        """
        fcntl.lockf(self.fd, fcntl.LOCK_EX)
        try:
            if still_running is not None and not still_running():
                return
            size = os.fstat(self.fd).st_size
            done = self.shared.copied
            while done < size:  # in chunks: a job may print gigabytes between two copies
                data = os.pread(self.fd, min(size - done, _CHUNK), done)
                if not data:
                    break
                with contextlib.suppress(Exception):
                    backend.append_log(job_id, data)
                done += len(data)
            self.shared.copied = done
            if reset:
                os.ftruncate(self.fd, 0)
                os.lseek(self.fd, 0, os.SEEK_SET)
                self.shared.copied = 0
            elif done > _PUNCH_FROM:
                # A long job that prints a lot: give back the memory of what is copied, but the
                # last _KEEP bytes (the failure tail comes from there). The job still writes at
                # its offset; truncating instead would race with its writes.
                upto = (done - _KEEP) // 4096 * 4096
                if self.punched != (job_id, upto):
                    self.punched = (job_id, upto)
                    _linux.punch_hole(self.fd, 0, upto)
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN)

    def tail(self, chars: int) -> str:
        size = os.fstat(self.fd).st_size
        start = max(0, size - chars * 4)
        return os.pread(self.fd, size - start, start).decode("utf-8", "replace")[-chars:]

    def size(self) -> int:
        return os.fstat(self.fd).st_size
