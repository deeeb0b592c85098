"""Scheduler figures: one schedule:run with 1,000 entries (50 due), four concurrent runs with
1,000 due ticks, schedule:work's idle CPU and the lateness of a due tick.

    python bench/schedule.py --backend both --idle-seconds 60
    python bench/schedule.py --backend both --parts run --baseline /work/wt/base/.venv/bin/python

``--python`` runs forge with another interpreter (another tree's venv); ``--baseline`` runs a
second one's forge alternately with it, run by run (a same-run baseline on a busy machine);
``--parts`` picks measurements. Bytecode caches are written and warm before anything is timed
(``PYTHONDONTWRITEBYTECODE`` is dropped: with it every run compiles forge afresh, which cron's
environment and an installed package never do).

Clocks are faked per process with libfaketime (apt-get install faketime), so a "due" minute is
chosen, not waited for. Prints one FIGURES line per measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = ROOT / "tests" / "schedproject"
LIB = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"


def project(workdir: Path, kind: str, entries: str, url: str) -> dict[str, str]:
    workdir.mkdir(parents=True, exist_ok=True)
    prefix = f"forge-bench-{uuid.uuid4().hex[:8]}"
    (workdir / "forge.toml").write_text(
        f'[forge]\ncommands = ["{COMMANDS}"]\n[queue]\nconnection = "{kind}"\n'
        f'[connections.file]\npath = "{workdir / "queue"}"\n'
        f'[connections.redis]\nurl = "{url}"\nprefix = "{prefix}"\n' + entries)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORGE_") and k != "PYTHONDONTWRITEBYTECODE"}
    env.update(FORGE_CONFIG=str(workdir / "forge.toml"), FORGE_NO_PLUGINS="1", TZ="UTC",
               XDG_CACHE_HOME=str(workdir / "cache"), BENCH_PREFIX=prefix)
    return env


def fake(env: dict[str, str], when: str) -> dict[str, str]:
    return {**env, "LD_PRELOAD": LIB, "FAKETIME": f"@{when}", "FAKETIME_DONT_RESET": "1"}


def entry(name: str, cron: str) -> str:
    return f'[[schedule]]\nname = "{name}"\ncommand = "sched:record"\nargs = ["{name}"]\ncron = "{cron}"\ntimezone = "UTC"\n'


def cleanup(kind: str, env: dict[str, str], url: str) -> None:
    if kind == "redis":
        import redis

        r = redis.Redis.from_url(url)
        keys = list(r.scan_iter(match=f"{env['BENCH_PREFIX']}:*", count=1000))
        for i in range(0, len(keys), 1000):
            r.delete(*keys[i:i + 1000])


PYTHON = sys.executable


def forge(env: dict[str, str], *args: str, python: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([python or PYTHON, "-m", "forge", *args], env=env, capture_output=True, text=True,
                          timeout=300)


def bench_one_run(kind: str, tmp: Path, url: str, baseline: str | None = None) -> None:
    """Eleven timed runs, one a (faked) minute; with ``baseline``, that interpreter's forge runs
    the same project beside it, alternating process by process (the fairest comparison on a
    busy machine). Prints wall time and CPU time (user + system) per run."""
    import resource

    toml = "".join(entry(f"due{i}", "* * * * *") for i in range(50))
    toml += "".join(entry(f"idle{i}", f"{i % 60} {i % 24} 15 * *") for i in range(950))
    pythons = [PYTHON] + ([baseline] if baseline else [])
    envs = [project(tmp / f"one-{kind}-{n}", kind, toml, url) for n in range(len(pythons))]
    walls: list[list[float]] = [[] for _ in pythons]
    cpus: list[list[float]] = [[] for _ in pythons]
    for m in range(13):  # the first two warm the command cache, the state and .pyc files
        when = f"2026-03-01 02:{m:02d}:05"
        for i, (py, env) in enumerate(zip(pythons, envs, strict=True)):
            r0, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
            res = forge(fake(env, when), "schedule:run", python=py)
            wall, r1 = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
            assert res.returncode == 0, res.stderr
            if m >= 2:
                assert res.stdout.count("dispatched") == 50, res.stdout[-500:]
                walls[i].append(wall)
                cpus[i].append(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime)
    for env in envs:
        cleanup(kind, env, url)
    for py, times, cpu in zip(pythons, walls, cpus, strict=True):
        print(f"FIGURES bench=schedule-run backend={kind} python={py} entries=1000 due=50 runs={len(times)} "
              f"median_ms={statistics.median(times) * 1000:.0f} min_ms={min(times) * 1000:.0f} "
              f"max_ms={max(times) * 1000:.0f} cpu_median_ms={statistics.median(cpu) * 1000:.0f}", flush=True)


def bench_concurrent(kind: str, tmp: Path, url: str) -> None:
    toml = "".join(entry(f"e{i}", "0 3 * * *") for i in range(1000))
    env = project(tmp / f"conc-{kind}", kind, toml, url)
    start = time.perf_counter()
    procs = [subprocess.Popen([PYTHON, "-m", "forge", "schedule:run", "--json"],
                              env=fake(env, "2026-03-01 03:00:05"), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outs = [p.communicate(timeout=600) for p in procs]
    wall = time.perf_counter() - start
    assert all(p.returncode == 0 for p in procs), [o[1][-300:] for o in outs]
    created = sum(1 for o, _ in outs for line in o.splitlines() if json.loads(line)["action"] == "dispatched")
    sys.path.insert(0, str(ROOT))
    os.environ["FORGE_CONFIG"] = env["FORGE_CONFIG"]
    from forge.config import load_settings
    from forge.queue.manager import connect

    backend = connect(None, load_settings(env=env))
    stored = sum(1 for _ in backend.jobs())
    per = [sum(1 for line in o.splitlines() if json.loads(line)["action"] == "dispatched") for o, _ in outs]
    cleanup(kind, env, url)
    print(f"FIGURES bench=schedule-run-concurrent backend={kind} processes=4 due=1000 dispatched={created} "
          f"stored_jobs={stored} per_process={per} wall_s={wall:.2f}", flush=True)


def cpu_seconds(pid: int) -> float:
    """CPU time of ``pid`` in seconds: from schedstat (nanoseconds) where the kernel has it,
    else utime + stime (clock ticks of 10 ms, too coarse for an idle process)."""
    try:
        ns = int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ns = 0
    if ns:  # 0: a kernel that does not keep it (a process that ran has used some)
        return ns / 1e9
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bench_work(kind: str, tmp: Path, url: str, idle: float) -> None:
    env = project(tmp / f"work-{kind}", kind, entry("daily", "0 3 * * *"), url)
    proc = subprocess.Popen([PYTHON, "-m", "forge", "schedule:work", "--json"],
                            env=fake(env, "2026-03-01 02:59:56"), stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    json.loads(proc.stdout.readline())  # scheduler_started
    got = json.loads(proc.stdout.readline())
    assert got["event"] == "dispatched", got
    lateness = got["lateness"]
    before, t0 = cpu_seconds(proc.pid), time.monotonic()
    time.sleep(idle)  # a figure over wall time: nothing to wait for but the clock
    used, span = cpu_seconds(proc.pid) - before, time.monotonic() - t0
    proc.terminate()
    proc.wait(timeout=30)
    cleanup(kind, env, url)
    print(f"FIGURES bench=schedule-work backend={kind} tick_lateness_ms={lateness * 1000:.0f} "
          f"idle_seconds={span:.0f} idle_cpu_percent={100 * used / span:.3f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", choices=["file", "redis", "both"], default="both")
    ap.add_argument("--idle-seconds", type=float, default=60.0)
    ap.add_argument("--redis-url", default=os.environ.get("FORGE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0"))
    ap.add_argument("--python", default=sys.executable, help="The interpreter that runs forge (default: this one).")
    ap.add_argument("--parts", default="run,concurrent,work", help="Comma-separated: run, concurrent, work.")
    ap.add_argument("--baseline", help="Another interpreter (another tree's venv) whose forge runs the same"
                                       " schedule:run project alternately with this one's: a same-run baseline.")
    a = ap.parse_args()
    global PYTHON
    PYTHON = a.python
    parts = set(a.parts.split(","))
    kinds = ["file", "redis"] if a.backend == "both" else [a.backend]
    with tempfile.TemporaryDirectory() as d:
        for kind in kinds:
            if "run" in parts:
                bench_one_run(kind, Path(d), a.redis_url, a.baseline)
            if "concurrent" in parts:
                bench_concurrent(kind, Path(d), a.redis_url)
            if "work" in parts:
                bench_work(kind, Path(d), a.redis_url, a.idle_seconds)


if __name__ == "__main__":
    main()
