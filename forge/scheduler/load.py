"""Finding the schedule: ``[[schedule]]`` tables in ``forge.toml`` and ``@command(..., schedule=)``.

An entry that is invalid (a bad expression, zone, policy or option, an unknown command, arguments
that do not parse, a name used twice) is a ``ScheduleError`` naming it; it is returned beside
the valid entries, never raised, so one bad entry never stops the others.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from forge.errors import ForgeError
from forge.registry.spec import SCHEDULE_MARKER
from forge.scheduler.entry import ScheduleEntry, ScheduleError

if TYPE_CHECKING:
    from forge.config import Settings
    from forge.registry.spec import CommandRegistry

#: Where ``@command(..., schedule=...)`` leaves its schedule on the function.
MARKER = SCHEDULE_MARKER


def toml_tables(config_file: Path | None) -> tuple[list[tuple[str, Any]], list[ScheduleError]]:
    """The ``[[schedule]]`` tables of ``forge.toml`` as (where, table)."""
    if config_file is None:
        return [], []
    from forge.config import _read_toml

    data = _read_toml(config_file)  # load_settings parsed it a moment ago (cached)
    raw = data.get("schedule", [])
    if isinstance(raw, Mapping):
        raw = [raw]
    if not isinstance(raw, list):
        return [], [ScheduleError("?", "schedule must be [[schedule]] tables", where=str(config_file))]
    return [(f"{config_file} [[schedule]] #{i + 1}", t) for i, t in enumerate(raw)], []


def decorated(registry: CommandRegistry) -> list[tuple[str, str, Any]]:
    """(where, command name, schedule) for every ``@command(..., schedule=...)`` function."""
    out = []
    for spec in registry.loaded():
        if not callable(spec.target):
            continue
        value = getattr(spec.target, MARKER, None)
        if value is None:
            continue
        for item in value if isinstance(value, list | tuple) else [value]:
            out.append((spec.source, spec.name, item))
    return out


def load_entries(settings: Settings, registry: CommandRegistry, *, check_args: bool = True,
                 marked: list[tuple[str, str, Any]] | None = None
                 ) -> tuple[list[ScheduleEntry], list[ScheduleError]]:
    """Every valid entry, and an error for each invalid one (in declaration order).

    Without ``check_args`` an entry's command must exist but its arguments are checked only
    when a tick is dispatched (``schedule:run`` with 1,000 entries need not parse 1,000
    argument lists); ``schedule:list`` checks them all. ``marked`` stands for
    ``decorated(registry)`` when the caller knows it without loading the commands (the
    command cache)."""
    tables, errors = toml_tables(settings.config_file)
    candidates: list[tuple[str, Any, str | None]] = [(where, t, None) for where, t in tables]
    for where, name, item in decorated(registry) if marked is None else marked:
        table = {"cron": item} if isinstance(item, str) else item
        candidates.append((where, table, name))
    entries: list[ScheduleEntry] = []
    seen: dict[str, str] = {}
    for where, table, command in candidates:
        try:
            entry = ScheduleEntry.from_table(table, source=where, command=command)
            if entry.name in seen:
                raise ScheduleError(entry.name, f"the name is used twice (first in {seen[entry.name]});"
                                    " give one of them another name", where=where)
            _check_command(entry, settings, registry, check_args)
        except ScheduleError as exc:
            errors.append(exc)
            continue
        seen[entry.name] = where
        entries.append(entry)
    return entries, errors


def _check_command(entry: ScheduleEntry, settings: Settings, registry: CommandRegistry,
                   check_args: bool) -> None:
    from forge.queue.manager import CommandQueue

    if not check_args:
        if registry.get(entry.command) is None:
            from forge.errors import UnknownCommand

            raise ScheduleError(entry.name, UnknownCommand(entry.command, registry.suggest(entry.command)).message,
                                where=entry.source)
        return

    try:
        queue = CommandQueue(entry.queue, settings=settings, registry=registry,
                             check_args=check_args, connection=_NO_BACKEND)
        queue.jobs_for([entry.queued_command(0.0)])
    except ForgeError as exc:
        raise ScheduleError(entry.name, exc.message, where=entry.source) from None


class _NoBackend:
    """Stands for a backend where validating a job needs none."""


_NO_BACKEND: Any = _NoBackend()
