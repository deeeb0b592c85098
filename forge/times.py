"""Times as forge's JSON outputs print them: RFC 3339 in UTC with milliseconds.

A bottom module (it imports nothing of forge's), so the job record, the events and every
listing print one format without importing the queue API for it.
"""

from __future__ import annotations

from datetime import UTC, datetime


def rfc3339(t: float | None) -> str | None:
    """A Unix time as RFC 3339 in UTC with milliseconds (``2026-12-01T09:00:00.000Z``); None for None."""
    if t is None:
        return None
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
