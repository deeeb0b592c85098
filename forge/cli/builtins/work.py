"""``forge queue:work``: the long-running worker process."""

from __future__ import annotations

from typing import Annotated

import typer

from forge.durations import parse_duration
from forge.errors import UsageError
from forge.retry.backoff import parse as parse_backoff


def _duration(value: str | None, what: str) -> float | None:
    return None if value is None else parse_duration(value, what=f"--{what}")


def work(
    connection: Annotated[str | None, typer.Argument(help="The connection to work (default: queue.connection).")] = None,
    queue: Annotated[str | None, typer.Option(help="Queues in strict priority order, e.g. high,default.")] = None,
    once: Annotated[bool, typer.Option("--once", help="Process one job, then exit.")] = False,
    stop_when_empty: Annotated[bool, typer.Option("--stop-when-empty", help="Exit once the queues are empty.")] = False,
    max_jobs: Annotated[int, typer.Option(help="Exit after this many jobs (0: no limit).", min=0)] = 0,
    max_time: Annotated[str, typer.Option(help="Exit after this long, e.g. 1h (0: no limit).")] = "0",
    sleep: Annotated[str, typer.Option(help="Longest idle wait between checks (wakes early on new jobs).")] = "3",
    rest: Annotated[str, typer.Option(help="Pause after each job.")] = "0",
    timeout: Annotated[str | None, typer.Option(help="Kill a job running longer (default: queue.timeout).")] = None,
    tries: Annotated[int | None, typer.Option(help="Attempts per job that neither it nor its command sets (default: queue.tries).", min=1)] = None,
    backoff: Annotated[str | None, typer.Option(help="Seconds before retries, e.g. 1,5,10, or exp:2s..10m,jitter=full (default: queue.backoff).")] = None,
    memory: Annotated[int, typer.Option(help="Exit (code 12) when the worker uses more MB (0: no limit).", min=0)] = 128,
    fresh_process: Annotated[bool, typer.Option("--fresh-process", help="Run every job in a new process (slower; nothing a job does in its process can reach the next).")] = False,
    echo: Annotated[bool, typer.Option("--echo", help="Also print each job's output here (while developing).")] = False,
    name: Annotated[str | None, typer.Option(help="This worker's name in job records (default: host:pid).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object per event on stdout.")] = False,
    schedule: Annotated[bool, typer.Option("--schedule", help="Also dispatch the project's scheduled commands when due (checked every 2 s between jobs).")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Also report maintenance and other events.")] = False,
) -> int:
    """Process jobs from the queues until stopped (SIGTERM/SIGINT finish the current job first)."""
    from forge.config import load_settings
    from forge.registry.discovery import build_registry
    from forge.worker.reporting import console_reporter
    from forge.worker.supervisor import Worker, WorkerOptions, parse_queues

    settings = load_settings()
    queues = parse_queues(queue) if queue else (settings.default_queue,)
    if not queues:
        raise UsageError("--queue is empty; name at least one queue, e.g. --queue=default.")
    options = WorkerOptions(
        queues=queues,
        once=once,
        stop_when_empty=stop_when_empty,
        max_jobs=max_jobs,
        max_time=_duration(max_time, "max-time") or 0.0,
        sleep=_duration(sleep, "sleep") or 0.0,
        rest=_duration(rest, "rest") or 0.0,
        timeout=_duration(timeout, "timeout") or settings.timeout,
        tries=tries or settings.tries,
        backoff=parse_backoff(backoff, what="--backoff") if backoff else settings.backoff,
        memory=memory,
        fresh_process=fresh_process,
        echo=echo,
        name=name or "",
    )
    from forge.backends import open_backend

    conn = settings.connection_config(connection)
    registry = build_registry(settings)
    worker = Worker(lambda: open_backend(conn, done_retention=settings.done_retention), registry, options,
                    console_reporter(json_out, verbose), cwd=str(settings.root),
                    supervisor_factory=lambda: open_backend(conn, done_retention=settings.done_retention,
                                                            quick=True),
                    where={"connection": conn.name, "location": conn.where()})
    from forge.events.worker import for_worker as events_for_worker
    from forge.limits.gate import for_worker as gate_for_worker

    worker.events = events_for_worker(settings, registry, name=options.name, queues=options.queues,
                                      report=worker.report, backend=lambda: worker.backend, durably=worker._durably,
                                      default_tries=options.tries)
    worker.gate = gate_for_worker(settings)  # None unless forge.toml has [limits]: the plain claim path
    if schedule:
        from forge.scheduler.tick import worker_tick

        worker.tick = worker_tick(settings, registry, connection, worker.report)
    worker.install_signals()
    reason = worker.run()
    return reason.exit_code
