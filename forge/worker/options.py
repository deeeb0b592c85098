"""``forge queue:work``'s options and the reasons a worker stops (Laravel's ``WorkerOptions``)."""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from forge.backends.base import KILL_GRACE
from forge.config import validate_queue_name
from forge.errors import EXIT_MEMORY, EXIT_UNAVAILABLE, UsageError

if TYPE_CHECKING:
    from forge.retry.backoff import Backoff


class StopReason(StrEnum):
    """Why a worker stopped; its value is what the stop line and the events say."""

    EMPTY = "empty"
    ONCE = "once"
    MAX_JOBS = "max_jobs"
    MAX_TIME = "max_time"
    MEMORY = "memory"
    RESTART = "restart"
    SIGNAL = "signal"
    FORCED = "forced"
    UNAVAILABLE = "unavailable"  # --once / --stop-when-empty could not read the queue

    @property
    def exit_code(self) -> int:
        """``queue:work``'s exit code for it: 0, but over ``--memory`` (``EXIT_MEMORY``), forced
        (1) and an unusable queue when draining (``EXIT_UNAVAILABLE``)."""
        return {StopReason.MEMORY: EXIT_MEMORY, StopReason.FORCED: 1,
                StopReason.UNAVAILABLE: EXIT_UNAVAILABLE}.get(self, 0)


@dataclass(frozen=True)
class WorkerOptions:
    """``forge queue:work``'s options; a job's own tries, timeout and backoff win over these."""

    queues: tuple[str, ...] = ("default",)
    once: bool = False
    stop_when_empty: bool = False
    max_jobs: int = 0
    max_time: float = 0.0
    sleep: float = 3.0
    rest: float = 0.0
    timeout: float = 60.0
    tries: int = 1
    backoff: Backoff = (0.0,)
    memory: int = 128
    name: str = ""
    grace: float = KILL_GRACE
    fresh_process: bool = False  # a new job process for every job
    echo: bool = False  # copy each job's output to the worker's stdout too (development)
    maintenance_interval: float = 2.0
    heartbeat_interval: float = 5.0
    #: Redis: a draining worker claims its next job while the current one runs (taking the
    #: round trip off the way between jobs) when its last run took less than ``ahead_after``
    #: seconds; a claim held so while the current job runs longer than ``ahead_hold`` seconds
    #: is handed back, for another worker to run (0: never claim ahead).
    ahead_hold: float = 0.05
    ahead_after: float = 0.01

    def __post_init__(self) -> None:
        if not self.queues:
            raise UsageError("Give at least one queue, e.g. --queue=high,default.")
        for q in self.queues:
            validate_queue_name(q)
        for what, value in (("max-jobs", self.max_jobs), ("max-time", self.max_time), ("sleep", self.sleep),
                            ("rest", self.rest), ("memory", self.memory)):
            if value < 0:
                raise UsageError(f"--{what} must not be negative, not {value}.")
        if self.timeout <= 0:
            raise UsageError(f"--timeout must be more than 0 seconds, not {self.timeout}.")
        if self.tries < 1:
            raise UsageError(f"--tries must be at least 1, not {self.tries}.")
        if not self.name:
            object.__setattr__(self, "name", f"{socket.gethostname()}:{os.getpid()}")


def parse_queues(value: str | Sequence[str]) -> tuple[str, ...]:
    """Queue names from ``"high,default"`` or a list, in order, blanks dropped; raises
    ``UsageError`` for an invalid name."""
    parts = value.split(",") if isinstance(value, str) else list(value)
    return tuple(validate_queue_name(p.strip()) for p in parts if p.strip())
