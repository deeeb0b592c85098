"""``forge queue:stats --since=1h`` and ``forge queue:metrics`` with 100,000 done jobs.

    python bench/stats.py [--jobs 100000] [--runs 7] [--backend file|redis|both]

Fills a fresh store (a temporary directory, or a random Redis prefix) the way workers do:
``--jobs`` jobs dispatched, then each claimed and acknowledged through the backend's own API
(a tenth of them failed instead, and a twentieth released once first), so the store holds the
done and failed job records and the outcome journal a real history leaves. Then it runs each
command ``--runs`` times as a new process and prints the medians, with ``forge queue:list``
(the same store, default limit) and ``forge --version`` (start-up alone) as the same-run
baselines, and the in-process ``compute_stats`` time. Target: queue:stats under 1 s. Last, the
claim + acknowledge rate with and without the outcome journal (the cost of journaling).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def timed(argv: list[str], env: dict[str, str], runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(argv, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def fill(jobs: int) -> float:
    """Dispatch ``jobs`` jobs, then claim and finish each as a worker would; returns seconds."""
    from forge.job import Event
    from forge.queue import CommandQueue, QueuedCommand

    q = CommandQueue("default")
    b = q.backend
    t0 = time.perf_counter()
    for start in range(0, jobs, 10_000):
        q.dispatch_many([QueuedCommand("demo:sleep").with_args(["0"]).with_max_attempts(2)
                         for _ in range(min(10_000, jobs - start))])
    n = 0
    while True:
        claim = b.claim(["default"], "bench", 60.0)
        if claim is None:
            break
        n += 1
        took = 0.001 * (n % 200)
        if n % 20 == 0 and claim.attempt == 1:
            b.release(claim, Event("released", 1, time.time(), worker="bench", reason="exit_code",
                                   exit_code=1, duration=took), 0.0)
        elif n % 10 == 0:
            b.fail(claim, Event("failed", claim.attempt, time.time(), worker="bench", reason="exit_code",
                                exit_code=1, duration=took))
        else:
            b.ack(claim, Event("done", claim.attempt, time.time(), worker="bench", exit_code=0, duration=took))
    return time.perf_counter() - t0


def ack_rate(jobs: int, journal: bool) -> float:
    """Claims + acknowledgements per second through the backend's API, with the outcome
    journal (what every ack now writes) or without it (the same code, the journal call made a
    no-op): the journal's cost on a worker's hot path."""
    import forge.backends.file.backend as file_backend
    import forge.backends.redis.backend as redis_backend
    from forge.job import Event
    from forge.queue import CommandQueue, QueuedCommand

    q = CommandQueue("overhead")
    b = q.backend
    q.dispatch_many([QueuedCommand("demo:sleep").with_args(["0"]) for _ in range(jobs)])
    saved = file_backend.record_outcome, redis_backend.record_outcome
    if not journal:
        file_backend.record_outcome = redis_backend.record_outcome = lambda *a, **k: None  # type: ignore[assignment]
    try:
        t0 = time.perf_counter()
        n = 0
        while (claim := b.claim(["overhead"], "bench", 60.0)) is not None:
            b.ack(claim, Event("done", claim.attempt, time.time(), worker="bench", exit_code=0, duration=0.001))
            n += 1
        return n / (time.perf_counter() - t0)
    finally:
        file_backend.record_outcome, redis_backend.record_outcome = saved


def journal_cost(n: int = 20_000) -> float:
    """Microseconds one acknowledgement spends writing its outcome line (file backend)."""
    from forge.backends.base import Claim
    from forge.job import Event
    from forge.queue import CommandQueue, QueuedCommand
    from forge.stats.journal import record_outcome

    q = CommandQueue("overhead")
    job = QueuedCommand("demo:sleep").with_args(["0"]).to_job("overhead")
    claim = Claim(job, 1, time.time(), time.time())
    event = Event("done", 1, time.time(), worker="bench", exit_code=0, duration=0.001)
    record_outcome(q.backend, claim, event)
    t0 = time.perf_counter()
    for _ in range(n):
        record_outcome(q.backend, claim, event)
    return (time.perf_counter() - t0) / n * 1e6


def bench(backend: str, jobs: int, runs: int, overhead: int) -> dict[str, float]:
    base = Path(tempfile.mkdtemp(prefix="forge-bench-stats-"))
    prefix = f"forge-bench-{uuid.uuid4().hex[:8]}"
    url = os.environ.get("FORGE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    config = base / "forge.toml"
    config.write_text(f'[forge]\ncommands = ["{ROOT / "commands"}"]\n[queue]\nconnection = "{backend}"\n'
                      f'done_retention = "2h"\n'
                      f'[connections.file]\npath = "{base / "queue"}"\n'
                      f'[connections.redis]\nurl = "{url}"\nprefix = "{prefix}"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORGE_")}
    env.update(FORGE_CONFIG=str(config), FORGE_NO_PLUGINS="1")
    os.environ.update(FORGE_CONFIG=str(config), FORGE_NO_PLUGINS="1")
    try:
        from forge.queue.manager import QueueManager, _backends
        from forge.stats import compute_stats

        _backends.clear()
        filled = fill(jobs)
        m = QueueManager()
        done = m.stats()[0].done
        t0 = time.perf_counter()
        s = compute_stats(m, since=3600)
        in_process = time.perf_counter() - t0
        assert s["totals"]["done"] + s["totals"]["failed"] == jobs, s["totals"]
        forge = [sys.executable, "-m", "forge"]
        figures = {"done jobs kept": float(done), "fill s": filled, "compute_stats (in process)": in_process,
                   "queue:stats --since=1h": timed([*forge, "queue:stats", "--since=1h"], env, runs),
                   "queue:stats --since=1h --json": timed([*forge, "queue:stats", "--since=1h", "--json"], env, runs),
                   "queue:metrics": timed([*forge, "queue:metrics"], env, runs),
                   "queue:list (baseline)": timed([*forge, "queue:list"], env, runs),
                   "forge --version (baseline)": timed([*forge, "--version"], env, runs)}
        # Last: these add lines to the journal.
        rates: dict[bool, list[float]] = {}
        for journal in (False, True, False, True, False, True):  # interleaved: the machine's load moves
            rates.setdefault(journal, []).append(ack_rate(overhead, journal))
        figures["claim+ack /s, no journal (baseline, best of 3)"] = max(rates[False])
        figures["claim+ack /s, with the journal (best of 3)"] = max(rates[True])
        if backend == "file":
            figures["journal write, us per ack"] = journal_cost()
        return figures
    finally:
        from forge.queue.manager import _backends

        for b in _backends.values():
            b.close()
        _backends.clear()
        if backend == "redis":
            import redis

            client = redis.Redis.from_url(url)
            keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
            for i in range(0, len(keys), 1000):
                client.delete(*keys[i:i + 1000])
        shutil.rmtree(base, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--backend", choices=["file", "redis", "both"], default="both")
    ap.add_argument("--overhead", type=int, default=5000, help="jobs per claim+ack run (journal on / off)")
    opts = ap.parse_args()
    for backend in (["file", "redis"] if opts.backend == "both" else [opts.backend]):
        figures = bench(backend, opts.jobs, opts.runs, opts.overhead)
        print(f"{backend}: {opts.jobs:,} jobs")
        for name, value in figures.items():
            print(f"  {name:32} {value:10.3f}" if "kept" not in name else f"  {name:32} {int(value):10,}")


if __name__ == "__main__":
    main()
