"""Start-up cost: heavy modules and the plugin scan stay off the paths that do not need them.

Each case runs a fresh interpreter with stdout on a pipe (not a terminal), plugins enabled.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

import forge

HEAVY = ("redis", "rich", "tomli_w", "pydantic")

PROBE = """
import importlib.metadata as metadata, json, sys
scans = []
real = metadata.entry_points
def spy(*args, **kwargs):
    scans.append(kwargs.get("group"))
    return real(*args, **kwargs)
metadata.entry_points = spy
report_path, *argv = sys.argv[1:]
if argv == ["<import forge>"]:
    import forge
    code = 0
else:
    from forge.cli.main import main
    code = main(argv)
with open(report_path, "w") as fh:
    json.dump({"code": code, "modules": sorted(sys.modules), "scans": scans}, fh)
"""


def probe(tmp_path: Path, *argv: str) -> dict[str, object]:
    report = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "FORGE_NO_PLUGINS"}
    result = subprocess.run(
        [sys.executable, "-c", PROBE, str(report), *argv],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(report.read_text())
    assert data["code"] == 0, result.stderr
    return data


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        [],
        ["email:send", "--user", "1"],
        ["demo:sleep", "0"],
        ["import:data", "--help"],
        ["help", "report:generate"],
        ["config:show"],
        ["<import forge>"],
    ],
    ids=lambda argv: " ".join(argv) or "(no arguments)",
)
def test_no_heavy_imports_and_no_plugin_scan(tmp_path: Path, argv: list[str]) -> None:
    data = probe(tmp_path, *argv)
    modules = set(data["modules"])  # type: ignore[arg-type]
    assert not {m for m in HEAVY if m in modules}, f"forge {' '.join(argv)} imported heavy modules"
    assert data["scans"] == [], f"forge {' '.join(argv)} scanned the installed plugins"


def test_import_forge_does_not_import_typer(tmp_path: Path) -> None:
    modules = set(probe(tmp_path, "<import forge>")["modules"])  # type: ignore[arg-type]
    assert "typer" not in modules and "forge.config" not in modules


def test_the_probe_sees_a_plugin_scan(tmp_path: Path) -> None:
    """`forge list` shows plugins, so it must scan: proves the spy above works."""
    assert probe(tmp_path, "list")["scans"] == ["forge.commands"]


def test_example_commands_import_only_cheap_modules() -> None:
    """Command files are imported on every run: stdlib, typer and forge only at module level."""
    allowed = set(sys.stdlib_module_names) | {"typer", "forge", "__future__"}
    for file in sorted((ROOT / "commands").glob("*.py")):
        tree = ast.parse(file.read_text())
        for node in tree.body:
            if isinstance(node, ast.Import):
                roots = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                roots = [(node.module or "").split(".")[0]]
            else:
                continue
            assert set(roots) <= allowed, f"{file.name} imports {roots} at module level"


def test_small_command_skips_queue_only_work(tmp_path: Path) -> None:
    """The default queue folder (platformdirs + a hash) is worked out only when a queue is used."""
    modules = set(probe(tmp_path, "email:send", "--user", "1")["modules"])  # type: ignore[arg-type]
    assert not modules & {"platformdirs", "hashlib"}


@pytest.mark.parametrize("argv", [["--version"], ["-v", "--version"]])
def test_version_does_not_import_typer(tmp_path: Path, argv: list[str]) -> None:
    """`forge --version` prints the version without building the Typer app (or the registry)."""
    modules = set(probe(tmp_path, *argv)["modules"])  # type: ignore[arg-type]
    assert not modules & {"typer", "click", "forge.cli.app", "forge.registry.discovery"}
    assert not {m for m in HEAVY if m in modules}
    out = subprocess.run([sys.executable, "-m", "forge", *argv], cwd=tmp_path, capture_output=True, text=True,
                         timeout=60)
    assert (out.returncode, out.stdout, out.stderr) == (0, f"forge {forge.__version__}\n", "")


def test_version_beside_a_command_is_typers_answer(tmp_path: Path) -> None:
    """Typer resolves a command named beside --version first: an unknown one is still an error."""
    out = subprocess.run([sys.executable, "-m", "forge", "--version", "nope:cmd"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and 'Command "nope:cmd" is not defined' in out.stderr


def test_dispatch_imports_neither_typer_nor_the_dispatch_command(tmp_path: Path) -> None:
    """A fast dispatch reads the one options table, never the Typer command built from it."""
    probe(tmp_path, "queue:dispatch", "email:send", "--user", "1")  # no cache yet: the full command saves it
    modules = set(probe(tmp_path, "queue:dispatch", "email:send", "--user", "1")["modules"])  # type: ignore[arg-type]
    assert "forge.cli.dispatch_options" in modules
    assert not modules & {"typer", "forge.cli.builtins.dispatch", "forge.cli.app"}


#: Parts of the file backend (and what they import) that storing a job does not need.
DISPATCH_UNNEEDED = {"forge.backends.file.admin", "forge.backends.file.claim", "forge.backends.file.upkeep",
                     "forge.backends.file.limits", "forge.limits.spec", "forge.stats.journal"}


def test_dispatch_imports_only_the_file_backends_dispatch_half(tmp_path: Path) -> None:
    """queue:dispatch stores the job through the file backend's store alone: the admin half,
    claiming, upkeep and limits stay unimported, on the full path (which writes the command
    cache) and on the fast path after it."""
    for _ in range(2):
        modules = set(probe(tmp_path, "queue:dispatch", "demo:sleep", "0")["modules"])  # type: ignore[arg-type]
        assert "forge.backends.file.store" in modules  # the job went through the file backend
        assert not modules & DISPATCH_UNNEEDED, f"queue:dispatch imported {sorted(modules & DISPATCH_UNNEEDED)}"
