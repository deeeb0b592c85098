"""The scheduler as a library, with an injected clock, on a real file queue and real Redis:
ticks, catch-up, overlap, DST, pause, invalid entries, state (no subprocess, no waiting)."""

from __future__ import annotations

import os
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from conftest import require_redis

from forge.config import load_settings
from forge.errors import QueueUnavailable
from forge.job import Event, State, idempotent_id
from forge.registry.discovery import build_registry
from forge.scheduler.entry import ScheduleEntry, ScheduleError
from forge.scheduler.load import load_entries
from forge.scheduler.scheduler import Scheduler
from forge.scheduler.state import EntryState

SCHED_COMMANDS = Path(__file__).resolve().parent / "schedproject"
REDIS_URL = os.environ.get("FORGE_TEST_REDIS_URL")
BERLIN = ZoneInfo("Europe/Berlin")


def ts(text: str, tz: Any = UTC) -> float:
    dt = datetime.fromisoformat(text)
    return (dt if dt.tzinfo else dt.replace(tzinfo=tz)).timestamp()


def write_project(root: Path, kind: str, schedule: str = "", prefix: str = "") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    config = root / "forge.toml"
    config.write_text(
        f'[forge]\ncommands = ["{SCHED_COMMANDS}"]\n'
        f'[queue]\nconnection = "{kind}"\ndone_retention = "1h"\n'
        f'[connections.file]\npath = "{root / "queue"}"\n'
        f'[connections.redis]\nurl = "{REDIS_URL or "redis://127.0.0.1:6379/0"}"\nprefix = "{prefix}"\n'
        + schedule)
    return config


class Project:
    """A scheduler project on one backend; ``scheduler()`` loads it afresh (a new process's view)."""

    def __init__(self, kind: str, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.kind, self.root = kind, root
        self.prefix = f"forge-sched-{uuid.uuid4().hex[:8]}"
        self.monkeypatch = monkeypatch
        monkeypatch.delenv("FORGE_QUEUE_DIR", raising=False)
        self.schedule("")

    def schedule(self, toml: str) -> None:
        self.config = write_project(self.root, self.kind, toml, self.prefix)
        self.monkeypatch.setenv("FORGE_CONFIG", str(self.config))
        import forge.queue.manager
        import forge.registry.runner

        forge.registry.runner._default_registry = None
        forge.queue.manager._backends.clear()

    def scheduler(self, *, errors_ok: bool = False) -> Scheduler:
        settings = load_settings()
        sch, errors = Scheduler.load(settings=settings, registry=build_registry(settings))
        assert errors_ok or not errors, errors
        return sch

    def jobs(self, sch: Scheduler) -> list[Any]:
        return list(sch.backend.jobs())

    def close(self) -> None:
        import forge.queue.manager

        for b in forge.queue.manager._backends.values():
            b.close()
        forge.queue.manager._backends.clear()
        if self.kind == "redis":
            import redis

            client = redis.Redis.from_url(REDIS_URL or "")
            keys = list(client.scan_iter(match=f"{self.prefix}:*", count=1000))
            if keys:
                client.delete(*keys)
            client.close()


@pytest.fixture(params=["file", "redis"])
def proj(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    if request.param == "redis":
        require_redis()
    p = Project(request.param, tmp_path / "p", monkeypatch)
    try:
        yield p
    finally:
        p.close()


def entry_toml(name: str, when: str, **kw: Any) -> str:
    lines = ["[[schedule]]", f'name = "{name}"', 'command = "sched:record"', f'args = ["{name}"]', when]
    lines += [f"{k} = {v!r}".replace("'", '"') for k, v in kw.items()]
    return "\n".join(lines) + "\n"


def dispatched(actions: list[Any]) -> list[tuple[str, float]]:
    return [(a.entry, a.tick) for a in actions if a.action == "dispatched"]


# -- ticks ------------------------------------------------------------------------------------


def test_a_due_tick_is_dispatched_once_with_its_time_and_never_again(proj: Project) -> None:
    proj.schedule(entry_toml("daily", 'cron = "0 3 * * *"', timezone="UTC"))
    t = ts("2026-03-01T03:00:00")
    first = proj.scheduler().run(now=t + 5)
    assert dispatched(first) == [("daily", t)]
    job_id = first[0].job_id
    assert job_id == idempotent_id("schedule:daily:2026-03-01T03:00:00Z")
    for later in (t + 6, t + 50, t + 3600):  # the same minute again, and later that day
        assert dispatched(proj.scheduler().run(now=later)) == []
    sch = proj.scheduler()
    [info] = proj.jobs(sch)
    assert info.id == job_id and info.job.metadata["scheduled_for"] == "2026-03-01T03:00:00Z"
    assert info.job.metadata["schedule"] == "daily" and info.job.args == ("daily",)
    state = sch.store.read(["daily"])["daily"]
    assert state.last_tick == t and state.last_job == job_id and not state.inflight
    assert dispatched(sch.run(now=t + 86400 + 1)) == [("daily", t + 86400)]


def test_a_tick_whose_job_is_gone_is_not_dispatched_again(proj: Project) -> None:
    """The state, not only the key, guards a tick: once its job is deleted (the key free), a
    run at the same time dispatches nothing."""
    proj.schedule(entry_toml("daily", 'cron = "0 3 * * *"', timezone="UTC"))
    t = ts("2026-03-01T03:00:00")
    sch = proj.scheduler()
    [a] = sch.run(now=t + 1)
    assert sch.backend.clear("default") == 1 and sch.backend.find(a.job_id) is None
    assert dispatched(proj.scheduler().run(now=t + 2)) == []


def test_a_new_entry_does_not_dispatch_its_past(proj: Project) -> None:
    proj.schedule(entry_toml("hourly", 'cron = "0 * * * *"', timezone="UTC", catch_up="all", max_lateness="1d"))
    assert dispatched(proj.scheduler().run(now=ts("2026-03-01T03:30:00"))) == []


def test_jobs_options_and_jitter(proj: Project) -> None:
    proj.schedule(entry_toml("opts", 'every = "5m"', queue="reports", tries=3, timeout="10m", backoff=[1, 5],
                             jitter="2m") + '[schedule.meta]\nsource = "cron"\n')
    import time

    t = (time.time() // 300 + 2) * 300  # ahead of the real clock, which a job's due time cannot precede
    [a] = proj.scheduler().run(now=t + 1)
    info = proj.scheduler().backend.find(a.job_id)
    assert info is not None and info.job.queue == "reports"
    assert (info.job.max_attempts, info.job.timeout, info.job.backoff) == (3, 600.0, (1.0, 5.0))
    assert info.job.metadata["source"] == "cron"
    assert t <= info.job.available_at <= t + 120  # jitter: a delay up to 2m, the same on every host
    assert info.job.available_at == pytest.approx(t + proj.scheduler().entry("opts").jitter_for(t))


# -- catch-up ---------------------------------------------------------------------------------


@pytest.mark.parametrize("policy, lateness, expect_dispatched, expect_missed", [
    ("none", "1h", 0, 8),
    ("latest", "1h", 1, 7),
    ("all", "1h", 4, 4),
    ("all", "3h", 8, 0),
    ("latest", "1m", 0, 8),  # the latest tick is 5 minutes old: past max_lateness
])
def test_catch_up_after_a_two_hour_gap(proj: Project, policy: str, lateness: str, expect_dispatched: int,
                                       expect_missed: int) -> None:
    """Every 15 minutes; the scheduler ran at 01:00, then nothing until 03:05 (8 ticks missed)."""
    proj.schedule(entry_toml("q", 'cron = "*/15 * * * *"', timezone="UTC", catch_up=policy, max_lateness=lateness))
    t0 = ts("2026-03-01T01:00:00")
    assert dispatched(proj.scheduler().run(now=t0 + 1)) == [("q", t0)]
    actions = proj.scheduler().run(now=t0 + 2 * 3600 + 300)
    got = dispatched(actions)
    assert len(got) == expect_dispatched
    assert [t for _, t in got] == sorted(t for _, t in got)
    if got:
        assert got[-1][1] == t0 + 2 * 3600  # the latest tick is among them
    missed = sum(a.count for a in actions if a.action == "missed")
    assert missed == expect_missed
    sch = proj.scheduler()
    jobs = {i.job.metadata["scheduled_for"] for i in proj.jobs(sch)}
    assert len(jobs) == expect_dispatched + 1  # each job knows which window it is for
    state = sch.store.read(["q"])["q"]
    assert state.missed == expect_missed and state.last_tick == t0 + 2 * 3600
    assert dispatched(sch.run(now=t0 + 2 * 3600 + 301)) == []


# -- overlap ----------------------------------------------------------------------------------


def test_overlap_skip_waits_for_the_previous_ticks_job(proj: Project) -> None:
    proj.schedule(entry_toml("slow", 'cron = "* * * * *"', timezone="UTC", overlap="skip")
                  + entry_toml("free", 'cron = "* * * * *"', timezone="UTC"))
    t = ts("2026-03-01T03:00:00")
    sch = proj.scheduler()
    assert sorted(dispatched(sch.run(now=t + 1))) == [("free", t), ("slow", t)]
    b = sch.backend
    claims = [b.claim(["default"], "w", 60) for _ in range(2)]
    slow = next(c for c in claims if c and c.job.metadata["schedule"] == "slow")
    free = next(c for c in claims if c and c.job.metadata["schedule"] == "free")
    b.ack(free, Event("done", free.attempt, t + 2))
    actions = proj.scheduler().run(now=t + 61)  # slow's job is running: its tick is skipped
    assert dispatched(actions) == [("free", t + 60)]
    assert [(a.entry, a.tick) for a in actions if a.action == "skipped"] == [("slow", t + 60)]
    b.ack(slow, Event("done", slow.attempt, t + 100))
    assert sorted(dispatched(proj.scheduler().run(now=t + 121))) == [("free", t + 120), ("slow", t + 120)]
    state = proj.scheduler().store.read(["slow"])["slow"]
    assert state.skipped == 1 and state.last_skipped == t + 60


# -- time zones -------------------------------------------------------------------------------


def run_every_minute(proj: Project, start: float, end: float) -> list[float]:
    ticks = []
    for now in range(int(start), int(end), 60):
        ticks += [t for _, t in dispatched(proj.scheduler().run(now=now + 1))]
    return ticks


def test_spring_forward_a_0230_job_runs_once_at_0300(proj: Project) -> None:
    """Europe/Berlin, 2026-03-29: 02:00 CET jumps to 03:00 CEST; 02:30 does not exist."""
    proj.schedule(entry_toml("night", 'cron = "30 2 * * *"', timezone="Europe/Berlin"))
    ticks = run_every_minute(proj, ts("2026-03-29T00:00:00", BERLIN), ts("2026-03-29T05:00:00", BERLIN))
    assert [datetime.fromtimestamp(t, BERLIN).isoformat() for t in ticks] == ["2026-03-29T03:00:00+02:00"]


def test_fall_back_a_0230_job_runs_once(proj: Project) -> None:
    """Europe/Berlin, 2026-10-25: 03:00 CEST goes back to 02:00 CET; 02:30 happens twice."""
    proj.schedule(entry_toml("night", 'cron = "30 2 * * *"', timezone="Europe/Berlin")
                  + entry_toml("half", 'cron = "*/30 * * * *"', timezone="Europe/Berlin"))
    start, end = ts("2026-10-24T23:50:00+00:00"), ts("2026-10-25T02:10:00+00:00")
    sch_ticks: dict[str, list[str]] = {"night": [], "half": []}
    for now in range(int(start), int(end), 60):
        for name, t in dispatched(proj.scheduler().run(now=now + 1)):
            sch_ticks[name].append(datetime.fromtimestamp(t, BERLIN).isoformat())
    assert sch_ticks["night"] == ["2026-10-25T02:30:00+02:00"]
    # An interval keeps to real time: both passes of the repeated hour, each instant once.
    assert sch_ticks["half"] == ["2026-10-25T02:00:00+02:00", "2026-10-25T02:30:00+02:00",
                                 "2026-10-25T02:00:00+01:00", "2026-10-25T02:30:00+01:00",
                                 "2026-10-25T03:00:00+01:00"]


def test_next_runs_across_a_dst_change() -> None:
    e = ScheduleEntry.create("n", "sched:record", cron="30 2 * * *", timezone="Europe/Berlin")
    runs = e.next_runs(ts("2026-03-28T12:00:00", BERLIN), 3)
    assert [datetime.fromtimestamp(t, BERLIN).isoformat() for t in runs] == [
        "2026-03-29T03:00:00+02:00", "2026-03-30T02:30:00+02:00", "2026-03-31T02:30:00+02:00"]
    assert e.latest_at_or_before(ts("2026-03-29T12:00:00", BERLIN)) == ts("2026-03-29T03:00:00", BERLIN)


# -- pause, test, invalid entries, state ------------------------------------------------------


def test_pause_and_resume_do_not_catch_up_the_pause(proj: Project) -> None:
    proj.schedule(entry_toml("m", 'cron = "* * * * *"', timezone="UTC", catch_up="all", max_lateness="1d"))
    t = ts("2026-03-01T03:00:00")
    sch = proj.scheduler()
    sch.clock = lambda: t + 1
    assert dispatched(sch.run()) == [("m", t)]
    sch.pause("m")
    assert dispatched(proj.scheduler().run(now=t + 301)) == []
    assert proj.scheduler().store.read(["m"])["m"].paused
    sch = proj.scheduler()
    sch.clock = lambda: t + 601
    sch.resume("m")
    assert dispatched(sch.run(now=t + 601)) == []
    assert dispatched(proj.scheduler().run(now=t + 661)) == [("m", t + 660)]


def test_schedule_test_dispatches_now_without_changing_the_schedule(proj: Project) -> None:
    proj.schedule(entry_toml("daily", 'cron = "0 3 * * *"', timezone="UTC"))
    sch = proj.scheduler()
    rec = sch.test("daily")
    info = sch.backend.find(rec.id)
    assert info is not None and info.state == State.PENDING and info.job.args == ("daily",)
    assert sch.store.read(["daily"]) == {}


def test_an_invalid_entry_is_an_error_naming_it_and_the_others_load(project: Path, monkeypatch: pytest.MonkeyPatch,
                                                                      tmp_path: Path) -> None:
    config = write_project(tmp_path / "inv", "file", "".join([
        entry_toml("good", 'cron = "0 3 * * *"'),
        entry_toml("badcron", 'cron = "61 * * * *"'),
        entry_toml("badzone", 'cron = "0 3 * * *"', timezone="Mars/Olympus"),
        entry_toml("badpolicy", 'cron = "0 3 * * *"', overlap="sometimes"),
        entry_toml("badcatch", 'every = "5m"', catch_up="most"),
        entry_toml("both", 'cron = "0 3 * * *"\nevery = "5m"'),
        entry_toml("good", 'every = "10m"'),
        '[[schedule]]\nname = "nocmd"\ncommand = "sched:nothing"\ncron = "0 3 * * *"\n',
        '[[schedule]]\nname = "badargs"\ncommand = "sched:record"\nargs = ["--nope"]\ncron = "0 3 * * *"\n',
        entry_toml("good2", 'every = "1h"'),
    ]))
    monkeypatch.setenv("FORGE_CONFIG", str(config))
    settings = load_settings()
    entries, errors = load_entries(settings, build_registry(settings))
    assert [e.name for e in entries] == ["good", "good2"]
    by = {e.entry: e.message for e in errors}
    assert set(by) == {"badcron", "badzone", "badpolicy", "badcatch", "both", "good", "nocmd", "badargs"}
    assert "Bad minute" in by["badcron"] and "Mars/Olympus" in by["badzone"]
    assert '"allow" or "skip"' in by["badpolicy"] and '"none", "latest" or "all"' in by["badcatch"]
    assert "used twice" in by["good"] and "sched:nothing" in by["nocmd"]
    assert all(m.startswith(f'Schedule "{n}"') for n, m in by.items())
    assert all(isinstance(e, ScheduleError) and e.exit_code == 2 for e in errors)


def test_entries_from_the_command_decorator(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cmds = tmp_path / "deco" / "commands"
    cmds.mkdir(parents=True)
    (cmds / "rep.py").write_text(
        "from forge import command\n\n"
        "@command('report:daily', schedule='0 3 * * *')\n"
        "def daily() -> None:\n    '''Daily.'''\n\n"
        "@command('report:often', schedule=[{'every': '5m', 'overlap': 'skip'},"
        " {'name': 'often-night', 'cron': '0 1 * * *', 'timezone': 'Europe/Berlin'}])\n"
        "def often() -> None:\n    '''Often.'''\n")
    (tmp_path / "deco" / "forge.toml").write_text('[forge]\ncommands = ["commands"]\n')
    monkeypatch.setenv("FORGE_CONFIG", str(tmp_path / "deco" / "forge.toml"))
    settings = load_settings()
    entries, errors = load_entries(settings, build_registry(settings))
    assert not errors
    got = {e.name: (e.command, e.expression, str(e.overlap)) for e in entries}
    assert got == {"report:daily": ("report:daily", "0 3 * * *", "allow"),
                   "report:often": ("report:often", "every 5m", "skip"),
                   "often-night": ("report:often", "0 1 * * *", "allow")}


def test_state_round_trips_and_tolerates_garbage() -> None:
    s = EntryState(last_tick=1.0, last_job="x", inflight=(2.0, 3.0), skipped=4, paused=True)
    assert EntryState.from_dict(s.to_dict()) == s
    assert EntryState.from_dict({"last_tick": "yesterday", "inflight": [1, "x", True], "skipped": "1"}) == \
        EntryState(inflight=(1.0,))
    assert EntryState.from_dict([1, 2]) == EntryState()


def test_a_planted_state_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = Project("file", tmp_path / "p", monkeypatch)
    try:
        p.schedule(entry_toml("daily", 'cron = "0 3 * * *"', timezone="UTC"))
        sch = p.scheduler()
        sch.run(now=ts("2026-03-01T03:00:01"))
        state = p.root / "queue" / "schedule" / "state.json"
        assert state.is_file() and state.stat().st_mode & 0o777 == 0o600
        state.rename(state.with_suffix(".real"))
        state.symlink_to(state.with_suffix(".real"))
        with pytest.raises(QueueUnavailable, match="Cannot read schedule state|Cannot trust"):
            p.scheduler().run(now=ts("2026-03-02T03:00:01"))
    finally:
        p.close()


# -- the next-tick cache ----------------------------------------------------------------------


def test_the_next_tick_cache_is_kept_and_a_changed_expression_or_zone_ignores_it(proj: Project) -> None:
    """A run stores each cron entry's next tick; a later run trusts it only for the same
    expression and zone, so editing an entry never hides a tick that is now due."""
    proj.schedule(entry_toml("e", 'cron = "0 3 * * *"', timezone="UTC"))
    t = ts("2026-03-01T02:00:00")
    assert proj.scheduler().run(now=t) == []
    s = proj.scheduler().store.read(["e"])["e"]
    assert s.next_tick == ts("2026-03-01T03:00:00") and s.next_for == "0 3 * * *|UTC" and s.last_tick is None
    proj.schedule(entry_toml("e", 'cron = "30 2 * * *"', timezone="UTC"))  # now due at 02:30
    assert dispatched(proj.scheduler().run(now=t + 1830)) == [("e", ts("2026-03-01T02:30:00"))]
    proj.schedule(entry_toml("e", 'cron = "30 2 * * *"', timezone="Europe/Berlin"))  # 01:30 UTC
    assert proj.scheduler().store.read(["e"])["e"].next_for == "30 2 * * *|UTC"
    assert dispatched(proj.scheduler().run(now=ts("2026-03-02T01:30:30"))) == [("e", ts("2026-03-02T01:30:00"))]


def test_a_run_with_the_cache_decides_as_a_run_without_it(proj: Project) -> None:
    """The cache only saves work: over a day of runs every 7 minutes (some late, some early),
    dropping it before each run gives the same ticks."""
    from dataclasses import replace

    toml = "".join(entry_toml(f"e{i}", f'cron = "{c}"', timezone=z, catch_up=cu)
                   for i, (c, z, cu) in enumerate([("*/5 * * * *", "UTC", "none"), ("0 3 * * *", "Europe/Berlin", "all"),
                                                   ("17 */2 * * *", "UTC", "latest"), ("30 2 * * *", "Europe/Berlin", "none")]))
    proj.schedule(toml)
    from forge.scheduler.state import MemoryScheduleStore

    with_cache, without = MemoryScheduleStore(), MemoryScheduleStore()
    entries = proj.scheduler().entries
    start = ts("2026-03-28T20:00:00")  # across the spring-forward night in Berlin
    got: dict[str, list[Any]] = {"with": [], "without": []}
    for k in range(0, 2 * 24 * 60, 7):
        now = start + 60 * k + (k % 5) * 11
        for label, store in (("with", with_cache), ("without", without)):
            if label == "without":
                store.states = {n: replace(s, next_tick=None, next_from=None, next_for=None) for n, s in store.states.items()}
            sch = Scheduler(entries, settings=load_settings(), store=store, registry=build_registry(load_settings()),
                            backend=proj.scheduler().backend)
            got[label] += [(a.entry, a.tick, a.action) for a in sch.plan(now)]
            # the run's mark step, without pushing
            store.update([e.name for e in entries], lambda cur, sch=sch, now=now: _marked(sch, cur, now))
    assert got["with"] == got["without"] and len(got["with"]) > 500


def _marked(sch: Scheduler, cur: dict[str, EntryState], now: float) -> dict[str, EntryState]:
    from forge.scheduler.scheduler import nothing_due, plan_entry, with_next

    out = {}
    for e in sch.entries:
        s = cur[e.name]
        if nothing_due(e, s, now):
            continue
        p = plan_entry(e, s, now, False)
        if p.last_tick is None:
            out[e.name] = with_next(e, s, now)
            continue
        out[e.name] = with_next(e, s.evolve(last_tick=max(p.last_tick, s.last_tick or p.last_tick)), now)
    return out


def test_stored_times_out_of_range_read_as_absent_and_do_not_stop_a_run(proj: Project) -> None:
    """A damaged state (1e300, a negative time, NaN) is malformed, not a crash of every run."""
    assert EntryState.from_dict({"last_tick": 1e300, "inflight": [1e300, -5, float("nan"), 60.0],
                                 "next_tick": float("inf"), "paused_at": -1}) == EntryState(inflight=(60.0,))
    proj.schedule(entry_toml("often", 'cron = "* * * * *"', timezone="UTC"))
    sch = proj.scheduler()
    sch.store.update(["often"], lambda cur: {"often": EntryState()})
    if proj.kind == "file":
        path = Path(sch.store.path) / "state.json"  # type: ignore[attr-defined]
        path.write_text('{"v": 1, "entries": {"often": {"last_tick": 1e300, "inflight": [1e18, -5]}}}')
    else:
        sch.store._r.hset(sch.store.key, "often", '{"last_tick": 1e300, "inflight": [1e18, -5]}')  # type: ignore[attr-defined]
    t = ts("2026-03-01T03:00:00")
    assert dispatched(proj.scheduler().run(now=t + 5)) == [("often", t)]


def test_pausing_an_invalid_entry_names_its_error(project: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from forge.errors import ConfigError
    from forge.scheduler.scheduler import ScheduleNotFound

    config = write_project(tmp_path / "inv", "file", entry_toml("good", 'cron = "0 3 * * *"')
                           + entry_toml("broken", 'cron = "0 25 * * *"'))
    monkeypatch.setenv("FORGE_CONFIG", str(config))
    settings = load_settings()
    sch, errors = Scheduler.load(settings=settings, registry=build_registry(settings))
    assert [e.entry for e in errors] == ["broken"]
    with pytest.raises(ConfigError, match=r'Schedule "broken" .*Bad hour') as exc:
        sch.pause("broken")
    assert exc.value.exit_code == 2 and "schedule:list" in (exc.value.hint or "")
    with pytest.raises(ScheduleNotFound, match='No schedule entry is named "goo"') as nf:
        sch.pause("goo")
    assert nf.value.exit_code == 5 and 'Did you mean "good"?' in (nf.value.hint or "")


def test_a_run_that_only_refreshed_the_cache_does_not_take_a_due_tick(proj: Project) -> None:
    """Two hosts a moment apart: run A (02:59:59, nothing due) writes the entry's next-tick
    cache after run B (03:00:00.5) read the state; B must still dispatch 03:00, not leave it
    to A (which did not dispatch it) and so a minute late."""
    from forge.scheduler.state import MemoryScheduleStore

    proj.schedule(entry_toml("daily", 'cron = "0 3 * * *"', timezone="UTC"))
    shared = MemoryScheduleStore()
    t = ts("2026-03-01T03:00:00")

    class ReadBeforeA(MemoryScheduleStore):
        def read(self, names: Any = None) -> dict[str, EntryState]:
            got = shared.read(names)
            Scheduler(entries, settings=settings, store=shared, backend=backend).run(now=t - 1)  # A
            return got

        def update(self, names: Any, fn: Any) -> dict[str, EntryState]:
            return shared.update(names, fn)

    base = proj.scheduler()
    entries, settings, backend = base.entries, base.settings, base.backend
    b = Scheduler(entries, settings=settings, store=ReadBeforeA(), backend=backend, registry=base.registry)
    assert dispatched(b.run(now=t + 0.5)) == [("daily", t)]
    assert t < (shared.states["daily"].next_tick or 0) <= t + 86400
