"""The outcome journal of a job-file directory: ``stats/YYYYMMDD/HHMM.log``, one file a minute.

Every recording process appends records (``forge.stats.records``) to the file of the current
minute (UTC, its own clock) with ``O_APPEND``: a line is one ``write`` well under a page, so
concurrent workers never interleave. Reading a window reads only the minutes it spans.

The running totals behind the Prometheus counters live in ``stats/totals.json``: the sum of
every minute up to ``through``, folded in (under ``stats/.lock``) by whoever reads the totals
or opens a new minute's file, once the minute is closed (two minutes old). Files older than the
retention are deleted only once folded, so the counters never go back. A minute's file stops
growing at ``MAX_MINUTE_BYTES`` (about 100,000 records): the journal is bounded in size.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from forge.backends.file.fsio import distrust, open_lock, private_dir
from forge.stats import records as rec

#: A minute's file stops growing here (about 100,000 records); what is over is not recorded.
MAX_MINUTE_BYTES = 12 * 1024 * 1024
#: A minute is closed (safe to fold into the totals) this long after it ends.
CLOSE_AFTER = 120.0
_O_APPEND = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def minute_name(t: float) -> str:
    """``YYYYMMDD/HHMM`` of the UTC minute holding ``t`` (names sort as times)."""
    return datetime.fromtimestamp(t, UTC).strftime("%Y%m%d/%H%M")


class FileJournal:
    """The stats journal of a file backend: one append-only file per UTC minute under
    ``<root>/stats/``, folded into running totals, and deleted after the retention."""

    def __init__(self, root: str, uid: int, retention: float,
                 on_new_minute: Callable[[str], None] | None = None) -> None:
        self.root = root
        #: Called (errors ignored) by the process that opens a minute's file first.
        self.on_new_minute = on_new_minute
        self.dir = f"{root}/stats"
        self.uid = uid
        self.retention = retention
        self._ready = False
        self._minute, self._minute_name = -1, ""

    def _prepare(self) -> None:
        if not self._ready:
            os.close(private_dir(self.dir, self.uid, name="stats"))
            self._ready = True

    # -- writing -------------------------------------------------------------------------

    def write(self, line: bytes, record: rec.Record | None = None) -> None:
        """Append one record to the current minute's file (best effort: stats never block a job)."""
        minute = int(time.time() // 60)
        if minute != self._minute:
            self._minute, self._minute_name = minute, minute_name(minute * 60.0)
        name = self._minute_name
        fd = self._minute_fd(name)
        if os.fstat(fd).st_size + len(line) <= MAX_MINUTE_BYTES:
            os.write(fd, line)

    def _minute_fd(self, name: str) -> int:
        path = f"{self.dir}/{name}.log"
        if _current.path == path and _current.pid == os.getpid() and _current.fd is not None:
            return _current.fd
        _current.close()
        self._prepare()
        day, minute = name.split("/")
        dfd = private_dir(f"{self.dir}/{day}", self.uid, name=day, dir_fd=None)
        try:
            created = False
            try:
                fd = os.open(f"{minute}.log", _O_APPEND | os.O_EXCL, 0o600, dir_fd=dfd)
                created = True
            except FileExistsError:
                fd = os.open(f"{minute}.log", _O_APPEND, 0o600, dir_fd=dfd)
        finally:
            os.close(dfd)
        reason = distrust(os.fstat(fd), self.uid)
        if reason is not None:
            os.close(fd)
            raise OSError(f"stats file {self.dir}/{name}.log: {reason}")
        _current.fd, _current.path, _current.pid = fd, path, os.getpid()
        if created:  # the first record of a minute: fold closed minutes and prune, if nobody is
            with contextlib.suppress(OSError, ValueError):
                self.totals(block=False)
            if self.on_new_minute is not None:
                with contextlib.suppress(Exception):
                    self.on_new_minute(name)
        return fd

    # -- reading -------------------------------------------------------------------------

    def _minutes(self) -> list[str]:
        """Every minute file's name, sorted."""
        try:
            days = sorted(d for d in os.listdir(self.dir) if len(d) == 8 and d.isdigit())
        except FileNotFoundError:
            return []
        out = []
        for day in days:
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                out += [f"{day}/{f[:4]}" for f in os.listdir(f"{self.dir}/{day}")
                        if len(f) == 8 and f.endswith(".log") and f[:4].isdigit()]
        out.sort()
        return out

    def _read(self, name: str) -> bytes:
        try:
            fd = os.open(f"{self.dir}/{name}.log", os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except (FileNotFoundError, OSError):
            return b""
        try:
            st = os.fstat(fd)
            if distrust(st, self.uid) is not None:
                return b""  # never count what another user wrote
            chunks = []
            while True:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    break
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)

    def read(self, since: float, until: float) -> list[rec.Record]:
        """The records with ``since <= t <= until`` (files of the minutes around the window)."""
        first, last = minute_name(since - 60), minute_name(until + 60)
        out: list[rec.Record] = []
        for name in self._minutes():
            if first <= name <= last:
                out += [r for r in rec.decode_lines(self._read(name)) if since <= r[0] <= until]
        return out

    # -- totals --------------------------------------------------------------------------

    def totals(self, *, block: bool = True) -> dict[str, rec.QueueTotals]:
        """Per-queue totals over the whole history (folded minutes plus the open ones).
        ``block=False``: only fold if nobody else is (ValueError when someone is)."""
        self._prepare()
        fd = open_lock(f"{self.dir}/.lock", self.uid)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
            except BlockingIOError:
                raise ValueError("busy") from None
            state = self._load()
            through = state.get("through") or ""
            queues = {q: rec.QueueTotals.from_dict(d) for q, d in (state.get("queues") or {}).items()}
            closed = minute_name(time.time() - CLOSE_AFTER)
            names = self._minutes()
            folded = [n for n in names if through < n <= closed]
            for name in folded:
                rec.fold(rec.decode_lines(self._read(name)), queues)
            if folded:
                through = folded[-1]
                self._save({"v": 1, "through": through, "queues": {q: t.to_dict() for q, t in queues.items()}})
            self._prune(names, through)
        finally:
            os.close(fd)
        for name in names:
            if name > through:
                rec.fold(rec.decode_lines(self._read(name)), queues)
        return queues

    def _load(self) -> dict[str, Any]:
        try:
            with open(f"{self.dir}/totals.json", "rb") as f:
                if distrust(os.fstat(f.fileno()), self.uid) is not None:
                    return {}
                d = json.loads(f.read())
            return d if isinstance(d, dict) and d.get("v") == 1 else {}
        except (FileNotFoundError, ValueError, OSError):
            return {}

    def _save(self, state: dict[str, Any]) -> None:
        tmp = f"{self.dir}/.totals.{os.getpid()}.tmp"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, json.dumps(state, separators=(",", ":")).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, f"{self.dir}/totals.json")

    def _prune(self, names: list[str], through: str) -> None:
        """Delete folded minute files older than the retention, and emptied day folders."""
        oldest = minute_name(time.time() - self.retention)
        for name in names:
            if name < oldest and name <= through:
                with contextlib.suppress(OSError):
                    os.unlink(f"{self.dir}/{name}.log")
        for day in {n[:8] for n in names if n < oldest}:
            with contextlib.suppress(OSError):
                os.rmdir(f"{self.dir}/{day}")  # fails while it holds files: fine

    def close(self) -> None:
        """Close this process's open minute file if it is one of this journal's."""
        if _current.path.startswith(f"{self.dir}/"):
            _current.close()


class _OpenMinute:
    """The one minute file a process keeps open for appending (whatever the number of
    journals it uses: a test suite or a tool opens many queue directories)."""

    fd: int | None = None
    path = ""
    pid = 0

    def close(self) -> None:
        if self.fd is not None and self.pid == os.getpid():
            with contextlib.suppress(OSError):
                os.close(self.fd)
        self.fd, self.path = None, ""


_current = _OpenMinute()
