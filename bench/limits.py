"""Limits benchmark: claim throughput with and without limits, and the 10-second rate soak.

    python bench/limits.py --backend both                       # drain rates; baseline from /work/wt/base
    python bench/limits.py --backend both --base /path/to/old/forge --rounds 5 --jobs 3000
    python bench/limits.py --soak --backend both                # 4 workers, 20/s, held over 10 s

Drain: N trivial jobs (``probe:noop``) drained by 1 and by 2 workers (``queue:work
--stop-when-empty``, start-up included), for three set-ups, interleaved round by round so the
machine's load falls on each alike, medians printed:

- ``base``: the forge at ``--base`` (the commit before limits), no ``[limits]``;
- ``no limits``: this forge, no ``[limits]`` (the plain claim path: must match ``base``);
- ``one limit``: this forge with ``[limits.queues.default] parallel = 100`` (never binding, so
  it measures the limited claim path's own cost).

Claims (``--claims``): the claim path alone, in one process per set-up: N jobs pushed, then
claimed and acknowledged one by one (no worker, no job process), the same three set-ups.

Soak: 4 workers drain a queue limited to ``rate = "20/s"`` for 10 s; the starts the jobs
themselves recorded are counted over the 10 s window, and the busiest second is reported.
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


def project(base: Path, backend: str, redis_url: str, limits: str = "") -> dict[str, str]:
    base.mkdir(parents=True, exist_ok=True)
    prefix = f"forge-bench-{uuid.uuid4().hex[:8]}"
    (base / "forge.toml").write_text(
        f'[forge]\ncommands = ["{PROBE}"]\nplugins = false\n\n'
        f'[queue]\nconnection = "{backend}"\ntries = 1\ntimeout = "60s"\ndone_retention = "0"\n\n'
        f'[connections.file]\ndriver = "file"\npath = "{base / "queue"}"\n\n'
        f'[connections.redis]\ndriver = "redis"\nurl = "{redis_url}"\nprefix = "{prefix}"\n\n{limits}'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORGE_")}
    env.update(FORGE_CONFIG=str(base / "forge.toml"), FORGE_NO_PLUGINS="1",
               FORGE_PROBE_LEDGER=str(base / "ledger.jsonl"))
    return env


DISPATCH = """
import sys
from forge.queue import CommandQueue, QueuedCommand
q = CommandQueue("default")
n = int(sys.argv[1])
for i in range(0, n, 1000):
    q.dispatch_many([QueuedCommand(sys.argv[2]).with_args(sys.argv[3:])] * min(1000, n - i))
"""

CLAIMS = """
import sys, tempfile, time, uuid
from forge.queue import QueuedCommand
kind, n, limited = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
if kind == "file":
    from forge.backends.file.backend import FileBackend
    b = FileBackend(tempfile.mkdtemp(dir=sys.argv[4]) + "/q")
else:
    from forge.backends.redis.backend import RedisBackend
    b = RedisBackend(sys.argv[4], prefix="forge-bench-" + uuid.uuid4().hex[:8])
from forge.job import Event
b.push([QueuedCommand("probe:noop").to_job("default") for _ in range(n)])
if limited:
    from forge.limits.gate import Gate, release
    from forge.limits.spec import LimitsConfig, QueueLimits
    g = Gate(LimitsConfig(queues={"default": QueueLimits(parallel=100)}))
t = time.perf_counter()
for _ in range(n):
    c = g.claim(b, ["default"], "w", 60) if limited else b.claim(["default"], "w", 60)
    b.ack(c, Event("done", c.attempt, time.time()))
    if limited:
        release(b, c)
print(n / (time.perf_counter() - t))
if kind == "redis":
    for k in list(b.server.r.scan_iter(b.prefix + ":*", count=1000)):
        b.server.r.delete(k)
"""

COUNT = """
from forge.queue import CommandQueue
s = CommandQueue("default").stats()
print(s.pending + s.delayed + s.reserved)
"""


def drain(python: str, env: dict[str, str], jobs: int, workers: int) -> float:
    subprocess.run([python, "-c", DISPATCH, str(jobs), "probe:noop"], env=env, check=True)
    t = time.perf_counter()
    procs = [subprocess.Popen([python, "-m", "forge", "queue:work", "--stop-when-empty", "--memory=0"], env=env,
                              stdout=subprocess.DEVNULL) for _ in range(workers)]
    for p in procs:
        assert p.wait() == 0
    elapsed = time.perf_counter() - t
    left = subprocess.run([python, "-c", COUNT], env=env, check=True, capture_output=True, text=True).stdout.strip()
    assert left == "0", left
    return jobs / elapsed


def cleanup(env: dict[str, str], backend: str, redis_url: str) -> None:
    if backend != "redis":
        return
    import redis

    prefix = Path(env["FORGE_CONFIG"]).read_text().split('prefix = "', 1)[1].split('"', 1)[0]
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(f"{prefix}:*", count=1000))
    for i in range(0, len(keys), 1000):
        client.delete(*keys[i:i + 1000])
    client.close()


def bench_drain(backend: str, args: argparse.Namespace, redis_url: str, tmp: Path) -> dict[str, dict[str, float]]:
    base_py = str(Path(args.base) / ".venv" / "bin" / "python")
    setups = {
        "base": (base_py, ""),
        "no limits": (sys.executable, ""),
        "one limit": (sys.executable, "[limits.queues.default]\nparallel = 100\n"),
    }
    samples: dict[str, dict[int, list[float]]] = {name: {1: [], 2: []} for name in setups}
    envs = {name: project(tmp / name.replace(" ", "-"), backend, redis_url, lim) for name, (_, lim) in setups.items()}
    try:
        for r in range(args.rounds):
            for workers in (1, 2):
                for name, (python, _) in setups.items():
                    rate = drain(python, envs[name], args.jobs, workers)
                    samples[name][workers].append(rate)
                    print(f"  {backend} round {r + 1} {name:9} {workers}w {rate:8.0f} jobs/s", file=sys.stderr)
    finally:
        for env in envs.values():
            cleanup(env, backend, redis_url)
    return {name: {f"drain_{w}w_per_s": statistics.median(v) for w, v in by.items()} for name, by in samples.items()}


def bench_claims(backend: str, args: argparse.Namespace, redis_url: str, tmp: Path) -> dict[str, float]:
    base_py = str(Path(args.base) / ".venv" / "bin" / "python")
    setups = {"base": (base_py, "0"), "no limits": (sys.executable, "0"), "one limit": (sys.executable, "1")}
    samples: dict[str, list[float]] = {name: [] for name in setups}
    where = redis_url if backend == "redis" else str(tmp)
    for r in range(args.rounds):
        for name, (python, limited) in setups.items():
            out = subprocess.run([python, "-c", CLAIMS, backend, str(args.jobs), limited, where], check=True,
                                 capture_output=True, text=True, cwd=str(tmp)).stdout
            samples[name].append(float(out))
            print(f"  {backend} round {r + 1} {name:9} {samples[name][-1]:8.0f} claims/s", file=sys.stderr)
    return {name: statistics.median(v) for name, v in samples.items()}


def soak(backend: str, redis_url: str, tmp: Path, seconds: float) -> dict[str, float]:
    env = project(tmp / "soak", backend, redis_url, '[limits.queues.default]\nrate = "20/s"\n')
    try:
        subprocess.run([sys.executable, "-c", DISPATCH, str(int(20 * (seconds + 6))), "probe:tick", "0"], env=env,
                       check=True)
        procs = [subprocess.Popen([sys.executable, "-m", "forge", "queue:work", "--stop-when-empty"], env=env,
                                  stdout=subprocess.DEVNULL) for _ in range(4)]
        for p in procs:
            p.wait()
        ledger = Path(env["FORGE_PROBE_LEDGER"]).read_text().splitlines()
        starts = sorted(json.loads(x)["start"] for x in ledger if '"kind": "start"' in x)
        t0 = starts[10]
        window = [s for s in starts if t0 <= s < t0 + seconds]
        busiest = max(sum(1 for t in starts if s <= t < s + 1.0) for s in starts)
        return {"starts_in_window": len(window), "expected": 20 * seconds,
                "error_percent": (len(window) / (20 * seconds) - 1) * 100, "busiest_second": busiest}
    finally:
        cleanup(env, backend, redis_url)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=["file", "redis", "both"], default="file")
    ap.add_argument("--jobs", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--base", default="/work/wt/base", help="a checkout of forge before limits, with its own .venv")
    ap.add_argument("--soak", action="store_true", help="run the 10 s rate soak instead of the drain")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--claims", action="store_true", help="measure the claim path alone (claim + ack in one process)")
    args = ap.parse_args()
    redis_url = os.environ.get("FORGE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    backends = ["file", "redis"] if args.backend == "both" else [args.backend]
    for b in backends:
        with tempfile.TemporaryDirectory(prefix="forge-bench-limits-", dir=Path.home()) as d:
            if args.claims:
                res3 = bench_claims(b, args, redis_url, Path(d))
                print(f"{b} claim + ack, median of {args.rounds} ({args.jobs} jobs): "
                      + ", ".join(f"{name} {v:.0f} /s" for name, v in res3.items()))
                continue
            if args.soak:
                res = soak(b, redis_url, Path(d), args.seconds)
                print(f"{b}: {res['starts_in_window']} starts in {args.seconds:g} s at 20/s"
                      f" ({res['error_percent']:+.1f}%), busiest second {res['busiest_second']}")
                continue
            res2 = bench_drain(b, args, redis_url, Path(d))
            print(f"{b} (median of {args.rounds}, {args.jobs} jobs)")
            for name, figs in res2.items():
                print(f"  {name:10} 1 worker {figs['drain_1w_per_s']:7.0f} /s   2 workers {figs['drain_2w_per_s']:7.0f} /s")


if __name__ == "__main__":
    main()
