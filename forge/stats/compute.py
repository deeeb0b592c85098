"""``compute_stats``: throughput, failure rate, runtime and wait percentiles over a window.

Computed from the outcome journal (``forge.stats.journal``) plus the store's live counts (for
the oldest pending job), so every process that reads the same store gets the same answer, and
a restart loses nothing.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from forge.config import validate_queue_name
from forge.errors import UsageError
from forge.stats.journal import journal_for

if TYPE_CHECKING:
    from forge.queue.manager import QueueManager

#: The version of the stats document (``queue:stats --json``'s ``stats``).
STATS_VERSION = 1
#: At most this many points in ``series``: a window longer than six hours gets wider steps.
MAX_POINTS = 360
GROUPINGS = ("queue", "command")


def percentile(values: Sequence[float], p: float) -> float | None:
    """The nearest-rank ``p``-th percentile of sorted ``values`` (None when empty)."""
    if not values:
        return None
    return values[max(0, math.ceil(p / 100 * len(values)) - 1)]


def _summary(done: int, failed: int, released: int, runtimes: list[float], waits: list[float],
             minutes: float) -> dict[str, Any]:
    runtimes.sort()
    waits.sort()
    finished = done + failed
    return {
        "done": done,
        "failed": failed,
        "retried": released,
        "failure_rate": round(failed / finished, 6) if finished else None,
        "done_per_minute": round(done / minutes, 3),
        "failed_per_minute": round(failed / minutes, 3),
        "runtime": _dist(runtimes),
        "wait": _dist(waits),
    }


def _dist(values: list[float]) -> dict[str, Any]:
    return {"count": len(values),
            "p50": percentile(values, 50), "p95": percentile(values, 95), "p99": percentile(values, 99),
            "mean": round(sum(values) / len(values), 6) if values else None,
            "max": values[-1] if values else None}


def _tally(records: list[Any]) -> list[Any]:
    """[done, failed, released, runtimes, waits] of ``records``."""
    outcomes = [r[3] for r in records]
    return [outcomes.count("done"), outcomes.count("failed"), outcomes.count("released"),
            [r[6] for r in records if r[6] is not None], [r[5] for r in records if r[5] is not None]]


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def _manager(manager: Any) -> Any:
    if manager is None or isinstance(manager, str):
        from forge.queue.manager import QueueManager

        return QueueManager(manager)
    return manager


def compute_stats(manager: QueueManager | str | None, *, since: float, queues: list[str] | None = None,
                  by: str = "queue", now: float | None = None) -> dict[str, Any]:
    """Stats of the last ``since`` seconds, JSON-ready (times in RFC 3339).

    ``manager``: a ``forge.QueueManager``, or a connection name (None: the default connection).
    ``queues``: only these queues. ``by``: ``"queue"`` or ``"command"``, what ``groups`` are per.

    Returns ``{"window": {...}, "totals": {...}, "groups": [...], "series": [...]}``: ``totals``
    and each group hold done, failed, retried, failure_rate, done_per_minute, failed_per_minute,
    runtime and wait distributions (count, p50, p95, p99, mean, max, in seconds); ``series`` is
    one point per step (a minute up to six hours) with done, failed, retried, wait_p50 and
    runtime_p50; ``oldest_pending_age`` (seconds) is per queue (also with ``by="command"``, in
    ``queues``). Raises ``UsageError`` for a bad window, grouping or queue name.
    """

    if by not in GROUPINGS:
        raise UsageError(f"Invalid grouping {by!r}: use queue or command.")
    if not isinstance(since, int | float) or not since > 0 or math.isinf(since):
        raise UsageError(f"Invalid window {since!r}: a positive number of seconds, e.g. 3600.")
    names = [validate_queue_name(q) for q in queues] if queues else None
    # 100,000 records are 100,000 small lists: the cyclic collector would scan them again and
    # again while they are built (40% of the time) and can free none of them (no cycles).
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _compute(manager, since, names, by, now)
    finally:
        if enabled:
            gc.enable()


def _compute(manager: Any, since: float, names: list[str] | None, by: str, now: float | None) -> dict[str, Any]:
    from forge.times import rfc3339

    m = _manager(manager)
    backend = m.backend
    now = time.time() if now is None else float(now)
    start = now - since
    records = journal_for(backend).read(start, now)
    if names is not None:
        wanted = set(names)
        records = [r for r in records if r[1] in wanted]
    live = {s.queue: s for s in backend.stats(names)}
    minutes = since / 60.0

    step = 60 * max(1, math.ceil(since / 60 / MAX_POINTS))
    first_slot = int(start // step)
    slots = int(now // step) - first_slot + 1
    key_index = 1 if by == "queue" else 2
    # Comprehensions and one grouping pass: with 100,000 records every per-record step counts.
    grouped: dict[str, list[Any]] = {}
    for r in records:
        g = grouped.get(r[key_index])
        if g is None:
            grouped[r[key_index]] = [r]
        else:
            g.append(r)
    groups = {name: _tally(rs) for name, rs in grouped.items()}
    done, failed, released, all_run, all_wait = _tally(records)
    s_done, s_failed, s_released = [0] * slots, [0] * slots, [0] * slots
    counters = {"done": s_done, "failed": s_failed, "released": s_released}
    s_wait: list[list[float]] = [[] for _ in range(slots)]
    s_run: list[list[float]] = [[] for _ in range(slots)]
    for r in records:
        i = int(r[0] // step) - first_slot
        counters[r[3]][i] += 1
        if r[5] is not None:
            s_wait[i].append(r[5])
        if r[6] is not None:
            s_run[i].append(r[6])

    oldest: dict[str, float | None] = {
        q: (max(now - s.oldest_pending_at, 0.0) if s.oldest_pending_at else None) for q, s in live.items()}
    ages = [a for a in oldest.values() if a is not None]
    totals = _summary(done, failed, released, all_run, all_wait, minutes)
    totals["oldest_pending_age"] = round(max(ages), 3) if ages else None
    totals["pending"] = sum(s.pending for s in live.values())
    out_groups = []
    names_seen = set(groups)
    if by == "queue":
        names_seen |= set(live)
    for name in sorted(names_seen):
        g = groups.get(name) or [0, 0, 0, [], []]
        item = {by: name, **_summary(g[0], g[1], g[2], g[3], g[4], minutes)}
        if by == "queue":
            s = live.get(name)
            item["pending"] = s.pending if s else 0
            age = oldest.get(name)
            item["oldest_pending_age"] = round(age, 3) if age is not None else None
        out_groups.append(item)
    series = []
    for i in range(slots):
        w, rt = sorted(s_wait[i]), sorted(s_run[i])
        series.append({"t": rfc3339((first_slot + i) * step), "done": s_done[i], "failed": s_failed[i],
                       "retried": s_released[i], "wait_p50": percentile(w, 50), "runtime_p50": percentile(rt, 50)})
    return {
        "window": {"since": rfc3339(start), "until": rfc3339(now), "seconds": since, "step_seconds": step},
        "by": by,
        "totals": totals,
        "groups": out_groups,
        "queues": [{"queue": q, "pending": s.pending, "delayed": s.delayed, "reserved": s.reserved,
                    "failed": s.failed, "paused": s.paused,
                    "oldest_pending_age": _round(oldest.get(q))}
                   for q, s in sorted(live.items())],
        "series": series,
    }
