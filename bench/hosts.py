"""Workers on several "hosts" (network, UTS, PID and mount namespaces) sharing one Redis.

    python bench/hosts.py storm --hosts 3 --workers 2 --jobs 3000 --seconds 60
    python bench/hosts.py scale --jobs 4000 --rounds 3

``storm``: a kill storm across hosts. Every ~``--interval`` s either one worker is SIGKILLed
(and a successor started on its host) or, one time in ``--host-kill-share``, a whole host is
cut off (its PID namespace's init SIGKILLed: every process of it dies at once) and booted
again with fresh workers. Then the queue is drained and checked from the jobs' own start and
end stamps (``tests/reliability/checker.py``, as ``bench/chaos.py`` does): lost, concurrent
and unexpected runs must be 0, extra runs at most the kills that caught a worker holding a
claim, nothing left reserved. Exits 1 if an invariant broke.

``scale``: drain rate of ``--jobs`` trivial jobs with 1, 2, 4 and 8 workers spread over 4
hosts (round robin), each configuration ``--rounds`` times, interleaved; beside it, the same
drain with 1 and 2 workers in the root namespace (no lab), and per point the Redis server's
CPU (``/proc/<pid>/stat``) and the whole machine's (``/proc/stat``), so the curve's bend can
be read against what bounds it.

Needs root, iproute2, util-linux and redis-server (the lab starts its own Redis).
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from reliability.deploy import Deploy, HostWorker  # noqa: E402
from reliability.hosts import (  # noqa: E402
    Host,
    Lab,
    cpu_seconds,
    group_cpu_seconds,
    machine_busy_seconds,
    unavailable,
)
from waitfor import wait_for  # noqa: E402

from forge.queue import QueuedCommand  # noqa: E402

# -- the storm ----------------------------------------------------------------------------------


class Storm:
    def __init__(self, lab: Lab, deploy: Deploy, per_host: int, rng: random.Random) -> None:
        self.lab, self.d, self.per_host, self.rng = lab, deploy, per_host, rng
        self.workers: dict[str, HostWorker] = {}  # name -> live worker
        self.killed_names: set[str] = set()
        self.killed_at: dict[int, float] = {}
        self.host_kills: list[tuple[Host, int, float]] = []
        self.worker_kills = 0
        self.crashes = 0
        self.started = 0
        self._seq = 0

    def spawn(self, host: Host) -> None:
        self._seq += 1
        name = f"{host.name}.b{host.incarnation}.w{self._seq}"
        self.workers[name] = self.d.worker(host, "--sleep=0.2", name=name)
        self.started += 1

    def start(self) -> None:
        for h in self.lab.hosts:
            for _ in range(self.per_host):
                self.spawn(h)

    def tend(self) -> None:
        """Boot hosts that are down, restart workers that died on their own."""
        for h in self.lab.hosts:
            if not h.up:
                h.start()
                for _ in range(self.per_host):
                    self.spawn(h)
        for name, w in list(self.workers.items()):
            if w.exit_code() is not None:
                del self.workers[name]
                self.crashes += 1
                self.spawn(w.host)

    def kill_worker(self) -> None:
        name = self.rng.choice(sorted(self.workers))
        w = self.workers.pop(name)
        h = w.host
        children = h.children(w.pid)
        w.signal(signal.SIGKILL)
        wait_for(lambda: w.exit_code() is not None, 30, 0.002, f"{name} reaped")
        reaped = time.time()
        # Its job process dies with it (PR_SET_PDEATHSIG); until it is seen gone, a run it
        # started may still be going.
        end = time.monotonic() + 2.0
        while time.monotonic() < end and h.alive(children):
            time.sleep(0.002)
        gone = time.time() if not h.alive(children) else None
        self.killed_at[self.d.gpid(h, w.incarnation, w.pid)] = reaped
        for c in children:
            if gone is not None:
                self.killed_at[self.d.gpid(h, w.incarnation, c)] = gone
        self.killed_names.add(name)
        self.worker_kills += 1
        self.spawn(h)

    def kill_host(self) -> None:
        up = [h for h in self.lab.hosts if h.up]
        if len(up) < 2:
            return self.kill_worker()
        h = self.rng.choice(up)
        inc = h.incarnation
        _, gone = h.kill()
        self.host_kills.append((h, inc, gone))
        for name, w in list(self.workers.items()):
            if w.host is h and w.incarnation == inc:
                del self.workers[name]
                self.killed_names.add(name)
        return None

    def claims_hit(self) -> int:
        """Kills that caught a worker holding a claim: a claimed event by it with no outcome it
        recorded for that attempt."""
        hit = 0
        for info in self.d.backend.jobs(queue="default"):
            open_claims: dict[int, str] = {}
            for ev in info.events:
                if ev.event == "claimed" and ev.worker:
                    open_claims[ev.attempt] = ev.worker
                elif ev.event in ("done", "released", "failed") and ev.worker and open_claims.get(ev.attempt) == ev.worker:
                    del open_claims[ev.attempt]
            hit += sum(1 for w in open_claims.values() if w in self.killed_names)
        return hit


def storm(a: argparse.Namespace) -> int:
    rng = random.Random(a.seed)
    with tempfile.TemporaryDirectory(prefix="forge-hosts-") as tmp, Lab(Path(tmp), hosts=a.hosts) as lab:
        d = lab.deploy("storm", lease="10s")
        try:
            cmd = QueuedCommand("probe:tick").with_args([str(a.job_ms)]).with_max_attempts(100).with_timeout(1.0)
            q = d.queue()
            ids: list[str] = []
            for i in range(0, a.jobs, 1000):
                ids += q.dispatch_many([cmd] * min(1000, a.jobs - i))
            s = Storm(lab, d, a.workers, rng)
            began = time.monotonic()
            s.start()
            time.sleep(1.0)  # let the first workers load
            while time.monotonic() - began < a.seconds:
                time.sleep(a.interval * rng.uniform(0.5, 1.5))
                s.tend()
                if rng.random() < a.host_kill_share:
                    s.kill_host()
                else:
                    s.kill_worker()
                (st,) = d.backend.stats(["default"])
                if st.done + st.failed >= a.jobs:
                    break
            storm_s = time.monotonic() - began
            drained = False
            end = time.monotonic() + a.drain_timeout
            while time.monotonic() < end:
                s.tend()
                (st,) = d.backend.stats(["default"])
                if st.done + st.failed >= a.jobs and st.reserved == 0 and st.size == 0:
                    drained = True
                    break
                time.sleep(0.2)
            d.stop_workers()
            elapsed = time.monotonic() - began
            f = d.figures(ids, killed_at=s.killed_at, host_kills=s.host_kills)
            hit = s.claims_hit()
            (st,) = d.backend.stats(["default"])
            hosts_ran = sorted({r["host"] for r in d.records()})
        finally:
            d.close()
    ok = drained and f.lost == f.concurrent == f.unexpected == 0 and f.extra_runs <= hit and st.reserved == 0
    print(f.line("storm-hosts", hosts=a.hosts, workers_per_host=a.workers, host_kills=len(s.host_kills),
                 worker_kills=s.worker_kills, kills_hit_claim=hit, worker_crashes=s.crashes,
                 workers_started=s.started, failed=st.failed, reserved_after=st.reserved,
                 storm_seconds=round(storm_s, 1), seconds=round(elapsed, 1), drained=drained,
                 hosts_ran=",".join(hosts_ran)))
    if a.json:
        Path(a.json).write_text(json.dumps({k: v for k, v in vars(f).items() if not k.endswith("_ids")}, indent=2))
    if not ok:
        print(f"INVARIANT BROKEN: lost={f.lost_ids[:5]} concurrent={f.concurrent_ids[:5]} "
              f"unexpected={f.unexpected_ids[:5]} extra_runs={f.extra_runs} > kills_hit_claim={hit}?",
              file=sys.stderr)
    return 0 if ok else 1


# -- the scale curve ----------------------------------------------------------------------------


def _drain(lab: Lab, d: Deploy, n: int, spawn: Any) -> dict[str, float]:
    """Start workers with ``spawn()`` (a list of objects with wait_ready/stop), dispatch ``n``
    trivial jobs at once, time the drain; Redis's and the machine's CPU over it."""
    workers = spawn()
    for w in workers:
        w.wait_ready()
    q = d.queue()
    assert lab.redis is not None

    def pids() -> list[int]:  # the workers and their job processes (on lab hosts: all of the host)
        return [p for h in lab.hosts for p in h.pids()] + [p for w in workers for p in w.pids()]

    r0, (b0, t0m), f0 = cpu_seconds(lab.redis.pid), machine_busy_seconds(), group_cpu_seconds(pids())
    t0 = time.perf_counter()
    for i in range(0, n, 5000):
        q.dispatch_many([QueuedCommand("probe:noop")] * min(5000, n - i))
    wait_for(lambda: d.backend.stats(["default"])[0].done >= n, 600, 0.02, "drained")
    elapsed = time.perf_counter() - t0
    r1, (b1, t1m) = cpu_seconds(lab.redis.pid), machine_busy_seconds()
    f1 = group_cpu_seconds(pids())
    for w in workers:
        w.stop()
    (st,) = d.backend.stats(["default"])
    assert st.done == n and st.failed == 0, st
    return {"jobs_per_s": n / elapsed, "redis_cpu_pct": (r1 - r0) / elapsed * 100,
            "machine_busy_pct": (b1 - b0) / max(t1m - t0m, 1e-9) * 100,
            "redis_us_per_job": (r1 - r0) / n * 1e6, "workers_ms_per_job": (f1 - f0) / n * 1e3}


class _LabWorker:
    def __init__(self, w: HostWorker) -> None:
        self.w = w

    def wait_ready(self) -> None:
        self.w.wait_event("worker_started", 120)

    def pids(self) -> list[int]:
        return []  # counted per host: every process of the lab's hosts (see _drain)

    def stop(self) -> None:
        self.w.signal(signal.SIGTERM)
        self.w.wait(120)


class _LocalWorker:
    """A worker in the root namespace (no lab host): the reference."""

    def __init__(self, d: Deploy, out: Path) -> None:
        self.out = out
        with open(out, "wb") as fh:
            self.p = subprocess.Popen([sys.executable, "-m", "forge", "queue:work", "--json", "--sleep=0.5"],
                                      env=d.env, cwd=Path(d.env["FORGE_CONFIG"]).parent, stdin=subprocess.DEVNULL,
                                      stdout=fh, stderr=subprocess.STDOUT)

    def wait_ready(self) -> None:
        wait_for(lambda: "worker_started" in self.out.read_text(), 120, 0.05, "local worker started")

    def pids(self) -> list[int]:
        kids = Path(f"/proc/{self.p.pid}/task/{self.p.pid}/children").read_text().split()
        return [self.p.pid, *(int(k) for k in kids)]

    def stop(self) -> None:
        self.p.terminate()
        self.p.wait(120)


def scale(a: argparse.Namespace) -> int:
    counts = [int(c) for c in a.counts.split(",")]
    configs: list[tuple[str, int]] = [("lab", c) for c in counts] + [("local", c) for c in (1, 2)]
    results: dict[str, list[dict[str, float]]] = {f"{k}-{c}": [] for k, c in configs}
    with tempfile.TemporaryDirectory(prefix="forge-hosts-") as tmp, Lab(Path(tmp), hosts=4) as lab:
        for rnd in range(a.rounds):
            order = configs[:] if rnd % 2 == 0 else configs[::-1]
            for kind, c in order:
                d = lab.deploy(f"scale-{kind}-{c}-{rnd}")
                try:
                    if kind == "lab":
                        def spawn(d: Deploy = d, c: int = c) -> list[Any]:
                            return [_LabWorker(d.worker(lab.hosts[i % 4], "--sleep=0.5")) for i in range(c)]
                    else:
                        def spawn(d: Deploy = d, c: int = c) -> list[Any]:
                            return [_LocalWorker(d, Path(tmp) / f"local-{i}.jsonl") for i in range(c)]
                    res = _drain(lab, d, a.jobs, spawn)
                finally:
                    d.close()
                results[f"{kind}-{c}"].append(res)
                print(f"round {rnd + 1} {kind:5} {c} workers: {res['jobs_per_s']:7.0f} jobs/s, "
                      f"Redis CPU {res['redis_cpu_pct']:5.1f}%, machine busy {res['machine_busy_pct']:5.1f}%",
                      flush=True)
    with open("/proc/loadavg") as fh:
        load = fh.read().split()[:3]
    print(f"\n{a.jobs} trivial jobs (probe:noop), median of {a.rounds} rounds; load average at the end: "
          f"{' '.join(load)} (other work on the machine counts in 'machine busy')")
    print(f"{'workers':>22} {'jobs/s':>8} {'x 1 worker':>10} {'Redis CPU':>10} {'machine busy':>13} "
          f"{'Redis us/job':>13} {'workers ms/job':>15}")
    base = statistics.median(r["jobs_per_s"] for r in results[f"lab-{counts[0]}"])
    summary = {}
    for kind, c in configs:
        rs = results[f"{kind}-{c}"]
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        summary[f"{kind}-{c}"] = med
        label = f"{c} over {min(c, 4)} host(s)" if kind == "lab" else f"{c} in the root ns"
        print(f"{label:>22} {med['jobs_per_s']:8.0f} {med['jobs_per_s'] / base:10.2f} "
              f"{med['redis_cpu_pct']:9.1f}% {med['machine_busy_pct']:12.1f}% "
              f"{med['redis_us_per_job']:13.0f} {med['workers_ms_per_job']:15.2f}")
    lab8 = summary.get(f"lab-{counts[-1]}")
    if lab8:
        print(f"\nRedis would be one core busy at about {1e6 / lab8['redis_us_per_job']:,.0f} jobs/s "
              f"(its CPU per job at {counts[-1]} workers); the workers need {lab8['workers_ms_per_job']:.2f} ms "
              f"of CPU per job, so N free cores drain about N x {1e3 / lab8['workers_ms_per_job']:,.0f} jobs/s "
              f"until then.")
    if a.json:
        Path(a.json).write_text(json.dumps({"jobs": a.jobs, "rounds": a.rounds, "load": load,
                                            "median": summary, "runs": results}, indent=2))
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("storm", help="a kill storm across hosts, then the accounting")
    s.add_argument("--hosts", type=int, default=3)
    s.add_argument("--workers", type=int, default=2, help="workers per host")
    s.add_argument("--jobs", type=int, default=3000)
    s.add_argument("--seconds", type=float, default=60.0, help="how long to keep killing")
    s.add_argument("--interval", type=float, default=0.5, help="mean seconds between kills")
    s.add_argument("--host-kill-share", type=float, default=0.2, help="share of kills that cut a whole host")
    s.add_argument("--job-ms", type=int, default=10)
    s.add_argument("--drain-timeout", type=float, default=600.0)
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--json", metavar="FILE")
    c = sub.add_parser("scale", help="drain rate with 1, 2, 4, 8 workers over 4 hosts")
    c.add_argument("--jobs", type=int, default=4000)
    c.add_argument("--rounds", type=int, default=3)
    c.add_argument("--counts", default="1,2,4,8")
    c.add_argument("--json", metavar="FILE")
    a = p.parse_args()
    reason = unavailable()
    if reason:
        print(f"bench/hosts.py: {reason}", file=sys.stderr)
        return 2
    return storm(a) if a.what == "storm" else scale(a)


if __name__ == "__main__":
    sys.exit(main())
