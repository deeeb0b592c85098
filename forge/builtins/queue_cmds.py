"""The operator CLI: ``queue:dispatch``, ``queue:list``, ``queue:show`` ... ``queue:restart``.

Each command parses its options, calls the library (``forge.queue``) once and renders the
result through ``forge.output``: data and JSON on stdout, human messages on stderr. Errors are
``ForgeError`` subclasses; ``forge.cli`` turns them into one line and an exit code. Commands
whose outcome is not an error (a failed job under ``--wait``, a queue over ``--max``) return
the exit code instead.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Annotated, Any

import typer

from .. import output
from ..config import validate_queue_name
from ..durations import format_duration, parse_backoff, parse_duration
from ..errors import (
    EXIT_JOB_FAILED,
    EXIT_THRESHOLD,
    ForgeError,
    InvalidCommand,
    JobNotFound,
    UsageError,
)
from ..job import MAX_OUTPUT_TAIL, JobInfo, Reason, State
from ..queue import CommandQueue, QueuedCommand, QueueManager

JSON_VERSION = 1
TAIL_BYTES = 4096
FINISHED = (State.DONE, State.FAILED)

Connection = Annotated[str | None, typer.Option(help="The connection to use (default: queue.connection).")]
Json = Annotated[bool, typer.Option("--json", help="Machine-readable output on stdout.")]
QueueOpt = Annotated[str | None, typer.Option("--queue", help="Only this queue.")]
JobId = Annotated[str, typer.Argument(metavar="ID", help="The job id (a UUID).")]


def _registry() -> Any:
    from ..typerapp import ForgeGroup

    return ForgeGroup._registry(None)  # type: ignore[arg-type]  # the one the CLI already built


def _manager(connection: str | None) -> QueueManager:
    return QueueManager(connection, registry=_registry())


def _time(t: float | None) -> str:
    return datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S") if t else ""


def _ago(t: float | None, now: float) -> str:
    return format_duration(max(now - t, 0.0)) if t else ""


def _argv(info: JobInfo) -> str:
    return shlex.join([info.job.command, *info.job.args])


def _err_tty() -> bool:
    return output.is_tty(sys.stderr)


# -- queue:dispatch -------------------------------------------------------------------------

DISPATCH_OPTIONS = {"--queue", "--connection", "--delay", "--at", "--tries", "--timeout", "--backoff", "--meta",
                    "--unique-key", "--unique-ttl", "--json", "--wait", "--wait-timeout", "--from-file"}
FILE_KEYS = {"command", "args", "queue", "delay", "tries", "timeout", "backoff", "meta", "unique_key", "unique_ttl"}


def _meta(items: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"Invalid --meta {item!r}: use key=value, e.g. --meta tenant=acme.")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def _at(value: str) -> datetime:
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise UsageError(f"Invalid --at {value!r}: use an ISO date/time, e.g. 2026-12-01T09:00.") from None


def _build(command: str, args: Sequence[str], o: dict[str, Any]) -> QueuedCommand:
    """A QueuedCommand from dispatch options (the CLI's, or one --from-file line's)."""
    cmd = QueuedCommand(command).with_args(args)
    if o.get("delay") is not None:
        cmd = cmd.with_delay(parse_duration(o["delay"], what="--delay"))
    if o.get("at") is not None:
        cmd = cmd.at(o["at"])
    if o.get("tries") is not None:
        cmd = cmd.with_max_attempts(o["tries"])
    if o.get("timeout") is not None:
        cmd = cmd.with_timeout(parse_duration(o["timeout"], what="--timeout"))
    if o.get("backoff") is not None:
        cmd = cmd.with_backoff(parse_backoff(o["backoff"], what="--backoff"))
    for key, value in (o.get("meta") or {}).items():
        cmd = cmd.with_metadata(key, value)
    if o.get("unique_key") is not None:
        ttl = o.get("unique_ttl")
        cmd = cmd.with_unique_key(o["unique_key"], None if ttl is None else parse_duration(ttl, what="--unique-ttl"))
    return cmd


def dispatch(
    command: Annotated[str | None, typer.Argument(metavar="COMMAND", help="The command to queue.", show_default=False)] = None,
    args: Annotated[list[str] | None, typer.Argument(metavar="[ARGS]...", help="Its arguments and options (everything after COMMAND).", show_default=False)] = None,
    queue: Annotated[str | None, typer.Option(help="The queue (default: queue.default).")] = None,
    connection: Connection = None,
    delay: Annotated[str | None, typer.Option(help="Run no earlier than this from now, e.g. 90s, 5m, 1h30m.")] = None,
    at: Annotated[str | None, typer.Option(help="Run no earlier than this local time, e.g. 2026-12-01T09:00.")] = None,
    tries: Annotated[int | None, typer.Option(help="Attempts before the job fails (default: the worker's).", min=1)] = None,
    timeout: Annotated[str | None, typer.Option(help="Kill an attempt running longer, e.g. 10m.")] = None,
    backoff: Annotated[str | None, typer.Option(help="Seconds before each retry, e.g. 1,5,10.")] = None,
    meta: Annotated[list[str] | None, typer.Option(metavar="KEY=VALUE", help="Metadata (repeatable); VALUE is parsed as JSON when it is JSON.")] = None,
    unique_key: Annotated[str | None, typer.Option(help="Refuse (exit 4) while a job with this key is queued or running.")] = None,
    unique_ttl: Annotated[str | None, typer.Option(help="Let the unique key lapse after this long.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the dispatch record as JSON.")] = False,
    wait: Annotated[bool, typer.Option("--wait", help="Block until the job is done (exit 0) or failed (exit 7).")] = False,
    wait_timeout: Annotated[str | None, typer.Option(help="With --wait: give up after this long (exit 1).")] = None,
    from_file: Annotated[str | None, typer.Option(metavar="FILE|-", help="Dispatch one job per JSON line of FILE (- for stdin).")] = None,
) -> int:
    """Push a command onto a queue; print the job id.

    Options go before COMMAND; everything after it (options included) is the job's.
    """
    opts = {"delay": delay, "at": _at(at) if at else None, "tries": tries, "timeout": timeout,
            "backoff": backoff, "meta": _meta(meta or []), "unique_key": unique_key, "unique_ttl": unique_ttl}
    if delay is not None and at is not None:
        raise UsageError("Pass --delay or --at, not both.")
    if unique_ttl is not None and unique_key is None:
        raise UsageError("--unique-ttl needs --unique-key.")
    if from_file is not None:
        if command is not None:
            raise UsageError("Pass COMMAND or --from-file, not both.")
        if wait:
            raise UsageError("--wait works with one job; it cannot be combined with --from-file.")
        return _dispatch_file(from_file, queue, connection, opts)
    if command is None:
        raise UsageError("Missing COMMAND.", hint="Usage: forge queue:dispatch [OPTIONS] COMMAND [ARGS]...")
    job_args = list(args or [])
    if job_args[:1] == ["--"]:
        job_args = job_args[1:]  # `forge queue:dispatch CMD -- ARGS`
    for flag in ("--help", "-h"):
        if flag in job_args[: job_args.index("--") if "--" in job_args else None]:
            raise UsageError(f"{flag} after {command} would be queued as the job's argument.",
                             hint=f"Run `forge {command} --help` to see its usage.")
    q = CommandQueue(queue, connection=connection, registry=_registry())
    try:
        record = q.push(_build(command, job_args, opts))
    except InvalidCommand as exc:
        mine = [a for a in job_args if a.split("=", 1)[0] in DISPATCH_OPTIONS]
        if mine:
            exc.hint = f"Options of queue:dispatch go before the command: forge queue:dispatch {mine[0]} {command} ..."
        raise
    if json_out:
        output.print_json(record.to_dict())
    else:
        output.line(record.id)
        sys.stdout.flush()
    if _err_tty():
        found = q.find(record.id) if record.scheduled_at else None
        when = f", not before {_time(found.job.available_at)}" if found else ""
        output.info(f"Queued {command} on {record.queue} as {record.id}{when}")
    if not wait:
        return 0
    limit = parse_duration(wait_timeout, what="--wait-timeout") if wait_timeout else None
    return _wait(q, record.id, limit)


def _wait(q: CommandQueue, job_id: str, limit: float | None) -> int:
    start, pause = time.monotonic(), 0.05
    while True:
        info = q.find(job_id)
        if info is None:
            raise JobNotFound(job_id)
        if info.state == State.DONE:
            return 0
        if info.state == State.FAILED:
            _print_failure(q.backend.read_log(job_id), info)
            return EXIT_JOB_FAILED
        if limit is not None and time.monotonic() - start >= limit:
            raise ForgeError(f"Job {job_id} is still {info.state} after --wait-timeout {format_duration(limit)}; it stays queued.",
                             hint=f"Follow it with `forge queue:log {job_id} --follow`.") from None
        time.sleep(pause)
        pause = min(pause * 1.5, 0.5)


def _print_failure(log: bytes, info: JobInfo) -> None:
    failure = info.failure
    tail = log[-MAX_OUTPUT_TAIL:].decode(errors="replace") if log else (failure.output_tail if failure else "") or ""
    if tail:
        sys.stderr.write(tail if tail.endswith("\n") else tail + "\n")
    why = f"{failure.reason}: {failure.error}" if failure and failure.error else (failure.reason if failure else "unknown")
    output.error(f"Job {info.id} ({info.job.command}) failed after {info.attempts} attempt(s): {why}.",
                 f"Retry it with `forge queue:retry {info.id}`.")


def _file_lines(source: str) -> list[str]:
    if source == "-":
        return sys.stdin.read().splitlines()
    try:
        with open(source, encoding="utf-8") as fh:
            return fh.read().splitlines()
    except OSError as exc:
        raise UsageError(f"Cannot read --from-file {source}: {exc.strerror}.") from None


def _parse_line(text: str, defaults: dict[str, Any]) -> tuple[str | None, QueuedCommand]:
    try:
        d = json.loads(text)
    except ValueError as exc:
        raise UsageError(f"invalid JSON ({exc})") from None
    if not isinstance(d, dict):
        raise UsageError('expected a JSON object like {"command": "email:send", "args": ["--user=1"]}')
    unknown = sorted(set(d) - FILE_KEYS)
    if unknown:
        raise UsageError(f"unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(FILE_KEYS))})")
    command, args = d.get("command"), d.get("args", [])
    if not isinstance(command, str) or not command:
        raise UsageError('"command" must be a non-empty string')
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise UsageError('"args" must be a list of strings')
    if d.get("meta") is not None and not isinstance(d["meta"], dict):
        raise UsageError('"meta" must be a JSON object')
    fields = {k: d[k] for k in FILE_KEYS - {"command", "args", "queue"} if k in d}
    opts = {**defaults, **fields, "meta": {**(defaults.get("meta") or {}), **(d.get("meta") or {})}}
    return d.get("queue"), _build(command, args, opts)


def _dispatch_file(source: str, queue: str | None, connection: str | None, defaults: dict[str, Any]) -> int:
    registry = _registry()
    queues: dict[str | None, CommandQueue] = {}
    batches: dict[str, list[QueuedCommand]] = {}
    keys: dict[str, int] = {}
    for n, text in enumerate(_file_lines(source), 1):
        if not text.strip():
            continue
        try:
            name, cmd = _parse_line(text, defaults)
            name = name or queue
            q = queues.get(name) or queues.setdefault(name, CommandQueue(name, connection=connection, registry=registry))
            q.jobs_for([cmd])  # validates the command, its arguments and the options
        except UsageError as exc:
            exc.args = (f"{source}, line {n}: {exc.message}",)
            exc.hint = "Nothing was dispatched."
            raise
        if cmd.unique_key is not None and keys.setdefault(cmd.unique_key, n) != n:
            raise UsageError(f'{source}, line {n}: unique key "{cmd.unique_key}" is also used on line {keys[cmd.unique_key]}.',
                             hint="Nothing was dispatched.")
        batches.setdefault(q.name, []).append(cmd)
    total, sent = sum(len(b) for b in batches.values()), 0
    with _progress(total, "Dispatching") as advance:
        for name, cmds in batches.items():
            q = CommandQueue(name, connection=connection, registry=registry, check_args=False)
            for i in range(0, len(cmds), 1000):
                try:
                    ids = q.dispatch_many(cmds[i:i + 1000])  # validated above; store in batches
                except Exception:
                    if sent:
                        output.warn(f"{sent} of {total} jobs were queued before this error (their ids are on stdout).")
                    raise
                sys.stdout.write("".join(f"{job_id}\n" for job_id in ids))
                sys.stdout.flush()
                sent += len(ids)
                advance(len(ids))
    if _err_tty():
        output.info(f"Queued {total} jobs from {'stdin' if source == '-' else source}.")
    return 0


# -- inspection -----------------------------------------------------------------------------


def _stats_rows(stats: Sequence[Any], now: float) -> list[list[Any]]:
    return [[s.queue, s.pending, s.delayed, s.reserved, s.failed, s.done, _ago(s.oldest_pending_at, now),
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
    m = _manager(connection)
    stats = m.stats([validate_queue_name(queue)] if queue else None)
    jobs = list(m.jobs(queue=queue, state=state, command=command, limit=limit)) if limit else []
    if json_out:
        output.print_json({"version": JSON_VERSION,
                           "queues": [{**s.to_dict(), "size": s.size} for s in stats],
                           "jobs": [j.to_dict() for j in jobs]})
        return
    if not stats:
        output.info("No queues yet. Queue a job with `forge queue:dispatch COMMAND [ARGS]...`.")
        return
    now = time.time()
    output.table(["queue", "pending", "delayed", "reserved", "failed", "done", "oldest pending", "paused"],
                 _stats_rows(stats, now), title="Queues")
    output.line()
    output.table(["id", "command", "queue", "state", "attempts", "available / since"],
                 [[j.id, _argv(j), j.job.queue, str(j.state), j.attempts, _when(j, now)] for j in jobs],
                 title="Jobs")
    if not jobs:
        output.info("No jobs match.")
    elif len(jobs) == limit:
        output.info(f"Showing the first {limit} jobs; use --limit, --state, --queue or --command for others.")


def _tail(log: bytes) -> str:
    return log[-TAIL_BYTES:].decode(errors="replace")


def show(job_id: JobId, json_out: Json = False, connection: Connection = None) -> None:
    """Show everything about one job: payload, metadata, attempts, worker and output tail."""
    m = _manager(connection)
    info = m.find(job_id)
    tail = _tail(m.backend.read_log(job_id))
    if json_out:
        output.print_json({"version": JSON_VERSION, "job": info.to_dict(), "output_tail": tail})
        return
    job = info.job
    worker = next((e.worker for e in reversed(info.events) if e.worker), None)
    rows = [
        ["id", job.id], ["command", _argv(info)], ["queue", job.queue], ["state", str(info.state)],
        ["attempts", f"{info.attempts} of {job.max_attempts or 'the worker default'}"],
        ["dispatched", _time(job.dispatched_at)], ["available", _time(job.available_at)],
        ["updated", _time(info.updated_at)],
        ["timeout", format_duration(job.timeout) if job.timeout else "the worker default"],
        ["backoff", ",".join(f"{b:g}" for b in job.backoff) if job.backoff else "the worker default"],
        ["unique key", job.unique_key or ""], ["metadata", json.dumps(dict(job.metadata)) if job.metadata else ""],
        ["worker", worker or ""],
    ]
    output.table(["field", "value"], rows, title=f"Job {job.id}")
    if info.events:
        output.line()
        output.table(["event", "attempt", "at", "worker", "reason", "exit", "duration", "error"],
                     [[e.event, e.attempt, _time(e.at), e.worker, e.reason, e.exit_code,
                       format_duration(e.duration) if e.duration is not None else "", e.error]
                      for e in info.events], title="History")
    if tail:
        output.line("\nOutput (tail):")
        output.line(tail.rstrip("\n"))


def log(
    job_id: JobId,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing until the job is done or failed.")] = False,
    connection: Connection = None,
) -> int:
    """Print a job's captured output; with --follow, until it finishes (exit 7 if it failed)."""
    m = _manager(connection)
    info = m.find(job_id)
    out = sys.stdout.buffer
    offset = 0
    while True:
        data = m.backend.read_log(job_id, offset)
        if data:
            out.write(data)
            out.flush()
            offset += len(data)
            continue
        if not follow or info.state in FINISHED:
            return EXIT_JOB_FAILED if follow and info.state == State.FAILED else 0
        time.sleep(0.2)
        info = m.find(job_id)


def failed(
    queue: QueueOpt = None,
    limit: Annotated[int, typer.Option(help="Show at most this many jobs.", min=1)] = 50,
    json_out: Json = False,
    connection: Connection = None,
) -> None:
    """List failed jobs, newest first, with the reason and error."""
    jobs = _manager(connection).failed(validate_queue_name(queue) if queue else None, limit)
    if json_out:
        output.print_json({"version": JSON_VERSION, "jobs": [j.to_dict() for j in jobs]})
        return
    if not jobs:
        output.info("No failed jobs.")
        return
    rows = []
    for j in jobs:
        f = j.failure
        rows.append([j.id, _argv(j), j.job.queue, _time(j.updated_at), j.attempts,
                     f.reason if f else "", (f.error or "") if f else ""])
    output.table(["id", "command", "queue", "failed at", "attempts", "reason", "error"], rows, title="Failed jobs")


def _queue_names(queues: Sequence[str] | None) -> list[str] | None:
    names = [n for item in queues or [] for n in item.split(",") if n]
    return [validate_queue_name(n) for n in names] or None


def _sample(m: QueueManager, names: list[str] | None, max_size: int | None) -> tuple[list[Any], list[str]]:
    stats = m.stats(names)
    over = [s.queue for s in stats if max_size is not None and s.size > max_size]
    return stats, over


def _monitor_json(stats: Sequence[Any], over: list[str], max_size: int | None) -> dict[str, Any]:
    return {"version": JSON_VERSION, "max": max_size, "at": time.time(),
            "queues": [{**s.to_dict(), "size": s.size, "over": s.queue in over} for s in stats]}


def _monitor_rows(stats: Sequence[Any], over: list[str]) -> list[list[Any]]:
    return [[s.queue, s.size, s.pending, s.delayed, s.reserved, s.failed, "yes" if s.paused else "",
             "OVER" if s.queue in over else "ok"] for s in stats]


MONITOR_COLUMNS = ["queue", "size", "pending", "delayed", "reserved", "failed", "paused", "status"]


def monitor(
    queues: Annotated[list[str] | None, typer.Argument(metavar="[QUEUES,...]", help="Queues to watch (default: all).", show_default=False)] = None,
    max_size: Annotated[int | None, typer.Option("--max", help="Exit 8 when a queue holds more waiting jobs.", min=0)] = None,
    watch: Annotated[bool, typer.Option("--watch", help="Refresh until Ctrl-C.")] = False,
    interval: Annotated[str, typer.Option(help="Refresh interval for --watch.")] = "2s",
    json_out: Json = False,
    connection: Connection = None,
) -> int:
    """Show queue sizes (pending + delayed); exit 8 when one holds more than --max."""
    names = _queue_names(queues)
    every = parse_duration(interval, what="--interval")
    if every <= 0:
        raise UsageError("--interval must be more than 0, e.g. 2s.")
    m = _manager(connection)
    if watch:
        return _watch(m, names, max_size, every, json_out)
    stats, over = _sample(m, names, max_size)
    if json_out:
        output.print_json(_monitor_json(stats, over, max_size))
    else:
        output.table(MONITOR_COLUMNS, _monitor_rows(stats, over))
    return _alert(stats, over, max_size)


def _alert(stats: Sequence[Any], over: list[str], max_size: int | None) -> int:
    if not over:
        return 0
    sizes = {s.queue: s.size for s in stats}
    what = ", ".join(f"queue {q} holds {sizes[q]} waiting jobs" for q in over)
    output.error(f"{what}: more than --max {max_size}.")
    return EXIT_THRESHOLD


def _watch(m: QueueManager, names: list[str] | None, max_size: int | None, every: float, json_out: bool) -> int:
    stats, over = _sample(m, names, max_size)
    try:
        if json_out or not output.is_tty():
            while True:  # a stream for pipes: a JSON line, or a plain table, per sample
                if json_out:
                    output.print_jsonl(_monitor_json(stats, over, max_size))
                else:
                    output.table(MONITOR_COLUMNS, _monitor_rows(stats, over), title=f"{_time(time.time())}")
                    sys.stdout.flush()
                time.sleep(every)
                stats, over = _sample(m, names, max_size)
        from rich.live import Live  # belongs in forge.output with the progress bar below

        with Live(_live_table(stats, over, max_size), console=output.console(), auto_refresh=False) as live:
            while True:
                time.sleep(every)
                stats, over = _sample(m, names, max_size)
                live.update(_live_table(stats, over, max_size), refresh=True)
    except KeyboardInterrupt:
        pass
    return _alert(stats, over, max_size)


def _live_table(stats: Sequence[Any], over: list[str], max_size: int | None) -> Any:
    from rich.table import Table

    limit = "" if max_size is None else f", alert above {max_size}"
    t = Table(title=f"Queues at {_time(time.time())}{limit} (Ctrl-C to stop)", title_justify="left", header_style="bold")
    for col in MONITOR_COLUMNS:
        t.add_column(col)
    for row, s in zip(_monitor_rows(stats, over), stats, strict=True):
        t.add_row(*map(str, row), style="bold red" if s.queue in over else ("yellow" if s.paused else None))
    return t


class _progress:
    """A Rich progress bar on stderr when it is a terminal; a no-op elsewhere."""

    def __init__(self, total: int, what: str) -> None:
        self.total, self.what = total, what
        self.bar: Any = None

    def __enter__(self) -> Any:
        if not _err_tty() or self.total < 2:
            return lambda n: None
        # Like the live view below, this belongs in forge.output (not open for edits in issue 5).
        from rich.progress import Progress

        # redirect_stdout=False: the ids printed meanwhile must reach stdout (a pipe), not the bar.
        self.bar = Progress(console=output.console(stderr=True), transient=True,
                            redirect_stdout=False, redirect_stderr=False)
        self.bar.start()
        task = self.bar.add_task(self.what, total=self.total)
        return lambda n: self.bar.advance(task, n)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()


# -- management -----------------------------------------------------------------------------


def _not_failed(m: QueueManager, job_id: str) -> JobNotFound:
    err = JobNotFound(job_id)
    info = m.backend.find(job_id)
    if info is not None:
        err.args = (f"Job {job_id} is {info.state}, not failed.",)
    err.hint = "Run `forge queue:failed` to see the failed jobs."
    return err


def retry(
    ids: Annotated[list[str], typer.Argument(metavar="ID... | all", help='Job ids, or "all".', show_default=False)],
    queue: Annotated[str | None, typer.Option(help="With all: only this queue.")] = None,
    reason: Annotated[Reason | None, typer.Option(help="With all: only jobs that failed for this reason.")] = None,
    command: Annotated[str | None, typer.Option(help="With all: only jobs of this command.")] = None,
    connection: Connection = None,
) -> int:
    """Move failed jobs back to pending with their attempts reset; print each id retried."""
    m = _manager(connection)
    every = ids == ["all"]
    if "all" in ids and not every:
        raise UsageError('Pass job ids or "all", not both.')
    if not every and (queue or reason or command):
        raise UsageError("--queue, --reason and --command filter `retry all`; drop them when naming ids.")
    retried: set[str] = set()
    stream: Iterator[JobInfo] = m.iter_retry("all" if every else ids, queue=validate_queue_name(queue) if queue else None,
                                             reason=str(reason) if reason else None, command=command)
    for info in stream:
        sys.stdout.write(info.id + "\n")
        sys.stdout.flush()
        retried.add(info.id)
    missing = [i for i in dict.fromkeys(ids) if not every and i not in retried]
    for job_id in missing[1:]:
        err = _not_failed(m, job_id)
        output.error(err.message, err.hint)
    if missing:
        raise _not_failed(m, missing[0])
    if _err_tty() or not retried:
        output.info(f"Retried {len(retried)} job(s)." if retried else "No failed jobs to retry.")
    return 0


def forget(job_id: JobId, connection: Connection = None) -> None:
    """Delete one failed job (and its captured output)."""
    m = _manager(connection)
    if not m.forget(job_id):
        raise _not_failed(m, job_id)
    output.info(f"Deleted failed job {job_id}.")


def flush(
    hours: Annotated[float | None, typer.Option(help="Only jobs that failed more than this many hours ago.", min=0)] = None,
    queue: QueueOpt = None,
    connection: Connection = None,
) -> None:
    """Delete all failed jobs (or those older than --hours)."""
    n = _manager(connection).flush(hours, queue=validate_queue_name(queue) if queue else None)
    output.info(f"Deleted {n} failed job(s)" + (f" older than {hours:g} h." if hours is not None else "."))


def prune_failed(
    hours: Annotated[float, typer.Option(help="Delete failed jobs older than this many hours.", min=0)] = 24,
    connection: Connection = None,
) -> None:
    """Delete failed jobs older than --hours (default 24)."""
    n = _manager(connection).prune_failed(hours)
    output.info(f"Deleted {n} failed job(s) older than {hours:g} h.")


def prune_done(
    hours: Annotated[float | None, typer.Option(help="Only jobs finished more than this many hours ago.", min=0)] = None,
    connection: Connection = None,
) -> None:
    """Delete finished jobs kept for inspection (all, or those older than --hours)."""
    n = _manager(connection).prune_done(hours)
    output.info(f"Deleted {n} finished job(s)" + (f" older than {hours:g} h." if hours is not None else "."))


def clear(
    queue: Annotated[str | None, typer.Option(help="The queue (default: queue.default).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Do not ask for confirmation.")] = False,
    connection: Connection = None,
) -> None:
    """Delete the pending and delayed jobs of a queue (running jobs are never touched)."""
    q = CommandQueue(queue, connection=connection)
    if not force:
        if not output.is_tty(sys.stdin):
            raise UsageError(f"Refusing to clear queue {q.name} without confirmation.", hint="Pass --force.")
        typer.confirm(f"Delete the {q.size()} pending and delayed jobs of queue {q.name}?", abort=True, err=True)
    output.info(f"Deleted {q.clear()} job(s) from queue {q.name}.")


def pause(queue: Annotated[str, typer.Argument(metavar="QUEUE", help="The queue to pause.")], connection: Connection = None) -> None:
    """Stop workers claiming from a queue (running jobs finish)."""
    _manager(connection).pause(queue)
    output.info(f"Paused queue {queue}: workers claim nothing from it until `forge queue:resume {queue}`.")


def resume(queue: Annotated[str, typer.Argument(metavar="QUEUE", help="The queue to resume.")], connection: Connection = None) -> None:
    """Let workers claim from a paused queue again."""
    _manager(connection).resume(queue)
    output.info(f"Resumed queue {queue}.")


def restart(connection: Connection = None) -> None:
    """Make every worker exit after its current job (a supervisor then restarts it)."""
    _manager(connection).restart()
    output.info("Asked every worker to exit after its current job.")


dispatch.__forge_context_settings__ = {"allow_interspersed_args": False}  # type: ignore[attr-defined]
