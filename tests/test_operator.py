"""Issue 13, operator experience: where the queue is, steering single jobs, seeing workers.

Every test runs the real ``forge`` CLI in subprocesses, as an operator would: a symlink-swap
deploy, cron's bare environment, a project with a broken command file, outside any project.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import make_project
from reliability.harness import worker_argv
from waitfor import wait_for

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


# -- steering single jobs, seeing workers (both backends) -----------------------------------

def qforge(target: Any, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "forge", *args], cwd=target.workdir, env=target.env,
                          capture_output=True, text=True, timeout=timeout)


def start_worker(target: Any, *args: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(worker_argv("--json", "--sleep=0.2", *args), cwd=target.workdir, env=target.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert "worker_started" in proc.stdout.readline()
    return proc


def stop_worker(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_cancel_waiting_jobs_by_unique_prefix(queue_target: Any) -> None:
    t = queue_target
    now_id = qforge(t, "queue:dispatch", "probe:run").stdout.strip()
    later_id = qforge(t, "queue:dispatch", "--delay=1h", "probe:run").stdout.strip()
    res = qforge(t, "queue:cancel", now_id[:8], later_id[:6])
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == [now_id, later_id]
    listed = json.loads(qforge(t, "queue:failed", "--json").stdout)["jobs"]
    assert {j["id"]: j["reason"] for j in listed} == {now_id: "cancelled", later_id: "cancelled"}
    shown = qforge(t, "queue:show", now_id[:5])
    assert shown.returncode == 0 and "cancelled" in shown.stdout
    stats = json.loads(qforge(t, "queue:list", "--json").stdout)["queues"]
    assert [(s["pending"], s["delayed"], s["failed"]) for s in stats] == [(0, 0, 2)]
    again = qforge(t, "queue:cancel", now_id)
    assert again.returncode == 2 and "failed" in again.stderr
    missing = qforge(t, "queue:cancel", "00000000-0000-4000-8000-000000000000")
    assert missing.returncode == 5


def test_an_ambiguous_id_prefix_is_a_usage_error_listing_the_matches(queue_target: Any) -> None:
    t = queue_target
    ids = [qforge(t, "queue:dispatch", "probe:run").stdout.strip() for _ in range(40)]
    by_first: dict[str, list[str]] = {}
    for i in ids:
        by_first.setdefault(i[0], []).append(i)
    prefix, matches = next((p, m) for p, m in by_first.items() if len(m) > 1)
    for args in (["queue:show", prefix], ["queue:cancel", prefix], ["queue:log", prefix],
                 ["queue:retry", prefix], ["queue:forget", prefix]):
        res = qforge(t, *args)
        assert res.returncode == 2, (args, res.stderr)
        assert "is ambiguous" in res.stderr and all(m in res.stderr for m in matches), res.stderr
    bad = qforge(t, "queue:show", "xyz")
    assert bad.returncode == 2 and "Invalid job id" in bad.stderr


def test_a_prefix_of_no_job_is_not_found_for_every_command_that_takes_ids(queue_target: Any) -> None:
    """A well-formed prefix that matches no job exits 5 ("not found"), the same for every
    command that takes ids; an ill-formed one stays a usage error (exit 2)."""
    t = queue_target
    job = qforge(t, "queue:dispatch", "probe:run").stdout.strip()
    qforge(t, "queue:cancel", job)  # a failed job, so queue:retry has something to retry
    absent = next(p for p in ("ffffffff", "0000000a", "deadbeef") if not job.startswith(p))
    for args in (["queue:show", absent], ["queue:cancel", absent], ["queue:log", absent],
                 ["queue:retry", absent], ["queue:retry", "--dry-run", absent], ["queue:forget", absent]):
        res = qforge(t, *args)
        assert res.returncode == 5, (args, res.stderr)
        assert f"Job {absent} not found" in res.stderr and "Invalid job id" not in res.stderr, (args, res.stderr)
    both = qforge(t, "queue:retry", job, absent)  # the one that exists is still retried
    assert both.returncode == 5 and both.stdout.split() == [job], both.stderr
    assert t.backend.find(job).state == "pending"
    for args in (["queue:cancel", "xyz"], ["queue:retry", "xyz"]):
        res = qforge(t, *args)
        assert res.returncode == 2 and "Invalid job id" in res.stderr, (args, res.stderr)


def test_cancel_running_kills_the_job_and_records_cancelled(queue_target: Any) -> None:
    t = queue_target
    job = qforge(t, "queue:dispatch", "probe:run", "--sleep=60").stdout.strip()
    worker = start_worker(t)
    try:
        wait_for(lambda: t.backend.find(job).state == "reserved")
        plain = qforge(t, "queue:cancel", job[:8])
        assert plain.returncode == 2 and "--running" in plain.stderr
        res = qforge(t, "queue:cancel", "--running", job[:8])
        assert res.returncode == 0 and res.stdout.strip() == job, res.stderr
        info = t.backend.find(job)
        assert info.state == "failed" and info.failure.reason == "cancelled"
        wait_for(lambda: '"failed"' in worker.stdout.readline())
    finally:
        stop_worker(worker)


def test_queue_workers_lists_live_workers_and_drops_dead_ones(queue_target: Any) -> None:
    t = queue_target
    assert json.loads(qforge(t, "queue:workers", "--json").stdout)["workers"] == []
    job = qforge(t, "queue:dispatch", "probe:run", "--sleep=60").stdout.strip()
    one = start_worker(t, "--name=host-a:1", "--queue=default")
    two = start_worker(t, "--name=host-b:2", "--queue=other,default")
    try:
        def listed() -> dict[str, Any]:
            found = json.loads(qforge(t, "queue:workers", "--json").stdout)["workers"]
            return {w["name"]: w for w in found}

        ws = wait_for(lambda: (w := listed()) and len(w) == 2 and any(x["state"] == "running" for x in w.values())
                      and w)
        running = next(w for w in ws.values() if w["state"] == "running")
        assert running["job_id"] == job and running["job_command"] == "probe:run"
        assert running["job_since"].endswith("Z") and running["heartbeat_at"].endswith("Z")
        assert {tuple(w["queues"]) for w in ws.values()} == {("default",), ("other", "default")}
        assert {w["pid"] for w in ws.values()} == {one.pid, two.pid}
        human = qforge(t, "queue:workers")
        assert "host-a:1" in human.stdout and "running" in human.stdout and job[:8] in human.stdout
        idle = next(p for p in (one, two) if p.pid != running["pid"])
        stop_worker(idle)  # a clean exit removes its record
        assert [w["pid"] for w in listed().values()] == [running["pid"]]
        busy = one if idle is two else two
        busy.kill()  # a dead worker drops out
        busy.wait()
        assert wait_for(lambda: listed() == {} or None, timeout=5) is None or listed() == {}
    finally:
        stop_worker(one)
        stop_worker(two)
