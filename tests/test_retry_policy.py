"""The retry policy without a worker: backoff forms (a property test of the exponential bounds
and jitter), the decision after an attempt, declared defaults on every dispatch path (the fast
path carries them without importing the command), the job record and ``forge.call``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import forge
from forge.cli.main import main
from forge.errors import EXIT_USAGE, InvalidCommand, UsageError
from forge.job import Event, Job, decode_job
from forge.queue import CommandQueue, QueuedCommand
from forge.queue.manager import connect
from forge.retry import backoff as bo
from forge.retry.outcome import EXIT_FAIL, EXIT_RETRY, directives
from forge.retry.policy import Policy, decide, policy_of, recovery
from forge.retry.rules import JobDefaults, RetryRules

Capsys = pytest.CaptureFixture[str]

COMMANDS = '''
from pathlib import Path
import forge
from forge import command

with open(Path(__file__).with_name("imported.log"), "a") as fh:
    fh.write("x")  # proves whether a dispatch imported this module


@command("imp:data", queue="imports", tries=5, timeout="10m", backoff="exp:2s..10m,jitter=full",
         retry_until="2h", max_exceptions=3, max_releases=7)
def import_data(path: str) -> None:
    """Declares its job options."""


@command("imp:plain")
def plain(n: int = 1) -> None:
    """Declares nothing."""


@command("imp:later")
def later(after: str = "", fail: str = "") -> None:
    if fail:
        raise forge.Fail(fail)
    raise forge.Retry("busy", after=after or None)
'''


@pytest.fixture(autouse=True)
def _close_backends() -> Any:
    """Close the backends ``connect()`` cached (their descriptors would outlive the test)."""
    yield
    from forge.queue import manager as queue

    for backend in queue._backends.values():
        backend.close()
    queue._backends.clear()


@pytest.fixture
def retry_project(project: Path) -> Path:
    (project / "commands" / "imp.py").write_text(COMMANDS)
    return project


# -- backoff forms ---------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "expected"), [
    ("1,5,10", (1.0, 5.0, 10.0)),
    ([1, "5s", "1m"], (1.0, 5.0, 60.0)),
    ("exp:2s..10m", bo.Exponential(2, 600)),
    ("exp:2s..10m,jitter=full", bo.Exponential(2, 600, jitter=bo.Jitter.FULL)),
    ("EXP:500ms,factor=3,jitter=equal", bo.Exponential(0.5, None, 3, bo.Jitter.EQUAL)),
])
def test_backoff_forms_parse(text: Any, expected: Any) -> None:
    parsed = bo.parse(text)
    assert parsed == expected
    assert bo.parse(bo.describe(parsed)) == parsed  # written back the way it is read


@pytest.mark.parametrize(("text", "needle"), [
    ("exp:", "exp:BASE"), ("exp:0s..1m", "more than 0"), ("exp:1m..1s", "below the base"),
    ("exp:1s..1m,jitter=half", "none, full or equal"), ("exp:1s,speed=2", "unknown or repeated"),
    ("exp:1s,factor=x", "not a number"), ("exp:1s,factor=0.5", "from 1 to 100"), ("exp:1x", "Invalid backoff"),
    ("", "at least one delay"),
])
def test_bad_backoffs_are_refused_with_the_syntax(text: str, needle: str) -> None:
    with pytest.raises(UsageError, match=needle):
        bo.parse(text)


@given(base=st.floats(0.001, 1000), cap_mult=st.floats(1, 10_000), factor=st.floats(1, 10),
       jitter=st.sampled_from(list(bo.Jitter)), retry=st.integers(1, 2000), r=st.floats(0, 1, exclude_max=True))
def test_exponential_delays_stay_within_their_bounds(base: float, cap_mult: float, factor: float,
                                                    jitter: bo.Jitter, retry: int, r: float) -> None:
    e = bo.Exponential(base, base * cap_mult, factor, jitter)
    ceiling = base  # base * factor**(retry-1), capped: multiplied out, an oracle independent of ceiling()
    for _ in range(retry - 1):
        if ceiling >= e.cap:  # type: ignore[operator]
            break
        ceiling *= factor
    ceiling = min(ceiling, e.cap)  # type: ignore[type-var]
    d = bo.delay(e, retry, lambda: r)
    assert 0 <= d <= e.cap  # type: ignore[operator]
    assert abs(e.ceiling(retry) - ceiling) <= 1e-9 * max(ceiling, 1)
    lo = {bo.Jitter.NONE: ceiling, bo.Jitter.FULL: 0.0, bo.Jitter.EQUAL: ceiling / 2}[jitter]
    assert lo - 1e-9 * max(ceiling, 1) <= d <= ceiling * (1 + 1e-9)
    assert (lo, ceiling) == pytest.approx(bo.bounds(e, retry), rel=1e-9, abs=1e-12)


def test_jitter_spreads_over_its_whole_range() -> None:
    import random

    rng = random.Random(7)
    full = [bo.delay(bo.parse("exp:1s..1m,jitter=full"), 4, rng.random) for _ in range(2000)]
    equal = [bo.delay(bo.parse("exp:1s..1m,jitter=equal"), 4, rng.random) for _ in range(2000)]
    assert 0 <= min(full) < 0.5 and 7.5 < max(full) <= 8  # uniform over [0, 8]
    assert 4 <= min(equal) < 4.2 and 7.8 < max(equal) <= 8  # uniform over [4, 8]
    assert [bo.delay(bo.parse("exp:1s..5s"), n) for n in range(1, 6)] == [1, 2, 4, 5, 5]
    assert [bo.delay((1.0, 5.0), n) for n in (1, 2, 3)] == [1, 5, 5]  # the list form: the last repeats


# -- the decision ------------------------------------------------------------------------------

def _ev(event: str, reason: str) -> Event:
    return Event(event, 1, 0.0, reason=reason)


def _policy(tries: int | None = 3, backoff: Any = (1.0,), **rules: Any) -> Policy:
    return Policy(tries, backoff, RetryRules(**rules))


def test_a_retry_later_is_not_counted_and_takes_its_delay() -> None:
    d = decide(_policy(), 1, {"exit_code": EXIT_RETRY}, "work\n::forge-retry-after 5m\n", list)
    assert d.release and not d.counted and d.delay == 300 and d.reason == "retry_later"
    d = decide(_policy(backoff=(0.0,)), 3, {"exit_code": EXIT_RETRY}, "", list)
    assert d.release and d.delay == 1.0  # no line, backoff 0: at least a second
    d = decide(_policy(), 1, {"exit_code": 75, "reason": "retry_later", "retry_after": 2.5}, "", list)
    assert d.delay == 2.5


def test_fail_now_is_final_whatever_tries_remain() -> None:
    d = decide(_policy(tries=10), 1, {"exit_code": EXIT_FAIL}, "::forge-fail the file is empty\n", list)
    assert not d.release and d.reason == "no_retry" and d.error == "the file is empty"
    assert directives("::forge-retry-after soon\n::forge-fail \n") == (None, None)


def test_max_releases_bounds_retry_later_and_defaults_to_100() -> None:
    history = [_ev("released", "retry_later")] * 2
    assert decide(_policy(max_releases=3), 1, {"exit_code": 75}, "", lambda: history).release
    d = decide(_policy(max_releases=2), 1, {"exit_code": 75}, "", lambda: history)
    assert not d.release and d.reason == "max_releases"
    assert _policy().max_releases == 100 and _policy(until=time.time() + 60).max_releases == 100
    with pytest.raises(UsageError, match="at most 1000"):
        QueuedCommand("a:b").with_max_releases(1001).to_job("default")


def test_a_deadline_alone_allows_many_attempts_but_not_unbounded() -> None:
    p = _policy(tries=None, backoff=(0.0,), until=time.time() + 3600)
    assert decide(p, 999, {"exit_code": 1, "reason": "exception"}, "", list).release
    assert not decide(p, 1000, {"exit_code": 1, "reason": "exception"}, "", list).release


def test_max_exceptions_counts_only_exceptions_and_failing_exits() -> None:
    history = [_ev("released", "exception"), _ev("released", "retry_later"), _ev("released", "timeout")]
    p = _policy(tries=10, max_exceptions=3)
    assert decide(p, 4, {"exit_code": 1, "reason": "exit_code"}, "", lambda: history).release
    history.append(_ev("released", "exit_code"))
    d = decide(p, 5, {"exit_code": 1, "reason": "exception", "error": "boom"}, "", lambda: history)
    assert not d.release and d.reason == "max_exceptions" and "boom" in (d.error or "")


def test_retry_until_stops_a_retry_that_would_start_after_it() -> None:
    now = 1000.0
    p = _policy(tries=None, backoff=(30.0,), until=now + 20)
    d = decide(p, 7, {"exit_code": 1, "reason": "exception", "error": "x"}, "", list, now=now)
    assert not d.release and d.reason == "retry_until" and "deadline" in (d.error or "")
    assert decide(p, 7, {"exit_code": 1, "reason": "exception"}, "", list, now=now - 15).release
    d = decide(p, 1, {"exit_code": 75}, "::forge-retry-after 1m\n", list, now=now)
    assert not d.release and d.reason == "retry_until"
    from forge.retry.policy import expired

    # A retry past the deadline does not start; a first attempt (or one after queue:retry) does.
    assert expired(p, 2, now=now + 21) and not expired(p, 1, now=now + 21) and not expired(p, 2, now=now)


def test_precedence_job_then_declaration_then_worker() -> None:
    job = QueuedCommand("a:b").to_job("default")
    declared = JobDefaults.declare(tries=5, backoff="exp:1s..1m")
    assert policy_of(job, None, 2, (3.0,)) == Policy(2, (3.0,), RetryRules())
    assert policy_of(job, declared, 2, (3.0,)).tries == 5
    assert policy_of(job, declared, 2, (3.0,)).backoff == bo.Exponential(1, 60)
    own = QueuedCommand("a:b").with_max_attempts(9).with_backoff("4").to_job("default")
    assert policy_of(own, declared, 2).tries == 9 and policy_of(own, declared, 2).backoff == (4.0,)
    until = QueuedCommand("a:b").with_retry_until("1h").to_job("default")
    assert policy_of(until, None, 2).tries is None  # as Laravel's retryUntil: the deadline bounds it


def test_recovery_of_an_abandoned_job_follows_the_same_rules() -> None:
    job = QueuedCommand("a:b").with_backoff("exp:10s").with_max_attempts(3).to_job("default")
    assert recovery(job, 1, 1) == (False, 10.0) and recovery(job, 2, 1) == (False, 20.0)
    assert recovery(job, 3, 1)[0]
    late = QueuedCommand("a:b").with_retry_until("5s").with_backoff("1m").to_job("default")
    assert recovery(late, 1, 1)[0]


# -- the job record -------------------------------------------------------------------------------

def test_job_record_round_trips_the_policy_and_old_records_are_unchanged() -> None:
    cmd = (QueuedCommand("a:b").with_backoff("exp:2s..10m,jitter=equal").with_retry_until("2h")
           .with_max_exceptions(3).with_max_releases(0))
    job = cmd.to_job("default")
    again = decode_job(job.to_json())
    assert again == job and again.retry == job.retry and again.retry is not None
    assert job.retry.until == pytest.approx(job.dispatched_at + 7200)
    plain = QueuedCommand("a:b").with_backoff([1, 2]).to_job("default")
    assert "retry" not in json.loads(plain.to_json()) and decode_job(plain.to_json()) == plain


@pytest.mark.parametrize("bad", [{"exp": -1}, {"exp": 1, "cap": "x"}, {"exp": 1, "speed": 2}, {"cap": 3}])
def test_a_corrupt_backoff_or_retry_object_is_a_corrupt_job(bad: Any) -> None:
    from forge.errors import CorruptJob

    d = json.loads(QueuedCommand("a:b").to_job("default").to_json())
    with pytest.raises(CorruptJob):
        Job.from_dict({**d, "backoff": bad})
    with pytest.raises(CorruptJob):
        Job.from_dict({**d, "retry": {"until": "soon"}})


def test_bad_dispatch_options_are_refused() -> None:
    with pytest.raises(InvalidCommand, match="retry-until"):
        QueuedCommand("a:b").with_retry_until("soon")
    with pytest.raises(InvalidCommand, match="max exceptions"):
        QueuedCommand("a:b").with_max_exceptions(0).to_job("default")
    with pytest.raises(UsageError, match="retry_until"):
        JobDefaults.declare(retry_until=__import__("datetime").datetime.now())
    with pytest.raises(TypeError, match="unknown option"):
        forge.command("a:b", retries=3)


# -- declared defaults on every dispatch path ----------------------------------------------------

def test_library_dispatch_uses_the_declaration_unless_told_otherwise(retry_project: Path) -> None:
    q = CommandQueue()
    job = q.find(q.dispatch(QueuedCommand("imp:data").with_args(["a.csv"])))
    assert job is None  # declared queue: not the default queue
    info = connect().find(CommandQueue().dispatch(QueuedCommand("imp:data").with_args(["a.csv"])))
    assert info is not None
    j = info.job
    assert (j.queue, j.max_attempts, j.timeout) == ("imports", 5, 600.0)
    assert j.backoff == bo.parse("exp:2s..10m,jitter=full")
    assert j.retry is not None and (j.retry.max_exceptions, j.retry.max_releases) == (3, 7)
    assert j.retry.until == pytest.approx(j.dispatched_at + 7200)
    own = CommandQueue("low").dispatch(QueuedCommand("imp:data").with_args(["a"]).with_max_attempts(2)
                                       .with_backoff([1]).with_timeout(5))
    o = connect().find(own).job  # type: ignore[union-attr]
    assert (o.queue, o.max_attempts, o.timeout, o.backoff) == ("low", 2, 5.0, (1.0,))
    assert o.retry is not None and o.retry.max_exceptions == 3  # what the dispatch left unset


PROBE = ("import sys, json; from forge.cli.main import main; code = main(sys.argv[1:]);"
         " print(json.dumps({'code': code, 'typer': 'typer' in sys.modules}))")


def _dispatch(cwd: Path, *args: str) -> tuple[dict[str, Any], str]:
    res = subprocess.run([sys.executable, "-c", PROBE, "queue:dispatch", *args], cwd=cwd,
                         env=dict(os.environ), capture_output=True, text=True, timeout=120)
    lines = res.stdout.splitlines()
    return json.loads(lines[-1]), "\n".join(lines[:-1]) + res.stderr


def _comparable(job: Job) -> dict[str, Any]:
    d = job.to_dict()
    for key in ("id", "dispatched_at", "available_at"):
        d.pop(key)
    if d.get("retry", {}).get("until") is not None:
        d["retry"]["until"] -= job.dispatched_at  # relative to dispatch: the same on both paths
        d["retry"]["until"] = round(d["retry"]["until"], 3)
    return d


def test_fast_and_full_dispatch_queue_identical_jobs_without_importing_the_command(retry_project: Path) -> None:
    log = retry_project / "commands" / "imported.log"
    cases = [["imp:data", "a.csv"],
             ["--queue=low", "--tries=2", "--backoff=exp:1s..1m", "--retry-until=30m", "--max-exceptions=1",
              "--max-releases=4", "--timeout=5s", "imp:data", "b.csv"],
             ["--backoff=1,5", "imp:plain", "--n=3"]]
    for args in cases:
        slow, out = _dispatch(retry_project, *args)
        assert slow == {"code": 0, "typer": True}, out  # no cache: the full command (it saves it)
        before = log.read_text()
        fast, out = _dispatch(retry_project, *args)
        assert fast == {"code": 0, "typer": False}, out
        assert log.read_text() == before  # the fast path never imported the command's module
        a, b = sorted((i.job for i in connect().jobs()), key=lambda j: j.dispatched_at)[-2:]
        assert a.args == b.args == (args[-1],)
        assert _comparable(a) == _comparable(b)
        (retry_project / "commands" / "imp.py").write_text(COMMANDS)  # stale again for the next case
    low = [i.job for i in connect().jobs(queue="low")]
    assert {(j.max_attempts, j.timeout, str(j.backoff)) for j in low} == {(2, 5.0, "exp:1s..1m")}
    assert all(j.retry == RetryRules(j.retry.until, 1, 4) for j in low if j.retry)
    assert {i.job.queue for i in connect().jobs() if i.job.command == "imp:data"} == {"imports", "low"}


def test_a_changed_declaration_is_seen_by_the_next_dispatch(retry_project: Path) -> None:
    assert _dispatch(retry_project, "imp:data", "x")[0]["typer"] is True
    assert _dispatch(retry_project, "imp:data", "x")[0]["typer"] is False
    path = retry_project / "commands" / "imp.py"
    path.write_text(COMMANDS.replace("tries=5", "tries=4"))  # same size: the stat still changes
    assert _dispatch(retry_project, "imp:data", "y")[0] == {"code": 0, "typer": True}
    assert _dispatch(retry_project, "imp:data", "z")[0] == {"code": 0, "typer": False}
    tries = {i.job.args[0]: i.job.max_attempts for i in connect().jobs(queue="imports")}
    assert tries == {"x": 5, "y": 4, "z": 4}


def test_bad_dispatch_options_exit_2(retry_project: Path, capsys: Capsys) -> None:
    for args, needle in ((["--backoff=exp:1m..1s", "imp:plain"], "below the base"),
                         (["--retry-until=yesterday", "imp:plain"], "retry-until"),
                         (["--max-exceptions=0", "imp:plain"], "max-exceptions")):
        assert main(["queue:dispatch", *args]) == EXIT_USAGE
        assert needle in capsys.readouterr().err
    assert sum(s.size for s in connect().stats()) == 0


def test_the_scheduler_uses_the_declaration_on_both_paths(retry_project: Path) -> None:
    from forge.scheduler.entry import ScheduleEntry
    from forge.scheduler.scheduler import Scheduler

    entry = ScheduleEntry.create("nightly", "imp:data", ["n.csv"], every="1h")
    record = Scheduler([entry]).test("nightly")  # the full path: the command's module loaded
    info = connect().find(record.id)
    assert info is not None and (info.job.queue, info.job.max_attempts) == ("imports", 5)
    # The Typer-free schedule:run takes the declaration from the command cache.
    config = retry_project / "forge.toml"
    config.write_text(config.read_text() + '[[schedule]]\ncommand = "imp:data"\nargs = ["t.csv"]\nevery = "1m"\n')
    assert _dispatch(retry_project, "imp:plain")[0]["code"] == 0  # saves the command cache
    res = subprocess.run([sys.executable, "-c", PROBE, "schedule:run"], cwd=retry_project, env=dict(os.environ),
                         capture_output=True, text=True, timeout=120)
    assert json.loads(res.stdout.splitlines()[-1]) == {"code": 0, "typer": False}, res.stderr
    (tick,) = [i.job for i in connect().jobs() if i.job.args == ("t.csv",)]
    assert (tick.queue, tick.max_attempts, tick.timeout, tick.backoff) == ("imports", 5, 600.0, info.job.backoff)


# -- forge.call and forge NAME ---------------------------------------------------------------------

def test_retry_and_fail_map_to_their_exit_codes_everywhere(retry_project: Path) -> None:
    assert forge.call("imp:later", ["--after=5m"]).exit_code == EXIT_RETRY
    res = forge.call("imp:later", ["--fail=bad input"])
    assert (res.exit_code, res.error) == (EXIT_FAIL, "bad input")
    env = dict(os.environ)
    run = subprocess.run([sys.executable, "-m", "forge", "imp:later", "--after=30s"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 75 and "::forge-retry-after 30s" in run.stderr and "Retry later in 30" in run.stderr
    run = subprocess.run([sys.executable, "-m", "forge", "imp:later", "--fail=no such user"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 65 and "no such user" in run.stderr


def test_counts_start_afresh_after_queue_retry() -> None:
    old = [_ev("released", "retry_later"), _ev("failed", "max_releases"), Event("retried", 0, 0.0)]
    assert decide(_policy(max_releases=1), 1, {"exit_code": 75}, "", lambda: old).release
    assert not decide(_policy(max_releases=1), 1, {"exit_code": 75}, "", lambda: old[:1]).release


def test_forge_toml_takes_every_backoff_form(project: Path, capsys: Capsys) -> None:
    from forge.config import load_settings
    from forge.errors import ConfigError

    config = project / "forge.toml"
    config.write_text(config.read_text() + '[queue]\nbackoff = "exp:1s..1m,jitter=full"\n')
    assert load_settings().backoff == bo.Exponential(1, 60, jitter=bo.Jitter.FULL)
    assert main(["config:show", "--json"]) == 0
    assert '"exp": 1.0' in capsys.readouterr().out
    config.write_text(config.read_text().replace("jitter=full", "jitter=half"))
    with pytest.raises(ConfigError, match="queue.backoff"):
        load_settings()


def test_from_file_lines_take_the_policy_keys(retry_project: Path, tmp_path: Path, capsys: Capsys) -> None:
    lines = tmp_path / "jobs.jsonl"
    lines.write_text(json.dumps({"command": "imp:plain", "backoff": "exp:1s..1m", "retry_until": "1h",
                                 "max_exceptions": 2, "max_releases": 0}) + "\n")
    assert main(["queue:dispatch", "--from-file", str(lines)]) == 0
    (info,) = connect().jobs()
    assert info.job.backoff == bo.Exponential(1, 60)
    assert info.job.retry is not None and (info.job.retry.max_exceptions, info.job.retry.max_releases) == (2, 0)
    assert info.job.retry.until == pytest.approx(info.job.dispatched_at + 3600)


@given(backoff=st.one_of(
           st.lists(st.floats(0, 1e6), min_size=1, max_size=5),
           st.builds(bo.Exponential, st.floats(0.001, 1000), st.none() | st.floats(1000, 1e6),
                     st.floats(1, 10), st.sampled_from(list(bo.Jitter)))),
       until=st.none() | st.floats(0, 9e9), max_exceptions=st.none() | st.integers(1, 10**6),
       max_releases=st.none() | st.integers(0, 1000))
def test_job_records_with_any_policy_round_trip(backoff: Any, until: float | None, max_exceptions: int | None,
                                                max_releases: int | None) -> None:
    cmd = QueuedCommand("a:b").with_backoff(backoff)
    if max_exceptions is not None:
        cmd = cmd.with_max_exceptions(max_exceptions)
    if max_releases is not None:
        cmd = cmd.with_max_releases(max_releases)
    job = cmd.to_job("default")
    if until is not None:
        from dataclasses import replace

        job = replace(job, retry=RetryRules(until, max_exceptions, max_releases))
    again = decode_job(job.to_json())
    assert again == job and again.retry == job.retry and again.backoff == job.backoff
    assert decode_job(again.to_json()) == again


def test_the_outage_wait_doubles_from_its_first_wait_to_ten_seconds() -> None:
    """A worker or schedule:work that finds its store down waits 0.5 s, 1 s, 2 s ... at most 10 s."""
    from forge.retry.backoff import outage_wait

    waits, w = [], 0.0
    for _ in range(7):
        w = outage_wait(w)
        waits.append(w)
    assert waits == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert outage_wait(0.1, first=0.1) == 0.2 and outage_wait(0.0, first=0.1) == 0.1
