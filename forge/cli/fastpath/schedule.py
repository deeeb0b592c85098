"""``forge schedule:run`` without Typer, from cron every minute: the common case in half the time.

Like ``forge.cli.fastpath.dispatch``, it does exactly what the full command would, or nothing: it takes only
``schedule:run`` with ``--json`` and ``--connection``, in a project whose command cache
(``forge.cli.fastpath.cache``) is current, and only when every entry loads without an error and
targets a project command whose cached argument spec accepts the entry's arguments. Anything
else (a stale cache, an invalid entry, a built-in or plugin command, arguments the spec cannot
vouch for) returns a fallback (with the reason) before the queue is touched, and ``forge.cli.main`` runs the full command,
which reports it word for word and saves the cache for next time.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from forge import output
from forge.cli.fastpath import FastResult, fallback
from forge.errors import EXIT_USAGE


def line(a: Any) -> str:
    """One line of ``schedule:run`` (and ``schedule:work``) for a person."""
    d = a.to_dict()
    stamp = datetime.fromtimestamp(time.time()).strftime("%Y-%m-%d %H:%M:%S")
    what = {"dispatched": f"dispatched {a.job_id}", "exists": f"already dispatched {a.job_id}",
            "skipped": "skipped (the previous run is still pending or running)",
            "missed": f"missed {a.count} tick{'s' if a.count != 1 else ''} (catch_up)",
            "error": f"not dispatched: {a.error}",
            "dispatch": "would dispatch", "skip": "would skip (the previous run is still live)",
            "miss": f"would miss {a.count} tick{'s' if a.count != 1 else ''} (catch_up)"}[a.action]
    late = f", {a.lateness:.1f} s late" if a.action in ("dispatched", "dispatch") and a.lateness >= 1 else ""
    return f"{stamp} {a.entry} [{d['tick']}] {what}{late}"


def report_errors(errors: list[Any]) -> int:
    """Print each invalid schedule entry's error on stderr; the exit code: 2 if any, else 0."""
    for err in errors:
        output.error(err.message)
    return EXIT_USAGE if errors else 0


def print_actions(actions: Sequence[Any], json_out: bool) -> None:
    """Print what a run did (or would do), a line (or a JSON line) per action, on stdout."""
    for a in actions:
        if json_out:
            output.print_jsonl(a.to_dict())
        else:
            output.line(line(a))
    sys.stdout.flush()


def _split(argv: Sequence[str]) -> dict[str, Any] | str:
    """schedule:run's options (``--json``, ``--connection``), or why they are not plainly given."""
    opts: dict[str, Any] = {"json": False, "connection": None}
    i = 0
    while i < len(argv):
        name, eq, value = argv[i].partition("=")
        if name == "--json" and not eq:
            opts["json"] = True
        elif name == "--connection":
            if not eq:
                if i + 1 >= len(argv) or argv[i + 1].startswith("-"):
                    return "--connection without a value"
                i += 1
                value = argv[i]
            if not value:
                return "an empty --connection"
            opts["connection"] = value
        else:
            return f"option {name} is not taken here"  # --dry-run, --at, --help, a typo: the full command
        i += 1
    return opts


def run(argv: Sequence[str]) -> FastResult:
    """Run ``forge schedule:run ARGV`` here if it can be, and say what happened."""
    opts = _split(argv)
    if isinstance(opts, str):
        return fallback(opts)
    from forge.cli.fastpath import cache as cmdcache
    from forge.config import load_settings
    from forge.registry.argspec import accepts

    try:
        settings = load_settings()
    except Exception as exc:  # noqa: BLE001 - the full path reports it
        return fallback(f"the settings do not load ({type(exc).__name__})")
    if settings.config_file is None:
        return fallback("no forge.toml")
    fingerprint = cmdcache.fingerprint(settings)
    commands = cmdcache.load(settings, fingerprint)
    if commands is None:
        # The full schedule:run exits 2 once it has dispatched the valid entries of a schedule
        # with an invalid one: it has loaded the commands all the same.
        return fallback("the command cache is missing or stale", (settings, fingerprint), store_on=(0, EXIT_USAGE))
    from forge.registry.spec import CommandRegistry
    from forge.scheduler.load import load_entries
    from forge.scheduler.scheduler import Scheduler

    try:
        marked: list[tuple[str, str, Any]] = []
        for name, entry in commands.items():
            if entry.get("schedule_unknown"):
                return fallback(f"the schedule of {name} is not kept in the cache")
            value = entry.get("schedule")
            for item in value if isinstance(value, list) else [] if value is None else [value]:
                marked.append((str(entry.get("source", "")), name, item))
        registry = CommandRegistry([cmdcache.spec_of(n, e) for n, e in commands.items()])
        entries, errors = load_entries(settings, registry, check_args=False, marked=marked)
        if errors:
            return fallback("an invalid schedule entry (the full command reports it)")
        for e in entries:
            spec = commands[e.command].get("args")
            if not isinstance(spec, dict) or not accepts(spec, list(e.args)) or commands[e.command].get("isolated"):
                # (an isolated command's lock key needs the command: the full path)
                return fallback(f"the cached spec of {e.command} cannot vouch for entry {e.name}")
    except Exception as exc:  # noqa: BLE001 - the full path reports it, word for word
        return fallback(f"the full command reports it ({type(exc).__name__}: {exc})")
    sch = Scheduler(entries, settings=settings, registry=registry, connection=opts["connection"],
                    check_args=False)
    print_actions(sch.run(), opts["json"])
    return FastResult(0)
