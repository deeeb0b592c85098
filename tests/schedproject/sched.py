"""Commands the scheduler tests schedule: they record each run (with FORGE_SCHEDULED_FOR)."""

from __future__ import annotations

import json
import os
import time
from typing import Annotated

import typer

from forge import command


@command("sched:record")
def record(
    label: Annotated[str, typer.Argument(help="Recorded as given.")] = "",
    hold: Annotated[str | None, typer.Option(help="Wait until this file exists before ending.")] = None,
) -> None:
    """Append one JSON line to $SCHED_LEDGER: the label, the job id and FORGE_SCHEDULED_FOR."""
    line = json.dumps({"label": label, "job": os.environ.get("FORGE_JOB_ID"),
                       "scheduled_for": os.environ.get("FORGE_SCHEDULED_FOR"), "at": time.time()})
    path = os.environ.get("SCHED_LEDGER")
    if path:
        with open(path, "a") as fh:
            fh.write(line + "\n")
    while hold and not os.path.exists(hold):
        time.sleep(0.05)
