"""Listeners: ``@forge.on`` in Python, ``[[listeners]]`` in forge.toml, and plugins' entry points.

A listener is *durable* when it names a command: it is dispatched as a job of that command
(``Listener.job_for``), with the event in ``FORGE_EVENT``. It is *in-process* when it is a plain
function: the worker calls it with the :class:`~forge.events.model.Event`, within a time budget.

``@forge.on("job.failed")`` on a plain function makes an in-process listener; on an
``@command`` function (in either order) it makes a durable one for that command. Decorating
registers the listener when its module is imported: the project's command modules (which a
worker imports), and the modules named by the entry-point group ``forge.listeners``.
"""

from __future__ import annotations

import fnmatch
import inspect
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from forge.errors import ConfigError
from forge.events.model import META_KEY, Event, valid_pattern
from forge.registry.spec import MARKER

if TYPE_CHECKING:
    from forge.retry.backoff import Backoff

F = TypeVar("F", bound=Callable[..., Any])

ENTRY_POINT_GROUP = "forge.listeners"
#: Every ``@forge.on`` declared in this process, in import order.
_declared: list[tuple[tuple[str, ...], Callable[..., Any], dict[str, Any]]] = []


@dataclass(frozen=True)
class Listener:
    """One listener: which events (names or globs), and what it runs."""

    events: tuple[str, ...]
    source: str
    fn: Callable[[Event], Any] | None = field(default=None, compare=False)
    command: str | None = None
    args: tuple[str, ...] = ()
    queue: str | None = None
    tries: int | None = None
    timeout: float | None = None
    backoff: Backoff | None = None
    match: Mapping[str, Any] = field(default_factory=dict)
    budget: float | None = None  # in-process: overrides [events] budget
    name: str = ""

    @property
    def durable(self) -> bool:
        """Whether the listener runs as a queued job (it names a command), rather than
        in-process."""
        return self.command is not None

    @property
    def key(self) -> str:
        """Stable across processes and hosts: part of each listener job's idempotency key."""
        if self.name:
            return self.name
        if self.command is not None:
            return f"{self.command} {' '.join(self.args)} @{self.queue or ''} {','.join(self.events)}"
        return self.source

    def wants(self, event: Event) -> bool:
        """Whether the listener takes ``event``: its name matches one of the listener's patterns
        and its data every ``match`` entry. A durable listener never takes the events of a
        listener job."""
        if not any(p == event.name or fnmatch.fnmatchcase(event.name, p) for p in self.events):
            return False
        if self.durable and event.data.get("listener_job"):
            return False  # a listener job's own events: a failing notifier must not loop
        return all(_matches(_field(event, k), v) for k, v in self.match.items())

    def job_for(self, event: Event, default_queue: str) -> Any:
        """The listener's job for ``event`` (a ``forge.job.Job``), keyed by the event's id."""
        from forge.queue.command import QueuedCommand

        assert self.command is not None
        cmd = (QueuedCommand(self.command).with_args(list(self.args))
               .with_idempotency_key(f"event:{event.id}:{self.key}")
               .with_metadata(META_KEY, _bounded(event.to_dict())))
        if self.tries is not None:
            cmd = cmd.with_max_attempts(self.tries)
        if self.timeout is not None:
            cmd = cmd.with_timeout(self.timeout)
        if self.backoff is not None:
            cmd = cmd.with_backoff(self.backoff)
        return cmd.to_job(self.queue or default_queue)

    def describe(self) -> dict[str, Any]:
        """The listener as ``events:list --json`` prints it: its events, source, kind, and its
        command or function with the options that are set."""
        d: dict[str, Any] = {"events": list(self.events), "source": self.source,
                             "kind": "durable" if self.durable else "in-process"}
        if self.durable:
            d.update(command=self.command, args=list(self.args), queue=self.queue)
        else:
            d["function"] = getattr(self.fn, "__qualname__", "")
            d["budget"] = self.budget
        if self.match:
            d["match"] = dict(self.match)
        return d


def _field(event: Event, key: str) -> Any:
    """A field of the event as listeners receive it (``Event.to_dict``): ``host``, ``pid``,
    ``event`` and ``id`` live beside the payload, not in it."""
    if key in event.data:
        return event.data[key]
    return {"host": event.host, "pid": event.pid, "event": event.name, "id": event.id}.get(key)


def _matches(value: Any, wanted: Any) -> bool:
    if isinstance(wanted, list):
        return any(_matches(value, w) for w in wanted)
    if isinstance(wanted, str) and isinstance(value, str):
        return fnmatch.fnmatchcase(value, wanted)
    return bool(value == wanted)


def _bounded(doc: dict[str, Any]) -> dict[str, Any]:
    """The event as a listener job's metadata: at most about 16 KiB (a job is at most 64)."""
    import json

    if len(json.dumps(doc, default=str)) <= 16 * 1024:
        return doc
    small = {k: v for k, v in doc.items() if k not in ("args", "metadata")}
    small["truncated"] = True
    return small


def on(event: str | Iterable[str], *, queue: str | None = None, args: Iterable[str] = (),
       tries: int | None = None, timeout: float | None = None, backoff: Iterable[float] | None = None,
       match: Mapping[str, Any] | None = None, budget: float | None = None,
       name: str = "") -> Callable[[F], F]:
    """Listen for ``event`` (a name such as ``"job.failed"``, a glob such as ``"job.*"``, or a
    list of them).

    On a plain function: an in-process listener, called with the event in the worker (within
    ``budget`` seconds, default ``[events] budget``). On an ``@command`` function: a durable
    listener, dispatched as a job of that command on ``queue`` (default: the default queue)
    with ``args``, ``tries``, ``timeout`` and ``backoff``; the command reads its event with
    ``forge.events.current()``. ``match`` keeps only events whose payload has these values
    (a string may be a glob; a list means any of them), e.g. ``{"queue": "imports"}``.
    """
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int | float) or not 0 < budget <= 5):
        raise ConfigError(f"@forge.on: budget must be more than 0 and at most 5 seconds, not {budget!r}.")
    patterns = (event,) if isinstance(event, str) else tuple(event)
    for p in patterns:
        if not isinstance(p, str) or not valid_pattern(p):
            raise ConfigError(f"@forge.on: unknown event {p!r}.", hint="`forge events:list` lists the events.")
    opts = {"queue": queue, "args": tuple(args), "tries": tries, "timeout": timeout,
            "backoff": tuple(backoff) if backoff is not None else None, "match": dict(match or {}),
            "budget": budget, "name": name}

    def mark(fn: F) -> F:
        _declared.append((patterns, fn, opts))
        return fn

    return mark


def declared(root: Any = None) -> list[Listener]:
    """The listeners ``@forge.on`` declared in this process (durable ones when the function is
    an ``@command``), in import order; their files shown relative to ``root`` when below it."""
    out: list[Listener] = []
    for patterns, fn, opts in _declared:
        marker = getattr(fn, MARKER, None)
        source = _source(fn, root)
        if marker is not None:
            out.append(Listener(patterns, source, command=marker[0], **opts))
        else:
            if opts["queue"] is not None or opts["args"]:
                raise ConfigError(f"{source}: @forge.on(queue=/args=) needs an @command function (a durable"
                                  " listener is a job of a command); a plain function runs in the worker.")
            keep = {k: opts[k] for k in ("match", "budget", "name")}
            out.append(Listener(patterns, source, fn=fn, **keep))
    return out


def _source(fn: Callable[..., Any], root: Any = None) -> str:
    import os

    try:
        file = inspect.getsourcefile(fn) or "?"
    except TypeError:
        file = "?"
    if root is not None and file.startswith(f"{root}{os.sep}"):
        file = os.path.relpath(file, root)
    return f"{file}: {getattr(fn, '__qualname__', fn)}()"


def load_plugins() -> None:
    """Import the modules of the entry-point group ``forge.listeners`` (their ``@forge.on``
    functions register themselves); a plugin that fails to load is a warning."""
    from importlib.metadata import entry_points

    from forge.registry.discovery import PluginWarning

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(ep.dist, "name", None) or "unknown"
        try:
            ep.load()
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not break the worker
            warnings.warn(f"Plugin {dist} ({ep.name} = {ep.value}) failed to load its listeners:"
                          f" {type(exc).__name__}: {exc}", PluginWarning, stacklevel=2)
