"""The supervisor's side of job progress: find progress lines in the output as it is copied to
the log, and record the latest in the job's progress record, throttled."""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING, Any

from forge.jobprogress import PREFIX, Report, parse_line
from forge.jobprogress.store import put_progress

if TYPE_CHECKING:
    from forge.backends.base import Backend

#: Least time between two writes of one job's progress (the last report is always written).
MIN_INTERVAL = 0.5
_MAX_LINE = 1024


class ProgressTracker:
    """Fed every chunk of a job's output (in order); writes the progress record."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.job_id: str | None = None
        self._tail: bytes | None = b""

    def start(self, job_id: str, attempt: int, started: float, claimed_at: float | None = None) -> None:
        """A new attempt. ``claimed_at``: its claim's time on the store's clock (the fence),
        what the job's ``claimed`` event says, so a reader can tell this attempt's record
        from an earlier one's whatever the hosts' clocks (``store.with_progress``)."""
        self.job_id, self.attempt, self.started = job_id, attempt, started
        self.claimed_at = claimed_at
        self._tail = b""
        self._latest: Report | None = None
        self._written: Report | None = None
        self._written_at = float("-inf")
        self._first: tuple[float, float] | None = None  # (time, done) of the attempt's first report

    def feed(self, data: bytes) -> None:
        """Scan a chunk of output for progress lines (a line may span chunks)."""
        if self.job_id is None:
            return
        if self._tail is None:  # in the middle of a long line: not a progress line
            nl = data.find(b"\n")
            if nl < 0:
                return
            data, self._tail = data[nl + 1:], b""
        if self._tail:
            data = self._tail + data
        end = data.rfind(b"\n")
        rest = data[end + 1:]
        self._tail = rest if len(rest) <= _MAX_LINE else None
        if end >= 0 and PREFIX in data:
            self._scan(data, end)
        self.publish()

    def _scan(self, data: bytes, end: int) -> None:
        while True:
            i = data.rfind(PREFIX, 0, end)
            if i < 0:
                return
            # Not only at a line's start: stdout and stderr share the pipe, so the line that
            # forge.progress writes on stderr follows whatever partial line the job left on
            # stdout (a row of dots, a prompt): ".::forge-progress 1/3".
            stop = data.find(b"\n", i)
            report = parse_line(data[i:stop if stop >= 0 else len(data)][:_MAX_LINE])
            if report is not None:
                self._got(report)
                return
            end = i

    def _got(self, report: Report) -> None:
        now = time.time()
        if self._first is None:
            self._first = (now, report.done)
        self._latest = report
        self._latest_at = now

    def publish(self, *, final: bool = False) -> None:
        """Write the latest report if it is new and the interval has passed (``final``: now)."""
        r = self._latest
        if r is None or r == self._written or self.job_id is None:
            return
        now = time.monotonic()
        if not final and now - self._written_at < MIN_INTERVAL:
            return
        self._written, self._written_at = r, now
        with contextlib.suppress(Exception):  # progress is never worth losing a job over
            put_progress(self.backend, self.job_id, self._record(r))

    def finish(self) -> None:
        """The job's output is all copied: write the last report, forget the job."""
        self.publish(final=True)
        self.job_id = None

    def _record(self, r: Report) -> dict[str, Any]:
        at = self._latest_at
        return {"done": r.done, "total": r.total, "percent": r.percent, "message": r.message,
                "updated_at": at, "eta_seconds": self._eta(r, at), "attempt": self.attempt,
                "started_at": self.started, "claimed_at": self.claimed_at}

    def _eta(self, r: Report, at: float) -> float | None:
        """Seconds left at the rate since the attempt's first report (or since it started)."""
        left = r.total - r.done
        if left <= 0:
            return 0.0
        t0, d0 = self._first if self._first is not None else (self.started, 0.0)
        if r.done <= d0:
            t0, d0 = self.started, 0.0
        if r.done <= d0 or at <= t0:
            return None
        return round(left * (at - t0) / (r.done - d0), 3)
