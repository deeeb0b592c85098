"""The library API (forge.queue): builders, validation before writing, dispatch, managers."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from forge.errors import (
    DispatchFailed,
    DuplicateJob,
    InvalidCommand,
    QueueError,
    QueueUnavailable,
    UnknownQueuedCommand,
)
from forge.job import MAX_PAYLOAD_BYTES, Event, Reason, State, idempotent_id, json_depth
from forge.queue import CommandQueue, JobDispatch, QueuedCommand, QueueManager
from forge.queue.manager import batch_key

SLEEP = QueuedCommand("demo:sleep").with_args(["0"])


def parse_rfc3339(text: str) -> datetime:
    assert text.endswith("Z") and "T" in text, text
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


# -- builders -------------------------------------------------------------------------------


def test_builders_return_new_values_and_fields_are_readable() -> None:
    base = QueuedCommand("import:data")
    cmd = (base.with_args(["users.csv"]).with_arg("--batch").with_arg("50")
           .with_delay(timedelta(minutes=5)).with_max_attempts(5).on_queue("imports")
           .with_timeout(120).with_metadata("source", {"by": "cron"}).with_metadata("n", 3))
    assert base.args == () and base.delay == 0 and base.max_attempts is None and base.metadata == {}
    assert cmd.command == "import:data"
    assert cmd.args == ("users.csv", "--batch", "50")
    assert cmd.delay == 300.0 and cmd.is_delayed()
    assert cmd.max_attempts == 5 and cmd.queue == "imports" and cmd.timeout == 120.0
    assert cmd.metadata == {"source": {"by": "cron"}, "n": 3}
    assert cmd.with_args(["other.csv"]).args == ("other.csv",)  # replaces
    assert not base.is_delayed()
    assert QueuedCommand.new("demo:sleep") == QueuedCommand("demo:sleep")


def test_with_backoff_forms() -> None:
    assert SLEEP.backoff is None
    assert SLEEP.with_backoff([1, 5, 10]).backoff == (1.0, 5.0, 10.0)
    assert SLEEP.with_backoff(3).backoff == (3.0,)
    assert SLEEP.with_backoff(timedelta(seconds=2)).backoff == (2.0,)
    with pytest.raises(InvalidCommand):
        SLEEP.with_backoff([1, -5])
    with pytest.raises(InvalidCommand):
        SLEEP.with_backoff([])


def test_at_datetime(tmp_path: Path) -> None:
    when = datetime.now(UTC) + timedelta(hours=1)
    cmd = SLEEP.at(when)
    assert cmd.run_at == when and cmd.is_delayed()
    assert not SLEEP.at(datetime.now(UTC) - timedelta(hours=1)).is_delayed()
    job = cmd.to_job("default")
    assert job.available_at == pytest.approx(when.timestamp())
    past = SLEEP.at(datetime.now(UTC) - timedelta(days=1)).to_job("default")
    assert past.available_at == pytest.approx(past.dispatched_at)  # due now, not in the past
    with pytest.raises(InvalidCommand):
        SLEEP.at("tomorrow")  # type: ignore[arg-type]


def test_with_unique_key() -> None:
    cmd = SLEEP.with_unique_key("nightly", ttl=timedelta(hours=1))
    assert cmd.unique_key == "nightly" and cmd.unique_ttl == 3600.0
    assert SLEEP.with_unique_key("k").unique_ttl is None
    q = CommandQueue()
    q.dispatch(cmd)
    with pytest.raises(DuplicateJob) as err:
        q.dispatch(cmd)
    assert "nightly" in str(err.value) and err.value.hint


# -- validation before anything is written --------------------------------------------------


def assert_empty(q: CommandQueue) -> None:
    assert q.size() == 0 and q.pending() == []


def test_empty_and_unknown_command_names() -> None:
    q = CommandQueue()
    with pytest.raises(InvalidCommand, match="empty"):
        q.dispatch(QueuedCommand(""))
    with pytest.raises(InvalidCommand):
        q.dispatch(QueuedCommand("   "))
    with pytest.raises(UnknownQueuedCommand) as err:
        q.dispatch(QueuedCommand("email:sned"))
    assert 'Did you mean "email:send"' in str(err.value)
    assert isinstance(err.value, QueueError) and isinstance(err.value, InvalidCommand)
    with pytest.raises(UnknownQueuedCommand) as err:
        q.dispatch(QueuedCommand("zzz:nothing-like-it"))
    assert err.value.hint and "forge list" in err.value.hint
    assert_empty(q)


@pytest.mark.parametrize("attempts", [0, -1, True, 1.5])
def test_max_attempts_below_one(attempts: object) -> None:
    q = CommandQueue()
    with pytest.raises(InvalidCommand, match="max attempts"):
        q.dispatch(SLEEP.with_max_attempts(attempts))  # type: ignore[arg-type]
    assert_empty(q)


def test_negative_delay_and_timeout() -> None:
    with pytest.raises(InvalidCommand, match="negative"):
        SLEEP.with_delay(-1)
    with pytest.raises(InvalidCommand, match="negative"):
        SLEEP.with_timeout(timedelta(seconds=-5))
    q = CommandQueue()
    for bad in (QueuedCommand("demo:sleep", ("0",), delay=-1.0),
                QueuedCommand("demo:sleep", ("0",), timeout=-1.0),
                QueuedCommand("demo:sleep", ("0",), timeout=0.0),
                QueuedCommand("demo:sleep", ("0",), delay=float("nan"))):
        with pytest.raises(InvalidCommand):
            q.dispatch(bad)
    assert_empty(q)


def test_times_out_of_range_are_refused_before_anything_is_written() -> None:
    """Issue 11, item 4: a time both backends cannot store (the file backend names a waiting
    job by its due time in 16 digits of microseconds, which end in 2286) is refused up front,
    and no check runs after the write."""
    century = 100 * 365.25 * 86400
    for build in (lambda: SLEEP.with_delay(century + 1), lambda: SLEEP.with_timeout(1e300),
                  lambda: SLEEP.with_backoff([1, 1e15]), lambda: SLEEP.with_unique_key("k", ttl=1e20)):
        with pytest.raises(InvalidCommand, match="100 years"):
            build()
    q = CommandQueue()
    for bad in (SLEEP.at(datetime(9999, 12, 31, 23, 59)), SLEEP.at(datetime(2286, 11, 21, tzinfo=UTC)),
                SLEEP.at(datetime.max.replace(tzinfo=UTC)), SLEEP.at(datetime.now(UTC) + timedelta(days=36600)),
                QueuedCommand("demo:sleep", ("0",), delay=1e15), QueuedCommand("demo:sleep", ("0",), delay=1e12),
                QueuedCommand("demo:sleep", ("0",), timeout=1e300),
                QueuedCommand("demo:sleep", ("0",), backoff=(1.0, 1e300)),
                QueuedCommand("demo:sleep", ("0",), unique_key="k", unique_ttl=1e300)):
        for dispatch in (q.dispatch, q.push, lambda c: q.dispatch_many([SLEEP, c])):
            with pytest.raises(InvalidCommand, match="100 years"):
                dispatch(bad)
    assert_empty(q)
    ahead = q.push(SLEEP.with_delay(century - 86400))  # the longest delay is stored, runnable when due
    assert parse_rfc3339(ahead.scheduled_at or "").year >= 2125
    assert q.find(ahead.id).state == State.DELAYED


def test_metadata_nested_too_deeply() -> None:
    """A job every process can decode: a worker's stack is deeper than the dispatcher's, so
    metadata as deep as the recursion limit allows here could be quarantined there."""
    q = CommandQueue()
    deep: object = 1
    for _ in range(64):
        deep = [deep]
    q.dispatch(SLEEP.with_metadata("ok", deep[0]))  # type: ignore[index]
    with pytest.raises(InvalidCommand, match="64 levels"):
        q.dispatch(SLEEP.with_metadata("x", deep))
    assert q.size() == 1


def test_metadata_that_contains_itself_is_refused_at_once() -> None:
    """Metadata that refers to itself would make the depth check loop for ever (the dispatch
    hung): it is refused, and so is a list that contains itself; shared (not circular) parts
    are fine, and cost one visit a level however often they are shared."""
    q = CommandQueue()
    loop: dict[str, object] = {"a": 1}
    loop["self"] = loop
    ring: list[object] = []
    ring.append(ring)
    for value in (loop, ring):
        with pytest.raises(InvalidCommand, match="contains itself"):
            q.dispatch(SLEEP.with_metadata("x", value))
    shared: list[object] = [1]
    for _ in range(40):  # 2**40 paths, 40 levels
        shared = [shared, shared]
    assert json_depth(shared) == 41
    assert q.size() == 0


@pytest.mark.parametrize("value", [object(), {1, 2}, float("nan"), b"bytes"])
def test_non_json_metadata(value: object) -> None:
    q = CommandQueue()
    with pytest.raises(InvalidCommand, match="metadata"):
        q.dispatch(SLEEP.with_metadata("k", value))
    assert_empty(q)


@pytest.mark.parametrize("name", ["../x", "..", "a/b", "", ".hidden", "x" * 65, "sp ace", "é"])
def test_invalid_queue_names(name: str, isolated_forge: Path) -> None:
    with pytest.raises(InvalidCommand, match="Invalid queue name") as err:
        CommandQueue(name) if name else SLEEP.to_job(name)
    assert isinstance(err.value, QueueError)
    with pytest.raises(InvalidCommand):
        SLEEP.to_job(name)
    assert not (isolated_forge.parent / "x").exists()


def test_oversize_payload() -> None:
    q = CommandQueue()
    with pytest.raises(InvalidCommand, match="byte cap") as err:
        q.dispatch(SLEEP.with_metadata("blob", "x" * MAX_PAYLOAD_BYTES))
    assert "by reference" in str(err.value)
    assert_empty(q)


def test_on_queue_contradiction() -> None:
    q = CommandQueue("emails")
    with pytest.raises(InvalidCommand, match="contradicts"):
        q.dispatch(SLEEP.on_queue("reports"))
    assert q.dispatch(SLEEP.on_queue("emails"))
    assert q.size() == 1


@pytest.mark.parametrize("cmd", [
    QueuedCommand("email:send"),                                   # missing --user
    QueuedCommand("email:send").with_args(["--user", "abc"]),     # not an int
    QueuedCommand("email:send").with_args(["--user", "0"]),       # below min=1
    QueuedCommand("demo:sleep").with_args(["soon"]),              # not a float
    QueuedCommand("demo:sleep").with_args(["1", "extra"]),        # too many arguments
    QueuedCommand("report:generate").with_args(["--nope"]),       # unknown option
])
def test_args_must_parse_against_the_signature(cmd: QueuedCommand) -> None:
    q = CommandQueue()
    with pytest.raises(InvalidCommand) as err:
        q.dispatch(cmd)
    assert err.value.hint and cmd.command in err.value.hint
    assert_empty(q)


@pytest.mark.parametrize("args", [["--help"], ["--user", "1", "-h"]])
def test_asking_for_help_is_refused_without_printing_it(capsys: pytest.CaptureFixture[str], args: list[str]) -> None:
    q = CommandQueue()
    with pytest.raises(InvalidCommand, match="asks for its help"):
        q.dispatch(QueuedCommand("email:send").with_args(args))
    assert capsys.readouterr().out == ""
    q.dispatch(QueuedCommand("email:send").with_args(["--user", "1"]))
    assert q.size() == 1


def test_args_that_parse_are_accepted() -> None:
    q = CommandQueue()
    q.dispatch(QueuedCommand("email:send").with_args(["--user", "7", "--subject", "Hi"]))
    q.dispatch(QueuedCommand("cleanup:temp-files").with_arg("--dry-run"))
    q.dispatch(QueuedCommand("demo:fail"))
    assert q.size() == 3
    unchecked = CommandQueue(check_args=False)
    unchecked.dispatch(QueuedCommand("demo:sleep").with_args(["soon"]))
    assert q.size() == 4


def test_a_file_argument_is_checked_on_every_dispatch(tmp_path: Path) -> None:
    data = tmp_path / "users.csv"
    data.write_text("id\n1\n")
    q = CommandQueue()
    cmd = QueuedCommand("import:data").with_args([str(data)])
    q.dispatch(cmd)
    data.unlink()  # gone a moment later: the next dispatch must not pass on a remembered check
    with pytest.raises(InvalidCommand, match="does not exist"):
        q.dispatch(cmd)
    assert q.size() == 1


def test_with_args_rejects_a_string() -> None:
    with pytest.raises(InvalidCommand, match="with_arg"):
        SLEEP.with_args("users.csv")  # type: ignore[arg-type]
    with pytest.raises(InvalidCommand, match="strings"):
        CommandQueue().dispatch(QueuedCommand("demo:sleep", (1,)))  # type: ignore[arg-type]


def test_dispatch_many_validates_all_before_writing_any() -> None:
    q = CommandQueue()
    good = [SLEEP, SLEEP.with_max_attempts(2), QueuedCommand("demo:fail")]
    for bad in (QueuedCommand("nope:nope"), SLEEP.with_max_attempts(0),
                QueuedCommand("email:send"), SLEEP.on_queue("other"), "not a command"):
        with pytest.raises(QueueError):
            q.dispatch_many([*good, bad, SLEEP])  # type: ignore[list-item]
        assert_empty(q)
    ids = q.dispatch_many([*good, SLEEP])
    assert len(ids) == 4 and q.size() == 4
    assert [i.id for i in q.pending()] == ids  # FIFO in the order given
    assert q.dispatch_many([]) == []


# -- dispatch -------------------------------------------------------------------------------


def test_dispatch_returns_uuid4_and_job_is_findable() -> None:
    q = CommandQueue.default()
    assert q.name == "default"
    jid = q.dispatch(QueuedCommand("import:data").with_args(["users.csv"]).with_max_attempts(5))
    assert uuid.UUID(jid).version == 4
    info = q.find(jid)
    assert info is not None and info.state == State.PENDING
    assert info.job.args == ("users.csv",) and info.job.max_attempts == 5
    assert CommandQueue("other").find(jid) is None  # another queue's job


def test_an_idempotency_key_dispatches_once_and_answers_with_the_job() -> None:
    """Issue 11, item 5: the primitive the scheduler builds on. The key's job id is the same
    in every process (and on every backend); dispatching again stores nothing."""
    q = CommandQueue("reports")
    tick = QueuedCommand("report:generate").with_idempotency_key("report@2026-12-01T09:00")
    assert tick.idempotency_key == "report@2026-12-01T09:00"
    first = q.push(tick.with_delay(60))
    assert first.created and first.id == idempotent_id("report@2026-12-01T09:00")
    assert uuid.UUID(first.id).version == 8
    again = q.push(tick.with_args(["--type", "users"]))  # content differs: the first dispatch holds the key
    assert not again.created and again.id == first.id and again.scheduled_at == first.scheduled_at
    assert again.dispatched_at == first.dispatched_at
    assert q.dispatch(tick) == first.id
    assert CommandQueue("other").push(tick).id == first.id  # one key per connection, not per queue
    assert q.size() == 1 and CommandQueue("other").size() == 0
    info = q.find(first.id)
    assert info is not None and info.job.args == () and info.job.available_at > time.time() + 50
    for bad in ("", 7, "x" * 1025, "\ud800"):
        with pytest.raises(InvalidCommand, match="idempotency key"):
            q.dispatch(QueuedCommand("report:generate").with_idempotency_key(bad))  # type: ignore[arg-type]


def test_dispatch_many_with_a_batch_id_stores_only_what_is_missing() -> None:
    q = CommandQueue()
    cmds = [SLEEP.with_args([str(n)]) for n in range(5)]
    first = q.dispatch_many(cmds[:3], batch_id="b1")  # as if killed after three
    assert first == [idempotent_id(batch_key("b1", n)) for n in range(3)]
    assert q.dispatch_many(cmds, batch_id="b1")[:3] == first
    assert q.size() == 5
    own = SLEEP.with_idempotency_key("mine")
    ids = q.dispatch_many([own, SLEEP], batch_id="b2")
    assert ids[0] == idempotent_id("mine") and ids[1] == idempotent_id(batch_key("b2", 1))
    assert q.size() == 7
    assert asyncio.run(q.adispatch_many(cmds, batch_id="b1")) == q.dispatch_many(cmds, batch_id="b1")
    assert q.size() == 7
    assert q.dispatch_many(cmds) != q.dispatch_many(cmds)  # without: every call queues anew
    with pytest.raises(InvalidCommand, match="batch id"):
        q.dispatch_many(cmds, batch_id="")


def test_push_returns_rfc3339_dispatch() -> None:
    q = CommandQueue("reports")
    before = datetime.now(UTC)
    d = q.push(QueuedCommand("report:generate").with_args(["--type", "sales"]))
    assert isinstance(d, JobDispatch)
    assert d.job_id == d.id and d.command == "report:generate" and d.queue == "reports"
    assert d.dispatched_at is not None and d.scheduled_at is None
    at = parse_rfc3339(d.dispatched_at)
    assert before - timedelta(seconds=1) <= at <= datetime.now(UTC) + timedelta(seconds=1)
    later = q.push(SLEEP.with_delay(60))
    assert later.scheduled_at is not None
    delta = parse_rfc3339(later.scheduled_at) - parse_rfc3339(later.dispatched_at)  # type: ignore[arg-type]
    assert abs(delta.total_seconds() - 60) < 0.01
    assert d.to_dict()["id"] == d.id
    assert q.find(later.id).state == State.DELAYED  # type: ignore[union-attr]


def test_async_dispatch() -> None:
    q = CommandQueue()

    async def main() -> tuple[str, list[str]]:
        one = await q.adispatch(SLEEP)
        many = await q.adispatch_many(iter([SLEEP, SLEEP]))
        return one, many

    one, many = asyncio.run(main())
    assert [i.id for i in q.pending()] == [one, *many]
    with pytest.raises(InvalidCommand):
        asyncio.run(q.adispatch_many([SLEEP, QueuedCommand("")]))
    assert q.size() == 3


def test_queue_operations() -> None:
    q = CommandQueue("work")
    a = q.dispatch(SLEEP)
    b = q.dispatch(SLEEP.with_delay(60))
    assert q.size() == 2
    assert [i.id for i in q.pending()] == [a, b]
    assert [i.id for i in q.pending(limit=1)] == [a]
    q.pause()
    assert q.is_paused()
    q.resume()
    assert not q.is_paused()
    assert q.clear() == 2
    assert q.size() == 0 and repr(q) == "CommandQueue('work')"


def test_queue_bound_to_configured_directory(isolated_forge: Path) -> None:
    jid = CommandQueue().dispatch(SLEEP)
    assert list((isolated_forge / "q" / "default" / "pending").glob(f"*{jid}*"))


# -- QueueManager ---------------------------------------------------------------------------


def fail_job(m: QueueManager, queue: str, cmd: QueuedCommand, reason: str = Reason.EXCEPTION) -> str:
    jid = m.add_queue(queue).dispatch(cmd)
    c = m.backend.claim([queue], "w", 60)
    assert c is not None and c.job.id == jid
    m.backend.fail(c, Event("failed", c.attempt, time.time(), reason=reason, error="boom"))
    return jid


def test_manager_queues() -> None:
    m = QueueManager()
    emails = m.add_queue("emails")
    assert isinstance(emails, CommandQueue) and emails.name == "emails"
    assert m.add_queue("emails") is emails
    assert m.queue("emails") is emails and m.queue("nope") is None
    CommandQueue("reports").dispatch(SLEEP)
    assert m.list() == ["emails", "reports"]
    with pytest.raises(InvalidCommand):
        m.add_queue("../x")


def test_manager_failed_retry_forget_flush() -> None:
    m = QueueManager()
    a = fail_job(m, "default", SLEEP)
    time.sleep(0.002)
    b = fail_job(m, "default", QueuedCommand("demo:fail"), Reason.EXIT_CODE)
    time.sleep(0.002)
    c = fail_job(m, "other", SLEEP)
    assert [i.id for i in m.failed()] == [c, b, a]
    assert [i.id for i in m.failed(queue="default", limit=1)] == [b]
    assert m.find(a).failure.reason == "exception"  # type: ignore[union-attr]
    assert m.retry([a]) == [a]
    assert m.find(a).state == State.PENDING and m.find(a).attempts == 0
    assert m.forget(b) is True and m.forget(b) is False
    assert m.flush(hours=1) == 0
    assert m.flush() == 1
    assert m.failed() == []
    with pytest.raises(QueueError, match="Invalid job id"):
        m.retry(["not-an-id"])


def test_manager_retry_all_with_filters() -> None:
    m = QueueManager()
    a = fail_job(m, "default", SLEEP, Reason.TIMEOUT)
    b = fail_job(m, "default", QueuedCommand("demo:fail"))
    assert m.retry("all", command="demo:fail") == [b]
    assert m.retry(reason="timeout") == [a]
    assert m.retry() == []


def test_manager_find_unknown_raises() -> None:
    from forge.errors import JobNotFound

    with pytest.raises(JobNotFound) as err:
        QueueManager().find(str(uuid.uuid4()))
    assert isinstance(err.value, QueueError) and err.value.hint


# -- errors ---------------------------------------------------------------------------------


def test_error_hierarchy() -> None:
    for cls in (InvalidCommand, UnknownQueuedCommand, QueueUnavailable, DispatchFailed, DuplicateJob):
        assert issubclass(cls, QueueError)
    assert issubclass(InvalidCommand, ValueError)


def test_unusable_queue_dir_is_queue_unavailable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("FORGE_QUEUE_DIR", str(blocker / "q"))
    with pytest.raises(QueueUnavailable) as err:
        CommandQueue().dispatch(SLEEP)
    assert str(blocker) in str(err.value) and err.value.hint


def test_invalid_job_ids_are_queue_errors() -> None:
    m = QueueManager()
    for call in (lambda: m.find("../etc"), lambda: m.forget("x"), lambda: m.retry(["nope"]),
                 lambda: CommandQueue().find("zz")):
        with pytest.raises(InvalidCommand, match="Invalid job id"):
            call()
