"""demo:*: commands that sleep or fail on purpose, for trying out workers and retries."""

from __future__ import annotations

import time
from typing import Annotated

import typer

from forge import command


@command("demo:sleep")
def sleep(
    seconds: Annotated[float, typer.Argument(help="How long to sleep.", min=0)],
) -> None:
    """Sleep for SECONDS, printing a line before and after."""
    print(f"Sleeping {seconds:g} s", flush=True)
    time.sleep(seconds)
    print("Done")


@command("demo:fail")
def fail(
    code: Annotated[
        int | None, typer.Option(help="Exit with this code instead of raising an exception.")
    ] = None,
) -> int:
    """Fail on purpose: raise RuntimeError, or exit with --code."""
    if code is None:
        raise RuntimeError("demo:fail failed on purpose")
    print(f"Exiting with code {code}")
    return code
