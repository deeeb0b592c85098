"""The Typer-free ``queue:dispatch``: the argument spec agrees with Click, the command cache
follows the project's files, and a fast dispatch queues exactly what the full one does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from forge.cli.fastpath import cache as cmdcache
from forge.cli.main import main
from forge.config import load_settings, user_dir
from forge.errors import EXIT_UNKNOWN_COMMAND, EXIT_USAGE, UsageError
from forge.queue.manager import connect
from forge.registry.argspec import accepts, describe
from forge.registry.runner import check_args, click_command
from forge.registry.spec import CommandSpec

Capsys = pytest.CaptureFixture[str]

SIGNATURES = '''
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from forge import command


class Colour(str, Enum):
    red = "red"
    green = "Green"


@command("sig:options")
def options(
    user: Annotated[int, typer.Option(min=1, max=10)],
    ratio: Annotated[float, typer.Option(min=0, max=1)] = 0.5,
    name: Annotated[str, typer.Option("--name", "-n")] = "x",
    force: bool = False,
    dry_run: Annotated[bool, typer.Option("--dry-run")] = False,
    colour: Colour = Colour.red,
    tag: Annotated[Optional[list[str]], typer.Option()] = None,
    limit: Optional[int] = None,
) -> None:
    """Options of every kind the spec models."""


@command("sig:args")
def arguments(
    first: Annotated[str, typer.Argument()],
    count: Annotated[int, typer.Argument()] = 1,
    loud: bool = False,
) -> None:
    """Positional arguments, one optional."""


@command("sig:many")
def many(files: Annotated[list[str], typer.Argument()], verbose: bool = False) -> None:
    """A variadic argument."""


@command("sig:path")
def path(
    src: Annotated[Path, typer.Argument(exists=True, file_okay=True, dir_okay=False)],
    out: Annotated[Optional[Path], typer.Option(dir_okay=False)] = None,
) -> None:
    """Path checks look at the disk."""


@command("sig:choice")
def choice(colour: Annotated[Colour, typer.Option(case_sensitive=False)] = Colour.red) -> None:
    """A case-insensitive choice."""


@command("sig:defaults")
def defaults(
    cfg: Annotated[Path, typer.Option(exists=True, dir_okay=False)] = Path("src.txt"),
    n: Annotated[int, typer.Option(min=1, max=5)] = 3,
) -> None:
    """Defaults Click checks when the option is not given (the path one against the disk)."""


@command("sig:bad-default")
def bad_default(n: Annotated[int, typer.Option(min=1, max=5)] = 9) -> None:
    """A default out of its own range: Click refuses the command without --n."""


@command("sig:callback")
def callback(value: Annotated[str, typer.Option(callback=lambda v: v)] = "") -> None:
    """A parameter callback: not modelled, always the full path."""
'''

TOKENS = ["--user", "--user=3", "--user=0", "--user=11", "5", "0", "-1", "abc", "--ratio", "--ratio=1",
          "0.99", "nan", "--name", "-n", "-n=x", "--force", "--no-force", "--force=1", "--dry-run",
          "--no-dry-run", "--colour", "red", "Green", "green", "RED", "--tag", "--limit", "--limit=",
          "--", "-", "--help", "-h", "--unknown", "x", "", " 7 ", "--loud", "--verbose", "--out",
          "--colour=GREEN", "src.txt", "missing.txt", "adir", "--user=+4", "1_0", "--user=٣"]


@pytest.fixture
def sig_project(project: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (project / "commands" / "sig.py").write_text(SIGNATURES)
    (project / "src.txt").write_text("data")
    (project / "adir").mkdir()
    monkeypatch.chdir(project)
    return project


def _spec_and_click(name: str) -> tuple[dict[str, Any] | None, CommandSpec]:
    from forge.registry.runner import default_registry

    spec = default_registry().resolve(name)
    return describe(click_command(spec)), spec


def _click_accepts(spec: CommandSpec, args: list[str]) -> bool:
    try:
        check_args(spec, args)
    except UsageError:
        return False
    return True


@pytest.mark.parametrize("name", ["sig:options", "sig:args", "sig:many", "sig:path", "sig:choice", "sig:defaults"])
def test_spec_never_accepts_what_click_refuses(sig_project: Path, name: str) -> None:
    described, spec = _spec_and_click(name)
    assert described is not None
    agreed = {"accepted": 0}

    @settings(max_examples=400, deadline=None, derandomize=True)
    @given(st.lists(st.sampled_from(TOKENS), max_size=6))
    def check(args: list[str]) -> None:
        if accepts(described, args):
            assert _click_accepts(spec, args), args
            agreed["accepted"] += 1

    check()
    assert agreed["accepted"] > 0  # the fast path is actually taken for some argument lists


@pytest.mark.parametrize(("name", "args"), [
    ("sig:options", ["--user", "3"]),
    ("sig:options", ["--user=10", "--ratio", "0.99", "-n", "y", "--force", "--dry-run", "--colour", "Green",
                     "--tag", "a", "--tag", "b", "--limit", "4"]),
    ("sig:options", ["--no-force", "--user", " 7 "]),
    ("sig:args", ["a"]), ("sig:args", ["a", "2", "--loud"]), ("sig:args", ["--loud", "a"]),
    ("sig:many", ["a", "b", "c"]),
    ("sig:path", ["src.txt"]), ("sig:path", ["src.txt", "--out", "new.txt"]),
    ("sig:choice", ["--colour", "GREEN"]),
    ("sig:defaults", []), ("sig:defaults", ["--n", "5"]),
])
def test_spec_accepts_plain_argument_lists(sig_project: Path, name: str, args: list[str]) -> None:
    described, spec = _spec_and_click(name)
    assert described is not None and accepts(described, args)
    assert _click_accepts(spec, args)


@pytest.mark.parametrize(("name", "args"), [
    ("sig:options", []), ("sig:options", ["--user", "0"]), ("sig:options", ["--user", "3", "--ratio", "1.5"]),
    ("sig:options", ["--user", "3", "--colour", "blue"]), ("sig:options", ["--user", "3", "--force=yes"]),
    ("sig:args", []), ("sig:args", ["a", "b"]), ("sig:args", ["a", "1", "extra"]),
    ("sig:many", []), ("sig:path", ["missing.txt"]), ("sig:path", ["adir"]),
    ("sig:path", ["src.txt", "--out", "adir"]),
])
def test_spec_refuses_what_click_refuses(sig_project: Path, name: str, args: list[str]) -> None:
    described, spec = _spec_and_click(name)
    assert described is not None and not accepts(described, args)
    assert not _click_accepts(spec, args)


def test_parameter_callbacks_and_bad_defaults_are_not_modelled(sig_project: Path) -> None:
    assert _spec_and_click("sig:callback")[0] is None
    assert _spec_and_click("sig:bad-default")[0] is None
    assert not _click_accepts(_spec_and_click("sig:bad-default")[1], [])


def test_a_default_path_is_checked_where_the_dispatch_runs(sig_project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    described, spec = _spec_and_click("sig:defaults")
    assert described is not None and accepts(described, [])
    monkeypatch.chdir(sig_project / "adir")  # no src.txt here: Click refuses the default
    assert not accepts(described, []) and not _click_accepts(spec, [])
    assert accepts(described, ["--cfg", "../src.txt"])


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=dict(os.environ),
                          capture_output=True, text=True, timeout=60)


PROBE = ("import sys, json; from forge.cli.main import main; code = main(sys.argv[1:]);"
         " print(json.dumps({'code': code, 'typer': 'typer' in sys.modules}))")


def _dispatch_probe(cwd: Path, *args: str) -> tuple[dict[str, Any], str]:
    res = subprocess.run([sys.executable, "-c", PROBE, "queue:dispatch", *args], cwd=cwd,
                         env=dict(os.environ), capture_output=True, text=True, timeout=60)
    lines = res.stdout.splitlines()
    return json.loads(lines[-1]), "\n".join(lines[:-1]) + res.stderr


def test_second_dispatch_skips_typer_and_queues_the_same_job(tmp_path: Path) -> None:
    first, _ = _dispatch_probe(tmp_path, "--queue=high", "--tries", "3", "email:send", "--user", "7")
    second, _ = _dispatch_probe(tmp_path, "--queue=high", "--tries", "3", "email:send", "--user", "7")
    assert first == {"code": 0, "typer": True}  # no cache yet: the full command, which saves it
    assert second == {"code": 0, "typer": False}
    jobs = [j.job for j in connect().jobs(queue="high")]
    assert len(jobs) == 2
    a, b = (j.to_dict() for j in jobs)
    for d in (a, b):
        for key in ("id", "dispatched_at", "available_at"):
            d.pop(key, None)
    assert a == b and a["args"] == ["--user", "7"] and a["max_attempts"] == 3


def test_every_dispatch_option_gives_the_same_job_both_ways(tmp_path: Path, capsys: Capsys) -> None:
    def args(key: str) -> list[str]:
        return ["--queue", "low", "--delay=5m", "--timeout", "90s", "--backoff", "1,5", "--meta", "tenant=acme",
                "--meta=n=3", "--unique-key", key, "--unique-ttl", "1h", "--json", "email:send", "--", "--user=2"]

    assert main(["queue:dispatch", *args("k1")]) == 0  # no cache yet: the full Typer command
    slow = json.loads(capsys.readouterr().out)
    res, out = _dispatch_probe(tmp_path, *args("k2"))
    assert res == {"code": 0, "typer": False}, out
    fast = json.loads(out[: out.rindex("}") + 1])
    assert set(slow) == set(fast) and fast["queue"] == "low" and fast["scheduled_at"]
    jobs = {j.job.unique_key: j.job.to_dict() for j in connect().jobs(queue="low")}
    one, two = jobs["k1"], jobs["k2"]
    for d in (one, two):
        for key in ("id", "dispatched_at", "available_at", "unique_key"):
            d.pop(key, None)
    assert one == two and one["metadata"] == {"tenant": "acme", "n": 3} and one["backoff"] == [1.0, 5.0]
    assert one["args"] == ["--user=2"]


def test_an_idempotency_key_is_honoured_on_both_paths(tmp_path: Path, capsys: Capsys) -> None:
    args = ["--json", "--idempotency-key", "welcome-7", "email:send", "--user=7"]
    assert main(["queue:dispatch", *args]) == 0  # no cache yet: the full Typer command
    slow = json.loads(capsys.readouterr().out)
    res, out = _dispatch_probe(tmp_path, *args)
    assert res == {"code": 0, "typer": False}, out
    fast = json.loads(out[: out.rindex("}") + 1])
    assert slow["created"] is True and fast["created"] is False and fast["id"] == slow["id"]
    res, out = _dispatch_probe(tmp_path, "--idempotency-key=welcome-8", "email:send", "--user=8")
    assert res == {"code": 0, "typer": False}, out
    assert sum(s.pending for s in connect().stats()) == 2


@pytest.mark.parametrize(("args", "needle"), [
    (["email:send", "--user", "0"], "--user"),
    (["email:send", "--usr", "1"], "No such option"),
    (["--delay=5x", "email:send", "--user", "1"], "--delay"),
    (["--tries=0", "email:send", "--user", "1"], "--tries"),
    (["--queue=../x", "email:send", "--user", "1"], "Invalid queue name"),
])
def test_errors_are_the_full_commands_after_the_cache_exists(capsys: Capsys, args: list[str], needle: str) -> None:
    assert main(["queue:dispatch", "email:send", "--user", "1"]) == 0  # writes the cache
    capsys.readouterr()
    assert main(["queue:dispatch", *args]) == EXIT_USAGE
    out = capsys.readouterr()
    assert out.out == "" and needle in out.err
    assert sum(s.pending for s in connect().stats()) == 1


def test_cache_follows_changes_to_the_command_files(project: Path) -> None:
    source = "from forge import command\n\n@command('app:go')\ndef go(n: int = 1) -> None:\n    pass\n"
    (project / "commands" / "app.py").write_text(source)
    assert _dispatch_probe(project, "app:go", "--n", "2")[0] == {"code": 0, "typer": True}
    assert _dispatch_probe(project, "app:go", "--n", "2")[0] == {"code": 0, "typer": False}
    # The option is renamed: the cached spec must not let the old name through.
    (project / "commands" / "app.py").write_text(source.replace("n: int", "count: int"))
    assert cmdcache.load(load_settings()) is None
    res, err = _dispatch_probe(project, "app:go", "--n", "2")
    assert res["code"] == EXIT_USAGE and "No such option" in err
    assert _dispatch_probe(project, "app:go", "--count", "2")[0] == {"code": 0, "typer": True}
    assert _dispatch_probe(project, "app:go", "--count", "2")[0] == {"code": 0, "typer": False}
    # A new helper file (even a private one) also invalidates it.
    (project / "commands" / "_helpers.py").write_text("X = 1\n")
    assert cmdcache.load(load_settings()) is None
    assert sum(s.pending for s in connect().stats()) == 4


def test_cache_follows_project_modules_outside_the_command_folders(project: Path) -> None:
    (project / "app").mkdir()
    (project / "app" / "__init__.py").write_text("")
    (project / "app" / "catalog.py").write_text('KINDS = ["sales", "stock"]\n')
    (project / "commands" / "reports.py").write_text(
        "from app.catalog import KINDS\nfrom forge import command\n\n"
        "for kind in KINDS:\n    globals()['report_' + kind] = command(f'report:{kind}')(lambda: None)\n")
    assert _dispatch_probe(project, "report:stock")[0] == {"code": 0, "typer": True}
    assert _dispatch_probe(project, "report:stock")[0] == {"code": 0, "typer": False}
    (project / "app" / "catalog.py").write_text('KINDS = ["sales"]\n')
    res, err = _dispatch_probe(project, "report:stock")
    assert res["code"] == EXIT_UNKNOWN_COMMAND, err  # never queued for a command that is gone
    assert sum(s.pending for s in connect().stats()) == 2


def _plant(settings_: Any, commands: Any, *, mode: int = 0o600) -> Path:
    path = cmdcache.cache_file(settings_)
    data = {"fingerprint": cmdcache.fingerprint(settings_), "modules": [], "commands": commands}
    path.write_text(json.dumps(data))
    path.chmod(mode)
    return path


@pytest.mark.parametrize("spec", [{"v": 2}, {"v": 2, "options": 5, "arguments": []},
                                  {"v": 2, "interspersed": True, "options": [{"opts": ["--user"]}], "arguments": []}])
def test_a_malformed_cached_spec_falls_back_to_the_full_check(capsys: Capsys, spec: Any) -> None:
    assert main(["queue:dispatch", "email:send", "--user", "1"]) == 0
    _plant(load_settings(), {"email:send": {"source": "x", "args": spec}})
    assert main(["queue:dispatch", "email:send", "--user", "2"]) == 0
    capsys.readouterr()
    assert main(["queue:dispatch", "email:send", "--user", "0"]) == EXIT_USAGE
    assert sum(s.pending for s in connect().stats()) == 2


def test_a_cache_naming_builtins_or_bad_names_is_not_trusted_for_them(capsys: Capsys) -> None:
    assert main(["queue:dispatch", "email:send", "--user", "1"]) == 0
    anything = {"v": 2, "interspersed": True, "options": [], "arguments": []}
    _plant(load_settings(), {"queue:list": {"args": anything}, "Bad/../x": {"args": anything},
                             "not:registered": {"args": anything}})
    commands = cmdcache.load(load_settings())
    assert commands is not None and set(commands) == {"not:registered"}
    capsys.readouterr()
    assert main(["queue:dispatch", "queue:list"]) == 0  # the full path queues the built-in...
    assert main(["queue:dispatch", "Bad/../x"]) == EXIT_UNKNOWN_COMMAND  # ...and refuses this


@pytest.mark.parametrize("how", ["group-writable file", "world-writable dir", "fifo", "symlink"])
def test_a_cache_someone_else_could_write_is_ignored(tmp_path: Path, how: str) -> None:
    settings_ = load_settings()
    anything = {"v": 2, "interspersed": True, "options": [], "arguments": []}
    path = cmdcache.cache_file(settings_)
    path.parent.mkdir(parents=True, mode=0o700)
    if how == "fifo":
        os.mkfifo(path, 0o600)
    elif how == "symlink":
        real = _plant(settings_, {"ghost:cmd": {"args": anything}})
        real.rename(tmp_path / "elsewhere.json")
        path.symlink_to(tmp_path / "elsewhere.json")
    else:
        _plant(settings_, {"ghost:cmd": {"args": anything}},
               mode=0o620 if how == "group-writable file" else 0o600)
        if how == "world-writable dir":
            path.parent.chmod(0o777)
    assert cmdcache.load(settings_) is None
    res, err = _dispatch_probe(tmp_path, "ghost:cmd")
    assert res["code"] == EXIT_UNKNOWN_COMMAND, err


@pytest.mark.parametrize("content", ["", "{", '{"fingerprint": 1}', "[]", '{"fingerprint": null, "commands": 5}'])
def test_a_corrupt_cache_is_ignored_and_rewritten(capsys: Capsys, content: str) -> None:
    assert main(["queue:dispatch", "email:send", "--user", "1"]) == 0
    path = cmdcache.cache_file(load_settings())
    path.write_text(content)
    assert main(["queue:dispatch", "email:send", "--user", "1"]) == 0
    assert cmdcache.load(load_settings()) is not None
    assert sum(s.pending for s in connect().stats()) == 2


def test_cache_file_is_private(capsys: Capsys) -> None:
    assert main(["queue:dispatch", "email:send", "--user", "1"]) == 0
    path = cmdcache.cache_file(load_settings())
    assert path.stat().st_mode & 0o077 == 0 and path.parent.stat().st_mode & 0o077 == 0


@pytest.mark.parametrize("env", [{}, {"XDG_DATA_HOME": "/tmp/xdg-data", "XDG_CACHE_HOME": "/tmp/xdg-cache"},
                                 {"XDG_DATA_HOME": "relative", "XDG_CACHE_HOME": ""},
                                 {"HOME": ""}, {"HOME": "rel/home"}, {"HOME": "/tmp/elsewhere"}])
def test_user_dirs_match_platformdirs(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    import platformdirs

    for key in ("XDG_DATA_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert user_dir("data") == platformdirs.user_data_path("forge", appauthor=False)
    assert user_dir("cache") == platformdirs.user_cache_path("forge", appauthor=False)


def test_the_forge_process_exits_cleanly_after_a_fast_dispatch(tmp_path: Path) -> None:
    """The fast path ends the process without the interpreter's teardown: its output, exit code
    and job must be complete all the same."""
    argv = [sys.executable, "-m", "forge", "queue:dispatch", "--json", "email:send", "--user", "3"]
    runs = [subprocess.run(argv, cwd=tmp_path, env=dict(os.environ), capture_output=True, text=True, timeout=60)
            for _ in range(3)]  # the first takes the full path and writes the cache
    assert [r.returncode for r in runs] == [0, 0, 0], runs[-1].stderr
    ids = [json.loads(r.stdout)["id"] for r in runs]
    assert {j.id for j in connect().jobs(queue="default")} == set(ids)
    dup = [sys.executable, "-m", "forge", "queue:dispatch", "--unique-key=k", "email:send", "--user", "3"]
    first, second = (subprocess.run(dup, cwd=tmp_path, env=dict(os.environ), capture_output=True, text=True,
                                    timeout=60) for _ in range(2))
    assert first.returncode == 0 and second.returncode == 4 and "k" in second.stderr


def test_a_fast_dispatch_with_stderr_closed_exits_0(tmp_path: Path) -> None:
    """cron may close stderr: the job is queued, so the exit code must say so (a retry would
    queue it twice)."""
    argv = [sys.executable, "-m", "forge", "queue:dispatch", "email:send", "--user", "3"]
    codes = []
    for _ in range(2):  # the second takes the fast path
        res = subprocess.run(argv, cwd=tmp_path, env=dict(os.environ), stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, timeout=60,
                             preexec_fn=lambda: os.close(2))
        codes.append(res.returncode)
    assert codes == [0, 0]
    assert sum(s.pending for s in connect().stats()) == 2
