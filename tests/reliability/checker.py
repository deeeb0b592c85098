"""Jepsen-style figures for a queue run, computed from the probe's ledger.

The probe (``tests/project/commands/probe.py``) appends a ``start`` line when a run begins and
an ``end`` line when it ends, each with the job id, attempt, pid and start time. From those
lines and the ids whose dispatch was acknowledged this module computes:

- **lost**: acknowledged, but no run of it ever reached its end;
- **duplicated**: jobs that ran more than once (``extra_runs`` counts the runs beyond the first);
- **concurrent**: pairs of runs of one job that overlapped in time. A run with a start line but
  no end line counts as running until its process was killed (``killed_at``, by pid) or else
  until the last timestamp in the ledger: the conservative reading;
- **unexpected**: runs of a job that was never dispatched.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Run:
    """One run of a job, as the probe recorded it; ``end`` is None if it never finished."""

    job: str
    attempt: int
    pid: int
    start: float
    end: float | None
    args: tuple[str, ...] = ()
    queue: str | None = None
    ppid: int = 0  # the worker that ran it


@dataclass
class Figures:
    acknowledged: int = 0
    runs: int = 0
    completed: int = 0
    unfinished: int = 0
    lost: int = 0
    duplicated: int = 0
    extra_runs: int = 0
    concurrent: int = 0
    unexpected: int = 0
    lost_ids: list[str] = field(default_factory=list)
    duplicated_ids: list[str] = field(default_factory=list)
    concurrent_ids: list[str] = field(default_factory=list)
    unexpected_ids: list[str] = field(default_factory=list)

    def line(self, scenario: str, **extra: Any) -> str:
        """``FIGURES scenario=... lost=0 ...``: one line for logs and ``pytest -s``."""
        parts = [f"scenario={scenario}", f"lost={self.lost}", f"duplicated={self.duplicated}",
                 f"concurrent={self.concurrent}", f"unexpected={self.unexpected}",
                 f"acknowledged={self.acknowledged}", f"runs={self.runs}",
                 f"extra_runs={self.extra_runs}", f"unfinished={self.unfinished}"]
        parts += [f"{k}={_fmt(v)}" for k, v in extra.items()]
        return "FIGURES " + " ".join(parts)


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def read_ledger(path: str | Path) -> list[dict[str, Any]]:
    """The ledger's records; a torn last line (a writer killed mid-append) is skipped."""
    p = Path(path)
    if not p.exists():
        return []
    out = []
    for line in p.read_bytes().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and rec.get("kind") in ("start", "end"):
            out.append(rec)
    return out


def runs_of(records: Iterable[Mapping[str, Any]]) -> list[Run]:
    """Pair start and end lines (same job, pid and start time) into runs."""
    starts: dict[tuple, Mapping[str, Any]] = {}
    ends: dict[tuple, Mapping[str, Any]] = {}
    for rec in records:
        key = (rec.get("job"), rec.get("pid"), rec.get("start"))
        (starts if rec["kind"] == "start" else ends)[key] = rec
    out = []
    for key in starts.keys() | ends.keys():
        rec = starts.get(key) or ends[key]
        end = ends.get(key)
        out.append(Run(job=str(rec.get("job")), attempt=int(rec.get("attempt") or 0), pid=int(rec.get("pid") or 0),
                       start=float(rec["start"]), end=float(end["end"]) if end else None,
                       args=tuple(rec.get("args") or ()), queue=rec.get("queue"),
                       ppid=int(rec.get("ppid") or 0)))
    out.sort(key=lambda r: (r.start, r.job))
    return out


def check(ledger: str | Path | Iterable[Mapping[str, Any]], acknowledged: Iterable[str], *,
          dispatched: Iterable[str] | None = None, killed_at: Mapping[int, float] | None = None,
          until: float | None = None) -> Figures:
    """Figures for one run.

    ``acknowledged``: ids whose dispatch returned success. ``dispatched``: every id that may
    legitimately run (default: the acknowledged ones; add ids whose dispatch was ambiguous).
    ``killed_at``: pid -> time it was killed, ending that pid's unfinished runs (a run's
    process or the worker it ran under: a job process dies with its worker). ``until``:
    where other unfinished runs end (default: the ledger's last timestamp).
    """
    records = read_ledger(ledger) if isinstance(ledger, str | Path) else list(ledger)
    acked = set(acknowledged)
    allowed = acked | set(dispatched or ())
    runs = runs_of(records)
    if until is None:
        until = max((t for r in runs for t in (r.start, r.end) if t is not None), default=0.0)
    killed_at = killed_at or {}
    by_job: dict[str, list[Run]] = defaultdict(list)
    for r in runs:
        by_job[r.job].append(r)
    f = Figures(acknowledged=len(acked), runs=len(runs))
    f.completed = sum(1 for r in runs if r.end is not None)
    f.unfinished = f.runs - f.completed
    f.lost_ids = sorted(j for j in acked if not any(r.end is not None for r in by_job.get(j, ())))
    f.unexpected_ids = sorted(j for j in by_job if j not in allowed)
    f.duplicated_ids = sorted(j for j, rs in by_job.items() if len(rs) > 1)
    f.extra_runs = sum(len(rs) - 1 for rs in by_job.values())
    for job, rs in by_job.items():
        spans = []
        for r in rs:
            end = r.end
            if end is None:
                kill = killed_at.get(r.pid, killed_at.get(r.ppid))
                end = kill if kill is not None and kill >= r.start else until
            spans.append((r.start, end))
        spans.sort()
        overlaps = sum(1 for i, (s, e) in enumerate(spans) for s2, _ in spans[i + 1:] if s2 < e)
        if overlaps:
            f.concurrent += overlaps
            f.concurrent_ids.append(job)
    f.lost, f.duplicated, f.unexpected = len(f.lost_ids), len(f.duplicated_ids), len(f.unexpected_ids)
    return f
