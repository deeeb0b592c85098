"""Finding commands: built-ins (a static table), the project's command folders, and plugins.

Plugins are installed packages with entry points in the group ``forge.commands``; each entry
point names a module (all its ``@command`` functions) or one function. They are scanned only
when a name is not found otherwise, for a full listing, or by a worker resolving a job, and
not at all when ``FORGE_NO_PLUGINS=1`` or ``[forge] plugins = false``.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
import warnings
from pathlib import Path

from forge.config import Settings
from forge.errors import DiscoveryError
from forge.registry.builtins import BUILTINS
from forge.registry.spec import (
    JOB_MARKER,
    MARKER,
    CommandRegistry,
    CommandSpec,
    first_line,
    specs_in_module,
    valid_name,
)

ENTRY_POINT_GROUP = "forge.commands"


class PluginWarning(UserWarning):
    """A plugin failed to load; the rest of forge still works."""


class DiscoveryWarning(UserWarning):
    """A project command file failed to import; the rest of forge still works."""


def builtin_specs() -> list[CommandSpec]:
    """The specs of forge's built-in commands, from the static table (their modules are not imported)."""
    return [
        CommandSpec(name, "forge (built-in)", desc, target, hidden, builtin=True)
        for name, (target, desc, hidden) in BUILTINS.items()
    ]


def _module_name(folder: Path, file: Path) -> str:
    import zlib  # a cheap stable tag: hashlib would load OpenSSL on every run

    rel = file.relative_to(folder).with_suffix("")
    tag = f"{zlib.crc32(str(folder).encode()):08x}"
    return f"forge_project_{tag}." + ".".join(rel.parts)


def project_specs(folders: tuple[Path, ...], root: Path | None = None,
                  broken: list[str] | None = None) -> list[CommandSpec]:
    """Import every ``*.py`` below each folder (not ``_private.py``) and collect its commands.

    A file that fails to import raises ``DiscoveryError``; with ``broken`` given, it is added
    there ("path: failed to import: ...") instead and the other files are still loaded."""
    specs: list[CommandSpec] = []
    for folder in folders:
        if not folder.is_dir():
            continue
        for file in sorted(folder.rglob("*.py")):
            if any(part.startswith(("_", ".")) for part in file.relative_to(folder).parts):
                continue
            shown = _display(file, root)
            name = _module_name(folder, file)
            module = sys.modules.get(name)
            if module is None:
                spec = importlib.util.spec_from_file_location(name, file)
                if spec is None or spec.loader is None:
                    raise DiscoveryError(f"{shown}: cannot be loaded as a Python module.")
                module = importlib.util.module_from_spec(spec)
                sys.modules[name] = module
                try:
                    spec.loader.exec_module(module)
                except Exception as exc:
                    del sys.modules[name]
                    if broken is not None:
                        broken.append(f"{shown}: failed to import: {type(exc).__name__}: {exc}")
                        continue
                    raise DiscoveryError(
                        f"{shown}: failed to import: {type(exc).__name__}: {exc}",
                        hint="Fix the error in that file (forge -v shows the traceback).",
                    ) from exc
            specs.extend(s for s in specs_in_module(module, shown) if _defined_in(s, module))
    return specs


def _defined_in(spec: CommandSpec, module: object) -> bool:
    fn = spec.target
    return getattr(fn, "__module__", None) == getattr(module, "__name__", None)


def _display(file: Path, root: Path | None) -> str:
    if root is not None:
        try:
            return str(file.relative_to(root))
        except ValueError:
            pass
    return str(file)


def plugin_specs() -> list[CommandSpec]:
    """Commands of installed plugins; a plugin that fails to load is a warning, not an error."""
    from importlib.metadata import entry_points

    specs: list[CommandSpec] = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(ep.dist, "name", None) or "unknown"
        source = f"plugin {dist} ({ep.value})"
        try:
            obj = ep.load()
            if inspect.ismodule(obj):
                specs.extend(specs_in_module(obj, source))
            elif callable(obj) and hasattr(obj, MARKER):
                name, hidden = getattr(obj, MARKER)
                if not valid_name(name):
                    raise DiscoveryError(f"invalid command name {name!r}")
                specs.append(CommandSpec(name, source, first_line(obj.__doc__), obj, hidden,
                                         defaults=getattr(obj, JOB_MARKER, None)))
            else:
                raise DiscoveryError("entry point is neither a module nor an @command function")
        except Exception as exc:  # a broken plugin must not break forge
            warnings.warn(
                f"Plugin {dist} ({ep.name} = {ep.value}) failed to load: {type(exc).__name__}: {exc}",
                PluginWarning,
                stacklevel=2,
            )
    return specs


def build_registry(settings: Settings, *, plugins: bool | None = None, strict: bool = True) -> CommandRegistry:
    """Built-ins and project commands now; plugins on the first miss or full listing.

    ``strict=False`` (the CLI, ``forge.call``): a command file that fails to import is a
    warning naming it, and only its commands are missing (``registry.broken``), so an operator
    can still look at the queue after a bad deploy; a worker is strict."""
    use_plugins = settings.plugins if plugins is None else plugins

    def load_plugins(registry: CommandRegistry) -> None:
        for spec in plugin_specs():
            registry.add(spec)

    registry = CommandRegistry(builtin_specs(), fallback=load_plugins if use_plugins else None)
    broken: list[str] | None = None if strict else []
    for spec in project_specs(settings.command_paths, settings.root, broken):
        registry.add(spec)
    for problem in broken or ():
        warnings.warn(f"{problem}. Its commands are unavailable; the others and the built-in ones work"
                      " (forge -v shows the traceback).", DiscoveryWarning, stacklevel=2)
    registry.broken = broken or []
    note = settings.no_config_note()
    if note:
        registry.notes.append(note)
    return registry
