"""The command cache: the project's commands and their argument specs, saved between runs.

``forge queue:dispatch`` runs from cron and scripts, often thousands of times. Importing the
project's command files (and with them Typer) to check one job's arguments is most of its
cost, so the first dispatch after a change saves, per project command, where it comes from
and its :mod:`argspec`; later dispatches read that file instead (see
``forge.cli.fastpath.dispatch``).

The cache is keyed by what the specs depend on:

- forge's version, the Python (version and environment), and the installed packages (the
  modification time of each ``site-packages`` directory changes when pip adds, upgrades or
  removes a package, Typer included);
- the config file, and the path, size, inode and times of every ``.py`` file under the
  project's command folders (``_private.py`` helpers included);
- every other module of the project (under its root, outside the Python installation) that was
  imported when the cache was written, e.g. ``app/catalog.py`` imported by a command file.

Any change there, and the cache is ignored and written again by the next full dispatch (or
full ``schedule:run``). Each command also keeps its ``@command(..., schedule=...)`` value, so
``schedule:run`` can find the schedule without loading the command files
(``forge.cli.fastpath.schedule``); a value JSON cannot keep exactly is marked unknown. It also
keeps the job defaults its ``@command`` declares (``queue``, ``tries``, ``backoff``...: see
``forge.retry.rules.JobDefaults``), so a fast dispatch applies them as a full one does.
Plugin and built-in commands are never cached: they always take the full path. The cache is
trusted only if it is a regular file owned by the user, in a directory only they can write.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from forge import __version__
from forge.config import Settings, project_digest, user_dir
from forge.privatefile import read_private
from forge.privatefile import trusted_dir as _trusted_dir

FORMAT = 4  # 4: entries keep the command's declared job defaults
MAX_BYTES = 4 << 20


def cache_dir() -> Path:
    """The user's folder of command caches (``$XDG_CACHE_HOME/forge/commands`` on Linux)."""
    return user_dir("cache") / "commands"


def cache_file(settings: Settings) -> Path:
    """The command cache file of the project of ``settings`` (named by a digest of its root)."""
    return cache_dir() / f"{project_digest(settings.root)}.json"


def fingerprint(settings: Settings) -> list[Any]:
    """What the cached specs depend on that can be found without loading them (one stat a file)."""
    files: list[list[Any]] = []
    for folder in settings.command_paths:
        _walk(str(folder), files)
    config = settings.config_file
    packages = [[p, _stat(p)] for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
    return [FORMAT, __version__, sys.version, sys.prefix, packages, str(config) if config else None,
            _stat(config), [str(p) for p in settings.command_paths], files]


def _stat(path: Path | str | None) -> list[int] | None:
    if path is None:
        return None
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return [st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns]


def _walk(folder: str, out: list[list[Any]]) -> None:
    """Every ``.py`` file below ``folder``, as discovery sees them (symlinked folders skipped)."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        return
    for entry in entries:
        if entry.name.startswith(".") or entry.name == "__pycache__":
            continue
        if entry.is_dir(follow_symlinks=False):
            _walk(entry.path, out)
        elif entry.name.endswith(".py"):
            out.append([entry.path, _stat(entry.path)])


def _read(path: Path) -> bytes | None:
    """The cache file's bytes if it is a regular file of ours that nobody else can write, in a
    directory likewise (``forge.privatefile.read_private``); else None."""
    return read_private(path, MAX_BYTES)


def load(settings: Settings, current: list[Any] | None = None) -> dict[str, dict[str, Any]] | None:
    """The cached project commands (name -> {"source", "args"}), or None if missing or stale.

    ``current`` is the project's :func:`fingerprint`, if the caller has just taken it.
    """
    from forge.registry.builtins import BUILTINS
    from forge.registry.spec import valid_name

    raw = _read(cache_file(settings))
    if raw is None:
        return None
    try:
        data = json.loads(raw)
        if data["fingerprint"] != (current if current is not None else fingerprint(settings)):
            return None
        modules, commands = data["modules"], data["commands"]
        if any(_stat(path) != st for path, st in modules):
            return None  # a project module outside the command folders changed
        return {name: entry for name, entry in commands.items()
                if valid_name(name) and name not in BUILTINS and isinstance(entry, dict)}
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def _project_modules(settings: Settings) -> list[list[Any]]:
    """The files of the project's own modules imported so far, outside the command folders."""
    root = str(settings.root) + os.sep
    skip = tuple({sys.prefix + os.sep, sys.base_prefix + os.sep, sys.exec_prefix + os.sep}) + tuple(
        str(p) + os.sep for p in settings.command_paths)
    out = []
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if isinstance(path, str) and path.startswith(root) and not path.startswith(skip):
            out.append([path, _stat(path)])
    return sorted(out)


def store(settings: Settings, before: list[Any]) -> None:
    """Save the project's commands; ``before`` is the fingerprint taken before they were loaded.

    Best effort: a cache that cannot be written only makes the next dispatch slower.
    """
    from forge.registry.argspec import describe
    from forge.registry.discovery import project_specs
    from forge.registry.runner import click_command
    from forge.registry.spec import SCHEDULE_MARKER

    if fingerprint(settings) != before:
        return  # a file changed while we loaded them: the next run will try again
    commands = {}
    for spec in project_specs(settings.command_paths, settings.root):
        args = describe(click_command(spec))
        try:
            json.dumps(args, allow_nan=False)
        except (TypeError, ValueError):
            args = None  # e.g. a range bound that is not a plain number: this command takes the full path
        entry: dict[str, Any] = {"source": spec.source, "args": args}
        if callable(spec.target) and getattr(spec.target, "__forge_isolated__", None) is not None:
            entry["isolated"] = True  # its lock key needs the command: the full path dispatches it
        marker = getattr(spec.target, SCHEDULE_MARKER, None) if callable(spec.target) else None
        if marker is not None:
            try:
                if json.loads(json.dumps(marker, allow_nan=False)) == marker:
                    entry["schedule"] = marker
                else:
                    entry["schedule_unknown"] = True
            except (TypeError, ValueError, RecursionError):
                entry["schedule_unknown"] = True
        if spec.defaults:
            entry["defaults"] = spec.defaults.to_json()
        commands[spec.name] = entry
    blob = json.dumps({"fingerprint": before, "modules": _project_modules(settings), "commands": commands})
    folder = cache_dir()
    path = cache_file(settings)
    tmp = folder / f".{path.name}.{os.getpid()}.tmp"
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not _trusted_dir(folder):
            return
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(blob.encode())
        os.replace(tmp, path)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass


def spec_of(name: str, entry: dict[str, Any]) -> Any:
    """The ``CommandSpec`` a cache entry stands for: its source and declared job defaults (its
    function is never loaded). ValueError or UsageError if the entry is malformed."""
    from forge.registry.spec import CommandSpec

    defaults = None
    if entry.get("defaults") is not None:
        from forge.retry.rules import JobDefaults

        defaults = JobDefaults.from_json(entry["defaults"])
    return CommandSpec(name, str(entry.get("source", "")), defaults=defaults)
