"""The options of ``queue:dispatch``, declared once: the Typer command, the Typer-free fast path
and the keys of a ``--from-file`` line all read :data:`OPTIONS`.

Each :class:`DispatchOption` says its name, its kind (text, a whole number with a least value,
a flag, the repeatable ``--meta``), its help, and which of the three ways takes it. The checks
that involve more than one option (:func:`check`) and the turning of option values into a
``QueuedCommand`` (:func:`job_options`, :func:`build`) are written here once too.

Cheap to import (no Typer): the fast path imports it on every dispatch; only
:func:`typer_parameters` imports Typer, for the full command.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

from forge.durations import parse_duration
from forge.errors import UsageError

if TYPE_CHECKING:
    import inspect

    from forge.queue.command import QueuedCommand

Kind = Literal["text", "count", "flag", "meta"]


class DispatchOption:
    """One option of ``queue:dispatch``.

    ``key`` is its keyword (and, where ``in_file``, its ``--from-file`` key); ``flag`` its
    command-line name. ``fast`` says the Typer-free path takes it (any other option sends the
    dispatch to the full command); ``least`` is the smallest whole number a ``count`` takes.
    (A plain class, not a dataclass: the fast path imports this table on every dispatch.)
    """

    __slots__ = ("key", "help", "kind", "least", "metavar", "name", "fast", "in_file")

    def __init__(self, key: str, help: str, kind: Kind = "text", *, least: int | None = None,
                 metavar: str | None = None, name: str | None = None, fast: bool = True,
                 in_file: bool = True) -> None:
        self.key, self.help, self.kind, self.least = key, help, kind, least
        self.metavar, self.name, self.fast, self.in_file = metavar, name, fast, in_file

    def __repr__(self) -> str:
        return f"DispatchOption({self.flag})"

    @property
    def flag(self) -> str:
        """The option's command-line name, e.g. ``--unique-ttl``."""
        return self.name or "--" + self.key.replace("_", "-")

    def parse(self, raw: Any) -> Any:
        """The value of ``--flag=raw`` as the full command's Click parameter converts it (a
        whole number as Python's ``int`` reads it, at least ``least``; anything else as given);
        ``UsageError`` if Click would refuse it."""
        if self.kind != "count":
            return raw
        try:
            n = int(raw)
        except ValueError:
            raise UsageError(f"Invalid value for '{self.flag}': {raw!r} is not a valid integer.") from None
        if self.least is not None and n < self.least:
            raise UsageError(f"Invalid value for '{self.flag}': {n} is not in the range x>={self.least}.")
        return n


#: Every option, in the order ``forge queue:dispatch --help`` lists them.
OPTIONS: tuple[DispatchOption, ...] = (
    DispatchOption("queue", "The queue (default: queue.default)."),
    DispatchOption("connection", "The connection to use (default: queue.connection).", in_file=False),
    DispatchOption("delay", "Run no earlier than this from now, e.g. 90s, 5m, 1h30m."),
    DispatchOption("at", "Run no earlier than this local time, e.g. 2026-12-01T09:00.", in_file=False),
    DispatchOption("tries", "Attempts before the job fails (default: the worker's).", "count", least=1),
    DispatchOption("timeout", "Kill an attempt running longer, e.g. 10m."),
    DispatchOption("backoff", "Seconds before each retry, e.g. 1,5,10, or exp:2s..10m,jitter=full."),
    DispatchOption("retry_until", "Start no retry after this: a duration from now (2h) or a local time (2026-12-01T09:00)."),
    DispatchOption("max_exceptions", "Fail after this many attempts end in an exception or a failing exit, tries left or not.",
                   "count", least=1),
    DispatchOption("max_releases", "Retry-later releases (exit 75) allowed (default 100).", "count", least=0),
    DispatchOption("meta", "Metadata (repeatable); VALUE is parsed as JSON when it is JSON.", "meta", metavar="KEY=VALUE"),
    DispatchOption("unique_key", "Refuse (exit 4) while a job with this key is queued or running."),
    DispatchOption("unique_ttl", "Let the unique key lapse after this long."),
    DispatchOption("idempotency_key", "Queue this at most once per key: while the job dispatched with it is kept, in any"
                   " state, print its id and store nothing.", in_file=False),
    DispatchOption("json_out", "Print the dispatch record as JSON (with --from-file: one record per line).", "flag",
                   name="--json", in_file=False),
    DispatchOption("wait", "Block until the job is done (exit 0) or failed (exit 7).", "flag", fast=False, in_file=False),
    DispatchOption("wait_timeout", "With --wait: give up after this long (exit 1).", fast=False, in_file=False),
    DispatchOption("from_file", "Dispatch one job per JSON line of FILE (- for stdin); run again, it queues only the"
                   " lines missing.", metavar="FILE|-", fast=False, in_file=False),
    DispatchOption("batch_id", "With --from-file: the batch's identity (default: a hash of the file and these options);"
                   " line n is queued once per batch.", fast=False, in_file=False),
    DispatchOption("concurrency_key", "At most --concurrency jobs with this key run at once, e.g. tenant:42."),
    DispatchOption("concurrency", "With --concurrency-key: how many may run at once (default: [limits.keys] in"
                   " forge.toml).", "count", least=1),
    DispatchOption("rate_key", "Start jobs with this key at most at --rate, e.g. api:stripe."),
    DispatchOption("rate", "With --rate-key: COUNT/PERIOD, e.g. 100/m (default: [limits.keys] in forge.toml)."),
    DispatchOption("burst", "With --rate: how many may start at once after a quiet spell (default 1).", "count", least=1),
    DispatchOption("isolated", "Run only while no other run holds the command's isolation lock.", "flag", fast=False),
    DispatchOption("on_busy", "An isolated job whose lock is held: wait (stay pending, the default) or drop (fail it,"
                   " reason isolated).", fast=False),
)

#: The options by keyword.
BY_KEY: dict[str, DispatchOption] = {o.key: o for o in OPTIONS}
#: The options by command-line name.
BY_FLAG: dict[str, DispatchOption] = {o.flag: o for o in OPTIONS}
#: The command-line names of every option (a job argument spelled like one gets a hint).
FLAGS: frozenset[str] = frozenset(BY_FLAG)
#: The options the Typer-free path takes, by command-line name.
FAST: dict[str, DispatchOption] = {o.flag: o for o in OPTIONS if o.fast}
#: The keys a ``--from-file`` line may have.
FILE_KEYS: frozenset[str] = frozenset({"command", "args", *(o.key for o in OPTIONS if o.in_file)})
#: The keys of a ``--from-file`` line that are the job's options (not its command, arguments or queue).
FILE_JOB_KEYS: frozenset[str] = FILE_KEYS - {"command", "args", "queue"}

#: The job options kept only when given (so the batch id of a --from-file run without them stays).
_LIMIT_KEYS = ("concurrency_key", "concurrency", "rate_key", "rate", "burst", "isolated", "on_busy")
_JOB_KEYS = ("delay", "tries", "timeout", "backoff", "unique_key", "unique_ttl", "retry_until",
             "max_exceptions", "max_releases")


def typer_parameters() -> list[inspect.Parameter]:
    """The options as keyword-only parameters of a Typer command (``Annotated`` with a
    ``typer.Option`` each), in :data:`OPTIONS` order; imports Typer."""
    import inspect
    from typing import Annotated

    import typer

    params = []
    for o in OPTIONS:
        decls = (o.flag,) if o.name or o.kind == "flag" else ()  # a flag: no --no-FLAG
        extra: dict[str, Any] = {"metavar": o.metavar} if o.metavar else {}
        if o.least is not None:
            extra["min"] = o.least
        info = typer.Option(*decls, help=o.help, **extra)
        kind: Any = {"text": str | None, "count": int | None, "meta": list[str] | None, "flag": bool}[o.kind]
        default = False if o.kind == "flag" else None
        params.append(inspect.Parameter(o.key, inspect.Parameter.KEYWORD_ONLY, default=default,
                                        annotation=Annotated[kind, info]))
    return params


def check(values: Mapping[str, Any]) -> None:
    """The checks between options, as the full command and the fast path make them; raises
    ``UsageError`` (the full command's message) for the first that fails."""
    if values.get("delay") is not None and values.get("at") is not None:
        raise UsageError("Pass --delay or --at, not both.")
    queue = values.get("queue")
    if queue is not None and not queue.strip():
        raise UsageError("--queue must not be empty.", hint="Leave it out for queue.default, or name a queue.")
    if values.get("unique_ttl") is not None and values.get("unique_key") is None:
        raise UsageError("--unique-ttl needs --unique-key.")


def job_options(values: Mapping[str, Any]) -> dict[str, Any]:
    """The job's options (what :func:`build` reads, and what a --from-file line's keys
    override) from option values: ``--at`` and ``--meta`` parsed, the limits' keys present only
    when given. ``UsageError`` for a bad ``--at`` or ``--meta``."""
    at = values.get("at")
    opts: dict[str, Any] = {k: values.get(k) for k in _JOB_KEYS}
    opts["at"] = parse_at(at) if at else None
    opts["meta"] = parse_meta(values.get("meta") or [])
    limits = {k: values.get(k) for k in _LIMIT_KEYS}
    limits["isolated"] = limits["isolated"] or None
    opts.update({k: v for k, v in limits.items() if v is not None})
    return opts


def parse_meta(items: Sequence[str]) -> dict[str, Any]:
    """``--meta key=value`` items as a dict (a value that is JSON is parsed); ``UsageError``
    for an item without ``key=``."""
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
    """``--at``'s ISO date/time (naive: local time); ``UsageError`` if it is not one."""
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise UsageError(f"Invalid --at {value!r}: use an ISO date/time, e.g. 2026-12-01T09:00.") from None


def in_past(when: datetime) -> bool:
    """True if --at names a time already gone (the job is then due at once)."""
    return when.timestamp() < datetime.now().timestamp() - 1 if when.tzinfo is None else when < datetime.now(when.tzinfo)


def build(command: str, args: Sequence[str], o: Mapping[str, Any]) -> QueuedCommand:
    """A QueuedCommand from job options (:func:`job_options`, or one --from-file line's
    merged over them); ``UsageError`` (``InvalidCommand``) for a value it cannot take."""
    from forge.queue.command import QueuedCommand

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
        from forge.retry.backoff import parse as parse_backoff

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
    if any(o.get(k) is not None for k in _LIMIT_KEYS):
        from forge.limits.isolation import options_meta

        limits = options_meta(o)
        if limits:
            cmd = cmd.with_metadata("forge.limits", limits)
    return cmd


def _count(value: Any, what: str, least: int) -> int:
    """A --from-file line's count (a JSON number, or a string of digits), at least ``least``."""
    if isinstance(value, int) and not isinstance(value, bool):
        n: int | None = value
    else:
        n = int(value) if isinstance(value, str) and value.strip().isdigit() else None
    if n is None or n < least:
        raise UsageError(f"Invalid {what} {value!r}: a whole number of at least {least}.")
    return n
