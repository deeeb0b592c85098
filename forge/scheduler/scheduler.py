"""``Scheduler``: decides which ticks are due and dispatches each exactly once.

One run (``run``), from any process on any host, at any time:

1. read the entries' states, and for ``overlap = "skip"`` entries whether the previous tick's
   job is still pending, delayed or running;
2. **mark** (one atomic ``ScheduleStore.update``): per entry, the ticks after ``last_tick`` up
   to now are decided by ``catch_up`` (dispatched, or counted as missed) and ``overlap``
   (skipped, counted); ``last_tick`` moves to the latest of them and the ticks to dispatch are
   added to ``inflight``. An entry whose state changed since step 1 is left to the run that
   changed it;
3. **push** every ``inflight`` tick (this run's and any a killed run left) as a job whose id is
   derived from the tick (``ScheduleEntry.key``): a tick already stored stores nothing;
4. **commit** (another update): pushed ticks leave ``inflight``; the last job is recorded.

A new entry (no state yet: added, or renamed, which forge cannot tell apart) starts after the
previous run of the schedule (``LAST_RUN``, any entry's, recorded by every run that marks) and
within the on-time window: it never dispatches a tick from before it existed, such as the one
its old name dispatched a minute ago. The state of an entry that left the schedule is marked
``orphaned_at`` and dropped ``ORPHAN_RETENTION`` later.

A kill before 2 changes nothing; between 2 and 4 leaves ticks in ``inflight`` that the next run
pushes (once: the key); after 4 nothing is left to do. A tick is never dispatched again once
``last_tick`` passed it, even after its job (and so its key) is gone.

The clock is injectable (``clock``, or ``now=`` per call) so tests need not wait for minutes.
"""

from __future__ import annotations

import hashlib
import operator
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from forge.errors import EXIT_NOT_FOUND, ConfigError, ForgeError
from forge.job import State
from forge.scheduler.entry import (
    MAX_CATCH_UP,
    ON_TIME,
    CatchUp,
    Overlap,
    ScheduleEntry,
    ScheduleError,
    iso,
)
from forge.scheduler.state import LAST_RUN, ORPHAN_RETENTION, EntryState, ScheduleStore, store_for

if TYPE_CHECKING:
    from forge.backends.base import Backend
    from forge.config import Settings
    from forge.queue.manager import JobDispatch
    from forge.registry.spec import CommandRegistry

LIVE = (State.PENDING, State.DELAYED, State.RESERVED)


@dataclass(frozen=True)
class TickAction:
    """What a run did (or, dry, would do) with one tick."""

    entry: str
    tick: float
    action: str  # dispatched | exists (stored before) | skipped | missed | error
    job_id: str | None = None
    lateness: float = 0.0
    count: int = 1  # missed: how many ticks this line stands for
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The action as ``schedule:run --json`` prints it (the tick as RFC 3339 text)."""
        return {"entry": self.entry, "tick": iso(self.tick), "action": self.action, "job_id": self.job_id,
                "lateness": round(self.lateness, 3), "count": self.count, "error": self.error}


@dataclass
class _Plan:
    dispatch: list[float] = field(default_factory=list)
    skipped: list[float] = field(default_factory=list)
    missed: int = 0
    last_missed: float | None = None
    last_tick: float | None = None


def first_floor(last_run: float | None, now: float) -> float:
    """Where the ticks of an entry seen for the first time start: after the previous run of
    the schedule (a tick at or before it was that run's to dispatch, under whatever name the
    entry had then), and never before the on-time window."""
    return now - ON_TIME if last_run is None else max(last_run, now - ON_TIME)


def returning(entry: ScheduleEntry, state: EntryState, last_run: float | None) -> EntryState:
    """The state of an entry back in the schedule after it was found gone (a revert of a rename
    or removal): the ticks at or before the previous run of the schedule were that run's, under
    whatever name the entry had then, so they are not run again (nor caught up), as after a
    pause."""
    if state.orphaned_at is None or last_run is None:
        return state
    back = entry.latest_at_or_before(last_run)
    if back is None or (state.last_tick is not None and back <= state.last_tick):
        return state
    return state.evolve(last_tick=back)


def _unseen(state: EntryState) -> bool:
    return state.last_tick is None and state.since is None


def plan_entry(entry: ScheduleEntry, state: EntryState, now: float, previous_live: bool,
               first: float | None = None) -> _Plan:
    """Decide the ticks of ``entry`` after ``state.last_tick`` up to ``now`` (pure); for an
    entry never seen before, after ``first`` (``first_floor``; default: the on-time window)."""
    plan = _Plan()
    if state.paused:
        return plan
    floor = _floor(state, now) if first is None or not _unseen(state) else first
    horizon = now - (ON_TIME if entry.catch_up is CatchUp.NONE else max(entry.max_lateness, ON_TIME))
    start = floor
    if floor < horizon:  # ticks older than the horizon are missed, whatever the policy
        for n, t in enumerate(entry.ticks_after(floor)):
            if t > horizon or n >= MAX_CATCH_UP:
                break
            plan.missed += 1
            plan.last_missed = t
        start = horizon
    window: list[float] = []
    for t in entry.ticks_after(start):
        if t > now:
            break
        window.append(t)
        if len(window) > MAX_CATCH_UP:
            plan.missed += 1
            plan.last_missed = window.pop(0)
    if _unseen(state):  # never seen: its latest on-time tick only, nothing counted missed
        window = window[-1:]
    elif entry.catch_up is CatchUp.LATEST and len(window) > 1:
        plan.missed += len(window) - 1
        plan.last_missed = window[-2]
        window = window[-1:]
    for t in window:
        if entry.overlap is Overlap.SKIP and (previous_live or plan.dispatch):
            plan.skipped.append(t)
        else:
            plan.dispatch.append(t)
    handled = [x for x in (plan.last_missed, *window) if x is not None]
    plan.last_tick = max(handled) if handled else None
    return plan


#: How long a cached next tick is trusted at most (spread over up to twice as long per entry):
#: a change that its key cannot see (new tzdata rules, another /etc/localtime) is noticed then.
CACHE_FOR = 6 * 3600.0


def _floor(state: EntryState, now: float) -> float:
    if state.last_tick is not None:
        return state.last_tick
    return state.since if state.since is not None else now - ON_TIME


def nothing_due(entry: ScheduleEntry, state: EntryState, now: float) -> bool:
    """True when ``plan_entry`` would surely find nothing to do (paused, or the cached next tick
    of this expression and zone is still ahead), without computing a tick. The cache is a lower
    bound of the first tick after ``next_from``, and every tick a plan looks at is after the
    floor (``last_tick``, or the on-time window of an entry that never ran), which is at or
    after ``next_from``: so none is at or before ``now``."""
    if state.paused:
        return True
    if _unseen(state):
        return False  # its first run records where its ticks start (``since``)
    if entry.every is not None:
        return (_floor(state, now) // entry.every + 1) * entry.every > now
    return (state.next_for == entry.fingerprint and state.next_tick is not None
            and state.next_from is not None and _floor(state, now) >= state.next_from
            and state.next_tick > now)


#: What a run decided about an entry: its state but the next-tick cache, the first sighting and
#: the orphan mark. Another run that only refreshed the cache (nothing was due at its time), saw
#: the entry for the first time with nothing due, or found it gone from its release's schedule,
#: has not taken this entry's ticks.
_decided = operator.attrgetter(*(f.name for f in fields(EntryState)
                                 if f.name not in ("next_tick", "next_from", "next_for", "since", "orphaned_at")))


def with_next(entry: ScheduleEntry, state: EntryState, now: float) -> EntryState:
    """``state`` with its next-tick cache filled in (cron entries; intervals need none)."""
    if entry.cron is None:
        return state
    floor = _floor(state, now)
    nxt = entry.next_runs(floor, 1)
    h = int(hashlib.sha256(entry.name.encode()).hexdigest()[:8], 16)
    cap = now + CACHE_FOR * (1 + h / 2**32)
    return state.evolve(next_tick=min(nxt[0], cap) if nxt else cap, next_from=floor,
                        next_for=entry.fingerprint)


class Scheduler:
    """The schedule of one project on one connection (see the module docstring)."""

    def __init__(self, entries: Sequence[ScheduleEntry], *, settings: Settings | None = None,
                 connection: str | None = None, backend: Backend | None = None,
                 store: ScheduleStore | None = None, registry: CommandRegistry | None = None,
                 clock: Callable[[], float] = time.time, check_args: bool = True) -> None:
        from forge.config import load_settings

        self.entries = list(entries)
        self.by_name = {e.name: e for e in self.entries}
        self.settings = settings or load_settings()
        from forge.queue import observers

        observer = observers.installed()
        if observer is not None:  # a tick's events follow its push: the tables are checked first
            observer.prepare(self.settings)
        self._connection = connection
        self._backend = backend
        self._store = store
        self._registry = registry
        self.clock = clock
        #: False when the caller has checked every entry's arguments (the Typer-free
        #: ``schedule:run``): a tick's job is then stored without loading its command.
        self.check_args = check_args
        #: The entries that were declared but did not load, by name (``load`` fills it in).
        self.invalid: dict[str, ScheduleError] = {}

    @classmethod
    def load(cls, *, settings: Settings | None = None, registry: CommandRegistry | None = None,
             check_args: bool = True, **kwargs: Any) -> tuple[Scheduler, list[ScheduleError]]:
        """The project's scheduler and the errors of its invalid entries (``load_entries``)."""
        from forge.config import load_settings
        from forge.registry.runner import default_registry
        from forge.scheduler.load import load_entries

        settings = settings or load_settings()
        registry = registry or default_registry()
        entries, errors = load_entries(settings, registry, check_args=check_args)
        sch = cls(entries, settings=settings, registry=registry, **kwargs)
        sch.invalid = {e.entry: e for e in errors if e.entry not in sch.by_name}
        return sch, errors

    # -- parts ---------------------------------------------------------------------------------

    @property
    def backend(self) -> Backend:
        """The queue backend of the scheduler's connection, connected on first use."""
        if self._backend is None:
            from forge.backends import connect

            self._backend = connect(self._connection, self.settings)
        return self._backend

    @property
    def store(self) -> ScheduleStore:
        """The schedule-state store over the backend's storage (:func:`store_for`), made on first
        use."""
        if self._store is None:
            self._store = store_for(self.backend)
        return self._store

    @property
    def registry(self) -> CommandRegistry:
        """The command registry the entries' commands are checked against, loaded on first use."""
        if self._registry is None:
            from forge.registry.runner import default_registry

            self._registry = default_registry()
        return self._registry

    def entry(self, name: str) -> ScheduleEntry:
        """The entry named ``name``. Raises ConfigError, with the reason, for a declared entry
        that does not load, and ScheduleNotFound, with the closest names, for an unknown one."""
        try:
            return self.by_name[name]
        except KeyError:
            bad = self.invalid.get(name)
            if bad is not None:  # declared, but it does not load: say why, not "no such entry"
                raise ConfigError(bad.message, hint="Fix the entry first; `forge schedule:list` shows"
                                  " every entry's error.") from None
            import difflib

            close = difflib.get_close_matches(name, self.by_name, n=1)
            hint = f'Did you mean "{close[0]}"?' if close else "Run `forge schedule:list` to see the entries."
            raise ScheduleNotFound(f'No schedule entry is named "{name}".', hint=hint) from None

    def _queue_of(self, entry: ScheduleEntry) -> str:
        if entry.queue:
            return entry.queue
        spec = self.registry.get(entry.command)
        declared = spec.defaults.queue if spec is not None and spec.defaults else None
        return declared or self.settings.default_queue

    # -- running -------------------------------------------------------------------------------

    def _previous_live(self, states: dict[str, EntryState], now: float) -> dict[str, bool]:
        live = {}
        for e in self.entries:
            s = states.get(e.name)
            if e.overlap is not Overlap.SKIP or s is None or nothing_due(e, s, now):
                continue
            if s.inflight:
                live[e.name] = True
            elif s.last_job:
                info = self.backend.find(s.last_job)
                live[e.name] = info is not None and info.state in LIVE
        return live

    def plan(self, now: float | None = None) -> list[TickAction]:
        """What ``run`` would do at ``now`` given the stored state, without changing anything."""
        now = self.clock() if now is None else now
        states = self.store.read([*(e.name for e in self.entries), LAST_RUN])
        first = first_floor(states[LAST_RUN].last_tick if LAST_RUN in states else None, now)
        live = self._previous_live(states, now)
        out: list[TickAction] = []
        last_run = states[LAST_RUN].last_tick if LAST_RUN in states else None
        for e in self.entries:
            s = returning(e, states.get(e.name, EntryState()), last_run)
            p = _Plan() if nothing_due(e, s, now) else plan_entry(e, s, now, live.get(e.name, False), first)
            out += _actions(e, p, now, s.inflight)
        return out

    def run(self, now: float | None = None) -> list[TickAction]:
        """Dispatch every due tick once (see the module docstring); returns what it did."""
        now = self.clock() if now is None else now
        names = [e.name for e in self.entries]
        with self.store.session():
            before = self.store.read(names)
            live = self._previous_live(before, now)
            plans: dict[str, _Plan] = {}

            def mark(cur: dict[str, EntryState]) -> dict[str, EntryState]:
                plans.clear()
                new = {}
                last_run = cur[LAST_RUN].last_tick
                first = first_floor(last_run, now)
                for e in self.entries:
                    orig = s = cur[e.name]
                    if _decided(s) != _decided(before.get(e.name, EntryState())):
                        continue  # another run moved it meanwhile: it is that run's
                    s = returning(e, s, last_run)
                    base = s.evolve(since=first) if _unseen(s) and not s.paused else s
                    if base.orphaned_at is not None:  # back in the schedule (a revert)
                        base = base.evolve(orphaned_at=None)
                    if nothing_due(e, s, now):
                        if base is not orig:
                            new[e.name] = base
                        continue
                    p = plan_entry(e, s, now, live.get(e.name, False), first)
                    if p.last_tick is None:
                        if e.cron is not None or base is not orig:  # nothing due: keep when to look again
                            new[e.name] = with_next(e, base, now)
                        continue
                    plans[e.name] = p
                    new[e.name] = with_next(e, base.evolve(
                        last_tick=max(p.last_tick, s.last_tick or p.last_tick),
                        inflight=tuple(sorted({*s.inflight, *p.dispatch})),
                        skipped=s.skipped + len(p.skipped),
                        last_skipped=p.skipped[-1] if p.skipped else s.last_skipped,
                        missed=s.missed + p.missed,
                        last_missed=p.last_missed if p.last_missed is not None else s.last_missed), now)
                if new:  # a tick this run takes is at or before its time: no new entry takes it again
                    new[LAST_RUN] = EntryState(last_tick=now if last_run is None else max(now, last_run))
                return new

            marked = self.store.update([*names, LAST_RUN], mark) if self.entries else {}
            out: list[TickAction] = []
            for e in self.entries:
                p = plans.get(e.name)
                if p is not None:
                    if p.missed:
                        out.append(TickAction(e.name, p.last_missed or 0.0, "missed", count=p.missed))
                    out += [TickAction(e.name, t, "skipped") for t in p.skipped]
            self._events(out)
            out += self._push(marked, now)
            self._tend_orphans(now)
        return out

    def _orphans(self) -> list[str]:
        """Names with a stored state but no entry (removed or renamed; not merely invalid now)."""
        known = {*self.by_name, *self.invalid, LAST_RUN}
        return [n for n in self.store.names() if n not in known]

    def _tend_orphans(self, now: float) -> None:
        """Mark the states of entries gone from the schedule, and drop those gone for longer
        than ``ORPHAN_RETENTION`` (an entry that comes back meanwhile keeps its state)."""
        if self._registry is not None and getattr(self._registry, "broken", None):
            return  # a command file that does not import hides its entries: not removed
        gone = self._orphans()
        if not gone:
            return
        self.store.update(gone, lambda cur: {n: s.evolve(orphaned_at=now) for n, s in cur.items()
                                             if s.orphaned_at is None})
        self.store.drop(gone, lambda s: s.orphaned_at is not None and now - s.orphaned_at >= ORPHAN_RETENTION)

    def removed(self, now: float | None = None) -> list[dict[str, Any]]:
        """The stored states of entries no longer in the schedule, for ``schedule:list``."""
        now = self.clock() if now is None else now
        gone = self._orphans()
        states = self.store.read(gone)
        rows = []
        for n in sorted(gone):
            s = states.get(n, EntryState())
            rows.append({"name": n, "last_tick": iso(s.last_tick) if s.last_tick is not None else None,
                         "last_job": s.last_job, "dispatched": s.dispatched,
                         "orphaned_at": iso(s.orphaned_at) if s.orphaned_at is not None else None,
                         "drop_after": iso(s.orphaned_at + ORPHAN_RETENTION) if s.orphaned_at is not None else None})
        return rows

    def _push(self, states: dict[str, EntryState], now: float) -> list[TickAction]:
        from forge.queue.manager import CommandQueue

        by_queue: dict[str, list[tuple[ScheduleEntry, float, Any]]] = {}
        out: list[TickAction] = []
        failed: dict[str, list[float]] = {}
        for e in self.entries:
            s = states.get(e.name)
            for t in s.inflight if s else ():
                by_queue.setdefault(self._queue_of(e), []).append((e, t, e.queued_command(t)))
        pushed: dict[str, list[tuple[float, str, bool]]] = {}
        for qname, items in by_queue.items():
            queue = CommandQueue(qname, connection=self.backend, settings=self.settings, registry=self.registry,
                                 check_args=self.check_args)
            jobs, kept = [], []
            for e, t, cmd in items:
                try:
                    jobs.append(queue.jobs_for([cmd])[0])
                    kept.append((e, t))
                except ForgeError as exc:  # the command went away since: the tick cannot run
                    failed.setdefault(e.name, []).append(t)
                    out.append(TickAction(e.name, t, "error", error=exc.message))
            created = queue.store(jobs)
            for (e, t), job, new in zip(kept, jobs, created, strict=True):
                pushed.setdefault(e.name, []).append((t, job.id, new))
                out.append(TickAction(e.name, t, "dispatched" if new else "exists", job.id, now - t))
        self._events(out)  # before the commit: a run killed before it pushes the ticks (and events) again
        done = {n: [t for t, _, _ in v] for n, v in pushed.items()}
        for n, ts in failed.items():
            done.setdefault(n, []).extend(ts)
        if done:
            def commit(cur: dict[str, EntryState]) -> dict[str, EntryState]:
                new = {}
                for n, ticks in done.items():
                    s = cur[n]
                    changes: dict[str, Any] = {"inflight": tuple(t for t in s.inflight if t not in ticks)}
                    for t, job_id, created in sorted(pushed.get(n, [])):
                        if s.last_job_tick is None or t >= s.last_job_tick:
                            changes.update(last_job=job_id, last_job_tick=t)
                            if created:
                                changes["last_dispatched_at"] = now
                    changes["dispatched"] = s.dispatched + sum(1 for _, _, c in pushed.get(n, []) if c)
                    new[n] = s.evolve(**changes)
                return new

            self.store.update(list(done), commit)
        return out

    def _events(self, actions: list[TickAction]) -> None:
        """``schedule.tick_dispatched`` / ``tick_skipped`` (``forge.events``): for forge.toml's
        [[listeners]], or a worker's listeners (``queue:work --schedule``; it loaded forge.events)."""
        from forge.queue.observers import may_listen

        if actions and may_listen(self.settings):
            from forge.events.hooks import ticks

            ticks(self.settings, self.backend, actions)

    def next_due(self, now: float | None = None) -> float | None:
        """When the next tick of any entry that is not paused is due (now, if a tick waits)."""
        now = self.clock() if now is None else now
        states = self.store.read([e.name for e in self.entries])
        best: float | None = None
        for e in self.entries:
            s = states.get(e.name, EntryState())
            if s.paused:
                continue
            if s.inflight:
                return now
            nxt = e.next_runs(max(now, s.last_tick or now), 1)
            if nxt and (best is None or nxt[0] < best):
                best = nxt[0]
        return best

    # -- operating -----------------------------------------------------------------------------

    def test(self, name: str) -> JobDispatch:
        """Dispatch one run of entry ``name`` now (no idempotency key; the schedule's state is
        not changed)."""
        from dataclasses import replace

        from forge.queue.manager import CommandQueue

        e = self.entry(name)
        now = self.clock()
        cmd = replace(e.queued_command(now), idempotency_key=None, run_at=None)
        cmd = cmd.with_metadata("schedule_test", True)
        queue = CommandQueue(self._queue_of(e), connection=self.backend, settings=self.settings,
                             registry=self.registry)
        return queue.push(cmd)

    def pause(self, name: str) -> EntryState:
        """Pause the entry ``name`` (ScheduleNotFound if there is none): it stops ticking until
        resumed. Returns its new state."""
        self.entry(name)
        now = self.clock()
        return self.store.update([name], lambda cur: {name: cur[name].evolve(paused=True, paused_at=now)})[name]

    def resume(self, name: str) -> EntryState:
        """Resume ticking; ticks that fell while it was paused are not caught up."""
        e = self.entry(name)
        now = self.clock()

        def fn(cur: dict[str, EntryState]) -> dict[str, EntryState]:
            s = cur[name]
            if not s.paused:
                return {}
            latest = e.latest_at_or_before(now)
            last = max(x for x in (s.last_tick, latest, (s.paused_at or now)) if x is not None)
            return {name: s.evolve(paused=False, paused_at=None, last_tick=last)}

        return self.store.update([name], fn)[name]

    def status(self, now: float | None = None) -> list[dict[str, Any]]:
        """Per entry what ``schedule:list`` shows (times as RFC 3339 text)."""
        from forge.scheduler.entry import zone_name

        now = self.clock() if now is None else now
        states = self.store.read([e.name for e in self.entries])
        rows = []
        for e in self.entries:
            s = states.get(e.name, EntryState())
            last = None
            if s.last_job:
                info = self.backend.find(s.last_job)
                lateness = (s.last_dispatched_at - s.last_job_tick
                            if s.last_dispatched_at is not None and s.last_job_tick is not None else None)
                last = {"tick": iso(s.last_job_tick, e.timezone) if s.last_job_tick is not None else None,
                        "job_id": s.last_job, "state": str(info.state) if info else "gone",
                        "lateness": None if lateness is None else round(max(lateness, 0.0), 3)}
            rows.append({
                "name": e.name, "command": e.command, "args": list(e.args), "expression": e.expression,
                "description": e.describe(), "timezone": zone_name(e.timezone),
                "queue": self._queue_of(e), "overlap": str(e.overlap), "catch_up": str(e.catch_up),
                "max_lateness": e.max_lateness, "jitter": e.jitter,
                "next_runs": [iso(t, e.timezone) for t in e.next_runs(max(now, s.last_tick or now), 3)],
                "last": last, "last_tick": iso(s.last_tick, e.timezone) if s.last_tick is not None else None,
                "dispatched": s.dispatched, "skipped": s.skipped,
                "last_skipped": iso(s.last_skipped, e.timezone) if s.last_skipped is not None else None,
                "missed": s.missed,
                "last_missed": iso(s.last_missed, e.timezone) if s.last_missed is not None else None,
                "inflight": [iso(t, e.timezone) for t in s.inflight], "paused": s.paused,
                "source": e.source,
            })
        return rows


def _actions(e: ScheduleEntry, p: _Plan, now: float, inflight: Iterable[float]) -> list[TickAction]:
    out = [TickAction(e.name, t, "dispatch", None, now - t) for t in sorted({*inflight, *p.dispatch})]
    out += [TickAction(e.name, t, "skip") for t in p.skipped]
    if p.missed:
        out.append(TickAction(e.name, p.last_missed or 0.0, "miss", count=p.missed))
    return out


class ScheduleNotFound(ForgeError, LookupError):
    """No schedule entry has this name."""

    exit_code = EXIT_NOT_FOUND
