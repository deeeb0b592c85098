"""issue 14: entries that are added, renamed and removed, on a real file queue and real Redis.

A new (or renamed) entry does not dispatch a tick from before it existed, like a new systemd
timer with ``Persistent=``: its first tick is after the previous run of the schedule (which
dispatched, under the old name, any tick at or before it) and within the on-time window. The
state of a removed entry is shown by ``schedule:list`` and dropped 7 days after a run first
found it gone."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import add_commands, require_redis
from test_scheduler import Project, dispatched, entry_toml, ts
from test_scheduler_cli import env_of, fake, forge, needs_faketime, tick_jobs

from forge.config import load_settings
from forge.registry.discovery import DiscoveryWarning, build_registry
from forge.scheduler.scheduler import Scheduler
from forge.scheduler.state import LAST_RUN, ORPHAN_RETENTION

MINUTELY = 'cron = "* * * * *"'


@pytest.fixture(params=["file", "redis"])
def proj(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Project]:
    if request.param == "redis":
        require_redis()
    p = Project(request.param, tmp_path / "p", monkeypatch)
    p.ledger = tmp_path / "ledger.jsonl"  # type: ignore[attr-defined]
    try:
        yield p
    finally:
        p.close()


def test_a_renamed_entry_does_not_dispatch_again_the_tick_its_old_name_did(proj: Project) -> None:
    proj.schedule(entry_toml("sync", MINUTELY, timezone="UTC"))
    t = ts("2026-03-01T12:01:00")
    assert dispatched(proj.scheduler().run(now=t + 5)) == [("sync", t)]
    proj.schedule(entry_toml("sync-orders", MINUTELY, timezone="UTC"))  # the deploy renames it
    assert dispatched(proj.scheduler().run(now=t + 40)) == []  # 12:01 was the old name's
    assert dispatched(proj.scheduler().run(now=t + 65)) == [("sync-orders", t + 60)]
    assert sorted(a.entry for a in proj.scheduler().plan(now=t + 125) if a.action == "dispatch") == ["sync-orders"]


def test_a_new_entry_added_just_before_its_tick_runs_it_and_never_its_past(proj: Project) -> None:
    other = entry_toml("heartbeat", MINUTELY, timezone="UTC")
    proj.schedule(other)
    t = ts("2026-03-01T03:00:00")
    proj.scheduler().run(now=t - 55)  # 02:59:05: the last run before the deploy
    proj.schedule(other + entry_toml("daily", 'cron = "0 3 * * *"', timezone="UTC"))
    got = dispatched(proj.scheduler().run(now=t + 5))
    assert ("daily", t) in got  # added at 02:59:30, after the last run: its 03:00 tick is its own
    # One added late, with catch_up = "all" and a long max_lateness, does not run its past ticks,
    proj.schedule(other + entry_toml("hourly", 'cron = "0 * * * *"', timezone="UTC", catch_up="all",
                                     max_lateness="6h"))
    noon = ts("2026-03-01T12:30:00")
    assert [a for a in proj.scheduler().run(now=noon) if a.entry == "hourly"] == []
    # but does run every tick after it was first seen, once the scheduler comes back from a gap.
    got = [a for a in proj.scheduler().run(now=ts("2026-03-01T15:00:30")) if a.entry == "hourly"]
    assert dispatched(got) == [("hourly", ts(f"2026-03-01T{h}:00:00")) for h in (13, 14, 15)]


def test_the_state_of_a_removed_entry_is_shown_then_dropped_after_a_week(proj: Project) -> None:
    keep, gone = entry_toml("keep", MINUTELY, timezone="UTC"), entry_toml("gone", 'cron = "0 3 * * *"', timezone="UTC")
    proj.schedule(keep + gone)
    t = ts("2026-03-01T03:00:00")
    assert sorted(dispatched(proj.scheduler().run(now=t + 5))) == [("gone", t), ("keep", t)]
    proj.schedule(keep + gone.replace('"0 3 * * *"', '"61 3 * * *"'))  # invalid now: not removed
    sch = proj.scheduler(errors_ok=True)
    sch.run(now=t + 65)
    assert sch.removed(now=t + 65) == [] and sch.store.read(["gone"])["gone"].orphaned_at is None

    proj.schedule(keep)  # removed
    sch = proj.scheduler()
    assert [r["name"] for r in sch.removed(now=t + 70)] == ["gone"]  # shown before any run marked it
    sch.run(now=t + 125)
    (row,) = sch.removed(now=t + 125)
    assert row["name"] == "gone" and row["last_tick"] == "2026-03-01T03:00:00Z" and row["dispatched"] == 1
    assert row["orphaned_at"] == "2026-03-01T03:02:05Z" and row["drop_after"] == "2026-03-08T03:02:05Z"

    # Back within the week (a revert): its state is as it was, its 03:00 tick not run again.
    proj.schedule(keep + gone)
    sch = proj.scheduler()
    assert dispatched(sch.run(now=t + 185)) == [("keep", t + 180)]
    assert sch.store.read(["gone"])["gone"].orphaned_at is None
    assert sch.store.read(["gone"])["gone"].last_tick == t

    proj.schedule(keep)
    proj.scheduler().run(now=t + 245)  # marked gone again at 03:04:05
    proj.scheduler().run(now=t + 245 + ORPHAN_RETENTION - 1)
    assert "gone" in proj.scheduler().store.names()
    sch = proj.scheduler()
    sch.run(now=t + 245 + ORPHAN_RETENTION)
    assert "gone" not in sch.store.names() and "keep" in sch.store.names()
    assert sch.removed() == [] and LAST_RUN in sch.store.names()


@needs_faketime
def test_rename_and_removal_through_the_commands(proj: Project) -> None:
    """Whole processes with a faked clock: cron's schedule:run before and after a deploy that
    renames an entry 30 s after its tick, then schedule:list showing the old name as removed."""
    proj.schedule(entry_toml("sync", MINUTELY, timezone="UTC"))

    def run(when: str) -> list[dict[str, Any]]:
        res = forge(proj, "schedule:run", "--json", env=env_of(proj, **fake(when)))
        assert res.returncode == 0, res.stderr
        return [json.loads(x) for x in res.stdout.splitlines()]

    assert [(a["entry"], a["action"]) for a in run("2026-03-01 12:01:02")] == [("sync", "dispatched")]
    proj.schedule(entry_toml("sync-orders", MINUTELY, timezone="UTC"))
    assert run("2026-03-01 12:01:32") == []
    assert [(a["entry"], a["tick"]) for a in run("2026-03-01 12:02:03")] == [("sync-orders", "2026-03-01T12:02:00Z")]
    assert sorted(tick_jobs(proj)) == ["sync-orders@2026-03-01T12:02:00Z", "sync@2026-03-01T12:01:00Z"]

    res = forge(proj, "schedule:list", "--json", env=env_of(proj, **fake("2026-03-01 12:02:30")))
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert [e["name"] for e in doc["entries"]] == ["sync-orders"]
    assert [(r["name"], r["last_tick"], r["drop_after"]) for r in doc["removed"]] == \
        [("sync", "2026-03-01T12:01:00Z", "2026-03-08T12:01:32Z")]
    human = forge(proj, "schedule:list", env=env_of(proj, **fake("2026-03-01 12:02:30"))).stdout
    assert "Removed from the schedule" in human
    assert "sync  last tick 2026-03-01T12:01:00Z; dropped after 2026-03-08T12:01:32Z" in human


NIGHTLY = '''from forge import command


@command("nightly:report", schedule="0 3 * * *")
def report() -> None:
    """A report each night."""
'''


def test_entries_of_a_command_file_that_does_not_import_are_not_treated_as_removed(
        proj: Project, tmp_path: Path) -> None:
    proj.schedule("")
    extra = add_commands(proj.config, tmp_path / "cmds", {"nightly.py": NIGHTLY})
    t = ts("2026-03-01T03:00:00")
    [name] = [a.entry for a in proj.scheduler().run(now=t + 5) if a.action == "dispatched"]
    (extra / "nightly.py").write_text(NIGHTLY + "\nthis is not python\n")  # a bad deploy
    for mod in [m for m, v in sys.modules.items() if str(getattr(v, "__file__", "")).startswith(str(extra))]:
        del sys.modules[mod]  # a new process's view: the file is imported again
    settings = load_settings()
    with pytest.warns(DiscoveryWarning):
        registry = build_registry(settings, strict=False)  # as the CLI loads commands
    sch, _ = Scheduler.load(settings=settings, registry=registry)
    assert registry.broken and name not in sch.by_name
    sch.run(now=t + 65)
    assert sch.store.read([name])[name].orphaned_at is None  # hidden by the broken file, not removed
