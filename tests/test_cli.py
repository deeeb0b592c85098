"""The ``forge`` executable: listing, running, help, exit codes, forge.call, make:command, init."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from conftest import ROOT, forge_cmd

import forge
from forge.cli.builtins import BUILTINS
from forge.cli.main import main
from forge.errors import UnknownCommand

CRASH = '''
from forge import command


@command("crash:now")
def now() -> None:
    """Raise an exception."""
    raise ValueError("the disk is on fire")
'''


def run(*args: str, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    """``forge ARGS`` in a fresh interpreter (the environment is the test's, plus ``env``)."""
    return subprocess.run(
        forge_cmd() + list(args), cwd=cwd or ROOT, env={**os.environ, **env},
        capture_output=True, text=True, timeout=60,
    )


def forge_main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- listing ---------------------------------------------------------------------------------


def test_list_groups_commands_by_namespace(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = forge_main(capsys, "list")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == f"forge {forge.__version__}"
    assert " import" in lines and " queue" in lines
    entry = next(line for line in lines if line.strip().startswith("import:data"))
    assert "Import users from a CSV file" in entry
    for name in ("list", "init", "make:command", "queue:work", "report:generate", "email:send"):
        assert any(line.split()[:1] == [name] for line in lines), name
    # namespace headers come before their commands
    assert lines.index(" import") < lines.index(entry)


def test_list_one_namespace(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = forge_main(capsys, "list", "queue")
    assert code == 0
    names = [line.split()[0] for line in out.splitlines()[1:]]
    assert names and all(n.startswith("queue:") for n in names)
    assert "queue:dispatch" in names


def test_list_unknown_namespace(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = forge_main(capsys, "list", "nope")
    assert code == 2 and 'no commands in the "nope" namespace' in err


def test_list_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = forge_main(capsys, "list", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["version"] == 1
    by_name = {c["name"]: c for c in data["commands"]}
    assert by_name["import:data"] == {
        "name": "import:data", "namespace": "import",
        "description": "Import users from a CSV file into storage/imports/<name>.jsonl.",
        "source": os.path.join("commands", "imports.py"), "builtin": False,
    }
    assert by_name["list"]["builtin"] is True
    assert set(BUILTINS) <= set(by_name)


@pytest.mark.parametrize("args", [["--help"], ["-h"], []])
def test_bare_forge_and_help_list_the_commands(capsys: pytest.CaptureFixture[str], args: list[str]) -> None:
    code, out, _ = forge_main(capsys, *args)
    assert code == 0 and "Available commands:" in out and "import:data" in out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert forge_main(capsys, "--version")[:2] == (0, f"forge {forge.__version__}\n")


# --- running ---------------------------------------------------------------------------------


def test_run_example_command_in_a_subprocess(tmp_path: Path) -> None:
    shutil.copy(ROOT / "users.csv", tmp_path / "users.csv")
    result = run("import:data", "users.csv", "--batch=2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "Imported 9 rows from users.csv (1 skipped)\n"
    assert (tmp_path / "storage" / "imports" / "users.jsonl").is_file()


def test_exception_is_one_line_and_exit_1(project: Path) -> None:
    (project / "commands" / "crash.py").write_text(CRASH)
    result = run("crash:now")
    assert result.returncode == 1
    assert result.stderr == (
        "Error: ValueError: the disk is on fire (run with -v for the traceback)\n"
    )


@pytest.mark.parametrize("flag", ["-v", "--verbose"])
def test_verbose_shows_the_traceback(project: Path, flag: str) -> None:
    (project / "commands" / "crash.py").write_text(CRASH)
    result = run(flag, "crash:now")
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert 'raise ValueError("the disk is on fire")' in result.stderr
    assert result.stderr.endswith("Error: ValueError: the disk is on fire\n")


def test_exit_code_is_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    assert forge_main(capsys, "demo:fail", "--code", "4")[0] == 4
    assert forge_main(capsys, "demo:sleep", "0")[0] == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["import:data"], "Missing argument"),
        (["email:send", "--user", "abc"], "Invalid value for '--user'"),
        (["email:send", "--user", "1", "--bogus"], "No such option: --bogus"),
        (["--bogus"], "No such option: --bogus"),
        (["cleanup:temp-files", "--older-than", "soon"], "Invalid --older-than 'soon'"),
    ],
)
def test_usage_error_exit_2(capsys: pytest.CaptureFixture[str], args: list[str], message: str) -> None:
    code, _, err = forge_main(capsys, *args)
    assert code == 2
    assert message in err and err.count("\n") == 1


def test_usage_error_in_a_subprocess() -> None:
    result = run("email:send")
    assert result.returncode == 2
    assert result.stderr == (
        "Error: Missing option '--user'. Run `forge email:send --help` for its usage.\n"
    )


def test_unknown_command_suggests_and_exits_1() -> None:
    result = run("imprt:data")
    assert result.returncode == 1
    assert result.stderr == 'Error: Command "imprt:data" is not defined. Did you mean "import:data"?\n'
    assert result.stdout == ""


def test_unknown_command_without_suggestion(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = forge_main(capsys, "zzzz")
    assert code == 1
    assert err == 'Error: Command "zzzz" is not defined. Run `forge list` to see the registered commands.\n'


@pytest.mark.parametrize("args", [["help", "import:data"], ["import:data", "--help"], ["import:data", "-h"]])
def test_command_help(capsys: pytest.CaptureFixture[str], args: list[str]) -> None:
    code, out, _ = forge_main(capsys, *args)
    assert code == 0
    assert out.startswith("Usage: forge import:data [OPTIONS]")
    assert "Import users from a CSV file" in out and "--batch" in out and "--dry-run" in out
    assert "╭" not in out  # no rich boxes when not a terminal


def test_help_for_unknown_command(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = forge_main(capsys, "help", "imprt:data")
    assert code == 1 and 'Did you mean "import:data"?' in err


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_every_builtin_help_runs(capsys: pytest.CaptureFixture[str], name: str) -> None:
    code, out, err = forge_main(capsys, name, "--help")
    assert code == 0, err
    assert out.startswith(f"Usage: forge {name}")


# --- forge.call ------------------------------------------------------------------------------


def test_call_returns_exit_code_and_output(tmp_path: Path) -> None:
    result = forge.call("import:data", [str(ROOT / "users.csv"), "--batch=2"])
    assert (result.exit_code, result.ok, result.error) == (0, True, None)
    assert result.output.startswith("users.csv:7: skipped invalid row")
    assert result.output.endswith("Imported 9 rows from users.csv (1 skipped)\n")


def test_call_reports_failures() -> None:
    crashed = forge.call("demo:fail")
    assert crashed.exit_code == 1
    assert crashed.error == "RuntimeError: demo:fail failed on purpose"
    assert "Traceback" in crashed.output
    assert forge.call("demo:fail", ["--code", "3"]).exit_code == 3
    usage = forge.call("email:send", ["--user", "x"])
    assert usage.exit_code == 2 and usage.error and "Invalid value for '--user'" in usage.error
    with pytest.raises(UnknownCommand, match='Did you mean "import:data"'):
        forge.call("imprt:data")
    with pytest.raises(TypeError):
        forge.call("demo:sleep", "0")  # type: ignore[arg-type]


def test_call_does_not_leak_between_calls(capsys: pytest.CaptureFixture[str]) -> None:
    streams = sys.stdout, sys.stderr
    first = forge.call("email:send", ["--user", "1", "--subject", "First"])
    second = forge.call("email:send", ["--user", "2"])  # subject back to its default
    assert first.output == "Queued email for user 1\n"
    assert second.output == "Queued email for user 2\n"
    outbox = Path(os.environ["FORGE_STORAGE"]) / "outbox.jsonl"
    subjects = [json.loads(line)["subject"] for line in outbox.read_text().splitlines()]
    assert subjects == ["First", "Hello from forge"]
    forge.call("demo:fail")
    assert forge.call("demo:sleep", ["0"]).output == "Sleeping 0 s\nDone\n"  # no earlier output
    assert (sys.stdout, sys.stderr) == streams  # restored after every call
    assert capsys.readouterr() == ("", "")  # nothing escaped to the real streams


# --- make:command and init -------------------------------------------------------------------


def test_make_command_writes_a_working_command(project: Path) -> None:
    made = run("make:command", "report:weekly", "--description", "Send the weekly report.")
    assert made.returncode == 0, made.stderr
    path = project / "commands" / "report_weekly.py"
    assert path.is_file() and str(path) in made.stderr
    assert '@command("report:weekly")' in path.read_text()

    listed = run("list", "report")
    assert "report:weekly" in listed.stdout and "Send the weekly report." in listed.stdout
    ran = run("report:weekly", "team", "--times", "2")
    assert (ran.returncode, ran.stdout) == (0, "report:weekly: hello, team!\n" * 2)
    assert "Send the weekly report." in run("report:weekly", "--help").stdout


def test_make_command_refuses_to_overwrite(project: Path) -> None:
    assert run("make:command", "report:weekly").returncode == 0
    path = project / "commands" / "report_weekly.py"
    path.write_text(path.read_text().replace("hello", "howdy"))

    again = run("make:command", "report:weekly")
    assert again.returncode == 2 and "already exists" in again.stderr
    assert "howdy" in path.read_text()

    forced = run("make:command", "report:weekly", "--force")
    assert forced.returncode == 0 and "howdy" not in path.read_text()


def test_make_command_refuses_a_file_that_exists_with_another_command(project: Path) -> None:
    (project / "commands" / "report_weekly.py").write_text("# not a command yet\n")
    result = run("make:command", "report:weekly")
    assert result.returncode == 2 and "--force" in result.stderr


@pytest.mark.parametrize("name", ["Report:Weekly", "report weekly", "a:b:c", ":x", "report:"])
def test_make_command_rejects_bad_names(project: Path, capsys: pytest.CaptureFixture[str], name: str) -> None:
    code, _, err = forge_main(capsys, "make:command", name)
    assert code == 2 and "Invalid command name" in err
    assert list((project / "commands").iterdir()) == []


def test_make_command_refuses_an_existing_name(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = forge_main(capsys, "make:command", "list")
    assert code == 2 and 'Command "list" already exists' in err


def test_init_creates_a_project(tmp_path: Path) -> None:
    new = tmp_path / "new"
    new.mkdir()
    result = run("init", cwd=new, FORGE_CONFIG="")
    assert result.returncode == 0, result.stderr
    data = tomllib.loads((new / "forge.toml").read_text())
    assert data["forge"]["commands"] == ["commands"]
    assert data["queue"]["connection"] == "file"
    assert (new / "commands").is_dir()

    # The new project works at once: a scaffolded command runs there.
    assert run("make:command", "hello:world", cwd=new, FORGE_CONFIG="").returncode == 0
    hello = run("hello:world", cwd=new, FORGE_CONFIG="")
    assert (hello.returncode, hello.stdout) == (0, "hello:world: hello, world!\n")


def test_init_into_a_named_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert forge_main(capsys, "init", str(tmp_path / "a" / "b"))[0] == 0
    assert (tmp_path / "a" / "b" / "forge.toml").is_file()


def test_init_refuses_to_clobber(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "forge.toml").write_text("# mine\n")
    code, _, err = forge_main(capsys, "init", str(tmp_path))
    assert code == 2 and "already exists" in err
    assert (tmp_path / "forge.toml").read_text() == "# mine\n"


RETURNS = '''
import typer
from forge import command


@command("ret:value")
def value(kind: str) -> object:
    """Return what KIND names."""
    if kind == "exit3":
        raise typer.Exit(3)
    return {"none": None, "true": True, "false": False, "int5": 5, "zero": 0, "text": "ok"}[kind]
'''


@pytest.mark.parametrize(("kind", "code"), [("none", 0), ("true", 0), ("false", 1), ("int5", 5),
                                            ("zero", 0), ("text", 0), ("exit3", 3)])
def test_a_return_value_means_one_exit_code_everywhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      kind: str, code: int) -> None:
    """``forge NAME``, ``forge.call`` and the worker read a command's return value by one rule
    (before, ``False`` exited 0 from the CLI but was a failure for forge.call and the worker)."""
    import subprocess
    import sys

    from conftest import make_project

    import forge
    from forge.job import State
    from forge.queue import CommandQueue, QueuedCommand

    config = make_project(tmp_path / "p", {"ret.py": RETURNS})
    monkeypatch.setenv("FORGE_CONFIG", str(config))
    import forge.registry.runner

    forge.registry.runner._default_registry = None
    cli = subprocess.run([sys.executable, "-m", "forge", "ret:value", kind], capture_output=True, text=True,
                         cwd=tmp_path / "p")
    assert cli.returncode == code, cli.stderr
    assert forge.call("ret:value", [kind]).exit_code == code
    job = CommandQueue().dispatch(QueuedCommand("ret:value").with_args([kind]))
    subprocess.run([sys.executable, "-m", "forge", "queue:work", "--stop-when-empty"], check=True,
                   capture_output=True, cwd=tmp_path / "p")
    info = CommandQueue().find(job)
    assert info is not None
    assert info.state == (State.DONE if code == 0 else State.FAILED)
    if code:
        assert info.failure is not None and info.failure.exit_code == code
