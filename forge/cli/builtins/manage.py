"""Changing queues and jobs: ``queue:retry``, ``forget``, ``flush``, ``prune-failed``, ``prune-done``,
``clear``, ``pause``, ``resume`` and ``restart``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Annotated

import typer

from forge import output
from forge.cli.builtins._shared import Connection, JobId, QueueOpt, manager, resolve_ids
from forge.config import validate_queue_name
from forge.errors import EXIT_DUPLICATE, JobNotFound, RetryBlocked, UsageError
from forge.job import JobInfo, Reason, State, valid_id
from forge.queue.manager import CommandQueue, QueueManager


def _not_failed(m: QueueManager, job_id: str) -> JobNotFound:
    err = JobNotFound(job_id)
    info = m.backend.find(job_id) if valid_id(job_id) else None  # else a prefix of no job
    if info is not None:
        err.args = (f"Job {job_id} is {info.state}, not failed.",)
    err.hint = "Run `forge queue:failed` to see the failed jobs."
    return err


def retry(
    ids: Annotated[list[str], typer.Argument(metavar="ID... | all", help='Job ids, or "all".', show_default=False)],
    queue: Annotated[str | None, typer.Option(help="With all: only this queue.")] = None,
    reason: Annotated[Reason | None, typer.Option(help="With all: only jobs that failed for this reason.")] = None,
    command: Annotated[str | None, typer.Option(help="With all: only jobs of this command.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the ids that would be retried; change nothing.")] = False,
    connection: Connection = None,
) -> int:
    """Move failed jobs back to pending with their attempts reset; print each id retried.

    A unique job whose key another live job holds stays failed and is reported (exit 4).
    With --dry-run, print the ids that would be retried and change nothing."""
    m = manager(connection)
    every = ids == ["all"]
    if not every:
        ids = resolve_ids(m, [i for i in ids if i != "all"]) + (["all"] if "all" in ids else [])
    if "all" in ids and not every:
        raise UsageError('Pass job ids or "all", not both.')
    if not every and (queue or reason or command):
        raise UsageError("--queue, --reason and --command filter `retry all`; drop them when naming ids.")
    if dry_run:
        return _retry_dry_run(m, ids, every, validate_queue_name(queue) if queue else None,
                              str(reason) if reason else None, command)
    retried: set[str] = set()
    blocked: set[str] = set()

    def report_blocked(err: RetryBlocked) -> None:
        output.error(err.message, err.hint)
        blocked.add(err.failed_id)

    # a prefix that matched no job is not a job id: it is only reported missing, below
    stream: Iterator[JobInfo] = m.iter_retry("all" if every else [i for i in ids if valid_id(i)], queue=validate_queue_name(queue) if queue else None,
                                             reason=str(reason) if reason else None, command=command,
                                             on_blocked=report_blocked)
    for info in stream:
        sys.stdout.write(info.id + "\n")
        sys.stdout.flush()
        retried.add(info.id)
    missing = [i for i in dict.fromkeys(ids) if not every and i not in retried and i not in blocked]
    for job_id in missing[1:]:
        err = _not_failed(m, job_id)
        output.error(err.message, err.hint)
    if missing:
        raise _not_failed(m, missing[0])
    if output.is_tty(sys.stderr) or not (retried or blocked):
        output.info(f"Retried {len(retried)} job(s)." if retried or blocked else f"No failed jobs to retry in {m.location}.")
    return EXIT_DUPLICATE if blocked else 0


def _retry_dry_run(m: QueueManager, ids: list[str], every: bool, queue: str | None, reason: str | None,
                   command: str | None) -> int:
    """What ``retry`` would retry: the failed jobs it names or filters, printed, nothing moved."""
    if every:
        chosen = [j.id for j in m.jobs(queue=queue, state=State.FAILED, command=command)
                  if reason is None or (j.failure is not None and j.failure.reason == reason)]
    else:
        chosen = []
        for job_id in dict.fromkeys(ids):
            info = m.backend.find(job_id) if valid_id(job_id) else None
            if info is None or info.state != State.FAILED:
                raise _not_failed(m, job_id)
            chosen.append(job_id)
    for job_id in chosen:
        sys.stdout.write(job_id + "\n")
    sys.stdout.flush()
    if output.is_tty(sys.stderr) or not chosen:
        output.info(f"Would retry {len(chosen)} job(s) (dry run: nothing changed)." if chosen
                    else f"No failed jobs to retry in {m.location}.")
    return 0


def cancel(
    ids: Annotated[list[str], typer.Argument(metavar="ID...", help="Job ids (or unique prefixes).", show_default=False)],
    running: Annotated[bool, typer.Option("--running", help="Also kill running jobs (their worker records them cancelled).")] = False,
    connection: Connection = None,
) -> int:
    """Cancel waiting jobs (pending or delayed): they are failed with reason cancelled.

    With --running, a running job is killed by its worker (SIGTERM, then SIGKILL) and
    recorded cancelled too. Prints each id cancelled; exits 5 if an id names no job."""
    m = manager(connection)
    code = 0
    for job_id in resolve_ids(m, ids):
        try:
            if not valid_id(job_id):  # a prefix that matched no job
                raise JobNotFound(job_id)
            info = m.cancel(job_id, running=running)
        except JobNotFound as err:
            output.error(err.message, err.hint)
            code = err.exit_code
            continue
        sys.stdout.write(info.id + "\n")
        sys.stdout.flush()
        if output.is_tty(sys.stderr):
            output.info(f"Cancelled job {info.id} ({info.job.command}).")
    return code


def forget(job_id: JobId, connection: Connection = None) -> None:
    """Delete one failed job (and its captured output)."""
    m = manager(connection)
    job_id = m.resolve_id(job_id)
    if not m.forget(job_id):
        raise _not_failed(m, job_id)
    output.info(f"Deleted failed job {job_id}.")


def flush(
    hours: Annotated[float | None, typer.Option(help="Only jobs that failed more than this many hours ago.", min=0)] = None,
    queue: QueueOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Do not ask for confirmation on a terminal.")] = False,
    connection: Connection = None,
) -> None:
    """Delete all failed jobs (or those older than --hours).

    On a terminal it asks first (as queue:clear does) unless --force; from a script or cron
    (stdin not a terminal) it deletes without asking."""
    m = manager(connection)
    name = validate_queue_name(queue) if queue else None
    if not force and output.is_tty(sys.stdin):
        count = sum(s.failed for s in m.stats([name] if name else None))
        what = f"the {count} failed job(s)" + (f" of queue {name}" if name else "") + f" in {m.location}"
        if hours is not None:
            what += f" (those older than {hours:g} h)"
        typer.confirm(f"Delete {what}?", abort=True, err=True)
    n = m.flush(hours, queue=name)
    output.info(f"Deleted {n} failed job(s)" + (f" older than {hours:g} h." if hours is not None else "."))


def prune_failed(
    hours: Annotated[float, typer.Option(help="Delete failed jobs older than this many hours.", min=0)] = 24,
    connection: Connection = None,
) -> None:
    """Delete failed jobs older than --hours (default 24)."""
    n = manager(connection).prune_failed(hours)
    output.info(f"Deleted {n} failed job(s) older than {hours:g} h.")


def prune_done(
    hours: Annotated[float | None, typer.Option(help="Only jobs finished more than this many hours ago.", min=0)] = None,
    connection: Connection = None,
) -> None:
    """Delete finished jobs kept for inspection (all, or those older than --hours)."""
    n = manager(connection).prune_done(hours)
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
    """Stop workers claiming from a queue (running jobs finish).

    Pausing a queue that was never used (a typo?) warns; `forge queue:forget-queue` removes it."""
    m = manager(connection)
    queue = validate_queue_name(queue)
    known = m.list()
    if queue not in known:
        others = ", ".join(known) if known else "none yet"
        output.warn(f"Queue {queue} has no jobs and was never used (known queues: {others}); pausing it anyway. "
                    f"If it is a typo, remove it with `forge queue:forget-queue {queue}`.")
    m.pause(queue)
    output.info(f"Paused queue {queue}: workers claim nothing from it until `forge queue:resume {queue}`.")


def forget_queue(queue: Annotated[str, typer.Argument(metavar="QUEUE", help="The empty queue to remove.")],
                 connection: Connection = None) -> None:
    """Remove an empty queue: its name and pause marker (a typo'd or retired queue).

    Refused (exit 2) while the queue holds any job, in any state, or a live worker serves it."""
    m = manager(connection)
    queue = validate_queue_name(queue)
    if queue not in m.list():
        output.info(f"No queue {queue} in {m.location}; nothing to remove.")
        return
    serving = [w.name for w in m.workers() if queue in w.queues]
    if serving:
        raise UsageError(f"Queue {queue} is served by live worker(s) {', '.join(serving)}; not removing it.",
                         hint="Stop those workers (or restart them without this queue) first.")
    if not m.forget_queue(queue):
        raise UsageError(f"Queue {queue} still holds jobs; not removing it.",
                         hint=f"See them with `forge queue:list --queue={queue}`; remove them with "
                              f"`forge queue:clear --queue={queue}` and `forge queue:flush --queue={queue}`.")
    output.info(f"Removed the empty queue {queue}.")


def resume(queue: Annotated[str, typer.Argument(metavar="QUEUE", help="The queue to resume.")], connection: Connection = None) -> None:
    """Let workers claim from a paused queue again."""
    manager(connection).resume(queue)
    output.info(f"Resumed queue {queue}.")


def restart(connection: Connection = None) -> None:
    """Make every worker exit after its current job (a supervisor then restarts it)."""
    manager(connection).restart()
    output.info("Asked every worker to exit after its current job.")
