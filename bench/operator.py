"""The median time of ``forge queue:workers`` and ``forge queue:list`` with 100,000 pending jobs.

    python bench/operator.py [--jobs 100000] [--runs 15] [--backend file|redis|both]

Fills a fresh queue (a temporary directory, or a random Redis prefix) with ``--jobs`` pending
jobs through ``dispatch_many``, starts one idle worker (so ``queue:workers`` has a record to
read), then runs each command ``--runs`` times as a new process and prints the medians (after
one untimed run each, with ``PYTHONDONTWRITEBYTECODE`` dropped: bytecode caches are warm, as
for an installed forge).
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
    subprocess.run(argv, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(argv, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench(backend: str, jobs: int, runs: int) -> dict[str, float]:
    base = Path(tempfile.mkdtemp(prefix="forge-bench-op-"))
    prefix = f"forge-bench-{uuid.uuid4().hex[:8]}"
    url = os.environ.get("FORGE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    config = base / "forge.toml"
    config.write_text(f'[forge]\ncommands = ["{ROOT / "commands"}"]\n[queue]\nconnection = "{backend}"\n'
                      f'[connections.file]\npath = "{base / "queue"}"\n'
                      f'[connections.redis]\nurl = "{url}"\nprefix = "{prefix}"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORGE_") and k != "PYTHONDONTWRITEBYTECODE"}
    env.update(FORGE_CONFIG=str(config), FORGE_NO_PLUGINS="1")
    os.environ.update(FORGE_CONFIG=str(config), FORGE_NO_PLUGINS="1")
    worker = None
    try:
        from forge.queue import CommandQueue, QueuedCommand

        q = CommandQueue("default")
        for start in range(0, jobs, 10_000):
            q.dispatch_many([QueuedCommand("demo:sleep").with_args(["0"]) for _ in range(min(10_000, jobs - start))])
        worker = subprocess.Popen([sys.executable, "-m", "forge", "queue:work", "--json", "--queue=none"],
                                  env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert worker.stdout is not None and "worker_started" in worker.stdout.readline()
        forge = [sys.executable, "-m", "forge"]
        return {"queue:workers": timed([*forge, "queue:workers"], env, runs),
                "queue:list": timed([*forge, "queue:list"], env, runs)}
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait()
        if backend == "redis":
            import redis

            client = redis.Redis.from_url(url)
            keys = list(client.scan_iter(match=f"{prefix}:*", count=10_000))
            for i in range(0, len(keys), 10_000):
                client.delete(*keys[i:i + 10_000])
        shutil.rmtree(base, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--backend", choices=["file", "redis", "both"], default="file")
    a = ap.parse_args()
    for backend in (["file", "redis"] if a.backend == "both" else [a.backend]):
        for name, t in bench(backend, a.jobs, a.runs).items():
            print(f"{backend:5}  forge {name:14} with {a.jobs:,} pending jobs: median {t * 1000:.0f} ms ({a.runs} runs)")


if __name__ == "__main__":
    main()
