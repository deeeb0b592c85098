"""``[[listeners]]`` and ``[events]`` in forge.toml, read and checked (``forge.config`` leaves
these sections to this module, as it leaves ``[[schedule]]`` to the scheduler).

```toml
[events]
budget = "100ms"                 # in-process listeners: the most each may take per event

[events.thresholds]              # threshold events, evaluated by running workers
waiting_too_long = "5m"          # queue.waiting_too_long: oldest pending job older than this
too_long = 1000                  # queue.too_long: more pending jobs than this
retried_many = 3                 # job.retried_many: a job released for its 3rd retry
[events.thresholds.queues.emails]
waiting_too_long = "30s"         # per queue; 0 turns one off for that queue

[[listeners]]
event = "job.failed"             # a name, a glob ("job.*") or a list of them
command = "notify:slack"         # a registered command: dispatched as a job per event
args = ["--channel=ops"]
queue = "notifications"
tries = 5
backoff = [10, 60]
match = { queue = "imports" }    # only events whose payload has these values
```
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from forge.config import Settings, _read_toml, validate_queue_name
from forge.durations import parse_duration
from forge.errors import ConfigError, UsageError
from forge.events.listeners import Listener
from forge.events.model import valid_pattern

DEFAULT_BUDGET = 0.1
#: The longest budget of an in-process listener (the worker waits for it between two jobs).
MAX_BUDGET = 5.0
_LISTENER_KEYS = {"event", "command", "args", "queue", "tries", "timeout", "backoff", "match", "name"}
_EVENTS_KEYS = {"budget", "thresholds"}
_THRESHOLD_KEYS = {"waiting_too_long", "too_long", "retried_many"}


@dataclass(frozen=True)
class Thresholds:
    """Per queue (``"*"``: the default): seconds for waiting_too_long, counts for the others."""

    waiting_too_long: Mapping[str, float] = field(default_factory=dict)
    too_long: Mapping[str, int] = field(default_factory=dict)
    retried_many: Mapping[str, int] = field(default_factory=dict)

    def for_queue(self, kind: str, queue: str) -> float:
        """The threshold of ``kind`` (``waiting_too_long``, ``too_long`` or ``retried_many``) for
        ``queue``: its own, else the ``*`` default, else 0 (off)."""
        table: Mapping[str, float] = getattr(self, kind)
        return float(table.get(queue, table.get("*", 0)) or 0)

    @property
    def any_queue_threshold(self) -> bool:
        """Whether any queue-level threshold (waiting_too_long, too_long) is on, so a worker must
        watch the queues."""
        return any(v for t in (self.waiting_too_long, self.too_long) for v in t.values())

    @property
    def any(self) -> bool:
        """Whether any threshold at all is on."""
        return self.any_queue_threshold or any(self.retried_many.values())


@dataclass(frozen=True)
class EventsConfig:
    """The parsed ``[[listeners]]`` and ``[events]`` of a forge.toml: the listeners, the
    in-process listeners' time budget (seconds) and the thresholds."""

    listeners: tuple[Listener, ...] = ()
    budget: float = DEFAULT_BUDGET
    thresholds: Thresholds = field(default_factory=Thresholds)


_cache: dict[Any, EventsConfig] = {}
_EMPTY = EventsConfig()


def check(settings: Settings) -> None:
    """Parse forge.toml's [[listeners]] and [events] now, when it has them (``ConfigError`` for a
    bad one). ``forge.config`` leaves them to this module; whatever raises events after a write
    calls this before it (a dispatch, a cancel, a schedule run; a worker parses them as it
    starts), and the CLI before any command, so a broken table stops them before they write."""
    if settings.listeners or settings.events:
        events_config(settings)


def events_config(settings: Settings) -> EventsConfig:
    """The events configuration of ``settings``' forge.toml (parsed once per file version)."""
    path = settings.config_file
    if path is None:
        return EventsConfig()
    return events_config_of(_read_toml(path), str(path))


def events_config_of(data: Mapping[str, Any], where: str) -> EventsConfig:
    """``parse``, once per parsed forge.toml (``forge.config`` keeps one parse per file version)."""
    if "listeners" not in data and "events" not in data:
        return _EMPTY
    key = (where, id(data))
    got = _cache.get(key)
    if got is None:
        _cache.clear()
        got = _cache[key] = parse(data, where)
    return got


def parse(data: Mapping[str, Any], where: str) -> EventsConfig:
    """Parse ``data``'s ``[[listeners]]`` and ``[events]`` tables. Raises ConfigError, naming
    ``where`` and the table, for an unknown key or a bad value."""
    raw = data.get("listeners", [])
    if not isinstance(raw, list) or not all(isinstance(t, dict) for t in raw):
        raise ConfigError(f"{where}: listeners must be [[listeners]] tables.")
    listeners = tuple(_listener(t, f"{where} [[listeners]] #{n}") for n, t in enumerate(raw, 1))
    ev = data.get("events", {})
    if not isinstance(ev, dict):
        raise ConfigError(f"{where}: events must be a table ([events]).")
    for key in ev:
        if key not in _EVENTS_KEYS:
            raise ConfigError(f"{where}: unknown key events.{key} (known: {', '.join(sorted(_EVENTS_KEYS))}).")
    budget = DEFAULT_BUDGET
    if "budget" in ev:
        budget = _duration(ev["budget"], "events.budget", where)
        if not 0 < budget <= MAX_BUDGET:
            raise ConfigError(f"{where}: events.budget must be more than 0 and at most 5s, not {ev['budget']!r}.")
    return EventsConfig(listeners, budget, _thresholds(ev.get("thresholds", {}), where))


def _duration(value: Any, what: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ConfigError(f"{where}: {what} must be a duration such as \"5m\", not {value!r}.")
    try:
        return parse_duration(value, what=what)
    except UsageError as exc:
        raise ConfigError(f"{where}: {exc.message}") from None


def _count(value: Any, what: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{where}: {what} must be a whole number of at least 0, not {value!r}.")
    return value


def _thresholds(table: Any, where: str) -> Thresholds:
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: events.thresholds must be a table.")
    out: dict[str, dict[str, Any]] = {k: {} for k in _THRESHOLD_KEYS}

    def read(t: Mapping[str, Any], queue: str, prefix: str) -> None:
        for key, value in t.items():
            if key == "queues" and queue == "*":
                continue
            if key not in _THRESHOLD_KEYS:
                known = ", ".join(sorted(_THRESHOLD_KEYS | ({"queues"} if queue == "*" else set())))
                raise ConfigError(f"{where}: unknown key {prefix}.{key} (known: {known}).")
            if key == "waiting_too_long":
                out[key][queue] = _duration(value, f"{prefix}.{key}", where)
            else:
                out[key][queue] = _count(value, f"{prefix}.{key}", where)

    read(table, "*", "events.thresholds")
    queues = table.get("queues", {})
    if not isinstance(queues, dict) or not all(isinstance(v, dict) for v in queues.values()):
        raise ConfigError(f"{where}: events.thresholds.queues must hold one table per queue.")
    for qname, t in queues.items():
        try:
            validate_queue_name(qname)
        except UsageError as exc:
            raise ConfigError(f"{where}: events.thresholds.queues: {exc.message}") from None
        read(t, qname, f"events.thresholds.queues.{qname}")
    return Thresholds(**out)


def _listener(t: Mapping[str, Any], where: str) -> Listener:
    for key in t:
        if key not in _LISTENER_KEYS:
            raise ConfigError(f"{where}: unknown key {key} (known: {', '.join(sorted(_LISTENER_KEYS))}).")
    events = t.get("event")
    patterns = [events] if isinstance(events, str) else events
    if not patterns or not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
        raise ConfigError(f'{where}: event must name an event such as "job.failed" (or a list of them).')
    for p in patterns:
        if not valid_pattern(p):
            raise ConfigError(f'{where}: unknown event "{p}".', hint="`forge events:list` lists the events.")
    command = t.get("command")
    if not isinstance(command, str) or not command:
        raise ConfigError(f'{where}: command must name a registered command, e.g. command = "notify:slack".')
    args = t.get("args", [])
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise ConfigError(f"{where}: args must be a list of strings (an argv list, never a shell line).")
    queue = t.get("queue")
    if queue is not None:
        try:
            validate_queue_name(queue)
        except UsageError as exc:
            raise ConfigError(f"{where}: {exc.message}") from None
    tries = t.get("tries")
    if tries is not None and (isinstance(tries, bool) or not isinstance(tries, int) or tries < 1):
        raise ConfigError(f"{where}: tries must be a whole number of at least 1, not {tries!r}.")
    timeout = _duration(t["timeout"], "timeout", where) if "timeout" in t else None
    if timeout == 0:
        raise ConfigError(f"{where}: timeout must be more than 0 seconds.")
    backoff = None
    if "backoff" in t:
        try:
            from forge.retry.backoff import parse as parse_backoff

            backoff = parse_backoff(t["backoff"], what="backoff")
        except UsageError as exc:
            raise ConfigError(f"{where}: {exc.message}") from None
    match = t.get("match", {})
    if not isinstance(match, dict):
        raise ConfigError(f'{where}: match must be a table, e.g. match = {{ queue = "imports" }}.')
    name = t.get("name", "")
    if not isinstance(name, str):
        raise ConfigError(f"{where}: name must be a string.")
    return Listener(tuple(patterns), where, command=command, args=tuple(args), queue=queue, tries=tries,
                    timeout=timeout, backoff=backoff, match=dict(match), name=name)
