"""cleanup:temp-files: delete old files from storage/tmp."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated

import typer

from forge import command
from forge.durations import parse_duration


def storage() -> Path:
    """The example project's data folder: ``$FORGE_STORAGE``, else ``./storage``."""
    return Path(os.environ.get("FORGE_STORAGE") or Path.cwd() / "storage")


@command("cleanup:temp-files")
def temp_files(
    older_than: Annotated[
        str, typer.Option(help="Only files last modified longer ago than this, e.g. 30m, 1h, 2d.")
    ] = "1h",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only count; delete nothing.")] = False,
) -> None:
    """Delete files in storage/tmp (and below) older than --older-than; print how many."""
    cutoff = time.time() - parse_duration(older_than, what="--older-than")
    tmp = storage() / "tmp"
    old = [p for p in tmp.rglob("*") if p.is_file() and p.stat().st_mtime < cutoff]
    if dry_run:
        print(f"Would delete {len(old)} temporary files older than {older_than}")
        return
    deleted = 0
    for path in old:
        try:
            path.unlink()
            deleted += 1
        except FileNotFoundError:  # another cleanup got there first
            pass
    print(f"Deleted {deleted} temporary files older than {older_than}")
