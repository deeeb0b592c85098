"""The Redis backend's fast path (issue 17): one script call per job, forge's own RESP client
(no redis-py on the dispatch path), retried claims that get their job back, scripts reloaded
after the server forgets them. Against the real Redis (FORGE_TEST_REDIS_URL) and private
redis-server processes on free loopback ports."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import make_job as job
from conftest import redis_answers
from waitfor import wait_for

import forge.backends.redis.backend as rb
from forge.backends.redis import claim as rclaim
from forge.backends.redis import resp as _resp
from forge.backends.redis import server as rserver
from forge.config import Connection
from forge.errors import QueueUnavailable
from forge.job import Event

pytestmark = pytest.mark.redis
COMMANDS = Path(__file__).resolve().parent / "project" / "commands"
needs_server = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")


@pytest.fixture
def backend(redis_backend: Any) -> Any:
    """Every test here is Redis-only: ``backend`` is conftest's ``redis_backend``."""
    return redis_backend


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A private redis-server (no persistence) with a password and a unix socket."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    port, sock = _free_port(), tmp_path / "redis.sock"
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--requirepass", "s3cret", "--unixsocket", str(sock),
                             "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port, password="s3cret", socket_connect_timeout=0.2)
    wait_for(lambda: redis_answers(client), timeout=20, what="the private redis-server to answer")
    try:
        yield {"port": port, "sock": sock, "client": client}
    finally:
        client.close()
        proc.terminate()
        proc.wait(10)


def done(c: Any) -> Event:
    return Event("done", c.attempt, time.time(), worker="w")


def _state(b: Any, job_id: str) -> str | None:
    info = b.find(job_id)
    return None if info is None else str(info.state)


# -- ack and claim in one call ------------------------------------------------------------

def test_ack_claim_acknowledges_and_claims_the_next_in_one_call(backend: Any) -> None:
    a, b = job(), job()
    backend.push([a, b])
    first = backend.claim(["default"], "w", 60)
    nxt = backend.ack_claim(first, done(first), ["default"], "w", 60)
    assert (first.job.id, nxt.job.id) == (a.id, b.id)
    assert _state(backend, a.id) == "done" and _state(backend, b.id) == "reserved"
    assert nxt.fence != first.fence and nxt.handle != first.handle
    assert backend.ack_claim(nxt, done(nxt), ["default"], "w", 60) is None  # empty: acked, nothing claimed
    assert _state(backend, b.id) == "done"
    events = [e.event for e in backend.find(b.id).events]
    assert events == ["claimed", "done"]


def test_ack_claim_of_a_recovered_claim_is_refused(backend: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rclaim, "KILL_GRACE", 0.0)
    monkeypatch.setattr(rclaim, "LEASE_MARGIN", 0.1)
    monkeypatch.setattr(rserver, "LEASE_WINDOW", 0.3)
    backend.lease_window = 0.3
    j = job(max_attempts=3)
    backend.push([j])
    stale = backend.claim(["default"], "w", 60)
    time.sleep(0.5)  # the lease runs out (a frozen worker)
    assert backend.maintain(3)["recovered"] == 1
    again = backend.ack_claim(stale, done(stale), ["default"], "w2", 60)
    assert again is not None and again.job.id == j.id and again.attempt == 2  # the ack did nothing
    assert _state(backend, j.id) == "reserved"
    assert backend.heartbeat(again) and not backend.heartbeat(stale)


def test_a_claim_sent_again_after_a_lost_reply_gets_the_same_job(backend: Any) -> None:
    a, b = job(), job()
    backend.push([a, b])
    backend._retry_token = "0" * 24  # the token of a claim whose reply never came
    first = backend.claim(["default"], "w", 60)
    backend._retry_token = first.handle  # lost again: the worker retries with the same token
    again = backend.claim(["default"], "w", 60)
    assert (again.job.id, again.fence, again.handle, again.attempt) == (a.id, first.fence, first.handle, 1)
    assert again.deadline == pytest.approx(first.deadline, abs=0.01)
    assert backend._retry_token is None  # a reply came: the next claim gets a new token
    second = backend.claim(["default"], "w", 60)
    assert second.job.id == b.id
    # Another worker retrying that token (it is not its claim) gets nothing of it.
    backend._retry_token = second.handle
    assert backend.claim(["default"], "other", 60) is None
    assert [e.event for e in backend.find(a.id).events] == ["claimed"]  # claimed once


# -- scripts, connections ---------------------------------------------------------------------

def _calls(client: Any) -> dict[str, int]:
    return {k.removeprefix("cmdstat_"): v["calls"] for k, v in client.info("commandstats").items()}


def test_scripts_are_loaded_again_after_the_server_forgets_them(server: dict[str, Any]) -> None:
    """Redis 7: the scripts are one Functions library, loaded by the first call that finds it
    missing, and loaded again after the server loses it (a restart without persistence, a
    FUNCTION FLUSH); no script is ever sent by EVAL."""
    b = rb.RedisBackend(f"redis://:s3cret@127.0.0.1:{server['port']}/0", prefix="p")
    client = server["client"]
    try:
        b.push([job()])  # "Function not found": FUNCTION LOAD, then FCALL again
        b.push([job()])  # FCALL
        assert _calls(client)["function|load"] == 1 and b.server.functions is True
        client.function_flush()  # as after a restart without persistence
        b.push([job()])  # not found again: loaded again
        c = b.claim(["default"], "w", 60)
        assert b.ack_claim(c, done(c), ["default"], "w", 60) is not None  # the journaled one
        assert b.stats(["default"])[0].pending == 1
        calls = _calls(client)
        assert calls["function|load"] == 2 and calls["fcall"] >= 7
        assert "eval" not in calls and "evalsha" not in calls
        # Another process of another version (another library) loads its own beside it.
        from forge.backends.redis import lua

        assert [lib[1] for lib in client.function_list()] == [lua.library()[0].encode()]
    finally:
        b.close()


@needs_server
def test_a_server_without_functions_runs_the_scripts_by_sha(tmp_path: Path) -> None:
    """A server without FCALL (before Redis 7), and one that has it but refuses FUNCTION LOAD:
    every script runs by EVALSHA after the prelude, loaded again on NOSCRIPT, the idle wait's
    pipelined claim included."""
    for renamed in (("FCALL", "FUNCTION"), ("FUNCTION",)):
        port = _free_port()
        argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(tmp_path)]
        for command in renamed:
            argv += ["--rename-command", command, ""]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=port, socket_connect_timeout=0.2)
        b = rb.RedisBackend(f"redis://127.0.0.1:{port}/0", prefix="old")
        try:
            end = time.monotonic() + 20
            while not _pings(client):
                assert time.monotonic() < end, "redis-server did not start"
                time.sleep(0.02)
            a, c = job(), job()
            b.push([a])
            assert b.server.functions is False
            first = b.claim(["default"], "w", 60)
            assert first is not None and first.job.id == a.id and b.heartbeat(first)
            nxt = b.ack_claim(first, done(first), ["default"], "w", 60)  # the journaled script
            assert nxt is None
            client.script_flush()  # as after a restart
            b.push([c])  # NOSCRIPT, then EVAL
            assert b.wait_claim(["default"], 1.0, "w", 60) is None  # NOSCRIPT: nothing claimed
            again = b.claim(["default"], "w", 60)  # NOSCRIPT, then EVAL
            assert again is not None and again.job.id == c.id
            b.release(again, None, 0.0)  # back, with a wake-up
            woke = b.wait_claim(["default"], 1.0, "w", 60)  # the pipelined EVALSHA
            assert woke is not None and woke.job.id == c.id
            b.release(woke, None, 0.0)
            assert b.stats(["default"])[0].pending == 1 and b.stats(["default"])[0].done == 1
            calls = _calls(client)
            # FCALL renamed away: never run; else once, which found no function, and no library loads
            assert calls.get("fcall", 0) == (0 if "FCALL" in renamed else 1)
            assert calls["evalsha"] >= 4
        finally:
            b.close()
            client.close()
            proc.terminate()
            proc.wait(10)


def test_a_user_whose_acl_refuses_functions_runs_the_scripts_by_sha(server: dict[str, Any]) -> None:
    client = server["client"]
    for user, refused in (("nofcall", ["-fcall", "-function"]), ("noload", ["-function"])):
        client.acl_setuser(user, enabled=True, passwords=["+pw"], keys=["*"], channels=["*"],
                           commands=["+@all", *refused])
        b = rb.RedisBackend(f"redis://{user}:pw@127.0.0.1:{server['port']}/0", prefix=user)
        try:
            j = job()
            b.push([j])
            assert b.server.functions is False
            c = b.claim(["default"], "w", 60)
            assert c is not None and c.job.id == j.id
            assert b.ack_claim(c, done(c), ["default"], "w", 60) is None
            assert b.stats(["default"])[0].done == 1
        finally:
            b.close()
    assert client.function_list() == []  # neither loaded the library


def _pings(client: Any) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


def test_password_db_and_unix_socket(server: dict[str, Any]) -> None:
    port = server["port"]
    for url in (f"redis://:s3cret@127.0.0.1:{port}/3", f"redis://default:s3cret@127.0.0.1:{port}?db=3",
                f"unix://{server['sock']}?db=3&password=s3cret"):
        b = rb.RedisBackend(url, prefix="p")
        try:
            assert isinstance(b.server.c, _resp.Client)
            j = job()
            b.push([j])
            c = b.claim(["default"], "w", 60)
            assert c is not None and c.job.id == j.id
            b.ack(c, done(c))
        finally:
            b.close()
    assert server["client"].dbsize() == 0  # all in db 3
    b = rb.RedisBackend(f"redis://:wrong@127.0.0.1:{port}/0", prefix="p", connect_timeout=1)
    with pytest.raises(QueueUnavailable) as err:
        b.push([job()])
    assert "wrong" not in str(err.value) and err.value.exit_code == 6
    b = rb.RedisBackend.from_connection(Connection("r", "redis", url=f"redis://127.0.0.1:{port}/0"))
    with pytest.raises(QueueUnavailable, match="NOAUTH|Authentication"):
        b.claim(["default"], "w", 60)


def test_a_server_that_never_answers_times_out() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    port = listener.getsockname()[1]
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])  # accepted, never answered
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        b = rb.RedisBackend(f"redis://127.0.0.1:{port}/0", prefix="p", quick=True, connect_timeout=1)
        started = time.monotonic()
        with pytest.raises(QueueUnavailable, match="did not answer in time"):
            b.push([job()])
        assert time.monotonic() - started < 5
    finally:
        stop.set()
        t.join()
        for s in held:
            s.close()
        listener.close()


def test_urls_resp_does_not_take_go_to_redis_py(redis_url: str) -> None:
    assert _resp.parse_url("redis://u:p%40ss@h:7000/2") == _resp.Address("h", 7000, None, 2, "u", "p@ss")
    assert _resp.parse_url("unix:///run/r.sock?db=4") == _resp.Address(path="/run/r.sock", db=4)
    assert _resp.parse_url("redis://h:6379/0", password="pw").password == "pw"
    for url in ("rediss://h:6379/0", "redis://h/0?socket_timeout=3", "redis://h:notaport/0", "redis://h/x"):
        assert _resp.parse_url(url) is None, url
    prefix = f"forge-ptest-{uuid.uuid4().hex[:10]}"
    sep = "&" if "?" in redis_url else "?"
    b = rb.RedisBackend(f"{redis_url}{sep}health_check_interval=30", prefix=prefix)
    try:
        assert isinstance(b.server.c, rb._PyClient)  # redis-py makes every call, with the same replies
        a, c = job(), job(delay=0.2)
        b.push([a, c])
        first = b.claim(["default"], "w", 60)
        assert first.job.id == a.id and b.heartbeat(first)
        due = b.next_due(["default"])
        assert due is not None and due > time.time()
        b.wait(["default"], 0.01)  # the dispatch's wake-up token
        b.wait(["default"], 2.0)  # until c is due
        while time.time() < due + 0.01:
            time.sleep(0.01)
        nxt = b.ack_claim(first, done(first), ["default"], "w", 60)
        assert nxt is not None and nxt.job.id == c.id
        b.put_worker("w", b"{}", 10)
        assert b.worker_records() == [b"{}"]
        b.drop_worker("w")
        assert b.restart_requested_at() is None
    finally:
        b.close()
        client = redis.Redis.from_url(redis_url)
        keys = list(client.scan_iter(match=f"{prefix}:*"))
        if keys:
            client.delete(*keys)
        client.close()


# -- start-up and the worker ------------------------------------------------------------------

def _project(tmp_path: Path, url: str, prefix: str) -> dict[str, str]:
    (tmp_path / "forge.toml").write_text(
        f'[forge]\ncommands = ["{COMMANDS}"]\nplugins = false\n'
        '[queue]\nconnection = "redis"\ntries = 1\ntimeout = "60s"\n'
        f'[connections.redis]\ndriver = "redis"\nurl = "{url}"\nprefix = "{prefix}"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORGE_")}
    env.update(FORGE_CONFIG=str(tmp_path / "forge.toml"), FORGE_NO_PLUGINS="1",
               FORGE_PROBE_LEDGER=str(tmp_path / "ledger.jsonl"))
    return env


def test_a_redis_dispatch_never_imports_redis_py(tmp_path: Path, redis_url: str) -> None:
    prefix = f"forge-ptest-{uuid.uuid4().hex[:10]}"
    env = _project(tmp_path, redis_url, prefix)
    cmd = [sys.executable, "-X", "importtime", "-m", "forge", "queue:dispatch", "probe:noop"]
    try:
        first = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert first.returncode == 0, first.stderr  # the full path, which saves the command cache
        fast = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert fast.returncode == 0, fast.stderr
        modules = {line.rsplit("|", 1)[-1].strip() for line in fast.stderr.splitlines() if "|" in line}
        assert "forge.cli.fastpath.dispatch" in modules and "forge.backends.redis.resp" in modules
        assert not {m for m in modules if m == "redis" or m.startswith(("redis.", "typer"))}, modules
        lib = subprocess.run([sys.executable, "-c", (
            "import sys, forge\n"
            "from forge.queue import CommandQueue, QueuedCommand\n"
            "q = CommandQueue(check_args=False)\n"
            "q.dispatch(QueuedCommand('probe:noop'))\n"
            "b = q.backend\n"
            "c = b.claim(['default'], 'w', 60)\n"
            "b.ack_claim(c, __import__('forge.job').job.Event('done', 1, 0.0), ['default'], 'w', 60)\n"
            "print(sorted(m for m in sys.modules if m == 'redis' or m.startswith('redis.')))\n")],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert lib.returncode == 0 and lib.stdout.strip() == "[]", lib.stderr
    finally:
        client = redis.Redis.from_url(redis_url)
        keys = list(client.scan_iter(match=f"{prefix}:*"))
        if keys:
            client.delete(*keys)
        client.close()


@needs_server
def test_a_worker_makes_one_script_call_per_job_and_acks_before_it_stops(server: dict[str, Any],
                                                                         tmp_path: Path) -> None:
    env = _project(tmp_path, f"redis://:s3cret@127.0.0.1:{server['port']}/0", "w")
    b = rb.RedisBackend(f"redis://:s3cret@127.0.0.1:{server['port']}/0", prefix="w")
    try:
        n = 40
        b.push([job(command="probe:run", args=(str(i),)) for i in range(n)])
        server["client"].config_resetstat()
        work = subprocess.run([sys.executable, "-m", "forge", "queue:work", "--stop-when-empty"], env=env,
                              cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert work.returncode == 0, work.stdout + work.stderr
        stats = server["client"].info("commandstats")
        calls = sum(stats.get(f"cmdstat_{c}", {}).get("calls", 0) for c in ("fcall", "evalsha", "eval"))
        # n jobs: the first claim, n ack_claims (the last one finds the queue empty), and the
        # maintenance pass's promote; without ack_claim it was 2n + 2.
        assert calls <= n + 4, calls
        stats = b.stats(["default"])[0]
        assert (stats.pending, stats.reserved, stats.done) == (0, 0, n)
        runs = [json.loads(line) for line in (tmp_path / "ledger.jsonl").read_text().splitlines()]
        assert len({r["job"] for r in runs if r["kind"] == "end"}) == n

        b.push([job(command="probe:run") for _ in range(5)])
        capped = subprocess.run([sys.executable, "-m", "forge", "queue:work", "--max-jobs", "3", "--json"],
                                env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert capped.returncode == 0, capped.stdout + capped.stderr
        stats = b.stats(["default"])[0]
        assert (stats.pending, stats.reserved, stats.done) == (2, 0, n + 3)  # the last ack was sent
        events = [json.loads(line)["event"] for line in capped.stdout.splitlines() if line.startswith("{")]
        assert events.count("done") == 3 and events.index("done") < events.index("worker_stopped")
    finally:
        b.close()
