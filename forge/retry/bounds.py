"""The bounds on a job's retries beyond its attempts: ``RetryRules``, the job record's ``retry`` object.

``until`` (Unix time: no retry starts after it), ``max_exceptions`` (fail after this many
attempts ended in an exception or a non-zero exit, even if tries remain; retry-later releases
do not count) and ``max_releases`` (how many retry-later releases, exit 75, a job may take:
without it, ``DEFAULT_MAX_RELEASES``). Part of the job record (``forge.job`` reads it), so it
imports nothing above ``forge.errors``; ``forge.retry.rules`` adds a command's declared defaults.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from forge.errors import UsageError

#: Retry-later releases (exit 75, ``forge.Retry``) a job may take unless ``max_releases`` says:
#: a job that always asks to be retried stops after this many, deadline or not.
DEFAULT_MAX_RELEASES = 100
#: The most ``max_releases`` may be, and the most attempts of a job bounded only by its deadline:
#: a job's history keeps a line per attempt and release, and a job file holds at most 4 MiB.
MAX_RUNS = 1000


def count_of(value: Any, what: str, *, least: int = 1, most: int | None = None) -> int | None:
    """``value`` if it is None or a whole number from ``least`` to ``most``; else UsageError naming ``what``."""
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
        count_of(self.max_exceptions, "max exceptions")
        count_of(self.max_releases, "max releases", least=0, most=MAX_RUNS)

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
