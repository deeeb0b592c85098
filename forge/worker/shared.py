"""What a worker and its job process share: one page of memory and the job's output buffer.

:class:`SharedState` is the page. The job process writes the outcome of its run there (under
a seqlock, so the worker never reads half of one) and the worker writes when the job process
must be dead (the instant its own kill timer is set to, moved on with every lease renewal).
Job code can close every descriptor it has: neither lives in a descriptor.
:class:`OutputBuffer` is the memfd behind the job's fds 1 and 2, copied by the worker into the
job's log.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from forge import _linux
from forge.worker.outcome import Outcome

if TYPE_CHECKING:
    from forge.backends.base import Backend


class SharedState:
    """One page shared by the worker and its job process.

    Bytes 0-7: when the job process must be dead (CLOCK_BOOTTIME seconds, a double; the worker
    writes it). Then two slots, each a sequence number (odd while being written), a length and
    JSON, so the reader never sees half a record: the job request (``REQUEST``, the worker
    writes it) and the job's outcome (``OUTCOME``, the job process writes it). Last, the
    sequence number of the request the job process took (``taken``).
    """

    SLOT = 256 * 1024  # a job's payload is at most 64 KiB
    SIZE = 8 + 2 * SLOT + 8  # the last 8 bytes: the ``taken`` request's sequence number
    _TAKEN = 8 + 2 * SLOT
    _Q = struct.Struct("=Q")
    _D = struct.Struct("=d")
    _I = struct.Struct("=I")

    def __init__(self) -> None:
        self.mm = mmap.mmap(-1, self.SIZE)

    @property
    def kill_at(self) -> float:
        """When the job process must be dead (CLOCK_BOOTTIME seconds; ``NEVER`` while idle)."""
        return float(self._D.unpack_from(self.mm, 0)[0])

    @kill_at.setter
    def kill_at(self, value: float) -> None:
        self._D.pack_into(self.mm, 0, value)

    @property
    def taken(self) -> int:
        """The sequence number of the last request the job process took (read, before it runs
        it): a job process that ends with an older one never started the latest request."""
        return int(self._Q.unpack_from(self.mm, self._TAKEN)[0])

    @taken.setter
    def taken(self, value: int) -> None:
        self._Q.pack_into(self.mm, self._TAKEN, value)

    def set_record(self, record: dict[str, Any] | None, slot: int = 0) -> None:
        """Write ``record`` (JSON) whole into ``slot``; ValueError if it does not fit."""
        base = 8 + slot * self.SLOT
        data = json.dumps(record).encode() if record is not None else b""
        if len(data) > self.SLOT - 24:
            raise ValueError("record too large for the shared page")
        seq = self._Q.unpack_from(self.mm, base)[0]
        seq += seq & 1  # a writer killed mid-write left it odd: start again from even
        self._Q.pack_into(self.mm, base, seq + 1)
        self._I.pack_into(self.mm, base + 8, len(data))
        self.mm[base + 12 : base + 12 + len(data)] = data
        self._Q.pack_into(self.mm, base, seq + 2)

    def record(self, slot: int = 0) -> dict[str, Any] | None:
        """The record last written whole, or None (none, or its writer died mid-write)."""
        base = 8 + slot * self.SLOT
        seq = self._Q.unpack_from(self.mm, base)[0]
        if seq % 2:
            return None
        n = self._I.unpack_from(self.mm, base + 8)[0]
        data = bytes(self.mm[base + 12 : base + 12 + n])
        try:
            value = json.loads(data) if data else None
        except ValueError:
            return None
        return value if isinstance(value, dict) else None


    def put_request(self, request: JobRequest) -> None:
        """Write the job request (the worker's side)."""
        self.set_record(request.to_record(), REQUEST)

    def request(self) -> JobRequest | None:
        """The job request last written whole, or None (the job process's side)."""
        record = self.record(REQUEST)
        return JobRequest.from_record(record) if record is not None else None

    def put_reply(self, reply: JobReply) -> None:
        """Write the outcome of a request (the job process's side)."""
        self.set_record(reply.to_record(), OUTCOME)

    def reply(self, seq: int) -> JobReply | None:
        """The outcome of request ``seq`` if it is written whole, else None (the worker's side)."""
        record = self.record(OUTCOME)
        reply = JobReply.from_record(record) if record is not None else None
        return reply if reply is not None and reply.seq == seq else None


@dataclass(frozen=True, slots=True)
class JobRequest:
    """What the worker asks its job process to run: request ``seq`` (counting up), the
    command, its arguments and the environment added for the run."""

    seq: int
    command: str
    args: list[str]
    env: dict[str, str]

    def to_record(self) -> dict[str, Any]:
        """The JSON form in the shared page."""
        return {"seq": self.seq, "command": self.command, "args": self.args, "env": self.env}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> JobRequest | None:
        """The request of a JSON form, or None if it is not one."""
        try:  # written by the worker alone (``to_record``): the keys are checked, not each value
            return cls(record["seq"], record["command"], record["args"], record["env"])
        except KeyError:
            return None


@dataclass(frozen=True, slots=True)
class JobReply:
    """The job process's answer to request ``seq``: the run's outcome, and whether it exits
    after it (``recycle``: its memory passed the limit, it runs one job per process, or the
    job changed it in a way that cannot be put back)."""

    seq: int
    outcome: Outcome
    recycle: bool = False

    def to_record(self) -> dict[str, Any]:
        """The JSON form in the shared page: the outcome's keys, then ``seq`` and ``recycle``."""
        return {**self.outcome.to_record(), "seq": self.seq, "recycle": self.recycle}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> JobReply | None:
        """The reply of a JSON form, or None if it is not one."""
        outcome = Outcome.from_record(record)
        seq = record.get("seq")
        if outcome is None or not isinstance(seq, int):
            return None
        return cls(seq, outcome, bool(record.get("recycle", False)))


#: The shared page's two record slots.
OUTCOME, REQUEST = 0, 1
#: A kill instant that never comes (the job process's timer while it is idle).
NEVER = 1e12


def cut_to_lines(text: str, chars: int) -> str:
    """The last ``chars`` characters of ``text``, from the first line that starts within them."""
    if len(text) <= chars:
        return text
    tail = text[-chars:]
    cut = tail.find("\n")
    return tail[cut + 1:] if 0 <= cut < len(tail) - 1 else tail


_KEEP = 64 * 1024
_PUNCH_FROM = 1024 * 1024
_CHUNK = 1024 * 1024


class OutputBuffer:
    """The memfd behind a job's fds 1 and 2, and its copying into the job's log (by the worker)."""

    def __init__(self, shared: SharedState | None = None) -> None:
        self.fd = os.memfd_create("forge-job-output", os.MFD_CLOEXEC)
        self.copied = 0
        self.punched: tuple[str, int] = ("", 0)  # the job whose output was freed, up to where
        #: Also given every chunk copied (``queue:work --echo``: the job's output on the console).
        self.echo: Callable[[bytes], None] | None = None
        #: Also given every chunk copied, in order (the worker's progress tracker).
        self.scan: Callable[[bytes], None] | None = None


    def flush_to_log(self, backend: Backend, job_id: str, *, reset: bool = False) -> None:
        """Append output not yet copied to ``job_id``'s log; ``reset`` empties the buffer.

        A failed log write (a full disk) loses that part of the log, never the job.
        """
        size = os.fstat(self.fd).st_size
        done = self.copied
        while done < size:  # in chunks: a job may print gigabytes between two copies
            data = os.pread(self.fd, min(size - done, _CHUNK), done)
            if not data:
                break
            with contextlib.suppress(Exception):
                backend.append_log(job_id, data)
            if self.echo is not None:
                with contextlib.suppress(Exception):
                    self.echo(data)
            if self.scan is not None:
                with contextlib.suppress(Exception):
                    self.scan(data)
            done += len(data)
        self.copied = done
        if reset:
            os.ftruncate(self.fd, 0)
            os.lseek(self.fd, 0, os.SEEK_SET)
            self.copied = 0
        elif done > _PUNCH_FROM:
            # A long job that prints a lot: give back the memory of what is copied, but the
            # last _KEEP bytes (the failure tail comes from there). The job still writes at
            # its offset; truncating instead would race with its writes.
            upto = (done - _KEEP) // 4096 * 4096
            if self.punched != (job_id, upto):
                self.punched = (job_id, upto)
                _linux.punch_hole(self.fd, 0, upto)

    def tail(self, chars: int) -> str:
        """The last ``chars`` characters of the output, starting at a line's beginning."""
        size = os.fstat(self.fd).st_size
        start = max(0, size - chars * 4)
        text = os.pread(self.fd, size - start, start).decode("utf-8", "replace")
        return cut_to_lines(text, chars)

    def size(self) -> int:
        """How many bytes of output the buffer holds (copied or not)."""
        return os.fstat(self.fd).st_size
