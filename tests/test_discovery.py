"""Finding commands: built-ins, the project's command folders, and plugins (entry points)."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from conftest import forge_cmd, make_project

from forge.config import load_settings
from forge.errors import DiscoveryError
from forge.registry.builtins import BUILTINS
from forge.registry.discovery import PluginWarning, build_registry, plugin_specs

HELLO = '''
from typing import Annotated

import typer

from forge import command


@command("greet:hello")
def hello(name: Annotated[str, typer.Argument()] = "world") -> None:
    """Say hello."""
    print(f"hello {name}")
'''


def registry_for(root: Path, env: dict[str, str] | None = None):
    env = {"FORGE_CONFIG": str(root / "forge.toml"), "FORGE_QUEUE_DIR": str(root / "q"), **(env or {})}
    return build_registry(load_settings(env=env))


def test_project_commands_are_found_beside_builtins(tmp_path: Path) -> None:
    make_project(tmp_path, {"greet.py": HELLO})
    registry = registry_for(tmp_path)
    spec = registry.resolve("greet:hello")
    assert spec.source == os.path.join("commands", "greet.py")
    assert spec.description == "Say hello."
    assert not spec.builtin
    assert set(BUILTINS) <= {s.name for s in registry}


def test_subfolders_are_searched_and_private_files_skipped(tmp_path: Path) -> None:
    make_project(
        tmp_path,
        {
            "sub/deep.py": HELLO.replace("greet:hello", "deep:cmd"),
            "_helpers.py": HELLO.replace("greet:hello", "private:cmd"),
            ".hidden/x.py": "raise RuntimeError('never imported')",
        },
    )
    names = {s.name for s in registry_for(tmp_path)}
    assert "deep:cmd" in names and "private:cmd" not in names


def test_command_folders_come_from_forge_toml(tmp_path: Path) -> None:
    make_project(tmp_path, toml='[forge]\ncommands = ["cmds", "more"]\n')
    for folder, name in (("cmds", "a:one"), ("more", "b:two")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "m.py").write_text(HELLO.replace("greet:hello", name))
    names = {s.name for s in registry_for(tmp_path)}
    assert {"a:one", "b:two"} <= names


def test_commands_imported_into_a_command_file_are_not_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "shared_cmds.py").write_text(HELLO)
    monkeypatch.syspath_prepend(str(tmp_path / "lib"))
    monkeypatch.delitem(sys.modules, "shared_cmds", raising=False)
    make_project(tmp_path, {"a.py": "from shared_cmds import hello  # noqa: F401\n"})
    assert registry_for(tmp_path).get("greet:hello") is None


def test_invalid_name_error_names_the_file(tmp_path: Path) -> None:
    make_project(tmp_path, {"bad.py": HELLO.replace("greet:hello", "Greet Hello")})
    with pytest.raises(DiscoveryError, match=r"commands/bad\.py: invalid command name 'Greet Hello'"):
        registry_for(tmp_path)


def test_duplicate_name_error_names_both_files(tmp_path: Path) -> None:
    make_project(tmp_path, {"one.py": HELLO, "two.py": HELLO})
    with pytest.raises(DiscoveryError) as info:
        registry_for(tmp_path)
    message = str(info.value)
    assert '"greet:hello" is defined twice' in message
    assert "commands/one.py" in message and "commands/two.py" in message


def test_project_command_cannot_shadow_a_builtin(tmp_path: Path) -> None:
    make_project(tmp_path, {"mine.py": HELLO.replace("greet:hello", "list")})
    with pytest.raises(DiscoveryError, match=r"forge \(built-in\) and in commands/mine\.py"):
        registry_for(tmp_path)


def test_broken_command_file_error_names_the_file(tmp_path: Path) -> None:
    make_project(tmp_path, {"broken.py": "import no_such_module_here\n"})
    with pytest.raises(DiscoveryError, match=r"commands/broken\.py: failed to import: ModuleNotFoundError"):
        registry_for(tmp_path)


def test_missing_command_folder_is_not_an_error(tmp_path: Path) -> None:
    make_project(tmp_path, toml='[forge]\ncommands = ["nowhere"]\n')
    assert "list" in registry_for(tmp_path)


# --- plugins ---------------------------------------------------------------------------------

PLUGIN = HELLO.replace("greet:hello", "plug:hello").replace("Say hello.", "Hello from a plugin.")


def make_site(root: Path, entry_points: dict[str, str], modules: dict[str, str]) -> Path:
    """A directory that looks like site-packages with one distribution, ``fake-plugin``."""
    site = root / "site"
    info = site / "fake_plugin-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-plugin\nVersion: 1.0\n")
    lines = ["[forge.commands]"] + [f"{k} = {v}" for k, v in entry_points.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    for name, source in modules.items():
        (site / f"{name}.py").write_text(source)
    return site


@pytest.fixture
def plugin_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    site = make_site(
        tmp_path,
        {"good": "fake_good", "broken": "fake_broken", "one": "fake_one:single"},
        {
            "fake_good": PLUGIN,
            "fake_broken": "raise ImportError('boom')\n",
            "fake_one": PLUGIN.replace("plug:hello", "plug:single").replace("def hello", "def single"),
        },
    )
    monkeypatch.syspath_prepend(str(site))
    for name in ("fake_good", "fake_broken", "fake_one"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    return site


def test_plugin_module_and_function_entry_points_load(plugin_site: Path) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        specs = {s.name: s for s in plugin_specs()}
    assert specs["plug:hello"].source == "plugin fake-plugin (fake_good)"
    assert specs["plug:single"].description == "Hello from a plugin."
    (warning,) = [w for w in caught if issubclass(w.category, PluginWarning)]
    assert "fake-plugin (broken = fake_broken) failed to load: ImportError: boom" in str(warning.message)


def test_plugins_load_only_on_a_miss_or_listing(plugin_site: Path, tmp_path: Path) -> None:
    make_project(tmp_path, {"greet.py": HELLO})
    registry = registry_for(tmp_path)
    assert "fake_good" not in sys.modules
    assert registry.get("greet:hello") is not None
    assert "fake_good" not in sys.modules
    with pytest.warns(PluginWarning):
        assert registry.get("plug:hello") is not None
    assert "fake_good" in sys.modules


def test_plugins_switched_off_by_env(plugin_site: Path, tmp_path: Path) -> None:
    make_project(tmp_path)
    registry = registry_for(tmp_path, {"FORGE_NO_PLUGINS": "1"})
    assert registry.get("plug:hello") is None
    assert "fake_good" not in sys.modules


def test_plugins_switched_off_by_config(plugin_site: Path, tmp_path: Path) -> None:
    make_project(tmp_path, toml="[forge]\nplugins = false\n")
    assert registry_for(tmp_path).get("plug:hello") is None


def run_forge(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k != "FORGE_NO_PLUGINS"}
    full_env.update(env)
    return subprocess.run(
        forge_cmd() + args, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=60
    )


def test_broken_plugin_is_a_warning_and_the_rest_works(tmp_path: Path) -> None:
    site = make_site(
        tmp_path, {"good": "fake_good", "broken": "fake_broken"},
        {"fake_good": PLUGIN, "fake_broken": "raise ImportError('boom')\n"},
    )
    config = make_project(tmp_path / "proj", {"greet.py": HELLO})
    env = {"PYTHONPATH": str(site), "FORGE_CONFIG": str(config)}

    listed = run_forge(["list"], tmp_path, **env)
    assert listed.returncode == 0, listed.stderr
    assert "plug:hello" in listed.stdout and "greet:hello" in listed.stdout
    assert "Warning: Plugin fake-plugin (broken = fake_broken) failed to load" in listed.stderr

    ran = run_forge(["plug:hello", "you"], tmp_path, **env)
    assert (ran.returncode, ran.stdout) == (0, "hello you\n")

    # A project command needs no plugin scan: no warning.
    own = run_forge(["greet:hello"], tmp_path, **env)
    assert (own.returncode, own.stdout, own.stderr) == (0, "hello world\n", "")

    off = run_forge(["list"], tmp_path, FORGE_NO_PLUGINS="1", **env)
    assert off.returncode == 0 and "plug:hello" not in off.stdout and off.stderr == ""
