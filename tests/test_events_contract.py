"""The events' part of the backend contract, against every backend (file; Redis with
FORGE_TEST_REDIS_URL): listener jobs keyed by the event id are stored once however often they
are pushed, and threshold marks let one of many watchers raise each crossing."""

from __future__ import annotations

from typing import Any

from conftest import make_job

from forge.events.bus import EventBus
from forge.events.config import Thresholds
from forge.events.listeners import Listener
from forge.events.model import META_KEY, Event, event_id
from forge.events.thresholds import RESEND_AFTER, ThresholdWatch, marks_for
from forge.job import State, is_idempotent_id


def _bus(*listeners: Listener, reports: list[Any] | None = None) -> EventBus:
    def report(event: str, data: dict[str, Any]) -> None:
        if reports is not None:
            reports.append((event, data))

    return EventBus(listeners, default_queue="default", budget=0.1, report=report)


NOTIFY = Listener(("job.failed",), "test", command="demo:sleep", args=("0",), queue="notifications", tries=3)


def test_an_events_listener_job_is_stored_once_however_often_it_is_pushed(backend: Any) -> None:
    ev = Event("job.failed", event_id("job.failed", "some-job", 1), 1.0, {"job_id": "some-job", "queue": "default"})
    other = Event("job.failed", event_id("job.failed", "some-job", 2), 1.0, {"job_id": "some-job"})
    first, second = _bus(NOTIFY), _bus(NOTIFY)  # two processes raising the same event
    assert first.store(backend, [ev]) == 1
    assert second.store(backend, [ev]) == 0
    assert first.store(backend, [ev, other]) == 1
    jobs = list(backend.jobs(queue="notifications"))
    assert len(jobs) == 2 and all(is_idempotent_id(j.id) and j.state == State.PENDING for j in jobs)
    stored = {j.job.metadata[META_KEY]["id"]: j.job for j in jobs}
    assert set(stored) == {ev.id, other.id}
    job = stored[ev.id]
    assert job.command == "demo:sleep" and job.args == ("0",) and job.max_attempts == 3
    assert job.metadata[META_KEY]["event"] == "job.failed" and job.metadata[META_KEY]["job_id"] == "some-job"


def test_durable_listeners_skip_listener_jobs_and_unmatched_events(backend: Any) -> None:
    only_imports = Listener(("job.*",), "test", command="demo:sleep", args=("0",), match={"queue": "imp*"})
    bus = _bus(only_imports)
    events = [Event("job.failed", "1", 0.0, {"queue": "imports"}),
              Event("job.failed", "2", 0.0, {"queue": "emails"}),
              Event("job.failed", "3", 0.0, {"queue": "imports", "listener_job": True}),
              Event("worker.started", "4", 0.0, {"queue": "imports"})]
    assert [j.metadata[META_KEY]["id"] for j in bus.jobs_for(events)] == ["1"]
    assert bus.store(backend, events) == 1


def test_a_threshold_crossing_is_raised_by_one_of_many_watchers_and_rearms(backend: Any) -> None:
    raised: list[tuple[str, Event, bool]] = []
    watchers = [ThresholdWatch(Thresholds(too_long={"*": 2}), f"w{i}",
                               lambda evs, local, i=i: raised.extend((f"w{i}", e, local) for e in evs))
                for i in range(3)]
    backend.push([make_job("held") for _ in range(3)])
    for _ in range(2):
        for w in watchers:
            w.check(backend)
    assert len(raised) == 1 and raised[0][1].name == "queue.too_long" and raised[0][2]
    assert raised[0][1]["pending"] == 3 and raised[0][1]["queue"] == "held"
    assert backend.clear("held") == 3
    watchers[1].check(backend)  # sees it cleared: re-armed
    backend.push([make_job("held") for _ in range(3)])
    for w in watchers:
        w.check(backend)
    assert len(raised) == 2 and raised[1][1].id != raised[0][1].id


def test_a_crossing_whose_raiser_died_before_sending_is_sent_by_another(backend: Any) -> None:
    now = [1000.0]
    marks = marks_for(backend)
    backend.push([make_job("held") for _ in range(3)])
    ev = Event("queue.too_long", "crossing-1", now[0], {"queue": "held"})
    assert marks.create("too_long.held", ev.to_dict())  # its raiser was killed here
    assert not marks.create("too_long.held", ev.to_dict())
    sent: list[tuple[str, bool]] = []
    watch = ThresholdWatch(Thresholds(too_long={"*": 2}), "w", lambda evs, local: sent.extend(
        (e.id, local) for e in evs), clock=lambda: now[0])
    watch.check(backend)
    assert sent == []  # it may still be sending
    now[0] += RESEND_AFTER + 1
    watch.check(backend)
    assert sent == [("crossing-1", False)]  # the same event, durable listeners only
    assert marks.read("too_long.held")[1]
    watch.check(backend)
    assert len(sent) == 1


def test_in_process_listeners_are_cut_off_at_their_budget_and_a_total() -> None:
    """Budgets in this (the main) thread: each listener is cut off at its own, and all of one
    call together at ``total`` (what a worker gives job.started's listeners)."""
    import time

    calls: list[str] = []

    def hang(event: Event) -> None:
        calls.append(event.id)
        time.sleep(30)

    reports: list[Any] = []
    bus = _bus(Listener(("job.started",), "a", fn=hang, budget=1.0), Listener(("job.started",), "b", fn=hang),
               reports=reports)
    start = time.monotonic()
    bus.run_local([Event("job.started", "e1", 0.0, {})], total=0.3)
    took = time.monotonic() - start
    assert calls == ["e1", "e1"] and took < 0.9, took  # 0.3 and a margin, not 1.0 + 0.1, nor 30
    slow = [d for name, d in reports if name == "listener_slow"]
    assert [d["listener"] for d in slow] == ["a", "b"] and all(d["cut_off"] for d in slow)
    assert slow[0]["budget_ms"] == 300
