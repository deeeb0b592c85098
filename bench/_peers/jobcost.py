"""The cost of one trivial job on Redis, per process: CPU of the worker, of its job process and
of the Redis server, per job, while one ``forge queue:work --stop-when-empty`` drains N
``probe:noop`` jobs (queued first, start-up included in the rate).

    python bench/_peers/jobcost.py 3000                 # CPU per job, drain rate
    python bench/_peers/jobcost.py 2000 --strace        # + system calls (strace -c -f)
    python bench/_peers/jobcost.py 2000 --profile       # + the worker's cProfile (tottime)

Run it with a checkout's venv python to measure that checkout (alternate two of them: the
machine's load drifts). FORGE_TEST_REDIS_URL as for bench/peers.py; its keys are deleted.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from worker import in_env, make_project  # noqa: E402


def cpu_seconds(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def redis_pid(port: int) -> int | None:
    out = subprocess.run(["pgrep", "-a", "-x", "redis-server"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        if f":{port}" in line:
            return int(line.split()[0])
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("jobs", type=int, nargs="?", default=3000)
    ap.add_argument("--strace", action="store_true")
    ap.add_argument("--profile", action="store_true")
    a = ap.parse_args()
    url = os.environ.get("FORGE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    base = Path(tempfile.mkdtemp(prefix="forge-jobcost-"))
    env = make_project(base, "redis", url)
    fq = in_env(env)
    q = fq.CommandQueue("default")
    noop = fq.QueuedCommand("probe:noop")
    n = a.jobs
    for _ in range(n):
        q.dispatch(noop)
    cmd = [sys.executable, "-m", "forge", "queue:work", "--json", "--stop-when-empty"]
    if a.profile:
        cmd[1:3] = ["-m", "cProfile", "-o", str(base / "worker.prof"), "-m", "forge"]
    if a.strace:
        cmd = ["strace", "-c", "-f", "-o", str(base / "strace.txt"), *cmd]
    rpid = redis_pid(int(url.rsplit(":", 1)[1].split("/")[0]) if url.count(":") > 1 else 6379)
    r0 = cpu_seconds(rpid) if rpid else None
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=base, stdout=subprocess.DEVNULL)
    worker = job = 0.0
    target = proc.pid
    while proc.poll() is None:
        if a.strace:  # the worker is strace's child
            kids = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
            target = int(kids.read_text().split()[0]) if kids.exists() and kids.read_text().split() else proc.pid
        worker = cpu_seconds(target) or worker
        try:
            kids = Path(f"/proc/{target}/task/{target}/children").read_text().split()
            if kids:
                job = cpu_seconds(int(kids[0])) or job
        except OSError:
            pass
        time.sleep(0.05)
    elapsed = time.perf_counter() - t
    line = f"{n} jobs: drain {n / elapsed:,.0f} jobs/s (start-up included); CPU a job: worker {worker / n * 1e6:.0f} us, " \
           f"job process {job / n * 1e6:.0f} us"
    if r0 is not None and rpid:
        line += f", redis-server {((cpu_seconds(rpid) or r0) - r0) / n * 1e6:.0f} us"
    print(line)
    if a.strace:
        text = (base / "strace.txt").read_text()
        print(text)
        total = [ln.split() for ln in text.splitlines() if ln.strip().endswith("total")]
        if total:  # % time, seconds, usecs/call, calls, [errors,] total
            print(f"system calls a job (worker and job process): {int(total[0][3]) / n:.0f}")
    if a.profile:
        import pstats

        pstats.Stats(str(base / "worker.prof")).sort_stats("tottime").print_stats(30)
    b = q.backend
    for key in b.server.r.scan_iter(f"{b.prefix}:*", count=1000):  # type: ignore[attr-defined]
        b.server.r.delete(key)  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
