"""issue 13, items that had no test of their own: ``config:show`` names ``default`` for the
connection keys forge.toml does not set, and the queued-commands guide's import of the error
classes from ``forge.queue`` works in a fresh interpreter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


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
