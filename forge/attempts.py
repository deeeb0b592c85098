"""A job's attempts, each with its part of the job's log: what ``queue:show`` prints and returns.

A job's log is one byte stream for all its attempts (``queue:log`` prints it as it was
written). Every ``claimed`` event records the log's size when that attempt started
(``Event.log_offset``, on both backends), so the log splits into one part per attempt by those
offsets, without writing anything into the log itself. Jobs claimed before the field existed
have no offsets: their output is one part, not split.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from forge.job import Event, JobInfo, State

#: Characters of output shown for the newest attempt, and for each earlier one.
LAST_CHARS = 4096
EARLIER_CHARS = 1536
#: Attempts shown with their output; older ones get their header only.
SHOWN_WITH_OUTPUT = 5

_ENDS = ("done", "released", "failed")


@dataclass(frozen=True)
class Attempt:
    """One run of a job: from its ``claimed`` event to the event that recorded how it ended."""

    run: int                    # 1, 2, ... in claim order (attempt numbers restart after queue:retry)
    attempt: int
    started_at: float
    worker: str | None
    log_start: int | None       # where its output starts in the job's log (bytes); None: not recorded
    log_end: int | None         # where the next attempt's starts, or the log's end
    outcome: str                # done | released | failed | running | interrupted
    ended_at: float | None = None
    reason: str | None = None
    exit_code: int | None = None
    error: str | None = None
    duration: float | None = None
    tries: int | None = None    # how many attempts the job may make, as its worker counted them


def attempts(info: JobInfo, log_size: int) -> list[Attempt]:
    """The job's attempts in order, from its events (``log_size``: the log's length in bytes)."""
    runs: list[tuple[Event, Event | None]] = []
    for ev in info.events:
        if ev.event == "claimed":
            runs.append((ev, None))
        elif ev.event in _ENDS and runs and runs[-1][1] is None and runs[-1][0].attempt == ev.attempt:
            runs[-1] = (runs[-1][0], ev)
    offsets = [min(c.log_offset, log_size) if c.log_offset is not None else None for c, _ in runs]
    found: list[Attempt] = []
    for i, (claim, end) in enumerate(runs):
        start = offsets[i]
        later = [o for o in offsets[i + 1:] if o is not None]
        stop = (later[0] if later else log_size) if start is not None else None
        if end is not None:
            outcome = end.event
        elif i == len(runs) - 1 and info.state == State.RESERVED:
            outcome = "running"
        else:
            outcome = "interrupted"  # no outcome recorded: the worker was stopped, the attempt not counted
        found.append(Attempt(
            run=i + 1, attempt=claim.attempt, started_at=claim.at, worker=claim.worker,
            log_start=start, log_end=stop, outcome=outcome,
            ended_at=end.at if end else None, reason=end.reason if end else None,
            exit_code=end.exit_code if end else None, error=end.error if end else None,
            duration=end.duration if end else None, tries=end.tries if end else None,
        ))
    return found


def split(log: bytes, found: Sequence[Attempt]) -> list[bytes | None]:
    """Each attempt's part of ``log`` (None where its offset was not recorded)."""
    return [log[a.log_start:a.log_end] if a.log_start is not None and a.log_end is not None else None
            for a in found]


def ending(a: Attempt) -> str:
    """How an attempt ended, for a person: ``failed (exit code 1, exception) after 300 ms; to be retried``."""
    if a.outcome == "running":
        return "running"
    if a.outcome == "interrupted":
        return "ended without an outcome (its worker was stopped; not counted)"
    what = "done" if a.outcome == "done" else "failed"
    detail = ", ".join(d for d in (f"exit code {a.exit_code}" if a.exit_code is not None and a.outcome != "done"
                                   else "", a.reason or "") if d)
    if detail:
        what += f" ({detail})"
    if a.duration is not None:
        from forge.durations import format_duration

        what += f" after {format_duration(a.duration)}"
    return what + ("; to be retried" if a.outcome == "released" else "")


def header(a: Attempt, max_attempts: int | None, started: str, *, runs: bool = False) -> str:
    """The line above an attempt's output in ``queue:show``; ``runs``: also number the runs
    (when attempt numbers repeat: after ``queue:retry``, or an interrupted attempt run again)."""
    most = a.tries or max_attempts
    of = f" of {most}" if most else ""
    who = f", worker {a.worker}" if a.worker else ""
    run = f"run {a.run}, " if runs else ""
    return f"--- {run}attempt {a.attempt}{of}, started {started}{who}: {ending(a)} ---"


_FRAMEWORK = re.compile(r'^\s*File ".*/(forge|typer|click|_click)/[^"]*", line \d+')


def readable(data: bytes, chars: int) -> str:
    """The end of some output for people: from a line's beginning, at most ``chars``
    characters, with the frames of forge's and Typer's own code in tracebacks folded into one
    line (the log itself keeps them; folded first, so they do not use up the room)."""
    from forge.worker.shared import cut_to_lines

    window = data[-chars * 4:]
    text = window.decode(errors="replace")
    if len(window) < len(data):  # started mid-line (or mid-character): from the next line
        text = text[text.find("\n") + 1:]
    return cut_to_lines(_fold(text), chars)


def _fold(text: str) -> str:
    out: list[str] = []
    lines = text.split("\n")
    i = hidden = 0
    while i < len(lines):
        if _FRAMEWORK.match(lines[i]):
            hidden += 1
            i += 1
            while i < len(lines) and lines[i].startswith("    ") and not lines[i].lstrip().startswith("File "):
                i += 1  # its source line, and the carets under it
            continue
        if hidden:
            out.append(f"  ... {hidden} frame{'s' if hidden != 1 else ''} of forge and Typer")
            hidden = 0
        out.append(lines[i])
        i += 1
    if hidden:
        out.append(f"  ... {hidden} frame{'s' if hidden != 1 else ''} of forge and Typer")
    return "\n".join(out)
