"""The command cache: the project's commands and their argument specs, saved between runs.

``forge queue:dispatch`` runs from cron and scripts, often thousands of times. Importing the
project's command files (and with them Typer) to check one job's arguments is most of its
cost, so the first dispatch after a change saves, per project command, where it comes from
and its :mod:`argspec`; later dispatches read that file instead (see ``forge.fastdispatch``).

The cache is keyed by everything the specs depend on: forge's version, the Python, the config
file, and the path, size, inode and modification time of every ``.py`` file under the
project's command folders (``_private.py`` helpers included). Any change there, and the cache
is ignored and written again by the next full dispatch. Plugin commands are not cached: they
always take the full path. The file lives in the user's cache directory, private to them.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from . import __version__
from .config import Settings, project_digest, user_dir

FORMAT = 1


def cache_file(settings: Settings) -> Path:
    return user_dir("cache") / "commands" / f"{project_digest(settings.root)}.json"


def fingerprint(settings: Settings) -> list[Any]:
    """What the cached specs depend on (cheap: one stat per file)."""
    files: list[list[Any]] = []
    for folder in settings.command_paths:
        _walk(str(folder), files)
    config = settings.config_file
    return [FORMAT, __version__, sys.version, str(config) if config else None, _stat(config),
            [str(p) for p in settings.command_paths], files]


def _stat(path: Path | str | None) -> list[int] | None:
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns]


def _walk(folder: str, out: list[list[Any]]) -> None:
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        return
    for entry in entries:
        if entry.name.startswith(".") or entry.name == "__pycache__":
            continue
        if entry.is_dir():
            _walk(entry.path, out)
        elif entry.name.endswith(".py"):
            out.append([entry.path, _stat(entry.path)])


def load(settings: Settings, current: list[Any] | None = None) -> dict[str, dict[str, Any]] | None:
    """The cached commands (name -> {"source", "args"}), or None if missing or stale.

    ``current`` is the project's fingerprint, if the caller has just taken it.
    """
    try:
        with open(cache_file(settings), encoding="utf-8") as fh:
            data = json.load(fh)
        if data["fingerprint"] != (current if current is not None else fingerprint(settings)):
            return None
        commands = data["commands"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return commands if isinstance(commands, dict) else None


def store(settings: Settings, before: list[Any]) -> None:
    """Save the project's commands; ``before`` is the fingerprint taken before they were loaded.

    Best effort: a cache that cannot be written only makes the next dispatch slower.
    """
    from .argspec import describe
    from .discovery import project_specs
    from .runner import click_command

    if fingerprint(settings) != before:
        return  # a file changed while we loaded them: the next run will try again
    commands = {}
    for spec in project_specs(settings.command_paths, settings.root):
        args = describe(click_command(spec))
        try:
            json.dumps(args, allow_nan=False)
        except (TypeError, ValueError):
            args = None  # e.g. a range bound that is not a plain number: this command takes the full path
        commands[spec.name] = {"source": spec.source, "args": args}
    path = cache_file(settings)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w", encoding="utf-8") as fh:
            json.dump({"fingerprint": before, "commands": commands}, fh)
        os.replace(tmp, path)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
