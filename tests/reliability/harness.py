"""Real workers under fault injection: a target queue (file or Redis), a supervisor that
restarts killed workers, and the two soaks shared by the tests and ``bench/chaos.py``:
the kill storm and the contention run. Figures come from :mod:`reliability.checker`.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from waitfor import wait_for

from forge.job import State
from forge.queue import CommandQueue, QueuedCommand

from .checker import Figures, check

PROJECT_COMMANDS = Path(__file__).resolve().parent.parent / "project" / "commands"


@dataclass
class Target:
    """A queue to torture: its config file, the environment workers run with, and a backend."""

    kind: str
    workdir: Path
    env: dict[str, str]
    redis_url: str | None = None
    prefix: str | None = None
    _backend: Any = None
    _registry: Any = None

    @property
    def ledger(self) -> Path:
        return Path(self.env["FORGE_PROBE_LEDGER"])

    @property
    def queue_dir(self) -> Path:
        return self.workdir / "queue"

    @property
    def backend(self) -> Any:
        if self._backend is None:
            if self.kind == "file":
                from forge.backends.file.backend import FileBackend

                self._backend = FileBackend(self.queue_dir)
            else:
                from forge.backends.redis.backend import RedisBackend

                self._backend = RedisBackend(self.redis_url or "", prefix=self.prefix or "forge")
        return self._backend

    def queue(self, name: str = "default") -> CommandQueue:
        if self._registry is None:
            from forge.config import load_settings
            from forge.registry.discovery import build_registry

            self._registry = build_registry(load_settings(env=self.env))
        return CommandQueue(name, connection=self.backend, registry=self._registry)

    def close(self) -> None:
        if self._backend is not None:
            self._backend.close()
        if self.kind == "redis":
            import redis

            client = redis.Redis.from_url(self.redis_url or "")
            keys = list(client.scan_iter(match=f"{self.prefix}:*", count=1000))
            for i in range(0, len(keys), 1000):
                client.delete(*keys[i:i + 1000])
            client.close()


def fill_disk(folder: Path) -> Path:
    """Write zeros to ``folder/filler`` until the filesystem is full; return the file."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)
    return filler

def make_target(kind: str, workdir: Path, redis_url: str | None = None) -> Target:
    """Write ``workdir/forge.toml`` for the probe project on ``kind`` and return the target."""
    workdir.mkdir(parents=True, exist_ok=True)
    prefix = f"forge-chaos-{uuid.uuid4().hex[:8]}"
    config = workdir / "forge.toml"
    config.write_text(
        f'[forge]\ncommands = ["{PROJECT_COMMANDS}"]\n'
        f'[queue]\nconnection = "{kind}"\ntries = 1\ntimeout = "60s"\nbackoff = [0]\ndone_retention = "1h"\n'
        f'[connections.file]\npath = "{workdir / "queue"}"\n'
        f'[connections.redis]\nurl = "{redis_url or "redis://127.0.0.1:6379/0"}"\nprefix = "{prefix}"\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORGE_")}
    env.update(FORGE_CONFIG=str(config), FORGE_NO_PLUGINS="1", FORGE_PROBE_LEDGER=str(workdir / "ledger.jsonl"))
    return Target(kind, workdir, env, redis_url, prefix)


def worker_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "forge", "queue:work", *args]


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie awaiting its reaper counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def job_processes(pid: int) -> list[int]:
    """The children of ``pid`` (a worker's warm job process)."""
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (OSError, ValueError):
        return []


@dataclass
class Kill:
    worker: int
    children: list[int]
    at: float
    gone_at: float | None = None  # when its job process was seen gone (None: it outlived the wait)
    #: When the worker was reaped: its job process (which dies with it, PR_SET_PDEATHSIG) had
    #: its SIGKILL pending by then, so it ran no more job code, even one forked after ``children``.
    reaped_at: float = 0.0


def catches_sigterm(pid: int) -> bool:
    """Whether process ``pid`` has installed a SIGTERM handler (the SigCgt mask in /proc)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    for line in status.splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    return False


@dataclass
class Supervisor:
    """Keeps ``n`` workers running; ``kill_one`` SIGKILLs a random one and starts a successor."""

    target: Target
    n: int
    args: Sequence[str] = ("--sleep=0.2",)
    procs: list[subprocess.Popen] = field(default_factory=list)
    kills: list[Kill] = field(default_factory=list)
    crashes: list[tuple[int, int]] = field(default_factory=list)  # (pid, returncode) we did not cause
    started: int = 0
    stops: int = 0

    def _spawn(self) -> subprocess.Popen:
        self.started += 1
        # stderr to a file, not a pipe: a chatty worker must never block on a full pipe.
        with open(self.target.workdir / "workers.err", "ab") as err:
            return subprocess.Popen(worker_argv(*self.args), env=self.target.env, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=err)

    def start(self) -> None:
        self.procs = [self._spawn() for _ in range(self.n)]

    def tend(self) -> None:
        """Restart any worker that died on its own, and note it."""
        for i, p in enumerate(self.procs):
            if p.poll() is not None:
                self.crashes.append((p.pid, p.returncode))
                self.procs[i] = self._spawn()

    def kill_one(self, rng: random.Random) -> Kill:
        i = rng.randrange(len(self.procs))
        p = self.procs[i]
        children = job_processes(p.pid)
        p.kill()
        kill = Kill(p.pid, children, time.time())
        p.wait()
        kill.reaped_at = time.time()
        # A signal takes effect a moment after kill() returns: until the job process is seen
        # gone, a run it started just after ``at`` may still be going.
        end = time.monotonic() + 2.0
        while time.monotonic() < end and any(_alive(c) for c in children):
            time.sleep(0.002)
        if not any(_alive(c) for c in children):
            kill.gone_at = time.time()
        self.kills.append(kill)
        self.procs[i] = self._spawn()
        return kill

    def stop_one(self, rng: random.Random, seconds: float) -> None:
        """SIGSTOP a random worker's supervisor (not its job process) for ``seconds``."""
        p = self.procs[rng.randrange(len(self.procs))]
        with contextlib.suppress(ProcessLookupError):
            os.kill(p.pid, signal.SIGSTOP)
            time.sleep(seconds)
            os.kill(p.pid, signal.SIGCONT)
        self.stops += 1

    def stop(self, timeout: float = 30.0) -> list[int | None]:
        """SIGTERM every worker once it handles SIGTERM (a successor still starting up would
        die of the default action, which is not what is tested), then reap them."""
        for p in self.procs:
            end = time.monotonic() + timeout
            while p.poll() is None and not catches_sigterm(p.pid) and time.monotonic() < end:
                time.sleep(0.005)
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        codes = []
        for p in self.procs:
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            codes.append(p.returncode)
        return codes


def wait_done(target: Target, ids: Sequence[str], timeout: float, sup: Supervisor | None = None,
              queue: str = "default") -> bool:
    """Until every job is done or failed (per the backend's counts), restarting dead workers."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        (st,) = target.backend.stats([queue])
        if st.done + st.failed >= len(ids) and st.reserved == 0 and st.size == 0:
            return True
        if sup is not None:
            sup.tend()
        time.sleep(0.1)
    return False


def claims_hit(target: Target, kills: Sequence[Kill]) -> int:
    """Kills that caught their worker holding a claim: a claimed event by that worker with no
    outcome (done, released, failed) recorded by it for the same attempt."""
    killed = {k.worker for k in kills}
    hit = 0
    for info in target.backend.jobs(queue="default"):
        open_claims: dict[int, str] = {}
        for ev in info.events:
            if ev.event == "claimed" and ev.worker:
                open_claims[ev.attempt] = ev.worker
            elif ev.event in ("done", "released", "failed") and ev.worker:
                if open_claims.get(ev.attempt) == ev.worker:
                    del open_claims[ev.attempt]
        hit += sum(1 for w in open_claims.values() if _pid_of(w) in killed)
    return hit


def _pid_of(worker_name: str) -> int:
    try:
        return int(worker_name.rsplit(":", 1)[1])
    except (IndexError, ValueError):
        return -1


@dataclass
class StormResult:
    figures: Figures
    kills: int
    claims_hit: int
    runs_hit: int
    crashes: int
    reserved_after: int
    drained: bool
    seconds: float
    workers_started: int
    stops: int = 0

    def line(self, scenario: str, **extra: Any) -> str:
        return self.figures.line(scenario, kills=self.kills, kills_hit_claim=self.claims_hit,
                                 kills_hit_run=self.runs_hit, worker_crashes=self.crashes,
                                 reserved_after=self.reserved_after, seconds=round(self.seconds, 1),
                                 workers_started=self.workers_started, supervisor_stops=self.stops, **extra)


def kill_storm(target: Target, *, workers: int = 4, jobs: int = 2000, seconds: float = 10.0,
               interval: float = 0.2, job_ms: int = 10, drain_timeout: float = 120.0,
               seed: int | None = None, hostile: bool = False) -> StormResult:
    """SIGKILL a random worker every ~``interval`` s for ``seconds`` (or until the queue is
    drained) while a supervisor restarts them; then drain and compute the figures.

    ``hostile``: every fifth job closes all its inherited descriptors first, and one chaos
    step in three SIGSTOPs a random worker (its supervisor only) for up to 2 s instead."""
    rng = random.Random(seed)
    # Redis recovers a dead worker's job when its lease lapses (timeout + grace + margin): keep
    # the timeout short there so the drain does not wait a minute per killed claim.
    timeout = 1.0 if target.kind == "redis" else 30.0
    cmd = (QueuedCommand("probe:tick").with_args([str(job_ms)]).with_max_attempts(100).with_timeout(timeout))
    q = target.queue()
    ids: list[str] = []
    closer = (QueuedCommand("probe:run").with_args(["--close-fds", "--sleep", str(job_ms / 1000)])
              .with_max_attempts(100).with_timeout(timeout))
    for i in range(0, jobs, 1000):
        n = min(1000, jobs - i)
        ids += q.dispatch_many([closer if hostile and k % 5 == 0 else cmd for k in range(n)])
    sup = Supervisor(target, workers)
    began = time.monotonic()
    sup.start()
    # The first kill comes once the workers are loaded and at work (a job is claimed).
    wait_for(lambda: any(s.reserved or s.done or s.failed for s in target.backend.stats(["default"])), timeout=60)
    try:
        while time.monotonic() - began < seconds:
            time.sleep(interval * rng.uniform(0.5, 1.5))
            sup.tend()
            if hostile and rng.random() < 1 / 3:
                sup.stop_one(rng, rng.uniform(0.2, 2.0))
            else:
                sup.kill_one(rng)
            (st,) = target.backend.stats(["default"])
            if st.done + st.failed >= jobs:
                break
        drained = wait_done(target, ids, drain_timeout, sup)
    finally:
        sup.stop()
    elapsed = time.monotonic() - began
    # A job process dies with its worker: its unfinished run ended when the worker was reaped.
    killed_at = {k.worker: k.reaped_at for k in sup.kills}
    killed_at.update({c: k.gone_at for k in sup.kills for c in k.children if k.gone_at})
    figures = check(target.ledger, ids, killed_at=killed_at)
    from .checker import read_ledger, runs_of

    runs = runs_of(read_ledger(target.ledger))
    by_pid: dict[int, list] = {}
    for r in runs:
        by_pid.setdefault(r.pid, []).append(r)
    runs_hit = sum(1 for k in sup.kills if any(
        r.start <= k.at and (r.end is None or r.end > k.at) for c in k.children for r in by_pid.get(c, ())))
    (st,) = target.backend.stats(["default"])
    return StormResult(figures, len(sup.kills), claims_hit(target, sup.kills), runs_hit, len(sup.crashes),
                       st.reserved, drained, elapsed, sup.started, sup.stops)


@dataclass
class ContentionResult:
    figures: Figures
    seconds: float
    done: int
    failed: int
    exit_codes: list[int | None]

    def line(self, scenario: str, **extra: Any) -> str:
        rate = self.done / self.seconds if self.seconds else 0.0
        return self.figures.line(scenario, done=self.done, failed=self.failed, seconds=round(self.seconds, 1),
                                 jobs_per_s=round(rate), **extra)


def contention(target: Target, *, workers: int = 8, jobs: int = 20000, timeout: float = 600.0) -> ContentionResult:
    """``workers`` workers draining ``jobs`` cheap recorded jobs from one queue."""
    q = target.queue()
    cmd = QueuedCommand("probe:tick")
    ids: list[str] = []
    for i in range(0, jobs, 5000):
        ids += q.dispatch_many([cmd] * min(5000, jobs - i))
    began = time.monotonic()
    procs = [subprocess.Popen(worker_argv("--stop-when-empty", "--sleep=0.2"), env=target.env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(workers)]
    codes: list[int | None] = []
    for p in procs:
        try:
            codes.append(p.wait(max(timeout - (time.monotonic() - began), 1)))
        except subprocess.TimeoutExpired:
            p.kill()
            codes.append(p.wait())
    elapsed = time.monotonic() - began
    (st,) = target.backend.stats(["default"])
    return ContentionResult(check(target.ledger, ids), elapsed, st.done, st.failed, codes)


def states_of(target: Target, job_id: str) -> State | None:
    info = target.backend.find(job_id)
    return info.state if info else None
