"""What a worker raises: its own lifecycle, its jobs' lifecycle, and threshold crossings.

Where each job event is delivered, relative to the outcome's record (``Worker.record``):

1. the event's durable listener jobs are stored, keyed by the event id, *before* the outcome
   is recorded, retrying through an outage as the record does;
2. the outcome is recorded (ack, release, fail);
3. the in-process listeners run.

A worker killed before 2 leaves the claim unrecorded: the job is recovered and runs again, a
new attempt with a new claim token, so its events are new events (the ones already stored for
the lost attempt stay: that attempt did end so). A worker killed between 1 and 2 leaves the
listener jobs stored: nothing is lost, and pushing them again (a second worker, a retry of the
push) stores nothing, as their ids come from the event id. So each event's durable listeners
are dispatched exactly once, as long as the listener job is still kept when a copy of it is
pushed again (done jobs stay for ``done_retention``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from forge.events.bus import EventBus
from forge.events.config import Thresholds
from forge.events.model import MAX_ERROR, Event, event_id, job_data, rfc3339

if TYPE_CHECKING:
    from forge.backends.base import Backend, Claim
    from forge.job import Job
    from forge.worker.outcome import Outcome


#: All the in-process listeners of one ``job.started`` together take at most this long: the claim
#: is held meanwhile, and its lease (at least 10 s) must be renewed in time.
STARTED_TOTAL = 2.0


class WorkerEvents:
    """A worker's events (see the module docstring). ``durably`` retries a store call through
    an outage (the worker's ``_durably``); ``report`` is the worker's reporter."""

    def __init__(self, bus: EventBus, *, backend: Callable[[], Backend], name: str, queues: Sequence[str],
                 report: Callable[[str, dict[str, Any]], None], durably: Callable[[Callable[[], None]], None],
                 thresholds: Thresholds | None = None, default_tries: int = 1) -> None:
        self.bus = bus
        self._backend = backend
        self.name = name
        self.queues = list(queues)
        self.report = report
        self.durably = durably
        self.thresholds = thresholds or Thresholds()
        self.default_tries = default_tries
        self.started_at = time.time()
        self._stopping = False
        self._recovered: list[tuple[Job, int, Any]] = []
        self._watch: Any = None
        if self.thresholds.any_queue_threshold:
            from forge.events.thresholds import ThresholdWatch

            self._watch = ThresholdWatch(self.thresholds, name, self._deliver)

    @property
    def active(self) -> bool:
        """Whether any listener is configured."""
        return bool(self.bus.listeners)

    def _event(self, name: str, data: dict[str, Any], *about: object) -> Event:
        return Event(name, event_id(name, *about), time.time(), data)

    def _deliver(self, events: list[Event], local: bool = True) -> None:
        events = [e for e in events if self.bus.wants(e.name)]
        if not events:
            return
        self.bus.store(self._backend(), events)
        if local:
            self.bus.run_local(events)

    def _once(self, events: list[Event]) -> None:
        """Worker events: one try to store (a stopping worker must not hang on an outage)."""
        events = [e for e in events if self.bus.wants(e.name)]
        if not events:
            return
        try:
            self.bus.store(self._backend(), events)
        except Exception as exc:  # noqa: BLE001 - reported; the worker goes on
            self.report("events_failed", {"event_name": events[0].name, "error": str(exc)})
        self.bus.run_local(events)

    # -- the worker ----------------------------------------------------------------------------

    def _worker_data(self, **extra: Any) -> dict[str, Any]:
        return {"worker": self.name, "queues": self.queues, "started_at": rfc3339(self.started_at), **extra}

    def worker_started(self) -> None:
        """Raise ``worker.started`` (one try to store its listener jobs; never raises)."""
        self._once([self._event("worker.started", self._worker_data(), self.name, os.getpid(), self.started_at)])

    def worker_stopping(self, reason: str) -> None:
        """Raise ``worker.stopping`` once, however often it is called."""
        if self._stopping:
            return
        self._stopping = True
        self._once([self._event("worker.stopping", self._worker_data(reason=reason),
                                self.name, os.getpid(), self.started_at)])

    def worker_stopped(self, reason: str, jobs: int) -> None:
        """Raise ``worker.stopping`` (unless raised already), then ``worker.stopped``."""
        self.worker_stopping(reason)
        self._once([self._event("worker.stopped", self._worker_data(reason=reason, jobs=jobs),
                                self.name, os.getpid(), self.started_at)])

    def on_recovered(self, job: Job, attempt: int, record: Any) -> None:
        """The backend's hook (``on_recovered``): this worker's maintenance recovered a dead
        worker's claim, released or failed with reason ``abandoned`` (``record``: its event)."""
        self._recovered.append((job, attempt, record))

    def upkeep(self, backend: Backend) -> None:
        """At each maintenance pass (after it): the jobs it recovered, the queue thresholds."""
        recovered, self._recovered = self._recovered, []
        if recovered:
            self._once([e for job, attempt, record in recovered for e in self._abandoned(job, attempt, record)])
        if self._watch is None:
            return
        try:
            self._watch.check(backend)
        except Exception as exc:  # noqa: BLE001 - an outage or a full disk: next pass
            self.report("events_failed", {"event_name": "thresholds", "error": str(exc)})

    def _abandoned(self, job: Job, attempt: int, record: Any) -> list[Event]:
        failed = record.event == "failed"
        data = {**job_data(job, attempt), "worker": self.name, "started_at": None, "finished_at": rfc3339(record.at),
                "duration_ms": None, "exit_code": None, "reason": str(record.reason), "error": record.error}
        names = ["job.failed"] if failed else ["job.released"]
        if failed:
            data["failed_at"] = rfc3339(record.at)
        else:
            data.update(counted=True, retry_at=None)
            if attempt == int(self.thresholds.for_queue("retried_many", job.queue)):
                names.append("job.retried_many")
        out = []
        for n in names:
            extra = {"retries": attempt, "threshold": attempt} if n == "job.retried_many" else {}
            out.append(self._event(n, {**data, **extra}, job.id, "abandoned", attempt))
        return out

    # -- its jobs ------------------------------------------------------------------------------

    def job_started(self, claim: Claim, started: float) -> None:
        """Raise ``job.started`` before the job's code runs: its listener jobs stored durably,
        then the in-process listeners (``STARTED_TOTAL`` seconds at most, all together)."""
        if not self.bus.wants("job.started"):
            return
        data = {**job_data(claim.job, claim.attempt), "worker": self.name, "started_at": rfc3339(started)}
        ev = self._event("job.started", data, claim.job.id, claim.fence)
        self.durably(lambda: self._deliver([ev], local=False))
        self.bus.run_local([ev], total=STARTED_TOTAL)

    def outcome(self, claim: Claim, kind: str, outcome: Outcome, started: float, *,
                retry_in: float | None = None, counted: bool = True) -> list[Event]:
        """Before the outcome ``kind`` (``done``, ``failed``, ``released``) is recorded: build
        its events and store their durable listeners' jobs. Returns the events for ``after``."""
        job = claim.job
        reason = outcome.reason
        names = {"done": ["job.succeeded"], "failed": ["job.failed"], "released": ["job.released"]}[kind]
        if reason == "timeout":
            names.insert(0, "job.timed_out")
        elif reason == "cancelled":
            names.insert(0, "job.cancelled")
        retries = int(self.thresholds.for_queue("retried_many", job.queue))
        if kind == "released" and counted and retries and claim.attempt == retries:
            names.append("job.retried_many")
        names = [n for n in names if self.bus.wants(n)]
        if not names:
            return []
        now = time.time()
        error = outcome.error
        # A run cut short by a forced stop (reason ``interrupted``) has no exit code of its own.
        exit_code = None if reason == "interrupted" else outcome.exit_code
        data = {**job_data(job, claim.attempt), "worker": self.name, "started_at": rfc3339(started),
                "finished_at": rfc3339(now), "duration_ms": round((now - started) * 1000, 1),
                "exit_code": exit_code, "reason": reason,
                "error": error[:MAX_ERROR] if isinstance(error, str) else error}
        if kind == "released":
            data["counted"] = counted
            data["retry_at"] = rfc3339(now + retry_in) if retry_in is not None else None
        if kind == "failed":
            data["failed_at"] = rfc3339(now)
        events = []
        for n in names:
            extra = {"retries": claim.attempt, "threshold": retries} if n == "job.retried_many" else {}
            events.append(self._event(n, {**data, **extra}, job.id, claim.fence))
        self.durably(lambda: self._deliver(events, local=False))
        return events

    def after(self, events: list[Event]) -> None:
        """After the outcome is recorded: the in-process listeners."""
        if events:
            self.bus.run_local(events)


def for_worker(settings: Any, registry: Any, *, name: str, queues: Sequence[str],
               report: Callable[[str, dict[str, Any]], None], backend: Callable[[], Backend],
               durably: Callable[[Callable[[], None]], None], default_tries: int) -> WorkerEvents | None:
    """A worker's events, or None when the project has no listeners and no thresholds (then a
    worker pays nothing for events). Raises ``ConfigError`` for a durable listener whose command
    is not registered or whose arguments do not parse."""
    from forge.events.bus import build_bus
    from forge.events.config import events_config

    cfg = events_config(settings)
    bus = build_bus(settings, report, python=True)
    if not bus.listeners:
        return None
    check_listeners(bus, registry, settings)
    from forge.events.hooks import activate

    activate(bus)
    events = WorkerEvents(bus, backend=backend, name=name, queues=queues, report=report, durably=durably,
                          thresholds=cfg.thresholds, default_tries=default_tries)
    backend().on_recovered = events.on_recovered  # type: ignore[attr-defined]
    return events


def check_listeners(bus: EventBus, registry: Any, settings: Any) -> None:
    """Raise ``ConfigError`` for a durable listener whose command is not registered or whose
    arguments do not parse against it."""
    from forge.errors import ConfigError, UsageError
    from forge.registry.argcheck import check_job_args

    for lst in bus.durable:
        assert lst.command is not None
        spec = registry.get(lst.command)
        if spec is None:
            raise ConfigError(f'{lst.source}: listener command "{lst.command}" is not a registered command.',
                              hint="Fix the name (`forge list` shows the commands) or remove the listener.")
        try:
            check_job_args(spec, tuple(lst.args), str(settings.root))
        except UsageError as exc:
            raise ConfigError(f"{lst.source}: listener arguments do not parse: {exc.message}") from None
