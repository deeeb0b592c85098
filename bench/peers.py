"""forge beside huey's RedisHuey on one Redis server, same workload, one run.

    python bench/peers.py                          # 5,000 jobs, 1 round
    python bench/peers.py --rounds 3 --json bench/results/peers.json

Needs huey, a benchmark-only dependency (never a runtime one): ``pip install huey`` in the
project's venv. Redis is FORGE_TEST_REDIS_URL (default redis://127.0.0.1:6379/0), best without
persistence; every key this script writes is under a prefix unique to the run
(``forge-peers-<hex>`` for forge, ``huey.redis.forge-peers-<hex>`` for huey) and only those
keys are deleted at the end.

Figures, per round, for huey (RedisHuey, ``huey_consumer -k process``), forge on Redis and
forge on files (workers are ``forge queue:work`` processes running each job in their job
process):

- enqueue: N trivial jobs dispatched one at a time from Python (jobs/s), beside one redis-py
  ``LPUSH`` round trip per job (the physical limit of one round trip each); LPUSH, huey and
  forge on Redis take turns of 250 (the machine's speed drifts within seconds), forge on files
  follows;
- drain with 1 and 2 workers (jobs/s): N jobs queued while the workers are held off (forge:
  the queue paused, then resumed; huey: its list renamed away, then back), timed from the
  release until the queue is empty, so start-up is not counted for either;
- dispatch-to-start latency p50/p99 (ms) with one idle worker: a job appends its start time to
  a ledger file (forge's ``probe:stamp MARKER`` and huey's ``stamp(marker)``: one argument
  each); 200 samples;
- one CLI dispatch process (ms, median of --cli-runs): ``forge queue:dispatch
  --connection=redis`` and ``--connection=file``, beside ``python -c pass``; and one worker's
  start and stop on an empty queue (``forge queue:work --stop-when-empty``); all interleaved;
- dispatch_many of N jobs (jobs/s), forge only.

With --rounds > 1 the table shows each figure's median over the rounds (the machine is
shared: medians, and always huey beside forge in the same round).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from worker import in_env, make_project, wait_until  # noqa: E402

PEERS = Path(__file__).resolve().parent / "_peers"
LATENCY_SAMPLES = 200


def lat_stats(lat: list[float]) -> tuple[float, float]:
    lat = sorted(lat)
    return statistics.median(lat), lat[max(int(len(lat) * 0.99) - 1, 0)]


def ledger_start(ledger: Path, marker: str) -> float | None:
    if not ledger.exists():
        return None
    for line in ledger.read_text().splitlines():
        if marker in line:
            return json.loads(line)["start"]
    return None


def measure_latency(dispatch, ledger: Path) -> tuple[float, float]:
    lat = []
    for i in range(LATENCY_SAMPLES):
        marker = f"lat-{uuid.uuid4().hex[:8]}-{i}"
        sent = time.time()
        dispatch(marker)
        wait_until(lambda m=marker: ledger_start(ledger, m) is not None, timeout=20, interval=0.0005)
        lat.append((ledger_start(ledger, marker) - sent) * 1000)  # type: ignore[operator]
        time.sleep(0.01)
    return lat_stats(lat)


# -- huey -----------------------------------------------------------------------------------

class Huey:
    def __init__(self, redis_url: str, base: Path) -> None:
        self.name = f"forge-peers-{uuid.uuid4().hex[:8]}"
        self.ledger = base / "huey-ledger.jsonl"
        self.env = {**os.environ, "PEERS_REDIS_URL": redis_url, "PEERS_HUEY_NAME": self.name,
                    "PEERS_LEDGER": str(self.ledger), "PYTHONPATH": str(PEERS)}
        os.environ.update({k: v for k, v in self.env.items() if k.startswith("PEERS_")})
        sys.path.insert(0, str(PEERS))
        import importlib

        import hueyapp

        self.app = importlib.reload(hueyapp)  # this round's name
        self.huey = self.app.huey
        self.conn = self.huey.storage.conn
        self.key = self.huey.storage.queue_key

    def consumer(self, workers: int) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "huey.bin.huey_consumer", "hueyapp.huey", "-k", "process",
                                 "-w", str(workers), "-q", "-C"], env=self.env, cwd=str(PEERS),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def ready(self, proc: subprocess.Popen) -> None:
        marker = f"ready-{uuid.uuid4().hex[:8]}"
        self.app.stamp(marker)
        wait_until(lambda: ledger_start(self.ledger, marker) is not None, timeout=60)

    def enqueue(self, n: int) -> float:
        t = time.perf_counter()
        for _ in range(n):
            self.app.noop()
        return n / (time.perf_counter() - t)

    def drain(self, n: int, workers: int) -> float:
        self.conn.delete(self.key)
        self.enqueue(n)
        staging = self.key + ":staging"
        self.conn.rename(self.key, staging)
        proc = self.consumer(workers)
        try:
            self.ready(proc)
            t = time.perf_counter()
            self.conn.rename(staging, self.key)
            wait_until(lambda: self.conn.llen(self.key) == 0, timeout=300, interval=0.02)
            return n / (time.perf_counter() - t)
        finally:
            stop(proc)

    def latency(self) -> tuple[float, float]:
        proc = self.consumer(1)
        try:
            self.ready(proc)
            return measure_latency(self.app.stamp, self.ledger)
        finally:
            stop(proc)

    def lpush(self, n: int) -> float:
        key = self.key + ":lpush"
        payload = b"x" * 200
        t = time.perf_counter()
        for _ in range(n):
            self.conn.lpush(key, payload)
        rate = n / (time.perf_counter() - t)
        self.conn.delete(key)
        return rate

    def cleanup(self) -> None:
        for key in self.conn.scan_iter(match=f"huey*{self.name}*", count=1000):
            self.conn.delete(key)


# -- forge ----------------------------------------------------------------------------------

class Forge:
    def __init__(self, backend: str, redis_url: str, base: Path) -> None:
        self.backend_name = backend
        self.base = base
        self.env = make_project(base, backend, redis_url)
        self.ledger = base / "ledger.jsonl"
        self.fq = in_env(self.env)
        self.q = self.fq.CommandQueue("default")
        self.noop = self.fq.QueuedCommand("probe:noop")

    def _activate(self) -> None:
        self.fq = in_env(self.env)  # this process's library now points at this project
        self.q = self.fq.CommandQueue("default")

    def worker(self, *args: str) -> tuple[subprocess.Popen, Path]:
        out = self.base / f"worker-{uuid.uuid4().hex[:6]}.jsonl"
        with open(out, "wb") as fh:
            proc = subprocess.Popen([sys.executable, "-m", "forge", "queue:work", "--json", *args],
                                    env=self.env, stdout=fh, stderr=subprocess.DEVNULL, cwd=self.base)
        return proc, out

    def enqueue(self, n: int, activate: bool = True) -> float:
        if activate:
            self._activate()
        t = time.perf_counter()
        for _ in range(n):
            self.q.dispatch(self.noop)
        return n / (time.perf_counter() - t)

    def empty(self) -> bool:
        s = self.q.stats()
        return s.pending == 0 and s.reserved == 0

    def drain(self, n: int, workers: int) -> float:
        self._activate()
        self.q.pause()
        self.enqueue(n)
        procs = [self.worker("--sleep=1") for _ in range(workers)]
        try:
            for _, out in procs:
                wait_until(lambda o=out: o.exists() and b"worker_started" in o.read_bytes(), timeout=60)
            t = time.perf_counter()
            self.q.resume()
            if self.backend_name == "redis":  # resume wakes one idle worker: wake them all
                b = self.q.backend
                b.server.r.rpush(b.server.key("q", "default", "notify"), *["1"] * workers)  # type: ignore[attr-defined]
            wait_until(self.empty, timeout=300, interval=0.02)
            return n / (time.perf_counter() - t)
        finally:
            for p, _ in procs:
                stop(p)
            self.q.backend.prune_done()

    def dispatch_many(self, n: int) -> float:
        self._activate()
        t = time.perf_counter()
        self.q.dispatch_many([self.noop] * n)
        rate = n / (time.perf_counter() - t)
        self.q.clear()
        return rate

    def latency(self) -> tuple[float, float]:
        self._activate()
        proc, out = self.worker("--sleep=30", "--memory=0")
        run = self.fq.QueuedCommand("probe:stamp")  # one argument, as huey's stamp(marker)
        try:
            wait_until(lambda: out.exists() and b"worker_started" in out.read_bytes(), timeout=60)
            self.q.dispatch(run.with_args(["warm-up"]))
            wait_until(lambda: ledger_start(self.ledger, "warm-up") is not None, timeout=60)
            return measure_latency(lambda m: self.q.dispatch(run.with_args([m])), self.ledger)
        finally:
            stop(proc)
            self.q.backend.prune_done()

    def cli_command(self, *args: str) -> functools.partial:
        cmd = [sys.executable, "-m", "forge", *args]
        run = functools.partial(subprocess.run, cmd, env=self.env, check=True, stdout=subprocess.DEVNULL,
                                cwd=self.base)  # not this checkout: `python -m` imports from the cwd
        run()  # saves the command cache
        return run

    def cleanup(self) -> None:
        self._activate()
        b = self.q.backend
        if self.backend_name == "redis":
            for key in b.server.r.scan_iter(f"{b.prefix}:*", count=1000):  # type: ignore[attr-defined]
                b.server.r.delete(key)  # type: ignore[attr-defined]
        b.close()


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def cli_dispatch(runs: int, forges: dict[str, Forge], res: dict[str, dict[str, float]]) -> None:
    """One CLI dispatch process per backend, and ``python -c pass``, interleaved (the load of a
    shared machine drifts): the median of each."""
    commands = {(name, "cli_dispatch_ms"): f.cli_command("queue:dispatch", f"--connection={f.backend_name}",
                                                         "probe:noop") for name, f in forges.items()}
    for name, f in forges.items():
        f._activate()
        f.q.clear()
        # a worker's start and stop on an empty queue (its record written and removed)
        commands[(name, "worker_start_ms")] = f.cli_command("queue:work", f.backend_name, "--stop-when-empty")
    commands[("limit", "cli_dispatch_ms")] = functools.partial(subprocess.run, [sys.executable, "-c", "pass"],
                                                               check=True)
    times: dict[tuple[str, str], list[float]] = {key: [] for key in commands}
    for _ in range(runs):
        for key, run in commands.items():
            if key[1] == "cli_dispatch_ms" and key[0] != "limit":
                forges[key[0]]._activate()
                forges[key[0]].q.clear()  # the worker's run must find the queue empty
            t = time.perf_counter()
            run()
            times[key].append((time.perf_counter() - t) * 1000)
    for (name, figure), ts in times.items():
        res[name][figure] = statistics.median(ts)
    for f in forges.values():
        f._activate()
        f.q.clear()


ENQUEUE_CHUNK = 250


def interleaved_enqueue(n: int, huey: Huey, forge: Forge) -> tuple[float, float, float]:
    """One LPUSH round trip, huey's enqueue and forge's, ``n`` each, in turns of
    ``ENQUEUE_CHUNK`` (the machine's speed drifts within seconds): the rates (jobs/s) of the
    three, LPUSH first, each from its total time."""
    forge._activate()
    forge.enqueue(50, activate=False)  # connected, scripts loaded, registry read
    huey.enqueue(50)
    spent = [0.0, 0.0, 0.0]
    done = 0
    while done < n:
        k = min(ENQUEUE_CHUNK, n - done)
        for i, run in enumerate((huey.lpush, huey.enqueue, lambda m: forge.enqueue(m, activate=False))):
            spent[i] += k / run(k)
        done += k
    huey.conn.delete(huey.key)
    forge.q.clear()
    return n / spent[0], n / spent[1], n / spent[2]


def one_round(jobs: int, cli_runs: int, redis_url: str, parent: Path) -> dict[str, dict[str, float]]:
    res: dict[str, dict[str, float]] = {"huey": {}, "forge-redis": {}, "forge-file": {}, "limit": {}}
    with tempfile.TemporaryDirectory(prefix="forge-peers-", dir=parent) as d:
        base = Path(d)
        huey = Huey(redis_url, base / "huey")
        (base / "huey").mkdir()
        forges = {"forge-redis": Forge("redis", redis_url, base / "redis"),
                  "forge-file": Forge("file", redis_url, base / "file")}
        try:
            (res["limit"]["enqueue_per_s"], res["huey"]["enqueue_per_s"],
             res["forge-redis"]["enqueue_per_s"]) = interleaved_enqueue(jobs, huey, forges["forge-redis"])
            res["forge-file"]["enqueue_per_s"] = forges["forge-file"].enqueue(jobs)
            forges["forge-file"].q.clear()
            for w in (1, 2):
                res["huey"][f"drain_{w}w_per_s"] = huey.drain(jobs, w)
                for name, f in forges.items():
                    res[name][f"drain_{w}w_per_s"] = f.drain(jobs, w)
            p50, p99 = huey.latency()
            res["huey"].update(latency_p50_ms=p50, latency_p99_ms=p99)
            for name, f in forges.items():
                p50, p99 = f.latency()
                res[name].update(latency_p50_ms=p50, latency_p99_ms=p99)
            for name, f in forges.items():
                res[name]["dispatch_many_per_s"] = f.dispatch_many(jobs)
            cli_dispatch(cli_runs, forges, res)
        finally:
            huey.cleanup()
            for f in forges.values():
                f.cleanup()
    return res


FIGURES = ["enqueue_per_s", "drain_1w_per_s", "drain_2w_per_s", "latency_p50_ms", "latency_p99_ms",
           "cli_dispatch_ms", "worker_start_ms", "dispatch_many_per_s"]
COLUMNS = ["huey", "forge-redis", "forge-file", "limit"]


def table(res: dict[str, dict[str, float]], title: str) -> str:
    lines = [title, f"{'figure':22}" + "".join(f"{c:>13}" for c in COLUMNS) + f"{'redis/huey':>12}"]
    for k in FIGURES:
        row = f"{k:22}"
        for c in COLUMNS:
            v = res[c].get(k)
            row += f"{v:>13.1f}" if v is not None else f"{'-':>13}"
        h, r = res["huey"].get(k), res["forge-redis"].get(k)
        row += f"{r / h:>12.2f}" if h and r else f"{'':>12}"
        lines.append(row)
    f, r = res["forge-file"].get("cli_dispatch_ms"), res["forge-redis"].get("cli_dispatch_ms")
    e, lim = res["forge-redis"].get("enqueue_per_s"), res["limit"].get("enqueue_per_s")
    lines.append("(limit: one redis-py LPUSH round trip per job; for cli_dispatch_ms: python -c pass)")
    if f and r and e and lim:
        lines.append(f"forge redis enqueue / LPUSH limit: {e / lim:.2f}   cli dispatch redis / file: {r / f:.2f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--cli-runs", type=int, default=21)
    ap.add_argument("--dir", type=Path, default=None, help="where the file queue lives (default: under $HOME)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    redis_url = os.environ.get("FORGE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    import forge

    print(f"forge from {Path(forge.__file__).parent}, python {sys.executable}")
    rounds = []
    for i in range(args.rounds):
        r = one_round(args.jobs, args.cli_runs, redis_url, args.dir or Path.home())
        rounds.append(r)
        print(table(r, f"round {i + 1} of {args.rounds} ({args.jobs} jobs)"), flush=True)
    if args.rounds > 1:
        med = {c: {k: statistics.median([r[c][k] for r in rounds]) for k in rounds[0][c]} for c in COLUMNS}
        print(table(med, f"median of {args.rounds} rounds"))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"jobs": args.jobs, "rounds": rounds}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

