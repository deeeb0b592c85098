"""The scheduler's commands: ``schedule:run``, ``schedule:work``, ``schedule:list``,
``schedule:test``, ``schedule:pause`` and ``schedule:resume``.

Each loads the project's schedule (``Scheduler.load``) and calls the library once. An invalid
entry is one line on stderr naming it, and the command exits 2 once it has done its work with
the valid ones.
"""

from __future__ import annotations

import sys
import time
from datetime import datetime
from typing import Annotated, Any

import typer

from forge import output
from forge.cli.builtins._shared import JSON_VERSION, Connection, Json
from forge.cli.fastpath.schedule import line as _line
from forge.cli.fastpath.schedule import report_errors as _report_errors
from forge.errors import UsageError

Name = Annotated[str, typer.Argument(metavar="NAME", help="The schedule entry's name (see schedule:list).")]


def _load(connection: str | None, *, check_args: bool = True) -> tuple[Any, list[Any]]:
    from forge.scheduler import Scheduler

    return Scheduler.load(connection=connection, check_args=check_args)


def _parse_at(value: str) -> float:
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        raise UsageError(f"--at must be a time like 2026-12-01T03:00 or 2026-12-01T03:00+01:00, not {value!r}.") from None
    if not 1971 <= dt.year <= 9000:  # the ticks around it must be representable
        raise UsageError(f"--at must be a time between the years 1971 and 9000, not {value!r}.")
    return dt.timestamp()  # a naive time is local time


def run(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print what would be dispatched; change nothing.")] = False,
    at: Annotated[str | None, typer.Option(help="With --dry-run: as if it were this time (ISO 8601).")] = None,
    json_out: Json = False,
    connection: Connection = None,
) -> int:
    """Dispatch every scheduled command that is due (run it from cron every minute).

    Each tick is dispatched once however many schedule:run, schedule:work and queue:work
    --schedule processes run it, on any number of hosts."""
    if at is not None and not dry_run:
        raise UsageError("--at asks what would be due at a time: use it with --dry-run.")
    from forge.cli.fastpath.schedule import print_actions

    # (A stale command cache is saved once this returns: forge.cli.fastpath.FastResult.)
    sch, errors = _load(connection, check_args=False)  # a due tick's arguments are checked as it is dispatched
    now = _parse_at(at) if at is not None else None
    actions = sch.plan(now) if dry_run else sch.run(now)
    print_actions(actions, json_out)
    return _report_errors(errors)


def work(
    max_time: Annotated[str, typer.Option(help="Exit after this long, e.g. 1h (0: no limit).")] = "0",
    json_out: Json = False,
    connection: Connection = None,
) -> int:
    """Run the schedule in the foreground: sleep until the next tick, dispatch it, repeat.

    SIGTERM/SIGINT stop it after the current run; SIGUSR2/SIGCONT pause and resume it."""
    from forge.durations import parse_duration
    from forge.scheduler.loop import ScheduleLoop

    limit = parse_duration(max_time, what="--max-time")
    sch, errors = _load(connection, check_args=False)
    code = _report_errors(errors)

    def report(event: str, data: dict[str, Any]) -> None:
        if json_out:
            output.print_jsonl({"event": event, "ts": time.time(), **data})
        elif event == "backend_unavailable":
            output.line(f"Queue unavailable: {data['error']} (retrying in {data['retry_in']:.1f} s)")
        elif event in ("scheduler_started", "scheduler_stopped"):
            output.line(f"{event.replace('_', ' ').capitalize()}: {data}")
        sys.stdout.flush()

    def on_action(action: Any) -> None:
        if json_out:
            report(action.action, action.to_dict())
        else:
            output.line(_line(action))
            sys.stdout.flush()

    loop = ScheduleLoop(sch, report, on_action=on_action, max_time=limit)
    loop.install_signals()
    rc = loop.run()
    return rc or code


def list_(json_out: Json = False, connection: Connection = None) -> int:
    """Show every schedule entry: when it runs, the next runs, the last tick and its job."""
    sch, errors = _load(connection)
    rows = sch.status()
    removed = sch.removed()
    if json_out:
        output.print_json({"version": JSON_VERSION, "entries": rows,
                           "errors": [{"entry": e.entry, "error": e.message} for e in errors],
                           "removed": removed})
        return _report_errors(errors)
    if not rows and not errors and not removed:
        output.info("No schedule entries: add [[schedule]] tables to forge.toml"
                    ' or @command(..., schedule="0 3 * * *").')
    for r in rows:
        head = f"{r['name']}  {r['expression']}  ({r['description']}, {r['timezone']})"
        output.line(head + ("  PAUSED" if r["paused"] else ""))
        argv = " ".join([r["command"], *r["args"]])
        output.line(f"  runs:    {argv} on queue {r['queue']}; overlap {r['overlap']}, catch_up {r['catch_up']}")
        output.line(f"  next:    {', '.join(r['next_runs'])}")
        last = r["last"]
        if last:
            late = f", {last['lateness']:.1f} s late" if last["lateness"] is not None else ""
            output.line(f"  last:    {last['tick']} job {last['job_id']} {last['state']}{late}")
        else:
            output.line("  last:    never")
        skipped = f"{r['skipped']}" + (f" (last {r['last_skipped']})" if r["last_skipped"] else "")
        missed = f"{r['missed']}" + (f" (last {r['last_missed']})" if r["last_missed"] else "")
        output.line(f"  skipped: {skipped}  missed: {missed}  paused: {'yes' if r['paused'] else 'no'}")
    if removed:
        output.line("")
        output.line("Removed from the schedule (their state is kept 7 days, then the next run drops it):")
        for r in removed:
            until = f"dropped after {r['drop_after']}" if r["drop_after"] else "dropped 7 days after the next run"
            output.line(f"  {r['name']}  last tick {r['last_tick'] or 'never'}; {until}")
    return _report_errors(errors)


def test(name: Name, json_out: Json = False, connection: Connection = None) -> int:
    """Dispatch one run of a schedule entry now (its schedule is not changed); print the job id."""
    sch, errors = _load(connection)
    record = sch.test(name)
    if json_out:
        output.print_json(record.to_dict())
    else:
        output.line(record.id)
    return _report_errors(errors)


def pause(name: Name, connection: Connection = None) -> int:
    """Stop dispatching an entry (on every host) until schedule:resume."""
    sch, errors = _load(connection)
    sch.pause(name)
    output.info(f'Schedule "{name}" paused.')
    return _report_errors(errors)


def resume(name: Name, connection: Connection = None) -> int:
    """Dispatch an entry again; the ticks it missed while paused are not caught up."""
    sch, errors = _load(connection)
    sch.entry(name)  # an unknown name is an error before anything is read
    before = sch.store.read([name]).get(name)
    sch.resume(name)
    if before is None or not before.paused:
        output.info(f'Schedule "{name}" was not paused: nothing to resume.')
    else:
        output.info(f'Schedule "{name}" resumed.')
    return _report_errors(errors)
