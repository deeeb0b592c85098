"""The delay before a retry: a list of seconds, or exponential with a cap and jitter.

Written as people write them (``forge.toml``, ``queue:dispatch --backoff``, ``@command``):

- ``1,5,10`` (or ``[1, 5, 10]``): 1 s before the first retry, 5 s before the second, 10 s
  before every later one (the last value repeats);
- ``exp:2s..10m``: exponential: 2 s before the first retry, then doubling (4 s, 8 s, ...), never
  more than 10 m; ``exp:2s`` has no cap; options follow after commas:
  ``factor=3`` (the growth, default 2) and ``jitter=none|full|equal`` (default none), the
  jitter of the AWS note "Exponential Backoff And Jitter" that Sidekiq and Rails follow:
  full picks uniformly in ``[0, d]``, equal in ``[d/2, d]``, where ``d`` is the capped delay.

:func:`delay` is the one computation of a retry's delay (the worker's, and the recovery of
an abandoned job on both backends).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from forge.durations import MAX_SECONDS, format_duration, parse_duration
from forge.errors import UsageError


class Jitter(StrEnum):
    """How an exponential delay is randomized: none (the capped delay itself), full (uniform in
    ``[0, d]``) or equal (uniform in ``[d/2, d]``)."""

    NONE = "none"
    FULL = "full"
    EQUAL = "equal"


@dataclass(frozen=True)
class Exponential:
    """``base * factor**(n-1)`` seconds before retry ``n`` (1-based), at most ``cap``, jittered."""

    base: float
    cap: float | None = None
    factor: float = 2.0
    jitter: Jitter = Jitter.NONE

    def __post_init__(self) -> None:
        for what, value in (("base", self.base), ("cap", self.cap)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                                      or not math.isfinite(value) or value < 0 or value > MAX_SECONDS):
                raise UsageError(f"Invalid exponential backoff {what} {value!r}: a duration from 0 to 100 years.")
        if self.base <= 0:
            raise UsageError("Invalid exponential backoff: its base must be more than 0 s, e.g. exp:1s..10m.")
        if self.cap is not None and self.cap < self.base:
            raise UsageError(f"Invalid exponential backoff: the cap {format_duration(self.cap)} is below the base"
                             f" {format_duration(self.base)}; write exp:BASE..CAP with BASE <= CAP.")
        if isinstance(self.factor, bool) or not isinstance(self.factor, int | float) or not 1 <= self.factor <= 100:
            raise UsageError(f"Invalid exponential backoff factor {self.factor!r}: a number from 1 to 100.")
        object.__setattr__(self, "jitter", _jitter(self.jitter))
        object.__setattr__(self, "base", float(self.base))
        object.__setattr__(self, "factor", float(self.factor))
        if self.cap is not None:
            object.__setattr__(self, "cap", float(self.cap))

    def ceiling(self, retry: int) -> float:
        """The delay before retry ``retry`` (1-based) without jitter: ``min(cap, base*factor**(retry-1))``."""
        cap = self.cap if self.cap is not None else MAX_SECONDS
        n = max(retry, 1) - 1
        # factor**n overflows long before n is large; past the cap it no longer matters.
        if n * math.log(self.factor or 1) + math.log(self.base) >= math.log(cap):
            return cap
        return min(cap, self.base * self.factor ** n)

    def bounds(self, retry: int) -> tuple[float, float]:
        """The smallest and largest delay before retry ``retry``."""
        d = self.ceiling(retry)
        if self.jitter is Jitter.FULL:
            return 0.0, d
        if self.jitter is Jitter.EQUAL:
            return d / 2, d
        return d, d

    def pick(self, retry: int, rand: Callable[[], float] | None = None) -> float:
        """The delay before retry ``retry``: a value within :meth:`bounds`, drawn with ``rand``
        (uniform in [0, 1), ``random.random`` by default) when jittered."""
        lo, hi = self.bounds(retry)
        if hi <= lo:
            return hi
        if rand is None:
            import random  # here: only a jittered retry needs it

            rand = random.random
        return lo + (hi - lo) * rand()

    def to_json(self) -> dict[str, Any]:
        """The JSON object of a job record's ``backoff`` (``exp``, ``cap``, ``factor``,
        ``jitter``); ``from_json`` reads it back."""
        return {"exp": self.base, "cap": self.cap, "factor": self.factor, "jitter": str(self.jitter)}

    @classmethod
    def from_json(cls, d: Any) -> Exponential:
        """The object ``to_json`` writes; ValueError (or UsageError) if it is not one."""
        if not isinstance(d, dict) or set(d) - {"exp", "cap", "factor", "jitter"} or "exp" not in d:
            raise ValueError("backoff must be a list of seconds or an exponential backoff object")
        return cls(d["exp"], d.get("cap"), d.get("factor", 2.0), d.get("jitter", "none"))

    def __str__(self) -> str:
        text = f"exp:{_dur(self.base)}" + (f"..{_dur(self.cap)}" if self.cap is not None else "")
        if self.factor != 2.0:
            text += f",factor={self.factor:g}"
        if self.jitter is not Jitter.NONE:
            text += f",jitter={self.jitter}"
        return text


#: A backoff: seconds before each retry (the last repeats), or an exponential rule.
Backoff = tuple[float, ...] | Exponential


def _jitter(value: Any) -> Jitter:
    try:
        return Jitter(value)
    except ValueError:
        raise UsageError(f"Invalid backoff jitter {value!r}: use none, full or equal.") from None


def _dur(seconds: float) -> str:
    """A duration written back the way parse_duration reads it (exact for whole units)."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def parse(value: Any, *, what: str = "backoff") -> Backoff:
    """A backoff as written (see the module docstring) -> a tuple of seconds or an ``Exponential``."""
    if isinstance(value, Exponential):
        return value
    if isinstance(value, str) and value.strip().lower().startswith("exp"):
        return _parse_exp(value.strip(), what)
    if isinstance(value, dict):
        try:
            return Exponential.from_json(value)
        except ValueError as exc:
            raise UsageError(f"Invalid {what} {value!r}: {exc}.") from None
    if not isinstance(value, str | int | float | list | tuple):
        raise UsageError(f"Invalid {what} {value!r}: a list of delays (1,5,10) or exp:BASE..CAP.")
    return _parse_list(value, what)


def _parse_list(value: str | int | float | list[Any] | tuple[Any, ...], what: str) -> tuple[float, ...]:
    """``"1,5,10"``, ``[1, 5, 10]`` or one number -> the delays in seconds (the last repeats)."""
    if isinstance(value, str):
        parts: list = value.split(",")
        if parts and not parts[-1].strip():
            parts.pop()  # a trailing comma ("1,5,") is harmless
        if any(not p.strip() for p in parts) and any(p.strip() for p in parts):
            raise UsageError(f"Invalid {what} {value!r}: an empty delay between commas; give e.g. 1,5,10.")
        parts = [p for p in parts if p.strip()]
    elif isinstance(value, list | tuple):
        parts = list(value)
    else:
        parts = [value]
    if not parts:
        raise UsageError(f"Invalid {what} {value!r}: give at least one delay, e.g. 1,5,10, or exp:1s..10m.")
    return tuple(parse_duration(p, what=what) for p in parts)


def _parse_exp(text: str, what: str) -> Exponential:
    usage = "write exp:BASE[..CAP][,factor=F][,jitter=none|full|equal], e.g. exp:2s..10m,jitter=full"
    head, _, rest = text.partition(":")
    if head.lower() != "exp" or not rest.strip():
        raise UsageError(f"Invalid {what} {text!r}: {usage}.")
    spans, *options = [p.strip() for p in rest.split(",")]
    base_text, dots, cap_text = spans.partition("..")
    try:
        base = parse_duration(base_text, what=f"{what} base")
        cap = parse_duration(cap_text, what=f"{what} cap") if dots else None
    except UsageError as exc:
        raise UsageError(f"Invalid {what} {text!r}: {exc.message} ({usage}).") from None
    kw: dict[str, Any] = {}
    for opt in options:
        key, eq, val = opt.partition("=")
        key = key.strip().lower()
        if not eq or key not in ("factor", "jitter") or key in kw:
            raise UsageError(f"Invalid {what} {text!r}: unknown or repeated option {opt!r} ({usage}).")
        if key == "factor":
            try:
                kw["factor"] = float(val)
            except ValueError:
                raise UsageError(f"Invalid {what} {text!r}: factor {val!r} is not a number.") from None
        else:
            kw["jitter"] = val.strip().lower()
    try:
        return Exponential(base, cap, **kw)
    except UsageError as exc:
        raise UsageError(f"Invalid {what} {text!r}: {exc.message}") from None


def delay(backoff: Backoff | Sequence[float] | None, attempt: int,
          rand: Callable[[], float] | None = None) -> float:
    """Seconds to wait after failed attempt ``attempt`` (1-based) before the next one.

    A list: its ``attempt``-th value (the last repeats); exponential: see ``Exponential``.
    None or empty: 0. The one place a retry's delay is computed.
    """
    if isinstance(backoff, Exponential):
        return backoff.pick(attempt, rand)
    if not backoff:
        return 0.0
    return float(backoff[min(max(attempt, 1), len(backoff)) - 1])


def bounds(backoff: Backoff | None, attempt: int) -> tuple[float, float]:
    """The smallest and largest value ``delay(backoff, attempt)`` can take."""
    if isinstance(backoff, Exponential):
        return backoff.bounds(attempt)
    d = delay(backoff, attempt)
    return d, d


def describe(backoff: Backoff | None) -> str:
    """How a person writes it: ``1,5,10`` or ``exp:2s..10m,jitter=full``."""
    if backoff is None:
        return ""
    if isinstance(backoff, Exponential):
        return str(backoff)
    return ",".join(f"{b:g}" for b in backoff)


def to_json(backoff: Backoff | None) -> Any:
    """The JSON of a job record's ``backoff``: None, a list of seconds, or the exponential
    object."""
    if backoff is None:
        return None
    return backoff.to_json() if isinstance(backoff, Exponential) else list(backoff)


#: The waits of a long-running process (a worker, ``schedule:work``) that finds its store
#: unavailable: from the first to the longest, doubling in between.
OUTAGE_FIRST, OUTAGE_LONGEST = 0.5, 10.0


def outage_wait(previous: float, first: float = OUTAGE_FIRST) -> float:
    """Seconds to wait before trying an unavailable store again, after waiting ``previous``
    (0 before the first wait): ``first`` (0.5 s), then doubling, at most 10 s."""
    return min(max(previous * 2, first), OUTAGE_LONGEST)
