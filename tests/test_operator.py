"""Issue 13, operator experience: where the queue is, steering single jobs, seeing workers.

Every test runs the real ``forge`` CLI in subprocesses, as an operator would: a symlink-swap
deploy, cron's bare environment, a project with a broken command file, outside any project.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import make_project

HELLO = '''from forge import command


@command("hello:say")
def say(who: str = "world") -> None:
    """Say hello."""
    print(f"hello {who}")
'''


def forge(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 60,
          stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """``forge ARGS`` from ``cwd`` as a shell would start it: ``$PWD`` is ``cwd`` as typed."""
    full = dict(os.environ if env is None else env)
    full["PWD"] = str(cwd)
    return subprocess.run([sys.executable, "-m", "forge", *args], cwd=cwd, env=full, capture_output=True,
                          text=True, timeout=timeout, input=stdin)


def project_env(**extra: str) -> dict[str, str]:
    """The test's environment without forge's own pointers (FORGE_CONFIG, FORGE_QUEUE_DIR)."""
    env = {k: v for k, v in os.environ.items() if k not in ("FORGE_CONFIG", "FORGE_QUEUE_DIR")}
    env.update(extra)
    return env


@pytest.fixture
def deploy() -> Iterator[Path]:
    """``/tmp/forge-deploy-*/{releases/1,releases/2,current -> releases/1}``, two releases of
    one project; the default queue directory it gets (under the account's home) is removed after."""
    base = Path(tempfile.mkdtemp(prefix="forge-deploy-"))
    for n in ("1", "2"):
        make_project(base / "releases" / n, {"hello.py": HELLO})
    (base / "current").symlink_to(base / "releases" / "1")
    queue_dirs: list[str] = []
    try:
        yield base
        res = forge("config:show", "--json", cwd=base / "current", env=project_env())
        queue_dirs.append(json.loads(res.stdout)["settings"]["connections"]["file"]["path"])
    finally:
        for q in queue_dirs:
            assert "/queues/current-" in q
            shutil.rmtree(q, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)


def _queue_path(cwd: Path, env: dict[str, str]) -> str:
    res = forge("config:show", "--json", cwd=cwd, env=env)
    assert res.returncode == 0, res.stderr
    return str(json.loads(res.stdout)["settings"]["connections"]["file"]["path"])


def test_a_symlink_swap_deploy_keeps_the_queue_across_releases_and_environments(deploy: Path) -> None:
    current = deploy / "current"
    env = project_env(XDG_DATA_HOME=str(deploy / "xdg"))
    job = forge("queue:dispatch", "hello:say", "--who=deploy", cwd=current, env=env)
    assert job.returncode == 0, job.stderr
    path = _queue_path(current, env)
    (current).unlink()
    (current).symlink_to(deploy / "releases" / "2")  # the deploy
    # cron's bare environment, another $HOME, no XDG: the same queue
    cron = {"PATH": os.environ["PATH"], "HOME": str(deploy), "SHELL": "/bin/sh", "LOGNAME": "root"}
    cron.update({k: v for k, v in os.environ.items() if k in ("FORGE_TEST_REDIS_URL", "PYTHONPATH")})
    assert _queue_path(current, cron) == path
    worker = forge("queue:work", "--stop-when-empty", cwd=current, env=cron)
    assert worker.returncode == 0, worker.stderr
    assert job.stdout.strip()[:8] in worker.stdout
    assert f"on connection file: {path}." in worker.stdout.splitlines()[0]  # the start banner
    assert path in worker.stdout.splitlines()[-1]  # and the stop line
    assert "DONE" in worker.stdout
    shown = forge("config:show", cwd=current, env=cron)
    assert path in shown.stdout and "connections.file.path" in shown.stdout


def test_a_project_name_keys_the_queue_directory(tmp_path: Path) -> None:
    a = make_project(tmp_path / "a", toml='[forge]\nname = "shop"\n').parent
    b = make_project(tmp_path / "b", toml='[forge]\nname = "shop"\n').parent
    path = _queue_path(a, project_env())
    assert path.endswith("/forge/queues/shop") and _queue_path(b, project_env(HOME="/tmp")) == path
    bad = make_project(tmp_path / "c", toml='[forge]\nname = "../x"\n').parent
    res = forge("config:show", cwd=bad, env=project_env())
    assert res.returncode == 2 and "forge.name" in res.stderr


def test_outside_a_project_forge_says_no_forge_toml_was_found(tmp_path: Path) -> None:
    nowhere = tmp_path / "cron-home"
    nowhere.mkdir()
    env = project_env()
    for args in (["queue:list"], ["queue:dispatch", "import:data", "x.csv"], ["import:data"]):
        res = forge(*args, cwd=nowhere, env=env)
        assert f"No forge.toml found (looked in {nowhere}, {nowhere.parent}" in res.stderr, (args, res.stderr)
    res = forge("list", cwd=nowhere, env=env)
    assert res.returncode == 0 and "No forge.toml" not in res.stderr


def test_a_broken_command_file_does_not_take_down_the_built_in_commands(tmp_path: Path) -> None:
    root = tmp_path / "app"
    make_project(root, {"hello.py": HELLO, "broken.py": "from forge import command\n\ndef oops(:\n"})
    env = project_env(FORGE_QUEUE_DIR=str(tmp_path / "queue"))
    for args in (["list"], ["config:show"], ["queue:list"], ["queue:failed"], ["queue:retry", "all"],
                 ["queue:pause", "default"], ["queue:resume", "default"], ["queue:monitor"],
                 ["queue:dispatch", "hello:say"], ["hello:say"]):
        res = forge(*args, cwd=root, env=env)
        assert res.returncode == 0, (args, res.stderr)
        assert "commands/broken.py: failed to import: SyntaxError" in res.stderr, (args, res.stderr)
    missing = forge("broken:thing", cwd=root, env=env)
    assert missing.returncode == 1 and "commands/broken.py" in missing.stderr
    # what needs the project's code fails, naming the file
    worker = forge("queue:work", "--once", cwd=root, env=env)
    assert worker.returncode == 1 and "commands/broken.py: failed to import" in worker.stderr
    verbose = forge("-v", "list", cwd=root, env=env)
    assert verbose.returncode == 1 and "Traceback" in verbose.stderr
