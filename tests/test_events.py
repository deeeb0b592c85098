"""Events and listeners with real workers on a real file queue and real Redis: every event's
durable listener runs once with several workers, in-process listeners that fail or hang change
no outcome, a worker SIGKILLed around an outcome neither loses nor doubles a listener job, and
threshold events fire once per crossing with several workers."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import require_redis
from waitfor import wait_for

from forge.job import State

EV_COMMANDS = Path(__file__).resolve().parent / "eventsproject" / "commands"
REDIS_URL = os.environ.get("FORGE_TEST_REDIS_URL")
STRACE = shutil.which("strace")

LISTEN_ALL = """
[[listeners]]
event = "job.*"
command = "ev:record"
queue = "events"
"""


class Proj:
    """A project on one backend: forge.toml, the workers' environment, and a backend to look with."""

    def __init__(self, kind: str, root: Path) -> None:
        self.kind, self.root = kind, root
        self.prefix = f"forge-ev-{uuid.uuid4().hex[:8]}"
        root.mkdir(parents=True, exist_ok=True)
        self.ledger = root / "ledger.jsonl"
        self.local = root / "local.jsonl"
        self.config = root / "forge.toml"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("FORGE_")}
        self.env.update(FORGE_CONFIG=str(self.config), FORGE_NO_PLUGINS="1", EV_LEDGER=str(self.ledger))
        self._backend: Any = None
        self.procs: list[subprocess.Popen] = []
        self.outs: dict[int, str] = {}
        self.write("")

    def write(self, toml: str, redis_url: str | None = None) -> None:
        self.config.write_text(
            f'[forge]\ncommands = ["{EV_COMMANDS}"]\n'
            f'[queue]\nconnection = "{self.kind}"\ntries = 1\ndone_retention = "1h"\n'
            f'[connections.file]\npath = "{self.root / "queue"}"\n'
            f'[connections.redis]\nurl = "{redis_url or REDIS_URL or "redis://127.0.0.1:6379/0"}"\n'
            f'prefix = "{self.prefix}"\nlease = "10s"\n' + toml)

    @property
    def backend(self) -> Any:
        if self._backend is None:
            if self.kind == "file":
                from forge.backends.file.backend import FileBackend

                self._backend = FileBackend(self.root / "queue")
            else:
                from forge.backends.redis.backend import RedisBackend

                self._backend = RedisBackend(REDIS_URL or "", prefix=self.prefix)
        return self._backend

    def dispatch(self, *args: str, opts: tuple[str, ...] = ()) -> str:
        res = subprocess.run([sys.executable, "-m", "forge", "queue:dispatch", *opts, "ev:job", *args],
                             env=self.env, capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        return res.stdout.strip()

    def worker(self, *args: str, env: dict[str, str] | None = None, out: str = "") -> subprocess.Popen:
        out = out or f"worker{len(self.procs)}.out"
        stdout = open(self.root / out, "wb")  # noqa: SIM115
        proc = subprocess.Popen([sys.executable, "-m", "forge", "queue:work", "--json", "--sleep=0.2", *args],
                                env={**self.env, **(env or {})}, stdout=stdout, stderr=subprocess.STDOUT)
        stdout.close()
        self.procs.append(proc)
        self.outs[proc.pid] = out
        return proc

    def lines(self, name: str) -> list[dict[str, Any]]:
        path = self.root / name
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]

    def started(self, proc: subprocess.Popen) -> None:
        out = self.outs[proc.pid]
        wait_for(lambda: any(x.get("event") == "worker_started" for x in self.lines(out)), timeout=60, what="worker started")

    def events(self) -> list[dict[str, Any]]:
        return self.lines("ledger.jsonl")

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        if self._backend is not None:
            self._backend.close()
        if self.kind == "redis":
            import redis

            client = redis.Redis.from_url(REDIS_URL or "")
            keys = list(client.scan_iter(match=f"{self.prefix}:*", count=10000))
            if keys:
                client.delete(*keys)
            client.close()


@pytest.fixture(params=["file", "redis"])
def proj(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Proj]:
    if request.param == "redis":
        require_redis()
    p = Proj(request.param, tmp_path / "p")
    try:
        yield p
    finally:
        p.close()


def exited(procs: list[subprocess.Popen], timeout: float = 120.0) -> list[int]:
    end = time.monotonic() + timeout
    return [p.wait(max(end - time.monotonic(), 1)) for p in procs]


# -- exactly once per event, several workers ---------------------------------------------------


def test_every_event_reaches_each_listener_once_with_several_workers(proj: Proj) -> None:
    """3 workers drain 12 jobs (8 succeed, 4 fail twice, with tries 2) and the listener jobs:
    the durable listener ran once per event, with the documented payload; the in-process
    listener ran once per event in a worker's own process (never in a job process)."""
    proj.write(LISTEN_ALL + '[[listeners]]\nevent = "worker.*"\ncommand = "ev:record"\n'
               'args = ["--tag=w"]\nqueue = "events"\n')
    good = [proj.dispatch() for _ in range(8)]
    bad = [proj.dispatch("--code=3", opts=("--tries=2",)) for _ in range(4)]
    workers = [proj.worker("--queue=default,events", "--stop-when-empty", env={"EV_LOCAL": str(proj.local)})
               for _ in range(3)]
    assert exited(workers) == [0, 0, 0]

    # A worker's stopping and stopped events are stored as it exits: the last ones stay queued.
    left = [j.job.metadata["forge_event"] for j in proj.backend.jobs(queue="events", state=State.PENDING)]
    assert {e["event"] for e in left} <= {"worker.stopping", "worker.stopped"}
    events = proj.events()
    by_worker = Counter(e["event"] for e in events + left if e["event"].startswith("worker."))
    assert by_worker == {"worker.started": 3, "worker.stopping": 3, "worker.stopped": 3}
    assert {e["reason"] for e in events + left if e["event"] == "worker.stopped"} == {"empty"}
    events = [e for e in events if e["event"] not in ("worker.stopping", "worker.stopped")]
    ids = Counter(e["id"] for e in events)
    assert all(n == 1 for n in ids.values()), [i for i, n in ids.items() if n > 1]
    assert len({e["listener_job"] for e in events}) == len(events)  # one listener job per event
    assert len({e["id"] for e in events + left}) == len(events) + len(left)
    per_job = Counter((e["job_id"], e["event"]) for e in events if "job_id" in e)
    for j in good:
        assert [per_job[j, n] for n in ("job.dispatched", "job.started", "job.succeeded")] == [1, 1, 1]
        assert per_job[j, "job.failed"] == per_job[j, "job.released"] == 0
    for j in bad:
        assert [per_job[j, n] for n in ("job.dispatched", "job.started", "job.released", "job.failed")] == [1, 2, 1, 1]
    assert len(events) == 8 * 3 + 4 * 5 + 3
    started = [e["worker"] for e in events if e["event"] == "worker.started"]
    assert len(set(started)) == 3 and {e["worker"] for e in events if e["event"] == "job.started"} <= set(started)

    failed = next(e for e in events if e["event"] == "job.failed" and e["job_id"] == bad[0])
    assert failed["command"] == "ev:job" and failed["args"] == ["--code=3"] and failed["queue"] == "default"
    assert failed["attempt"] == 2 and failed["exit_code"] == 3 and failed["reason"] == "exit_code"
    assert failed["at"].endswith("Z") and failed["failed_at"].endswith("Z") and failed["started_at"].endswith("Z")
    assert failed["host"] == socket.gethostname() and ":" in failed["worker"]
    released = next(e for e in events if e["event"] == "job.released" and e["job_id"] == bad[0])
    assert released["attempt"] == 1 and released["counted"] is True and released["retry_at"].endswith("Z")

    # In-process: once per event raised in a worker (job.dispatched is raised by the dispatcher,
    # and reaches forge.toml's listeners only); listener jobs' own events included.
    local = proj.lines("local.jsonl")
    assert Counter(x["id"] for x in local).most_common(1)[0][1] == 1
    worker_pids = {p.pid for p in workers}
    assert {x["pid"] for x in local} <= worker_pids
    durable_ids = {e["id"] for e in events if e["event"].startswith("job.") and e["event"] != "job.dispatched"}
    assert durable_ids <= {x["id"] for x in local}
    ran = len(proj.events())  # listener jobs run, worker.stopping/stopped ones included
    assert len(local) == len(durable_ids) + 2 * ran  # + each listener job's started and succeeded


# -- in-process listeners: failing, slow -------------------------------------------------------


def test_a_failing_or_hanging_in_process_listener_changes_no_outcome(proj: Proj) -> None:
    """A listener that raises on every outcome and one that sleeps 30 s (and swallows the first
    cut-off) on every success: the jobs' outcomes are as without them, each slow call is cut off
    at its 200 ms budget, and the worker reports both."""
    proj.write('[events]\nbudget = "200ms"\n')
    ok = [proj.dispatch() for _ in range(3)]
    bad = proj.dispatch("--code=4")
    w = proj.worker("--stop-when-empty", env={"EV_FAIL": "1", "EV_SLOW": "1"}, out="w.out")
    started = time.monotonic()
    assert exited([w], timeout=60) == [0]
    took = time.monotonic() - started
    for j in ok:
        assert proj.backend.find(j).state == State.DONE
    info = proj.backend.find(bad)
    assert info.state == State.FAILED and info.failure.exit_code == 4
    out = proj.lines("w.out")
    failed = [x for x in out if x["event"] == "listener_failed"]
    assert len(failed) == 4 and all("RuntimeError: listener broke on job." in x["error"] for x in failed)
    slow = [x for x in out if x["event"] == "listener_slow"]
    assert len(slow) == 3 and all(x["cut_off"] and x["budget_ms"] == 200 for x in slow)
    assert all(x["ms"] < 200 + 1500 for x in slow), slow  # the budget, and the loaded machine's slack
    assert took < 30, took  # not one 30 s sleep was waited out


def test_a_broken_listener_config_is_one_line_and_exit_2(proj: Proj) -> None:
    proj.write('[[listeners]]\nevent = "job.faild"\ncommand = "ev:record"\n')
    res = subprocess.run([sys.executable, "-m", "forge", "queue:dispatch", "ev:job"], env=proj.env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and 'unknown event "job.faild"' in res.stderr and "[[listeners]] #1" in res.stderr
    assert not list(proj.backend.jobs())  # nothing was stored
    proj.write('[[listeners]]\nevent = "job.failed"\ncommand = "notify:nowhere"\n')
    res = subprocess.run([sys.executable, "-m", "forge", "queue:work", "--once"], env=proj.env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and 'listener command "notify:nowhere" is not a registered command' in res.stderr
    assert len(res.stderr.strip().splitlines()) <= 2, res.stderr


def test_a_broken_events_table_stops_every_write_that_raises_events(proj: Proj, monkeypatch: pytest.MonkeyPatch) -> None:
    """forge.config leaves [[listeners]] and [events] to forge.events.config, which the library
    runs before a write that raises events: a dispatch, a cancel and a scheduler refuse a broken
    table before they write anything, and every CLI command refuses it (exit 2)."""
    from forge.config import load_settings
    from forge.errors import ConfigError
    from forge.queue import CommandQueue, QueuedCommand, QueueManager
    from forge.scheduler.scheduler import Scheduler

    job_id = proj.dispatch(opts=("--delay=1h",))
    proj.write('[events]\nbudget = "10s"\n')  # more than the 5 s an in-process listener may take
    monkeypatch.setenv("FORGE_CONFIG", str(proj.config))
    monkeypatch.delenv("FORGE_QUEUE_DIR", raising=False)
    settings = load_settings()
    assert settings.events and not settings.listeners
    queue = CommandQueue(connection=proj.backend, settings=settings)
    for write in (lambda: queue.dispatch(QueuedCommand("ev:job")), lambda: queue.push(QueuedCommand("ev:job")),
                  lambda: queue.dispatch_many([QueuedCommand("ev:job")]),
                  lambda: queue.store([QueuedCommand("ev:job").to_job("default")]),  # not built by jobs_for
                  lambda: QueueManager(proj.backend, settings=settings).cancel(job_id),
                  lambda: Scheduler([], settings=settings, backend=proj.backend)):
        with pytest.raises(ConfigError, match="events.budget must be more than 0 and at most 5s"):
            write()
    assert [(i.job.id, i.state) for i in proj.backend.jobs()] == [(job_id, State.DELAYED)]
    for argv in (["list"], ["queue:dispatch", "ev:job"], ["queue:cancel", job_id]):
        res = subprocess.run([sys.executable, "-m", "forge", *argv], env=proj.env, capture_output=True, text=True,
                             timeout=60)
        assert res.returncode == 2 and "events.budget must be" in res.stderr, (argv, res.stderr)
    assert [(i.job.id, i.state) for i in proj.backend.jobs()] == [(job_id, State.DELAYED)]


@pytest.mark.parametrize("toml", ["[listeners]\n", "listeners = false\n", "listeners = {}\n"])
def test_an_empty_or_false_listeners_key_is_refused_before_a_write(tmp_path: Path, toml: str,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """``[listeners]`` (one pair of brackets, no keys: a typo of ``[[listeners]]``) and
    ``listeners = false`` are no [[listeners]] tables: the CLI and the library refuse them
    with exit 2 / ConfigError and store nothing, as when forge.config parsed them."""
    from forge.config import load_settings
    from forge.errors import ConfigError
    from forge.queue import CommandQueue, QueuedCommand

    proj = Proj("file", tmp_path / "p")
    try:
        proj.config.write_text(toml + proj.config.read_text())  # a top-level key goes before the tables
        res = subprocess.run([sys.executable, "-m", "forge", "queue:dispatch", "ev:job"], env=proj.env,
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 2 and "listeners must be [[listeners]] tables" in res.stderr, res.stderr
        monkeypatch.setenv("FORGE_CONFIG", str(proj.config))
        monkeypatch.delenv("FORGE_QUEUE_DIR", raising=False)
        queue = CommandQueue(connection=proj.backend, settings=load_settings())
        with pytest.raises(ConfigError, match=r"listeners must be \[\[listeners\]\] tables"):
            queue.dispatch(QueuedCommand("ev:job"))
        assert not list(proj.backend.jobs())
    finally:
        proj.close()


def test_dispatch_and_cancel_raise_their_events(proj: Proj) -> None:
    proj.write(LISTEN_ALL)
    job_id = proj.dispatch("--code=1", opts=("--delay=1h",))
    res = subprocess.run([sys.executable, "-m", "forge", "queue:cancel", job_id], env=proj.env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert exited([proj.worker("--queue=events", "--stop-when-empty")]) == [0]
    got = {e["event"]: e for e in proj.events()}
    assert set(got) == {"job.dispatched", "job.cancelled", "job.failed"}
    assert got["job.dispatched"]["available_at"] > got["job.dispatched"]["dispatched_at"]
    assert got["job.failed"]["reason"] == "cancelled" and got["job.cancelled"]["job_id"] == job_id


def test_a_cancel_from_the_dashboard_raises_its_events(proj: Proj, monkeypatch: pytest.MonkeyPatch) -> None:
    """The dashboard's cancel button fails a waiting job as ``queue:cancel`` does, and raises
    the same ``job.cancelled`` and ``job.failed`` (it cancelled on the backend directly, and
    raised none)."""
    pytest.importorskip("starlette")
    from forge.config import load_settings
    from forge.dashboard.app import Dashboard
    from forge.dashboard.security import Guard
    from forge.queue import QueueManager

    proj.write(LISTEN_ALL)
    job_id = proj.dispatch(opts=("--delay=1h",))
    monkeypatch.setenv("FORGE_CONFIG", str(proj.config))
    monkeypatch.delenv("FORGE_QUEUE_DIR", raising=False)
    manager = QueueManager(proj.backend, settings=load_settings())
    dashboard = Dashboard(manager, Guard("127.0.0.1", 8000, allow_actions=True))
    assert dashboard._act("cancel", {"job": job_id}) == ("ok", f"Job {job_id} cancelled.")
    assert exited([proj.worker("--queue=events", "--stop-when-empty")]) == [0]
    got = {e["event"]: e for e in proj.events()}
    assert set(got) == {"job.dispatched", "job.cancelled", "job.failed"}, got
    assert got["job.failed"]["reason"] == "cancelled" and got["job.cancelled"]["job_id"] == job_id


# -- SIGKILL around the outcome ----------------------------------------------------------------


def _traced(pid: int) -> bool:
    with open(f"/proc/{pid}/status") as fh:
        return any(line.startswith("TracerPid:") and line.split()[1] != "0" for line in fh)


def _run_job_until_killed(proj: Proj, kill: Callable[[subprocess.Popen], Any]) -> tuple[str, subprocess.Popen]:
    """Start a worker, give it a job that waits for a go file, call ``kill(worker)`` while the
    job waits (to arm a fault), let the job finish and return once the worker is dead."""
    mark, go = proj.root / "mark", proj.root / "go"
    w = proj.worker("--queue=default,events", out="w1.out")
    proj.started(w)
    job_id = proj.dispatch(f"--mark={mark}", f"--go={go}", opts=("--tries=3", "--timeout=2s"))
    wait_for(lambda: mark.exists() and mark.read_text().strip(), timeout=60, what="job running")
    armed = kill(w)
    go.touch()
    assert w.wait(60) == -signal.SIGKILL
    if isinstance(armed, subprocess.Popen):
        armed.wait(10)
    return job_id, w


def _check_after_recovery(proj: Proj, job_id: str, killed_attempt_stored: bool) -> None:
    """A second worker recovers the job (releasing the killed attempt: job.released, reason
    abandoned, raised by it) and finishes it: each event has exactly one listener job, which ran
    once; the recorded attempt's job.succeeded is among them; the killed attempt's exists only if
    its listener job was stored before the kill."""
    w2 = proj.worker("--queue=default,events", out="w2.out")
    expected = (2 if killed_attempt_stored else 1) + 1
    wait_for(lambda: len(proj.events()) >= expected, timeout=90, what="listener jobs ran")
    wait_for(lambda: proj.backend.stats(["events"])[0].pending == 0 and proj.backend.stats(["events"])[0].reserved == 0,
             timeout=60, what="events queue drained")
    w2.send_signal(signal.SIGTERM)
    assert w2.wait(60) == 0
    info = proj.backend.find(job_id)
    assert info.state == State.DONE and info.attempts == 2
    events = proj.events()
    assert len(events) == expected, events
    assert len({e["id"] for e in events}) == len({e["listener_job"] for e in events}) == expected
    succeeded = [e["attempt"] for e in events if e["event"] == "job.succeeded"]
    assert sorted(succeeded) == ([1, 2] if killed_attempt_stored else [2])
    (released,) = [e for e in events if e["event"] == "job.released"]
    assert released["reason"] == "abandoned" and released["attempt"] == 1 and released["worker"].endswith(f":{w2.pid}")
    listener_jobs = list(proj.backend.jobs(queue="events"))
    assert len(listener_jobs) == expected and all(j.state == State.DONE for j in listener_jobs)


@pytest.mark.skipif(STRACE is None, reason="strace is not installed (apt-get install strace)")
@pytest.mark.parametrize("point", ["before", "after"], ids=["before-listener-stored", "after-listener-stored"])
def test_file_worker_sigkilled_around_the_outcome(tmp_path: Path, point: str) -> None:
    """SIGKILL the worker (strace attached while the job runs) on entry to the hard link that
    takes the listener job's key (nothing of it stored yet), or to the write that records the
    outcome in the claimed job file (the listener job stored, the outcome not recorded)."""
    proj = Proj("file", tmp_path / "p")
    proj.write('[[listeners]]\nevent = ["job.succeeded", "job.released"]\ncommand = "ev:record"\nqueue = "events"\n')
    try:
        def arm(w: subprocess.Popen) -> subprocess.Popen:
            if point == "before":
                expr = ["-e", "trace=linkat", "-e", "inject=linkat:signal=KILL:when=1"]
            else:  # only calls on the claimed file: its first write is the outcome's record
                reserved = wait_for(lambda: list((proj.root / "queue" / "q" / "default" / "reserved").glob("*.job")), timeout=60)
                expr = ["-P", str(reserved[0]), "-e", "trace=write", "-e", "inject=write:signal=KILL:when=1"]
            tracer = subprocess.Popen([STRACE or "strace", "-qq", "-p", str(w.pid), "-o", "/dev/null", *expr],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_for(lambda: _traced(w.pid), timeout=60, what="strace attached")
            return tracer

        job_id, _ = _run_job_until_killed(proj, arm)
        stored = list(proj.backend.jobs(queue="events"))
        assert len(stored) == (0 if point == "before" else 1)
        assert proj.backend.find(job_id).state == State.RESERVED  # its outcome was not recorded
        _check_after_recovery(proj, job_id, killed_attempt_stored=point == "after")
    finally:
        proj.close()


class _KillingProxy:
    """A TCP proxy in front of Redis that SIGKILLs the worker when a connection of its sends
    the next command after Redis answered the one that stored a listener job (that next one is
    the outcome's record), instead of forwarding it."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.victim = 0
        self.killed = threading.Event()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            state = {"pushed": False, "answered": False}
            threading.Thread(target=self._pump, args=(client, server, state, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, state, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, state: dict[str, bool], upstream: bool) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if not upstream and state["pushed"]:
                    state["answered"] = True
                elif upstream and self.victim and not self.killed.is_set():
                    if state["answered"]:
                        os.kill(self.victim, signal.SIGKILL)
                        self.killed.set()
                        break
                    state["pushed"] = state["pushed"] or b"forge_event" in data
                dst.sendall(data)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.close()

    def close(self) -> None:
        self.sock.close()


@pytest.mark.skipif(not REDIS_URL, reason="FORGE_TEST_REDIS_URL is not set")
def test_redis_worker_sigkilled_between_storing_the_listener_job_and_the_outcome(tmp_path: Path) -> None:
    """The worker reaches Redis through a proxy that SIGKILLs it as it sends the outcome's
    record right after storing the listener job: the listener job is kept, the job is
    recovered once its lease lapses (10 s) and runs again; each event's listener ran once."""
    from urllib.parse import urlparse

    url = urlparse(REDIS_URL or "")
    proxy = _KillingProxy((url.hostname or "127.0.0.1", url.port or 6379))
    proj = Proj("redis", tmp_path / "p")
    db = (url.path or "/0").lstrip("/") or "0"
    proj.write('[[listeners]]\nevent = ["job.succeeded", "job.released"]\ncommand = "ev:record"\nqueue = "events"\n',
               redis_url=f"redis://127.0.0.1:{proxy.port}/{db}")
    try:
        def arm(w: subprocess.Popen) -> None:
            proxy.victim = w.pid

        job_id, _ = _run_job_until_killed(proj, arm)
        assert proxy.killed.is_set()
        assert len(list(proj.backend.jobs(queue="events"))) == 1
        assert proj.backend.find(job_id).state == State.RESERVED
        proxy.victim = 0
        _check_after_recovery(proj, job_id, killed_attempt_stored=True)
    finally:
        proj.close()
        proxy.close()


# -- threshold events --------------------------------------------------------------------------


def _heartbeats_past(proj: Proj, names: set[str], t: float) -> bool:
    beats = {r["name"]: r["heartbeat_at"] for r in map(json.loads, proj.backend.worker_records())}
    return all(beats.get(n, 0) >= t for n in names)


def _marked(proj: Proj, key: str) -> bool:
    if proj.kind == "file":
        return (proj.root / "queue" / "events" / f"{key}.fired").exists()
    import redis

    client = redis.Redis.from_url(REDIS_URL or "")
    try:
        return bool(client.exists(f"{proj.prefix}:events:{key}"))
    finally:
        client.close()


def test_a_threshold_fires_once_per_crossing_with_three_workers(proj: Proj) -> None:
    """queue.too_long with 3 workers watching: one event when the queue passes 3 pending jobs,
    none more while it stays over (every worker has looked again since), one more after it
    cleared (re-armed) and crossed again."""
    proj.write('[events.thresholds]\ntoo_long = 3\n'
               '[[listeners]]\nevent = "queue.*"\ncommand = "ev:record"\nqueue = "events"\n')
    names = [f"w{i}-{uuid.uuid4().hex[:6]}" for i in range(3)]
    workers = [proj.worker("--queue=events", f"--name={n}") for n in names]
    for w in workers:
        proj.started(w)

    def cross(settle: bool) -> dict[str, Any]:
        before = len(proj.events())
        for _ in range(4):
            proj.dispatch(opts=("--queue=held",))
        wait_for(lambda: len(proj.events()) > before, timeout=60, what="threshold event")
        ev = proj.events()[-1]
        if settle:  # every worker has since passed its maintenance (every 2 s, before its heartbeat)
            wait_for(lambda: _heartbeats_past(proj, set(names), ev_time(ev) + 2.5), timeout=60, what="every worker looked again")
        return ev

    first = cross(settle=True)
    assert [e["event"] for e in proj.events()] == ["queue.too_long"]
    assert first["queue"] == "held" and first["pending"] == 4 and first["threshold"] == 3
    assert first["worker"] in names

    assert proj.backend.clear("held") == 4
    wait_for(lambda: not _marked(proj, "too_long.held"), timeout=60, what="re-armed")
    cross(settle=False)
    events = proj.events()
    assert [e["event"] for e in events] == ["queue.too_long"] * 2 and len({e["id"] for e in events}) == 2
    for w in workers:
        w.send_signal(signal.SIGTERM)
    assert exited(workers) == [0, 0, 0]


def ev_time(ev: dict[str, Any]) -> float:
    from datetime import datetime

    return datetime.fromisoformat(ev["at"].replace("Z", "+00:00")).timestamp()


def test_job_retried_many_and_waiting_too_long(proj: Proj) -> None:
    proj.write('[events.thresholds]\nretried_many = 2\n[events.thresholds.queues.held]\nwaiting_too_long = "1s"\n'
               '[[listeners]]\nevent = ["job.retried_many", "queue.waiting_too_long"]\ncommand = "ev:record"\n'
               'queue = "events"\n')
    proj.dispatch(opts=("--queue=held",))
    job_id = proj.dispatch("--code=1", opts=("--tries=4",))
    w = proj.worker("--queue=default,events")
    wait_for(lambda: {e["event"] for e in proj.events()} == {"job.retried_many", "queue.waiting_too_long"},
             timeout=60, what="both events")
    w.send_signal(signal.SIGTERM)
    assert exited([w]) == [0]
    got = {e["event"]: e for e in proj.events()}
    many = got["job.retried_many"]
    assert many["job_id"] == job_id and many["retries"] == 2 and many["threshold"] == 2 and many["attempt"] == 2
    waiting = got["queue.waiting_too_long"]
    assert waiting["queue"] == "held" and waiting["oldest_age"] > 1 and waiting["threshold"] == 1
    assert len(proj.events()) == 2


# -- the scheduler ---------------------------------------------------------------------------


def test_schedule_ticks_raise_one_event_each_however_many_runs(proj: Proj, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two schedulers run at the same instant (a tick both see): one tick_dispatched event; an
    overlap = "skip" entry whose last job is still pending: one tick_skipped."""
    from datetime import UTC, datetime

    from forge.config import load_settings
    from forge.registry.discovery import build_registry
    from forge.scheduler.scheduler import Scheduler

    proj.write('[[schedule]]\nname = "tick"\ncommand = "ev:job"\nevery = "1m"\noverlap = "skip"\n'
               '[[listeners]]\nevent = "schedule.*"\ncommand = "ev:record"\nqueue = "events"\n')
    monkeypatch.setenv("FORGE_CONFIG", str(proj.config))
    monkeypatch.delenv("FORGE_QUEUE_DIR", raising=False)
    t = datetime(2026, 3, 1, 3, 0, tzinfo=UTC).timestamp()

    def run(now: float) -> list[Any]:
        settings = load_settings()
        sch, errors = Scheduler.load(settings=settings, registry=build_registry(settings), backend=proj.backend)
        assert not errors
        return sch.run(now=now)

    assert [a.action for a in run(t + 1)] == ["dispatched"]
    assert [a.action for a in run(t + 2)] == []
    assert [a.action for a in run(t + 61)] == ["skipped"]  # the 03:00 job is still pending
    assert exited([proj.worker("--queue=events", "--stop-when-empty")]) == [0]
    events = sorted(proj.events(), key=lambda e: e["tick"])
    assert [(e["event"], e["tick"]) for e in events] == [("schedule.tick_dispatched", "2026-03-01T03:00:00.000Z"),
                                                         ("schedule.tick_skipped", "2026-03-01T03:01:00.000Z")]
    assert events[0]["entry"] == "tick" and events[0]["job_id"]


# -- timeouts and running cancels; plugins --------------------------------------------------------


def test_a_timeout_and_a_running_cancel_raise_their_events(proj: Proj) -> None:
    proj.write(LISTEN_ALL.replace('"job.*"', '["job.timed_out", "job.cancelled", "job.failed"]'))
    mark, go = proj.root / "mark", proj.root / "go"
    slow = proj.dispatch("--sleep=60", opts=("--timeout=1s",))
    w = proj.worker("--queue=default,events")
    wait_for(lambda: proj.backend.find(slow).state == State.FAILED, timeout=60, what="timed out")
    held = proj.dispatch(f"--mark={mark}", f"--go={go}")
    wait_for(mark.exists, timeout=60, what="job running")
    res = subprocess.run([sys.executable, "-m", "forge", "queue:cancel", "--running", held], env=proj.env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    wait_for(lambda: len(proj.events()) >= 4, timeout=60, what="listener jobs ran")
    w.send_signal(signal.SIGTERM)
    assert exited([w]) == [0]
    got = sorted((e["job_id"] == slow, e["event"], e["reason"]) for e in proj.events())
    assert got == [(False, "job.cancelled", "cancelled"), (False, "job.failed", "cancelled"),
                   (True, "job.failed", "timeout"), (True, "job.timed_out", "timeout")]


def test_a_plugins_listeners_load_through_the_entry_point_group(tmp_path: Path) -> None:
    """A package installed with an entry point in forge.listeners: its @forge.on function runs
    in the worker; a plugin that fails to import is a warning, and the worker still runs."""
    site = tmp_path / "site"
    (site / "evplugin-1.0.dist-info").mkdir(parents=True)
    (site / "evplugin-1.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: evplugin\nVersion: 1.0\n")
    (site / "evplugin-1.0.dist-info" / "entry_points.txt").write_text(
        "[forge.listeners]\nevp = evplugin\nbroken = evbroken\n")
    (site / "evplugin.py").write_text(
        "import os\nimport forge\n\n\n@forge.on('job.succeeded')\ndef seen(event):\n"
        "    with open(os.environ['EV_PLUGIN'], 'a') as fh:\n        fh.write(event['job_id'] + '\\n')\n")
    (site / "evbroken.py").write_text("raise ImportError('no such thing')\n")
    proj = Proj("file", tmp_path / "p")
    try:
        job_id = proj.dispatch()
        seen = tmp_path / "seen"
        env = {"PYTHONPATH": str(site), "FORGE_NO_PLUGINS": "", "EV_PLUGIN": str(seen)}
        res = subprocess.run([sys.executable, "-m", "forge", "queue:work", "--stop-when-empty"],
                             env={**proj.env, **env}, capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        assert seen.read_text().split() == [job_id]
        assert "evplugin" in res.stderr and "failed to load its listeners" in res.stderr and "no such thing" in res.stderr
    finally:
        proj.close()


def test_a_dead_workers_job_raises_its_outcome_from_the_worker_that_recovers_it(tmp_path: Path) -> None:
    """SIGKILL a worker mid-job (tries 1): the worker that recovers the claim fails it with reason
    abandoned and raises job.failed for it, once. (On Redis, the SIGKILL test above sees the
    recovering worker's job.released.)"""
    proj = Proj("file", tmp_path / "p")
    proj.write(LISTEN_ALL.replace('"job.*"', '["job.failed", "job.released"]'))
    mark = proj.root / "mark"
    try:
        w1 = proj.worker("--queue=default,events", "--name=first", out="w1.out")
        job_id = proj.dispatch(f"--mark={mark}", "--sleep=60", opts=("--timeout=2s",))
        wait_for(mark.exists, timeout=60, what="job running")
        w1.kill()
        w1.wait(10)
        w2 = proj.worker("--queue=default,events", "--name=second", "--stop-when-empty", out="w2.out")
        assert exited([w2]) == [0]
        (ev,) = proj.events()
        assert ev["event"] == "job.failed" and ev["job_id"] == job_id and ev["reason"] == "abandoned"
        assert ev["worker"] == "second" and ev["attempt"] == 1
    finally:
        proj.close()


def test_events_list_shows_every_listener(proj: Proj) -> None:
    proj.write('[events]\nbudget = "250ms"\n' + LISTEN_ALL)
    res = subprocess.run([sys.executable, "-m", "forge", "events:list", "--json"], env=proj.env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert {e["event"] for e in doc["events"]} >= {"job.failed", "worker.stopped", "queue.too_long"}
    kinds = {(x["kind"], x.get("command") or x.get("function")) for x in doc["listeners"]}
    assert ("durable", "ev:record") in kinds and ("in-process", "local_slow") in kinds
    assert doc["budget"] == 0.25
    res = subprocess.run([sys.executable, "-m", "forge", "events:list"], env=proj.env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "job ev:record on events" in res.stdout and "local_fail" in res.stdout


@pytest.mark.parametrize(("written", "delays"), [("exp:2s..1m", [2.0, 4.0, 8.0]), ("1,5", [1.0, 5.0, 5.0])])
def test_a_listener_backoff_in_forge_toml_reaches_its_job_in_either_form(written: str, delays: list[float]) -> None:
    """[[listeners]] backoff takes both forms a dispatch takes; an exponential one used to crash
    the listener's dispatch (it was turned into a list)."""
    from forge.events.config import parse
    from forge.events.model import Event
    from forge.retry.backoff import delay

    cfg = parse({"listeners": [{"event": "job.failed", "command": "demo:hello", "backoff": written}]}, "forge.toml")
    (listener,) = cfg.listeners
    job = listener.job_for(Event("job.failed", "ev-1", 0.0, {}), "default")
    assert [delay(job.backoff, n) for n in (1, 2, 3)] == delays
