"""Review of issue 15 (limits, retry policy, events): each test is a defect found and fixed."""

from __future__ import annotations

import json
import subprocess
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import forge_cmd, make_project, require_redis

HOGGING_LISTENER = '''
import time

import forge
from forge import command


@command("h:ok")
def ok() -> None:
    """Succeed."""


@forge.on("job.succeeded")
def retry_forever(event) -> None:
    # A careless retry loop: the bare except swallows every ListenerTimeout the budget raises.
    while True:
        try:
            time.sleep(5)  # waiting for a webhook that does not answer
        except:  # noqa: E722
            pass
'''


def _forge(*args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*forge_cmd(), *args], capture_output=True, text=True, timeout=120, **kw)  # type: ignore[call-overload]


def test_a_listener_that_swallows_every_cut_off_cannot_hang_the_worker(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """README: "a listener delays the worker by at most its budget". A listener with a bare
    ``except:`` in a loop caught each ListenerTimeout (one every 10 ms) and held the worker for
    minutes, deaf to SIGTERM. Now the worker gives up on it after 100 swallowed cut-offs: it
    exits 1 (a forced stop) with a line naming the listener, and the job's outcome stands."""
    monkeypatch.setenv("FORGE_CONFIG", str(make_project(tmp_path / "p", {"h.py": HOGGING_LISTENER})))
    job_id = _forge("queue:dispatch", "h:ok").stdout.strip()
    w = subprocess.Popen([*forge_cmd(), "queue:work", "--stop-when-empty", "--sleep=1"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = w.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        w.kill()
        w.communicate()
        pytest.fail("the worker was still inside the listener after 90 s")
    assert w.returncode == 1, (out, err)
    assert "h.py" in err and "swallowed 100 cut-offs" in err and "job.succeeded" in err, err
    shown = json.loads(_forge("queue:show", "--json", job_id).stdout)
    assert shown["job"]["state"] == "done"


def test_a_limit_key_pattern_means_the_same_on_both_backends() -> None:
    """``[limits.keys."PATTERN"]``: only ``*`` is special. The Redis script reads a pattern that
    way (``lua_pattern``, matched with Lua's ``string.match``), but the file backend matched keys
    with ``fnmatch``, which also reads ``?`` and ``[...]``: ``"t[1]*"`` limited key ``t1x`` on
    files and not on Redis. The Lua side is asked of the real Redis."""
    url = require_redis()
    import redis

    from forge.limits.spec import lua_pattern, parse_table

    patterns = {"t[1]*": 1, "a?b*": 2}
    cfg = parse_table({"keys": {p: {"concurrency": n} for p, n in patterns.items()}}, "forge.toml")
    client = redis.Redis.from_url(url)
    try:
        for key in ("t1x", "t[1]x", "t[1]", "aXb", "a?b", "a?b:7", "zz"):
            redis_sees = next((n for p, n in patterns.items() if client.eval(
                "return string.match(ARGV[1], ARGV[2]) and 1 or 0", 0, key, lua_pattern(p))), None)
            got = cfg.key(key)
            assert (got.concurrency if got else None) == redis_sees, key
    finally:
        client.close()
    assert cfg.key("t[1]x") is not None and cfg.key("t1x") is None and cfg.key("aXb") is None


def test_a_huge_limit_or_isolation_key_is_named_in_a_short_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 100,000-character --concurrency-key (or isolation key built from an argument) was
    echoed whole: a 100 kB "one-line" error. It is cut to its start and its length."""
    src = ('from forge import command\n\n\n@command("k:iso", isolated="k:{name}")\n'
           'def iso(name: str) -> None:\n    """Isolated per name."""\n')
    monkeypatch.setenv("FORGE_CONFIG", str(make_project(tmp_path / "p", {"k.py": src})))
    huge = "x" * 100_000
    for argv in (["queue:dispatch", f"--concurrency-key={huge}", "--concurrency=2", "k:iso", "a"],
                 ["k:iso", huge]):
        r = _forge(*argv)
        assert r.returncode == 2, r.stderr[:300]
        assert len(r.stderr) < 400, r.stderr[:300]
        assert "(100000 characters)" in r.stderr or "(100002 characters)" in r.stderr, r.stderr
        assert r.stderr.count("\n") == 1 and "1-200 printable characters" in r.stderr


def test_a_retry_until_already_past_is_a_usage_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--retry-until=2020-01-01T00:00`` was accepted: the job ran once and could never be
    retried, with nothing said. A deadline already past is now exit 2 with a one-line error,
    and nothing is queued; ``with_retry_until`` raises InvalidCommand for it too."""
    from datetime import datetime

    from forge.errors import InvalidCommand
    from forge.queue import QueuedCommand

    src = 'from forge import command\n\n\n@command("k:run")\ndef run() -> None:\n    """Run."""\n'
    monkeypatch.setenv("FORGE_CONFIG", str(make_project(tmp_path / "p", {"k.py": src})))
    r = _forge("queue:dispatch", "--retry-until=2020-01-01T00:00", "k:run")
    assert r.returncode == 2 and "in the past" in r.stderr and r.stderr.count("\n") == 1, r
    assert _forge("queue:list", "--json").stdout.count('"id"') == 0
    ok = _forge("queue:dispatch", "--retry-until=2h", "k:run")
    assert ok.returncode == 0, ok.stderr
    with pytest.raises(InvalidCommand, match="in the past"):
        QueuedCommand("k:run").with_retry_until(datetime(2020, 1, 1))


@pytest.mark.parametrize("queue_target", ["file", "redis"], indirect=True)
def test_show_and_list_give_a_released_jobs_real_next_attempt(queue_target: Any) -> None:
    """README: ``queue:show`` prints "when the next one starts". After a release (backoff 60 s,
    or exit 75 asking for 30 s) the job is delayed, yet its record's ``available_at`` stays the
    dispatch time (a release moves the file's name or the Redis "avail", not the record), so
    ``queue:show`` printed the old time and "next attempt: 2, now (due ...)" and ``queue:list
    --json`` the old ``available_at``, on both backends. Both now give the real due time."""
    env = queue_target.env

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*forge_cmd(), *args], capture_output=True, text=True, timeout=120, env=env)

    failing = run("queue:dispatch", "--tries=3", "--backoff=60", "probe:run", "--exit-code=3").stdout.strip()
    later = run("queue:dispatch", "probe:run", "--say=::forge-retry-after 30s", "--exit-code=75").stdout.strip()
    before = time.time()
    w = run("queue:work", "--stop-when-empty", "--sleep=1")
    assert w.returncode == 0, w.stderr
    after = time.time()
    for job_id, delay in ((failing, 60), (later, 30)):
        shown = json.loads(run("queue:show", "--json", job_id).stdout)
        assert shown["job"]["state"] == "delayed", shown["job"]
        due = datetime.fromisoformat(shown["retry"]["next_attempt_at"].replace("Z", "+00:00")).timestamp()
        assert before + delay - 1 <= due <= after + delay + 1, (job_id, due - before)
        listed = {j["id"]: j for j in json.loads(run("queue:list", "--json").stdout)["jobs"]}
        listed_due = datetime.fromisoformat(listed[job_id]["available_at"].replace("Z", "+00:00")).timestamp()
        assert abs(listed_due - due) < 1
        text = run("queue:show", job_id).stdout
        assert "now (due" not in text and "  next attempt: " in text, text


def test_a_listener_can_match_the_host_and_pid_every_event_carries() -> None:
    """README: every event carries ``host`` and ``pid`` beside its payload, and ``match`` keeps
    the events that have these values. ``match = { host = "web-*" }`` never matched: the
    fields were looked up in the payload only."""
    from forge.events.listeners import Listener
    from forge.events.model import Event

    ev = Event("job.failed", "e1", 0.0, {"queue": "imports"}, host="web-1", pid=42)
    assert Listener(("job.failed",), "t", command="a:b", match={"host": "web-*"}).wants(ev)
    assert Listener(("job.failed",), "t", command="a:b", match={"host": "db-*", "queue": "imports"}).wants(ev) is False
    assert Listener(("job.*",), "t", command="a:b", match={"pid": 42, "event": "job.failed"}).wants(ev)


@pytest.mark.parametrize("value", ["5", '""', "[1]"])
def test_a_bad_isolated_declaration_fails_when_declared(
        value: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``@command(..., isolated=5)`` (or ``""``) was accepted: the checker written for it was
    never called, and the command broke only when run or dispatched ("'int' object has no
    attribute 'format_map'"). The declaration is now checked where it is made: the module's
    import fails with a message saying what isolated= takes, as for a bad tries= or backoff=."""
    src = f'from forge import command\n\n\n@command("k:iso", isolated={value})\ndef iso() -> None:\n    """Iso."""\n'
    monkeypatch.setenv("FORGE_CONFIG", str(make_project(tmp_path / "p", {"k.py": src})))
    r = _forge("queue:dispatch", "k:iso")
    assert r.returncode == 3, r.stderr
    assert "use True, a key template like" in r.stderr, r.stderr
    assert _forge("queue:list", "--json").stdout.count('"id"') == 0
