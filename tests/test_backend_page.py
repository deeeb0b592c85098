"""``QueueOperations.page`` on real stores: every page of every state is the listing order of
``jobs``, sliced, and the dashboard's listing asks the backend for it."""

from __future__ import annotations

import time
from typing import Any

from conftest import make_job as job

from forge.backends.base import JobPage
from forge.dashboard import listing
from forge.job import Event, State

WORKER = "page-test"


def _mixed(b: Any) -> None:
    """Jobs of queue "p" in every state: 7 pending, 2 delayed, 1 reserved, 2 done, 2 failed."""
    b.push([job("p") for _ in range(12)] + [job("p", delay=3600) for _ in range(2)])
    for n in range(3):
        c = b.claim(["p"], WORKER, 60)
        assert c is not None
        if n < 2:
            b.ack(c, Event("done", c.attempt, time.time(), worker=WORKER, duration=0.01))
    for _ in range(2):
        c = b.claim(["p"], WORKER, 60)
        assert c is not None
        b.fail(c, Event("failed", c.attempt, time.time(), worker=WORKER, reason="exception", error="x"))


def test_every_page_of_every_state_is_the_listing_order(queue_target: Any) -> None:
    b = queue_target.backend
    _mixed(b)
    sizes = {State.PENDING: 7, State.DELAYED: 2, State.RESERVED: 1, State.DONE: 2, State.FAILED: 2}
    for state, size in sizes.items():
        order = [i.id for i in b.jobs(queue="p", state=state)]
        assert len(order) == size, state
        for limit in (1, 3, 50):
            seen: list[str] = []
            offset: int | None = 0
            while offset is not None:
                pg = listing.page(b, "p", state, offset=offset, limit=limit)
                assert isinstance(pg, JobPage) and pg.total == size and len(pg.jobs) <= limit
                assert all(i.state == state for i in pg.jobs)
                seen += [i.id for i in pg.jobs]
                offset = pg.next_offset
            assert seen == order, (state, limit)
    assert listing.page(b, "p", State.PENDING, offset=50).jobs == []


def test_the_listing_asks_the_backend_and_falls_back_to_jobs() -> None:
    class Paged:
        def page(self, queue: str, state: State, *, offset: int, limit: int, command: str | None) -> Any:
            return ("asked", queue, state, offset, limit, command)

    assert listing.page(Paged(), "q", State.DONE, offset=5, limit=7, command="c") == ("asked", "q", State.DONE, 5, 7, "c")

    class Unpaged:
        def jobs(self, **kw: Any) -> Any:
            return iter([f"j{n}" for n in range(kw["limit"])])

        def stats(self, queues: list[str]) -> list[Any]:
            return []

    pg = listing.page(Unpaged(), "q", State.PENDING, offset=2, limit=3)
    assert pg.jobs == ["j2", "j3", "j4"] and pg.next_offset == 5  # type: ignore[comparison-overlap]
