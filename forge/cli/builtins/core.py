"""Built-in commands: list, help, init, make:command, config:show."""

from __future__ import annotations

import keyword
import re
from pathlib import Path
from typing import Annotated, Any

import typer

from forge import __version__, output
from forge.errors import ConfigError, UsageError
from forge.registry.runner import default_registry as _registry
from forge.registry.spec import CommandRegistry, valid_name


def render_list(
    registry: CommandRegistry, namespace: str | None, *, json_out: bool, plugins: bool = True
) -> None:
    """Print the commands; ``plugins=False`` (``forge --help``) skips the plugin scan."""
    specs = [s for s in (registry if plugins else registry.loaded()) if not s.hidden]
    if namespace:
        specs = [s for s in specs if s.namespace == namespace or (not s.namespace and s.name == namespace)]
        if not specs:
            known = sorted({s.namespace for s in registry if s.namespace})
            raise UsageError(f'There are no commands in the "{namespace}" namespace (namespaces: {", ".join(known)}).')
    if json_out:
        output.print_json({
            "version": 1,
            "forge": __version__,
            "commands": [
                {"name": s.name, "namespace": s.namespace, "description": s.description,
                 "source": s.source, "builtin": s.builtin}
                for s in specs
            ],
        })
        return
    output.command_list(specs, __version__, namespace)
    if not registry.complete:
        output.line("\nRun `forge list` to include the commands of installed plugins.")


def list_(
    namespace: Annotated[str | None, typer.Argument(help="Only the commands of this namespace.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """List the registered commands, grouped by namespace."""
    render_list(_registry(), namespace, json_out=json_out)


def help_(command_name: Annotated[str, typer.Argument(metavar="COMMAND", help="The command to describe.")] = "list") -> int:
    """Show the help of a command (the same as `forge COMMAND --help`)."""
    from forge.registry.runner import invoke

    spec = _registry().resolve(command_name)  # unknown: exit 1, as `forge NAME` (forge.cli.main)
    return invoke(spec, ["--help"])


def init(
    directory: Annotated[Path, typer.Argument(help="Where to create the project.")] = Path("."),
) -> None:
    """Create forge.toml (commented), commands/, storage/ and a .gitignore (refuses to replace
    an existing forge.toml; an existing .gitignore is kept)."""
    directory = directory.resolve()
    config = directory / "forge.toml"
    if config.exists():
        raise ConfigError(f"{config} already exists; not overwriting it.")
    directory.mkdir(parents=True, exist_ok=True)
    config.write_text(INIT_TOML)
    (directory / "commands").mkdir(exist_ok=True)
    (directory / "storage").mkdir(exist_ok=True)  # the commands' files and logs (cron lines write here)
    ignore = directory / ".gitignore"
    if not ignore.exists():
        ignore.write_text(INIT_GITIGNORE)
    output.info(f"Created {config}, commands/, storage/ and .gitignore in {directory}. Next: forge make:command hello:world")


#: The forge.toml that ``forge init`` writes: the defaults, each explained (as the example project's).
INIT_TOML = """# forge settings for this project. `forge config:show` prints the effective values and their sources.

[forge]
commands = ["commands"]   # folders of command files, relative to this file
plugins = true            # also load commands from installed plugins (FORGE_NO_PLUGINS=1 disables)
# name = "myapp"          # names the default queue directory (default: this folder's name)

[queue]
connection = "file"       # "file" (a local directory of job files) or "redis"
default = "default"       # the queue `queue:dispatch` uses without --queue
tries = 1                 # attempts per job unless the job says otherwise
timeout = "60s"           # a job running longer is killed (SIGTERM, then SIGKILL)
backoff = [0]             # seconds before retry n (the last repeats), or "exp:2s..10m,jitter=full"
done_retention = "1h"     # how long finished jobs stay visible to queue:show

[connections.file]
driver = "file"
# path = "/var/lib/myapp/queue"   # set one in production (default: a private per-user folder)

[connections.redis]
driver = "redis"
url = "redis://127.0.0.1:6379/0"
prefix = "forge"
"""

INIT_GITIGNORE = """# forge
storage/
__pycache__/
.venv/
"""


TEMPLATE = '''"""The {name} command."""

from typing import Annotated

import typer

from forge import command


@command("{name}")
def {func}(
    target: Annotated[str, typer.Argument(help="What to work on.")] = "world",
    times: Annotated[int, typer.Option(help="How many times to do it.", min=1)] = 1,
) -> int:
    """{description}

    Replace this body with the command's work. Return 0 (or nothing) on success and a
    non-zero integer on failure; print what a user should see.
    """
    for _ in range(times):
        print(f"{name}: hello, {{target}}!")
    return 0
'''


def make_command(
    name: Annotated[str, typer.Argument(help="The new command's name, e.g. report:generate.")],
    description: Annotated[str, typer.Option(help="Its one-line description.")] = "",
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
) -> None:
    """Create a new command file in the first command folder."""
    from forge.config import load_settings

    if not valid_name(name):
        raise UsageError(
            f"Invalid command name {name!r}: use namespace:action with lowercase letters, digits, '-' and '_'."
        )
    if name in _registry() and not force:
        spec = _registry().resolve(name)
        raise UsageError(f'Command "{name}" already exists in {spec.source}.')
    settings = load_settings()
    folder = settings.command_paths[0]
    stem = re.sub(r"[^a-z0-9_]", "_", name.replace(":", "_"))
    func = stem if not keyword.iskeyword(stem) and not stem[0].isdigit() else f"cmd_{stem}"
    path = folder / f"{stem}.py"
    if path.exists() and not force:
        raise UsageError(f"{path} already exists; use --force to overwrite it.")
    folder.mkdir(parents=True, exist_ok=True)
    text = TEMPLATE.format(name=name, func=func, description=description or f"Run {name}.")
    path.write_text(text)
    output.info(f"Created {path}. Try: forge {name} --help")


def config_show(
    json_out: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Show the effective settings and where each came from."""
    from forge.config import load_settings

    settings = load_settings()
    data = settings.as_dict()
    if json_out:
        sources = dict(settings.sources)
        for name, conn in data["connections"].items():  # every connection key, as the table shows them
            for k in conn:
                sources.setdefault(f"connections.{name}.{k}", "default")
        output.print_json({"version": 1, "settings": data, "sources": sources})
        return
    rows: list[list[Any]] = []
    for key, value in data.items():
        if key == "connections":
            continue
        rows.append([key, value, settings.sources.get(key, "")])
    for name, conn in data["connections"].items():
        for k, v in conn.items():
            full = f"connections.{name}.{k}"
            rows.append([full, v, settings.sources.get(full, "default")])
    output.table(["setting", "value", "source"], rows)
