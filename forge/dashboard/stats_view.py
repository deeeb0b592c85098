"""The overview's sparklines: per-minute throughput and wait time per queue, from ``forge.stats``.

They come from the outcome journal that ``forge.stats`` keeps (one record per finished
attempt, on both backends): ``compute_stats`` gives one series for the queues it is asked
about, so the journal's window is read once here and bucketed per queue and minute, with the
same nearest-rank median (``forge.stats.compute.percentile``). Reading it can take a while on a
big store, so the result is cached and refreshed off the request path (``refresh``, from the
live-update loop) every ``TTL`` seconds; a page renders whatever is cached. Without the stats
module, the overview simply has no sparklines.
"""

from __future__ import annotations

import time
from typing import Any

#: The sparklines' window, in seconds, and how often it is computed again: every ``TTL``
#: seconds, or ``LOAD_FACTOR`` times what reading the journal took, whichever is longer.
WINDOW = 3600.0
TTL = 10.0
LOAD_FACTOR = 50


class StatsCache:
    """The per-minute throughput and wait series of the dashboard's queues, computed from the
    stats journal at most once per ``ttl`` seconds (longer when computing them is slow);
    unavailable without the stats modules."""

    def __init__(self, manager: Any, window: float = WINDOW, ttl: float = TTL) -> None:
        self.manager = manager
        self.window = window
        self.ttl = ttl
        self._series: dict[str, dict[str, list[float]]] | None = None
        self._at = float("-inf")
        self._cost = 0.0
        self._fn: Any = None
        try:
            from forge.stats.compute import percentile
            from forge.stats.journal import journal_for

            self._fn = journal_for
            self._median = percentile
        except ImportError:
            self._fn = None

    @property
    def available(self) -> bool:
        """Whether the stats modules are installed, so the series can be computed."""
        return self._fn is not None

    @property
    def window_label(self) -> str:
        """The window as people read it: ``1h``, ``30m``."""
        return f"{self.window / 3600:g}h" if self.window >= 3600 else f"{self.window / 60:g}m"

    def series(self) -> dict[str, dict[str, list[float]]] | None:
        """Queue -> {"done": [...], "failed": [...], "wait": [...]} per minute (oldest first),
        as last computed; None before the first computation."""
        return self._series

    def stale(self) -> bool:
        """Whether the series should be computed again: ``ttl`` has passed, or ``LOAD_FACTOR``
        times the last computation's cost if that is longer."""
        return self._fn is not None and time.monotonic() - self._at >= max(self.ttl, self._cost * LOAD_FACTOR)

    def empty(self) -> dict[str, list[float]]:
        """The series of a queue with no finished job in the window (a flat line)."""
        n = max(int(self.window // 60), 1)
        return {"done": [0.0] * n, "failed": [0.0] * n, "wait": [0.0] * n}

    def refresh(self) -> bool:
        """Compute the series again (blocking); True if they changed."""
        if self._fn is None:
            return False
        self._at = time.monotonic()
        now = time.time()
        try:
            records = self._fn(self.manager.backend).read(now - self.window, now)
        except Exception:
            return False  # a store hiccup: keep what was shown
        series = per_queue(records, now, self.window, self._median)
        self._cost = time.monotonic() - self._at
        changed = series != self._series
        self._series = series
        return changed


def per_queue(records: list[Any], now: float, window: float, median: Any) -> dict[str, dict[str, list[float]]]:
    """Queue -> per-minute done and failed counts and median first-claim wait, oldest minute
    first, from journal records ``[t, queue, command, outcome, attempt, wait, runtime]``."""
    minutes = max(int(window // 60), 1)
    last = int(now // 60)
    done: dict[str, list[float]] = {}
    failed: dict[str, list[float]] = {}
    waits: dict[str, list[list[float]]] = {}
    for r in records:
        try:
            i = minutes - 1 - (last - int(r[0] // 60))
            queue, outcome, wait = r[1], r[3], r[5]
        except (TypeError, IndexError, ValueError):
            continue
        if not 0 <= i < minutes or not isinstance(queue, str):
            continue
        if queue not in done:
            done[queue], failed[queue] = [0.0] * minutes, [0.0] * minutes
            waits[queue] = [[] for _ in range(minutes)]
        if outcome == "done":
            done[queue][i] += 1
        elif outcome == "failed":
            failed[queue][i] += 1
        if isinstance(wait, int | float):
            waits[queue][i].append(float(wait))
    return {q: {"done": done[q], "failed": failed[q],
                "wait": [float(median(sorted(w), 50) or 0.0) for w in waits[q]]} for q in done}


def sparkline(values: list[float], width: int = 120, height: int = 24) -> dict[str, Any] | None:
    """SVG polyline points for ``values`` (scaled to the box), the latest and the peak value."""
    if not values:
        return None
    peak = max(values)
    n = len(values)
    step = width / max(n - 1, 1)
    scale = (height - 2) / peak if peak > 0 else 0.0
    pts = " ".join(f"{i * step:.1f},{height - 1 - v * scale:.1f}" for i, v in enumerate(values))
    return {"points": pts, "width": width, "height": height, "last": values[-1], "peak": peak,
            "total": sum(values)}
