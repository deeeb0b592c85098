"""The retry policy under a real worker, on both backends: the outcome protocol (exit 75 and
``forge.Retry`` retried without spending an attempt, exit 65 and ``forge.Fail`` final), the
bound on retry-later releases, ``max_exceptions``, ``retry_until``, exponential backoff, a
command's declared options, and ``queue:show``'s retry schedule.

Every case is dispatched first and one worker runs them all (they interleave while others
wait out their delays), so each backend costs one worker run."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from waitfor import wait_for

from forge.job import JobInfo, State
from forge.queue import QueuedCommand

COMMANDS = '''
import subprocess
import sys
from pathlib import Path

import forge
from forge import command


def _bump(counter: str) -> int:
    p = Path(counter)
    n = int(p.read_text()) + 1 if p.exists() else 1
    p.write_text(str(n))
    return n


@command("rw:flaky")
def flaky(counter: str, first: int = 1000, mode: str = "raise") -> int:
    """Misbehave in MODE on its first FIRST runs, then succeed."""
    if _bump(counter) > first:
        return 0
    if mode == "exit75":
        print("working...")
        print("::forge-retry-after 0.3s")
        return 75
    if mode == "retry":
        raise forge.Retry("the API said 429", after="0.2s")
    if mode == "fail":
        raise forge.Fail("the file is not a CSV")
    if mode == "program65":  # any program: the protocol is the exit code and a line
        return subprocess.run(["sh", "-c", "echo '::forge-fail no such tenant' >&2; exit 65"]).returncode
    raise RuntimeError("boom")


@command("rw:declared", tries=3, backoff="exp:0.1s..0.2s")
def declared(counter: str) -> None:
    """Declares its tries and backoff."""
    _bump(counter)
    raise RuntimeError("always")
'''


def _project(target: Any) -> None:
    commands = target.workdir / "commands"
    commands.mkdir()
    (commands / "rw.py").write_text(COMMANDS)
    config = Path(target.env["FORGE_CONFIG"])
    text = config.read_text()
    start = text.index("commands = [")
    config.write_text(text[:start] + f'commands = ["{commands}"]' + text[text.index("]", start) + 1:])


def _forge(target: Any, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "forge", *args], env=target.env, capture_output=True,
                          text=True, timeout=120)


def _gaps(info: JobInfo) -> list[float]:
    """Seconds from each release to the claim after it."""
    ev = info.events
    return [b.at - a.at for a, b in zip(ev, ev[1:], strict=False) if a.event == "released" and b.event == "claimed"]


def test_outcomes_and_bounds_under_a_real_worker(queue_target: Any) -> None:
    _project(queue_target)
    q = queue_target.queue()
    work = queue_target.workdir

    def job(name: str, *args: str, **opts: Any) -> str:
        cmd = QueuedCommand("rw:flaky").with_args([str(work / name), *args])
        for key, value in opts.items():
            cmd = getattr(cmd, key)(value)
        return q.dispatch(cmd)

    ids = {}
    for name, args in (("until", ["--retry-until=6s", "--backoff=exp:0.3s..1s"]),  # first: it needs its time
                       ("exp", ["--tries=4", "--backoff=exp:0.2s..0.4s"])):
        res = _forge(queue_target, "queue:dispatch", *args, "rw:flaky", str(work / name))
        assert res.returncode == 0, res.stderr
        ids[name] = res.stdout.strip()
    ids |= {
        "exit75": job("a", "--first=2", "--mode=exit75"),
        "retry": job("b", "--first=2", "--mode=retry"),
        "always75": job("c", "--mode=exit75", with_max_releases=3),
        "fail": job("d", "--mode=fail", with_max_attempts=5),
        "program65": job("e", "--mode=program65", with_max_attempts=5),
        "max_exc": job("f", "--mode=raise", with_max_attempts=10, with_max_exceptions=2),
        "declared": q.dispatch(QueuedCommand("rw:declared").with_args([str(work / "g")])),
        "worker": job("h", "--mode=raise"),  # leaves tries and backoff to the worker
    }
    worker = subprocess.Popen([sys.executable, "-m", "forge", "queue:work", "--sleep=0.05", "--tries=2",
                               "--backoff=exp:0.25s..1m"],
                              env=queue_target.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def finished() -> dict[str, JobInfo] | None:
            infos = {k: queue_target.backend.find(v) for k, v in ids.items()}
            done = all(i is not None and i.state in (State.DONE, State.FAILED) for i in infos.values())
            return infos if done else None  # type: ignore[return-value]

        infos = wait_for(finished, timeout=90, interval=0.1)
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)

    def failure(name: str) -> tuple[Any, ...]:
        f = infos[name].failure
        assert f is not None, name
        return infos[name].state, infos[name].attempts, f.reason

    # Exit 75 and forge.Retry: run three times, one attempt spent, each release waited its delay.
    for name, wait in (("exit75", 0.3), ("retry", 0.2)):
        info = infos[name]
        assert (info.state, info.attempts) == (State.DONE, 1), name
        released = [e for e in info.events if e.event == "released"]
        assert [(e.attempt, e.reason, e.exit_code) for e in released] == [(1, "retry_later", 75)] * 2
        assert released[0].error == ("the API said 429" if name == "retry" else "asked to be retried later")
        assert all(g >= wait - 0.02 for g in _gaps(info)), (name, _gaps(info))
    assert (work / "a").read_text() == "3" and (work / "b").read_text() == "3"
    # Always 75: bounded by max_releases (3 releases, then failed), still one attempt.
    assert failure("always75") == (State.FAILED, 1, "max_releases")
    assert (work / "c").read_text() == "4"
    # forge.Fail and a program exiting 65: failed at once, the reason recorded.
    assert failure("fail") == (State.FAILED, 1, "no_retry")
    assert infos["fail"].failure.error == "the file is not a CSV"  # type: ignore[union-attr]
    assert failure("program65") == (State.FAILED, 1, "no_retry")
    assert infos["program65"].failure.error == "no such tenant"  # type: ignore[union-attr]
    # max_exceptions: 2 of 10 tries.
    assert failure("max_exc") == (State.FAILED, 2, "max_exceptions")
    # The declaration gave tries and backoff, over the worker's; a job without either takes the worker's.
    assert failure("declared") == (State.FAILED, 3, "exception")
    assert (infos["declared"].job.max_attempts, str(infos["declared"].job.backoff)) == (3, "exp:0.1s..0.2s")
    assert all(0.08 <= g for g in _gaps(infos["declared"]))
    assert failure("worker") == (State.FAILED, 2, "exception") and _gaps(infos["worker"])[0] >= 0.24
    # Exponential backoff: 0.2 s, then 0.4 s (the cap), then 0.4 s.
    assert failure("exp") == (State.FAILED, 4, "exception")
    gaps = _gaps(infos["exp"])
    assert len(gaps) == 3 and gaps[0] >= 0.18 and gaps[1] >= 0.38 and gaps[2] >= 0.38, gaps
    # retry_until with no tries (the worker's --tries=2 does not apply): retried until the next
    # retry would start after the deadline.
    until = infos["until"]
    assert until.job.retry is not None and until.job.retry.until is not None
    assert failure("until")[0::2] == (State.FAILED, "retry_until"), until.events
    claims = [e.at for e in until.events if e.event == "claimed"]
    assert len(claims) >= 2 and max(claims) <= until.job.retry.until, (claims, until.job.retry.until)
    assert until.failure.at + 1.0 > until.job.retry.until  # type: ignore[union-attr]  # its retry (<= 1 s) would be late

    # queue:show prints the schedule, and --json carries it.
    shown = _forge(queue_target, "queue:show", ids["exit75"])
    assert shown.returncode == 0, shown.stderr
    assert "asked to be retried later (not counted)" in shown.stdout and "done: no further attempts" in shown.stdout
    shown = _forge(queue_target, "queue:show", "--json", ids["until"])
    retry = json.loads(shown.stdout)["retry"]
    assert json.loads(shown.stdout)["job"]["retry"]["until"] == retry["policy"]["retry_until"]
    assert retry["policy"]["tries"] is None and retry["policy"]["retry_until"].endswith("Z")
    assert retry["no_more_retries"] == "its retry-until deadline passed"
    assert [a["outcome"] for a in retry["attempts"]][-1] == "failed"


def test_queue_show_gives_the_next_attempt_and_the_delays_after_it(queue_target: Any) -> None:
    _project(queue_target)
    res = _forge(queue_target, "queue:dispatch", "--delay=1h", "--tries=3", "--backoff=exp:1m..1h,jitter=equal",
                 "rw:flaky", "x")
    assert res.returncode == 0, res.stderr
    job_id = res.stdout.strip()
    shown = _forge(queue_target, "queue:show", job_id)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout[shown.stdout.index("Retry schedule"):].splitlines()
    assert lines[0] == "Retry schedule (tries 3, backoff exp:1m..1h,jitter=equal, max releases 100):"
    assert lines[1].startswith("  next attempt: 1, at ")
    assert lines[2:4] == ["  if attempt 1 fails: retry after 30.0 s to 1m", "  if attempt 2 fails: retry after 1m to 2m"]
    assert lines[4] == "  if attempt 3 fails: no more retries (attempt 3 is the last of 3)"
    data = json.loads(_forge(queue_target, "queue:show", "--json", job_id).stdout)["retry"]
    assert data["next_attempt"] == 1 and data["next_attempt_at"].endswith("Z")
    assert data["then"][0] == {"after_attempt": 1, "retry": True, "delay_min": 30.0, "delay_max": 60.0}


def test_a_release_not_counted_keeps_its_event_and_the_attempt(queue_target: Any) -> None:
    """The backend contract the outcome protocol needs: ``release(counted=False)`` records the
    event and gives the attempt back; the next claim is the same attempt again."""
    from forge.job import Event

    _project(queue_target)
    job_id = queue_target.queue().dispatch(QueuedCommand("rw:flaky").with_args(["x"]))
    backend = queue_target.backend
    claim = backend.claim(["default"], "w1", 60)
    assert claim is not None and claim.attempt == 1
    backend.release(claim, Event("released", 1, claim.claimed_at, reason="retry_later"), 0, counted=False)
    info = backend.find(job_id)
    assert info is not None and info.state == State.PENDING and info.attempts == 0
    assert [(e.event, e.reason) for e in info.events][-1] == ("released", "retry_later")
    again = backend.claim(["default"], "w1", 60)
    assert again is not None and again.attempt == 1
    backend.release(again, Event("released", 1, again.claimed_at, reason="exception"), 0)
    assert backend.find(job_id).attempts == 1  # type: ignore[union-attr]


def test_a_retry_claimed_after_its_deadline_does_not_run(queue_target: Any) -> None:
    import time

    from forge.job import Event

    _project(queue_target)
    counter = queue_target.workdir / "late"
    job_id = queue_target.queue().dispatch(QueuedCommand("rw:flaky").with_args([str(counter)])
                                           .with_retry_until(0.5))
    backend = queue_target.backend
    claim = backend.claim(["default"], "w1", 60)  # attempt 1 fails; its retry is due at once...
    backend.release(claim, Event("released", 1, time.time(), reason="exception"), 0)
    until = backend.find(job_id).job.retry.until  # type: ignore[union-attr]
    wait_for(lambda: time.time() > until + 0.05, timeout=10)  # ... but no worker takes it in time
    res = subprocess.run([sys.executable, "-m", "forge", "queue:work", "--once"], env=queue_target.env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    info = backend.find(job_id)
    assert info is not None and info.state == State.FAILED and info.failure.reason == "retry_until"  # type: ignore[union-attr]
    assert not counter.exists()  # the command never ran
