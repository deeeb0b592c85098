"""Limits enforced at claim, and isolatable commands, on both backends (``forge.limits``).

Real workers (``python -m forge queue:work``), real signals, the real Redis; every wait is for
an event (a job's state, a ledger line, a process's exit). The 10-second rate soak is in
``bench/limits.py``; here the rate is held over a 4-second window.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from reliability.harness import Target, worker_argv
from waitfor import wait_for

from forge.errors import EXIT_ISOLATED
from forge.job import State
from forge.limits import LIMITS_KEY
from forge.limits.spec import parse_rate
from forge.queue import QueuedCommand


def forge(target: Target, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "forge", *args], env=target.env, capture_output=True,
                          text=True, timeout=timeout)


def configure(target: Target, text: str, *, lease: str | None = None) -> None:
    """Append ``text`` to the target's forge.toml (and give Redis a short lease)."""
    path = target.workdir / "forge.toml"
    toml = path.read_text()
    if lease:
        toml = toml.replace(f'prefix = "{target.prefix}"\n', f'prefix = "{target.prefix}"\nlease = "{lease}"\n')
    path.write_text(toml + text)


@pytest.fixture
def workers(queue_target: Target) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Worker processes a test starts (appended to the list); stopped by pid at the end."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def start(target: Target, procs: list[subprocess.Popen[bytes]], *args: str) -> subprocess.Popen[bytes]:
    p = subprocess.Popen(worker_argv(*args), env=target.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs.append(p)
    return p


def ledger(target: Target) -> list[dict[str, Any]]:
    try:
        text = target.ledger.read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def info(target: Target, job_id: str) -> Any:
    return target.backend.find(job_id)


def state(target: Target, job_id: str) -> State | None:
    found = info(target, job_id)
    return found.state if found else None


def blocked_by(target: Target, job_id: str) -> str | None:
    out = forge(target, "queue:list", "--json", "--limit=1000")
    assert out.returncode == 0, out.stderr
    return next((j["blocked_by"] for j in json.loads(out.stdout)["jobs"] if j["id"] == job_id), None)


def limits_json(target: Target) -> dict[str, Any]:
    out = forge(target, "queue:limits", "--json")
    assert out.returncode == 0, out.stderr
    return {row["scope"]: row for row in json.loads(out.stdout)["limits"]}


def drain(procs: list[subprocess.Popen[bytes]], timeout: float = 120) -> None:
    for p in procs:
        assert p.wait(timeout=timeout) == 0


def max_overlap(runs: list[tuple[float, float]]) -> int:
    edges = sorted([(s, 1) for s, _ in runs] + [(e, -1) for _, e in runs], key=lambda x: (x[0], x[1]))
    live = peak = 0
    for _, d in edges:
        live += d
        peak = max(peak, live)
    return peak


# -- limits at claim, with real concurrent workers --------------------------------------------------

def test_parallelism_is_never_exceeded_across_workers(queue_target: Target, workers: list[Any]) -> None:
    configure(queue_target, "\n[limits.queues.par]\nparallel = 2\n")
    ids = queue_target.queue("par").dispatch_many([QueuedCommand("probe:tick").with_args(["300"]) for _ in range(10)])
    for _ in range(4):
        start(queue_target, workers, "--queue=par", "--stop-when-empty")
    drain(workers)
    runs = [(r["start"], r["end"]) for r in ledger(queue_target) if r["kind"] == "end"]
    assert len(runs) == 10
    assert max_overlap(runs) == 2  # measured from the jobs' own stamps: never 3, and 2 did run at once
    assert all(info(queue_target, i).attempts == 1 and state(queue_target, i) == State.DONE for i in ids)


def test_rate_is_held_across_workers(queue_target: Target, workers: list[Any]) -> None:
    # burst 3: a worker woken late on a loaded machine may catch up (burst 1, the default, is
    # soaked for 10 s by bench/limits.py --soak); it still may not run ahead by more than 2.
    configure(queue_target, '\n[limits.queues.rated]\nrate = "20/s"\nburst = 3\n')
    ids = queue_target.queue("rated").dispatch_many([QueuedCommand("probe:tick").with_args(["0"]) for _ in range(120)])
    for _ in range(4):
        start(queue_target, workers, "--queue=rated")
    window = 4.0
    wait_for(lambda: len([r for r in ledger(queue_target) if r["kind"] == "start"]) >= 100, timeout=90, interval=0.2)
    # The claims are what the rate governs (each job's "claimed" event, on the store's clock); a
    # job's own start stamp lags its claim by however long a loaded machine takes to hand it over.
    starts = sorted(e.at for i in ids if (found := info(queue_target, i)) for e in found.events if e.event == "claimed")
    assert len(starts) >= 100
    t0 = starts[5]  # once every worker is up
    in_window = [s for s in starts if t0 <= s < t0 + window]
    assert 20 * window * 0.9 <= len(in_window) <= 20 * window * 1.1, len(in_window)
    # no second of the run saw more than 20 claims, plus the burst's 2
    assert max(sum(1 for t in starts if s <= t < s + 1.0) for s in starts) <= 22


def test_held_job_stays_pending_spends_no_attempt_and_blocks_no_other_key(queue_target: Target,
                                                                          workers: list[Any]) -> None:
    # No [limits] at all: the keys come with the jobs (a worker switches to limited claims on the first).
    def dispatch(key: str, *args: str) -> str:
        out = forge(queue_target, "queue:dispatch", f"--concurrency-key={key}", "--concurrency=1", "probe:run", *args)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    first = dispatch("tenant:1", "--sleep=4")
    held = dispatch("tenant:1")
    other = dispatch("tenant:2")
    start(queue_target, workers, "--sleep=10")  # a slot's release must wake it, not its sleep
    # (the first worker first: two plain workers meeting keyed jobs at once may swap first and held)
    wait_for(lambda: state(queue_target, first) == State.RESERVED, timeout=60)
    start(queue_target, workers, "--sleep=10")
    wait_for(lambda: state(queue_target, other) == State.DONE, timeout=60)
    assert state(queue_target, first) == State.RESERVED
    assert state(queue_target, held) == State.PENDING and info(queue_target, held).attempts == 0
    assert blocked_by(queue_target, held) == "concurrency tenant:1 (1/1)"
    assert blocked_by(queue_target, other) is None
    wait_for(lambda: state(queue_target, held) == State.DONE, timeout=60)
    assert info(queue_target, held).attempts == 1
    ends = {r["job"]: r for r in ledger(queue_target) if r["kind"] == "end"}
    assert ends[held]["start"] >= ends[first]["end"]  # never both at once
    assert ends[held]["start"] - ends[first]["end"] < 2.0, "a freed slot wakes a waiting worker (not its 10 s sleep)"


def test_killed_worker_frees_its_slot(queue_target: Target, workers: list[Any]) -> None:
    configure(queue_target, '\n[limits.keys."tenant:*"]\nconcurrency = 1\n', lease="10s")
    out = forge(queue_target, "queue:dispatch", "--concurrency-key=tenant:9", "probe:run", "--sleep=60")
    assert out.returncode == 0, out.stderr
    long = out.stdout.strip()
    victim = start(queue_target, workers, "--sleep=1")
    wait_for(lambda: state(queue_target, long) == State.RESERVED, timeout=60)
    wait_for(lambda: any(r["job"] == long for r in ledger(queue_target)), timeout=60)
    assert limits_json(queue_target)["c:tenant:9"]["held"] == 1
    nxt = forge(queue_target, "queue:dispatch", "--concurrency-key=tenant:9", "probe:run")
    assert nxt.returncode == 0, nxt.stderr
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = time.monotonic()
    if queue_target.kind == "file":
        assert limits_json(queue_target)["c:tenant:9"]["held"] == 0  # the flock died with the worker
    start(queue_target, workers, "--sleep=1")
    wait_for(lambda: state(queue_target, nxt.stdout.strip()) == State.DONE, timeout=60)
    if queue_target.kind == "redis":
        assert time.monotonic() - killed_at < 10 + 6  # within the slot's lease (and the recovery pass)


# -- isolation ---------------------------------------------------------------------------------

def test_isolation_direct_runs_jobs_and_a_killed_holder(queue_target: Target, workers: list[Any]) -> None:
    configure(queue_target, "", lease="10s")
    holder = subprocess.Popen([sys.executable, "-m", "forge", "probe:isolated", "acme", "--sleep=120"],
                              env=queue_target.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: any(r.get("pid") == holder.pid for r in ledger(queue_target)), timeout=60)
        busy = forge(queue_target, "probe:isolated", "acme")
        assert busy.returncode == EXIT_ISOLATED == 9
        assert 'another run holds its isolation lock "probe:acme"' in busy.stderr
        assert forge(queue_target, "probe:isolated", "zed").returncode == 0  # another tenant's key
        assert forge(queue_target, "probe:run", "--isolated").returncode == 0  # its own key: probe:run

        def dispatch(*args: str) -> str:
            out = forge(queue_target, "queue:dispatch", *args)
            assert out.returncode == 0, out.stderr
            return out.stdout.strip()

        waits = dispatch("probe:isolated", "acme")
        dropped = dispatch("--on-busy=drop", "probe:isolated", "acme")
        free = dispatch("probe:isolated", "zed")
        start(queue_target, workers, "--sleep=1")
        wait_for(lambda: state(queue_target, free) == State.DONE, timeout=60)
        wait_for(lambda: state(queue_target, dropped) == State.FAILED, timeout=60)
        assert info(queue_target, dropped).failure.reason == "isolated"
        assert state(queue_target, waits) == State.PENDING and info(queue_target, waits).attempts == 0
        assert blocked_by(queue_target, waits) == "isolation probe:acme"
        holders = limits_json(queue_target)["i:probe:acme"]["holders"]
        assert [h.get("pid") for h in holders] == [holder.pid]
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        killed_at = time.monotonic()
        if queue_target.kind == "file":  # the flock died with the process: free at once (the
            # worker may already hold it again, for the job that waited)
            holders = limits_json(queue_target)["i:probe:acme"]["holders"]
            assert holder.pid not in [h.get("pid") for h in holders]
        wait_for(lambda: state(queue_target, waits) == State.DONE, timeout=30)
        assert info(queue_target, waits).attempts == 1
        if queue_target.kind == "redis":  # a lease: free within one lease (10 s)
            assert time.monotonic() - killed_at < 10 + 3
        # The worker held the job's lock, not the job's own process: a direct run met it.
        assert any(r.get("job") == waits for r in ledger(queue_target))
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_a_running_isolated_job_blocks_a_direct_run(queue_target: Target, workers: list[Any]) -> None:
    job = queue_target.queue().dispatch(QueuedCommand("probe:isolated").with_args(["acme", "--sleep=30"]))
    start(queue_target, workers, "--sleep=1")
    wait_for(lambda: any(r.get("job") == job for r in ledger(queue_target)), timeout=60)
    busy = forge(queue_target, "probe:isolated", "acme")
    assert busy.returncode == 9
    assert f"(job {job})" in busy.stderr
    assert forge(queue_target, "queue:cancel", "--running", job).returncode == 0
    wait_for(lambda: state(queue_target, job) == State.FAILED, timeout=60)
    wait_for(lambda: forge(queue_target, "probe:isolated", "acme").returncode == 0, timeout=30, interval=0.2)


# -- input checks ---------------------------------------------------------------------------------

def test_rates_parse_and_bad_ones_are_refused() -> None:
    assert parse_rate("100/m").interval == pytest.approx(0.6)
    assert parse_rate("20/s").interval == pytest.approx(0.05)
    assert parse_rate("5/10s").interval == pytest.approx(2.0)
    assert parse_rate("1000/hour").interval == pytest.approx(3.6)
    assert parse_rate("5/500ms").interval == pytest.approx(0.1)
    assert parse_rate("3/minutes").interval == pytest.approx(20.0)
    assert parse_rate("10/m", burst=5).burst == 5
    for bad in ("100", "0/s", "10/0s", "ten/s", "5/banana", ""):
        with pytest.raises(ValueError, match="Invalid rate"):
            parse_rate(bad)


@pytest.mark.parametrize(("toml", "message"), [
    ("[limits.queues.emails]\nparallel = 0\n", "limits.queues.emails.parallel"),
    ('[limits.queues.emails]\nrate = "fast"\n', "limits.queues.emails.rate"),
    ("[limits.queues.emails]\nburst = 3\n", "sets no limit"),
    ('[limits.queues.emails]\nrate = "1/s"\nspeed = 1\n', "unknown key limits.queues.emails.speed"),
    ('[limits.keys."tenant:*"]\nconcurrency = "two"\n', 'limits.keys."tenant:*".concurrency'),
    ("[limits.tenants]\nx = 1\n", "unknown key limits.tenants"),
])
def test_bad_limits_config_is_a_usage_error(project: Path, toml: str, message: str) -> None:
    (project / "forge.toml").write_text('[forge]\ncommands = ["commands"]\n' + toml)
    for argv in (["queue:limits"], ["queue:work", "--once"]):
        out = subprocess.run([sys.executable, "-m", "forge", *argv], capture_output=True, text=True, timeout=60)
        assert out.returncode == 2, (argv, out.stderr)
        assert message in out.stderr and out.stderr.count("\n") == 1, out.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--concurrency=2"], "--concurrency needs --concurrency-key"),
    (["--concurrency-key=tenant:1"], 'set [limits.keys."tenant:1"] concurrency'),
    (["--rate=5/s"], "--rate and --burst need --rate-key"),
    (["--rate-key=api", "--rate=5/fortnight"], "Invalid --rate"),
    (["--rate-key=api"], "has no rate"),
    (["--concurrency-key=has space", "--concurrency=1"], "Invalid --concurrency-key"),
    (["--on-busy=later"], "Invalid --on-busy"),
])
def test_bad_dispatch_limits_are_refused_and_store_nothing(queue_target: Target, args: list[str], message: str) -> None:
    out = forge(queue_target, "queue:dispatch", *args, "probe:noop")
    assert out.returncode == 2, out.stderr
    assert message in out.stderr
    assert queue_target.backend.stats() == [] or all(s.size == 0 for s in queue_target.backend.stats())


def test_dispatch_stores_the_jobs_limits(queue_target: Target) -> None:
    for _ in range(2):  # the second dispatch takes the fast path (the command cache is saved by the first)
        out = forge(queue_target, "queue:dispatch", "--concurrency-key=tenant:42", "--concurrency=2",
                    "--rate-key=api:stripe", "--rate=100/m", "--burst=5", "probe:noop")
        assert out.returncode == 0, out.stderr
        meta = info(queue_target, out.stdout.strip()).job.metadata[LIMITS_KEY]
        assert meta == {"concurrency_key": "tenant:42", "concurrency": 2, "rate_key": "api:stripe",
                        "rate": "100/m", "burst": 5, "rate_us": 600000}
    iso = forge(queue_target, "queue:dispatch", "probe:isolated", "acme")
    assert info(queue_target, iso.stdout.strip()).job.metadata[LIMITS_KEY] == {"isolation": "probe:acme",
                                                                               "on_busy": "wait"}


def test_isolation_key_template_names_a_missing_parameter(project: Path) -> None:
    (project / "commands" / "bad.py").write_text(
        "from forge import command\n\n@command('bad:iso', isolated='x:{nope}')\ndef bad(tenant: str) -> None:\n    pass\n")
    for argv in (["bad:iso", "t"], ["queue:dispatch", "bad:iso", "t"]):
        out = subprocess.run([sys.executable, "-m", "forge", *argv], capture_output=True, text=True, timeout=60)
        assert out.returncode == 2, out.stderr
        assert "names {nope}, which is not one of its parameters (tenant)" in out.stderr


def test_queue_limits_with_nothing_configured(queue_target: Target) -> None:
    out = forge(queue_target, "queue:limits", "--json")
    assert out.returncode == 0 and json.loads(out.stdout) == {"version": 2, "limits": []}
    assert "No limits configured" in forge(queue_target, "queue:limits").stderr


def test_forge_call_holds_the_lock_too(project: Path, tmp_path: Path) -> None:
    import forge

    (project / "commands" / "iso.py").write_text(
        "import os, time\nfrom forge import command\n\n@command('iso:run', isolated=True)\n"
        "def iso(sleep: float = 0.0, mark: str = '') -> None:\n"
        "    if mark:\n        open(mark, 'w').close()\n    time.sleep(sleep)\n")
    mark = tmp_path / "started"
    holder = subprocess.Popen([sys.executable, "-m", "forge", "iso:run", "--sleep=60", f"--mark={mark}"])
    try:
        wait_for(mark.exists, timeout=60)
        busy = forge.call("iso:run")
        assert busy.exit_code == 9 and 'isolation lock "iso:run"' in (busy.error or "")
        holder.kill()
        holder.wait()
        assert forge.call("iso:run").exit_code == 0  # the flock died with the holder
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_from_file_lines_carry_limits(queue_target: Target) -> None:
    lines = queue_target.workdir / "jobs.jsonl"
    lines.write_text('{"command": "probe:noop", "concurrency_key": "tenant:5", "concurrency": 3}\n'
                     '{"command": "probe:isolated", "args": ["acme"], "on_busy": "drop"}\n')
    out = forge(queue_target, "queue:dispatch", "--from-file", str(lines))
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.split()
    assert info(queue_target, first).job.metadata[LIMITS_KEY] == {"concurrency_key": "tenant:5", "concurrency": 3}
    assert info(queue_target, second).job.metadata[LIMITS_KEY] == {"isolation": "probe:acme", "on_busy": "drop"}


def test_a_release_wakes_one_waiting_worker_and_forgets_dead_ones(tmp_path: Path) -> None:
    """File backend: each worker waiting for a scope has its own watched directory; a release
    creates the wake-up file in one live waiter's only (the others sleep on), and a dead
    waiter's directory is removed on the way."""
    from forge.backends.file.backend import FileBackend
    from forge.backends.file.limits import scope_hash
    from forge.limits.spec import Need

    b = FileBackend(tmp_path / "q")
    sleepers = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) for _ in range(3)]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        need = Need("slot", "c:tenant:1", "concurrency tenant:1", 1)
        holds = b.lock_scope(need, {"job": "x"})
        assert holds is not None and b.lock_scope(need, {"job": "y"}) is None
        b.limiter._lim_fd("wait")  # the directory waiters register in (made on first use)
        wait = tmp_path / "q" / "limits" / "wait"
        h = scope_hash("c:tenant:1")
        (wait / f"{h}.{dead.pid}").mkdir(mode=0o700)
        b.release_holds(holds)
        assert not (wait / f"{h}.{dead.pid}").exists() and not list(wait.glob("*/w"))  # the dead: removed
        holds = b.lock_scope(need, {"job": "z"})  # the slot was free again
        assert holds is not None
        for p in sleepers:
            (wait / f"{h}.{p.pid}").mkdir(mode=0o700)
        (wait / f"{scope_hash('c:other')}.{sleepers[0].pid}").mkdir(mode=0o700)
        b.release_holds(holds)
        woken = [p.parent.name for p in wait.glob("*/w")]
        assert len(woken) == 1 and woken[0].startswith(h), woken  # one of the three, not all
    finally:
        for p in sleepers:
            p.kill()
            p.wait()
        b.close()
