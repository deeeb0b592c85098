"""Run-time controls enforced when a job is claimed: isolation locks, per-queue parallelism,
rate limits and per-key concurrency (``[limits]`` in forge.toml, or per dispatch).

- ``spec``: the limits as data: rates, a job's own limits (kept in its metadata under
  ``forge.limits``), the configured table, and the holds a job needs before it may start.
- ``gate``: the worker's side: claims through the limits, holds released when a run ends.
- ``isolation``: what ``isolated=`` declares and the lock key of a run (a direct run holding
  the lock is ``forge.registry.isolated``).
- ``inspect``: why a job waits, and the state of every limit (``queue:limits``).

Each backend keeps the holds in its own store (``backends/file/limits.py``: files and flock;
``backends/redis/limits.py`` with ``redis/scripts/limits.lua``). Nothing here is imported on the plain
claim path: a worker with no limits configured claims exactly as before.
"""

from __future__ import annotations

#: The job metadata key that carries a job's own limits (written by dispatch).
LIMITS_KEY = "forge.limits"
#: The reason recorded on a job dropped because its isolation lock was held (``on_busy="drop"``).
REASON_ISOLATED = "isolated"

__all__ = ["LIMITS_KEY", "REASON_ISOLATED"]
