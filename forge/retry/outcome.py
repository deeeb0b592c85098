"""The outcome protocol: how any program run as a job says "retry me later" or "fail me now".

- exit 0: success;
- exit 75 (``EX_TEMPFAIL`` of sysexits.h): retry later, without counting this attempt. The
  delay is the job's backoff for this attempt (at least 1 s), or what a line
  ``::forge-retry-after DURATION`` among the last lines of its output says (``30``, ``30s``,
  ``5m``);
- exit 65 (``EX_DATAERR``): fail now, do not retry (a line ``::forge-fail REASON`` gives the
  reason recorded);
- any other non-zero exit (or an exception): a plain failure, retried while attempts remain.

In Python, ``raise forge.Retry(after="5m")`` and ``raise forge.Fail("reason")`` mean the same,
wherever the command runs: under a worker, as ``forge NAME`` (its exit code and the line on
stderr), or through ``forge.call`` (``CallResult.exit_code``).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from forge.durations import format_duration, parse_duration
from forge.errors import ForgeError, UsageError

#: Retry later, without counting this attempt (sysexits.h EX_TEMPFAIL).
EXIT_RETRY = 75
#: Fail now, do not retry (sysexits.h EX_DATAERR: the input is wrong, a retry gets the same answer).
EXIT_FAIL = 65
#: The lines a program prints to steer its outcome (the last one in its output's tail wins).
RETRY_AFTER = "::forge-retry-after"
FAIL_REASON = "::forge-fail"
#: The least a retry-later waits when neither the job nor its backoff says how long.
MIN_RETRY_AFTER = 1.0


class Retry(ForgeError):
    """Raise it from a command to be run again later, this attempt not counted (exit 75).

    ``after``: how long to wait (seconds, a duration like ``"5m"``, or a timedelta); None
    leaves it to the job's backoff.
    """

    exit_code = EXIT_RETRY

    def __init__(self, message: str = "", *, after: float | int | str | timedelta | None = None) -> None:
        self.after = None if after is None else parse_duration(after, what="Retry(after=...)")
        when = f" in {format_duration(self.after)}" if self.after is not None else ""
        super().__init__(f"Retry later{when}" + (f": {message}" if message else "."))
        self.reason = message

    @property
    def directive(self) -> str | None:
        """The line a direct run prints on stderr, so that a program running it sees the delay."""
        return f"{RETRY_AFTER} {self.after:g}s" if self.after is not None else None


class Fail(ForgeError):
    """Raise it from a command to fail for good: no retry, whatever attempts remain (exit 65)."""

    exit_code = EXIT_FAIL

    def __init__(self, reason: str = "failed; not to be retried") -> None:
        super().__init__(reason)
        self.reason = reason

    @property
    def directive(self) -> str | None:
        """Always None: a failure for good has no retry-after line for a direct run to print."""
        return None


def reply_of(exc: Retry | Fail) -> dict[str, Any]:
    """What the job process reports for one of them (``forge.worker.jobproc``)."""
    if isinstance(exc, Retry):
        out: dict[str, Any] = {"exit_code": EXIT_RETRY, "reason": "retry_later",
                               "error": exc.reason or "asked to be retried later"}
        if exc.after is not None:
            out["retry_after"] = exc.after
        return out
    return {"exit_code": EXIT_FAIL, "reason": "no_retry", "error": exc.reason}


def directives(tail: str) -> tuple[float | None, str | None]:
    """The delay of the last valid ``::forge-retry-after`` line and the reason of the last
    ``::forge-fail`` line in a job's output tail (None where there is none)."""
    after: float | None = None
    reason: str | None = None
    for line in reversed(tail.splitlines()):
        text = line.strip()
        if after is None and text.startswith(RETRY_AFTER + " "):
            try:
                after = parse_duration(text[len(RETRY_AFTER):].strip(), what="retry-after")
            except UsageError:
                continue
        elif reason is None and text.startswith(FAIL_REASON + " "):
            reason = text[len(FAIL_REASON):].strip()[:500] or None
        if after is not None and reason is not None:
            break
    return after, reason
