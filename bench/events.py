"""What events cost a worker: the drain rate of N trivial jobs by one worker, with no
listeners, with one in-process listener on every job event, and with one durable listener on
job.succeeded (a listener job stored per job, on a queue nobody works), interleaved with the
same drain by the forge at --base (the commit before events), in one run.

    python bench/events.py --backend both --jobs 2000 --rounds 3 --base /work/wt/base/.venv/bin/python

Prints the median rate of each case (jobs/s, including the worker's start-up), the median CPU
time the worker and its job processes spent per job, and JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

NOOP = '''from forge import command


@command("bench:noop")
def noop() -> None:
    """Do nothing."""
'''
LOCAL = '''import forge


@forge.on("job.*")
def seen(event) -> None:
    pass
'''
DURABLE = """
[[listeners]]
event = "job.succeeded"
command = "bench:noop"
queue = "events"
"""


def project(base: Path, backend: str, redis_url: str, case: str) -> dict[str, str]:
    base.mkdir(parents=True)
    (base / "commands").mkdir()
    (base / "commands" / "noop.py").write_text(NOOP)
    if case == "in-process":
        (base / "commands" / "listen.py").write_text(LOCAL)
    prefix = f"forge-bench-ev-{uuid.uuid4().hex[:8]}"
    (base / "forge.toml").write_text(
        f'[forge]\ncommands = ["commands"]\nplugins = false\n[queue]\nconnection = "{backend}"\n'
        f'[connections.file]\npath = "{base / "queue"}"\n'
        f'[connections.redis]\nurl = "{redis_url}"\nprefix = "{prefix}"\n'
        + (DURABLE if case == "durable" else ""))
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORGE_")}
    env.update(FORGE_CONFIG=str(base / "forge.toml"), FORGE_NO_PLUGINS="1", BENCH_PREFIX=prefix)
    return env


def drain(python: str, env: dict[str, str], jobs: int) -> tuple[float, float]:
    """Dispatch ``jobs`` with this checkout's forge, then time one worker of ``python`` draining
    them: its rate (jobs/s, wall clock) and the CPU it and its job processes used per job (ms),
    which a loaded machine disturbs less than the wall clock."""
    code = ("import sys; from forge.queue import CommandQueue, QueuedCommand;"
            "q = CommandQueue(); q.dispatch_many([QueuedCommand('bench:noop')] * int(sys.argv[1]))")
    subprocess.run([sys.executable, "-c", code, str(jobs)], env=env, check=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([python, "-m", "forge", "queue:work", "--stop-when-empty", "--memory=0"], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return jobs / wall, cpu / jobs * 1000


def cleanup(env: dict[str, str], redis_url: str) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"{env['BENCH_PREFIX']}:*", count=1000))
    for i in range(0, len(keys), 1000):
        client.delete(*keys[i:i + 1000])
    client.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", choices=["file", "redis", "both"], default="file")
    ap.add_argument("--jobs", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--base", default=None, help="python of a checkout without events (the baseline)")
    args = ap.parse_args()
    redis_url = os.environ.get("FORGE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    backends = ["file", "redis"] if args.backend == "both" else [args.backend]
    cases = [("none", sys.executable), ("in-process", sys.executable), ("durable", sys.executable)]
    if args.base:
        cases.insert(0, ("base", args.base))
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(dir=os.path.expanduser("~")) as tmp:
        for backend in backends:
            rates: dict[str, list[float]] = {c: [] for c, _ in cases}
            cpus: dict[str, list[float]] = {c: [] for c, _ in cases}
            for r in range(args.rounds):
                for case, python in cases:
                    env = project(Path(tmp) / f"{backend}-{case}-{r}", backend, redis_url,
                                  "none" if case == "base" else case)
                    try:
                        rate, cpu = drain(python, env, args.jobs)
                        rates[case].append(rate)
                        cpus[case].append(cpu)
                    finally:
                        if backend == "redis":
                            cleanup(env, redis_url)
            results[backend] = {c: {"jobs_per_s": round(statistics.median(v), 1),
                                    "cpu_ms_per_job": round(statistics.median(cpus[c]), 3)} for c, v in rates.items()}
            for c, v in rates.items():
                print(f"{backend:6} {c:11} {statistics.median(v):8.1f} jobs/s  {statistics.median(cpus[c]):6.3f} ms CPU/job"
                      f"  (runs: {', '.join(f'{x:.0f}' for x in v)})")
    print(json.dumps({"jobs": args.jobs, "rounds": args.rounds, "results": results}))


if __name__ == "__main__":
    main()
