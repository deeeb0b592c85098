"""A command's declared job defaults, and the deadlines a dispatch gives (``--retry-until``).

``RetryRules``, the bounds on a job's retries beyond its attempts that travel in the job record
(its ``retry`` object), live in ``forge.retry.bounds`` (the job record reads them) and are
re-exported here.

``JobDefaults`` are what ``@command(..., queue=, tries=, timeout=, backoff=, retry_until=,
max_exceptions=, max_releases=)`` declares: every dispatch of the command uses them unless the
dispatch says otherwise (``forge.queue.manager.CommandQueue``), and the command cache keeps them so
that the fast dispatch path applies them without importing the command.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import timedelta
from typing import Any

from forge.durations import MAX_SECONDS, parse_duration
from forge.errors import UsageError
from forge.retry import backoff as _backoff
from forge.retry.bounds import DEFAULT_MAX_RELEASES, MAX_RUNS, RetryRules, count_of

__all__ = ["DEFAULT_MAX_RELEASES", "MAX_RUNS", "JobDefaults", "RetryRules", "deadline", "relative_deadline"]


def relative_deadline(value: Any, what: str = "retry_until") -> float:
    """A deadline relative to dispatch (``"2h"``, seconds, a timedelta) in seconds, at least 1 s."""
    seconds = parse_duration(value, what=what)
    if seconds <= 0:
        raise UsageError(f"Invalid {what} {value!r}: must be more than 0, e.g. 2h.")
    return seconds


@dataclass(frozen=True)
class JobDefaults:
    """A command's declared job options (``@command(..., tries=5, ...)``); None: not declared."""

    queue: str | None = None
    tries: int | None = None
    timeout: float | None = None
    backoff: _backoff.Backoff | None = None
    retry_until: float | None = None  # seconds after dispatch
    max_exceptions: int | None = None
    max_releases: int | None = None

    @classmethod
    def declare(cls, *, queue: Any = None, tries: Any = None, timeout: Any = None, backoff: Any = None,
                retry_until: Any = None, max_exceptions: Any = None, max_releases: Any = None) -> JobDefaults:
        """Validate what ``@command`` was given (UsageError naming the option)."""
        from forge.config import validate_queue_name

        if queue is not None:
            validate_queue_name(queue)
        t = None
        if timeout is not None:
            t = parse_duration(timeout, what="timeout")
            if t <= 0:
                raise UsageError(f"Invalid timeout {timeout!r}: must be more than 0, e.g. 10m.")
        return cls(queue=queue, tries=count_of(tries, "tries"), timeout=t,
                   backoff=None if backoff is None else _backoff.parse(backoff),
                   retry_until=None if retry_until is None else relative_deadline(_no_datetime(retry_until)),
                   max_exceptions=count_of(max_exceptions, "max_exceptions"),
                   max_releases=count_of(max_releases, "max_releases", least=0, most=MAX_RUNS))

    def __bool__(self) -> bool:
        return any(getattr(self, f.name) is not None for f in fields(self))

    def to_json(self) -> dict[str, Any]:
        """For the command cache (``forge.cli.fastpath.cache``); ``from_json`` reads it back exactly."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}
        if self.backoff is not None:
            out["backoff"] = _backoff.to_json(self.backoff)
        return out

    @classmethod
    def from_json(cls, d: Any) -> JobDefaults:
        """The defaults of an object ``to_json`` wrote, checked as ``declare`` checks them.
        Raises ValueError for a non-object or an unknown key, UsageError for a bad value."""
        if not isinstance(d, dict):
            raise ValueError("defaults must be an object")
        known = {f.name for f in fields(cls)}
        if set(d) - known:
            raise ValueError(f"unknown defaults {sorted(set(d) - known)}")
        return cls.declare(**d)


def _no_datetime(value: Any) -> Any:
    if not isinstance(value, int | float | str | timedelta) or isinstance(value, bool):
        raise UsageError(f"Invalid retry_until {value!r} on @command: a duration after dispatch, e.g. \"2h\""
                         " (an absolute deadline belongs to one dispatch: --retry-until or with_retry_until).")
    return value


def deadline(until: Any, now: float) -> float:
    """``--retry-until`` / ``with_retry_until``: a duration after ``now``, or a datetime (naive:
    local time), as Unix time."""
    from datetime import datetime

    if isinstance(until, datetime):
        try:
            at = until.timestamp()
        except (OverflowError, OSError, ValueError):
            raise UsageError(f"Invalid retry-until {until!r}: out of range.") from None
    elif isinstance(until, str) and ("-" in until or "T" in until):
        try:
            at = datetime.fromisoformat(until).timestamp()
        except ValueError:
            raise UsageError(f"Invalid retry-until {until!r}: a duration after dispatch (2h) or an ISO"
                             " date/time (2026-12-01T09:00).") from None
    else:
        at = now + relative_deadline(until, "retry-until")
    if at > now + MAX_SECONDS:
        raise UsageError(f"Invalid retry-until {until!r}: more than 100 years ahead.")
    return at
