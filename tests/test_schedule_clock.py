"""issue 14: daylight-saving changes and catch-up after a two-hour gap, through whole
``schedule:run`` processes whose clock libfaketime fakes (file and Redis), as cron runs them."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import require_redis
from test_scheduler import Project, entry_toml
from test_scheduler_cli import env_of, fake, forge, ledger, needs_faketime, tick_jobs
from waitfor import wait_for


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


def run(p: Project, when: str) -> list[dict[str, Any]]:
    res = forge(p, "schedule:run", "--json", env=env_of(p, **fake(when)))
    assert res.returncode == 0, res.stderr
    return [json.loads(x) for x in res.stdout.splitlines()]


def of(actions: list[dict[str, Any]], entry: str, action: str) -> list[str]:
    return [a["tick"] for a in actions if a["entry"] == entry and a["action"] == action]


@needs_faketime
def test_dst_changes_and_catch_up_after_a_gap_with_a_faked_clock(proj: Project) -> None:
    proj.schedule(entry_toml("night", 'cron = "30 2 * * *"', timezone="Europe/Berlin")
                  + "".join(entry_toml(policy, 'cron = "*/15 * * * *"', timezone="UTC", catch_up=policy,
                                       max_lateness="3h") for policy in ("none", "latest", "all")))
    # Spring forward, 2026-03-29 in Berlin: 02:00 CET jumps to 03:00 CEST, 02:30 never happens.
    assert run(proj, "2026-03-29 00:59:05") == []  # 01:59 CET
    first = run(proj, "2026-03-29 01:00:05")  # 03:00 CEST
    assert of(first, "night", "dispatched") == ["2026-03-29T01:00:00Z"]  # 03:00 CEST: once, at the end of the gap
    for policy in ("none", "latest", "all"):
        assert of(first, policy, "dispatched") == ["2026-03-29T01:00:00Z"]
    # Nothing runs the scheduler for two hours; then cron's run at 03:05.
    late = run(proj, "2026-03-29 03:05:05")
    assert of(late, "night", "dispatched") == []
    assert of(late, "none", "dispatched") == [] and [a["count"] for a in late if a["entry"] == "none"] == [8]
    assert of(late, "latest", "dispatched") == ["2026-03-29T03:00:00Z"]
    assert [a["count"] for a in late if a["entry"] == "latest" and a["action"] == "missed"] == [7]
    assert of(late, "all", "dispatched") == [f"2026-03-29T{h:02d}:{m:02d}:00Z" for h, m in
                                             [(1, 15), (1, 30), (1, 45), (2, 0), (2, 15), (2, 30), (2, 45), (3, 0)]]
    assert run(proj, "2026-03-29 03:05:40") == []  # a second run in the same minute dispatches nothing

    # Fall back, 2026-10-25 in Berlin: 03:00 CEST goes back to 02:00 CET, 02:30 happens twice.
    proj.schedule(entry_toml("night", 'cron = "30 2 * * *"', timezone="Europe/Berlin"))
    assert of(run(proj, "2026-10-25 00:30:05"), "night", "dispatched") == ["2026-10-25T00:30:00Z"]  # 02:30 CEST
    assert run(proj, "2026-10-25 01:30:05") == []  # 02:30 CET, the second pass: not again
    nights = sorted(k for k in tick_jobs(proj) if k.startswith("night@"))
    assert nights == ["night@2026-03-29T01:00:00Z", "night@2026-10-25T00:30:00Z"]


@needs_faketime
def test_the_three_drivers_at_once_dispatch_each_tick_once(proj: Project) -> None:
    """schedule:work, a queue:work --schedule worker and two cron schedule:run at the same
    (faked) minute: each of 12 due ticks is one job, which the worker runs once."""
    proj.schedule("".join(entry_toml(f"e{i}", 'cron = "0 3 * * *"', timezone="UTC") for i in range(12)))
    start = env_of(proj, **fake("2026-03-01 02:59:59"))
    work = subprocess.Popen([sys.executable, "-m", "forge", "schedule:work", "--json"], env=start,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    worker = subprocess.Popen([sys.executable, "-m", "forge", "queue:work", "--schedule", "--sleep=0.2"], env=start,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        cron = [subprocess.Popen([sys.executable, "-m", "forge", "schedule:run", "--json"],
                                 env=env_of(proj, **fake("2026-03-01 03:00:01")), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for _ in range(2)]
        for c in cron:
            out, err = c.communicate(timeout=120)
            assert c.returncode == 0, err
        assert work.stdout is not None and json.loads(work.stdout.readline())["event"] == "scheduler_started"
        runs = wait_for(lambda: len(ledger(proj)) >= 12 and ledger(proj), timeout=120, what="12 jobs to run")
    finally:
        for p in (work, worker):
            p.send_signal(signal.SIGTERM)
        for p in (work, worker):
            p.wait(timeout=60)
    jobs = tick_jobs(proj)
    assert sorted(jobs) == sorted(f"e{i}@2026-03-01T03:00:00Z" for i in range(12))
    assert all(len(ids) == 1 for ids in jobs.values()), jobs
    assert sorted(r["label"] for r in runs) == sorted(f"e{i}" for i in range(12))  # each ran once
