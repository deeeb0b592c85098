"""``ScheduleEntry``: one recurring command, when it runs, and its policies.

An entry's ticks are instants (Unix seconds). A cron expression is read in the entry's time zone
by cronsim, with Debian cron's rules for daylight-saving changes: a job at a fixed time of day
(minute and hour fields not ``*``) whose time falls in a spring-forward gap runs at the first
minute after the gap (02:30 -> 03:00), and one whose time occurs twice on a fall-back day runs at
the first occurrence only; an expression with ``*`` in the minute or hour field keeps to real
time (``*/30`` runs every 30 minutes through both passes of the repeated hour). ``every``
intervals tick at the multiples of the interval since the Unix epoch (every 5m at :00, :05, ...
UTC), the same on every host whatever its zone.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import unicodedata
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from enum import StrEnum
from typing import Any

from forge.config import validate_queue_name
from forge.durations import parse_duration
from forge.errors import ConfigError, UsageError

#: A tick is on time for this long: with ``catch_up = "none"`` a run dispatches it until then, so
#: one cron run (every minute) that was skipped or killed is made up by the next one. An entry
#: that never ran starts with its latest on-time tick.
ON_TIME = 90.0
#: The longest entry name: it is part of each tick's idempotency key (at most 1024 characters).
MAX_NAME = 900
#: Most ticks one entry dispatches in one run (catch_up = "all" with a long max_lateness).
MAX_CATCH_UP = 10_000

_ALIASES = {"@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *",
            "@weekly": "0 0 * * 0", "@daily": "0 0 * * *", "@midnight": "0 0 * * *",
            "@hourly": "0 * * * *"}


#: The cron expressions this process has found valid (validity depends on the text alone).
_VALID_CRON: set[str] = set()


class ScheduleError(ConfigError):
    """An entry that cannot be scheduled (bad expression, zone, policy, option); names it."""

    def __init__(self, entry: str, message: str, *, where: str = "") -> None:
        self.entry = entry
        super().__init__(f'Schedule "{entry}"{f" ({where})" if where else ""}: {message}')


class Overlap(StrEnum):
    """What a tick does while the previous tick's job is still pending, delayed or running:
    dispatch anyway (allow) or not (skip)."""

    ALLOW = "allow"
    SKIP = "skip"  # no new tick while the previous tick's job is pending, delayed or running


class CatchUp(StrEnum):
    """Which ticks missed while no scheduler ran are dispatched late: none, the latest, or all,
    each only within ``max_lateness``."""

    NONE = "none"      # ticks missed while no scheduler ran are dropped (counted as missed)
    LATEST = "latest"  # the latest missed tick runs, if within max_lateness
    ALL = "all"        # every missed tick within max_lateness runs, oldest first


def system_zone() -> tzinfo:
    """The system's time zone: ``$TZ``, else ``/etc/localtime``, else UTC."""
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    name = os.environ.get("TZ", "").lstrip(":")
    if name:
        try:
            return ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            pass
    try:
        target = os.readlink("/etc/localtime")
        if "zoneinfo/" in target:
            return ZoneInfo(target.split("zoneinfo/", 1)[1])
    except (OSError, ZoneInfoNotFoundError, ValueError):
        pass
    try:
        with open("/etc/localtime", "rb") as fh:
            return ZoneInfo.from_file(fh, key="localtime")
    except (OSError, ValueError):
        return UTC


def zone_name(tz: tzinfo) -> str:
    """The zone's IANA name (``Europe/Paris``), else its ``str``."""
    return str(getattr(tz, "key", None) or tz)


def iso(t: float, tz: tzinfo = UTC) -> str:
    """A tick as RFC 3339 text (UTC with ``Z``, or in ``tz`` with its offset)."""
    text = datetime.fromtimestamp(t, tz).isoformat(timespec="seconds")
    return text.replace("+00:00", "Z") if tz is UTC else text


@dataclass(frozen=True)
class ScheduleEntry:
    """One schedule entry; build it with :meth:`create` (which validates) or ``from_table``."""

    name: str
    command: str
    args: tuple[str, ...] = ()
    cron: str | None = None
    every: float | None = None
    timezone: tzinfo = UTC
    queue: str | None = None
    tries: int | None = None
    timeout: float | None = None
    backoff: Any = None  # forge.retry.backoff.Backoff
    meta: Mapping[str, Any] = field(default_factory=dict)
    overlap: Overlap = Overlap.ALLOW
    catch_up: CatchUp = CatchUp.NONE
    max_lateness: float = 3600.0
    jitter: float = 0.0
    source: str = ""

    # -- building ------------------------------------------------------------------------------

    @classmethod
    def from_table(cls, table: Mapping[str, Any], *, source: str = "", command: str | None = None
                   ) -> ScheduleEntry:
        """An entry from a ``[[schedule]]`` table (or the mapping given to ``@command``);
        raises :class:`ScheduleError` naming it."""
        if not isinstance(table, Mapping):
            raise ScheduleError("?", f"expected a table, not {table!r}", where=source)
        command = table.get("command", command)
        args = table.get("args", [])
        raw_name = table.get("name")
        label = raw_name if isinstance(raw_name, str) and raw_name else _derived(command, args)
        if "name" in table and not (isinstance(raw_name, str) and raw_name.strip()):
            raise ScheduleError(label, f"name must be a non-empty string, not {raw_name!r}", where=source)
        known = {"name", "command", "args", "cron", "every", "timezone", "queue", "tries", "timeout",
                 "backoff", "meta", "overlap", "catch_up", "max_lateness", "jitter"}
        unknown = sorted(set(table) - known)
        if unknown:
            raise ScheduleError(label, f"unknown key {unknown[0]} (known: {', '.join(sorted(known))})",
                                where=source)
        return cls.create(label, command, args, source=source, **{k: table[k] for k in known - {"name", "command", "args"}
                                                                    if k in table})

    @classmethod
    def create(cls, name: str, command: Any, args: Any = (), *, cron: Any = None, every: Any = None,
               timezone: Any = None, queue: Any = None, tries: Any = None, timeout: Any = None,
               backoff: Any = None, meta: Any = None, overlap: Any = "allow", catch_up: Any = "none",
               max_lateness: Any = "1h", jitter: Any = 0, source: str = "") -> ScheduleEntry:
        """A checked entry. Raises :class:`ScheduleError`, naming the entry and ``source``, for a
        bad name, command, args, expression (exactly one of ``cron`` and ``every``), zone or job
        option."""
        def bad(msg: str) -> ScheduleError:
            return ScheduleError(name, msg, where=source)

        if not isinstance(name, str) or not name.strip():
            raise bad("the name must be a non-empty string")
        if any(unicodedata.category(c) in ("Cc", "Cs", "Zl", "Zp") for c in name):
            raise ScheduleError(repr(name), "the name holds a control character (a newline, tab or escape);"
                                " give the entry a name of printable characters", where=source)
        if len(name.strip()) > MAX_NAME:
            raise ScheduleError(name[:40] + "...", f"the name is longer than {MAX_NAME} characters (it is part of"
                                " each tick's idempotency key); give the entry a shorter name", where=source)
        if not isinstance(command, str) or not command:
            raise bad("command must be a command name, e.g. \"report:daily\"")
        if isinstance(args, str) or not isinstance(args, Sequence) or not all(isinstance(a, str) for a in args):
            raise bad(f"args must be a list of strings, not {args!r}")
        if (cron is None) == (every is None):
            raise bad('give exactly one of cron (e.g. "0 3 * * *") and every (e.g. "5m")')
        interval: float | None = None
        if cron is not None:
            if not isinstance(cron, str):
                raise bad(f"cron must be a string, not {cron!r}")
            cron = _ALIASES.get(cron.strip().lower(), " ".join(cron.split()))
            if len(cron.split()) != 5:
                raise bad(f'invalid cron expression "{cron}": expected 5 fields (minute hour day month weekday)')
            if cron not in _VALID_CRON:  # many entries share an expression: check each once
                from cronsim import CronSim, CronSimError

                try:
                    CronSim(cron, datetime.now(UTC))
                except CronSimError as exc:
                    raise bad(f'invalid cron expression "{cron}": {exc}') from None
                _VALID_CRON.add(cron)
        else:
            try:
                interval = parse_duration(every, what="every")
            except UsageError as exc:
                raise bad(exc.message) from None
            if interval < 60 or interval != int(interval):
                raise bad(f"every must be whole seconds and at least 1m, not {every!r}")
        tz = _zone(timezone, bad)
        try:
            q = None if queue is None else validate_queue_name(queue)
        except UsageError as exc:
            raise bad(exc.message) from None
        if tries is not None and (isinstance(tries, bool) or not isinstance(tries, int) or tries < 1):
            raise bad(f"tries must be an integer of at least 1, not {tries!r}")
        try:
            tmo = None if timeout is None else parse_duration(timeout, what="timeout")
            from forge.retry.backoff import parse as parse_backoff

            bo = None if backoff is None else parse_backoff(backoff, what="backoff")
            # the defaults, without parsing them for each of 1,000 entries
            lateness = 3600.0 if max_lateness == "1h" else parse_duration(max_lateness, what="max_lateness")
            jit = 0.0 if type(jitter) is int and jitter == 0 else parse_duration(jitter, what="jitter")
        except UsageError as exc:
            raise bad(exc.message) from None
        if tmo == 0:
            raise bad("timeout must be more than 0 seconds")
        if meta is not None and (not isinstance(meta, Mapping) or not all(isinstance(k, str) for k in meta)):
            raise bad(f"meta must be a table of values, not {meta!r}")
        try:
            ov = Overlap(overlap)
        except ValueError:
            raise bad(f'overlap must be "allow" or "skip", not {overlap!r}') from None
        try:
            cu = CatchUp(catch_up)
        except ValueError:
            raise bad(f'catch_up must be "none", "latest" or "all", not {catch_up!r}') from None
        return cls(name=name.strip(), command=command, args=tuple(args), cron=cron, every=interval,
                   timezone=tz, queue=q, tries=tries, timeout=tmo, backoff=bo, meta=dict(meta or {}),
                   overlap=ov, catch_up=cu, max_lateness=lateness, jitter=jit, source=source)

    # -- when ----------------------------------------------------------------------------------

    @property
    def expression(self) -> str:
        """The entry's schedule as written: its cron expression, or ``every DURATION``."""
        return self.cron if self.cron is not None else f"every {_fmt_every(self.every or 0)}"

    @property
    def fingerprint(self) -> str:
        """What an entry's ticks depend on (its expression and zone): the key of the next-tick
        cache in its state (``EntryState.next_for``)."""
        return f"{self.expression}|{zone_name(self.timezone)}"

    def describe(self) -> str:
        """A human description of when it runs, e.g. "At 03:00 every day"."""
        if self.cron is None:
            return f"Every {_fmt_every(self.every or 0)} (from the Unix epoch, UTC)"
        from cronsim import CronSim

        return CronSim(self.cron, datetime.now(UTC)).explain()

    def ticks_after(self, after: float) -> Iterator[float]:
        """Every tick strictly after ``after``, in order (an instant never comes twice)."""
        if self.every is not None:
            n = int(after // self.every) + 1
            while True:
                yield n * self.every
                n += 1
        from cronsim import CronSim

        last = after
        start = datetime.fromtimestamp(int(after), self.timezone)
        for dt in CronSim(self.cron or "", start):
            t = dt.timestamp()
            if t > last:  # cronsim works in wall time: never yield an instant at or before one given
                last = t
                yield t

    def latest_at_or_before(self, t: float) -> float | None:
        """The last tick at or before ``t`` (None if there is none in 50 years)."""
        if self.every is not None:
            return (t // self.every) * self.every
        from cronsim import CronSim

        it = CronSim(self.cron or "", datetime.fromtimestamp(int(t) + 1, self.timezone), reverse=True)
        try:
            for _ in range(4):
                got = next(it).timestamp()
                if got <= t:
                    return got
        except StopIteration:
            pass
        return None

    def next_runs(self, after: float, n: int = 3) -> list[float]:
        """The next ``n`` ticks strictly after ``after`` (Unix seconds), fewer if the schedule
        has fewer."""
        out: list[float] = []
        for t in self.ticks_after(after):
            out.append(t)
            if len(out) == n:
                break
        return out

    # -- the job -------------------------------------------------------------------------------

    def key(self, tick: float) -> str:
        """The idempotency key of a tick: one job per (entry, scheduled time), on any host."""
        return f"schedule:{self.name}:{iso(tick)}"

    def jitter_for(self, tick: float) -> float:
        """The tick's random delay, the same on every host (derived from its key)."""
        if not self.jitter:
            return 0.0
        h = int(hashlib.sha256(self.key(tick).encode()).hexdigest()[:8], 16)
        return self.jitter * h / 2**32

    def queued_command(self, tick: float) -> Any:
        """The ``QueuedCommand`` that a tick dispatches."""
        from forge.queue.command import QueuedCommand

        cmd = (QueuedCommand(self.command).with_args(self.args)
               .with_idempotency_key(self.key(tick))
               .with_metadata("schedule", self.name)
               .with_metadata("scheduled_for", iso(tick)))
        for k, v in self.meta.items():
            cmd = cmd.with_metadata(k, v)
        if self.tries is not None:
            cmd = cmd.with_max_attempts(self.tries)
        if self.timeout is not None:
            cmd = cmd.with_timeout(self.timeout)
        if self.backoff is not None:
            cmd = cmd.with_backoff(self.backoff)
        delay = self.jitter_for(tick)
        if delay:
            cmd = cmd.at(datetime.fromtimestamp(tick + delay, UTC))
        return cmd


def _derived(command: Any, args: Any) -> str:
    if not isinstance(command, str) or not command:
        return "?"
    if isinstance(args, Sequence) and not isinstance(args, str) and args and all(isinstance(a, str) for a in args):
        return f"{command} {shlex.join(args)}"
    return command


def _zone(value: Any, bad: Any) -> tzinfo:
    if value is None or value == "":
        return system_zone()
    if isinstance(value, tzinfo):
        return value
    if not isinstance(value, str):
        raise bad(f"timezone must be a zone name like \"Europe/Berlin\", not {value!r}")
    if value.upper() == "UTC":
        return UTC
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        return ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise bad(f'unknown time zone "{value}" (use an IANA name like "Europe/Berlin" or "UTC")') from None


def _fmt_every(seconds: float) -> str:
    from forge.durations import format_duration

    return format_duration(seconds)
