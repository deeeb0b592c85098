"""Delivering events: durable listeners as jobs (keyed by the event id), in-process listeners
called within a time budget.

Durable delivery is *at least once, deduplicated by the event id*: a listener job's id is
derived from ``event:<event id>:<listener>`` (an idempotency key), so pushing it again after a
crash, or from a second process that raised the same event, stores nothing. In-process delivery
is at most once: a listener runs in the process that raised the event, after the event's
durable listeners are stored.
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from forge.events.listeners import Listener
from forge.events.model import Event

if TYPE_CHECKING:
    from forge.backends.base import Backend
    from forge.job import Job

Report = Callable[[str, dict[str, Any]], None]


class ListenerTimeout(BaseException):
    """Raised inside an in-process listener that overran its budget (a BaseException, so an
    ``except Exception`` in the listener does not swallow it)."""


#: How many ListenerTimeouts (one every 10 ms past the budget) a listener may swallow (a bare
#: ``except:`` in a retry loop) before the worker gives up on it and exits (code 1, as a forced
#: stop): nothing else can take the main thread back from it. Counted, not timed, so a loaded
#: machine that delivers the timer late never ends a listener that caught one or two.
MAX_SWALLOWED = 100


def _abandon(lst: Listener, ev: Event, budget: float) -> None:
    """End the worker from the timer signal: the listener swallowed MAX_SWALLOWED cut-offs."""
    import os

    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    msg = (f"{stamp} Listener {lst.source} for {ev.name} swallowed {MAX_SWALLOWED} cut-offs past its "
           f"{budget * 1000:g} ms budget (a bare except?); the worker exits (code 1) so it cannot hang. "
           "Let ListenerTimeout propagate (catch Exception, not BaseException).\n")
    with contextlib.suppress(OSError):
        os.write(2, msg.encode("utf-8", "replace"))
    os._exit(1)


class EventBus:
    """The listeners of one process, and how to reach them."""

    def __init__(self, listeners: Iterable[Listener], *, default_queue: str, budget: float,
                 report: Report) -> None:
        self.listeners = tuple(listeners)
        self.durable = tuple(x for x in self.listeners if x.durable)
        self.local = tuple(x for x in self.listeners if not x.durable)
        self.default_queue = default_queue
        self.budget = budget
        self.report = report
        self._wanted: dict[str, bool] = {}

    def wants(self, name: str) -> bool:
        """Whether any listener could take an event called ``name`` (cheap, cached)."""
        got = self._wanted.get(name)
        if got is None:
            got = self._wanted[name] = any(_name_matches(x, name) for x in self.listeners)
        return got

    def jobs_for(self, events: Sequence[Event]) -> list[Job]:
        """The listener jobs of ``events`` (one per event and durable listener that wants it)."""
        jobs = []
        for ev in events:
            for lst in self.durable:
                if lst.wants(ev):
                    try:
                        jobs.append(lst.job_for(ev, self.default_queue))
                    except Exception as exc:  # noqa: BLE001 - one bad listener must not stop the others
                        self.report("listener_failed", {"event_name": ev.name, "event_id": ev.id, "listener": lst.source,
                                                        "error": f"{type(exc).__name__}: {exc}"})
        return jobs

    def store(self, backend: Backend, events: Sequence[Event]) -> int:
        """Push the listener jobs of ``events`` into ``backend``; how many were new. Raises the
        store's errors (the caller retries: pushing again stores nothing twice)."""
        jobs = self.jobs_for(events)
        return sum(backend.push(jobs)) if jobs else 0

    def run_local(self, events: Sequence[Event], *, total: float | None = None) -> None:
        """Call every in-process listener that wants each event, each within its budget (and
        all of them within ``total`` seconds, when given). An exception or an overrun is
        reported (``listener_failed``, ``listener_slow``), never raised."""
        end = time.monotonic() + total if total is not None else None
        for ev in events:
            for lst in self.local:
                if lst.wants(ev):
                    self._call(lst, ev, None if end is None else end - time.monotonic())

    def _call(self, lst: Listener, ev: Event, left: float | None = None) -> None:
        assert lst.fn is not None
        budget = lst.budget if lst.budget is not None else self.budget
        if left is not None:
            budget = min(budget, max(left, 0.001))
        state = {"armed": True, "raised": 0}

        def alarm(signum: int, frame: Any) -> None:
            if state["armed"]:
                state["raised"] += 1
                if state["raised"] > MAX_SWALLOWED:
                    _abandon(lst, ev, budget)
                raise ListenerTimeout()

        timer = _timer_usable()
        old: Any = None
        start = time.monotonic()
        error: str | None = None
        cut = False
        try:
            if timer:
                old = signal.signal(signal.SIGALRM, alarm)
                # Again every 10 ms: a listener that catches the first one is cut off by the next.
                signal.setitimer(signal.ITIMER_REAL, budget, 0.01)
            try:
                lst.fn(ev)
            finally:
                state["armed"] = False
                if timer:
                    signal.setitimer(signal.ITIMER_REAL, 0)
        except ListenerTimeout:
            cut = True
        except BaseException as exc:  # noqa: BLE001 - even SystemExit: a listener never stops the worker
            error = f"{type(exc).__name__}: {exc}"
        finally:
            if timer and old is not None:
                with contextlib.suppress(Exception):
                    signal.signal(signal.SIGALRM, old)
        took = time.monotonic() - start
        where = {"event_name": ev.name, "event_id": ev.id, "listener": lst.source}
        if error is not None:
            self.report("listener_failed", {**where, "error": error})
        if cut or took > budget:
            self.report("listener_slow", {**where, "ms": round(took * 1000, 1), "budget_ms": round(budget * 1000, 1),
                                          "cut_off": cut})


def _name_matches(lst: Listener, name: str) -> bool:
    import fnmatch

    return any(p == name or fnmatch.fnmatchcase(name, p) for p in lst.events)


def _timer_usable() -> bool:
    """SIGALRM can be caught only in the main thread (the worker's loop runs there)."""
    import threading

    return threading.current_thread() is threading.main_thread()


def build_bus(settings: Any, report: Report, *, python: bool) -> EventBus:
    """The bus of a process: the listeners of forge.toml, and with ``python`` (a worker, which
    has imported the project's command modules) the ``@forge.on`` ones and plugins' ones."""
    from forge.events.config import events_config
    from forge.events.listeners import declared, load_plugins

    cfg = events_config(settings)
    listeners = list(cfg.listeners)
    if python:
        if settings.plugins:
            load_plugins()
        listeners += declared(settings.root)
    return EventBus(listeners, default_queue=settings.default_queue, budget=cfg.budget, report=report)
