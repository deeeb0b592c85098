"""``forge queue:dispatch`` without Typer: the common case in about a third of the time.

Cron lines and shell loops call ``forge queue:dispatch`` thousands of times, and most of a
dispatch's cost is importing Typer and the project's command files to check the job's
arguments. :func:`run` handles the common case from the command cache (``forge.cli.fastpath.cache``)
and the Typer-free argument check (``forge.registry.argspec``) instead: options of queue:dispatch
given plainly, a project command whose cached spec accepts the arguments, no ``--wait`` or
``--from-file``.

It does exactly what the full command would, or nothing: on anything unusual (an unknown
option, a bad value, a stale cache, arguments the spec cannot vouch for) it returns None
before touching the queue, and ``forge.cli.main`` runs the full Typer command, which gives the
exact error message and saves the cache for next time. Only the queue's own errors
(disk full, Redis down, a duplicate unique key) are raised from here, as the library raises
them in both paths.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from forge.durations import parse_backoff, parse_duration
from forge.errors import UsageError
from forge.queue.manager import CommandQueue, JobDispatch, QueuedCommand, _in_dir

#: The value options of queue:dispatch (``--meta`` may repeat) and its one flag this path takes.
VALUE_OPTIONS = {"--queue": "queue", "--connection": "connection", "--delay": "delay", "--at": "at",
                 "--tries": "tries", "--timeout": "timeout", "--backoff": "backoff", "--meta": "meta",
                 "--unique-key": "unique_key", "--unique-ttl": "unique_ttl", "--idempotency-key": "idempotency_key",
                 "--retry-until": "retry_until", "--max-exceptions": "max_exceptions",
                 "--max-releases": "max_releases",
                 "--concurrency-key": "concurrency_key", "--concurrency": "concurrency", "--rate-key": "rate_key",
                 "--rate": "rate", "--burst": "burst"}
DISPATCH_OPTIONS = {*VALUE_OPTIONS, "--json", "--wait", "--wait-timeout", "--from-file", "--batch-id", "--isolated",
                    "--on-busy"}

#: The fingerprint taken when the cache was missing or stale: the full path saves the cache
#: under it once the dispatch succeeded (``forge.cli.builtins.dispatch``).
stale_fingerprint: list[Any] | None = None


def parse_meta(items: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"Invalid --meta {item!r}: use key=value, e.g. --meta tenant=acme.")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
        except RecursionError:
            raise UsageError(f"Invalid --meta {key}: its JSON value nests too deeply.") from None
    return out


def parse_at(value: str) -> datetime:
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise UsageError(f"Invalid --at {value!r}: use an ISO date/time, e.g. 2026-12-01T09:00.") from None


def in_past(when: datetime) -> bool:
    """True if --at names a time already gone (the job is then due at once)."""
    return when.timestamp() < datetime.now().timestamp() - 1 if when.tzinfo is None else when < datetime.now(when.tzinfo)


def build(command: str, args: Sequence[str], o: dict[str, Any]) -> QueuedCommand:
    """A QueuedCommand from dispatch options (the CLI's, or one --from-file line's)."""
    cmd = QueuedCommand(command).with_args(args)
    if o.get("delay") is not None:
        cmd = cmd.with_delay(parse_duration(o["delay"], what="--delay"))
    if o.get("at") is not None:
        cmd = cmd.at(o["at"])
    if o.get("tries") is not None:
        cmd = cmd.with_max_attempts(o["tries"])
    if o.get("timeout") is not None:
        seconds = parse_duration(o["timeout"], what="--timeout")
        if seconds <= 0:
            raise UsageError(f"--timeout must be more than 0 (got {o['timeout']!r}), e.g. 10m.")
        cmd = cmd.with_timeout(seconds)
    if o.get("backoff") is not None:
        cmd = cmd.with_backoff(parse_backoff(o["backoff"], what="--backoff"))
    if o.get("retry_until") is not None:
        cmd = cmd.with_retry_until(o["retry_until"])
    if o.get("max_exceptions") is not None:
        cmd = cmd.with_max_exceptions(_count(o["max_exceptions"], "--max-exceptions", 1))
    if o.get("max_releases") is not None:
        cmd = cmd.with_max_releases(_count(o["max_releases"], "--max-releases", 0))
    for key, value in (o.get("meta") or {}).items():
        cmd = cmd.with_metadata(key, value)
    if o.get("unique_key") is not None:
        ttl = o.get("unique_ttl")
        cmd = cmd.with_unique_key(o["unique_key"], None if ttl is None else parse_duration(ttl, what="--unique-ttl"))
    if o.get("idempotency_key") is not None:
        cmd = cmd.with_idempotency_key(o["idempotency_key"])
    if any(o.get(k) is not None for k in _LIMIT_OPTIONS):
        from forge.limits.isolation import options_meta

        limits = options_meta(o)
        if limits:
            cmd = cmd.with_metadata("forge.limits", limits)
    return cmd


def _count(value: Any, what: str, least: int) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        n: int | None = value
    else:
        n = int(value) if isinstance(value, str) and value.strip().isdigit() else None
    if n is None or n < least:
        raise UsageError(f"Invalid {what} {value!r}: a whole number of at least {least}.")
    return n


_LIMIT_OPTIONS = ("concurrency_key", "concurrency", "rate_key", "rate", "burst", "isolated", "on_busy")


def _split(argv: Sequence[str]) -> tuple[dict[str, Any], str, list[str]] | None:
    """queue:dispatch's own options, the command and its arguments; None if not plainly given."""
    opts: dict[str, Any] = {"meta": []}
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        name, eq, value = argv[i].partition("=")
        if name == "--json" and not eq:
            opts["json"] = True
            i += 1
            continue
        key = VALUE_OPTIONS.get(name)
        if key is None:
            return None
        if not eq:
            if i + 1 >= len(argv) or argv[i + 1].startswith("-"):
                return None
            value = argv[i + 1]
            i += 1
        i += 1
        if key == "meta":
            opts["meta"].append(value)
        else:
            opts[key] = value
    if i >= len(argv):
        return None
    command, args = argv[i], list(argv[i + 1:])
    if args[:1] == ["--"]:
        args = args[1:]
    if "--help" in args or "-h" in args:
        return None
    return opts, command, args


def run(argv: Sequence[str]) -> int | None:
    """Dispatch ``forge queue:dispatch ARGV`` here and return the exit code, or None to use Typer."""
    global stale_fingerprint
    stale_fingerprint = None
    split = _split(argv)
    if split is None:
        return None
    opts, command, args = split
    from forge.cli.fastpath import cache as cmdcache
    from forge.config import load_settings
    from forge.registry.argspec import accepts

    try:
        settings = load_settings()
    except Exception:  # noqa: BLE001 - the full path reports it
        return None
    if settings.config_file is None:
        return None  # the full path says that no forge.toml was found
    fingerprint = cmdcache.fingerprint(settings)
    commands = cmdcache.load(settings, fingerprint)
    if commands is None:
        stale_fingerprint = fingerprint
        return None
    entry = commands.get(command)
    try:
        if not isinstance(entry, dict) or not isinstance(entry.get("args"), dict) or entry.get("isolated"):
            return None
        with _in_dir(str(settings.root)):  # path arguments: where the job will run
            if not accepts(entry["args"], args):
                return None
    except Exception:  # noqa: BLE001 - a malformed cache entry: the full path decides
        return None
    from forge.registry.spec import CommandRegistry

    try:
        tries = opts.get("tries")
        if tries is not None:
            tries = int(tries)
            if tries < 1:
                return None
        options = {**opts, "tries": tries, "meta": parse_meta(opts["meta"]),
                   "at": parse_at(opts["at"]) if opts.get("at") else None}
        if (opts.get("delay") is not None and opts.get("at") is not None) or (
                opts.get("unique_ttl") is not None and opts.get("unique_key") is None):
            return None
        if opts.get("queue") == "" or (options["at"] is not None and in_past(options["at"])):
            return None  # the full path refuses, or warns
        cmd = build(command, args, options)
        # The command is known from the cache; its function is never loaded here.
        registry = CommandRegistry([cmdcache.spec_of(command, entry)])
        q = CommandQueue(opts.get("queue"), connection=opts.get("connection"), settings=settings,
                         registry=registry, check_args=False)
    except Exception:  # noqa: BLE001 - the full path reports it, word for word
        return None
    try:
        record = q.push(cmd)
    except UsageError:  # a check refused it (InvalidCommand is one), before anything was stored
        return None
    print_record(q, record, command, json_out=bool(opts.get("json")))
    return 0


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
