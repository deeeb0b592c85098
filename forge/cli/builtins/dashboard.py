"""``forge dashboard``: serve the web dashboard (the ``dashboard`` extra)."""

from __future__ import annotations

import importlib
from typing import Annotated

import typer

from forge.cli.builtins._shared import Connection
from forge.errors import ForgeError


def dashboard(
    listen: Annotated[str, typer.Option(help="Address to listen on, HOST:PORT (a non-loopback address is"
                                         " reachable from other machines).")] = "127.0.0.1:8765",
    allow_actions: Annotated[bool, typer.Option("--allow-actions", help="Allow retry, forget, cancel,"
                                                " pause, resume and clear from the pages.")] = False,
    allow_host: Annotated[list[str] | None, typer.Option("--allow-host", help="Also accept this host name"
                                                         " in requests (e.g. behind a proxy); repeatable.")] = None,
    connection: Connection = None,
) -> int:
    """Serve a live web view of the queues, workers, schedules and jobs.

    Prints a URL holding a random access token (FORGE_DASHBOARD_TOKEN fixes it); every page needs
    it. Read-only unless --allow-actions."""
    from forge.dashboard import INSTALL, REQUIRED

    missing = []
    for name in REQUIRED:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ForgeError(f"The dashboard needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'}"
                         " not installed.", hint=f"Install it with: {INSTALL}")
    from forge.dashboard.server import run

    return run(listen=listen, connection=connection, allow_actions=allow_actions,
               allow_hosts=tuple(allow_host or ()))
