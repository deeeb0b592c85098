"""Job progress: how a job reports it, and its record (``forge.progress``, ``::forge-progress``).

A job reports progress by printing a line on its stdout or stderr, from any language::

    ::forge-progress 30/100 downloading     (done/total, then an optional message)
    ::forge-progress 45% resizing           (a percentage, then an optional message)

or, from Python, ``forge.progress(30, 100, "downloading")`` (which prints that line, only
inside a job: a direct run prints nothing). The report may follow a partial line of other
output (``...::forge-progress 3/10``: stdout and stderr share the job's pipe). The supervising worker reads the job's output
anyway (to copy it into the job's log); it parses these lines and records the latest in the
job's progress record, at most every half second plus the last one (``tracker``). Only the
supervisor writes it. The line stays in the job's log, like any other output.
"""

from __future__ import annotations

import math
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

PREFIX = b"::forge-progress "
#: Longest message kept (characters); control characters are dropped.
MAX_MESSAGE = 200
_LINE = re.compile(
    r"::forge-progress[ \t]+(?:(?P<done>\d+(?:\.\d+)?)[ \t]*/[ \t]*(?P<total>\d+(?:\.\d+)?)"
    r"|(?P<pct>\d+(?:\.\d+)?)[ \t]*%)(?:[ \t]+(?P<msg>.*?))?[ \t\r]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


@dataclass(frozen=True)
class Report:
    """One parsed progress line: ``done`` of ``total`` (a percentage: total 100)."""

    done: float
    total: float
    message: str | None = None

    @property
    def percent(self) -> float:
        """``done / total`` as a percentage clamped to 0-100, rounded to 2 places; 0 when
        ``total`` is 0."""
        return round(min(max(self.done / self.total * 100.0, 0.0), 100.0), 2) if self.total else 0.0


def parse_line(line: str | bytes) -> Report | None:
    """The progress a line reports, or None if it is not a (valid) progress line."""
    if isinstance(line, bytes):
        line = line.decode("utf-8", "replace")
    m = _LINE.fullmatch(line.rstrip("\n"))
    if m is None:
        return None
    msg = m.group("msg")
    if msg is not None:
        msg = _CONTROL.sub("", msg).strip()[:MAX_MESSAGE] or None
    if m.group("pct") is not None:
        pct = float(m.group("pct"))
        return Report(pct, 100.0, msg) if pct <= 100.0 else None
    done, total = float(m.group("done")), float(m.group("total"))
    # 400 digits parse as inf: not a number the record (JSON) or a percentage can hold.
    if total <= 0 or done > total or not math.isfinite(total):
        return None
    return Report(done, total, msg)


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ValueError(f"forge.progress: {what} must be a finite number >= 0, not {value!r}")
    return float(value)


def _fmt(x: float) -> str:
    return str(int(x)) if x == int(x) else f"{x:g}"


def format_line(done: float, total: float | None = None, message: str | None = None) -> str:
    """The ``::forge-progress`` line for these values (checked; ValueError if they are wrong)."""
    d = _number(done, "done")
    if total is None:
        if d > 100:
            raise ValueError(f"forge.progress: a percentage must be at most 100, not {done!r}")
        head = f"{_fmt(d)}%"
    else:
        t = _number(total, "total")
        if t <= 0 or d > t:
            raise ValueError(f"forge.progress: need 0 <= done <= total and total > 0, not {done!r}/{total!r}")
        head = f"{_fmt(d)}/{_fmt(t)}"
    if message is not None:
        text = _CONTROL.sub(" ", str(message)).strip()[:MAX_MESSAGE]
        if text:
            head += " " + text
    return "::forge-progress " + head


def progress(done: float, total: float | None = None, message: str | None = None) -> None:
    """Report a job's progress: ``progress(30, 100, "downloading")``, or a percentage:
    ``progress(45.5)``. Inside a job it prints the ``::forge-progress`` line on stderr; in a
    direct run (``forge my:command``, tests) it does nothing. Bad values raise ValueError."""
    line = format_line(done, total, message)
    if not os.environ.get("FORGE_JOB_ID"):
        return
    stream = sys.stderr
    try:
        stream.write(line + "\n")
        stream.flush()
    except (OSError, ValueError):
        pass  # a closed stderr: progress is never worth failing the job for


__all__ = ["PREFIX", "Report", "describe", "format_line", "parse_line", "progress", "public"]


def public(record: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A progress record as ``queue:show --json`` and the dashboard give it: ``done``,
    ``total``, ``percent``, ``message``, ``updated_at`` (RFC 3339), ``eta_seconds`` (as of
    ``updated_at``, None when unknown) and ``attempt``."""
    if record is None:
        return None
    from forge.times import rfc3339

    def num(x: Any) -> Any:
        return int(x) if isinstance(x, float) and x.is_integer() else x

    return {"done": num(record.get("done")), "total": num(record.get("total")),
            "percent": record.get("percent"), "message": record.get("message"),
            "updated_at": rfc3339(record["updated_at"]) if isinstance(record.get("updated_at"), int | float) else None,
            "eta_seconds": record.get("eta_seconds"), "attempt": record.get("attempt")}


def describe(record: Mapping[str, Any] | None, now: float, *, running: bool = True) -> str:
    """``30% (30/100) downloading, ETA 12 s`` for people; the ETA counts down from the report."""
    if not record:
        return ""
    from forge.durations import format_duration

    pct = record.get("percent") or 0.0
    text = f"{pct:.0f}%"
    done, total = record.get("done"), record.get("total")
    if isinstance(done, int | float) and isinstance(total, int | float) and total != 100:
        text += f" ({_fmt(done)}/{_fmt(total)})"
    if record.get("message"):
        text += f" {record['message']}"
    eta = record.get("eta_seconds")
    if running and isinstance(eta, int | float) and pct < 100:
        at = record.get("updated_at")
        left = max(eta - (now - at), 0.0) if isinstance(at, int | float) else eta
        text += f", ETA {format_duration(left)}"
    return text
