"""The worker, tested with real worker processes, real job processes and real signals."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from conftest import blocked_waiting, next_event, started
from fdwait import readable
from reliability.harness import job_processes
from waitfor import wait_for

from forge.job import State
from forge.queue import CommandQueue, QueuedCommand, QueueManager


def ledger_lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def ends(path: Path) -> list[dict]:
    return [r for r in ledger_lines(path) if r["kind"] == "end"]


def probe(*args: str) -> QueuedCommand:
    return QueuedCommand("probe:run").with_args(list(args))


def start_worker(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "forge", "queue:work", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def run_worker(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "forge", "queue:work", *args],
                          capture_output=True, text=True, timeout=timeout)


def json_events(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]




def test_drains_queue_and_records_done(probe_project: Path) -> None:
    q = CommandQueue()
    ids = q.dispatch_many([probe("a", "--say", "hello")] + [probe(str(i)) for i in range(20)])
    res = run_worker("--stop-when-empty")
    assert res.returncode == 0, res.stderr
    assert sorted(r["job"] for r in ends(probe_project)) == sorted(ids)
    info = q.backend.find(ids[0])
    assert info is not None and info.state == State.DONE and info.attempts == 1
    assert q.backend.read_log(ids[0]) == b"hello\n"
    assert q.backend.read_log(ids[1]) == b""  # silent jobs write no log
    assert "DONE" in res.stdout and "probe:run" in res.stdout


def test_job_environment_and_literal_args(probe_project: Path) -> None:
    q = CommandQueue()
    hostile = ["; rm -rf /", "$(id)", "`whoami`", "a b", "'\"", "*"]
    job_id = q.dispatch(probe(*hostile))
    env_id = q.dispatch(QueuedCommand("probe:env"))
    assert run_worker("--stop-when-empty").returncode == 0
    (record,) = ends(probe_project)
    assert record["job"] == job_id and record["args"] == hostile and record["queue"] == "default"
    assert record["attempt"] == 1
    env = json.loads(q.backend.read_log(env_id))
    token = env.pop("FORGE_JOB_TOKEN")
    assert token.isdigit() and int(token) > 0  # the fencing token: the claim's time in microseconds
    assert env == {"FORGE_JOB_ID": env_id, "FORGE_JOB_ATTEMPT": "1", "FORGE_QUEUE": "default"}


def test_strict_priority_order(probe_project: Path) -> None:
    low, high = CommandQueue("low"), CommandQueue("high")
    low_ids = low.dispatch_many([probe("low") for _ in range(3)])
    high_ids = high.dispatch_many([probe("high") for _ in range(3)])
    res = run_worker("--queue=high,low", "--stop-when-empty", "--json")
    started = [e["job_id"] for e in json_events(res.stdout) if e["event"] == "starting"]
    assert started == high_ids + low_ids


def test_failure_retries_with_backoff_then_fails(probe_project: Path) -> None:
    q = CommandQueue()
    job_id = q.dispatch(probe("--fail").with_max_attempts(3).with_backoff([0.5, 1]))
    res = run_worker("--sleep=0.05", "--json", "--max-time=4")
    assert res.returncode == 0, res.stderr
    events = [e for e in json_events(res.stdout) if e.get("job_id") == job_id]
    assert [e["event"] for e in events] == ["starting", "released", "starting", "released", "starting", "failed"]
    runs = ends(probe_project)
    assert [r["attempt"] for r in runs] == [1, 2, 3]
    gaps = [runs[i + 1]["start"] - runs[i]["end"] for i in range(2)]
    assert gaps[0] >= 0.5 and gaps[1] >= 1.0
    info = q.backend.find(job_id)
    assert info.state == State.FAILED and info.attempts == 3
    assert info.failure.reason == "exception" and "probe failed on purpose" in info.failure.error
    assert "RuntimeError" in (info.failure.output_tail or "")


def test_exit_code_failure_records_code(probe_project: Path) -> None:
    q = CommandQueue()
    job_id = q.dispatch(probe("--exit-code", "3").with_max_attempts(2).with_backoff(0))
    run_worker("--stop-when-empty")
    info = q.backend.find(job_id)
    assert info.state == State.FAILED and info.attempts == 2
    assert info.failure.reason == "exit_code" and info.failure.exit_code == 3


def test_timeout_kills_job_group_including_grandchild(probe_project: Path, tmp_path: Path) -> None:
    q = CommandQueue()
    pidfile = tmp_path / "grandchild.pid"
    job_id = q.dispatch(probe("--ignore-term", "--grandchild", str(pidfile), "--sleep", "30").with_timeout(1))
    started = time.monotonic()
    res = run_worker("--stop-when-empty")
    elapsed = time.monotonic() - started
    assert res.returncode == 0, res.stderr
    grandchild = int(pidfile.read_text())
    time.sleep(0.1)
    assert not Path(f"/proc/{grandchild}").exists() or "Z" in Path(f"/proc/{grandchild}/stat").read_text().split()[2]
    assert elapsed < 1 + 3 + 5  # timeout + grace + start-up
    info = q.backend.find(job_id)
    assert info.state == State.FAILED and info.failure.reason == "timeout"
    assert ends(probe_project) == []


def test_unknown_command_fails_job_and_worker_goes_on(probe_project: Path, tmp_path: Path) -> None:
    q = CommandQueue()
    bad = q.backend
    from forge.job import Job

    job = Job(id="11111111-2222-4333-8444-555555555555", command="gone:away", args=(), queue="default",
              max_attempts=3, timeout=None, backoff=None, metadata={}, dispatched_at=time.time(),
              available_at=time.time())
    bad.push([job])
    good = q.dispatch(probe("ok"))
    res = run_worker("--stop-when-empty")
    assert res.returncode == 0
    info = bad.find(job.id)
    assert info.state == State.FAILED and info.failure.reason == "unknown_command" and info.attempts == 1
    assert [r["job"] for r in ends(probe_project)] == [good]


def test_sigkill_of_worker_mid_job_reruns_once_never_concurrently(probe_project: Path) -> None:
    q = CommandQueue()
    job_id = q.dispatch(probe("--sleep", "1.5").with_max_attempts(3))
    worker = start_worker("--sleep=0.1")
    wait_for(lambda: ledger_lines(probe_project))
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    # The job process lives on and keeps the claim: a new worker must not run it concurrently.
    res = run_worker("--stop-when-empty", "--sleep=0.1", "--max-time=20")
    assert res.returncode == 0
    deadline = time.monotonic() + 20
    while q.backend.find(job_id).state != State.DONE and time.monotonic() < deadline:
        run_worker("--stop-when-empty", "--sleep=0.1", "--max-time=5")
        time.sleep(0.2)
    runs = ends(probe_project)
    assert 1 <= len(runs) <= 2
    runs.sort(key=lambda r: r["start"])
    for a, b in zip(runs, runs[1:], strict=False):
        assert b["start"] >= a["end"], "two runs of one job overlapped"
    info = q.backend.find(job_id)
    assert info.state == State.DONE


def test_poison_pill_fails_after_max_attempts_as_abandoned(probe_project: Path) -> None:
    q = CommandQueue()
    poison = q.dispatch(probe("--kill-worker").with_max_attempts(3))
    others = q.dispatch_many([probe("fine") for _ in range(3)])
    for _ in range(10):  # a supervisor restarting the worker
        run_worker("--stop-when-empty", "--sleep=0.05")
        if q.backend.find(poison).state == State.FAILED and all(
            q.backend.find(i).state == State.DONE for i in others
        ):
            break
        time.sleep(0.1)
    starts = [r for r in ledger_lines(probe_project) if r["kind"] == "start" and r["job"] == poison]
    assert [r["attempt"] for r in starts] == [1, 2, 3]
    info = q.backend.find(poison)
    assert info.state == State.FAILED and info.failure.reason == "abandoned" and info.attempts == 3
    assert all(q.backend.find(i).state == State.DONE for i in others)


def test_sigterm_lets_running_job_finish(probe_project: Path) -> None:
    q = CommandQueue()
    job_id = q.dispatch(probe("--sleep", "1"))
    second = q.dispatch(probe("later"))
    worker = start_worker("--sleep=0.1")
    wait_for(lambda: ledger_lines(probe_project))
    worker.send_signal(signal.SIGTERM)
    out, err = worker.communicate(timeout=20)
    assert worker.returncode == 0, err
    assert q.backend.find(job_id).state == State.DONE
    assert q.backend.find(second).state == State.PENDING  # it stopped claiming


def test_second_signal_stops_at_once_and_does_not_count_attempt(probe_project: Path) -> None:
    q = CommandQueue()
    job_id = q.dispatch(probe("--sleep", "30").with_max_attempts(1))
    worker = start_worker("--sleep=0.1", "--json")
    next_event(worker, "starting")
    wait_for(lambda: ledger_lines(probe_project))
    worker.send_signal(signal.SIGTERM)
    next_event(worker, "stopping")  # the first signal was taken: a graceful stop
    worker.send_signal(signal.SIGINT)
    worker.communicate(timeout=10)
    assert worker.returncode == 1
    info = q.backend.find(job_id)
    assert info.state == State.PENDING and info.attempts == 0


def test_restart_marker_stops_idle_worker(probe_project: Path) -> None:
    worker = started(start_worker("--sleep=0.5", "--json"))
    assert worker.poll() is None
    res = subprocess.run([sys.executable, "-m", "forge", "queue:restart"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    worker.communicate(timeout=10)
    assert worker.returncode == 0


def test_pause_and_resume_queue(probe_project: Path) -> None:
    manager = QueueManager()
    q = CommandQueue()
    manager.pause("default")
    job_id = q.dispatch(probe("x"))
    run_worker("--stop-when-empty")
    assert q.backend.find(job_id).state == State.PENDING
    manager.resume("default")
    run_worker("--stop-when-empty")
    assert q.backend.find(job_id).state == State.DONE


def test_sigusr2_pauses_and_sigcont_resumes(probe_project: Path) -> None:
    q = CommandQueue()
    worker = started(start_worker("--sleep=0.1", "--json"))
    worker.send_signal(signal.SIGUSR2)
    next_event(worker, "paused")
    job_id = q.dispatch(probe("x"))
    time.sleep(1.0)  # (a paused worker must leave it for a while: this is the claim)
    assert q.backend.find(job_id).state == State.PENDING
    worker.send_signal(signal.SIGCONT)
    wait_for(lambda: q.backend.find(job_id).state == State.DONE)
    worker.send_signal(signal.SIGTERM)
    worker.communicate(timeout=10)


def test_idle_worker_wakes_on_dispatch(probe_project: Path) -> None:
    worker = started(start_worker("--sleep=30", "--json"))
    wait_for(lambda: blocked_waiting(worker.pid))  # in its idle wait, not yet at its first claim
    q = CommandQueue()
    sent = time.time()
    q.dispatch(probe("x"))
    (record,) = wait_for(lambda: ends(probe_project), timeout=10)
    assert record["start"] - sent < 2.0  # far below --sleep=30: woken by the dispatch
    worker.send_signal(signal.SIGTERM)
    worker.communicate(timeout=10)


def test_stop_conditions(probe_project: Path) -> None:
    q = CommandQueue()
    q.dispatch_many([probe(str(i)) for i in range(5)])
    res = run_worker("--max-jobs=2", "--json")
    assert res.returncode == 0
    assert [e["reason"] for e in json_events(res.stdout) if e["event"] == "worker_stopped"] == ["max_jobs"]
    assert len(ends(probe_project)) == 2
    res = run_worker("--once")
    assert res.returncode == 0 and len(ends(probe_project)) == 3
    res = run_worker("--memory=1")
    assert res.returncode == 12 and len(ends(probe_project)) == 4
    started = time.monotonic()
    res = run_worker("--max-time=1", "--sleep=0.2")
    assert res.returncode == 0 and time.monotonic() - started < 10


def test_delayed_job_runs_when_due(probe_project: Path) -> None:
    q = CommandQueue()
    job_id = q.dispatch(probe("later").with_delay(1))
    assert q.backend.find(job_id).state == State.DELAYED
    worker = start_worker("--sleep=10")
    (record,) = wait_for(lambda: ends(probe_project), timeout=15)
    assert record["job"] == job_id
    info = q.backend.find(job_id)
    assert record["start"] >= info.job.available_at
    worker.send_signal(signal.SIGTERM)
    worker.communicate(timeout=10)


@pytest.mark.parametrize("args", [["--queue=../etc"], ["--timeout=soon"], ["--tries=0"], ["--backoff=1,x"]])
def test_bad_worker_options_exit_2(probe_project: Path, args: list[str]) -> None:
    res = run_worker(*args, "--once")
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert res.stderr.count("\n") <= 2 and "Error" in res.stderr


def test_job_process_crash_is_recorded_and_worker_goes_on(probe_project: Path) -> None:
    q = CommandQueue()
    crash = q.dispatch(probe("--say", "before the crash", "--crash").with_max_attempts(2))
    fine = q.dispatch(probe("fine"))
    res = run_worker("--stop-when-empty", "--json")
    assert res.returncode == 0, res.stderr
    info = q.backend.find(crash)
    assert info.state == State.FAILED and info.attempts == 2
    assert info.failure.reason == "exit_code" and "signal 9" in info.failure.error
    assert "before the crash" in (info.failure.output_tail or "")
    assert q.backend.find(fine).state == State.DONE


def test_job_dies_with_its_supervisor_and_runs_again_once(probe_project: Path) -> None:
    """The supervisor holds the claim: SIGKILL it mid-job and its job process dies with it
    (nobody could record the outcome), so the next worker runs the job again, once, after."""
    q = CommandQueue()
    job_id = q.dispatch(probe("--sleep", "2").with_max_attempts(3))
    worker = start_worker("--sleep=0.1")
    (first,) = wait_for(lambda: [r for r in ledger_lines(probe_project) if r["kind"] == "start"])
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    wait_for(lambda: not os.path.exists(f"/proc/{first['pid']}"), timeout=10)
    res = run_worker("--stop-when-empty", "--sleep=0.1")
    assert res.returncode == 0, res.stderr
    info = q.backend.find(job_id)
    assert info.state == State.DONE and info.attempts == 2
    runs = ledger_lines(probe_project)
    assert [r["kind"] for r in runs] == ["start", "start", "end"]
    assert runs[1]["start"] > time.time() - 30 and runs[1]["pid"] != first["pid"]


def test_a_chatty_long_job_does_not_keep_its_output_in_memory(probe_project: Path) -> None:
    """32 MiB printed by a job that then keeps running: the worker copies it to the log (capped)
    and frees the copied part of the in-memory output buffer; the failure tail stays intact."""
    job_id = CommandQueue().dispatch(probe("--print-mb", "32", "--sleep", "3", "--exit-code", "3"))
    worker = start_worker("--stop-when-empty")
    try:
        wait_for(lambda: any(r["kind"] == "printed" for r in ledger_lines(probe_project)), timeout=30)
        (job_proc,) = job_processes(worker.pid)
        assert os.stat(f"/proc/{job_proc}/fd/1").st_size >= 32 * 1024 * 1024
        # The worker's output copies free what they copied, within the job's remaining 3 s:
        # resident is then the uncopied rest and a tail.
        st = wait_for(lambda: (s := os.stat(f"/proc/{job_proc}/fd/1")).st_blocks * 512 < 4 * 1024 * 1024 and s,
                      timeout=30, interval=0.05)
        assert st.st_size >= 32 * 1024 * 1024
        worker.wait(timeout=30)
    finally:
        worker.kill()
    info = QueueManager().find(job_id)
    assert info is not None and info.state == State.FAILED
    log = QueueManager().read_log(job_id)
    assert log.startswith(b"0" * 31 + b"\n") and len(log) == 1024 * 1024  # the log cap
    assert info.failure is not None and info.failure.output_tail
    last = (32 * 1024 * 1024 // 32) - 1
    assert info.failure.output_tail.endswith(f"{last:031d}\n")  # the tail is the real end, not holes


def test_a_job_leaves_no_signal_disposition_to_the_next(probe_project: Path) -> None:
    """A job that ignores SIGCHLD must not make the next job's child exit codes vanish."""
    q = CommandQueue()
    q.dispatch(probe("--ignore-chld"))
    second = q.dispatch(probe("--run-false"))
    res = run_worker("--stop-when-empty", "--json")
    assert res.returncode == 0, res.stderr
    info = QueueManager().find(second)
    assert info is not None and info.state == State.FAILED and info.failure is not None
    assert info.failure.error and "exited with code 1" in info.failure.error


def test_jobs_of_a_worker_started_in_a_terminal_print_plain_text(probe_project: Path) -> None:
    """The job's stdout is its captured output, never the worker's terminal (no rich help)."""
    import pty

    job_id = CommandQueue(check_args=False).dispatch(probe("--help"))  # (refused when checked)
    main_fd, sub_fd = pty.openpty()
    try:
        worker = subprocess.Popen([sys.executable, "-m", "forge", "queue:work", "--stop-when-empty"],
                                  stdin=sub_fd, stdout=sub_fd, stderr=sub_fd)
        deadline = time.monotonic() + 30
        while worker.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if readable([main_fd], 0.1):
                    os.read(main_fd, 65536)  # keep the terminal drained
        assert worker.wait(timeout=5) == 0
    finally:
        os.close(sub_fd)
        os.close(main_fd)
    log = QueueManager().read_log(job_id).decode()
    assert "Usage:" in log and "╭" not in log and "\x1b[" not in log


def test_output_is_copied_to_the_log_in_bounded_chunks(tmp_path: Path) -> None:
    """However much a job printed since the last copy, a copy never holds more than 1 MiB."""
    from forge.backends.file.backend import FileBackend
    from forge.worker.shared import OutputBuffer, SharedState

    class Recording(FileBackend):
        sizes: list[int] = []

        def append_log(self, job_id: str, data: bytes) -> None:
            self.sizes.append(len(data))
            super().append_log(job_id, data)

    backend = Recording(tmp_path / "q")
    out = OutputBuffer(SharedState())
    job_id = str(uuid.uuid4())
    block = b"".join(b"%031d\n" % i for i in range(32768))  # 1 MiB
    for _ in range(5):
        os.write(out.fd, block)
    os.write(out.fd, b"tail\n")
    out.flush_to_log(backend, job_id)
    assert max(backend.sizes) <= 1024 * 1024 and sum(backend.sizes) == 5 * len(block) + 5
    assert out.tail(5) == "tail\n"  # the kept end is intact after the copied part is freed
    assert backend.read_log(job_id) == block  # the log keeps the first 1 MiB
    backend.close()
