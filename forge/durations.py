"""Durations as people write them: ``90``, ``90s``, ``5m``, ``1h30m``, ``250ms``, ``2d``."""

from __future__ import annotations

import re
from datetime import timedelta

from forge.errors import UsageError

_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
#: The longest duration forge accepts anywhere (a delay, timeout, backoff step, ttl...): 100
#: years. Longer ones are typos, and every time forge derives from one (a due time, a
#: deadline, a lease) must stay representable by both backends (see ``forge.job.LATEST_DUE``).
MAX_SECONDS = 100 * 365.25 * 86400


def parse_duration(value: str | float | int | timedelta, *, what: str = "duration") -> float:
    """Return ``value`` in seconds; raise :class:`UsageError` naming ``what`` if malformed."""
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, bool):
        raise UsageError(f"Invalid {what} {value!r}: expected a number of seconds.")
    elif isinstance(value, int | float):
        seconds = float(value)
    elif not isinstance(value, str):
        raise UsageError(f"Invalid {what} {value!r}: expected a number of seconds or a duration like 5m.")
    else:
        text = value.strip().lower().replace(" ", "")
        try:
            seconds = float(text)
        except ValueError:
            pos, seconds = 0, 0.0
            for m in _PART.finditer(text):
                if m.start() != pos:
                    break
                seconds += float(m.group(1)) * _UNITS[m.group(2)]
                pos = m.end()
            if not text or pos != len(text):
                raise UsageError(
                    f"Invalid {what} {value!r}: use seconds or units, e.g. 90, 90s, 5m, 1h30m."
                ) from None
    if seconds != seconds or seconds in (float("inf"), float("-inf")):
        raise UsageError(f"Invalid {what} {value!r}: must be finite.")
    if seconds < 0:
        raise UsageError(f"Invalid {what} {value!r}: must not be negative.")
    if seconds > MAX_SECONDS:
        raise UsageError(f"Invalid {what} {value!r}: longer than 100 years, the longest forge accepts.")
    return seconds


def format_duration(seconds: float) -> str:
    """Short human form: ``35 ms``, ``4.2 s``, ``5m``, ``1h30m``."""
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    out = ""
    for n, unit in ((days, "d"), (hours, "h"), (minutes, "m"), (sec, "s")):
        if n:
            out += f"{n}{unit}"
    return out or "0s"
