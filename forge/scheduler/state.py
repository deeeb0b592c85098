"""What the store keeps per schedule entry (``EntryState``), and the ``ScheduleStore`` seam.

The state is small and versioned JSON, kept in the queue's store (a file under the queue
directory, or a Redis hash under the prefix) so that every host and every way of driving the
scheduler share it. Exactly-once per tick does not rest on it (the tick's idempotency key does:
``ScheduleEntry.key``); it keeps what the key cannot:

* ``last_tick``: the latest tick handled (dispatched, skipped or missed). A tick at or before it
  is never dispatched again, even once its job (and so its key) is gone;
* ``inflight``: ticks a run decided to dispatch and marked before pushing them. Any later run
  pushes them again (the key makes that a no-op if the first push landed), so a run killed
  between marking and pushing loses no tick whatever the catch-up policy;
* the last dispatch (job id, when, whether this run created it), skipped and missed counts, and
  whether the entry is paused;
* ``since``: where a new entry's ticks start (set by the first run that sees it: the later of
  the previous run of any entry, ``LAST_RUN``, and the on-time window), so a new or renamed
  entry never dispatches a tick from before it existed, such as one its old name dispatched;
* ``orphaned_at``: when a run first found the state's entry gone from the schedule; the state
  is dropped ``ORPHAN_RETENTION`` later (``schedule:list`` shows it until then);
* a cache of the entry's next tick (``next_tick``, the first tick strictly after ``next_from``
  for the expression and zone ``next_for``, or an earlier time), so a run need not compute the
  next tick of 1,000 cron expressions to learn that none is due: a lower bound, so trusting it
  can only make a run look again, never skip a tick.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

STATE_VERSION = 1
#: The store's record of the last scheduler run (its ``last_tick``: the run's time). Entry names
#: are stripped of spaces, so none can be this key.
LAST_RUN = " last run"
#: How long the state of an entry removed from the schedule is kept (a revert, or a host still
#: on the previous release, finds it as it was); then a run drops it.
ORPHAN_RETENTION = 7 * 86400.0


@dataclass(frozen=True)
class EntryState:
    """One entry's schedule state (times are Unix seconds)."""

    last_tick: float | None = None
    last_job: str | None = None
    last_job_tick: float | None = None
    last_dispatched_at: float | None = None
    inflight: tuple[float, ...] = ()
    skipped: int = 0
    last_skipped: float | None = None
    missed: int = 0
    last_missed: float | None = None
    paused: bool = False
    paused_at: float | None = None
    dispatched: int = 0
    next_tick: float | None = None
    next_from: float | None = None
    next_for: str | None = None
    since: float | None = None
    orphaned_at: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """The state as the stores write it: the fields that are set, ``inflight`` as a list, and
        the format version."""
        # The fields that are set (an absent one reads back as None): flat values, no deep copy.
        d = {k: v for k, v in self.__dict__.items() if v is not None}
        d["inflight"] = list(self.inflight)
        d["v"] = STATE_VERSION
        return d

    @classmethod
    def from_dict(cls, d: Any) -> EntryState:
        """A state read back; anything malformed reads as the fields that are well-formed."""
        if not isinstance(d, dict):
            return cls()
        out: dict[str, Any] = {}
        for name, v in d.items():  # exact JSON types (bool is not an int here), checked inline
            kind = _FIELDS.get(name)
            t = type(v)
            if kind is float:
                if (t is float or t is int) and 0 <= v <= LATEST:
                    out[name] = float(v)
            elif kind is t and kind is not tuple:  # str, int, bool
                out[name] = v
            elif kind is tuple and t is list:
                out[name] = tuple(float(x) for x in v if _instant(x))
        new = object.__new__(cls)
        new.__dict__.update(_DEFAULTS, **out)
        return new

    def evolve(self, **changes: Any) -> EntryState:
        """A copy with ``changes`` (what ``dataclasses.replace`` does, at a third of its cost:
        a run evolves thousands of states)."""
        if not changes.keys() <= _FIELDS.keys():
            raise TypeError(f"unknown EntryState field(s): {', '.join(sorted(changes.keys() - _FIELDS.keys()))}")
        new = object.__new__(EntryState)
        new.__dict__.update(self.__dict__, **changes)
        return new


#: The range of a stored time (Unix seconds): 1970 to forge's latest due time (year 2286).
#: Anything else (a negative time, 1e300, NaN, a string) is malformed, read as absent, so
#: that a damaged state never stops a run on a time no clock can show.
LATEST = 9_999_936_000.0


def _instant(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v <= LATEST


_FIELDS: dict[str, type] = {
    "last_tick": float, "last_job": str, "last_job_tick": float, "last_dispatched_at": float,
    "inflight": tuple, "skipped": int, "last_skipped": float, "missed": int, "last_missed": float,
    "paused": bool, "paused_at": float, "dispatched": int, "next_tick": float, "next_from": float,
    "next_for": str, "since": float, "orphaned_at": float,
}

_DEFAULTS = dict(EntryState().__dict__)

#: ``update``'s function: the current states of the names asked for (missing: ``EntryState()``)
#: -> the states to write (only the names it returns are written).
Updater = Callable[[dict[str, EntryState]], dict[str, EntryState]]


class ScheduleStore(Protocol):
    """Where schedule state lives: per connection, shared by every host that uses it."""

    def read(self, names: Iterable[str] | None = None) -> dict[str, EntryState]:
        """The states of ``names`` (all stored ones when None); a name never stored is absent."""

    def update(self, names: Iterable[str], fn: Updater) -> dict[str, EntryState]:
        """Atomically read the states of ``names``, apply ``fn`` and store what it returns,
        durably before returning; returns the states now stored for ``names``. No concurrent
        ``update`` of the same names interleaves with it (a file lock, or an optimistic Redis
        transaction, in which case ``fn`` may be called more than once: it must be pure).
        Raises ``QueueUnavailable`` when the store cannot be read or written."""

    def names(self) -> list[str]:
        """The names of every stored state (``LAST_RUN`` included), without parsing them."""

    def drop(self, names: Iterable[str], fn: Callable[[EntryState], bool]) -> list[str]:
        """Atomically delete the states of ``names`` for which ``fn`` (pure) is true of the
        current state; returns the names deleted."""

    def session(self) -> Any:
        """A context manager around one scheduler run. The file store holds its lock for the
        whole run, so runs on one host take turns; the Redis store needs none (no-op)."""

    def close(self) -> None:
        """Release the store's connections and files; it is not used afterwards."""


_STORES = {
    "FileBackend": "forge.backends.file.schedule:FileScheduleStore",
    "RedisBackend": "forge.backends.redis.schedule:RedisScheduleStore",
}


def store_for(backend: Any) -> ScheduleStore:
    """The schedule store over a queue backend's own storage (named in a static table)."""
    import importlib

    for cls in type(backend).__mro__:
        target = _STORES.get(cls.__name__)
        if target is not None:
            module, _, attr = target.partition(":")
            store: ScheduleStore = getattr(importlib.import_module(module), attr)(backend)
            return store
    from forge.errors import ConfigError

    raise ConfigError(f"The {type(backend).__name__} queue backend cannot keep schedule state.")


@dataclass
class MemoryScheduleStore:
    """A store in this process's memory (for tests of the library and for ``--dry-run``)."""

    states: dict[str, EntryState] = field(default_factory=dict)

    def read(self, names: Iterable[str] | None = None) -> dict[str, EntryState]:
        """The stored states of ``names`` (every state if None); names with no state are left
        out."""
        if names is None:
            return dict(self.states)
        return {n: self.states[n] for n in names if n in self.states}

    def update(self, names: Iterable[str], fn: Updater) -> dict[str, EntryState]:
        """Apply ``fn`` to the current states of ``names`` (a missing one as a fresh EntryState),
        store the result, and return the states of ``names`` after it."""
        names = list(names)
        cur = {n: self.states.get(n, EntryState()) for n in names}
        self.states.update(fn(cur))
        return {n: self.states.get(n, EntryState()) for n in names}

    def names(self) -> list[str]:
        """The names of every stored state."""
        return list(self.states)

    def drop(self, names: Iterable[str], fn: Callable[[EntryState], bool]) -> list[str]:
        """Delete the states of ``names`` for which ``fn`` is true; returns the names deleted."""
        gone = [n for n in names if n in self.states and fn(self.states[n])]
        for n in gone:
            del self.states[n]
        return gone

    def session(self) -> Any:
        """A no-op context manager: one process's memory needs no lock."""
        import contextlib

        return contextlib.nullcontext()

    def close(self) -> None:
        """Nothing to release."""
        pass
