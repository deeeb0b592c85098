"""Every test runs against its own queue directory and never loads site-installed plugins.

The shared fixtures, each written once here: ``project`` (an empty project), ``probe_project``
(the probe commands of ``tests/project``, recording runs in a ledger), ``redis_url`` and the
Redis fixtures built on it (``redis_client``, ``redis_prefix``, ``redis_backend``), ``backend``
(a real file or Redis backend) and ``queue_target`` (the probe project on either backend). The
Redis rule: with FORGE_TEST_REDIS_URL unset a Redis test is skipped; set but unreachable, it
fails, so a broken server never passes as a skip.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest

from forge.job import Job
from forge.queue import QueuedCommand

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_CONFIG = ROOT / "forge.toml"
PROBE_PROJECT = Path(__file__).resolve().parent / "project" / "forge.toml"
REDIS_URL = os.environ.get("FORGE_TEST_REDIS_URL") or None
_redis_checked: dict[str, str] = {}


@pytest.fixture(autouse=True)
def isolated_forge(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point every forge path into tmp_path; use the example project's forge.toml."""
    for key in list(os.environ):
        if key.startswith("FORGE_") and key not in ("FORGE_TEST_REDIS_URL",):
            monkeypatch.delenv(key, raising=False)
    queue_dir = tmp_path / "queue"
    monkeypatch.setenv("FORGE_QUEUE_DIR", str(queue_dir))
    monkeypatch.setenv("FORGE_CONFIG", str(EXAMPLE_CONFIG))
    monkeypatch.setenv("FORGE_NO_PLUGINS", "1")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))  # the command cache
    monkeypatch.setenv("FORGE_STORAGE", str(tmp_path / "storage"))  # the example commands' data
    import forge.registry.runner

    forge.registry.runner._default_registry = None  # the one registry cache (the CLI's and forge.call's)
    return queue_dir


def forge_cmd() -> list[str]:
    """The argv prefix that runs the installed forge CLI in a fresh interpreter."""
    return [sys.executable, "-m", "forge"]


def make_project(root: Path, commands: dict[str, str] | None = None, toml: str = "") -> Path:
    """Write ``root/forge.toml`` and ``root/commands/<file>`` (file name -> source); return the toml."""
    (root / "commands").mkdir(parents=True, exist_ok=True)
    config = root / "forge.toml"
    config.write_text(toml or '[forge]\ncommands = ["commands"]\n')
    for name, source in (commands or {}).items():
        path = root / "commands" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
    return config


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty forge project in ``tmp_path/project``, made the current config (FORGE_CONFIG)."""
    root = tmp_path / "project"
    monkeypatch.setenv("FORGE_CONFIG", str(make_project(root)))
    return root


@pytest.fixture
def probe_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The probe project (``tests/project``) in this process and in every ``forge`` subprocess;
    returns the ledger path its probe commands record each run in (absent until one runs).
    Bytecode is not written, so the system calls a process makes (counted under strace) do not
    depend on whether an earlier test compiled the probe commands."""
    ledger = tmp_path / "ledger.jsonl"
    monkeypatch.setenv("FORGE_CONFIG", str(PROBE_PROJECT))
    monkeypatch.setenv("FORGE_PROBE_LEDGER", str(ledger))
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    return ledger


def add_commands(config: Path, folder: Path, files: dict[str, str]) -> Path:
    """Write ``files`` (file name: source) into the new commands folder ``folder`` and put it
    first in the ``commands`` list of the project's forge.toml ``config``; returns the folder."""
    folder.mkdir()
    for name, source in files.items():
        (folder / name).write_text(source)
    text = config.read_text()
    assert "commands = [" in text, text
    config.write_text(text.replace("commands = [", f'commands = ["{folder}", ', 1))
    return folder


def require_redis() -> str:
    """FORGE_TEST_REDIS_URL once the server answered a PING: skips the calling test when the
    variable is unset, fails it when the server is unreachable (checked once per session)."""
    if not REDIS_URL:
        pytest.skip("FORGE_TEST_REDIS_URL is not set")
    if REDIS_URL not in _redis_checked:
        import redis

        client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=5)
        try:
            client.ping()
        except redis.RedisError as exc:
            _redis_checked[REDIS_URL] = f"FORGE_TEST_REDIS_URL is set but the server is unreachable: {exc}"
        else:
            _redis_checked[REDIS_URL] = ""
        finally:
            client.close()
    if _redis_checked[REDIS_URL]:
        pytest.fail(_redis_checked[REDIS_URL])
    return REDIS_URL


def redis_answers(client: Any) -> bool:
    """Whether the server of the redis-py ``client`` answers a PING (False while it starts or is
    down): what a test that starts a redis-server of its own waits for."""
    import redis

    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


@pytest.fixture
def redis_url() -> str:
    """The test Redis server's URL (see :func:`require_redis`: skip if unset, fail if down)."""
    return require_redis()


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[Any]:
    """A redis-py client of the test server, closed afterwards."""
    import redis

    client = redis.Redis.from_url(redis_url, socket_connect_timeout=5)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def redis_prefix(redis_client: Any) -> Iterator[str]:
    """A key prefix no other test uses; every key under it is deleted afterwards."""
    prefix = f"forge-test-{uuid4().hex[:10]}"
    try:
        yield prefix
    finally:
        keys = list(redis_client.scan_iter(match=f"{prefix}*", count=1000))
        for i in range(0, len(keys), 1000):
            redis_client.delete(*keys[i:i + 1000])


@pytest.fixture
def redis_backend(redis_url: str, redis_prefix: str) -> Iterator[Any]:
    """A ``RedisBackend`` on the test server under its own prefix (``redis_prefix``)."""
    from forge.backends.redis.backend import RedisBackend

    b: Any = RedisBackend(redis_url, prefix=redis_prefix)
    b.test_spec = ["redis", redis_url, redis_prefix]
    try:
        yield b
    finally:
        b.close()


@pytest.fixture(params=["file", "redis"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """A real backend, once per kind: a ``FileBackend`` on ``tmp_path/q``, then a
    ``RedisBackend`` (``redis_backend``). ``test_spec`` says how to reach the same store
    from a ``forge`` process: ``["file", path]`` or ``["redis", url, prefix]``."""
    if request.param == "redis":
        yield request.getfixturevalue("redis_backend")
        return
    from forge.backends.file.backend import FileBackend

    b: Any = FileBackend(tmp_path / "q")
    b.test_spec = ["file", str(tmp_path / "q")]
    try:
        yield b
    finally:
        b.close()


def next_event(proc: subprocess.Popen, name: str, timeout: float = 60.0) -> dict[str, Any]:
    """Read a ``--json`` process's stdout (text mode) up to its first ``name`` event and return
    it. The lines before it are consumed. AssertionError if the process ends first; after
    ``timeout`` seconds without the event the process is killed, so a hung worker fails the
    test instead of hanging it."""
    assert proc.stdout is not None
    timer = threading.Timer(timeout, proc.kill)
    timer.daemon = True
    timer.start()
    try:
        for line in proc.stdout:
            if isinstance(line, bytes):
                line = line.decode()
            if line.startswith("{"):
                event = json.loads(line)
                if event.get("event") == name:
                    return event
    finally:
        timer.cancel()
    raise AssertionError(f"no {name} event in {timeout:g} s (the process ended or was killed)")


#: x86-64 numbers of the calls a process blocks in while it waits for something to happen:
#: read, poll, select, epoll_wait, pselect6, ppoll, epoll_pwait, epoll_pwait2.
_WAITING_SYSCALLS = {"0", "7", "23", "232", "270", "271", "281", "441"}


def blocked_waiting(pid: int, calls: frozenset[str] | set[str] = _WAITING_SYSCALLS) -> bool:
    """Whether process ``pid``'s main thread is blocked in a waiting call (poll, select, ...;
    an idle worker's wait for work: inotify, a Redis BLPOP) at two looks 50 ms apart; any other
    call an idle worker makes is short. ``calls``: the system call numbers that count (as
    strings). Poll it with ``wait_for`` instead of sleeping until a worker is "probably" idle."""
    def waiting() -> bool:
        try:
            return Path(f"/proc/{pid}/syscall").read_text().split()[0] in calls
        except (OSError, IndexError):
            return False

    if not waiting():
        return False
    time.sleep(0.05)
    return waiting()


def started(proc: subprocess.Popen, timeout: float = 60.0) -> subprocess.Popen:
    """Wait for a ``--json`` worker's ``worker_started`` event (readiness, not a guessed sleep)
    and return the worker; see :func:`next_event`."""
    next_event(proc, "worker_started", timeout)
    return proc


def make_job(queue: str = "default", command: str = "demo:sleep", args: tuple[str, ...] = ("0",),
             **kw: Any) -> Job:
    """A job record built the way CommandQueue builds it (QueuedCommand.to_job), with options."""
    cmd = QueuedCommand(command).with_args(list(args))
    if "delay" in kw:
        cmd = cmd.with_delay(kw.pop("delay"))
    if "max_attempts" in kw:
        cmd = cmd.with_max_attempts(kw.pop("max_attempts"))
    if "unique" in kw:
        cmd = cmd.with_unique_key(kw.pop("unique"), ttl=kw.pop("ttl", None))
    if "timeout" in kw:
        cmd = cmd.with_timeout(kw.pop("timeout"))
    if "idem" in kw:
        cmd = cmd.with_idempotency_key(kw.pop("idem"))
    assert not kw, kw
    return cmd.to_job(queue)


@pytest.fixture(params=["file", "redis"])
def queue_target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """The probe project on a real file queue or Redis (``reliability.harness.Target``): a
    forge.toml, the environment for ``forge`` subprocesses, and a backend to look with."""
    from reliability.harness import make_target

    url = require_redis() if request.param == "redis" else REDIS_URL
    target = make_target(request.param, tmp_path / "target", url)
    try:
        yield target
    finally:
        target.close()


def stored_anything(target: Any) -> list[str]:
    """Whatever a dispatch left in ``target``'s store: job files, temp files and unique-key
    holders of the file backend, every key of the Redis prefix."""
    if target.kind == "file":
        q = target.queue_dir
        return [str(p) for pattern in ("q/*/*/*", "tmp/*", "unique/*", "idem/*") for p in q.glob(pattern)]
    import redis

    client = redis.Redis.from_url(target.redis_url)
    try:
        return [k.decode() for k in client.scan_iter(match=f"{target.prefix}:*", count=1000)]
    finally:
        client.close()
