"""Probe commands for the limits and isolation tests (``tests/test_limits.py``)."""

from __future__ import annotations

import json
import os
import time
from typing import Annotated

import typer

from forge import command


@command("probe:isolated", isolated="probe:{tenant}")
def isolated(
    tenant: Annotated[str, typer.Argument(help="One run per tenant at a time.")],
    sleep: Annotated[float, typer.Option(help="Seconds to sleep.")] = 0.0,
) -> None:
    """Record a start line in the probe ledger (with this process's pid), then sleep."""
    path = os.environ.get("FORGE_PROBE_LEDGER")
    if path:
        line = json.dumps({"kind": "isolated", "tenant": tenant, "pid": os.getpid(), "start": time.time(),
                           "job": os.environ.get("FORGE_JOB_ID")})
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)
    time.sleep(sleep)
