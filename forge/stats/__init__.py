"""Queue statistics from recorded job outcomes: ``compute_stats`` (``queue:stats``).

- ``records``: the outcome record (one line per finished attempt) and the running totals;
- ``journal``: where records are written (by the backends' ack, release and fail) and read;
- ``filejournal`` / ``redisjournal``: the two stores of the journal;
- ``compute``: the window's throughput, failure rate, percentiles and per-minute series.
"""

from __future__ import annotations

from forge.stats.compute import compute_stats
from forge.stats.journal import journal_for, record_outcome, write_record

__all__ = ["compute_stats", "journal_for", "record_outcome", "write_record"]
