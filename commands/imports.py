"""import:data: load users from a CSV file into the project's storage."""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

import forge
from forge import command

REQUIRED_COLUMNS = ("id", "name", "email")


def storage() -> Path:
    """The example project's data folder: ``$FORGE_STORAGE``, else ``./storage``."""
    return Path(os.environ.get("FORGE_STORAGE") or Path.cwd() / "storage")


@command("import:data")
def import_data(
    file: Annotated[
        Path,
        typer.Argument(help="CSV file with id,name,email columns.", exists=True, dir_okay=False),
    ],
    batch: Annotated[int, typer.Option(help="Rows written per batch.", min=1)] = 100,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate only; write nothing.")] = False,
) -> int:
    """Import users from a CSV file into storage/imports/<name>.jsonl.

    Rows without an id or name, or whose email has no "@", are skipped with a warning.
    Re-running the import replaces the previous output, so a retried job is harmless.
    """
    with file.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            print(f"{file.name}: missing column(s): {', '.join(missing)}", file=sys.stderr)
            return 1
        rows, skipped = [], 0
        for record in reader:
            row = {c: (record.get(c) or "").strip() for c in REQUIRED_COLUMNS}
            if not row["id"] or not row["name"] or "@" not in row["email"]:
                print(f"{file.name}:{reader.line_num}: skipped invalid row {row}", file=sys.stderr)
                skipped += 1
                continue
            rows.append(row)

    if dry_run:
        print(f"Would import {len(rows)} rows from {file.name} ({skipped} skipped)")
        return 0
    target = storage() / "imports" / f"{file.stem}.jsonl"
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    with partial.open("w", encoding="utf-8") as out:
        for start in range(0, len(rows), batch):
            out.writelines(json.dumps(r) + "\n" for r in rows[start : start + batch])
            out.flush()
            forge.progress(min(start + batch, len(rows)), len(rows), f"imported {file.name}")
    partial.replace(target)  # readers see the old file or the new one, never half of it
    print(f"Imported {len(rows)} rows from {file.name} ({skipped} skipped)")
    return 0
