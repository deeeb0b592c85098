"""A limited claim (``[limits]``, the ``limits`` script) whose reply is lost must not orphan the
job it took, as a plain claim's does not (tests/test_redis_lost_reply.py): the retry, sent with
the same token, gets the same job, attempt 1, and the slots it holds, and nothing stays reserved
by no one."""

from __future__ import annotations

import os
import time
from typing import Any

import pytest

from forge.job import Event
from forge.limits.spec import LimitsConfig, QueueLimits
from tests import test_redis_lost_reply as lost

pytestmark = pytest.mark.skipif(not os.environ.get("FORGE_TEST_REDIS_URL"), reason="FORGE_TEST_REDIS_URL is not set")
proxied = lost.proxied  # the TCP proxy that drops one claim's reply, and the backends around it
WORKER, _jobs = lost.WORKER, lost._jobs

CFG = LimitsConfig(queues={"default": QueueLimits(parallel=2)})


def test_a_limited_claim_retried_after_its_reply_was_lost_gets_the_job_it_took(proxied: Any) -> None:
    proxy, backend, direct = proxied
    jobs = _jobs(3)
    direct.push(jobs)
    proxy.drop_claim()
    c = backend.claim_limited(["default"], WORKER, 60, CFG)  # the client's retry gets an answer
    assert proxy.dropped.is_set()
    assert c is not None and c.job.id == jobs[0].id and c.attempt == 1
    assert c.holds is not None and c.holds.scopes == ["p:default"]  # its slot comes back with it
    (st,) = direct.stats(["default"])
    assert (st.reserved, st.size) == (1, 2), "no job left reserved by no one"
    info = direct.find(jobs[0].id)
    assert info.attempts == 1 and [e.event for e in info.events] == ["claimed"]
    assert [h["job"] for h in direct.slot_holders("p:default")] == [jobs[0].id]  # one slot, not two
    backend.ack(c, Event("done", 1, time.time(), worker=WORKER))
    backend.release_holds(c.holds)
    nxt = backend.claim_limited(["default"], WORKER, 60, CFG)
    assert nxt is not None and nxt.job.id == jobs[1].id  # a new claim takes the next job
    assert [h["job"] for h in direct.slot_holders("p:default")] == [jobs[1].id]
