"""Showing a running job's progress: a Rich progress bar on a terminal, plain lines elsewhere
(``queue:dispatch --wait``, ``queue:log --follow``)."""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

from forge.jobprogress import PREFIX, describe


class ProgressView:
    """Draws the progress records it is given. ``bar``: a Rich bar on ``stream`` (a terminal),
    else one plain ``progress: ...`` line on ``stream`` per change. Use as a context manager."""

    def __init__(self, label: str, *, stream: TextIO | None = None, bar: bool | None = None) -> None:
        from forge import output

        self.stream = stream or sys.stderr
        self.bar = output.is_tty(self.stream) if bar is None else bar
        self.label = label
        self._last: Any = None
        self._progress: Any = None
        self._task: Any = None
        self.console: Any = None

    def __enter__(self) -> ProgressView:
        if self.bar:
            from rich.console import Console

            self.console = Console(file=self.stream, highlight=False)
        return self

    def update(self, record: Mapping[str, Any] | None) -> None:
        """Show ``record``, a job's latest progress (None or empty shows nothing): on a terminal
        redraw the bar, else print a ``progress:`` line; an unchanged report prints nothing and
        only counts the bar's ETA down."""
        if not record:
            return
        key = (record.get("done"), record.get("total"), record.get("message"), record.get("updated_at"))
        if key == self._last:
            if self._progress is not None:  # the ETA counts down between two reports
                self._progress.update(self._task, eta=_eta(record))
            return
        self._last = key
        if not self.bar:
            self.stream.write(f"progress: {describe(record, time.time())}\n")
            self.stream.flush()
            return
        from rich.markup import escape

        if self._progress is None:
            from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                                      TextColumn("{task.fields[counts]}"), TextColumn("{task.fields[eta]}"),
                                      console=self.console, transient=False,
                                      redirect_stdout=False, redirect_stderr=False)
            self._progress.start()
            self._task = self._progress.add_task(self.label, total=100.0, counts="", eta="")
        total = float(record.get("total") or 100.0)
        done = float(record.get("done") or 0.0)
        counts = "" if total == 100.0 else f"{_num(done)}/{_num(total)}"
        message = record.get("message")
        desc = f"{escape(self.label)} {escape(message)}" if message else escape(self.label)
        self._progress.update(self._task, total=total, completed=done, description=desc, counts=counts,
                              eta=_eta(record))

    def write(self, text: str) -> None:
        """Print ``text`` above the bar (a terminal) or as it is."""
        if self.console is not None:
            self.console.out(text, end="", highlight=False)
        else:
            self.stream.write(text)
            self.stream.flush()

    def close(self) -> None:
        """Stop drawing (the bar stays on screen as it last was)."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def __exit__(self, *exc: object) -> None:
        self.close()


def _eta(record: Mapping[str, Any]) -> str:
    """``ETA 12 s``: the supervisor's estimate, counted down from when it was made."""
    from forge.durations import format_duration

    eta, at = record.get("eta_seconds"), record.get("updated_at")
    if not isinstance(eta, int | float) or (record.get("percent") or 0) >= 100:
        return ""
    left = max(eta - (time.time() - at), 0.0) if isinstance(at, int | float) else eta
    return f"ETA {format_duration(left)}"


def _num(x: float) -> str:
    return str(int(x)) if x == int(x) else f"{x:g}"


class LineFilter:
    """Drops ``::forge-progress`` lines from a stream of output (for a terminal showing a bar),
    passing everything else through whole lines at a time (``flush`` for the rest)."""

    def __init__(self) -> None:
        self._partial = ""

    def feed(self, text: str) -> str:
        """``text`` with its progress lines removed; whole lines pass at once, a partial line
        that may be the start of a progress line is held back until its end (or :meth:`flush`)."""
        text = self._partial + text
        cut = text.rfind("\n") + 1
        rest = text[cut:]
        prefix = PREFIX.decode()
        j = rest.find(prefix)
        if j < 0:  # the start of one at the end ("::" at least: a prompt "Name:" shows now)?
            j = next((len(rest) - k for k in range(min(len(prefix) - 1, len(rest)), 1, -1)
                      if rest.endswith(prefix[:k])), -1)
        if j >= 0:  # may be a progress line still being written (after a partial line): wait for its end
            cut, self._partial = cut + j, rest[j:]
        else:
            cut, self._partial = len(text), ""  # show a partial line (a prompt, a dot row) now
        return "".join(strip_progress(x) for x in text[:cut].splitlines(keepends=True))

    def flush(self) -> str:
        """What :meth:`feed` held back, progress report removed; the filter is empty afterwards."""
        rest, self._partial = self._partial, ""
        return strip_progress(rest)


def strip_progress(line: str) -> str:
    """``line`` without the progress report in it: a line after a job's partial line of
    ordinary output (``".::forge-progress 1/3"``) keeps that output (``"."``)."""
    i = line.find(PREFIX.decode())
    return line if i < 0 else line[:i]
