"""One page of a queue's jobs in one state, at any depth, cheaply on both backends.

``Backend.jobs`` reads every record it yields, so skipping to job 90,000 through it would read
90,000 records. ``QueueOperations.page`` finds a page from what each store keeps sorted without
reading records (the file backend: its directory listings; Redis: its lists and sorted sets),
and reads only the page's own records. Pages are by offset in listing order (page 3 of pending
is jobs 100-149 from the head). A ``command`` filter has to read records: it scans forward
from the offset, at most ``SCAN_BUDGET`` records per page, and says where it stopped
(``next_offset``).

This module is the dashboard's side: ``page`` asks the backend, or, for a backend without
``page``, reads through ``Backend.jobs``.
"""

from __future__ import annotations

from typing import Any

from forge.backends.base import PAGE_SCAN_BUDGET, JobPage, QueueStats
from forge.job import State

#: Records a filtered page reads at most before it returns what it found.
SCAN_BUDGET = PAGE_SCAN_BUDGET
#: The states a job list shows, in the order of its tabs.
STATES = (State.RESERVED, State.PENDING, State.DELAYED, State.FAILED, State.DONE)
#: A page of jobs (``forge.backends.base.JobPage``).
Page = JobPage


def page(backend: Any, queue: str, state: State, *, offset: int = 0, limit: int = 50,
         command: str | None = None, dirs: Listings | None = None) -> JobPage:
    """The page of ``queue``'s jobs in ``state`` starting at ``offset`` (listing order: reserved,
    pending and delayed oldest first, failed and done newest first): ``backend.page``. ``dirs``
    is accepted for older callers and unused: a file backend keeps its own listings."""
    fn = getattr(backend, "page", None)
    if fn is not None:
        result: JobPage = fn(queue, state, offset=offset, limit=limit, command=command)
        return result
    return _generic_page(backend, queue, state, offset, limit, command)


class Listings:
    """A file backend's reusable listings (a dashboard keeps one, for its stats): see
    ``forge.backends.file.admin.Listings``."""

    def __init__(self, backend: Any) -> None:
        self._listings = backend.listings

    def stats(self, queues: list[str] | None = None) -> list[QueueStats]:
        """What ``stats`` returns, from the reusable listings (a change made within a quarter
        of a second of the last look may not be counted yet)."""
        result: list[QueueStats] = self._listings.stats(queues)
        return result


def _generic_page(b: Any, queue: str, state: State, offset: int, limit: int, command: str | None) -> JobPage:
    """A backend without ``page``: through ``Backend.jobs`` (reads every record up to the page)."""
    jobs = list(b.jobs(queue=queue, state=state, command=command, limit=offset + limit + 1))
    more = len(jobs) > offset + limit
    total = next((getattr(s, str(state), 0) for s in b.stats([queue])), len(jobs))
    return JobPage(jobs[offset:offset + limit], total, offset, limit, offset + limit if more else None)
