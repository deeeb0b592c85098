"""Settings: defaults, forge.toml (found by walking up, or FORGE_CONFIG), FORGE_* overrides."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import EXAMPLE_CONFIG

from forge.cli.main import main
from forge.config import default_queue_dir, find_config, load_settings, mask_url
from forge.errors import ConfigError


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_defaults_without_a_config_file(tmp_path: Path) -> None:
    s = load_settings(cwd=tmp_path, env={})
    assert s.config_file is None and s.root == tmp_path
    assert s.command_paths == (tmp_path / "commands",)
    assert (s.plugins, s.connection, s.default_queue, s.tries) == (True, "file", "default", 1)
    assert (s.timeout, s.backoff, s.done_retention) == (60.0, (0.0,), 3600.0)
    assert s.sources["queue.tries"] == "default"
    assert set(s.connections) == {"file", "redis"}


def test_config_is_found_by_walking_up(tmp_path: Path) -> None:
    config = write(tmp_path / "proj" / "forge.toml", "[queue]\ntries = 4\n")
    deep = tmp_path / "proj" / "a" / "b"
    deep.mkdir(parents=True)
    s = load_settings(cwd=deep, env={})
    assert s.config_file == config and s.root == config.parent
    assert s.tries == 4 and s.sources["queue.tries"] == str(config)
    assert s.command_paths == (config.parent / "commands",)


def test_forge_config_names_the_file(tmp_path: Path) -> None:
    write(tmp_path / "forge.toml", "[queue]\ntries = 2\n")
    other = write(tmp_path / "elsewhere" / "custom.toml", "[queue]\ntries = 9\n")
    s = load_settings(cwd=tmp_path, env={"FORGE_CONFIG": str(other)})
    assert s.config_file == other and s.tries == 9 and s.root == other.parent


def test_forge_config_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="FORGE_CONFIG names .*missing.toml, which is not a file"):
        find_config(tmp_path, {"FORGE_CONFIG": str(tmp_path / "missing.toml")})


def test_example_config_loads() -> None:
    s = load_settings(env={"FORGE_CONFIG": str(EXAMPLE_CONFIG)})
    assert (s.tries, s.timeout, s.backoff) == (3, 600.0, (1.0, 5.0, 10.0))
    assert s.connection_config("redis").url == "redis://127.0.0.1:6379/0"


@pytest.mark.parametrize(
    ("var", "value", "key", "attr", "expected"),
    [
        ("FORGE_QUEUE_TRIES", "5", "queue.tries", "tries", 5),
        ("FORGE_QUEUE_TIMEOUT", "2m", "queue.timeout", "timeout", 120.0),
        ("FORGE_QUEUE_BACKOFF", "1,2,30s", "queue.backoff", "backoff", (1.0, 2.0, 30.0)),
        ("FORGE_QUEUE_DEFAULT", "emails", "queue.default", "default_queue", "emails"),
        ("FORGE_QUEUE_CONNECTION", "redis", "queue.connection", "connection", "redis"),
        ("FORGE_QUEUE_DONE_RETENTION", "2h", "queue.done_retention", "done_retention", 7200.0),
        ("FORGE_NO_PLUGINS", "1", "forge.plugins", "plugins", False),
    ],
)
def test_env_overrides_the_file(
    tmp_path: Path, var: str, value: str, key: str, attr: str, expected: object
) -> None:
    config = write(tmp_path / "forge.toml", EXAMPLE_CONFIG.read_text())
    s = load_settings(env={"FORGE_CONFIG": str(config), var: value})
    assert getattr(s, attr) == expected
    assert s.sources[key] == f"env {var}"


def test_env_overrides_paths_and_urls(tmp_path: Path) -> None:
    env = {
        "FORGE_QUEUE_DIR": str(tmp_path / "q"),
        "FORGE_REDIS_URL": "redis://:secret@example:6380/1",
        "FORGE_COMMANDS": f"a{os.pathsep}b",
    }
    s = load_settings(cwd=tmp_path, env=env)
    assert s.connection_config("file").path == tmp_path / "q"
    assert s.connection_config("redis").url == "redis://:secret@example:6380/1"
    assert s.command_paths == (tmp_path / "a", tmp_path / "b")
    assert s.as_dict()["connections"]["redis"]["url"] == "redis://:***@example:6380/1"
    assert s.sources["connections.file.path"] == "env FORGE_QUEUE_DIR"


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[queue]\ntries = 'three'\n", "queue.tries must be an integer, not 'three'"),
        ("[queue]\ntries = true\n", "queue.tries must be an integer, not True"),
        ("[forge]\nplugins = 'yes'\n", "forge.plugins must be true or false"),
        ("[forge]\ncommands = 'commands'\n", "forge.commands must be a list"),
        ("[queue]\ntimeout = 'soon'\n", "queue.timeout .*Invalid timeout 'soon'"),
        ("[queue]\ntries = 0\n", "queue.tries .* must be at least 1"),
        ("[queue]\ndefault = '../etc'\n", "queue.default .*Invalid queue name"),
        ("[queue]\ntires = 3\n", r"unknown key queue\.tires \(known: connection, default, tries"),
        ("[qeueu]\ntries = 3\n", r"unknown section \[qeueu\]"),
        ("[connections.file]\npth = 'x'\n", r"unknown key connections\.file\.pth"),
        ("[connections.x]\ndriver = 'ftp'\n", r'connections\.x\.driver must be "file" or "redis"'),
        ("[queue]\nconnection = 'nope'\n", 'queue.connection .* names "nope", which is not configured'),
        ("[queue\n", "invalid TOML"),
    ],
)
def test_bad_config_errors_name_the_key(tmp_path: Path, toml: str, message: str) -> None:
    config = write(tmp_path / "forge.toml", toml)
    with pytest.raises(ConfigError, match=message) as info:
        load_settings(cwd=tmp_path, env={})
    assert str(config) in str(info.value)  # which file to fix


@pytest.mark.parametrize(
    ("var", "value", "key"),
    [
        ("FORGE_QUEUE_TRIES", "many", "queue.tries (env FORGE_QUEUE_TRIES)"),
        ("FORGE_QUEUE_TIMEOUT", "-5", "queue.timeout (env FORGE_QUEUE_TIMEOUT)"),
        ("FORGE_QUEUE_BACKOFF", "1,x", "queue.backoff (env FORGE_QUEUE_BACKOFF)"),
    ],
)
def test_bad_env_values_name_the_variable(tmp_path: Path, var: str, value: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(cwd=tmp_path, env={var: value})
    assert str(info.value).startswith(key)


def test_default_queue_dir_is_per_project(tmp_path: Path) -> None:
    a = load_settings(cwd=write(tmp_path / "a" / "forge.toml", "").parent, env={})
    b = load_settings(cwd=write(tmp_path / "b" / "forge.toml", "").parent, env={})
    path_a, path_b = a.connection_config().path, b.connection_config().path
    assert path_a != path_b
    assert path_a == default_queue_dir(tmp_path / "a")  # stable for the same project
    assert path_a is not None and not path_a.is_relative_to(tmp_path / "xdg")  # the account home, not $XDG_DATA_HOME
    assert a.sources["connections.file.path"] == "default"


def test_queue_dir_from_forge_toml_is_relative_to_it(tmp_path: Path) -> None:
    write(tmp_path / "forge.toml", '[connections.file]\npath = ".forge/queue"\n')
    s = load_settings(cwd=tmp_path, env={})
    assert s.connection_config().path == tmp_path / ".forge" / "queue"


def test_unknown_connection_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match='Unknown connection "ftp"'):
        load_settings(cwd=tmp_path, env={}).connection_config("ftp")


def test_mask_url() -> None:
    assert mask_url("redis://user:pw@host:6379/0") == "redis://user:***@host:6379/0"
    assert mask_url("redis://host:6379/0") == "redis://host:6379/0"


def test_config_show_prints_values_and_sources(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FORGE_QUEUE_TRIES", "7")
    assert main(["config:show"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.strip()}
    assert lines["queue.tries"] == ["7", "env", "FORGE_QUEUE_TRIES"]
    assert lines["queue.default"] == ["default", str(EXAMPLE_CONFIG)]
    assert lines["connections.file.path"][-2:] == ["env", "FORGE_QUEUE_DIR"]


def test_config_show_json(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORGE_REDIS_URL", "redis://:hunter2@localhost/0")
    assert main(["config:show", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["version"] == 1
    assert data["settings"]["queue.tries"] == 3
    assert data["settings"]["config_file"] == str(EXAMPLE_CONFIG)
    assert data["sources"]["queue.tries"] == str(EXAMPLE_CONFIG)
    assert "hunter2" not in json.dumps(data)


def test_config_errors_reach_the_cli_as_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FORGE_CONFIG", str(write(tmp_path / "forge.toml", "[queue]\ntries = 'x'\n")))
    assert main(["list"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "queue.tries must be an integer" in err


def test_a_large_config_is_parsed_once_per_content(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A forge.toml of 32 KiB or more is kept parsed (as JSON, under the SHA-256 of its bytes,
    in the user's cache directory): an edit is a new key, a planted or tampered cache file is
    ignored, and a file with dates is never cached."""
    import hashlib

    import forge.config as config

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = tmp_path / "forge.toml"
    body = "".join(f'[[schedule]]\nname = "e{i}"\ncommand = "x:y"\ncron = "0 3 * * *"\n' for i in range(800))
    path.write_text("[queue]\ndefault = \"one\"\n" + body)
    assert len(body) > config.PARSE_CACHE_MIN
    first = config._read_toml(path)
    folder = tmp_path / "cache" / "forge" / "toml"
    cached = folder / f"{hashlib.sha256(path.read_bytes()).hexdigest()}.json"
    assert json.loads(cached.read_text())["data"] == first and oct(folder.stat().st_mode & 0o777) == "0o700"
    config._parsed.clear()
    assert config._read_toml(path) == first
    doc = json.loads(cached.read_text())  # a cache that lies about its content is not believed
    doc["data"]["queue"]["default"] = "planted"
    doc["sha256"] = "0" * 64
    cached.write_text(json.dumps(doc))
    config._parsed.clear()
    assert config._read_toml(path)["queue"]["default"] == "one"
    cached.write_text(json.dumps({**doc, "sha256": cached.stem}))  # right name, but others may write it
    os.chmod(cached, 0o666)
    config._parsed.clear()
    assert config._read_toml(path)["queue"]["default"] == "one"
    path.write_text("[queue]\ndefault = \"two\"\n" + body)  # an edit: another key
    assert config._read_toml(path)["queue"]["default"] == "two"
    path.write_text("when = 2026-03-01T03:00:00Z\n" + body)
    config._parsed.clear()
    assert "when" in config._read_toml(path)
    assert not (folder / f"{hashlib.sha256(path.read_bytes()).hexdigest()}.json").exists()
