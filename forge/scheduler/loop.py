"""``schedule:work``: a long-running scheduler that sleeps until the next tick is due.

It wakes at the next due time (at most ``MAX_SLEEP`` later, to notice pauses, a changed wall
clock and ``queue:restart``), never every second, so it costs nothing while idle. Waiting uses
``time.sleep``, which a signal interrupts (and which libfaketime fakes, unlike timed waits on
events or conditions). Signals are the worker's: SIGTERM, SIGINT or SIGQUIT stop it after the
current run (exit 0), a second one stops it at once (exit 1); SIGUSR2 / SIGCONT pause and resume.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from typing import Any

from forge.errors import QueueUnavailable
from forge.retry.backoff import outage_wait
from forge.scheduler.scheduler import Scheduler, TickAction

#: Longest sleep between two looks at the schedule.
MAX_SLEEP = 30.0


class _Wakeup(Exception):
    pass


class ScheduleLoop:
    """Runs ``scheduler`` at every due time until stopped; reports through ``report``."""

    def __init__(self, scheduler: Scheduler, report: Callable[[str, dict[str, Any]], None], *,
                 on_action: Callable[[TickAction], None] | None = None, max_time: float = 0.0,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.scheduler = scheduler
        self.report = report
        self.on_action = on_action
        self.max_time = max_time
        self._sleep = sleep
        self._signals = 0
        self._paused = False
        self._idle = False
        self.stop: str | None = None

    def _on_stop(self, signum: int, frame: Any) -> None:
        self._signals += 1
        self.stop = "signal" if self._signals == 1 else "forced"
        if self._idle or self._signals > 1:
            raise _Wakeup()

    def _on_pause(self, signum: int, frame: Any) -> None:
        self._paused = signum == signal.SIGUSR2
        if self._idle:
            raise _Wakeup()

    def install_signals(self) -> None:
        """Install the loop's handlers: SIGTERM, SIGINT and SIGQUIT stop it after the current
        pass (a second signal at once), SIGUSR2 pauses it and SIGCONT resumes it."""
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            signal.signal(sig, self._on_stop)
        signal.signal(signal.SIGUSR2, self._on_pause)
        signal.signal(signal.SIGCONT, self._on_pause)

    def _nap(self, seconds: float) -> None:
        self._idle = True
        try:
            if self.stop is None and seconds > 0:
                self._sleep(seconds)
        except _Wakeup:
            pass
        finally:
            self._idle = False

    def run(self) -> int:
        """Loop until a signal, ``max_time`` or ``queue:restart``; returns the exit code."""
        sch = self.scheduler
        started = time.monotonic()
        self.report("scheduler_started", {"entries": len(sch.entries)})
        restart_seen = self._restart_marker()
        outage = 0.0
        try:
            while self.stop is None:
                if self.max_time and time.monotonic() - started >= self.max_time:
                    self.stop = "max_time"
                    break
                if self._paused:
                    self._nap(MAX_SLEEP)
                    continue
                if self._restart_marker() != restart_seen:
                    self.stop = "restart"
                    break
                try:
                    for action in sch.run():
                        self._report_action(action)
                    wake = sch.next_due()
                    outage = 0.0
                except (QueueUnavailable, OSError) as exc:
                    outage = outage_wait(outage)
                    self.report("backend_unavailable", {"error": str(exc), "retry_in": outage})
                    self._nap(outage)
                    continue
                now = sch.clock()
                delay = MAX_SLEEP if wake is None else min(max(wake - now, 0.0), MAX_SLEEP)
                if self.max_time:
                    delay = min(delay, max(started + self.max_time - time.monotonic(), 0.0))
                self._nap(delay)
        except _Wakeup:  # a second signal during a run: stop at once
            pass
        self.report("scheduler_stopped", {"reason": self.stop})
        return 1 if self.stop == "forced" else 0

    def _restart_marker(self) -> Any:
        try:
            return self.scheduler.backend.restart_requested_at()
        except (QueueUnavailable, OSError):
            return None

    def _report_action(self, a: TickAction) -> None:
        if self.on_action is not None:
            self.on_action(a)
        else:
            self.report(a.action, a.to_dict())
