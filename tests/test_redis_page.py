"""``RedisBackend.page``: a page of one queue and state at any depth, in ``jobs``' order."""

from __future__ import annotations

import time
from typing import Any

import pytest
from conftest import make_job

from forge.errors import UsageError
from forge.job import Event, State

pytestmark = pytest.mark.redis


@pytest.fixture
def backend(redis_backend: Any) -> Any:
    """conftest's Redis backend under a prefix of its own."""
    return redis_backend


def _walk(b: Any, state: State, limit: int, command: str | None = None) -> list[str]:
    seen: list[str] = []
    offset: int | None = 0
    while offset is not None:
        pg = b.page("pq", state, offset=offset, limit=limit, command=command)
        seen += [j.id for j in pg.jobs]
        assert offset is not None and pg.offset == offset
        offset = pg.next_offset
    return seen


def test_pages_follow_the_listing_in_every_state(backend: Any) -> None:
    jobs = [make_job(queue="pq", command="a:x" if i % 3 else "b:y") for i in range(45)]
    backend.push(jobs)
    backend.push([make_job(queue="pq", delay=3600) for _ in range(4)])
    for _ in range(5):  # five done, four failed, three running
        c = backend.claim(["pq"], "w", 60)
        backend.ack(c, Event("done", c.attempt, time.time()))
    for _ in range(4):
        c = backend.claim(["pq"], "w", 60)
        backend.fail(c, Event("failed", c.attempt, time.time(), reason="exception"))
    running = [backend.claim(["pq"], "w", 60) for _ in range(3)]
    assert all(running)
    for state in (State.PENDING, State.DELAYED, State.RESERVED, State.FAILED, State.DONE):
        listed = [i.id for i in backend.jobs(queue="pq", state=state)]
        assert listed, state
        for limit in (1, 4, 50):
            assert _walk(backend, state, limit) == listed, (state, limit)
        assert backend.page("pq", state, limit=50).total == len(listed)
    deep = backend.page("pq", State.PENDING, offset=30, limit=10)
    pending = [i.id for i in backend.jobs(queue="pq", state=State.PENDING)]
    assert [j.id for j in deep.jobs] == pending[30:33] and deep.next_offset is None
    assert deep.prev_offset == 20


def test_the_command_filter_scans_and_says_where_it_stopped(backend: Any) -> None:
    jobs = [make_job(queue="pq", command="b:y" if i in (2, 9) else "a:x") for i in range(12)]
    backend.push(jobs)
    first = backend.page("pq", State.PENDING, limit=1, command="b:y")
    assert [j.id for j in first.jobs] == [jobs[2].id] and first.next_offset == 3
    second = backend.page("pq", State.PENDING, offset=3, limit=1, command="b:y")
    assert [j.id for j in second.jobs] == [jobs[9].id] and second.next_offset == 10
    assert second.total == 12  # every pending job, not only the matches
    assert _walk(backend, State.PENDING, 5, command="b:y") == [jobs[2].id, jobs[9].id]
    assert backend.page("pq", State.PENDING, limit=5, command="c:z").jobs == []


def test_an_empty_or_unknown_queue_is_an_empty_page_and_a_bad_name_is_refused(backend: Any) -> None:
    pg = backend.page("nothing-here", State.FAILED)
    assert (pg.jobs, pg.total, pg.next_offset) == ([], 0, None)
    with pytest.raises(UsageError):
        backend.page("bad name", State.PENDING)
