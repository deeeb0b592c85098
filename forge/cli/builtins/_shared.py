"""What the queue commands share: their common options, the queue manager and time formatting.

Cheap to import (typer and forge only): ``queue:dispatch`` imports it on every run.
"""

from __future__ import annotations

import shlex
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any

import typer

from forge.durations import format_duration
from forge.job import JobInfo
from forge.queue.manager import QueueManager
from forge.registry.runner import default_registry

if TYPE_CHECKING:
    from forge.backends.base import QueueStats

#: The version of the queue commands' JSON documents. 2: every time is an RFC 3339 string
#: (``iso_time``), as ``queue:dispatch --json`` has always printed them; failed jobs carry
#: ``reason``, ``error`` and ``failed_at`` at top level.
JSON_VERSION = 2

Connection = Annotated[str | None, typer.Option(help="The connection to use (default: queue.connection).")]
Json = Annotated[bool, typer.Option("--json", help="Machine-readable output on stdout.")]
QueueOpt = Annotated[str | None, typer.Option("--queue", help="Only this queue.")]
JobId = Annotated[str, typer.Argument(metavar="ID", help="The job id, or a unique prefix of it.")]


def manager(connection: str | None) -> QueueManager:
    """The queue manager over the process's one registry (the one the CLI already built)."""
    return QueueManager(connection, registry=default_registry())


def resolve_ids(m: QueueManager, ids: list[str]) -> list[str]:
    """Whole job ids for ``ids``, each an id or a unique prefix (an ambiguous one: exit 2).
    A prefix that matches nothing is kept as given, for the command's own not-found error."""
    from forge.errors import JobNotFound

    out = []
    for text in ids:
        try:
            out.append(m.resolve_id(text))
        except JobNotFound:
            out.append(text)
    return out


def fmt_time(t: float | None) -> str:
    """A timestamp as local ``YYYY-MM-DD HH:MM:SS`` for tables; empty for None or 0."""
    return datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S") if t else ""


def iso_time(t: float | None) -> str | None:
    """The one time format of forge's JSON: RFC 3339 in UTC with milliseconds (as queue:dispatch --json)."""
    from forge.times import rfc3339

    return rfc3339(t)


def job_json(info: JobInfo) -> dict[str, Any]:
    """A job for the JSON of queue:list, queue:show and queue:failed: times in RFC 3339, and
    a failed job's reason, error and time at top level."""
    d = info.to_dict()
    for key in ("dispatched_at", "available_at", "updated_at"):
        d[key] = iso_time(d.get(key))
    if isinstance(d.get("retry"), dict) and d["retry"].get("until") is not None:
        d["retry"] = {**d["retry"], "until": iso_time(d["retry"]["until"])}  # retry_until
    d["events"] = [{**e, **{k: iso_time(e[k]) for k in ("at", "deadline") if isinstance(e.get(k), (int, float))}}
                   for e in d["events"]]
    failure = info.failure if info.state == "failed" else None
    d["reason"] = failure.reason if failure else None
    d["error"] = failure.error if failure else None
    d["failed_at"] = iso_time(failure.at) if failure else None
    from forge.jobprogress import public

    d["progress"] = public(d.get("progress"))
    return d


def stats_json(stats: QueueStats) -> dict[str, Any]:
    """A queue's stats for the JSON of queue:list and queue:monitor: its size and the oldest pending time in RFC 3339."""
    return {**stats.to_dict(), "size": stats.size, "oldest_pending_at": iso_time(stats.oldest_pending_at)}


def ago(t: float | None, now: float) -> str:
    """How long before ``now`` the time ``t`` was (``format_duration``, never negative); empty for None or 0."""
    return format_duration(max(now - t, 0.0)) if t else ""


def argv(info: JobInfo) -> str:
    """The job's command line, shell-quoted (``import:data 'my file.csv'``)."""
    return shlex.join([info.job.command, *info.job.args])

