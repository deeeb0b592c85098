"""Issue 13, operator experience (second part): steering the queue safely, honest messages.

Every test runs the real ``forge`` CLI in subprocesses, as an operator would; "on a terminal"
means stdin and stderr on a pseudo-terminal, as in tmux.
"""

from __future__ import annotations

import json
import os
import pty
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import pytest
from fdwait import readable
from test_operator import HELLO, qforge, start_worker, stop_worker


def on_terminal(target: Any, *args: str, answer: str | None = None, timeout: float = 30,
                env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """``forge ARGS`` with stdin and stderr on a pseudo-terminal (stdout piped); ``answer`` is
    typed once the first prompt (``?``) shows. Returns (exit code, stdout, the terminal's text)."""
    master, slave = pty.openpty()
    full = dict(target.env if env is None else env)
    full.setdefault("TERM", "xterm")
    proc = subprocess.Popen([sys.executable, "-m", "forge", *args], cwd=target.workdir, env=full,
                            stdin=slave, stderr=slave, stdout=subprocess.PIPE, text=True)
    os.close(slave)
    seen = b""
    deadline = time.monotonic() + timeout
    answered = answer is None
    try:
        while time.monotonic() < deadline:
            ready = readable([master], 0.1)
            if ready:
                try:
                    chunk = os.read(master, 4096)
                except OSError:
                    chunk = b""
                if not chunk:
                    break
                seen += chunk
                if not answered and b"?" in seen:
                    os.write(master, (answer or "").encode() + b"\n")
                    answered = True
            elif proc.poll() is not None:
                break
        assert proc.stdout is not None
        out = proc.stdout.read()
        code = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return code, out, seen.decode(errors="replace").replace("\r\n", "\n")


def failed_job(t: Any, *args: str, queue: str = "default") -> str:
    """A job that has failed (worker --once, tries = 1), its id."""
    job = qforge(t, "queue:dispatch", f"--queue={queue}", *args, "probe:run", "--fail").stdout.strip()
    res = qforge(t, "queue:work", "--once", "--sleep=0.1", f"--queue={queue}")
    assert res.returncode == 0, res.stderr
    assert t.backend.find(job).state == "failed"
    return job


# -- item 1: steering the queue ------------------------------------------------------------

def test_retry_dry_run_prints_what_it_would_retry_and_changes_nothing(queue_target: Any) -> None:
    t = queue_target
    one = failed_job(t)
    two = failed_job(t, queue="other")
    res = qforge(t, "queue:retry", "all", "--dry-run")
    assert res.returncode == 0, res.stderr
    assert sorted(res.stdout.split()) == sorted([one, two])
    assert {t.backend.find(i).state for i in (one, two)} == {"failed"}
    only = qforge(t, "queue:retry", "all", "--dry-run", "--queue=other")
    assert only.stdout.split() == [two]
    named = qforge(t, "queue:retry", "--dry-run", one[:8])
    assert named.returncode == 0 and named.stdout.split() == [one]
    pending = qforge(t, "queue:dispatch", "probe:run").stdout.strip()
    refused = qforge(t, "queue:retry", "--dry-run", pending)
    assert refused.returncode == 5 and "pending, not failed" in refused.stderr
    assert t.backend.find(one).state == "failed"
    real = qforge(t, "queue:retry", one)
    assert real.stdout.split() == [one] and t.backend.find(one).state == "pending"


def test_flush_asks_on_a_terminal_and_force_skips_the_question(queue_target: Any) -> None:
    t = queue_target
    job = failed_job(t)
    code, _, screen = on_terminal(t, "queue:flush", answer="n")
    assert code == 1 and "Delete the 1 failed job(s)" in screen and "Aborted" in screen
    assert t.backend.find(job).state == "failed"
    code, _, screen = on_terminal(t, "queue:flush", answer="y")
    assert code == 0 and "Deleted 1 failed job(s)" in screen
    assert t.backend.find(job) is None
    again = failed_job(t)
    code, _, screen = on_terminal(t, "queue:flush", "--force")
    assert code == 0 and "?" not in screen and t.backend.find(again) is None
    piped = qforge(t, "queue:flush")  # a script or cron: no terminal, no question
    assert piped.returncode == 0 and "Deleted 0 failed job(s)" in piped.stderr


def test_monitor_max_counts_due_jobs_not_delayed_ones(queue_target: Any) -> None:
    t = queue_target
    for _ in range(3):
        qforge(t, "queue:dispatch", "--delay=1d", "probe:run")
    qforge(t, "queue:dispatch", "probe:run")
    due = qforge(t, "queue:monitor", "--max=2")
    assert due.returncode == 0, due.stderr  # 1 due job; tomorrow's 3 do not count
    doc = json.loads(qforge(t, "queue:monitor", "--max=2", "--json").stdout)
    assert doc["max_counts"] == "pending" and doc["queues"][0]["over"] is False
    waiting = qforge(t, "queue:monitor", "--max=2", "--count-delayed")
    assert waiting.returncode == 8 and "holds 4 waiting (pending + delayed) jobs" in waiting.stderr
    qforge(t, "queue:dispatch", "probe:run")
    qforge(t, "queue:dispatch", "probe:run")
    over = qforge(t, "queue:monitor", "--max=2")
    assert over.returncode == 8 and "holds 3 due (pending) jobs" in over.stderr


@pytest.mark.parametrize("queue_target", ["file"], indirect=True)
def test_quarantined_files_are_counted_in_list_monitor_and_the_worker_log(queue_target: Any) -> None:
    t = queue_target
    qforge(t, "queue:dispatch", "probe:run")
    pending = t.queue_dir / "q" / "default" / "pending"
    (pending / "1700000000000000-not-a-job-0.job").write_text("garbage")
    worker = qforge(t, "queue:work", "--once", "--sleep=0.1")
    assert worker.returncode == 0, worker.stderr
    assert "1 job file in quarantine" in worker.stdout + worker.stderr
    listed = qforge(t, "queue:list")
    assert "1 file in quarantine" in listed.stderr and str(t.queue_dir / "quarantine") in listed.stderr
    assert json.loads(qforge(t, "queue:list", "--json").stdout)["quarantined"] == 1
    mon = qforge(t, "queue:monitor")
    assert mon.returncode == 0 and "1 file in quarantine" in mon.stderr
    assert json.loads(qforge(t, "queue:monitor", "--json").stdout)["quarantined"] == 1


def test_pausing_a_never_used_queue_warns_and_an_empty_queue_can_be_removed(queue_target: Any) -> None:
    t = queue_target
    qforge(t, "queue:dispatch", "probe:run")
    typo = qforge(t, "queue:pause", "defualt")
    assert typo.returncode == 0 and "was never used" in typo.stderr and "known queues: default" in typo.stderr
    assert "queue:forget-queue defualt" in typo.stderr
    listed = json.loads(qforge(t, "queue:list", "--json").stdout)["queues"]
    assert [q["queue"] for q in listed] == ["default", "defualt"]
    gone = qforge(t, "queue:forget-queue", "defualt")
    assert gone.returncode == 0, gone.stderr
    assert [q["queue"] for q in json.loads(qforge(t, "queue:list", "--json").stdout)["queues"]] == ["default"]
    busy = qforge(t, "queue:forget-queue", "default")
    assert busy.returncode == 2 and "still holds jobs" in busy.stderr
    known = qforge(t, "queue:pause", "default")
    assert known.returncode == 0 and "never used" not in known.stderr


def test_wait_says_on_a_terminal_that_it_is_waiting_and_prints_the_output_on_success(queue_target: Any) -> None:
    t = queue_target
    code, out, screen = on_terminal(t, "queue:dispatch", "--wait", "--wait-timeout=3s", "probe:run")
    assert code == 1 and "Waiting for job" in screen and "forge queue:work" in screen, screen
    worker = start_worker(t)
    try:
        res = qforge(t, "queue:dispatch", "--wait", "--wait-timeout=30s", "probe:run", "--say=hello-from-job")
        assert res.returncode == 0, res.stderr
        assert "hello-from-job" in res.stderr and "Waiting" not in res.stderr  # not a terminal: no notice
        bad = qforge(t, "queue:dispatch", "--wait", "--wait-timeout=30s", "probe:run", "--say=sad", "--fail")
        assert bad.returncode == 7 and "sad" in bad.stderr
    finally:
        stop_worker(worker)


# -- item 2: messages ------------------------------------------------------------------------

def test_errors_are_sentences_and_a_bad_tries_variable_says_what_it_wants(queue_target: Any) -> None:
    t = queue_target
    res = qforge(t, "-V")
    assert res.returncode == 2 and "No such option: -V. Run `forge --help`." in res.stderr
    env = {**t.env, "FORGE_QUEUE_TRIES": "abc"}
    bad = subprocess.run([sys.executable, "-m", "forge", "queue:list"], cwd=t.workdir, env=env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "invalid literal" not in bad.stderr
    assert "queue.tries (env FORGE_QUEUE_TRIES): expected a whole number such as 3, not 'abc'." in bad.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_redis_hints_name_where_the_url_came_from(tmp_path: Any) -> None:
    from conftest import make_project

    port = _free_port()
    make_project(tmp_path, toml=f'[forge]\ncommands = ["commands"]\n[queue]\nconnection = "redis"\n'
                                f'[connections.redis]\nurl = "redis://127.0.0.1:{port}/0"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORGE_")} | {"FORGE_NO_PLUGINS": "1"}
    run = lambda e: subprocess.run([sys.executable, "-m", "forge", "queue:list"], cwd=tmp_path, env=e,  # noqa: E731
                                   capture_output=True, text=True, timeout=60)
    from_file = run(env)
    assert from_file.returncode == 6 and "Connection refused. Start the server" in from_file.stderr
    assert ".." not in from_file.stderr and "fix the connection's url in forge.toml." in from_file.stderr
    from_env = run({**env, "FORGE_REDIS_URL": f"redis://127.0.0.1:{port}/1"})
    assert from_env.returncode == 6 and "fix the url in $FORGE_REDIS_URL." in from_env.stderr
    assert "forge.toml" not in from_env.stderr


def test_a_server_that_does_not_speak_redis_is_not_a_redis_server_exit_6(tmp_path: Any) -> None:
    from conftest import make_project

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    stop = threading.Event()

    def answer_garbage() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            with conn:
                try:
                    conn.recv(4096)
                    conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                except OSError:
                    pass

    thread = threading.Thread(target=answer_garbage, daemon=True)
    thread.start()
    try:
        make_project(tmp_path, {"hello.py": HELLO})
        env = {k: v for k, v in os.environ.items() if not k.startswith("FORGE_")}
        env.update(FORGE_NO_PLUGINS="1", FORGE_REDIS_URL=f"redis://127.0.0.1:{port}/0")
        for args in (["queue:list", "--connection=redis"], ["queue:dispatch", "--connection=redis", "hello:say"]):
            res = subprocess.run([sys.executable, "-m", "forge", *args], cwd=tmp_path, env=env,
                                 capture_output=True, text=True, timeout=60)
            assert res.returncode == 6, (args, res.stderr)
            assert f"Redis at redis://127.0.0.1:{port}/0 is not a Redis server" in res.stderr, res.stderr
    finally:
        stop.set()
        thread.join()
        listener.close()


def test_dispatch_option_checks_from_file_json_empty_queue_past_at_zero_timeout(queue_target: Any) -> None:
    t = queue_target
    lines = '{"command": "probe:run"}\n{"command": "probe:run", "queue": "other"}\n'
    res = subprocess.run([sys.executable, "-m", "forge", "queue:dispatch", "--json", "--from-file", "-"],
                         cwd=t.workdir, env=t.env, input=lines, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    records = [json.loads(line) for line in res.stdout.splitlines()]
    assert [(r["queue"], r["command"], r["created"]) for r in records] == [("default", "probe:run", True),
                                                                         ("other", "probe:run", True)]
    assert all(t.backend.find(r["id"]) is not None for r in records)
    empty = qforge(t, "queue:dispatch", "--queue=", "probe:run")
    assert empty.returncode == 2 and "--queue must not be empty" in empty.stderr
    past = qforge(t, "queue:dispatch", "--at=2020-01-01T09:00", "probe:run")
    assert past.returncode == 0 and "--at 2020-01-01T09:00 is in the past" in past.stderr
    assert t.backend.find(past.stdout.strip()).state == "pending"
    zero = qforge(t, "queue:dispatch", "--timeout=0", "probe:run")
    assert zero.returncode == 2 and zero.stderr.startswith("Error: --timeout must be more than 0"), zero.stderr
    assert "probe:run" not in zero.stderr


# -- item 3: path arguments are checked where the job runs -----------------------------------

READER = '''from pathlib import Path
from typing import Annotated

import typer

from forge import command


@command("sales:read")
def read(src: Annotated[Path, typer.Argument(exists=True, dir_okay=False)]) -> None:
    """Print the file's first line."""
    print(src.read_text().splitlines()[0])
'''


def test_path_arguments_are_checked_in_the_project_root_where_the_job_runs(tmp_path: Any) -> None:
    from conftest import make_project

    root = tmp_path / "proj"
    make_project(root, {"reader.py": READER}, toml='[forge]\ncommands = ["commands"]\n'
                 f'[connections.file]\npath = "{tmp_path / "queue"}"\n')
    (root / "sales.csv").write_text("from-the-root\n")
    sub = root / "reports"
    sub.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORGE_")} | {"FORGE_NO_PLUGINS": "1"}

    def forge_in(cwd: Any, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "forge", *args], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=60)

    for _ in range(2):  # the first run fills the command cache, the second takes the fast path
        ok = forge_in(sub, "queue:dispatch", "sales:read", "sales.csv")
        assert ok.returncode == 0, ok.stderr
        wrong = forge_in(sub, "queue:dispatch", "sales:read", "../sales.csv")
        assert wrong.returncode == 2 and "does not exist" in wrong.stderr, wrong.stderr
    done = forge_in(sub, "queue:work", "--stop-when-empty", "--sleep=0.1", "--echo")
    assert done.returncode == 0 and "from-the-root" in done.stdout + done.stderr
    assert not json.loads(forge_in(sub, "queue:failed", "--json").stdout)["jobs"]


# -- item 5: forge init, dispatch_many -------------------------------------------------------

def test_forge_init_makes_a_project_the_readme_commands_run_in(tmp_path: Any) -> None:
    import tomllib

    env = {k: v for k, v in os.environ.items() if not k.startswith("FORGE_")} | {"FORGE_NO_PLUGINS": "1"}
    proj = tmp_path / "app"
    res = subprocess.run([sys.executable, "-m", "forge", "init", str(proj)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert (proj / "storage").is_dir() and (proj / "commands").is_dir()
    assert "storage/" in (proj / ".gitignore").read_text().splitlines()
    text = (proj / "forge.toml").read_text()
    assert text.count("#") >= 10 and 'commands = ["commands"]' in text and "backoff = [0]" in text
    assert tomllib.loads(text)["queue"]["tries"] == 1
    again = subprocess.run([sys.executable, "-m", "forge", "init", str(proj)], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=60)
    assert again.returncode != 0 and "already exists" in again.stderr
    shown = subprocess.run([sys.executable, "-m", "forge", "config:show"], cwd=proj, env=env,
                           capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr


def test_dispatch_many_names_the_index_of_a_bad_item_and_the_readme_example_works(tmp_path: Any) -> None:
    from conftest import EXAMPLE_CONFIG

    env = {k: v for k, v in os.environ.items() if not k.startswith("FORGE_")}
    env.update(FORGE_NO_PLUGINS="1", FORGE_CONFIG=str(EXAMPLE_CONFIG), FORGE_QUEUE_DIR=str(tmp_path / "q"))
    script = (
        "from forge.queue import CommandQueue, QueuedCommand, InvalidCommand\n"
        "queue = CommandQueue()\n"
        'ids = queue.dispatch_many([QueuedCommand("email:send").with_arg(f"--user={u}") for u in range(1, 101)])\n'
        "assert len(ids) == 100\n"
        "try:\n"
        '    queue.dispatch_many([QueuedCommand("email:send").with_arg(f"--user={u}") for u in (1, 2, 0)])\n'
        "except InvalidCommand as err:\n"
        "    print(err)\n"
    )
    res = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("Item 2 (of 3): email:send"), res.stdout


# -- item 4 (part): forge --help shows forge's own options -----------------------------------

def test_forge_help_shows_the_global_options(queue_target: Any) -> None:
    res = qforge(queue_target, "--help")
    assert res.returncode == 0, res.stderr
    head = res.stdout.split("Available commands:")[0]
    for flag in ("-v, --verbose", "--version", "-h, --help", "--install-completion"):
        assert flag in head, head


def test_plain_listings_cut_huge_arguments_but_never_ids(queue_target: Any) -> None:
    t = queue_target
    huge = "x" * 5000
    job = qforge(t, "queue:dispatch", "probe:run", huge).stdout.strip()
    listed = qforge(t, "queue:list")
    assert listed.returncode == 0 and job in listed.stdout and huge not in listed.stdout
    assert max(len(line) for line in listed.stdout.splitlines()) < 400
    assert "..." in listed.stdout
    doc = json.loads(qforge(t, "queue:list", "--json").stdout)
    assert huge in json.dumps(doc)  # JSON keeps the whole value
