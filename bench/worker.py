"""Worker and end-to-end benchmark: prints a table and writes JSON.

    python bench/worker.py                      # file backend
    python bench/worker.py --backend both       # file and Redis (FORGE_TEST_REDIS_URL or local)
    python bench/worker.py --jobs 5000 --json bench/results/worker.json

Figures, per backend: single dispatch rate, dispatch_many rate, drain rate of N trivial jobs
with 1 and 2 workers (each job in the worker's isolated job process), dispatch-to-start
latency with an idle worker (p50/p99), idle worker CPU over 10 s, worker RSS after 50 and
after N jobs, and the cost of running one job in a fresh `forge` process for comparison.
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
PROBE = ROOT / "tests" / "project" / "commands"


def make_project(base: Path, backend: str, redis_url: str) -> dict[str, str]:
    """A throwaway project using the probe commands; returns the environment to run it."""
    base.mkdir(parents=True, exist_ok=True)
    prefix = f"forge-bench-{uuid.uuid4().hex[:8]}"
    (base / "forge.toml").write_text(
        f'[forge]\ncommands = ["{PROBE}"]\nplugins = false\n\n'
        f'[queue]\nconnection = "{backend}"\ntries = 1\ntimeout = "60s"\n\n'
        f'[connections.file]\ndriver = "file"\npath = "{base / "queue"}"\n\n'
        f'[connections.redis]\ndriver = "redis"\nurl = "{redis_url}"\nprefix = "{prefix}"\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORGE_")}
    env.update(FORGE_CONFIG=str(base / "forge.toml"), FORGE_NO_PLUGINS="1",
               FORGE_PROBE_LEDGER=str(base / "ledger.jsonl"))
    return env


def in_env(env: dict[str, str]):
    """Load the library against a project's environment (this process)."""
    for k in [k for k in os.environ if k.startswith("FORGE_")]:
        del os.environ[k]
    os.environ.update({k: v for k, v in env.items() if k.startswith("FORGE_")})
    import forge.queue.manager as fq
    import forge.registry.runner as fr

    fr._default_registry = None
    fq._backends.clear()
    return fq


def worker_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "forge", "queue:work", *args]


def proc_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])) / ticks


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def wait_until(pred, timeout: float = 120.0, interval: float = 0.01) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(interval)
    raise TimeoutError("benchmark condition not met")


def bench_backend(backend: str, jobs: int, redis_url: str, base: Path) -> dict[str, float]:
    out: dict[str, float] = {}
    env = make_project(base, backend, redis_url)
    fq = in_env(env)
    q = fq.CommandQueue("default", check_args=True)
    noop = fq.QueuedCommand("probe:noop")

    n = 500
    t = time.perf_counter()
    for _ in range(n):
        q.dispatch(noop)
    out["dispatch_per_s"] = n / (time.perf_counter() - t)
    q.clear()

    t = time.perf_counter()
    q.dispatch_many([noop] * 10_000)
    out["dispatch_many_per_s"] = 10_000 / (time.perf_counter() - t)
    q.clear()

    t = time.perf_counter()
    subprocess.run(worker_cmd("--stop-when-empty"), env=env, stdout=subprocess.DEVNULL, check=True)
    out["worker_startup_s"] = time.perf_counter() - t

    for workers in (1, 2):
        q.dispatch_many([noop] * jobs)
        t = time.perf_counter()
        procs = [subprocess.Popen(worker_cmd("--stop-when-empty"), env=env, stdout=subprocess.DEVNULL)
                 for _ in range(workers)]
        for p in procs:
            p.wait()
        elapsed = time.perf_counter() - t
        stats = q.stats()
        assert stats.pending == 0 and stats.reserved == 0, stats
        out[f"drain_{workers}w_per_s"] = jobs / elapsed
        out[f"drain_{workers}w_after_startup_per_s"] = jobs / max(elapsed - out["worker_startup_s"], 1e-9)
        q.backend.prune_done()

    # Latency, idle CPU and memory with one long-running worker.
    worker = subprocess.Popen(worker_cmd("--sleep=30", "--memory=0"), env=env, stdout=subprocess.DEVNULL)
    try:
        time.sleep(1.5)
        ledger = base / "ledger.jsonl"
        lat = []
        for i in range(200):
            marker = f"lat-{i}"
            sent = time.time()
            q.dispatch(fq.QueuedCommand("probe:run").with_args([marker]))
            wait_until(lambda m=marker: ledger.exists() and m in ledger.read_text(), timeout=10, interval=0.0005)
            rec = [json.loads(x) for x in ledger.read_text().splitlines() if marker in x][0]
            lat.append((rec["start"] - sent) * 1000)
            time.sleep(0.01)
        lat.sort()
        out["latency_p50_ms"] = statistics.median(lat)
        out["latency_p99_ms"] = lat[int(len(lat) * 0.99) - 1]

        time.sleep(1.0)
        children = [int(p) for p in Path(f"/proc/{worker.pid}/task/{worker.pid}/children").read_text().split()]
        pids = [worker.pid, *children]
        c0 = sum(proc_cpu_seconds(p) for p in pids)
        time.sleep(10)
        c1 = sum(proc_cpu_seconds(p) for p in pids)
        out["idle_cpu_percent"] = (c1 - c0) / 10 * 100

        q.dispatch_many([noop] * 50)
        wait_until(lambda: q.stats().pending == 0 and q.stats().reserved == 0)
        out["rss_after_50_kb"] = rss_kb(worker.pid)
        q.dispatch_many([noop] * jobs)
        wait_until(lambda: q.stats().pending == 0 and q.stats().reserved == 0)
        out["rss_after_n_kb"] = rss_kb(worker.pid)
        out["rss_growth_percent"] = (out["rss_after_n_kb"] / out["rss_after_50_kb"] - 1) * 100
    finally:
        worker.terminate()
        worker.wait()

    # One job in a fresh `forge` process, for comparison with a job process forked by the worker.
    runs = []
    for _ in range(10):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "forge", "probe:noop"], env=env, check=True)
        runs.append((time.perf_counter() - t) * 1000)
    out["fresh_process_job_ms"] = statistics.median(runs)
    q.backend.prune_done()
    if backend == "redis":
        client = q.backend.server.r  # type: ignore[attr-defined]
        prefix = q.backend.prefix  # type: ignore[attr-defined]
        for key in client.scan_iter(f"{prefix}:*", count=1000):
            client.delete(key)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=["file", "redis", "both"], default="file")
    ap.add_argument("--jobs", type=int, default=5000)
    ap.add_argument("--dir", type=Path, default=None, help="where the file queue lives (default: under $HOME)")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "worker.json")
    args = ap.parse_args()
    redis_url = os.environ.get("FORGE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    backends = ["file", "redis"] if args.backend == "both" else [args.backend]
    parent = args.dir or Path.home()
    results = {}
    for b in backends:
        with tempfile.TemporaryDirectory(prefix="forge-bench-", dir=parent) as d:
            results[b] = bench_backend(b, args.jobs, redis_url, Path(d))
    keys = list(next(iter(results.values())))
    print(f"{'figure':24}" + "".join(f"{b:>14}" for b in backends))
    for k in keys:
        print(f"{k:24}" + "".join(f"{results[b][k]:>14.1f}" for b in backends))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"jobs": args.jobs, "results": results}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
