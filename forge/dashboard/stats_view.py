"""The overview's sparklines: per-minute throughput and wait time per queue, from ``forge.stats``.

``forge.stats.compute_stats`` reads the recorded job history (it can take a while on a big
store), so its result is cached and refreshed off the request path (``refresh``, from the
live-update loop) every ``TTL`` seconds; a page renders whatever is cached. Without the stats
module (an older forge), the overview simply has no sparklines.
"""

from __future__ import annotations

import time
from typing import Any

#: The sparklines' window, in seconds, and how often it is computed again.
WINDOW = 3600.0
TTL = 30.0


class StatsCache:
    def __init__(self, manager: Any, window: float = WINDOW, ttl: float = TTL) -> None:
        self.manager = manager
        self.window = window
        self.ttl = ttl
        self._series: dict[str, dict[str, list[float]]] | None = None
        self._at = float("-inf")
        self._fn: Any = None
        try:
            from ..stats import compute_stats

            self._fn = compute_stats
        except ImportError:
            self._fn = None

    @property
    def available(self) -> bool:
        return self._fn is not None

    @property
    def window_label(self) -> str:
        return f"{self.window / 3600:g}h" if self.window >= 3600 else f"{self.window / 60:g}m"

    def series(self) -> dict[str, dict[str, list[float]]] | None:
        """Queue -> {"done": [...], "failed": [...], "wait": [...]} per minute (oldest first),
        as last computed; None before the first computation."""
        return self._series

    def stale(self) -> bool:
        return self._fn is not None and time.monotonic() - self._at >= self.ttl

    def refresh(self) -> bool:
        """Compute the series again (blocking); True if they changed."""
        if self._fn is None:
            return False
        self._at = time.monotonic()
        try:
            result = self._fn(self.manager, since=self.window, by="queue")
        except Exception:
            return False  # a store hiccup: keep what was shown
        series = parse_series(result, self.window)
        changed = series != self._series
        self._series = series
        return changed


def _num(v: Any) -> float:
    try:
        return float(v) if v is not None else 0.0
    except (TypeError, ValueError):
        return 0.0


def _groups(result: Any) -> list[tuple[str, Any]]:
    """(queue, group) pairs of a ``compute_stats`` result, whichever container it uses."""
    if not isinstance(result, dict):
        return []
    groups = result.get("groups", result.get("queues", []))
    if isinstance(groups, dict):
        return [(str(k), v) for k, v in groups.items()]
    out = []
    for g in groups if isinstance(groups, list) else []:
        if isinstance(g, dict):
            name = g.get("queue", g.get("key", g.get("name")))
            if isinstance(name, str):
                out.append((name, g))
    return out


def parse_series(result: Any, window: float) -> dict[str, dict[str, list[float]]]:
    minutes = max(int(window // 60), 1)
    out: dict[str, dict[str, list[float]]] = {}
    for name, g in _groups(result):
        buckets = g.get("series") if isinstance(g, dict) else None
        if not isinstance(buckets, list):
            continue
        done, failed, wait = [], [], []
        for b in buckets[-minutes:]:
            if not isinstance(b, dict):
                continue
            done.append(_num(b.get("done")))
            failed.append(_num(b.get("failed")))
            w = b.get("wait_p50", b.get("wait", {}).get("p50") if isinstance(b.get("wait"), dict) else None)
            wait.append(_num(w))
        out[name] = {"done": done, "failed": failed, "wait": wait}
    return out


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
