"""Events raised outside a worker's job loop: by the process that dispatches a job
(``job.dispatched``), cancels a waiting one (``job.cancelled``, ``job.failed``), or runs the
scheduler (``schedule.tick_dispatched``, ``schedule.tick_skipped``).

Such a process delivers to the listeners of forge.toml (it does not import the project's
command modules, so ``@forge.on`` listeners are not known there), except inside a worker
(``queue:work --schedule``), which delivers to all of its listeners. Each call costs one
dictionary look-up when nothing listens.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from forge.events.model import Event, event_id, job_data, rfc3339

if TYPE_CHECKING:
    from forge.backends.base import Backend
    from forge.events.bus import EventBus
    from forge.job import Job, JobInfo

#: The bus of a worker in this process (``activate``): its Python listeners too.
ACTIVE: EventBus | None = None
_ACTIVE_PID = 0
_config_bus: dict[Any, EventBus] = {}


class EventWarning(UserWarning):
    """An event's listener jobs could not be stored; what raised it was not affected."""


def activate(bus: EventBus) -> None:
    """Make ``bus`` (a worker's) the one events raised in this process go to."""
    global ACTIVE, _ACTIVE_PID
    ACTIVE, _ACTIVE_PID = bus, os.getpid()


def _report(event: str, data: dict[str, Any]) -> None:
    warnings.warn(f"{event.replace('_', ' ')}: {data.get('error')} ({data.get('listener') or data.get('event_name')})",
                  EventWarning, stacklevel=3)


def bus_for(settings: Any) -> EventBus | None:
    """This process's bus: a worker's, else forge.toml's listeners (None when there are none)."""
    if ACTIVE is not None and _ACTIVE_PID == os.getpid():  # not in its job process
        return ACTIVE
    from forge.events.config import events_config

    cfg = events_config(settings)
    if not cfg.listeners:
        return None
    key = id(cfg)
    bus = _config_bus.get(key)
    if bus is None:
        from forge.events.bus import EventBus

        _config_bus.clear()
        bus = _config_bus[key] = EventBus(cfg.listeners, default_queue=settings.default_queue,
                                          budget=cfg.budget, report=_report)
    return bus


def _deliver(bus: EventBus, backend: Backend, events: list[Event]) -> None:
    events = [e for e in events if bus.wants(e.name)]
    if not events:
        return
    try:
        bus.store(backend, events)
    except Exception as exc:  # noqa: BLE001 - the dispatch (or tick) itself succeeded
        bus.report("events_failed", {"event_name": events[0].name, "error": str(exc)})
    bus.run_local(events)


def dispatched(settings: Any, backend: Backend, jobs: Sequence[Job], created: Iterable[bool]) -> None:
    """``job.dispatched`` for each job this dispatch stored (after it is stored)."""
    bus = bus_for(settings)
    if bus is None or not bus.wants("job.dispatched"):
        return
    now = time.time()
    events = [Event("job.dispatched", event_id("job.dispatched", j.id, j.dispatched_at), now,
                    {**job_data(j, 0), "available_at": rfc3339(j.available_at)})
              for j, new in zip(jobs, created, strict=False) if new and not j.metadata.get("forge_event")]
    if events:
        _deliver(bus, backend, events)


def cancelled(settings: Any, backend: Backend, info: JobInfo) -> None:
    """``job.cancelled`` and ``job.failed`` for a waiting job ``queue:cancel`` failed."""
    bus = bus_for(settings)
    if bus is None or not (bus.wants("job.cancelled") or bus.wants("job.failed")):
        return
    now = time.time()
    fail = info.failure
    at = fail.at if fail is not None else now
    data = {**job_data(info.job, info.attempts), "worker": None, "reason": "cancelled",
            "error": fail.error if fail is not None else None, "exit_code": None, "failed_at": rfc3339(at)}
    about = (info.job.id, at)
    _deliver(bus, backend, [Event(n, event_id(n, *about), now, data) for n in ("job.cancelled", "job.failed")])


def ticks(settings: Any, backend: Backend, actions: Iterable[Any]) -> None:
    """``schedule.tick_dispatched`` for each tick pushed (``dispatched``, or ``exists``: a run
    that pushed it was killed before it recorded so; the event's id makes it one event), and
    ``schedule.tick_skipped``."""
    bus = bus_for(settings)
    if bus is None:
        return
    names = {"dispatched": "schedule.tick_dispatched", "exists": "schedule.tick_dispatched",
             "skipped": "schedule.tick_skipped"}
    now = time.time()
    events = []
    for a in actions:
        name = names.get(a.action)
        if name is None or not bus.wants(name):
            continue
        data = {"entry": a.entry, "tick": rfc3339(a.tick), "job_id": a.job_id,
                "lateness": round(a.lateness, 3) if a.job_id else None}
        events.append(Event(name, event_id(name, a.entry, a.tick), now, data))
    if events:
        _deliver(bus, backend, events)
