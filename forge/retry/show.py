"""The retry schedule as ``queue:show`` prints it (lines for a person, an object for ``--json``)."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

from forge.durations import format_duration
from forge.retry import backoff as _backoff
from forge.retry.policy import Policy, policy_of, schedule


def _policy(info: Any, settings: Any) -> Policy:
    """The job's policy as a worker with the configured defaults would apply it (a worker's own
    ``--tries``/``--backoff`` may differ for a job that leaves them to it)."""
    return policy_of(info.job, None, settings.tries, settings.backoff)


def _iso(t: float | None) -> str | None:
    from forge.times import rfc3339  # the one time format of forge's JSON

    return rfc3339(t)


def schedule_json(info: Any, settings: Any) -> dict[str, Any]:
    """``queue:show --json``'s ``retry`` object: times in RFC 3339, delays in seconds."""
    s = schedule(info, _policy(info, settings))
    s["policy"]["retry_until"] = _iso(s["policy"]["retry_until"])
    s["next_attempt_at"] = _iso(s["next_attempt_at"])
    s["attempts"] = [{**a, "at": _iso(a["at"]), **({"ended_at": _iso(a["ended_at"])} if "ended_at" in a else {})}
                     for a in s["attempts"]]
    return s


def _clock(t: float) -> str:
    return datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S")


def _span(lo: float, hi: float) -> str:
    if lo == hi:
        return format_duration(lo) if lo else "no delay"
    return f"{format_duration(lo)} to {format_duration(hi)}"


def schedule_lines(info: Any, settings: Any) -> list[str]:
    """The schedule for a person: attempts so far, the next one (or why none), then the delays."""
    p = _policy(info, settings)
    s = schedule(info, p)
    head = [f"tries {p.tries}" if p.tries is not None else f"tries until the deadline (at most {p.attempts})",
            f"backoff {_backoff.describe(p.backoff) or '0'}"]
    if p.rules.until is not None:
        head.append(f"retry until {_clock(p.rules.until)}")
    if p.rules.max_exceptions is not None:
        head.append(f"max exceptions {p.rules.max_exceptions}")
    head.append(f"max releases {p.max_releases}")
    lines = [f"Retry schedule ({', '.join(head)}):"]
    for a in s["attempts"]:
        if a["outcome"] == "retry later":
            what = "asked to be retried later (not counted)"
        else:
            what = a["outcome"] + (f" ({a['reason']})" if a.get("reason") and a["outcome"] != "done" else "")
        lines.append(f"  attempt {a['attempt']} at {_clock(a['at'])}: {what}")
    if str(info.state) == "done":
        lines.append("  done: no further attempts")
        return lines
    if s["no_more_retries"] is not None:
        lines.append(f"  no more retries: {s['no_more_retries']}")
        return lines
    if s["next_attempt_at"] is not None:
        due = info.job.available_at
        when = f"at {_clock(due)}" if due > time.time() else "now (due; it runs when a worker claims it)"
        lines.append(f"  next attempt: {s['next_attempt']}, {when}")
    for row in s["then"]:
        if row["retry"]:
            lines.append(f"  if attempt {row['after_attempt']} fails: retry after {_span(row['delay_min'], row['delay_max'])}")
        else:
            lines.append(f"  if attempt {row['after_attempt']} fails: no more retries ({row['why']})")
    return lines
