"""The ``forge`` Click group: commands are loaded lazily from the registry by name.

Its commands come from the process's one registry (``forge.registry.runner.default_registry``,
shared with ``forge.call`` and the queue library). An unknown name raises the registry's
``UnknownCommand``; ``forge.cli.main`` decides its exit code.
"""

from __future__ import annotations

from typing import Any

import typer
from typer.core import TyperGroup

from forge import __version__
from forge.cli.builtins.core import render_list
from forge.registry.runner import default_registry
from forge.registry.spec import CommandRegistry

#: The registry whose project had its [[listeners]] and [events] checked.
_checked: list[CommandRegistry] = []


def _check_events() -> None:
    """A broken [[listeners]] or [events] table stops every command, as a broken [queue] does
    (``forge.config`` leaves those tables to ``forge.events.config``)."""
    from forge.config import load_settings

    settings = load_settings()  # the registry's, again: forge.toml's parse is cached
    if settings.listeners or settings.events:
        from forge.events.config import check

        check(settings)


class ForgeGroup(TyperGroup):
    """A group whose subcommands come from the command registry, built only when used."""

    def _registry(self) -> CommandRegistry:
        registry = default_registry()
        if _checked[:1] != [registry]:  # once per registry, which is built once per process
            _check_events()
            _checked[:] = [registry]
        return registry

    def list_commands(self, ctx: Any) -> list[str]:
        """The names ``forge --help`` and completion offer: every command not hidden."""
        return [s.name for s in self._registry() if not s.hidden]

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        """The Click command of ``cmd_name`` (built from its function), or None if unknown."""
        spec = self._registry().get(cmd_name)
        if spec is None:
            return None
        from forge.registry.runner import click_command

        return click_command(spec)

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        """The command ``args`` names and its arguments; ``UnknownCommand`` for an unknown name.
        A queue command first warns of the registry's notes; an isolated project command is
        wrapped to hold its isolation lock while it runs."""
        name = args[0]
        cmd = self.get_command(ctx, name)
        if cmd is None and not ctx.resilient_parsing:
            raise self._registry().unknown(name)
        if name.startswith("queue:") and not ctx.resilient_parsing:
            from forge import output

            for note in self._registry().notes:  # e.g. no forge.toml: which queue is this?
                output.warn(note)
        rest = args[1:]
        if cmd is not None and not ctx.resilient_parsing:
            spec = self._registry().get(name)
            if spec is not None and not spec.builtin and (
                    "--isolated" in rest or getattr(spec.target, "__forge_isolated__", None) is not None):
                from forge.registry.isolated import wrap_direct

                cmd, rest = wrap_direct(spec, cmd, rest)  # holds the isolation lock while it runs
        return (cmd.name if cmd else None), cmd, rest

    def format_help(self, ctx: Any, formatter: Any) -> None:
        """``forge --help``: the command list (without the plugin scan)."""
        render_list(self._registry(), None, json_out=False, plugins=False)


def build_app() -> Any:
    """The ``forge`` Click group, with its ``-v`` and ``--version`` options."""
    app = typer.Typer(
        cls=ForgeGroup,
        name="forge",
        invoke_without_command=True,
        no_args_is_help=False,
        pretty_exceptions_enable=False,
        context_settings={"help_option_names": ["-h", "--help"]},
    )

    @app.callback()
    def main(
        ctx: typer.Context,
        verbose: bool = typer.Option(False, "--verbose", "-v", help="Show tracebacks and debug output."),
        version: bool = typer.Option(False, "--version", help="Print forge's version and exit."),
    ) -> None:
        """forge: run your project's commands and queue them for workers."""
        if version:
            print(f"forge {__version__}")
            raise typer.Exit(0)
        if ctx.invoked_subcommand is None:
            render_list(default_registry(), None, json_out=False, plugins=False)

    return typer.main.get_command(app)
