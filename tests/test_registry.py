"""The @command marker, CommandSpec and CommandRegistry."""

from __future__ import annotations

import types

import pytest

from forge import command
from forge.errors import DiscoveryError, UnknownCommand
from forge.registry.spec import (
    MARKER,
    CommandRegistry,
    CommandSpec,
    first_line,
    specs_in_module,
    valid_name,
)


@pytest.mark.parametrize(
    "name", ["list", "import:data", "report:generate", "cleanup:temp-files", "a1:b_2", "x"]
)
def test_valid_names(name: str) -> None:
    assert valid_name(name)


@pytest.mark.parametrize(
    "name",
    ["", "Import:data", "import:", ":data", "a:b:c", "import data", "-x", "a:-b", "é:x", "a" * 101],
)
def test_invalid_names(name: str) -> None:
    assert not valid_name(name)


def test_command_marks_without_wrapping() -> None:
    def fn() -> None:
        """Do it.

        More text."""

    assert command("a:b", hidden=True)(fn) is fn
    assert getattr(fn, MARKER) == ("a:b", True)


def test_first_line() -> None:
    assert first_line("\n\n  Import users.\n\n  Details.") == "Import users."
    assert first_line(None) == ""


def test_specs_in_module_collects_marked_functions() -> None:
    module = types.ModuleType("mod")

    @command("greet:hello")
    def hello() -> None:
        """Say hello."""

    def plain() -> None: ...

    module.hello, module.plain = hello, plain  # type: ignore[attr-defined]
    (spec,) = specs_in_module(module, "commands/greet.py")
    assert (spec.name, spec.source, spec.description, spec.namespace) == (
        "greet:hello", "commands/greet.py", "Say hello.", "greet",
    )
    assert spec.load() is hello


def test_specs_in_module_rejects_bad_name_naming_source() -> None:
    module = types.ModuleType("mod")
    module.bad = command("Bad Name")(lambda: None)  # type: ignore[attr-defined]
    module.bad.__name__ = "bad"
    with pytest.raises(DiscoveryError, match=r"commands/bad\.py: invalid command name 'Bad Name'"):
        specs_in_module(module, "commands/bad.py")


def test_spec_loads_dotted_target_on_demand() -> None:
    spec = CommandSpec("list", "forge (built-in)", target="forge.cli.builtins.core:list_")
    from forge.cli.builtins.core import list_

    assert spec.load() is list_
    assert spec.namespace == ""


def test_duplicate_names_name_both_sources() -> None:
    registry = CommandRegistry([CommandSpec("a:b", "commands/one.py", target=lambda: None)])
    with pytest.raises(DiscoveryError) as info:
        registry.add(CommandSpec("a:b", "commands/two.py", target=lambda: None))
    assert "commands/one.py" in str(info.value) and "commands/two.py" in str(info.value)


def test_adding_the_same_spec_twice_is_harmless() -> None:
    spec = CommandSpec("a:b", "commands/one.py", target="x:y")
    registry = CommandRegistry([spec, spec])
    assert len(registry) == 1


def test_fallback_runs_once_and_only_when_needed() -> None:
    calls: list[int] = []

    def fallback(registry: CommandRegistry) -> None:
        calls.append(1)
        registry.add(CommandSpec("plug:in", "plugin p", target="x:y"))

    registry = CommandRegistry([CommandSpec("a:b", "here", target="x:y")], fallback=fallback)
    assert registry.get("a:b") is not None
    assert [s.name for s in registry.loaded()] == ["a:b"]
    assert not registry.complete and calls == []
    assert registry.get("plug:in") is not None  # a miss scans
    assert registry.complete and calls == [1]
    list(registry), registry.get("nope"), registry.suggest("x")
    assert calls == [1]


def test_unknown_command_suggests_close_names() -> None:
    registry = CommandRegistry(
        [CommandSpec(n, "here", target="x:y") for n in ("import:data", "import:users", "list")]
    )
    with pytest.raises(UnknownCommand) as info:
        registry.resolve("imprt:data")
    assert str(info.value) == 'Command "imprt:data" is not defined. Did you mean "import:data"?'
    assert info.value.suggestions[0] == "import:data"
    assert registry.suggest("import:zzz")[:2] == ["import:data", "import:users"]
    assert registry.suggest("qqqq") == []


def test_hidden_commands_are_not_suggested() -> None:
    registry = CommandRegistry([CommandSpec("secret:thing", "here", target="x:y", hidden=True)])
    assert registry.suggest("secret:thin") == []
    assert registry.get("secret:thing") is not None


def test_iteration_is_sorted_by_namespace_then_name() -> None:
    names = ["z:a", "list", "a:b", "a:a", "init"]
    registry = CommandRegistry([CommandSpec(n, "here", target="x:y") for n in names])
    assert [s.name for s in registry] == ["init", "list", "a:a", "a:b", "z:a"]
    assert "a:a" in registry and "b:b" not in registry and 3 not in registry
