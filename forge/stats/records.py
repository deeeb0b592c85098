"""Outcome records: one compact line per finished attempt, the raw material of the stats.

A record is a JSON array ``[t, queue, command, outcome, attempt, wait, runtime]``:

- ``t``: when the attempt ended (Unix seconds, the recording host's clock);
- ``outcome``: ``"done"``, ``"failed"`` (for good) or ``"released"`` (it will be retried);
- ``wait``: seconds from the job becoming available (dispatch, or its ``--delay``) to its
  first claim, on a first attempt; ``null`` on later attempts (a retry waits for its backoff
  by design, which is not queueing delay);
- ``runtime``: the attempt's duration in seconds, ``null`` when the worker could not measure
  it (a job recovered after its worker died).

An array is a third of the size of an object with the same fields and parses faster; the
field order is this module's contract (readers skip a line that does not fit it).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

OUTCOMES = ("done", "failed", "released")

#: Histogram bucket upper bounds (seconds) of the runtime and wait histograms, shared by the
#: running totals and the Prometheus exposition (``forge.stats.metrics``).
BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                              60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)

Record = list[Any]  # [t, queue, command, outcome, attempt, wait, runtime]


def encode(t: float, queue: str, command: str, outcome: str, attempt: int,
           wait: float | None, runtime: float | None) -> bytes:
    """One record as a line of compact JSON (newline-terminated), built directly: every
    acknowledgement writes one, so it must cost microseconds."""
    if outcome not in OUTCOMES:
        raise ValueError(f"outcome must be one of {', '.join(OUTCOMES)}")
    return (f"[{float(t):.6f},{_quote(queue)},{_quote(command)},\"{outcome}\",{int(attempt)},"
            f"{_seconds(wait)},{_seconds(runtime)}]\n").encode()


_quote = json.encoder.encode_basestring_ascii  # type: ignore[attr-defined]


def _seconds(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "null"
    return f"{max(x, 0.0):.6g}"


def decode_lines(data: bytes) -> list[Record]:
    """The records in ``data`` (lines of ``encode``); a torn or foreign line is skipped."""
    if not data:
        return []
    text = data.decode("utf-8", "replace")
    lines = text.split("\n")
    try:  # the common case: every line whole, parsed in one call
        rows = json.loads("[" + ",".join(x for x in lines if x) + "]")
    except ValueError:
        rows = []
        for line in lines:
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    outcomes, number = _OUTCOME_SET, (int, float)
    return [r for r in rows if type(r) is list and len(r) == 7 and r[3] in outcomes
            and type(r[0]) in number and type(r[1]) is str and type(r[2]) is str]


_OUTCOME_SET = frozenset(OUTCOMES)


def bucket_index(seconds: float) -> int:
    """The index of the first bucket whose bound holds ``seconds`` (len(BUCKETS): +Inf)."""
    for i, bound in enumerate(BUCKETS):
        if seconds <= bound:
            return i
    return len(BUCKETS)


@dataclass
class Histogram:
    """Counts per bucket (not cumulative; the last one is +Inf), their sum and count."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    sum: float = 0.0

    @property
    def count(self) -> int:
        """How many values were added (the sum over every bucket)."""
        return sum(self.counts)

    def add(self, seconds: float, n: int = 1) -> None:
        """Add ``n`` values of ``seconds`` to their bucket and to the sum."""
        self.counts[bucket_index(seconds)] += n
        self.sum += seconds * n

    def merge(self, other: Histogram) -> None:
        """Add ``other``'s counts and sum to this one's (both have the same buckets)."""
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        self.sum += other.sum

    def to_dict(self) -> dict[str, Any]:
        """The histogram as the journal stores it: the per-bucket counts and the sum."""
        return {"counts": list(self.counts), "sum": self.sum}

    @classmethod
    def from_dict(cls, d: Any) -> Histogram:
        """The histogram ``to_dict`` wrote; an empty one for anything else (another bucket count,
        not an object), so a bad total never breaks a read."""
        h = cls()
        if isinstance(d, dict) and isinstance(d.get("counts"), list) and len(d["counts"]) == len(h.counts):
            h.counts = [int(x) for x in d["counts"]]
            h.sum = float(d.get("sum") or 0.0)
        return h


@dataclass
class QueueTotals:
    """Everything one queue's outcomes added up since its history began (monotonic counters)."""

    done: int = 0
    failed: int = 0
    released: int = 0
    runtime: Histogram = field(default_factory=Histogram)
    wait: Histogram = field(default_factory=Histogram)

    def add(self, r: Record) -> None:
        """Count outcome record ``r`` (done, failed or released) and add its run time and wait,
        where it has them, to the histograms."""
        setattr(self, r[3], getattr(self, r[3]) + 1)
        if r[6] is not None:
            self.runtime.add(float(r[6]))
        if r[5] is not None:
            self.wait.add(float(r[5]))

    def merge(self, other: QueueTotals) -> None:
        """Add ``other``'s counters and histograms to this one's."""
        self.done += other.done
        self.failed += other.failed
        self.released += other.released
        self.runtime.merge(other.runtime)
        self.wait.merge(other.wait)

    def to_dict(self) -> dict[str, Any]:
        """The totals as the journal stores them."""
        return {"done": self.done, "failed": self.failed, "released": self.released,
                "runtime": self.runtime.to_dict(), "wait": self.wait.to_dict()}

    @classmethod
    def from_dict(cls, d: Any) -> QueueTotals:
        """The totals ``to_dict`` wrote; zeros for what is missing, empty totals for a
        non-object."""
        if not isinstance(d, dict):
            return cls()
        return cls(int(d.get("done") or 0), int(d.get("failed") or 0), int(d.get("released") or 0),
                   Histogram.from_dict(d.get("runtime")), Histogram.from_dict(d.get("wait")))


def fold(records: Iterable[Sequence[Any]], into: dict[str, QueueTotals] | None = None) -> dict[str, QueueTotals]:
    """Add ``records`` to per-queue totals (a new dict unless ``into``)."""
    out = {} if into is None else into
    for r in records:
        t = out.get(r[1])
        if t is None:
            t = out[r[1]] = QueueTotals()
        t.add(list(r))
    return out
