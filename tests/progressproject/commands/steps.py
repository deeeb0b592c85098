"""A job that reports progress, for tests/test_progress.py."""

from __future__ import annotations

import os
import time
from typing import Annotated

import typer

import forge
from forge import command


@command("steps:run")
def run(
    gate: Annotated[str, typer.Option(help="Report 30/100, then wait for this file to appear.")],
    flood: Annotated[int, typer.Option(help="Then print this many progress lines at once.")] = 0,
) -> None:
    """Report 30/100 "downloading", wait for the gate file, flood, finish at 100%."""
    forge.progress(30, 100, "downloading")
    print("a line of ordinary output", flush=True)
    until = time.monotonic() + 120
    while not os.path.exists(gate) and time.monotonic() < until:
        time.sleep(0.02)
    for i in range(flood):
        print(f"::forge-progress {i}/{flood} flooding")
    print("::forge-progress 100% all done", flush=True)
