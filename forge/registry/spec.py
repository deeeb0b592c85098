"""Commands: the ``@command`` marker, ``CommandSpec`` and the ``CommandRegistry`` (name -> spec).

Importing this module is cheap: it imports nothing heavy, so project command files load fast.
"""

from __future__ import annotations

import importlib
import re
import types
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from forge.errors import DiscoveryError, UnknownCommand

F = TypeVar("F", bound=Callable[..., Any])

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]*(:[a-z0-9][a-z0-9_-]*)?$")
MARKER = "__forge_command__"
SCHEDULE_MARKER = "__forge_schedule__"  # read by forge.scheduler.load
JOB_MARKER = "__forge_job_defaults__"  # a forge.retry.rules.JobDefaults
ISOLATED_MARKER = "__forge_isolated__"  # read by forge.limits.isolation


def valid_name(name: str) -> bool:
    """True if ``name`` is a valid command name: ``namespace:action`` (or one word) of lowercase
    letters, digits, ``-`` and ``_``, each part starting with a letter or digit, at most 100 long."""
    return bool(NAME_RE.fullmatch(name)) and len(name) <= 100


def command(name: str, *, hidden: bool = False, schedule: Any = None, isolated: Any = None,
            **job: Any) -> Callable[[F], F]:
    """Mark a function as the forge command ``name`` (``namespace:action`` or a bare name).

    The function's signature defines its arguments and options the way Typer does; its
    docstring is the help text. The name is checked when the command is discovered, so an
    invalid one is reported with the file it is in. ``schedule`` runs it on a schedule: a cron
    expression (``"0 3 * * *"``), a table of ``[[schedule]]`` keys (``{"every": "5m",
    "overlap": "skip"}``), or a list of them (see ``forge.scheduler``). ``isolated`` lets one
    run at a time hold its lock: ``True`` (one per command), a key template of its parameters
    (``"import:{tenant}"``) or a function of them returning the key (see ``forge.limits.isolation``).

    The other keywords are the defaults of its jobs, which a dispatch option overrides:
    ``queue``, ``tries``, ``timeout``, ``backoff``, ``retry_until``, ``max_exceptions`` and
    ``max_releases`` (``forge.retry.rules.JobDefaults``).
    """
    defaults = None
    if job:
        from forge.retry.rules import JobDefaults

        try:
            defaults = JobDefaults.declare(**job)
        except TypeError:
            known = "queue, tries, timeout, backoff, retry_until, max_exceptions, max_releases"
            raise TypeError(f"@command({name!r}): unknown option(s) {', '.join(sorted(job))}; known: {known}") from None

    def mark(fn: F) -> F:
        setattr(fn, MARKER, (name, hidden))
        if defaults:
            setattr(fn, JOB_MARKER, defaults)
        if schedule is not None:
            setattr(fn, SCHEDULE_MARKER, schedule)
        if isolated is not None and isolated is not False:
            from forge.limits.isolation import check_declaration  # only for an isolated command

            setattr(fn, ISOLATED_MARKER, check_declaration(isolated, name))
        return fn

    return mark


def first_line(doc: str | None) -> str:
    """The first non-blank line of a docstring, stripped (a command's description); empty for None."""
    for line in (doc or "").strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


@dataclass(frozen=True)
class CommandSpec:
    """A registered command. ``target`` is the function, or ``"module:attr"`` loaded on demand."""

    name: str
    source: str
    description: str = ""
    target: Callable[..., Any] | str = field(default="", compare=False)
    hidden: bool = False
    builtin: bool = False
    #: Its declared job options (``@command(..., tries=5)``), a ``JobDefaults``, or None.
    defaults: Any = field(default=None, compare=False)

    @property
    def namespace(self) -> str:
        """The part of the name before ``:`` (``email`` for ``email:send``); empty for a name without one."""
        return self.name.split(":", 1)[0] if ":" in self.name else ""

    def load(self) -> Callable[..., Any]:
        """The command's function, importing its module if the target is a ``module:function`` string."""
        if callable(self.target):
            return self.target
        module, _, attr = self.target.partition(":")
        return getattr(importlib.import_module(module), attr)


def specs_in_module(module: Any, source: str) -> list[CommandSpec]:
    """Every ``@command``-marked function defined or imported in ``module``."""
    found: list[CommandSpec] = []
    for value in vars(module).values():
        if not (isinstance(value, types.FunctionType) and hasattr(value, MARKER)):
            continue
        name, hidden = getattr(value, MARKER)
        if not isinstance(name, str) or not valid_name(name):
            raise DiscoveryError(
                f"{source}: invalid command name {name!r} on {value.__name__}(): use"
                " namespace:action with lowercase letters, digits, '-' and '_'."
            )
        found.append(CommandSpec(name, source, first_line(value.__doc__), value, hidden,
                                 defaults=getattr(value, JOB_MARKER, None)))
    return found


class CommandRegistry:
    """Name -> CommandSpec. Duplicate names are an error naming both sources.

    ``fallback`` is called once, on the first miss or full listing, to add commands that are
    expensive to find (installed plugins).
    """

    def __init__(
        self,
        specs: Iterable[CommandSpec] = (),
        fallback: Callable[[CommandRegistry], None] | None = None,
    ) -> None:
        self._specs: dict[str, CommandSpec] = {}
        self._fallback = fallback
        #: Command files that failed to import ("path: error"), when discovery was lenient.
        self.broken: list[str] = []
        #: Why a name may be missing, for the error that says it is (e.g. no forge.toml found).
        self.notes: list[str] = []
        for spec in specs:
            self.add(spec)

    def add(self, spec: CommandSpec) -> None:
        """Register ``spec``; the same spec again is a no-op, another with its name a ``DiscoveryError``."""
        old = self._specs.get(spec.name)
        if old is not None:
            if old.target is spec.target and old.source == spec.source:
                return
            raise DiscoveryError(
                f'Command "{spec.name}" is defined twice: in {old.source} and in {spec.source}.'
            )
        self._specs[spec.name] = spec

    def _complete(self) -> None:
        if self._fallback is not None:
            fallback, self._fallback = self._fallback, None
            fallback(self)

    def get(self, name: str) -> CommandSpec | None:
        """The spec named ``name``, or None (completing the registry, e.g. the plugin scan, first if needed)."""
        spec = self._specs.get(name)
        if spec is None:
            self._complete()
            spec = self._specs.get(name)
        return spec

    def resolve(self, name: str) -> CommandSpec:
        """The spec named ``name``; ``UnknownCommand`` (with suggestions) if there is none."""
        spec = self.get(name)
        if spec is None:
            raise self.unknown(name)
        return spec

    def unknown(self, name: str, cls: type[UnknownCommand] = UnknownCommand) -> UnknownCommand:
        """The error for a name that is not registered: suggestions, and what may explain it."""
        notes = [f"{b} (a command defined there is unavailable until it is fixed)." for b in self.broken]
        return cls(name, self.suggest(name), [*notes, *self.notes])

    def suggest(self, name: str) -> list[str]:
        """Up to three registered names close to ``name`` (or of its namespace), for an unknown-command error."""
        import difflib

        self._complete()
        names = [n for n, s in self._specs.items() if not s.hidden]
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
        if not close and ":" in name:
            ns = name.split(":", 1)[0]
            close = [n for n in names if n.startswith(ns + ":")][:3]
        return close

    def __iter__(self) -> Iterator[CommandSpec]:
        self._complete()
        return iter(self.loaded())

    def loaded(self) -> list[CommandSpec]:
        """The commands found so far, sorted, without running the fallback (no plugin scan)."""
        return sorted(self._specs.values(), key=lambda s: (s.namespace, s.name))

    @property
    def complete(self) -> bool:
        """Whether the fallback has run (or there is none)."""
        return self._fallback is None

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def __len__(self) -> int:
        self._complete()
        return len(self._specs)
