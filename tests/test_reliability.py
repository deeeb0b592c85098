"""Issue 7: the reliability and security suite. Fault injection against real workers.

Each scenario asserts its invariant and prints one ``FIGURES scenario=...`` line (see it with
``pytest -s``). The figures come from ``tests/reliability/checker.py``: lost (acknowledged but
never ran to an end), duplicated (ran more than once), concurrent (two runs of one job
overlapping in time) and unexpected (ran but never dispatched). Longer soaks: ``bench/chaos.py``.

Scale for CI on a 2-core machine: the kill storm runs 2,000 jobs for ~10 s per backend; the
contention run drains 4,000 jobs with 8 workers (20,000 in ``bench/chaos.py``; set
``FORGE_CHAOS_CONTENTION_JOBS`` to change it here).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from conftest import blocked_waiting
from reliability.checker import check, read_ledger, runs_of
from reliability.harness import (
    Supervisor,
    contention,
    fill_disk,
    kill_storm,
    make_target,
    wait_done,
)
from waitfor import wait_for

from forge.errors import QueueError, UsageError
from forge.job import MAX_PAYLOAD_BYTES, Job, State, decode_file
from forge.queue import CommandQueue, QueuedCommand, QueueManager

pytestmark = pytest.mark.slow

STRACE = shutil.which("strace")
needs_strace = pytest.mark.skipif(STRACE is None, reason="strace is not installed (apt-get install strace)")
SHELLS = {"sh", "bash", "dash", "zsh", "ksh", "mksh", "csh", "tcsh", "fish", "busybox", "ash"}
STATE_DIRS = ("pending", "reserved", "done", "failed")


def figures(line: str) -> None:
    print("\n" + line, flush=True)


def forge(*args: str, env: dict[str, str] | None = None, timeout: float = 60,
          prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, sys.executable, "-m", "forge", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def env_with(**changes: str) -> dict[str, str]:
    return {**os.environ, **changes}


def job_files(queue_dir: Path, job_id: str) -> list[Path]:
    """Every file of ``job_id`` across the state directories of every queue."""
    return [p for d in STATE_DIRS for p in queue_dir.glob(f"q/*/{d}/*{job_id}*")]


def drain(env: dict[str, str] | None = None, until=None, timeout: float = 30) -> None:
    """Run ``--stop-when-empty`` workers until ``until()`` holds (a reserved job may still be locked)."""
    end = time.monotonic() + timeout
    while True:
        res = forge("queue:work", "--stop-when-empty", "--sleep=0.1", env=env, timeout=timeout)
        assert res.returncode == 0, res.stderr
        if until is None or until() or time.monotonic() > end:
            return
        time.sleep(0.2)


def trace_steps(argv: list[str], env: dict[str, str], syscalls: str, keep, out: Path, *,
                follow: bool = False) -> list[tuple[str, int, str]]:
    """Run ``argv`` under strace once; return (syscall, n, line) for each call ``keep(line)``
    selects, n counting that syscall's calls in its own process (as strace's ``when=`` does):
    the points at which to inject a fault on later runs. With ``follow``, child processes too."""
    flags = ["-f"] if follow else []
    subprocess.run([STRACE, "-qq", "-y", *flags, "-e", f"trace={syscalls}", "-o", str(out), *argv], env=env,
                   capture_output=True, timeout=60, check=True)
    counts: dict[tuple[str, str], int] = {}
    steps: dict[tuple[str, int], str] = {}
    for line in out.read_text().splitlines():
        m = re.match(r"(\d+ +)?(\w+)\(", line)
        if not m:
            continue
        pid, name = (m.group(1) or "").strip(), m.group(2)
        counts[pid, name] = counts.get((pid, name), 0) + 1
        call = line[m.start(2):]
        if keep(call):
            steps.setdefault((name, counts[pid, name]), call[:120])
    return [(name, n, line) for (name, n), line in steps.items()]


def inject(fault: str, argv: list[str], env: dict[str, str], *, follow: bool = False,
           timeout: float = 60) -> subprocess.CompletedProcess:
    flags = ["-f"] if follow else []
    return subprocess.run([STRACE, "-qq", *flags, "-o", "/dev/null", "-e", f"inject={fault}", *argv], env=env,
                          capture_output=True, text=True, timeout=timeout)


def valid_jobs(queue_dir: Path, state: str = "pending") -> list[Job]:
    """Decode every job file in ``state``; a partial or invalid one fails the test."""
    jobs = []
    for p in sorted(queue_dir.glob(f"q/*/{state}/*")):
        job, _ = decode_file(p.read_bytes())  # raises CorruptJob on a partial file
        assert job.id in p.name
        jobs.append(job)
    return jobs


def proc_dead(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def group_members(pgid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                out.append(int(d.name))
    return out


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")




def hand_made_job(command: str = "probe:run", args: tuple[str, ...] = (), **fields) -> Job:
    now = time.time()
    base = dict(id=str(uuid.uuid4()), command=command, args=args, queue="default", max_attempts=1,
                timeout=None, backoff=None, metadata={}, dispatched_at=now, available_at=now)
    return Job(**{**base, **fields})


def pending_name(job_id: str) -> str:
    return f"{int(time.time() * 1e6):016d}-{job_id}-0.job"


# -- 1. kill storm -------------------------------------------------------------------------


def test_01_kill_storm(queue_target) -> None:
    """4 workers, 2,000 short jobs, a random worker SIGKILLed every ~200 ms and restarted."""
    res = kill_storm(queue_target, workers=4, jobs=2000, seconds=10.0, interval=0.2, job_ms=10, seed=7)
    f = res.figures
    figures(res.line(f"1-kill-storm-{queue_target.kind}"))
    assert res.drained, "the queue did not drain"
    assert f.lost == 0, f.lost_ids[:5]
    assert f.concurrent == 0, f.concurrent_ids[:5]
    assert f.unexpected == 0
    assert f.extra_runs <= res.claims_hit, (f.extra_runs, res.claims_hit)
    assert res.reserved_after == 0
    assert res.crashes == 0, (queue_target.workdir / "workers.err").read_text()[-2000:]
    assert res.kills >= 20


# -- 2. dispatch killed at each step -------------------------------------------------------

DISPATCH_SYSCALLS = "write,pwrite64,fsync,fdatasync,syncfs,rename,renameat,renameat2,link,linkat"


@needs_strace
@pytest.mark.parametrize("path", ["fast", "full"])
def test_02_dispatch_killed_at_each_step(probe_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         path: str) -> None:
    """SIGKILL ``queue:dispatch`` on entry to each write, fsync, rename and directory fsync, on
    its fast path (the command cache is warm) and on its full Typer path (no usable cache)."""
    argv = [sys.executable, "-m", "forge", "queue:dispatch", "probe:noop"]
    if path == "fast":  # one dispatch writes the cache; every run below then skips Typer
        assert subprocess.run(argv, env=env_with(FORGE_QUEUE_DIR=str(tmp_path / "warm")),
                              capture_output=True).returncode == 0
        assert list(Path(os.environ["XDG_CACHE_HOME"]).rglob("*.json"))
    else:  # a cache directory that cannot be created: never read, never written
        monkeypatch.setenv("XDG_CACHE_HOME", "/proc/forge-no-cache")
    qdir = tmp_path / "trace-q"
    steps = trace_steps(argv, env_with(FORGE_QUEUE_DIR=str(qdir)), DISPATCH_SYSCALLS,
                        lambda line: str(qdir) in line or line.startswith("write(1"), tmp_path / "trace")
    kinds = {s[0] for s in steps}
    assert {"write", "fsync"} <= kinds and kinds & {"rename", "renameat", "renameat2"}, steps
    present = absent = 0
    for i, (name, n, line) in enumerate(steps):
        qdir = tmp_path / f"q{i}"
        res = inject(f"{name}:signal=KILL:when={n}", argv, env_with(FORGE_QUEUE_DIR=str(qdir)))
        assert res.returncode == -signal.SIGKILL, (line, res.returncode, res.stderr)
        jobs = valid_jobs(qdir)  # complete and valid, or nothing: never partial
        assert len(jobs) <= 1 and all(j.command == "probe:noop" for j in jobs), (line, jobs)
        assert not list(qdir.glob("quarantine/*")), line
        present += len(jobs)
        absent += not jobs
        if jobs:  # a worker runs it, and leftovers of the killed dispatch do not disturb it
            from forge.backends.file.backend import FileBackend

            b = FileBackend(qdir)
            claim = b.claim(["default"], "check", 10)
            assert claim is not None and claim.job.id == jobs[0].id
            b.close()
    qdir = tmp_path / "ok"
    res = subprocess.run(argv, env=env_with(FORGE_QUEUE_DIR=str(qdir)), capture_output=True, text=True)
    assert res.returncode == 0
    assert [j.id for j in valid_jobs(qdir)] == [res.stdout.strip()]  # exit 0 implies present
    figures(f"FIGURES scenario=2-dispatch-killed path={path} steps={len(steps)} "
            f"points={','.join(f'{s}#{n}' for s, n, _ in steps)} present={present} absent={absent} partial=0 "
            f"exit0_present=1")


# -- 3. the worker killed at each step of claim / run / ack --------------------------------

WORKER_SYSCALLS = "write,pwrite64,fsync,rename,renameat,renameat2,unlink,unlinkat,sendmsg,flock"


def _idle_worker(env: dict[str, str]) -> subprocess.Popen:
    """A running worker, waiting for work (its job processes are forked per job)."""
    worker = subprocess.Popen([sys.executable, "-m", "forge", "queue:work", "--sleep=0.1", "--json"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert worker.stdout is not None
    assert b"worker_started" in worker.stdout.readline()
    wait_for(lambda: blocked_waiting(worker.pid))  # past start-up and its first claim: idle
    return worker


def _attach(pid: int, out: str, expr: str) -> subprocess.Popen:
    tracer = subprocess.Popen([STRACE, "-qq", "-y", "-p", str(pid), "-o", out, "-e", expr],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: tracer_of(pid) == tracer.pid or tracer.poll() is not None)  # attached
    assert tracer.poll() is None, f"strace could not attach to {pid}"
    return tracer


def tracer_of(pid: int) -> int:
    """The pid tracing ``pid`` (``TracerPid`` in /proc/<pid>/status), 0 if none."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    return next((int(line.split()[1]) for line in status.splitlines() if line.startswith("TracerPid:")), 0)


@needs_strace
def test_03_worker_killed_at_each_step(probe_project: Path, tmp_path: Path) -> None:
    """SIGKILL the worker on entry to each write, rename, unlink, lock and message it makes
    while one job is claimed, run and acknowledged (strace attached by pid). The job process
    makes none: it only runs the job's code."""

    def setup(i: int) -> tuple[Path, dict[str, str], Path]:
        qdir, ledger = tmp_path / f"w{i}", tmp_path / f"ledger{i}.jsonl"
        return qdir, env_with(FORGE_QUEUE_DIR=str(qdir), FORGE_PROBE_LEDGER=str(ledger)), ledger

    def dispatch(env: dict[str, str]) -> str:
        res = forge("queue:dispatch", "--tries=3", "probe:run", "x", env=env)
        assert res.returncode == 0, res.stderr
        return res.stdout.strip()

    # 1. Where are the steps? Trace both processes through one job.
    qdir, env, _ = setup(-1)
    worker = _idle_worker(env)
    steps: list[tuple[str, int, str, str]] = []
    try:
        tracers = {"worker": _attach(worker.pid, str(tmp_path / "trace-worker"), f"trace={WORKER_SYSCALLS}")}
        job_id = dispatch(env)
        backend = _file_backend(qdir)
        wait_for(lambda: backend.find(job_id).state == State.DONE)
        wait_for(lambda: blocked_waiting(worker.pid))  # past the job's last step: idle again
        for tracer in tracers.values():
            tracer.send_signal(signal.SIGINT)
            tracer.wait(10)
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.communicate(timeout=20)
    for who in ("worker",):
        counts: dict[str, int] = {}
        for line in (tmp_path / f"trace-{who}").read_text().splitlines():
            m = re.match(r"(\w+)\(", line)
            if not m:
                continue
            counts[m.group(1)] = counts.get(m.group(1), 0) + 1
            if str(qdir) in line or line.startswith(("sendmsg(", "flock(")):
                steps.append((who, m.group(1), counts[m.group(1)], line[:120]))
    assert any(s[1].startswith("rename") for s in steps) and any(s[1] == "write" for s in steps), steps

    # 2. Kill at each step; then workers recover the job and we check what happened.
    outcomes: dict[str, int] = {}
    killed = {"worker": 0, "job": 0}
    max_runs = 0
    for i, (who, name, n, line) in enumerate(steps):
        qdir, env, ledger = setup(i)
        worker = _idle_worker(env)
        pid = worker.pid
        tracer = _attach(pid, "/dev/null", f"inject={name}:signal=KILL:when={n}")
        try:
            job_id = dispatch(env)
            backend = _file_backend(qdir)
            wait_for(lambda p=pid, b=backend, j=job_id: proc_dead(p) or b.find(j).state in (State.DONE, State.FAILED))
            # A kill at a step after the outcome's record is still to come: wait until the
            # worker is dead or idle again (past every step of this job).
            wait_for(lambda p=pid: proc_dead(p) or blocked_waiting(p))
            killed[who] += proc_dead(pid)
            after_kill = job_files(qdir, job_id)
            assert len(after_kill) == 1, (who, line, after_kill)  # never in two states, never lost
            attempts_at_kill = int(after_kill[0].stem.rsplit("-", 1)[1])
        finally:
            if tracer.poll() is None:
                tracer.send_signal(signal.SIGINT)
                tracer.wait(10)
            if worker.poll() is None:
                worker.send_signal(signal.SIGTERM)
            worker.communicate(timeout=30)
        drain(env, until=lambda b=backend, j=job_id: b.find(j).state in (State.DONE, State.FAILED))
        files = job_files(qdir, job_id)
        assert len(files) == 1, (who, line, files)
        info = backend.find(job_id)
        assert info.state in (State.DONE, State.FAILED), (who, line, info.state)
        assert info.attempts >= attempts_at_kill, (who, line)  # attempts never decrease
        runs = runs_of(read_ledger(ledger))
        assert len(runs) <= 2, (who, line, runs)
        attempts = [r.attempt for r in runs]
        assert attempts == sorted(set(attempts)) and all(a <= info.attempts for a in attempts), (line, attempts)
        f = check(ledger, [job_id])
        assert f.concurrent == 0 and f.unexpected == 0 and (info.state == State.FAILED or f.lost == 0), (who, line)
        outcomes[str(info.state)] = outcomes.get(str(info.state), 0) + 1
        max_runs = max(max_runs, len(runs))
        backend.close()
    figures(f"FIGURES scenario=3-worker-killed steps={len(steps)} killed_worker={killed['worker']} "
            f"killed_job_process={killed['job']} points={','.join(f'{w}:{s}#{n}' for w, s, n, _ in steps)} "
            f"outcomes={outcomes} max_runs={max_runs} two_states=0 attempts_decreased=0 lost=0 concurrent=0")


def _file_backend(qdir: Path):
    from forge.backends.file.backend import FileBackend

    return FileBackend(qdir)


# -- 4. full disk --------------------------------------------------------------------------


def test_04_full_disk(probe_project: Path, tmp_path: Path) -> None:
    qdir = tmp_path / "tmpfs"
    qdir.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", str(qdir)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        print(f"\nSKIP full disk: cannot mount a tmpfs ({res.stderr.strip()})")
        pytest.skip(f"cannot mount a tmpfs: {res.stderr.strip()}")
    worker = None
    try:
        env = env_with(FORGE_QUEUE_DIR=str(qdir))
        queued = [forge("queue:dispatch", "probe:run", f"q{i}", env=env).stdout.strip() for i in range(5)]
        fill_disk(qdir)
        res = forge("queue:dispatch", "probe:run", "late", env=env)
        assert res.returncode != 0
        assert "No space left on device" in res.stderr and str(qdir) in res.stderr, res.stderr
        assert res.stderr.count("Traceback") == 0
        with pytest.raises(QueueError):
            CommandQueue(connection=_file_backend(qdir)).dispatch(QueuedCommand("probe:run").with_args(["api"]))
        assert [j.id for j in valid_jobs(qdir)] == queued  # nothing partial visible
        assert list((qdir / "tmp").iterdir()) == []
        # Queued jobs still run on the full disk.
        started = time.monotonic()
        res = forge("queue:work", "--stop-when-empty", "--sleep=0.1", env=env, timeout=60)
        drained_in = time.monotonic() - started
        assert res.returncode == 0, res.stderr[-2000:]
        f = check(probe_project, queued)
        assert f.lost == 0 and f.duplicated == 0 and f.unexpected == 0, f
        backend = _file_backend(qdir)
        states = [backend.find(j).state for j in queued]
        assert all(s == State.DONE for s in states), states
        # An idle worker on a full disk sleeps: it does not spin.
        worker = subprocess.Popen([sys.executable, "-m", "forge", "queue:work", "--sleep=1"], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_for(lambda: blocked_waiting(worker.pid), timeout=60)  # started, and waiting
        before = cpu_seconds(worker.pid)
        time.sleep(3.0)
        idle_cpu = (cpu_seconds(worker.pid) - before) / 3.0
        assert worker.poll() is None
        assert idle_cpu < 0.05, idle_cpu
        figures(f"FIGURES scenario=4-full-disk {f.line('x').split(' ', 2)[2]} queued={len(queued)} "
                f"dispatch_refused=2 partial=0 temp_left=0 drained_s={drained_in:.2f} idle_cpu={idle_cpu:.3f}")
    finally:
        if worker is not None:
            worker.terminate()
            worker.communicate(timeout=10)
        subprocess.run(["umount", "-l", str(qdir)], capture_output=True)


# -- 5. I/O errors -------------------------------------------------------------------------


@needs_strace
def test_05_io_errors(probe_project: Path, tmp_path: Path) -> None:
    """EIO on each fsync (file, directory, syncfs for a batch) and ENOSPC on the job write."""
    batch = tmp_path / "batch.jsonl"
    batch.write_text("".join(json.dumps({"command": "probe:noop", "args": []}) + "\n" for _ in range(3)))
    single = [sys.executable, "-m", "forge", "queue:dispatch", "probe:noop"]
    many = [sys.executable, "-m", "forge", "queue:dispatch", "--from-file", str(batch)]
    cases = []
    for argv, label in ((single, "single"), (many, "batch")):
        qdir = tmp_path / f"trace-{label}"
        for name, n, line in trace_steps(argv, env_with(FORGE_QUEUE_DIR=str(qdir)), "write,pwrite64,fsync,fdatasync,syncfs",
                                         lambda line, q=qdir: str(q) in line, tmp_path / f"trace-{label}.txt"):
            error = "ENOSPC" if name in ("write", "pwrite64") else "EIO"
            cases.append((argv, label, name, n, error, line))
    assert {(c[1], c[2]) for c in cases} >= {("single", "write"), ("single", "fsync"), ("batch", "syncfs")}, cases
    for i, (argv, label, name, n, error, line) in enumerate(cases):
        qdir = tmp_path / f"q{i}"
        res = inject(f"{name}:error={error}:when={n}", argv, env_with(FORGE_QUEUE_DIR=str(qdir)))
        assert res.returncode not in (0, -signal.SIGKILL), (label, line, res.returncode, res.stdout)
        message = "No space left on device" if error == "ENOSPC" else "Input/output error"
        assert message in res.stderr and "Traceback" not in res.stderr, (label, line, res.stderr)
        assert list(qdir.glob("q/*/pending/*")) == [], (label, line)  # never a success after a failed fsync
        assert list((qdir / "tmp").iterdir()) == [], (label, line)  # temp files removed
    figures(f"FIGURES scenario=5-io-errors cases={len(cases)} "
            f"points={','.join(f'{c[1]}:{c[2]}#{c[3]}={c[4]}' for c in cases)} false_success=0 temp_left=0 visible=0")


# -- 6. hostile files ----------------------------------------------------------------------


def test_06_hostile_files(probe_project: Path, tmp_path: Path) -> None:
    qdir = tmp_path / "queue"
    q = CommandQueue()
    before = q.dispatch(QueuedCommand("probe:run").with_args(["before"]))
    pdir = qdir / "q" / "default" / "pending"
    worker = subprocess.Popen([sys.executable, "-m", "forge", "queue:work", "--sleep=0.1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: q.backend.find(before).state == State.DONE)

        def valid(marker: str) -> tuple[str, bytes]:
            job = hand_made_job(args=(marker,))
            return job.id, job.to_json()

        hostile: dict[str, tuple[str, str]] = {}  # file name -> (label, expected reason fragment)
        staging = tmp_path / "staging"
        staging.mkdir()

        def drop(label: str, data: bytes | None, reason: str, job_id: str | None = None, make=None,
                 name: str | None = None) -> None:
            """Build the file outside the queue, then rename it in: the worker sees it whole."""
            name = name or pending_name(job_id or str(uuid.uuid4()))
            path = staging / name
            if make is not None:
                make(path)
            else:
                path.write_bytes(data or b"")
                path.chmod(0o600)
            hostile[name] = (label, reason)
            os.rename(path, pdir / name)

        good = json.loads(hand_made_job().to_json())
        drop("empty", b"", "empty")
        drop("truncated-json", hand_made_job(args=("TRUNCATED",)).to_json()[:40], "JSON")
        drop("bad-utf8", b'{"v":1,"command":"\xff\xfe"}\n', "UTF-8")
        drop("10MB", b"{" + b" " * (10 * 1024 * 1024) + b"}\n", "byte")
        drop("wrong-types", json.dumps({**good, "args": "probe:run WRONG", "max_attempts": "3"}).encode() + b"\n",
             "")
        drop("deep-nesting", b'{"v":1,"metadata":' + b"[" * 100000 + b"]" * 100000 + b"}\n", "")
        drop("pickle", pickle.dumps({"command": "probe:run", "args": ["PICKLE"]}), "")
        job_id, data = valid("SYMLINK")
        outside = tmp_path / "outside-symlink.job"
        outside.write_bytes(data)
        drop("symlink", None, "symbolic link", job_id, make=lambda p: p.symlink_to(outside))
        job_id, data = valid("HARDLINK")
        linked = tmp_path / "outside-hardlink.job"
        linked.write_bytes(data)
        linked.chmod(0o600)
        drop("hard-link", None, "hard link", job_id, make=lambda p: os.link(linked, p))
        drop("fifo", None, "not a regular file", make=os.mkfifo)
        job_id, data = valid("OTHER-OWNER")

        def foreign(p: Path) -> None:
            p.write_bytes(data)
            p.chmod(0o600)
            os.chown(p, 65534, 65534)

        drop("other-owner", None, "owned by uid 65534", job_id, make=foreign)
        drop("bad-name", b"x", "unexpected file name", name="not-a-job-name.txt")
        unknown = hand_made_job(command="gone:away")
        staged = staging / pending_name(unknown.id)
        staged.write_bytes(unknown.to_json())
        staged.chmod(0o600)
        os.rename(staged, pdir / staged.name)
        after = q.dispatch(QueuedCommand("probe:run").with_args(["after"]))

        wait_for(lambda: q.backend.find(after).state == State.DONE and not list(pdir.iterdir()), timeout=30)
        assert worker.poll() is None, "the worker died"
        reasons = {}
        for reason_file in (qdir / "quarantine").glob("*.reason"):
            text = reason_file.read_text()
            # a file that looked like a job is quarantined from reserved/ (named <id>-<attempt>)
            name = next((n for n in hostile if (n[17:53] if n.endswith(".job") else n) in reason_file.name), None)
            assert name is not None, reason_file.name
            reasons[name] = text
        missing = {hostile[n][0] for n in hostile if n not in reasons}
        assert not missing, f"not quarantined: {missing}"
        for name, (label, fragment) in hostile.items():
            assert fragment in reasons[name], (label, reasons[name])
        info = q.backend.find(unknown.id)
        assert info.state == State.FAILED and info.failure.reason == "unknown_command"
        runs = runs_of(read_ledger(probe_project))
        assert sorted(r.args[0] for r in runs) == ["after", "before"]  # none of the hostile ones ran
        f = check(probe_project, [before, after])
        assert f.lost == f.duplicated == f.unexpected == f.concurrent == 0
    finally:
        worker.send_signal(signal.SIGTERM)
        _, err = worker.communicate(timeout=20)
    assert worker.returncode == 0, err[-2000:]
    figures(f.line("6-hostile-files", hostile=len(hostile), quarantined=len(reasons), executed=0,
                   unknown_command_failed=1, worker_alive=1))


# -- 7. contention -------------------------------------------------------------------------


def test_07_contention(tmp_path: Path) -> None:
    jobs = int(os.environ.get("FORGE_CHAOS_CONTENTION_JOBS", "4000"))
    t = make_target("file", tmp_path / "target")
    try:
        res = contention(t, workers=8, jobs=jobs, timeout=300)
    finally:
        t.close()
    figures(res.line("7-contention", workers=8))
    f = res.figures
    assert res.exit_codes == [0] * 8
    assert f.lost == 0 and f.duplicated == 0 and f.concurrent == 0 and f.unexpected == 0, f
    assert res.done == jobs and res.failed == 0


# -- 8. timeout with a grandchild that ignores SIGTERM -------------------------------------


def test_08_timeout_kills_whole_group(probe_project: Path, tmp_path: Path) -> None:
    q = CommandQueue()
    pidfile = tmp_path / "grandchild.pid"
    timeout, grace = 1.0, 3.0
    worker = subprocess.Popen([sys.executable, "-m", "forge", "queue:work", "--sleep=0.1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        job_id = q.dispatch(QueuedCommand("probe:run").with_args(
            ["--ignore-term", "--grandchild", str(pidfile), "--sleep", "60"]).with_timeout(timeout))
        start = wait_for(lambda: next((r for r in read_ledger(probe_project) if r["kind"] == "start"), None))
        job_pid = start["pid"]
        grandchild = int(wait_for(lambda: pidfile.exists() and pidfile.read_text()))
        wait_for(lambda: proc_dead(job_pid) and proc_dead(grandchild), timeout=timeout + grace + 10, interval=0.02)
        dead_after = time.time() - start["start"]
        assert not group_members(job_pid), "processes of the job's group survived"
        info = wait_for(lambda: (i := q.backend.find(job_id)).state == State.FAILED and i)
        assert info.failure.reason == "timeout" and info.attempts == 1
        assert [e.attempt for e in info.events if e.event == "failed"] == [1]
        # The worker goes on with a fresh job process.
        nxt = q.dispatch(QueuedCommand("probe:run").with_args(["next"]))
        wait_for(lambda: q.backend.find(nxt).state == State.DONE)
        assert worker.poll() is None
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.communicate(timeout=20)
    # The job ignores SIGTERM: it dies of the SIGKILL at timeout + grace, not before (the job
    # records its start a little after the worker's clock starts), and not much later (the margin
    # is for a loaded machine; without the kill it would have lived 60 s).
    assert timeout + grace - 0.5 <= dead_after <= timeout + grace + 5.0, dead_after
    figures(f"FIGURES scenario=8-timeout timeout_s={timeout} grace_s={grace} group_dead_after_s={dead_after:.2f} "
            f"orphans=0 attempt_recorded=1 reason=timeout")


# -- 9. poison pill ------------------------------------------------------------------------


def test_09_poison_pill_with_supervisor(tmp_path: Path) -> None:
    t = make_target("file", tmp_path / "target")
    q = t.queue()
    poison = q.dispatch(QueuedCommand("probe:run").with_args(["--kill-worker"]).with_max_attempts(3))
    others = q.dispatch_many([QueuedCommand("probe:tick").with_args(["20"]) for _ in range(40)])
    sup = Supervisor(t, 2, args=("--sleep=0.1",))
    sup.start()
    died_at: dict[int, float] = {}  # a run with no end line ended when its process was seen dead
    try:
        def settled() -> bool:
            sup.tend()
            for r in runs_of(read_ledger(t.ledger)):
                if r.end is None and r.pid not in died_at and proc_dead(r.pid):
                    died_at[r.pid] = time.time()
            info = t.backend.find(poison)
            return info.state == State.FAILED and all(t.backend.find(i).state == State.DONE for i in others)

        wait_for(settled, timeout=60, interval=0.02)
    finally:
        codes = sup.stop()
        t.close()
    runs = [r for r in runs_of(read_ledger(t.ledger)) if r.job == poison]
    info = t.backend.find(poison)
    f = check(t.ledger, others, dispatched=[poison, *others], killed_at=died_at)
    figures(f.line("9-poison-pill", poison_runs=len(runs), poison_attempts=info.attempts,
                   reason=info.failure.reason, worker_deaths=len(sup.crashes), workers_started=sup.started))
    assert sorted(r.attempt for r in runs) == [1, 2, 3]
    assert info.state == State.FAILED and info.failure.reason == "abandoned" and info.attempts == 3
    assert f.lost == 0 and f.unexpected == 0 and f.concurrent == 0
    assert set(f.duplicated_ids) <= {poison}
    assert len(sup.crashes) == 3 and all(code == -signal.SIGKILL for _, code in sup.crashes)
    assert codes == [0, 0]


# -- 10. graceful SIGTERM during long jobs -------------------------------------------------


def test_10_graceful_sigterm(tmp_path: Path) -> None:
    t = make_target("file", tmp_path / "target")
    q = t.queue()
    ids = q.dispatch_many([QueuedCommand("probe:tick").with_args(["1500"]) for _ in range(12)])
    sup = Supervisor(t, 4, args=("--sleep=0.1",))
    sup.start()
    try:
        wait_for(lambda: sum(r["kind"] == "start" for r in read_ledger(t.ledger)) >= 4, timeout=30)
        running = {r["job"] for r in read_ledger(t.ledger) if r["kind"] == "start"}
        stopped_at = time.monotonic()
        codes = sup.stop(timeout=30)
        stop_s = time.monotonic() - stopped_at
        assert codes == [0, 0, 0, 0]
        assert all(t.backend.find(j).state == State.DONE for j in running)  # they finished
        mid = check(t.ledger, running)
        assert mid.lost == 0 and mid.unfinished == 0
        leftover = t.backend.stats(["default"])[0]
        assert leftover.reserved == 0
        res = subprocess.run([sys.executable, "-m", "forge", "queue:work", "--stop-when-empty"], env=t.env,
                             capture_output=True, timeout=120)
        assert res.returncode == 0
        assert wait_done(t, ids, 10)
    finally:
        t.close()
    f = check(t.ledger, ids)
    figures(f.line("10-graceful-sigterm", running_at_sigterm=len(running), stop_s=round(stop_s, 2),
                   left_pending=leftover.pending))
    assert f.lost == 0 and f.duplicated == 0 and f.concurrent == 0 and f.unexpected == 0


# -- 11. security --------------------------------------------------------------------------


def test_11_security(probe_project: Path, tmp_path: Path) -> None:
    qdir = tmp_path / "queue"
    checks: dict[str, bool] = {}

    # Queue names and job ids with ../ are refused before any path is built, at the CLI and the API.
    for args in (["queue:dispatch", "--queue", "../escape", "probe:noop"],
                 ["queue:dispatch", "--queue", "a/../../escape", "probe:noop"],
                 ["queue:show", "../../etc/passwd"], ["queue:retry", "../x"], ["queue:forget", "../x"],
                 ["queue:clear", "../escape"], ["queue:pause", "../escape"], ["queue:work", "--queue=../escape", "--once"]):
        res = forge(*args)
        assert res.returncode == 2, (args, res.returncode, res.stderr)
    assert not list(tmp_path.rglob("escape")) and not (tmp_path.parent / "escape").exists()
    for bad in ("../escape", "..", "a/b", "/etc"):
        with pytest.raises(QueueError):
            CommandQueue(bad)
        with pytest.raises(QueueError):
            CommandQueue().dispatch(QueuedCommand("probe:noop").on_queue(bad))
    for bad_id in ("../../etc/passwd", "..", "x/../y"):
        with pytest.raises((QueueError, UsageError)):
            QueueManager().find(bad_id)
        with pytest.raises(UsageError):
            CommandQueue().backend.find(bad_id)
    checks["dotdot"] = True

    # Shell metacharacters arrive as literal argv.
    marker = tmp_path / "pwned"
    hostile = [f"$(touch {marker})", f"`touch {marker}`", f"; touch {marker}", f"| touch {marker}",
               f"&& touch {marker}", "a b  c", "'\"\\", "*", "~", "$HOME", "\n", "\x1b[31m"]
    res = forge("queue:dispatch", "probe:run", *hostile)
    assert res.returncode == 0, res.stderr
    job_id = res.stdout.strip()

    # A group- or world-writable queue directory is repaired with a warning.
    for mode in (0o777, 0o770, 0o702):
        qdir.chmod(mode)
        res = forge("queue:dispatch", "probe:noop")
        assert res.returncode == 0 and "repaired" in res.stderr, (oct(mode), res.stderr)
        assert stat.S_IMODE(qdir.stat().st_mode) == 0o700
    checks["writable_dir_repaired"] = True

    # A pickle payload: refused by --from-file, quarantined when dropped in as a job file.
    blob = tmp_path / "payload.pickle"
    blob.write_bytes(pickle.dumps({"command": "probe:run", "args": ["PICKLE"]}))
    res = forge("queue:dispatch", "--from-file", str(blob))
    assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr
    dropped = qdir / "q" / "default" / "pending" / pending_name(str(uuid.uuid4()))
    dropped.write_bytes(pickle.dumps({"command": "probe:run", "args": ["PICKLE"]}, protocol=0))
    checks["pickle"] = True

    # An oversized payload is refused at dispatch, at the CLI and the API; nothing is written.
    pending_before = sorted(p.name for p in (qdir / "q" / "default" / "pending").iterdir())
    res = forge("queue:dispatch", "probe:run", "x" * (MAX_PAYLOAD_BYTES + 1))
    assert res.returncode == 2 and "Traceback" not in res.stderr, (res.returncode, res.stderr[-500:])
    with pytest.raises(QueueError):
        CommandQueue().dispatch(QueuedCommand("probe:run").with_args(["y" * (MAX_PAYLOAD_BYTES + 1)]))
    with pytest.raises(QueueError):
        CommandQueue().dispatch(QueuedCommand("probe:run").with_metadata("blob", "z" * (MAX_PAYLOAD_BYTES + 1)))
    assert sorted(p.name for p in (qdir / "q" / "default" / "pending").iterdir()) == pending_before
    assert list((qdir / "tmp").iterdir()) == []
    checks["oversized"] = True

    # The worker runs all of it (and failing and unknown jobs) without ever starting a shell.
    CommandQueue().dispatch_many([QueuedCommand("probe:env"), QueuedCommand("probe:run").with_args(["--fail"]),
                                  QueuedCommand("probe:run").with_args(["--exit-code", "3"])])
    _push_unknown(qdir)
    execs: list[str] = []
    if STRACE:
        trace = tmp_path / "execve.trace"
        res = subprocess.run([STRACE, "-f", "-qq", "-e", "trace=execve,execveat", "-o", str(trace),
                              sys.executable, "-m", "forge", "queue:work", "--stop-when-empty"],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr[-2000:]
        execs = re.findall(r'execve(?:at)?\((?:\d+, )?"([^"]+)"', trace.read_text())
        shells = [e for e in execs if os.path.basename(e) in SHELLS]
        assert not shells, shells
        assert {os.path.realpath(e) for e in execs} == {os.path.realpath(sys.executable)}, execs
        checks["no_shell_execve"] = True
    else:
        print("\nSKIP execve trace: strace is not installed")
        drain()
    (run,) = [r for r in runs_of(read_ledger(probe_project)) if r.job == job_id]
    assert list(run.args) == hostile and not marker.exists()
    checks["literal_argv"] = True
    quarantined = [p.read_text() for p in (qdir / "quarantine").glob("*.reason")]
    assert any(dropped.name[17:53] in text for text in quarantined), quarantined
    assert not any("PICKLE" in r.args for r in runs_of(read_ledger(probe_project)))
    figures(f"FIGURES scenario=11-security checks={len(checks)} passed={sum(checks.values())} "
            f"{' '.join(f'{k}=ok' for k in checks)} execs={len(execs)} shell_execs=0")


def _push_unknown(qdir: Path) -> None:
    job = hand_made_job(command="gone:away")
    path = qdir / "q" / "default" / "pending" / pending_name(job.id)
    path.write_bytes(job.to_json())
    path.chmod(0o600)
