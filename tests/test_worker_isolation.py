"""The contract repair's worker items (issue 11: 1-3, 6, 8-11), each tried the way it broke:
real worker processes, real signals, real files and a real Redis; hostile job code from the
probe project (closing descriptors, ignoring signals, forking daemons, freezing)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import require_redis
from reliability.checker import check, read_ledger, runs_of
from reliability.harness import Target, make_target, worker_argv
from waitfor import wait_for

from forge.job import Event, State

REDIS_URL = os.environ.get("FORGE_TEST_REDIS_URL")


def _target(kind: str, tmp_path: Path, extra: str = "") -> Target:
    t = make_target("redis" if kind == "redis" else "file", tmp_path / "t", REDIS_URL)
    config = Path(t.env["FORGE_CONFIG"])
    text = config.read_text()
    if kind == "lease":
        text = text.replace("[connections.file]\n", '[connections.file]\nlock = "lease"\n')
    config.write_text(text + extra)
    return t


def _needs_redis(kind: str) -> None:
    if kind == "redis":
        require_redis()


@pytest.fixture(params=["file", "redis"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Target]:
    _needs_redis(request.param)
    t = _target(request.param, tmp_path)
    try:
        yield t
    finally:
        t.close()


def start(t: Target, *args: str) -> subprocess.Popen:
    with open(t.workdir / "workers.err", "ab") as err:
        return subprocess.Popen(worker_argv("--sleep=0.1", "--json", *args), env=t.env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=err, text=True)


def drain(t: Target, *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run(worker_argv("--stop-when-empty", "--sleep=0.1", "--json", *args), env=t.env,
                          capture_output=True, text=True, timeout=timeout)


def dispatch(t: Target, *args: str, queue_opts: tuple[str, ...] = ()) -> str:
    res = subprocess.run([*worker_argv()[:-1], "queue:dispatch", *queue_opts, "probe:run", *args], env=t.env,
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def starts(t: Target) -> list[dict]:
    return [r for r in read_ledger(t.ledger) if r["kind"] == "start"]


def stop(*procs: subprocess.Popen) -> list[str]:
    """Kill the workers; their stdout."""
    out = []
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGCONT)
            p.kill()
        out.append(p.communicate(timeout=30)[0] or "")
    return out


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def ticks(path: Path) -> list[tuple[int, float]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        pid, _, at = line.partition(" ")
        if at:
            out.append((int(pid), float(at)))
    return out


# -- 1. a job that closes its inherited descriptors -------------------------------------------


@pytest.mark.parametrize("how", ["--close-fds", "--unlock-fds"])
def test_job_closing_every_descriptor_keeps_its_claim(target: Target, how: str) -> None:
    """Before: the claim's flock was the job process's own descriptor, so closerange() dropped
    it and the second worker recovered and reran the job (three overlapping runs, then
    failed/abandoned); on Redis the run was recorded as "exited with status 70". A job that
    unlocks what it inherited must not free the worker's lock either (found in review)."""
    job = dispatch(target, how, "--sleep", "4", queue_opts=("--tries=3",))
    a, b = start(target), start(target)
    try:
        wait_for(lambda: target.backend.find(job).state in (State.DONE, State.FAILED), timeout=60)
    finally:
        stop(a, b)
    info = target.backend.find(job)
    assert info.state == State.DONE and info.attempts == 1, info.failure
    runs = runs_of(read_ledger(target.ledger))
    assert len(runs) == 1 and runs[0].end is not None


# -- 2, 3. a stopped or frozen worker's job cannot outlive its lease --------------------------


@pytest.mark.parametrize("freeze", ["supervisor", "both"])
def test_redis_job_of_a_stopped_worker_dies_before_its_lease_lapses(tmp_path: Path, freeze: str) -> None:
    """Before: only the supervisor enforced the lease, so with it SIGSTOPped the second worker
    recovered the job while the first run went on (both ran for 14 s); frozen together, the
    old run executed code 14.6 s after the new one had started."""
    _needs_redis("redis")
    t = _target("redis", tmp_path)
    config = Path(t.env["FORGE_CONFIG"])
    config.write_text(config.read_text().replace("[connections.redis]\n", '[connections.redis]\nlease = "10s"\n'))
    tick_file = t.workdir / "ticks"
    job = dispatch(t, "--first-sleep", "120", "--sleep", "0.2", "--ticks", str(tick_file),
                   queue_opts=("--tries=3", "--timeout=10m"))
    a = start(t)
    b = None
    try:
        (first,) = wait_for(lambda: starts(t), timeout=30)
        wait_for(lambda: ticks(tick_file))
        os.kill(a.pid, signal.SIGSTOP)
        if freeze == "both":
            os.kill(first["pid"], signal.SIGSTOP)
        frozen_at = time.time()
        b = start(t)
        second = wait_for(lambda: starts(t)[1:], timeout=60)[0]
        # The first run's own kill timer ended it, though nobody could signal it.
        assert not alive(first["pid"])
        assert second["start"] - frozen_at >= 5  # recovered only once the lease had lapsed
        os.kill(a.pid, signal.SIGCONT)
        if freeze == "both":
            with contextlib.suppress(ProcessLookupError):
                os.kill(first["pid"], signal.SIGCONT)  # a zombie now, or reaped: nothing to thaw
        wait_for(lambda: t.backend.find(job).state == State.DONE, timeout=60)
        time.sleep(1.0)  # the thawed worker had its chance to act
    finally:
        stop(a, *([b] if b else []))
        t.close()
    old = [at for pid, at in ticks(tick_file) if pid == first["pid"]]
    assert old and max(old) < second["start"], "the old run executed code after the new one started"
    runs = runs_of(read_ledger(t.ledger))
    assert [r.attempt for r in runs] == [1, 2] and int(second["token"]) > int(first["token"])


def test_lease_mode_job_ignoring_sigalrm_dies_by_its_deadline(tmp_path: Path) -> None:
    """``lock = "lease"``: before, a job ignoring SIGALRM outlived its lease, and another
    worker (which sees only the lease, as another host would) ran it again meanwhile."""
    t = _target("lease", tmp_path)
    tick_file = t.workdir / "ticks"
    job = dispatch(t, "--ignore-alrm", "--ignore-term", "--first-sleep", "120", "--sleep", "0.2",
                   "--ticks", str(tick_file), queue_opts=("--tries=3", "--timeout=2s"))
    a = start(t)
    b = None
    try:
        (first,) = wait_for(lambda: starts(t), timeout=30)
        os.kill(a.pid, signal.SIGSTOP)  # its supervisor can kill nothing now, and holds the flock
        b = start(t)
        second = wait_for(lambda: starts(t)[1:], timeout=60)[0]
        assert not alive(first["pid"])
        wait_for(lambda: t.backend.find(job).state == State.DONE, timeout=60)
        os.kill(a.pid, signal.SIGCONT)
        time.sleep(1.0)
        assert t.backend.find(job).state == State.DONE  # the thawed worker's record was refused
    finally:
        stop(a, *([b] if b else []))
    old = [at for pid, at in ticks(tick_file) if pid == first["pid"]]
    deadline = first["start"] + 2 + 3 + 0.5 + 1.0  # claim + timeout + kill grace + backstop + slack
    assert old and max(old) < deadline and max(old) < second["start"]
    t.close()


# -- 9. nothing a job changes in its process reaches the next job ------------------------------


def test_job_pointing_its_stdout_elsewhere_does_not_take_the_next_jobs_output(target: Target) -> None:
    """Before: the job process was reused, so the next job's output went to the first job's
    file and the next job's log was empty."""
    stolen = target.workdir / "stolen.txt"
    first = dispatch(target, "--dup-stdout", str(stolen), "--say", "first")
    second = dispatch(target, "--say", "second job's output")
    assert drain(target).returncode == 0
    assert b"second job's output" in target.backend.read_log(second)
    assert "second" not in stolen.read_text() and "printed after dup2" in stolen.read_text()
    assert target.backend.find(first).state == State.DONE


@pytest.mark.parametrize("mess", ["--mess", "--mess-restorable"])
def test_process_state_a_job_changes_does_not_reach_the_next(target: Target, mess: str) -> None:
    """cwd, environment (os.environ and os.putenv), umask, signal dispositions and mask,
    interval timers, the parent-death signal, rlimits, threads, nice, process name, standard
    streams, interpreter state and fds 0-2: a job that changes them all is followed by one that
    sees none of it. What the job process puts back, it puts back in place (the next job runs in
    the same process); anything else gets the next job a fresh process."""
    q = target.queue()
    from forge.queue import QueuedCommand

    before = q.dispatch(QueuedCommand("probe:state"))
    assert drain(target).returncode == 0
    q.dispatch(QueuedCommand("probe:run").with_args([mess]))
    after = q.dispatch(QueuedCommand("probe:state"))
    assert drain(target).returncode == 0
    base = json.loads(target.backend.read_log(before))
    seen = json.loads(target.backend.read_log(after))
    (messer,) = [r for r in read_ledger(target.ledger) if r["kind"] == "start"]
    assert (messer["pid"] == seen.pop("pid")) == (mess == "--mess-restorable")
    base.pop("pid")
    assert seen == base
    assert base["mess"] is None and base["fds"]["0"] == "/dev/null" and base["thread"] == "MainThread"


# -- 10. a timeout ends every process the job started ----------------------------------------


def test_timeout_ends_a_setsid_daemon_and_is_recorded_at_the_deadline(target: Target) -> None:
    """Before: the daemon survived the kill, the job stayed reserved for 26 s and was rerun as
    abandoned."""
    pidfile = target.workdir / "daemon.pid"
    job = dispatch(target, "--daemon", str(pidfile), "--ignore-term", "--sleep", "60",
                   queue_opts=("--timeout=2s",))
    began = time.time()
    res = drain(target)
    assert res.returncode == 0, res.stderr
    info = target.backend.find(job)
    assert info.state == State.FAILED and info.failure.reason == "timeout", info.failure
    assert info.failure.at - began < 2 + 3 + 3  # timeout + kill grace + start-up slack
    daemon = int(pidfile.read_text())
    assert not alive(daemon)


def test_processes_a_finished_job_leaves_behind_are_ended(target: Target) -> None:
    """Documented: what a job leaves running is ended when it ends (SIGTERM, then SIGKILL)."""
    pidfile = target.workdir / "daemon.pid"
    job = dispatch(target, "--daemon", str(pidfile))
    assert drain(target).returncode == 0
    wait_for(pidfile.exists)
    assert target.backend.find(job).state == State.DONE
    assert not alive(int(pidfile.read_text()))


# -- 11. reasons are true -------------------------------------------------------------------


def test_timeout_while_the_supervisor_is_stopped_is_recorded_as_timeout(tmp_path: Path) -> None:
    """Before: the job outlived its timeout under a stopped supervisor and was later recorded
    as ``abandoned``. Now its own timer ends it at the deadline and the worker, once
    continued, records ``timeout``."""
    t = _target("file", tmp_path)
    job = dispatch(t, "--ignore-alrm", "--sleep", "60", queue_opts=("--timeout=1s",))
    a = start(t, "--stop-when-empty")
    try:
        (first,) = wait_for(lambda: starts(t), timeout=30)
        os.kill(a.pid, signal.SIGSTOP)
        wait_for(lambda: not alive(first["pid"]), timeout=15)  # 1 s + 3 s grace + backstop
        os.kill(a.pid, signal.SIGCONT)
        assert a.wait(timeout=30) == 0
    finally:
        stop(a)
    info = t.backend.find(job)
    assert info.state == State.FAILED and info.failure.reason == "timeout", info.failure
    t.close()


def test_a_job_that_finished_while_its_worker_was_stopped_is_done_not_timed_out(target: Target) -> None:
    """Found by the hostile soak: a worker stopped past a job's timeout, after the job had
    reported its outcome, recorded ``timeout`` on waking (and the job ran again)."""
    job = dispatch(target, "--sleep", "0.3", queue_opts=("--timeout=1s", "--tries=2"))
    a = start(target, "--stop-when-empty")
    try:
        (first,) = wait_for(lambda: starts(target), timeout=30)
        os.kill(a.pid, signal.SIGSTOP)
        wait_for(lambda: [r for r in read_ledger(target.ledger) if r["kind"] == "end"])
        while time.time() < first["start"] + 2.0:  # past the 1 s timeout, before the backstop
            time.sleep(0.05)
        os.kill(a.pid, signal.SIGCONT)
        assert a.wait(timeout=30) == 0
    finally:
        stop(a)
    info = target.backend.find(job)
    assert info.state == State.DONE and info.attempts == 1, info.events
    assert len(starts(target)) == 1


def test_fencing_token_grows_with_every_claim(target: Target) -> None:
    dispatch(target, "--exit-code", "1", queue_opts=("--tries=3",))
    drain(target)
    tokens = [int(r["token"]) for r in starts(target)]
    assert len(tokens) == 3 and tokens == sorted(set(tokens))


# -- 6. a full disk ----------------------------------------------------------------------------


def _tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {res.stderr.strip()}")


def _target_in(qdir: Path, tmp_path: Path) -> Target:
    """A file-backend target whose queue directory is ``qdir`` (a tmpfs of the test's)."""
    from forge.backends.file.backend import FileBackend

    t = make_target("file", tmp_path / "t")
    config = Path(t.env["FORGE_CONFIG"])
    config.write_text(config.read_text().replace(f'path = "{t.workdir / "queue"}"', f'path = "{qdir}"'))
    t._backend = FileBackend(qdir)
    return t


def test_full_disk_when_recording_keeps_the_worker_up_and_the_job_recorded_once(tmp_path: Path) -> None:
    """Before: ENOSPC recording the outcome killed the worker with a traceback, every new
    worker died at start on the same file, and the finished job ran again once space came back."""
    qdir = tmp_path / "disk"
    _tmpfs(qdir, "1m")
    try:
        t = _target_in(qdir, tmp_path)
        # The outcome must need a new page of the full tmpfs: pad the job so that its file plus
        # the claimed event end just short of a page boundary, which the done event crosses.
        args = ("--first-sleep", "1.5", "--say", "y" * 100)
        probe_job = dispatch(t, *args, "x")
        size = next((qdir / "q" / "default" / "pending").iterdir()).stat().st_size
        target_backend = t.backend
        target_backend.clear("default")
        claimed = len(Event("claimed", 1, time.time(), worker=f"{socket.gethostname()}:{'9' * 7}",
                            deadline=time.time() + 65).to_json())
        pad = 4096 - 40 - claimed - size + 1
        first = dispatch(t, *args, "x" * pad)
        assert probe_job != first
        second = dispatch(t, "--say", "after")
        a = start(t)
        b = None
        try:
            wait_for(lambda: starts(t), timeout=30)
            filler = qdir / "filler"
            with open(filler, "wb") as fh:
                try:
                    while True:
                        fh.write(b"\0" * 65536)
                        fh.flush()
                except OSError:
                    pass
            wait_for(lambda: len([r for r in read_ledger(t.ledger) if r["kind"] == "end"]) >= 1, timeout=30)
            b = start(t)  # a new worker starts on the full disk and stays up
            time.sleep(3.0)  # a few rounds of retries and maintenance on the full disk
            assert a.poll() is None and b.poll() is None
            filler.unlink()
            wait_for(lambda: all(t.backend.find(j).state == State.DONE for j in (first, second)), timeout=60)
        finally:
            out = stop(a, *([b] if b else []))
        events = [json.loads(line) for line in out[0].splitlines() if line.startswith("{")]
        failed = [e for e in events if e["event"] == "record_failed"]
        assert len(failed) == 1 and "No space left" in failed[0]["error"], json.dumps(events)  # logged once
        info = t.backend.find(first)
        assert info.state == State.DONE
        runs = [r for r in runs_of(read_ledger(t.ledger)) if r.job == first]
        assert len(runs) == 1  # recorded once space returned, never run again
        assert "Traceback" not in (t.workdir / "workers.err").read_text()
        t.close()
    finally:
        subprocess.run(["umount", "-l", str(qdir)], check=False)


# -- 8. a worker that cannot claim does not call the queue empty ------------------------------


def test_drainer_on_a_read_only_queue_exits_6_naming_the_directory(tmp_path: Path) -> None:
    """Before: "Worker stopped (empty) after 0 jobs", exit 0, with the job pending."""
    qdir = tmp_path / "disk"
    _tmpfs(qdir, "1m")
    try:
        t = _target_in(qdir, tmp_path)
        job = dispatch(t, "x")
        subprocess.run(["mount", "-o", "remount,ro", str(qdir)], check=True)
        res = subprocess.run(worker_argv("--stop-when-empty"), env=t.env, capture_output=True, text=True,
                             timeout=60)
        assert res.returncode == 6, (res.stdout, res.stderr)
        out = res.stdout + res.stderr
        assert str(qdir) in out and "Read-only file system" in out, out
        assert "empty" not in out
        f = check(t.ledger, [job])
        assert f.runs == 0
    finally:
        subprocess.run(["umount", "-l", str(qdir)], check=False)
        shutil.rmtree(qdir, ignore_errors=True)


@pytest.mark.parametrize("fresh", [False, True])
def test_jobs_share_a_job_process_unless_fresh_process_is_asked(target: Target, fresh: bool) -> None:
    for i in range(3):
        dispatch(target, str(i))
    assert drain(target, *(["--fresh-process"] if fresh else [])).returncode == 0
    pids = {r["pid"] for r in starts(target)}
    assert len(pids) == (3 if fresh else 1)


def test_a_job_process_past_the_memory_limit_is_replaced(target: Target) -> None:
    """A job that leaks (keeps memory in a module) leaves the job process past ``--memory``:
    the next job gets a fresh one instead of the leak."""
    dispatch(target, "--leak-mb", "80")
    dispatch(target, "x")
    assert drain(target, "--memory=60").returncode in (0, 12)
    first, second = starts(target)
    assert first["pid"] != second["pid"]


def test_queue_show_tail_has_whole_lines_and_no_framework_frames(target: Target) -> None:
    """issue 13: the tail started mid-line and showed six forge/Typer frames per traceback."""
    job = dispatch(target, "--lines", "60", "--fail", queue_opts=("--tries=2",))
    drain(target)
    res = subprocess.run([*worker_argv()[:-1], "queue:show", job], env=target.env, capture_output=True,
                         text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    tail = [line for line in res.stdout.split("Output (tail), by attempt:", 1)[1].strip("\n").splitlines()
            if not line.startswith(("--- attempt ", "--- run "))]  # each attempt's header (tests/test_show_attempts.py)
    log = target.backend.read_log(job).decode()
    assert tail[0] in log.splitlines() or "frames of forge" in tail[0], tail[:2]  # a whole line
    assert "RuntimeError: probe failed on purpose" in res.stdout
    assert not [line for line in tail if re.search(r'File ".*/(forge|typer)/', line)]
    assert any("frames of forge and Typer" in line for line in tail)
