"""Looking at queues and jobs: ``queue:list``, ``queue:show``, ``queue:log``, ``queue:failed``, ``queue:monitor``.

Each command calls the library once and renders through ``forge.output``: data and JSON on
stdout, human messages on stderr.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Annotated, Any

import typer

from forge import output
from forge.cli.builtins._shared import (
    JSON_VERSION,
    Connection,
    JobId,
    Json,
    QueueOpt,
    ago,
    argv,
    fmt_time,
    iso_time,
    job_json,
    manager,
    stats_json,
)
from forge.config import validate_queue_name
from forge.durations import format_duration, parse_duration
from forge.errors import EXIT_JOB_FAILED, EXIT_THRESHOLD, UsageError
from forge.job import JobInfo, Reason, State
from forge.jobprogress import describe
from forge.jobprogress.store import with_progress
from forge.queue.manager import QueueManager
from forge.retry.backoff import describe as describe_backoff

TAIL_BYTES = 4096
FINISHED = (State.DONE, State.FAILED)


def _stats_rows(stats: Sequence[Any], now: float) -> list[list[Any]]:
    return [[s.queue, s.pending, s.delayed, s.reserved, s.failed, s.done, ago(s.oldest_pending_at, now),
             "yes" if s.paused else ""] for s in stats]


def _clock(t: float, now: float) -> str:
    """Local time; the date only when it is not today (keeps the jobs table narrow)."""
    same_day = datetime.fromtimestamp(t).date() == datetime.fromtimestamp(now).date()
    return datetime.fromtimestamp(t).strftime("%H:%M:%S" if same_day else "%Y-%m-%d %H:%M")


def _when(info: JobInfo, now: float) -> str:
    """Available at (waiting jobs), running since (reserved), or finished at (failed, done)."""
    if info.state == State.RESERVED:
        return f"since {_clock(info.updated_at, now)}" if info.updated_at else ""
    t = info.job.available_at if info.state in (State.PENDING, State.DELAYED) else info.updated_at
    return _clock(t, now) if t else ""


def list_jobs(
    queue: QueueOpt = None,
    state: Annotated[State | None, typer.Option(help="Only jobs in this state.", case_sensitive=False)] = None,
    command: Annotated[str | None, typer.Option(help="Only jobs of this command.")] = None,
    limit: Annotated[int, typer.Option(help="Show at most this many jobs.", min=0)] = 50,
    json_out: Json = False,
    connection: Connection = None,
) -> None:
    """Show a summary per queue, then the jobs (running, pending, delayed, failed, done)."""
    m = manager(connection)
    stats = m.stats([validate_queue_name(queue)] if queue else None)
    jobs = list(m.jobs(queue=queue, state=state, command=command, limit=limit)) if limit else []
    jobs = with_progress(m.backend, jobs)
    blocked = _blocked(m, jobs)  # {id: "blocked by ..."} for due jobs a limit holds back
    if json_out:
        output.print_json({"version": JSON_VERSION,
                           "queues": [stats_json(s) for s in stats],
                           "jobs": [{**job_json(j), "blocked_by": blocked.get(j.id, "")[11:] or None} for j in jobs],
                           "quarantined": m.quarantined()})
        return
    _warn_quarantine(m)
    if not stats:
        output.info(f"No queues yet in {m.location}. Queue a job with `forge queue:dispatch COMMAND [ARGS]...`.")
        return
    now = time.time()
    output.table(["queue", "pending", "delayed", "reserved", "failed", "done", "oldest pending", "paused"],
                 _stats_rows(stats, now), title="Queues")
    output.line()
    cols = ["id", "command", "queue", "state", "attempts", "available / since"]
    shown = any(j.progress for j in jobs)  # the progress column only when a job reported some
    output.table(cols + (["progress"] if shown else []) + (["waits"] if blocked else []),
                 [[j.id, argv(j), j.job.queue, str(j.state), j.attempts, _when(j, now)]
                  + ([describe(j.progress, now, running=j.state == State.RESERVED)] if shown else [])
                  + ([blocked.get(j.id, "")] if blocked else [])
                  for j in jobs], title="Jobs")
    if not jobs:
        output.info("No jobs match.")
    elif len(jobs) == limit:
        output.info(f"Showing the first {limit} jobs; use --limit, --state, --queue or --command for others.")


def _blocked(m: QueueManager, jobs: list[JobInfo]) -> dict[str, str]:
    """Why each due job waits, when limits are in play (nothing is read otherwise)."""
    from forge.limits import LIMITS_KEY
    from forge.limits.spec import load

    cfg = load(m.settings)
    if not cfg.queues and not any(LIMITS_KEY in j.job.metadata for j in jobs):
        return {}
    from forge.limits.inspect import waiting_reasons

    return waiting_reasons(m.backend, cfg, jobs)


def _warn_quarantine(m: QueueManager) -> None:
    """A warning when files sit in quarantine (file backend): they are not jobs forge could read."""
    count = m.quarantined()
    if count:
        output.warn(f"{count} file{'s' if count != 1 else ''} in quarantine ({m.quarantine_dir}): not jobs forge "
                    "could read; see the .reason file beside each.")


def _tail(log: bytes) -> str:
    """The end of a job's whole log, for people (see ``forge.attempts.readable``)."""
    from forge.attempts import readable

    return readable(log, TAIL_BYTES)


def _attempts(info: JobInfo, log: bytes) -> tuple[list[Any], list[bytes | None], int | None]:
    """The job's attempts, each one's part of the log, and how many attempts it may make
    (its own tries, else what the last attempt's worker counted; None when neither is known)."""
    from forge.attempts import attempts, split

    found = attempts(info, len(log))
    most = info.job.max_attempts
    if most is None:
        most = next((a.tries for a in reversed(found) if a.tries), None)
    if most is None and info.state == State.FAILED and found and found[-1].outcome == "failed":
        most = found[-1].attempt
    return found, split(log, found), most


def _attempts_json(found: list[Any], parts: list[bytes | None], most: int | None) -> list[dict[str, Any]]:
    from forge.attempts import EARLIER_CHARS, LAST_CHARS, readable

    return [{"run": a.run, "attempt": a.attempt, "max_attempts": a.tries or most, "started_at": iso_time(a.started_at),
             "worker": a.worker, "outcome": a.outcome, "ended_at": iso_time(a.ended_at), "reason": a.reason,
             "exit_code": a.exit_code, "error": a.error, "duration": a.duration, "log_offset": a.log_start,
             "log_bytes": len(part) if part is not None else None,
             "output_tail": readable(part, LAST_CHARS if a is found[-1] else EARLIER_CHARS)
             if part is not None else None}
            for a, part in zip(found, parts, strict=True)]


def _print_attempts(job_id: str, found: list[Any], parts: list[bytes | None], most: int | None,
                    log_size: int = 0) -> None:
    """Each attempt's header (attempt N of M, when it started, where, how it ended) and the end
    of its output; the output of attempts before the last few is left to ``queue:log``."""
    from forge.attempts import EARLIER_CHARS, LAST_CHARS, SHOWN_WITH_OUTPUT, header, readable
    from forge.backends.retention import LOG_CAP

    output.line("\nOutput (tail), by attempt:")
    hidden = max(0, len(found) - SHOWN_WITH_OUTPUT)
    runs = any(a.run != a.attempt for a in found)
    for i, (a, part) in enumerate(zip(found, parts, strict=True)):
        output.line(header(a, most, fmt_time(a.started_at), runs=runs))
        if i < hidden:
            if i == hidden - 1:
                output.line(f"  (output of the {hidden} earlier attempt{'s' if hidden != 1 else ''} not shown: "
                            f"`forge queue:log {job_id}` prints all of it)")
            continue
        text = readable(part or b"", LAST_CHARS if i == len(found) - 1 else EARLIER_CHARS).rstrip("\n")
        full = log_size >= LOG_CAP and a.log_end is not None and a.log_end >= log_size
        if text:
            output.line(output.shown(text))
        if full:  # the log keeps the first 1 MiB: what this attempt printed after it was dropped
            output.line(f"  ({'later ' if text else ''}output not kept: the job's log is full at 1 MiB;"
                        " `forge queue:log` has what was kept)")
        elif not text:
            output.line("  (no output)")


def show(job_id: JobId, json_out: Json = False, connection: Connection = None) -> None:
    """Show everything about one job: payload, metadata, attempts, worker and output tail."""
    m = manager(connection)
    job_id = m.resolve_id(job_id)
    info = m.find(job_id)
    log = m.read_log(job_id)
    tail = _tail(log)
    found, parts, most = _attempts(info, log)
    from forge.retry.show import schedule_json, schedule_lines

    if json_out:
        output.print_json({"version": JSON_VERSION, "job": job_json(info), "output_tail": tail,
                           "attempts": _attempts_json(found, parts, most),
                           "retry": schedule_json(info, m.settings)})
        return
    job = info.job
    worker = next((e.worker for e in reversed(info.events) if e.worker), None)
    rows = [
        ["id", job.id], ["command", argv(info)], ["queue", job.queue], ["state", str(info.state)],
        ["attempts", f"{info.attempts} of {job.max_attempts or 'the worker default'}"],
        ["dispatched", fmt_time(job.dispatched_at)], ["available", fmt_time(job.available_at)],
        ["updated", fmt_time(info.updated_at)],
        ["timeout", format_duration(job.timeout) if job.timeout else "the worker default"],
        ["backoff", describe_backoff(job.backoff) if job.backoff else "the worker default"],
        ["unique key", job.unique_key or ""], ["metadata", json.dumps(dict(job.metadata)) if job.metadata else ""],
        ["worker", worker or ""],
    ]
    if info.progress:
        rows.append(["progress", describe(info.progress, time.time(), running=info.state == State.RESERVED)])
    output.table(["field", "value"], rows, title=f"Job {job.id}")
    if info.events:
        output.line()
        output.table(["event", "attempt", "at", "worker", "reason", "exit", "duration", "error"],
                     [[e.event, e.attempt, fmt_time(e.at), e.worker, e.reason, e.exit_code,
                       format_duration(e.duration) if e.duration is not None else "", e.error]
                      for e in info.events], title="History")
    output.line()
    output.line("\n".join(schedule_lines(info, m.settings)))
    if found and all(p is not None for p in parts):
        if log:
            _print_attempts(job.id, found, parts, most, len(log))
    elif tail:  # claimed before attempts recorded where their output starts: one tail
        output.line("\nOutput (tail):")
        output.line(output.shown(tail.rstrip("\n")))


def log(
    job_id: JobId,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing until the job is done or failed.")] = False,
    connection: Connection = None,
) -> int:
    """Print a job's captured output; with --follow, until it finishes (exit 7 if it failed)."""
    m = manager(connection)
    job_id = m.resolve_id(job_id)
    info = m.find(job_id)
    if follow and output.is_tty(sys.stdout) and info.state not in FINISHED:
        return _follow_with_bar(m, job_id, info)
    out = sys.stdout.buffer
    offset = 0
    while True:
        data = m.read_log(job_id, offset)
        if data:
            out.write(data)
            out.flush()
            offset += len(data)
            continue
        if not follow or info.state in FINISHED:
            return EXIT_JOB_FAILED if follow and info.state == State.FAILED else 0
        time.sleep(0.2)
        info = m.find(job_id)


def _follow_with_bar(m: QueueManager, job_id: str, info: JobInfo) -> int:
    """``queue:log --follow`` on a terminal: the output as it comes, without its progress
    lines, and a progress bar under it while the job reports progress."""
    from forge.jobprogress.view import LineFilter, ProgressView

    lines = LineFilter()
    offset = 0
    with ProgressView(f"job {job_id[:8]}", stream=sys.stdout) as view:
        while True:
            data = m.read_log(job_id, offset)
            if data:
                offset += len(data)
                view.write(lines.feed(data.decode(errors="replace")))
                continue
            view.update(info.progress)
            if info.state in FINISHED:
                view.write(lines.flush())
                return EXIT_JOB_FAILED if info.state == State.FAILED else 0
            time.sleep(0.2)
            info = m.find(job_id)


def failed(
    queue: QueueOpt = None,
    command: Annotated[str | None, typer.Option(help="Only jobs of this command.")] = None,
    reason: Annotated[Reason | None, typer.Option(help="Only jobs that failed for this reason.")] = None,
    since: Annotated[str | None, typer.Option(help="Only jobs that failed within this long, e.g. 1h.")] = None,
    limit: Annotated[int, typer.Option(help="Show at most this many jobs.", min=1)] = 50,
    json_out: Json = False,
    connection: Connection = None,
) -> None:
    """List failed jobs, newest first, with the reason and error (filters as queue:retry all)."""
    m = manager(connection)
    after = time.time() - parse_duration(since, what="--since") if since is not None else None
    jobs = []
    for j in m.jobs(queue=validate_queue_name(queue) if queue else None, state=State.FAILED, command=command):
        f = j.failure
        if after is not None and (j.updated_at or 0) < after:
            break  # newest first: the rest are older
        if reason is not None and (f is None or f.reason != reason):
            continue
        jobs.append(j)
        if len(jobs) >= limit:
            break
    if json_out:
        output.print_json({"version": JSON_VERSION, "jobs": [job_json(j) for j in jobs]})
        return
    if not jobs:
        output.info(f"No failed jobs in {m.location}.")
        return
    rows = []
    for j in jobs:
        f = j.failure
        rows.append([j.id, argv(j), j.job.queue, fmt_time(j.updated_at), j.attempts,
                     f.reason if f else "", (f.error or "") if f else ""])
    output.table(["id", "command", "queue", "failed at", "attempts", "reason", "error"], rows, title="Failed jobs")


def _queue_names(queues: Sequence[str] | None) -> list[str] | None:
    names = [n for item in queues or [] for n in item.split(",") if n]
    return [validate_queue_name(n) for n in names] or None


def _counted(s: Any, delayed: bool) -> int:
    """What --max compares: the due (pending) jobs, plus the delayed ones with --count-delayed."""
    return int(s.size if delayed else s.pending)


def _sample(m: QueueManager, names: list[str] | None, max_size: int | None,
            delayed: bool = False) -> tuple[list[Any], list[str]]:
    stats = m.stats(names)
    over = [s.queue for s in stats if max_size is not None and _counted(s, delayed) > max_size]
    return stats, over


def _monitor_json(stats: Sequence[Any], over: list[str], max_size: int | None, delayed: bool = False,
                  quarantined: int = 0) -> dict[str, Any]:
    return {"version": JSON_VERSION, "max": max_size, "max_counts": "pending+delayed" if delayed else "pending",
            "at": iso_time(time.time()), "quarantined": quarantined,
            "queues": [{**stats_json(s), "over": s.queue in over} for s in stats]}


def _monitor_rows(stats: Sequence[Any], over: list[str]) -> list[list[Any]]:
    return [[s.queue, s.size, s.pending, s.delayed, s.reserved, s.failed, "yes" if s.paused else "",
             "OVER" if s.queue in over else "ok"] for s in stats]


MONITOR_COLUMNS = ["queue", "size", "pending", "delayed", "reserved", "failed", "paused", "status"]


def monitor(
    queues: Annotated[list[str] | None, typer.Argument(metavar="[QUEUES,...]", help="Queues to watch (default: all).", show_default=False)] = None,
    max_size: Annotated[int | None, typer.Option("--max", help="Exit 8 when a queue holds more due (pending) jobs.", min=0)] = None,
    count_delayed: Annotated[bool, typer.Option("--count-delayed", help="--max counts delayed jobs too (pending + delayed).")] = False,
    watch: Annotated[bool, typer.Option("--watch", help="Refresh until Ctrl-C.")] = False,
    interval: Annotated[str, typer.Option(help="Refresh interval for --watch.")] = "2s",
    json_out: Json = False,
    connection: Connection = None,
) -> int:
    """Show queue sizes (pending + delayed); exit 8 when one holds more due (pending) jobs than
    --max (with --count-delayed: more pending + delayed jobs)."""
    names = _queue_names(queues)
    every = parse_duration(interval, what="--interval")
    if every <= 0:
        raise UsageError("--interval must be more than 0, e.g. 2s.")
    m = manager(connection)
    if watch:
        return _watch(m, names, max_size, every, json_out, count_delayed)
    stats, over = _sample(m, names, max_size, count_delayed)
    if json_out:
        output.print_json(_monitor_json(stats, over, max_size, count_delayed, m.quarantined()))
    else:
        _warn_quarantine(m)
        output.table(MONITOR_COLUMNS, _monitor_rows(stats, over))
    return _alert(stats, over, max_size, count_delayed)


def _alert(stats: Sequence[Any], over: list[str], max_size: int | None, delayed: bool = False) -> int:
    if not over:
        return 0
    sizes = {s.queue: _counted(s, delayed) for s in stats}
    kind = "waiting (pending + delayed)" if delayed else "due (pending)"
    what = ", ".join(f"queue {q} holds {sizes[q]} {kind} job{'s' if sizes[q] != 1 else ''}" for q in over)
    output.error(f"{what}: more than --max {max_size}.")
    return EXIT_THRESHOLD


def _watch(m: QueueManager, names: list[str] | None, max_size: int | None, every: float, json_out: bool,
           delayed: bool = False) -> int:
    stats, over = _sample(m, names, max_size, delayed)
    try:
        if json_out or not output.is_tty():
            while True:  # a stream for pipes: a JSON line, or a plain table, per sample
                if json_out:
                    output.print_jsonl(_monitor_json(stats, over, max_size, delayed, m.quarantined()))
                else:
                    output.table(MONITOR_COLUMNS, _monitor_rows(stats, over), title=f"{fmt_time(time.time())}")
                    sys.stdout.flush()
                time.sleep(every)
                stats, over = _sample(m, names, max_size, delayed)
        rows, title, styles = _live_view(stats, over, max_size)
        with output.LiveTable(MONITOR_COLUMNS, rows, title=title, row_styles=styles) as live:
            while True:
                time.sleep(every)
                stats, over = _sample(m, names, max_size, delayed)
                rows, title, styles = _live_view(stats, over, max_size)
                live.update(rows, title=title, row_styles=styles)
    except KeyboardInterrupt:
        pass
    return _alert(stats, over, max_size, delayed)


def _live_view(stats: Sequence[Any], over: list[str], max_size: int | None) -> tuple[list[list[Any]], str, list[str | None]]:
    """Rows, title and row styles of the --watch table: queues over --max in red, paused ones in yellow."""
    limit = "" if max_size is None else f", alert above {max_size}"
    styles = ["bold red" if s.queue in over else ("yellow" if s.paused else None) for s in stats]
    return _monitor_rows(stats, over), f"Queues at {fmt_time(time.time())}{limit} (Ctrl-C to stop)", styles


def workers(json_out: Json = False, connection: Connection = None) -> None:
    """List the live workers: host, pid, queues, state, current job, jobs done and failed, last heartbeat."""
    m = manager(connection)
    found = m.workers()
    if json_out:
        output.print_json({"version": JSON_VERSION, "workers": [
            {"name": w.name, "host": w.host, "pid": w.pid, "queues": list(w.queues), "state": str(w.state),
             "job_id": w.job_id, "job_command": w.job_command, "job_since": iso_time(w.job_since),
             "started_at": iso_time(w.started_at), "heartbeat_at": iso_time(w.heartbeat_at),
             "done": w.done, "failed": w.failed} for w in found]})
        return
    if not found:
        output.info(f"No live workers on {m.location}. Start one with `forge queue:work`.")
        return
    now = time.time()
    output.table(["name", "host", "pid", "queues", "state", "job", "since", "done", "failed", "heartbeat"],
                 [[w.name, w.host, w.pid, ",".join(w.queues), str(w.state),
                   f"{w.job_id[:8]} {w.job_command}" if w.job_id else "", ago(w.job_since, now),
                   w.done, w.failed, f"{ago(w.heartbeat_at, now) or '0s'} ago"] for w in found],
                 title="Workers")
