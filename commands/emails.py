"""email:send: queue an email to a user in a local outbox file (no network)."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer

from forge import command


def storage() -> Path:
    """The example project's data folder: ``$FORGE_STORAGE``, else ``./storage``."""
    return Path(os.environ.get("FORGE_STORAGE") or Path.cwd() / "storage")


@command("email:send")
def send(
    user: Annotated[int, typer.Option(help="The id of the user to email.", min=1)],
    subject: Annotated[str, typer.Option(help="The subject line.")] = "Hello from forge",
) -> None:
    """Write an email for a user into storage/outbox.jsonl (one JSON object per line).

    Nothing is sent over the network; a mailer would read the outbox.
    """
    outbox = storage() / "outbox.jsonl"
    outbox.parent.mkdir(parents=True, exist_ok=True)
    record = {"user": user, "subject": subject, "created_at": datetime.now(UTC).isoformat()}
    # One write() of one line in append mode: concurrent workers never interleave lines.
    with outbox.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")
    print(f"Queued email for user {user}")
