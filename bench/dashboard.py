"""Dashboard figures: server time per request with 100,000 pending jobs, and idle CPU.

    python bench/dashboard.py [--jobs 100000] [--runs 20] [--backend file|redis|both] [--idle 45]

For each backend: fills a fresh queue (a temporary directory, or a random Redis prefix) with
``--jobs`` pending jobs (``dispatch_many``) plus a few hundred done and failed ones, starts the
real ``forge dashboard`` process and requests, ``--runs`` times each, the overview, the first
page of the pending list and its last page (offset jobs-50), reading the server's own
``Server-Timing`` header (time to the response's first byte; the client's round trip is printed
too); then again with one job dispatched before each request (a queue that keeps changing: the
file backend cannot reuse its listing). Then it opens the overview in headless Chromium (Playwright, /usr/bin/chromium) and
measures the dashboard process's CPU from /proc/<pid>/stat over ``--idle`` seconds, nothing
else happening (the page stays connected to the live stream). For scale, the same run times
``forge queue:list`` (the CLI's view of the same store) in /work/wt/base (the starting commit)
when it has a venv, else in this tree.
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BASE = Path("/work/wt/base")
sys.path.insert(0, str(ROOT / "tests"))


def fill(env: dict[str, str], jobs: int) -> None:
    from forge.config import load_settings
    from forge.queue.manager import QueuedCommand, QueueManager, connect
    from forge.registry.discovery import build_registry

    settings = load_settings(env=env)
    m = QueueManager(connect(None, settings), settings=settings, registry=build_registry(settings))
    q = m.add_queue("default")
    for start in range(0, jobs, 10_000):
        q.dispatch_many([QueuedCommand("dash:echo").with_args([f"job-{start + i}"])
                         for i in range(min(10_000, jobs - start))])
    side = m.add_queue("side")
    ids = side.dispatch_many([QueuedCommand("dash:fail").with_args([f"--why=w{i % 7}"]) for i in range(300)])
    for i in ids:
        m.cancel(i)
    m.backend.close()


def timings(port: int, cookie: str, path: str, runs: int, before: Any = None) -> tuple[float, float, float]:
    """Median and p95 of the server's time, and the median round trip, in ms. ``before`` runs
    before each request (untimed)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    server, trip = [], []
    try:
        for _ in range(runs):
            if before is not None:
                before()
            t0 = time.perf_counter()
            conn.request("GET", path, headers={"Host": f"127.0.0.1:{port}", "Cookie": cookie})
            resp = conn.getresponse()
            resp.read()
            trip.append((time.perf_counter() - t0) * 1000)
            assert resp.status == 200, (path, resp.status)
            m = re.search(r"dur=([0-9.]+)", resp.getheader("Server-Timing", ""))
            server.append(float(m.group(1)) if m else float("nan"))
    finally:
        conn.close()
    server.sort()
    return statistics.median(server), server[int(len(server) * 0.95) - 1], statistics.median(trip)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def idle_cpu(url: str, pid: int, seconds: float) -> float:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page()
        page.goto(url)
        page.locator("#live-dot.on").wait_for(timeout=60_000)
        time.sleep(3)  # past the first pushes
        c0, t0 = cpu_seconds(pid), time.monotonic()
        time.sleep(seconds)
        c1, t1 = cpu_seconds(pid), time.monotonic()
        browser.close()
    return 100 * (c1 - c0) / (t1 - t0)


def queue_list_time(env: dict[str, str], runs: int = 5) -> tuple[str, float]:
    py = BASE / ".venv/bin/python"
    where, exe = ("base", str(py)) if py.exists() else ("this tree", sys.executable)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([exe, "-m", "forge", "queue:list"], env=env, cwd=BASE if where == "base" else ROOT,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        times.append((time.perf_counter() - t0) * 1000)
    return where, statistics.median(times)


def bench(kind: str, jobs: int, runs: int, idle: float) -> None:
    from dashboard_support import start_dashboard, write_project

    root = Path(tempfile.mkdtemp(prefix=f"forge-bench-dash-{kind}-"))
    url = os.environ.get("FORGE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    env = write_project(root, kind, url)
    dash = None
    try:
        t0 = time.perf_counter()
        fill(env, jobs)
        print(f"[{kind}] filled {jobs:,} pending jobs (+300 failed) in {time.perf_counter() - t0:.1f} s", flush=True)
        dash = start_dashboard(env)
        cookie = f"forge_dashboard_{dash.port}={dash.token}"
        last = max(jobs - 50, 0)
        for label, path in (("overview /", "/"),
                            ("pending list, page 1", "/queues/default/jobs?state=pending"),
                            (f"pending list, offset {last:,}", f"/queues/default/jobs?state=pending&offset={last}"),
                            ("failed groups", "/failed")):
            med, p95, trip = timings(dash.port, cookie, path, runs)
            print(f"[{kind}] {label:<32} server median {med:7.1f} ms  p95 {p95:7.1f} ms  (round trip {trip:.1f} ms)",
                  flush=True)
        # A busy queue: one more job dispatched before each request, so the directory (or the
        # Redis list) has just changed and the file backend's listing cannot be reused.
        from forge.config import load_settings
        from forge.queue.manager import QueuedCommand, QueueManager, connect
        from forge.registry.discovery import build_registry

        settings = load_settings(env=env)
        m = QueueManager(connect(None, settings), settings=settings, registry=build_registry(settings))
        q = m.add_queue("default")

        def push() -> None:
            q.dispatch(QueuedCommand("dash:echo").with_args(["more"]))

        for label, path in (("overview /, changing", "/"),
                            ("pending page 1, changing", "/queues/default/jobs?state=pending"),
                            ("pending last page, changing", f"/queues/default/jobs?state=pending&offset={last}")):
            med, p95, trip = timings(dash.port, cookie, path, runs, before=push)
            print(f"[{kind}] {label:<32} server median {med:7.1f} ms  p95 {p95:7.1f} ms  (round trip {trip:.1f} ms)",
                  flush=True)
        m.backend.close()
        where, ql = queue_list_time(env)
        print(f"[{kind}] for scale: forge queue:list (a new process, {where}) median {ql:.0f} ms", flush=True)
        if idle > 0:
            pct = idle_cpu(dash.url, dash.proc.pid, idle)
            print(f"[{kind}] idle dashboard CPU, one browser on the overview, over {idle:g} s: {pct:.2f}% of a core",
                  flush=True)
    finally:
        if dash is not None:
            dash.stop()
        if kind == "redis":
            import redis

            client = redis.Redis.from_url(url)
            keys = list(client.scan_iter(match=f"{env['FORGE_TEST_PREFIX']}:*", count=10_000))
            for i in range(0, len(keys), 10_000):
                client.delete(*keys[i:i + 10_000])
            client.close()
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--backend", choices=["file", "redis", "both"], default="both")
    ap.add_argument("--idle", type=float, default=45.0, help="seconds of idle CPU measurement (0: skip)")
    args = ap.parse_args()
    for kind in (["file", "redis"] if args.backend == "both" else [args.backend]):
        bench(kind, args.jobs, args.runs, args.idle)


if __name__ == "__main__":
    main()
