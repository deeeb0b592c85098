"""issue 13, items that had no test of their own: ``config:show`` names ``default`` for the
connection keys forge.toml does not set, and the queued-commands guide's import of the error
classes from ``forge.queue`` works in a fresh interpreter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from reliability.harness import worker_argv


def _env(config: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORGE_")}
    env.update(FORGE_CONFIG=str(config), FORGE_NO_PLUGINS="1")
    return env


def test_config_show_attributes_only_what_forge_toml_sets_to_it(tmp_path: Path) -> None:
    config = tmp_path / "forge.toml"
    config.write_text('[queue]\nconnection = "redis"\n[connections.redis]\nurl = "redis://127.0.0.1:6379/3"\n')
    res = subprocess.run([sys.executable, "-m", "forge", "config:show", "--json"], env=_env(config),
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    sources = json.loads(res.stdout)["sources"]
    assert sources["connections.redis.url"] == str(config)
    assert sources["queue.connection"] == str(config)
    for key in ("connections.redis.prefix", "connections.redis.connect_timeout", "connections.redis.driver",
                "connections.file.path", "queue.tries"):
        assert sources[key] == "default", (key, sources[key])
    human = subprocess.run([sys.executable, "-m", "forge", "config:show"], env=_env(config),
                           capture_output=True, text=True, timeout=60, cwd=tmp_path).stdout
    prefix = next(line for line in human.splitlines() if line.startswith("connections.redis.prefix"))
    assert prefix.split()[-1] == "default"


def test_the_error_classes_import_from_forge_queue_as_the_guide_writes_it(tmp_path: Path) -> None:
    code = ("from forge.queue import QueueError, DuplicateJob, InvalidCommand, QueueUnavailable, DispatchFailed, "
            "JobNotFound, RetryBlocked\n"
            "import forge\n"
            "assert forge.QueueError is QueueError and issubclass(DuplicateJob, QueueError)\n"
            "print('ok')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path,
                         env=_env(tmp_path / "forge.toml"))
    assert res.returncode == 0 and res.stdout == "ok\n", res.stderr


LIBFAKETIME = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"


def _forge(t: Any, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([sys.executable, "-m", "forge", *args], env={**t.env, **(env or {})},
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return res


def test_queue_failed_filters_like_queue_retry_and_puts_the_failure_at_top_level(queue_target: Any) -> None:
    t = queue_target
    raised = _forge(t, "queue:dispatch", "probe:run", "--fail").stdout.strip()
    exited = _forge(t, "queue:dispatch", "probe:run", "--exit-code=3").stdout.strip()
    cancelled = _forge(t, "queue:dispatch", "--delay=1h", "probe:noop").stdout.strip()
    _forge(t, "queue:cancel", cancelled)
    drained = subprocess.run(worker_argv("--stop-when-empty", "--sleep=0.1"), env=t.env, capture_output=True,
                             text=True, timeout=120)
    assert drained.returncode == 0, drained.stderr

    def ids(*args: str, env: dict[str, str] | None = None) -> list[str]:
        return [j["id"] for j in json.loads(_forge(t, "queue:failed", "--json", *args, env=env).stdout)["jobs"]]

    assert sorted(ids()) == sorted([raised, exited, cancelled])
    assert ids("--reason=exit_code") == [exited]
    assert ids("--reason=cancelled") == [cancelled]
    assert sorted(ids("--command=probe:run")) == sorted([raised, exited])
    assert ids("--command=probe:run", "--reason=exception") == [raised]
    assert sorted(ids("--since=1h")) == sorted([raised, exited, cancelled])
    if os.path.exists(LIBFAKETIME) and t.kind == "file":
        # Two hours on, none failed within the last hour. (On Redis a job's times come from the
        # server's clock, converted by its offset from this process's clock: a faked clock moves them too.)
        assert ids("--since=1h", env={"LD_PRELOAD": LIBFAKETIME, "FAKETIME": "+2h"}) == []
    jobs = {j["id"]: j for j in json.loads(_forge(t, "queue:failed", "--json").stdout)["jobs"]}
    assert jobs[exited]["reason"] == "exit_code" and "3" in jobs[exited]["error"]
    assert jobs[raised]["reason"] == "exception" and "probe failed on purpose" in jobs[raised]["error"]
    assert all(j["failed_at"].endswith("Z") for j in jobs.values())
    bad = subprocess.run([sys.executable, "-m", "forge", "queue:failed", "--reason=nope"], env=t.env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "nope" in bad.stderr


def test_forge_queue_keeps_every_name_it_exported_before_the_move() -> None:
    """forge.queue became a package; the names a user imported from it still import."""
    import forge.queue as q

    before = ["AmbiguousJobId", "CommandQueue", "DispatchFailed", "DuplicateJob", "ForgeError", "InvalidCommand",
              "JobDispatch", "JobNotFound", "QueueError", "QueueManager", "QueueUnavailable", "QueuedCommand",
              "RetryBlocked", "UnknownQueuedCommand", "batch_key", "connect"]
    assert [n for n in before if not hasattr(q, n)] == []
    assert sorted(q.__all__) == sorted(before)
