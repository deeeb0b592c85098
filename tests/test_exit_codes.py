"""One rule turns a command's return value into its exit code, and ``forge NAME``, ``forge.call``
and a job run by a worker agree on it (forge.registry.runner.exit_code_of): None and True are
0, False is 1, an int is itself if an exit status can carry it (0-255) and 1 otherwise,
``typer.Exit(code)`` and ``sys.exit(code)`` are their code."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import forge_cmd, make_project

import forge
from forge.job import State
from forge.queue import CommandQueue, QueuedCommand
from forge.registry.runner import exit_code_of, system_exit_code

COMMANDS = '''
import sys

import typer

from forge import command


@command("rv:none")
def none() -> None:
    print("ran")


@command("rv:true")
def true() -> bool:
    return True


@command("rv:false")
def false() -> bool:
    return False


@command("rv:int")
def integer(code: int = typer.Option(0)) -> int:
    return code


@command("rv:text")
def text() -> str:
    return "not an exit code"


@command("rv:exit")
def typer_exit(code: int = typer.Option(0)) -> None:
    raise typer.Exit(code)


@command("rv:sysexit")
def sys_exit(code: str = typer.Option("")) -> None:
    sys.exit(int(code) if code.lstrip("-").isdigit() else code)
'''

#: (command, args) -> the exit code every path must give. 65 and 75 are left out: they are the
#: retry protocol's codes, which a worker treats apart (forge.retry.outcome).
CASES: dict[tuple[str, tuple[str, ...]], int] = {
    ("rv:none", ()): 0,
    ("rv:true", ()): 0,
    ("rv:false", ()): 1,
    ("rv:int", ("--code", "0")): 0,
    ("rv:int", ("--code", "3")): 3,
    ("rv:int", ("--code", "255")): 255,
    ("rv:int", ("--code", "256")): 1,  # an exit status would wrap it to 0: a success
    ("rv:int", ("--code=-1",)): 1,
    ("rv:text", ()): 0,
    ("rv:exit", ("--code", "0")): 0,
    ("rv:exit", ("--code", "4")): 4,
    ("rv:exit", ("--code", "300")): 1,
    ("rv:sysexit", ("--code", "5")): 5,
    ("rv:sysexit", ("--code", "bye")): 1,
}


@pytest.fixture
def rv_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project with the return-value probes, made the current config; tries = 1."""
    root = tmp_path / "rvproject"
    toml = '[forge]\ncommands = ["commands"]\n\n[queue]\ntries = 1\nbackoff = [0]\n'
    config = make_project(root, {"rv.py": COMMANDS}, toml=toml)
    monkeypatch.setenv("FORGE_CONFIG", str(config))
    return root


def test_the_rule() -> None:
    assert [exit_code_of(v) for v in (None, True, False, 0, 7, 255, 256, -1, "x", 1.5)] == \
        [0, 0, 1, 0, 7, 255, 1, 1, 0, 0]
    assert [system_exit_code(SystemExit(v)) for v in (None, 0, 9, True, False, 256, -3)] == \
        [0, 0, 9, 1, 0, 1, 1]


def test_forge_name_exits_with_the_rule(rv_project: Path) -> None:
    got = {case: subprocess.run([*forge_cmd(), case[0], *case[1]], capture_output=True, text=True,
                                timeout=60).returncode
           for case in CASES}
    assert got == CASES


def test_sys_exit_message_is_printed_by_forge_name(rv_project: Path) -> None:
    res = subprocess.run([*forge_cmd(), "rv:sysexit", "--code", "bye"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "bye" in res.stderr


def test_forge_call_returns_the_rule(rv_project: Path) -> None:
    got = {case: forge.call(case[0], list(case[1])).exit_code for case in CASES}
    assert got == CASES
    assert forge.call("rv:none").output == "ran\n"
    assert forge.call("rv:sysexit", ["--code", "bye"]).output == "bye\n"


def test_worker_records_the_rule(rv_project: Path) -> None:
    q = CommandQueue()
    ids = {case: q.dispatch(QueuedCommand(case[0]).with_args(list(case[1]))) for case in CASES}
    res = subprocess.run([*forge_cmd(), "queue:work", "--stop-when-empty"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    got = {}
    for case, job_id in ids.items():
        info = q.backend.find(job_id)
        assert info is not None
        if info.state == State.DONE:
            got[case] = 0
        else:
            assert info.state == State.FAILED and info.failure is not None, (case, info.state)
            assert info.failure.reason == "exit_code", (case, info.failure.reason)
            got[case] = info.failure.exit_code
    assert got == CASES


def _closing(*fds: int) -> Any:
    """A preexec_fn that closes ``fds`` in the child, as ``forge ... >&-`` does."""
    return lambda: [os.close(fd) for fd in fds]


@pytest.mark.parametrize("closed", [(1,), (0, 1, 2)], ids=["stdout", "all"])
def test_a_dispatch_with_its_streams_closed_exits_0(rv_project: Path, closed: tuple[int, ...]) -> None:
    """``forge queue:dispatch ... >&-``: the job is queued, so the exit code is 0 (a retry would
    queue it twice) and the id goes nowhere, as with ``>/dev/null``; both the full command and
    the fast path (the second run)."""
    argv = [*forge_cmd(), "queue:dispatch", "rv:none"]
    codes = [subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, timeout=60, preexec_fn=_closing(*closed)).returncode
             for _ in range(2)]
    assert codes == [0, 0]
    assert sum(s.pending for s in CommandQueue().backend.stats()) == 2


def test_a_worker_with_stdout_closed_keeps_job_output_out_of_the_queue(rv_project: Path) -> None:
    """A worker started with fd 1 closed must not let the next file it opens take fd 1: its job
    processes would print into a queue file. The job runs, its output goes nowhere, and every
    file in the queue directory is still what forge wrote."""
    queue = CommandQueue()
    ids = [queue.dispatch(QueuedCommand("rv:none")) for _ in range(3)]
    res = subprocess.run([*forge_cmd(), "queue:work", "--stop-when-empty"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=120,
                         preexec_fn=_closing(1))
    assert res.returncode == 0, res.stderr
    assert [queue.backend.find(i).state for i in ids] == [State.DONE] * 3
    root = Path(os.environ["FORGE_QUEUE_DIR"])
    files = [p for p in root.rglob("*") if p.is_file()]
    assert [p for p in files if b"ran\n" in p.read_bytes() and p.parent.name != "logs"] == []
    assert [p.read_bytes() for p in files if p.parent.name == "logs"] == [b"ran\n"] * 3  # its log has it
