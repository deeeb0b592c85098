"""Every test runs against its own queue directory and never loads site-installed plugins."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest

from forge.job import Job
from forge.queue import QueuedCommand

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_CONFIG = ROOT / "forge.toml"


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
def queue_target(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """The probe project on a real file queue or Redis (``reliability.harness.Target``): a
    forge.toml, the environment for ``forge`` subprocesses, and a backend to look with."""
    from reliability.harness import make_target

    url = os.environ.get("FORGE_TEST_REDIS_URL")
    if request.param == "redis":
        if not url:
            pytest.skip("FORGE_TEST_REDIS_URL is not set")
        import redis

        redis.Redis.from_url(url, socket_connect_timeout=5).ping()  # set but down: a failure
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
