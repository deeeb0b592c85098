"""The bounds on a job's retries beyond its attempts, and a command's declared job defaults.

``RetryRules`` travel in the job record (its ``retry`` object): ``until`` (Unix time: no retry
starts after it), ``max_exceptions`` (fail after this many attempts ended in an exception or a
non-zero exit, even if tries remain; retry-later releases do not count) and ``max_releases``
(how many retry-later releases, exit 75, a job may take: without it, ``DEFAULT_MAX_RELEASES``).

``JobDefaults`` are what ``@command(..., queue=, tries=, timeout=, backoff=, retry_until=,
max_exceptions=, max_releases=)`` declares: every dispatch of the command uses them unless the
dispatch says otherwise (``forge.queue.manager.CommandQueue``), and the command cache keeps them so
that the fast dispatch path applies them without importing the command.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from datetime import timedelta
from typing import Any

from forge.durations import MAX_SECONDS, parse_duration
from forge.errors import UsageError
from forge.retry import backoff as _backoff

#: Retry-later releases (exit 75, ``forge.Retry``) a job may take unless ``max_releases`` says:
#: a job that always asks to be retried stops after this many, deadline or not.
DEFAULT_MAX_RELEASES = 100
#: The most ``max_releases`` may be, and the most attempts of a job bounded only by its deadline:
#: a job's history keeps a line per attempt and release, and a job file holds at most 4 MiB.
MAX_RUNS = 1000


def _count(value: Any, what: str, *, least: int = 1, most: int | None = None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise UsageError(f"Invalid {what} {value!r}: a whole number of at least {least}.")
    if most is not None and value > most:
        raise UsageError(f"Invalid {what} {value!r}: at most {most} (the job's history keeps each one).")
    return value


@dataclass(frozen=True)
class RetryRules:
    """What bounds a job's retries besides its attempts (the job record's ``retry`` object)."""

    until: float | None = None
    max_exceptions: int | None = None
    max_releases: int | None = None

    def __post_init__(self) -> None:
        if self.until is not None and (isinstance(self.until, bool) or not isinstance(self.until, int | float)
                                       or not math.isfinite(self.until)):
            raise UsageError(f"Invalid retry-until {self.until!r}: a time.")
        _count(self.max_exceptions, "max exceptions")
        _count(self.max_releases, "max releases", least=0, most=MAX_RUNS)

    def __bool__(self) -> bool:
        return any(getattr(self, f.name) is not None for f in fields(self))

    def to_json(self) -> dict[str, Any]:
        """The bounds that are set, by field name (the job record's ``retry`` object)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @classmethod
    def from_json(cls, d: Any) -> RetryRules:
        """The rules of a ``retry`` object ``to_json`` wrote. Raises ValueError for an unknown
        key, UsageError for a bad value."""
        if not isinstance(d, dict) or set(d) - {"until", "max_exceptions", "max_releases"}:
            raise ValueError("retry must be an object with until, max_exceptions, max_releases")
        until = d.get("until")
        return cls(float(until) if isinstance(until, int) and not isinstance(until, bool) else until,
                   d.get("max_exceptions"), d.get("max_releases"))


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
        return cls(queue=queue, tries=_count(tries, "tries"), timeout=t,
                   backoff=None if backoff is None else _backoff.parse(backoff),
                   retry_until=None if retry_until is None else relative_deadline(_no_datetime(retry_until)),
                   max_exceptions=_count(max_exceptions, "max_exceptions"),
                   max_releases=_count(max_releases, "max_releases", least=0, most=MAX_RUNS))

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
