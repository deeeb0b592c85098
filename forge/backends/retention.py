"""Retention: how long a backend keeps finished jobs and captured output, decided once for all.

Every backend applies the same policy to ``done_retention`` (``queue.done_retention``):

* ``> 0``: an acknowledged job is kept in done for that many seconds, then a maintenance pass
  deletes it;
* ``0``: an acknowledged job is deleted at once (maintenance deletes any done job left over);
* ``< 0``: an acknowledged job is deleted at once and maintenance prunes no done job.

Failed jobs are kept until ``queue:flush`` or ``queue:forget``; ``flush`` and ``prune_done`` with
``older_than`` delete the jobs that finished at least that many seconds ago. A job's captured
output is kept up to ``LOG_CAP`` bytes and goes when its job is deleted.
"""

from __future__ import annotations

#: Seconds a done job is kept when nothing is configured (``queue.done_retention = "1h"``).
DONE_RETENTION = 3600.0
#: Bytes of a job's captured output that are kept; later output is dropped.
LOG_CAP = 1024 * 1024


def keeps_done(done_retention: float) -> bool:
    """Whether an acknowledged job is kept in done (True) or deleted at once (False)."""
    return done_retention > 0


def prune_age(done_retention: float) -> float | None:
    """How old (seconds since it finished) a done job must be for maintenance to delete it;
    None when maintenance deletes no done job."""
    return done_retention if done_retention >= 0 else None


def cutoff(now: float, older_than: float | None) -> float | None:
    """The latest finish time (Unix) of the jobs a deletion of those ``older_than`` seconds
    removes, as of ``now``: a job that finished at or before it goes; None: all of them."""
    return None if older_than is None else now - older_than

