"""The one decision after an attempt that did not succeed: release it (after how long, counted
or not) or fail it (with which reason); and the schedule that ``queue:show`` prints.

Which value applies, highest first: the job's own (a dispatch option, or a command's declared
default stamped at dispatch), the command's declaration (for a job dispatched before it was
declared), the worker's option (``queue:work --tries/--backoff``), the configured default
(``[queue]`` in forge.toml). As in Laravel, where a job's ``$tries`` and ``$backoff`` win over
the worker's ``--tries`` and ``--backoff``. With ``retry_until`` and no tries of the job's or its
command's own, attempts are not limited: the deadline is (Laravel's ``retryUntil``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from forge.durations import format_duration
from forge.retry import backoff as _backoff
from forge.retry.outcome import EXIT_FAIL, EXIT_RETRY, MIN_RETRY_AFTER, directives
from forge.retry.rules import DEFAULT_MAX_RELEASES, MAX_RUNS, JobDefaults, RetryRules

#: Reasons of attempts that count towards ``max_exceptions``: the job's own failures (not a
#: timeout, a dead worker or a retry-later).
EXCEPTION_REASONS = frozenset(("exception", "exit_code"))


@dataclass(frozen=True)
class Policy:
    """A job's effective retry policy. ``tries`` None: attempts are not limited (retry_until)."""

    tries: int | None
    backoff: _backoff.Backoff | None
    rules: RetryRules

    @property
    def max_releases(self) -> int:
        """How many times the job may be released (retry-later) without counting an attempt: its
        own bound, else ``DEFAULT_MAX_RELEASES``."""
        return self.rules.max_releases if self.rules.max_releases is not None else DEFAULT_MAX_RELEASES

    @property
    def attempts(self) -> int:
        """The last attempt there may be: ``tries``, or with a deadline alone ``MAX_RUNS``."""
        return self.tries if self.tries is not None else MAX_RUNS

    def to_json(self) -> dict[str, Any]:
        """The policy as ``queue:show --json`` prints it: tries, backoff, retry_until,
        max_exceptions and max_releases."""
        return {"tries": self.tries, "backoff": _backoff.to_json(self.backoff),
                "retry_until": self.rules.until, "max_exceptions": self.rules.max_exceptions,
                "max_releases": self.max_releases}


def policy_of(job: Any, declared: JobDefaults | None = None, worker_tries: int | None = None,
              worker_backoff: _backoff.Backoff | None = None) -> Policy:
    """The policy that applies to ``job`` (see the module docstring for the order)."""
    d = declared or _NO_DEFAULTS
    rules = job.retry or _NO_RULES
    if not job.retry and (d.retry_until is not None or d.max_exceptions is not None or d.max_releases is not None):
        rules = RetryRules(until=None if d.retry_until is None else job.dispatched_at + d.retry_until,
                           max_exceptions=d.max_exceptions, max_releases=d.max_releases)
    tries = job.max_attempts if job.max_attempts is not None else d.tries
    if tries is None and rules.until is None:
        tries = worker_tries if worker_tries is not None else 1
    backoff = job.backoff if job.backoff is not None else d.backoff if d.backoff is not None else worker_backoff
    return Policy(tries, backoff, rules)


_NO_DEFAULTS = JobDefaults()
_NO_RULES = RetryRules()


@dataclass(frozen=True)
class Decision:
    """What to record: ``release`` after ``delay`` s (``counted``: the attempt counts), or fail."""

    release: bool
    delay: float = 0.0
    counted: bool = True
    reason: str | None = None
    error: str | None = None


def _when(t: float) -> str:
    from datetime import datetime

    return datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S")


def since_retried(events: Sequence[Any]) -> Sequence[Any]:
    """The events after the last ``queue:retry`` (which starts the count of attempts afresh)."""
    for i in range(len(events) - 1, -1, -1):
        if events[i].event == "retried":
            return events[i + 1:]
    return events


def decide(policy: Policy, attempt: int, reply: dict[str, Any], tail: str,
           events: Callable[[], Sequence[Any]], now: float | None = None) -> Decision:
    """After attempt ``attempt`` (1-based, counted) ended with ``reply`` (``exit_code``,
    ``reason``, ``error``, ``retry_after``) and printed ``tail``: release or fail.

    ``events`` gives the job's events so far (read only when a bound counts them; those
    before a ``queue:retry`` do not count)."""
    now = time.time() if now is None else now

    def history() -> Sequence[Any]:
        return since_retried(events())

    code = reply.get("exit_code", 1)
    reason, error = reply.get("reason"), reply.get("error")
    rules = policy.rules
    if code == EXIT_FAIL or reason == "no_retry":
        if reason != "no_retry":
            error = directives(tail)[1] or f"exited with code {EXIT_FAIL}: fail now, do not retry"
        return Decision(False, reason="no_retry", error=error)
    if code == EXIT_RETRY:
        after = reply.get("retry_after")
        if after is None:
            after = directives(tail)[0]
        if after is None:
            after = max(_backoff.delay(policy.backoff, attempt), MIN_RETRY_AFTER)
        limit = policy.max_releases
        used = sum(1 for e in history() if e.event == "released" and e.reason == "retry_later")
        if used >= limit:
            return Decision(False, reason="max_releases",
                            error=f"asked to be retried later {used + 1} times; max_releases is {limit}")
        if rules.until is not None and now + after > rules.until:
            return Decision(False, reason="retry_until",
                            error=f"asked to be retried in {format_duration(after)}, after its retry-until"
                                  f" deadline {_when(rules.until)}")
        return Decision(True, after, counted=False, reason="retry_later",
                        error=error if reason == "retry_later" and error else "asked to be retried later")
    if attempt >= policy.attempts:
        return Decision(False, reason=reason, error=error)
    if rules.max_exceptions is not None and reason in EXCEPTION_REASONS:
        seen = 1 + sum(1 for e in history() if e.event in ("released", "failed") and e.reason in EXCEPTION_REASONS)
        if seen >= rules.max_exceptions:
            return Decision(False, reason="max_exceptions",
                            error=f"{seen} attempts failed (max_exceptions {rules.max_exceptions}); the last: {error}")
    delay = _backoff.delay(policy.backoff, attempt)
    if rules.until is not None and now + delay > rules.until:
        return Decision(False, reason="retry_until",
                        error=f"no retry starts after its retry-until deadline {_when(rules.until)}; the last"
                              f" attempt: {error}")
    return Decision(True, delay, reason=reason, error=error)


def expired(policy: Policy, attempt: int, now: float | None = None) -> bool:
    """Whether a claimed retry (``attempt`` > 1) is past the retry-until deadline: it must not start."""
    until = policy.rules.until
    return attempt > 1 and until is not None and (time.time() if now is None else now) > until


def recovery(job: Any, attempt: int, default_tries: int, now: float | None = None) -> tuple[bool, float]:
    """For a backend recovering ``job`` whose worker died during ``attempt``: (exhausted, delay)."""
    p = policy_of(job, None, default_tries)
    if attempt >= p.attempts:
        return True, 0.0
    delay = _backoff.delay(p.backoff, attempt)
    if p.rules.until is not None and (time.time() if now is None else now) + delay > p.rules.until:
        return True, 0.0
    return False, delay


def schedule(info: Any, policy: Policy, now: float | None = None, rows: int = 5) -> dict[str, Any]:
    """The retry schedule of a job (``queue:show``): its attempts so far, when the next starts
    (or why none will), and the delays of the retries after it (ranges when jittered)."""
    now = time.time() if now is None else now
    job, state = info.job, str(info.state)
    attempts = []
    for e in info.events:
        if e.event == "claimed":
            attempts.append({"attempt": e.attempt, "at": e.at, "outcome": "running"})
        elif e.event in ("released", "failed", "done") and attempts and attempts[-1]["outcome"] == "running":
            outcome = "retry later" if e.reason == "retry_later" else e.event
            attempts[-1].update(outcome=outcome, reason=e.reason, ended_at=e.at)
    out: dict[str, Any] = {"policy": policy.to_json(), "attempts": attempts, "next_attempt_at": None,
                           "next_attempt": None, "no_more_retries": None, "then": []}
    done = info.attempts
    failure = info.failure
    if state == "done":
        out["no_more_retries"] = "succeeded"
        return out
    if state == "failed":
        out["no_more_retries"] = _why_failed(failure, policy, done)
        return out
    if state in ("pending", "delayed"):
        out["next_attempt_at"] = job.available_at
        out["next_attempt"] = done + 1
        first = done + 1
    else:  # reserved: attempt `done` is running; if it fails, retry `done` waits its backoff
        first = done
    until = policy.rules.until
    for n in range(first, first + rows):
        if n >= policy.attempts:
            out["then"].append({"after_attempt": n, "retry": False, "why": f"attempt {n} is the last of {policy.attempts}"})
            break
        lo, hi = _backoff.bounds(policy.backoff, n)
        row = {"after_attempt": n, "retry": True, "delay_min": lo, "delay_max": hi}
        if until is not None and now + lo > until:
            out["then"].append({"after_attempt": n, "retry": False, "why": "past its retry-until deadline"})
            break
        out["then"].append(row)
    return out


def _why_failed(failure: Any, policy: Policy, attempts: int) -> str:
    reason = failure.reason if failure is not None else None
    if reason == "no_retry":
        return "the command said fail now (exit 65 / forge.Fail)"
    if reason == "retry_until":
        return "its retry-until deadline passed"
    if reason == "max_exceptions":
        return f"{policy.rules.max_exceptions} attempts failed (max_exceptions)"
    if reason == "max_releases":
        return "it asked to be retried later too often (max_releases)"
    if reason in ("cancelled", "unknown_command"):
        return f"{reason.replace('_', ' ')}"
    return f"attempts used up ({attempts} of {policy.attempts})"
