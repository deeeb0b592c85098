"""alerts:notify: a durable listener (see README "Events"): post an event to the team's chat.

forge dispatches it as a job for every event a ``[[listeners]]`` table in forge.toml names it
for; the event arrives in ``FORGE_EVENT`` (``forge.events.current()``). Here "posting" appends
a line to storage/alerts.log; a real one would call a webhook, and raise to be retried.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

import forge
from forge import command


def storage() -> Path:
    """The example project's data folder: ``$FORGE_STORAGE``, else ``./storage``."""
    return Path(os.environ.get("FORGE_STORAGE") or Path.cwd() / "storage")


@command("alerts:notify")
def notify(channel: Annotated[str, typer.Option(help="Where to post, e.g. #ops.")] = "#ops") -> None:
    """Post the event this job was dispatched for (FORGE_EVENT) to a chat channel."""
    event = forge.events.current()
    if event is None:
        raise typer.BadParameter("no event: this command runs as a listener job (FORGE_EVENT is not set).")
    what = event.get("job_id") or event.get("queue") or event.get("worker") or ""
    detail = event.get("error") or event.get("reason") or ""
    line = f"{event.name} {what} {detail}".rstrip()
    storage().mkdir(parents=True, exist_ok=True)
    with open(storage() / "alerts.log", "a") as fh:
        fh.write(f"{channel} {line}\n")
    print(f"Posted to {channel}: {line}")
