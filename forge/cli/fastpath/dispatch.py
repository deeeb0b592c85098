"""``forge queue:dispatch`` without Typer: the common case in about a third of the time.

Cron lines and shell loops call ``forge queue:dispatch`` thousands of times, and most of a
dispatch's cost is importing Typer and the project's command files to check the job's
arguments. :func:`run` handles the common case from the command cache (``forge.cli.fastpath.cache``)
and the Typer-free argument check (``forge.registry.argspec``) instead: options of queue:dispatch
given plainly (those ``forge.cli.dispatch_options`` marks ``fast``: no ``--wait`` or
``--from-file``), a project command whose cached spec accepts the arguments.

It does exactly what the full command would, or nothing: on anything unusual (an unknown
option, a bad value, a stale cache, arguments the spec cannot vouch for) it returns a fallback
with the reason (a ``FastResult``) before touching the queue, and ``forge.cli.main`` runs the
full Typer command, which gives the exact error message and saves the cache for next time. Only the queue's own errors
(disk full, Redis down, a duplicate unique key) are raised from here, as the library raises
them in both paths.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from forge.cli.dispatch_options import BY_KEY, FAST, build, check, in_past, job_options
from forge.cli.fastpath import FastResult, fallback
from forge.errors import UsageError
from forge.queue.manager import CommandQueue, JobDispatch


def _split(argv: Sequence[str]) -> tuple[dict[str, Any], str, list[str]] | str:
    """queue:dispatch's own options (raw), the command and its arguments; or, if they are not
    plainly given, why not."""
    raw: dict[str, Any] = {"meta": []}
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        name, eq, value = argv[i].partition("=")
        opt = FAST.get(name)
        if opt is None:
            return f"option {name} is not taken here"
        if opt.kind == "flag":
            if eq:
                return f"{name} given a value"
            raw[opt.key] = True
            i += 1
            continue
        if not eq:
            if i + 1 >= len(argv) or argv[i + 1].startswith("-"):
                return f"{name} without a value"
            value = argv[i + 1]
            i += 1
        i += 1
        if opt.kind == "meta":
            raw["meta"].append(value)
        else:
            raw[opt.key] = value
    if i >= len(argv):
        return "no COMMAND"
    command, args = argv[i], list(argv[i + 1:])
    if args[:1] == ["--"]:
        args = args[1:]
    if "--help" in args or "-h" in args:
        return "--help among the job's arguments"
    return raw, command, args


def run(argv: Sequence[str]) -> FastResult:
    """Dispatch ``forge queue:dispatch ARGV`` here if it can be, and say what happened."""
    split = _split(argv)
    if isinstance(split, str):
        return fallback(split)
    raw, command, args = split
    from forge.cli.fastpath import cache as cmdcache
    from forge.config import load_settings
    from forge.registry.argcheck import in_dir
    from forge.registry.argspec import accepts

    try:
        settings = load_settings()
    except Exception as exc:  # noqa: BLE001 - the full path reports it
        return fallback(f"the settings do not load ({type(exc).__name__})")
    if settings.config_file is None:
        return fallback("no forge.toml")  # the full path says that no forge.toml was found
    fingerprint = cmdcache.fingerprint(settings)
    commands = cmdcache.load(settings, fingerprint)
    if commands is None:
        return fallback("the command cache is missing or stale", (settings, fingerprint))
    entry = commands.get(command)
    try:
        if not isinstance(entry, dict) or not isinstance(entry.get("args"), dict):
            return fallback(f"{command} is not a cached project command")
        if entry.get("isolated"):
            return fallback(f"{command} is isolated")
        with in_dir(str(settings.root)):  # path arguments: where the job will run
            if not accepts(entry["args"], args):
                return fallback(f"the cached spec of {command} cannot vouch for its arguments")
    except Exception as exc:  # noqa: BLE001 - a malformed cache entry: the full path decides
        return fallback(f"a malformed cache entry ({type(exc).__name__})")
    from forge.registry.spec import CommandRegistry

    try:
        values = {key: BY_KEY[key].parse(value) for key, value in raw.items()}
        check(values)
        options = {**job_options(values), "idempotency_key": values.get("idempotency_key")}
        if options["at"] is not None and in_past(options["at"]):
            return fallback("--at is in the past (the full command warns)")
        cmd = build(command, args, options)
        # The command is known from the cache; its function is never loaded here.
        registry = CommandRegistry([cmdcache.spec_of(command, entry)])
        q = CommandQueue(values.get("queue"), connection=values.get("connection"), settings=settings,
                         registry=registry, check_args=False)
    except Exception as exc:  # noqa: BLE001 - the full path reports it, word for word
        return fallback(f"the full command reports it ({type(exc).__name__}: {exc})")
    try:
        record = q.push(cmd)
    except UsageError as exc:  # a check refused it (InvalidCommand is one), before anything was stored
        return fallback(f"the full command reports it ({type(exc).__name__}: {exc})")
    print_record(q, record, command, json_out=bool(values.get("json_out")))
    return FastResult(0)


def print_record(q: CommandQueue, record: JobDispatch, command: str, *, json_out: bool) -> None:
    """What a dispatch prints: the id (or the JSON record) on stdout, a note for a person on stderr."""
    from forge import output

    if json_out:
        output.print_json(record.to_dict())
    else:
        output.line(record.id)
        sys.stdout.flush()
    if output.is_tty(sys.stderr):
        found = q.find(record.id) if record.scheduled_at else None
        at = found.job.available_at if found else None
        when = f", not before {datetime.fromtimestamp(at):%Y-%m-%d %H:%M:%S}" if at else ""
        if record.created:
            output.info(f"Queued {command} on {record.queue} as {record.id}{when}")
        else:
            output.info(f"Already queued on {record.queue} as {record.id} (this idempotency key was used); nothing was stored.")
