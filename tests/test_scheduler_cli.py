"""The scheduler's commands as real processes on a real file queue and real Redis, with the
clock faked for whole processes by libfaketime where a time matters: concurrent schedule:run,
schedule:run killed at each step, overlap = skip with a slow job, schedule:work, list, errors."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import require_redis
from test_scheduler import Project, entry_toml, ts
from waitfor import wait_for

from forge.job import State

LIBFAKETIME = next((p for p in ("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
                                "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
                                "/usr/lib/faketime/libfaketime.so.1") if os.path.exists(p)), None)
needs_faketime = pytest.mark.skipif(LIBFAKETIME is None, reason="libfaketime is not installed (apt-get install faketime)")
STRACE = shutil.which("strace")


def _drop_dead_faketime_shm() -> None:
    """libfaketime makes a shared-memory object per process, named by its pid, and removes it at
    exit: a SIGKILLed process (these tests kill schedule:run on purpose) leaves it behind, and a
    later process given the same pid then fails to start ("shm_open failed: File exists").
    Remove the objects of processes that are gone."""
    for path in Path("/dev/shm").glob("*faketime_s*_*"):
        pid = path.name.rsplit("_", 1)[-1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            path.unlink(missing_ok=True)


def fake(when: str) -> dict[str, str]:
    """The environment that starts a process's clock at ``when`` (UTC) and lets it run on."""
    assert LIBFAKETIME
    _drop_dead_faketime_shm()
    return {"LD_PRELOAD": LIBFAKETIME, "FAKETIME": f"@{when}", "FAKETIME_DONT_RESET": "1", "TZ": "UTC"}


@pytest.fixture(params=["file", "redis"])
def proj(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    if request.param == "redis":
        require_redis()
    p = Project(request.param, tmp_path / "p", monkeypatch)
    p.ledger = tmp_path / "ledger.jsonl"  # type: ignore[attr-defined]
    try:
        yield p
    finally:
        p.close()


def env_of(p: Project, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORGE_")}
    env.update(FORGE_CONFIG=str(p.config), FORGE_NO_PLUGINS="1", SCHED_LEDGER=str(p.ledger),  # type: ignore[attr-defined]
               PYTHONDONTWRITEBYTECODE="1", XDG_CACHE_HOME=str(p.root / "cache"), **extra)
    return env


def forge(p: Project, *args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "forge", *args], capture_output=True, text=True,
                          env=env or env_of(p), timeout=timeout)


def tick_jobs(p: Project) -> dict[str, list[str]]:
    """scheduled_for -> job ids, over every stored job (any state)."""
    sch = p.scheduler()
    out: dict[str, list[str]] = {}
    for info in sch.backend.jobs():
        out.setdefault(f'{info.job.metadata.get("schedule")}@{info.job.metadata.get("scheduled_for")}', []).append(info.id)
    return out


@needs_faketime
def test_concurrent_schedule_runs_dispatch_each_due_tick_once(proj: Project) -> None:
    """Four schedule:run processes at once (as cron on four hosts), 40 entries due: 40 jobs."""
    proj.schedule("".join(entry_toml(f"e{i}", 'cron = "0 3 * * *"', timezone="UTC") for i in range(40)))
    env = env_of(proj, **fake("2026-03-01 03:00:05"))
    procs = [subprocess.Popen([sys.executable, "-m", "forge", "schedule:run", "--json"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outs = [pr.communicate(timeout=120) for pr in procs]
    assert all(pr.returncode == 0 for pr in procs), [o[1] for o in outs]
    lines = [json.loads(x) for o, _ in outs for x in o.splitlines()]
    created = [x for x in lines if x["action"] == "dispatched"]
    assert len(created) == 40 and len({x["entry"] for x in created}) == 40
    jobs = tick_jobs(proj)
    assert sorted(jobs) == sorted(f"e{i}@2026-03-01T03:00:00Z" for i in range(40))
    assert all(len(v) == 1 for v in jobs.values())
    again = forge(proj, "schedule:run", "--json", env=env_of(proj, **fake("2026-03-01 03:00:40")))
    assert again.returncode == 0 and again.stdout == ""
    print(f"\nFIGURES scenario=concurrent-schedule-run backend={proj.kind} processes=4 due=40 jobs={len(jobs)}",
          file=sys.stderr)


def trace_steps(argv: list[str], env: dict[str, str], keep: Any, out: Path) -> list[tuple[str, int, str]]:
    syscalls = "write,sendto,fsync,fdatasync,syncfs,link,linkat,rename,renameat,renameat2,unlink,unlinkat,flock"
    envs = [a for k, v in env.items() if k in ("LD_PRELOAD", "FAKETIME", "FAKETIME_DONT_RESET")
            for a in ("-E", f"{k}={v}")]
    base = {k: v for k, v in env.items() if k not in ("LD_PRELOAD", "FAKETIME", "FAKETIME_DONT_RESET")}
    subprocess.run([STRACE or "strace", "-qq", "-yy", *envs, "-e", f"trace={syscalls}", "-o", str(out), *argv],
                   env=base, capture_output=True, timeout=60, check=True)
    counts: dict[str, int] = {}
    steps = []
    for line in out.read_text().splitlines():
        m = re.match(r"(\w+)\(", line)
        if not m:
            continue
        counts[m.group(1)] = counts.get(m.group(1), 0) + 1
        if keep(line):
            steps.append((m.group(1), counts[m.group(1)], line[:120]))
    return steps


def inject(fault: str, argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    envs = [a for k, v in env.items() if k in ("LD_PRELOAD", "FAKETIME", "FAKETIME_DONT_RESET")
            for a in ("-E", f"{k}={v}")]
    base = {k: v for k, v in env.items() if k not in ("LD_PRELOAD", "FAKETIME", "FAKETIME_DONT_RESET")}
    return subprocess.run([STRACE or "strace", "-qq", "-o", "/dev/null", *envs, "-e", f"inject={fault}", *argv],
                          env=base, capture_output=True, text=True, timeout=60)


@needs_faketime
@pytest.mark.skipif(STRACE is None, reason="strace is not installed (apt-get install strace)")
def test_a_schedule_run_killed_at_each_step_neither_loses_nor_doubles_the_tick(proj: Project, tmp_path: Path) -> None:
    """SIGKILL schedule:run on entry to each write, sync, rename, link, unlink or lock it makes in
    the store (the queue directory, or the Redis socket), then let cron's next run come a minute
    later (catch_up = "none"): the tick has exactly one job, and later runs add none."""
    toml = entry_toml("daily", 'cron = "0 3 * * *"', timezone="UTC")
    proj.schedule(toml)
    argv = [sys.executable, "-m", "forge", "schedule:run"]
    marker = str(proj.root / "queue") if proj.kind == "file" else ":6379]"
    steps = trace_steps(argv, env_of(proj, **fake("2026-03-01 03:00:30")), lambda line: marker in line,
                        tmp_path / "trace")
    assert len(steps) >= 3, steps
    proj.close()
    for i, (name, n, line) in enumerate(steps):
        p = Project(proj.kind, tmp_path / f"k{i}", proj.monkeypatch)
        p.ledger = proj.ledger  # type: ignore[attr-defined]
        try:
            p.schedule(toml)
            killed = inject(f"{name}:signal=KILL:when={n}", argv, env_of(p, **fake("2026-03-01 03:00:30")))
            assert killed.returncode == -signal.SIGKILL, (line, killed.returncode, killed.stderr)
            nxt = forge(p, "schedule:run", env=env_of(p, **fake("2026-03-01 03:01:05")))
            assert nxt.returncode == 0, (line, nxt.stderr)
            later = forge(p, "schedule:run", env=env_of(p, **fake("2026-03-01 03:05:00")))
            assert later.returncode == 0, (line, later.stderr)
            jobs = tick_jobs(p)
            assert jobs == {"daily@2026-03-01T03:00:00Z": jobs.get("daily@2026-03-01T03:00:00Z")} and \
                len(jobs["daily@2026-03-01T03:00:00Z"]) == 1, (line, jobs)
            state = p.scheduler().store.read(["daily"])["daily"]
            assert state.last_tick == ts("2026-03-01T03:00:00") and not state.inflight, (line, state)
        finally:
            p.close()
    print(f"\nFIGURES scenario=schedule-run-killed backend={proj.kind} steps={len(steps)} lost=0 doubled=0",
          file=sys.stderr)


@needs_faketime
def test_a_tick_marked_by_a_killed_run_is_dispatched_by_a_much_later_run(proj: Project) -> None:
    """A run killed after it marked its tick: even past the on-time window the next run pushes it."""
    proj.schedule(entry_toml("daily", 'cron = "0 3 * * *"', timezone="UTC"))
    sch = proj.scheduler()
    t = ts("2026-03-01T03:00:00")
    sch.store.update(["daily"], lambda cur: {"daily": cur["daily"].evolve(last_tick=t, inflight=(t,))})
    res = forge(proj, "schedule:run", env=env_of(proj, **fake("2026-03-01 04:30:00")))
    assert res.returncode == 0 and "dispatched" in res.stdout, res
    assert list(tick_jobs(proj)) == ["daily@2026-03-01T03:00:00Z"]


def ledger(p: Project) -> list[dict[str, Any]]:
    path: Path = p.ledger  # type: ignore[attr-defined]
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


@needs_faketime
def test_overlap_skip_with_a_slow_job_and_forge_scheduled_for(proj: Project, tmp_path: Path) -> None:
    hold = tmp_path / "release"
    proj.schedule("[[schedule]]\nname = \"slow\"\ncommand = \"sched:record\"\n"
                  f'args = ["slow", "--hold={hold}"]\ncron = "* * * * *"\ntimezone = "UTC"\noverlap = "skip"\n')
    assert forge(proj, "schedule:run", env=env_of(proj, **fake("2026-03-01 03:00:02"))).returncode == 0
    worker = subprocess.Popen([sys.executable, "-m", "forge", "queue:work", "--sleep=0.2"], env=env_of(proj),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        [run] = wait_for(lambda: ledger(proj), what="the first tick's job to start")
        assert run["scheduled_for"] == "2026-03-01T03:00:00Z"  # FORGE_SCHEDULED_FOR
        skipped = forge(proj, "schedule:run", env=env_of(proj, **fake("2026-03-01 03:01:02")))
        assert skipped.returncode == 0 and "skipped" in skipped.stdout, skipped
        hold.touch()
        sch = proj.scheduler()
        wait_for(lambda: (i := sch.backend.find(run["job"])) is not None and i.state == State.DONE, what="done")
        third = forge(proj, "schedule:run", env=env_of(proj, **fake("2026-03-01 03:02:02")))
        assert "dispatched" in third.stdout, third
        runs = wait_for(lambda: ledger(proj) if len(ledger(proj)) == 2 else None, what="the third tick's job")
        assert [r["scheduled_for"] for r in runs] == ["2026-03-01T03:00:00Z", "2026-03-01T03:02:00Z"]
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=30)
    listing = json.loads(forge(proj, "schedule:list", "--json", env=env_of(proj, **fake("2026-03-01 03:02:30"))).stdout)
    [e] = listing["entries"]
    assert e["skipped"] == 1 and e["last_skipped"] == "2026-03-01T03:01:00Z" and e["last"]["state"] == "done"


def test_schedule_list_human_and_json_and_an_invalid_entry(proj: Project) -> None:
    proj.schedule(entry_toml("daily", 'cron = "0 3 * * *"', timezone="Europe/Berlin")
                  + entry_toml("broken", 'cron = "0 25 * * *"')
                  + entry_toml("often", 'every = "5m"', overlap="skip", catch_up="latest"))
    res = forge(proj, "schedule:list", "--json")
    assert res.returncode == 2
    doc = json.loads(res.stdout)
    assert doc["version"] == 2 and [e["name"] for e in doc["entries"]] == ["daily", "often"]
    daily = doc["entries"][0]
    assert daily["expression"] == "0 3 * * *" and daily["description"] == "At 03:00 every day"
    assert daily["timezone"] == "Europe/Berlin" and len(daily["next_runs"]) == 3
    assert all(r.endswith(("+01:00", "+02:00")) and "T03:00:00" in r for r in daily["next_runs"])
    assert daily["last"] is None and daily["paused"] is False and daily["skipped"] == daily["missed"] == 0
    assert doc["errors"] == [{"entry": "broken", "error": doc["errors"][0]["error"]}]
    assert 'Schedule "broken"' in res.stderr and "Bad hour" in res.stderr and res.stderr.count("\n") == 1
    human = forge(proj, "schedule:list")
    assert human.returncode == 2
    assert "daily  0 3 * * *  (At 03:00 every day, Europe/Berlin)" in human.stdout
    assert "often  every 5m" in human.stdout and "last:    never" in human.stdout
    # schedule:run dispatches the valid entries and still exits 2 for the invalid one.
    run = forge(proj, "schedule:run", "--dry-run", "--at=2026-03-01T03:00:10+01:00")
    assert run.returncode == 2 and "daily [2026-03-01T02:00:00Z] would dispatch" in run.stdout, run
    assert forge(proj, "schedule:pause", "daily").returncode == 2
    assert "PAUSED" in forge(proj, "schedule:list").stdout
    resumed = forge(proj, "schedule:resume", "daily")
    assert resumed.returncode == 2 and 'Schedule "daily" resumed.' in resumed.stderr + resumed.stdout
    again = forge(proj, "schedule:resume", "daily")
    assert again.returncode == 2 and "was not paused" in again.stderr + again.stdout
    missing = forge(proj, "schedule:test", "dialy")
    assert missing.returncode == 5 and 'Did you mean "daily"?' in missing.stderr
    tested = forge(proj, "schedule:test", "daily")
    assert tested.returncode == 2 and proj.scheduler(errors_ok=True).backend.find(tested.stdout.strip()) is not None


@needs_faketime
def test_schedule_work_dispatches_a_tick_within_a_second_and_stops_on_sigterm(proj: Project) -> None:
    proj.schedule(entry_toml("daily", 'cron = "0 3 * * *"', timezone="UTC"))
    work = subprocess.Popen([sys.executable, "-m", "forge", "schedule:work", "--json"],
                            env=env_of(proj, **fake("2026-03-01 02:59:57")), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert json.loads(work.stdout.readline())["event"] == "scheduler_started"
        got = json.loads(work.stdout.readline())  # blocks until the tick: no sleep in the test
        assert got["event"] == "dispatched" and got["tick"] == "2026-03-01T03:00:00Z"
        assert 0 <= got["lateness"] < 1.0, got
        work.send_signal(signal.SIGTERM)
        assert work.wait(timeout=30) == 0
        assert json.loads(work.stdout.readline())["event"] == "scheduler_stopped"
    finally:
        if work.poll() is None:
            work.kill()
            work.wait()
    assert list(tick_jobs(proj)) == ["daily@2026-03-01T03:00:00Z"]


@needs_faketime
def test_queue_work_schedule_ticks_and_runs_the_job(proj: Project) -> None:
    proj.schedule(entry_toml("daily", 'cron = "0 3 * * *"', timezone="UTC"))
    worker = subprocess.Popen([sys.executable, "-m", "forge", "queue:work", "--schedule", "--sleep=0.5"],
                              env=env_of(proj, **fake("2026-03-01 02:59:58")), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        [run] = wait_for(lambda: ledger(proj), timeout=30, what="the tick's job to run")
        assert run["scheduled_for"] == "2026-03-01T03:00:00Z" and run["label"] == "daily"
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=30)


@needs_faketime
def test_schedule_run_skips_typer_once_the_command_cache_is_saved(proj: Project) -> None:
    """The first schedule:run takes the full command and saves the command cache; the next
    ones dispatch the same way without importing Typer or the command files, and anything the
    cache cannot vouch for (an invalid entry, --dry-run) takes the full command again."""
    proj.schedule(entry_toml("often", 'cron = "* * * * *"', timezone="UTC")
                  + entry_toml("daily", 'cron = "0 3 * * *"', timezone="UTC"))

    def run(when: str, *args: str) -> tuple[subprocess.CompletedProcess, bool]:
        res = subprocess.run([sys.executable, "-X", "importtime", "-m", "forge", "schedule:run", *args],
                             capture_output=True, text=True, env=env_of(proj, **fake(when)), timeout=60)
        typer = bool(re.search(r"\| +typer$", res.stderr, re.M))
        res.stderr = "".join(x + "\n" for x in res.stderr.splitlines() if not x.startswith("import time:"))
        return res, typer

    first, typer = run("2026-03-01 03:00:05")
    assert first.returncode == 0 and typer, first.stderr
    assert first.stdout.count(" dispatched ") == 2
    second, typer = run("2026-03-01 03:01:05", "--json")
    assert second.returncode == 0 and not typer, second.stderr
    [line] = [json.loads(x) for x in second.stdout.splitlines()]
    assert line["entry"] == "often" and line["action"] == "dispatched" and line["tick"] == "2026-03-01T03:01:00Z"
    third, typer = run("2026-03-01 03:02:05")
    assert not typer and re.fullmatch(r"\S+ \S+ often \[2026-03-01T03:02:00Z\] dispatched \S+, 5\.\d s late\n",
                                      third.stdout), third.stdout
    dry, typer = run("2026-03-01 03:03:05", "--dry-run")
    assert typer and "would dispatch" in dry.stdout and len(tick_jobs(proj)) == 4
    proj.schedule(entry_toml("often", 'cron = "* * * * *"', timezone="UTC") + entry_toml("bad", 'cron = "0 25 * * *"'))
    bad, typer = run("2026-03-01 03:03:05")
    assert bad.returncode == 2 and typer and 'Schedule "bad"' in bad.stderr and bad.stdout.count(" dispatched ") == 1
