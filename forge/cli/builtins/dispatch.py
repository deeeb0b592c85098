"""``queue:dispatch``: push one command onto a queue (optionally ``--wait`` for it), or many ``--from-file``.

It runs from cron and scripts thousands of times: the common case never gets here, it is
handled without Typer by ``forge.cli.fastpath.dispatch`` (and a successful run here saves the
command cache it reads: ``forge.cli.fastpath.FastResult``). Its options are declared in
``forge.cli.dispatch_options``. The progress bar of ``--from-file`` comes from ``forge.output``, which
imports rich only when stderr is a terminal.
"""

from __future__ import annotations

import inspect
import json
import sys
import time
from typing import Annotated, Any

import typer

from forge import output
from forge.cli.dispatch_options import (
    FILE_JOB_KEYS,
    FILE_KEYS,
    FLAGS,
    build,
    check,
    in_past,
    job_options,
    typer_parameters,
)
from forge.cli.fastpath.dispatch import print_record
from forge.durations import format_duration, parse_duration
from forge.errors import EXIT_JOB_FAILED, ForgeError, InvalidCommand, JobNotFound, UsageError
from forge.job import MAX_JSON_DEPTH, MAX_OUTPUT_TAIL, Job, JobInfo, State
from forge.queue.manager import CommandQueue, QueuedCommand, _dispatch_record, batch_key
from forge.registry.runner import default_registry


def dispatch(
    command: Annotated[str | None, typer.Argument(metavar="COMMAND", help="The command to queue.", show_default=False)] = None,
    args: Annotated[list[str] | None, typer.Argument(metavar="[ARGS]...", help="Its arguments and options (everything after COMMAND).", show_default=False)] = None,
    **values: Any,
) -> int:
    """Push a command onto a queue; print the job id.

    Options go before COMMAND; everything after it (options included) is the job's.
    """
    # ``values`` are the options of forge.cli.dispatch_options.OPTIONS (the signature Typer reads is below).
    opts = job_options(values)
    check(values)
    if opts["at"] is not None and in_past(opts["at"]):
        output.warn(f"--at {values['at']} is in the past: the job is due at once.")
    if values["from_file"] is not None:
        _check_file_run(command, values)
        return _dispatch_file(values["from_file"], values["queue"], values["connection"], opts,
                              values["batch_id"], values["json_out"])
    name, job_args = _one_job(command, args, values)
    # Every check comes before the push: once the job is stored, the exit code must say so.
    wait_timeout = values["wait_timeout"]
    limit = parse_duration(wait_timeout, what="--wait-timeout") if values["wait"] and wait_timeout else None
    q = CommandQueue(values["queue"], connection=values["connection"], registry=default_registry())
    record = _push(q, name, job_args, {**opts, "idempotency_key": values["idempotency_key"]})
    print_record(q, record, name, json_out=values["json_out"])
    if not values["wait"]:
        return 0
    return _wait(q, record.id, limit)


_own = inspect.signature(dispatch, eval_str=True)  # COMMAND and ARGS
dispatch.__signature__ = _own.replace(  # type: ignore[attr-defined]
    parameters=[*list(_own.parameters.values())[:2], *typer_parameters()])
dispatch.__annotations__ = {p.name: p.annotation for p in dispatch.__signature__.parameters.values()}  # type: ignore[attr-defined]
dispatch.__forge_context_settings__ = {"allow_interspersed_args": False}  # type: ignore[attr-defined]


def _check_file_run(command: str | None, values: dict[str, Any]) -> None:
    """The options that --from-file cannot take with it: ``UsageError`` for the first given."""
    if command is not None:
        raise UsageError("Pass COMMAND or --from-file, not both.")
    if values["wait"]:
        raise UsageError("--wait works with one job; it cannot be combined with --from-file.")
    if values["idempotency_key"] is not None:
        raise UsageError("--idempotency-key names one job; give --from-file a --batch-id instead.")
    if values["batch_id"] is not None and not values["batch_id"]:
        raise UsageError("--batch-id must not be empty.")


def _one_job(command: str | None, args: list[str] | None, values: dict[str, Any]) -> tuple[str, list[str]]:
    """The command and arguments of a dispatch of one job; ``UsageError`` if there is no
    COMMAND, a --from-file option, or a --help that would be queued as the job's argument."""
    if values["batch_id"] is not None:
        raise UsageError("--batch-id works with --from-file.", hint="For one job, use --idempotency-key.")
    if command is None:
        raise UsageError("Missing COMMAND.", hint="Usage: forge queue:dispatch [OPTIONS] COMMAND [ARGS]...")
    job_args = list(args or [])
    if job_args[:1] == ["--"]:
        job_args = job_args[1:]  # `forge queue:dispatch CMD -- ARGS`
    for flag in ("--help", "-h"):
        if flag in job_args[: job_args.index("--") if "--" in job_args else None]:
            raise UsageError(f"{flag} after {command} would be queued as the job's argument.",
                             hint=f"Run `forge {command} --help` to see its usage.")
    return command, job_args


def _push(q: CommandQueue, command: str, job_args: list[str], opts: dict[str, Any]) -> Any:
    """Build and store the job; a refused command whose arguments hold an option of
    queue:dispatch gets the hint that those go before the command."""
    try:
        return q.push(build(command, job_args, opts))
    except InvalidCommand as exc:
        mine = [a for a in job_args if a.split("=", 1)[0] in FLAGS]
        if mine:
            exc.hint = f"Options of queue:dispatch go before the command: forge queue:dispatch {mine[0]} {command} ..."
        raise


#: With --wait on a terminal: after this long without the job starting, say what forge waits for.
WAIT_NOTICE_AFTER = 1.0


def _wait(q: CommandQueue, job_id: str, limit: float | None) -> int:
    """Poll until the job is done (its output on stderr, exit 0) or failed (its output and the
    failure on stderr, exit 7). On a terminal, a job nobody has claimed within a second gets a
    line saying that forge is waiting, and for what."""
    from forge.jobprogress.view import ProgressView

    with ProgressView(f"job {job_id[:8]}") as view:
        return _poll(q, job_id, limit, view)


def _poll(q: CommandQueue, job_id: str, limit: float | None, view: Any) -> int:
    from forge.jobprogress.store import get_progress

    start, pause = time.monotonic(), 0.05
    told = not output.is_tty(sys.stderr)
    while True:
        info = q.find(job_id)
        if info is None:
            raise JobNotFound(job_id)
        if info.state != State.PENDING and info.state != State.DELAYED:
            view.update(get_progress(q.backend, [job_id]).get(job_id))  # a bar (terminal) or lines
        if info.state in (State.DONE, State.FAILED):
            view.close()
            log = q.backend.read_log(job_id)
            if view.bar:  # the bar showed the progress: not its raw lines again
                log = b"".join(x[:x.find(b"::forge-progress ")] if b"::forge-progress " in x else x
                               for x in log.splitlines(keepends=True))  # ".::forge-progress 1/3": "."
        if info.state == State.DONE:
            _print_output(log)
            return 0
        if not told and info.state in (State.PENDING, State.DELAYED) and time.monotonic() - start >= WAIT_NOTICE_AFTER:
            told = True
            output.info(f"Waiting for job {job_id[:8]} ({info.state} on queue {info.job.queue}): it runs when a worker"
                        f" claims it (`forge queue:work --queue={info.job.queue}`). Ctrl-C stops waiting; the job stays queued.")
        if info.state == State.FAILED:
            _print_failure(log, info)
            return EXIT_JOB_FAILED
        if limit is not None and time.monotonic() - start >= limit:
            raise ForgeError(f"Job {job_id} is still {info.state} after --wait-timeout {format_duration(limit)}; it stays queued.",
                             hint=f"Follow it with `forge queue:log {job_id} --follow`.") from None
        time.sleep(pause)
        pause = min(pause * 1.5, 0.5)


def _print_output(log: bytes, fallback: str = "") -> None:
    """The tail of a job's captured output on stderr, as --wait prints it on success and failure."""
    tail = log[-MAX_OUTPUT_TAIL:].decode(errors="replace") if log else fallback
    if tail:
        sys.stderr.write(tail if tail.endswith("\n") else tail + "\n")
        sys.stderr.flush()


def _print_failure(log: bytes, info: JobInfo) -> None:
    failure = info.failure
    _print_output(log, (failure.output_tail if failure else "") or "")
    why = f"{failure.reason}: {failure.error}" if failure and failure.error else (failure.reason if failure else "unknown")
    output.error(f"Job {info.id} ({info.job.command}) failed after {info.attempts} attempt(s): {why}.",
                 f"Retry it with `forge queue:retry {info.id}`.")


def _file_text(source: str) -> str:
    if source == "-":
        return sys.stdin.read()
    try:
        with open(source, encoding="utf-8") as fh:
            return fh.read()
    except OSError as exc:
        raise UsageError(f"Cannot read --from-file {source}: {exc.strerror}.") from None
    except UnicodeDecodeError:
        raise UsageError(f"Cannot read --from-file {source}: it is not UTF-8 text.") from None


def _batch_of(text: str, queue: str | None, defaults: dict[str, Any]) -> str:
    """The default batch id of a --from-file run: the same file with the same options is the
    same batch, so running it again (after a kill, say) queues only the lines missing."""
    import hashlib

    h = hashlib.sha256(json.dumps([text, queue, defaults], sort_keys=True, default=str).encode())
    return f"file-{h.hexdigest()[:32]}"


def _parse_line(text: str, defaults: dict[str, Any]) -> tuple[str | None, QueuedCommand]:
    try:
        d = json.loads(text)
    except ValueError as exc:
        raise UsageError(f"invalid JSON ({exc})") from None
    except RecursionError:
        raise UsageError(f"invalid JSON: nested too deeply (metadata may nest {MAX_JSON_DEPTH} levels)") from None
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
    fields = {k: d[k] for k in FILE_JOB_KEYS if k in d}
    opts = {**defaults, **fields, "meta": {**(defaults.get("meta") or {}), **(d.get("meta") or {})}}
    return d.get("queue"), build(command, args, opts)


def _dispatch_file(source: str, queue: str | None, connection: str | None, defaults: dict[str, Any],
                   batch_id: str | None, json_out: bool = False) -> int:
    """Validate every line, then store the jobs 1,000 at a time. Line n's job id is derived
    from (batch id, n) (``batch_key``), so a run killed part-way, run again, stores only the
    lines that are missing; each line's id goes to stdout either way, in line order per queue."""
    registry = default_registry()
    text = _file_text(source)
    batch = batch_id or _batch_of(text, queue, defaults)
    queues: dict[str | None, CommandQueue] = {}
    batches: dict[str, tuple[CommandQueue, list[Job]]] = {}
    keys: dict[str, int] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            name, cmd = _parse_line(line, defaults)
            name = name or queue
            q = queues.get(name) or queues.setdefault(name, CommandQueue(name, connection=connection, registry=registry))
            # Validates the command, its arguments and the options; stored as built, unchanged.
            (job,) = q.jobs_for([cmd.with_idempotency_key(batch_key(batch, n))])
        except UsageError as exc:
            exc.args = (f"{source}, line {n}: {exc.message}",)
            exc.hint = "Nothing was dispatched."
            raise
        if cmd.unique_key is not None and keys.setdefault(cmd.unique_key, n) != n:
            raise UsageError(f'{source}, line {n}: unique key "{cmd.unique_key}" is also used on line {keys[cmd.unique_key]}.',
                             hint="Nothing was dispatched.")
        batches.setdefault(q.name, (q, []))[1].append(job)
    total, sent, old = sum(len(b) for _, b in batches.values()), 0, 0
    with output.progress(total, "Dispatching") as advance:
        for q, jobs in batches.values():
            for i in range(0, len(jobs), 1000):
                chunk = jobs[i:i + 1000]
                try:
                    stored = q.store(chunk)
                    old += stored.count(False)
                except Exception:
                    if sent:
                        output.warn(f"{sent} of {total} lines are queued (their ids are on stdout); run the same"
                                    " command again to queue the rest, each once.")
                    raise
                if json_out:  # one dispatch record per line (JSON Lines), as queue:dispatch --json prints one
                    sys.stdout.write("".join(json.dumps({**_dispatch_record(job).to_dict(), "created": made},
                                                        separators=(",", ":")) + "\n"
                                             for job, made in zip(chunk, stored, strict=True)))
                else:
                    sys.stdout.write("".join(f"{job.id}\n" for job in chunk))
                sys.stdout.flush()
                sent += len(chunk)
                advance(len(chunk))
    if old:
        output.info(f"{old} of {total} lines were already queued by an earlier run of batch {batch} and were"
                    " not queued again; give another --batch-id to queue them anew.")
    if output.is_tty(sys.stderr):
        output.info(f"Queued {total - old} jobs from {'stdin' if source == '-' else source}.")
    return 0

