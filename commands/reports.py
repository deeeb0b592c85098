"""report:generate: write a small report file into storage/reports/."""

from __future__ import annotations

import csv
import io
import json
import os
from datetime import date
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from forge import command


class ReportType(StrEnum):
    sales = "sales"
    inventory = "inventory"
    users = "users"


class ReportFormat(StrEnum):
    csv = "csv"
    json = "json"
    txt = "txt"


SALES = [
    {"region": "north", "orders": 120, "revenue": 15300.0},
    {"region": "south", "orders": 95, "revenue": 11840.5},
    {"region": "west", "orders": 143, "revenue": 20112.25},
]
INVENTORY = [
    {"sku": "FORGE-001", "item": "anvil", "in_stock": 12},
    {"sku": "FORGE-002", "item": "hammer", "in_stock": 48},
    {"sku": "FORGE-003", "item": "tongs", "in_stock": 0},
]


def storage() -> Path:
    """The example project's data folder: ``$FORGE_STORAGE``, else ``./storage``."""
    return Path(os.environ.get("FORGE_STORAGE") or Path.cwd() / "storage")


def report_rows(kind: ReportType) -> list[dict[str, object]]:
    if kind is ReportType.sales:
        return SALES
    if kind is ReportType.inventory:
        return INVENTORY
    rows: list[dict[str, object]] = []
    for file in sorted((storage() / "imports").glob("*.jsonl")):
        with file.open(encoding="utf-8") as fh:
            rows.extend(json.loads(line) for line in fh if line.strip())
    return rows


def render(rows: list[dict[str, object]], fmt: ReportFormat, title: str) -> str:
    if fmt is ReportFormat.json:
        return json.dumps({"report": title, "rows": rows}, indent=2) + "\n"
    if fmt is ReportFormat.csv:
        buf = io.StringIO()
        if rows:
            writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
        return buf.getvalue()
    lines = [title, "=" * len(title)]
    lines += ["  ".join(f"{k}={v}" for k, v in row.items()) for row in rows] or ["(no rows)"]
    return "\n".join(lines) + "\n"


@command("report:generate")
def generate(
    type_: Annotated[ReportType, typer.Option("--type", help="Which report.")] = ReportType.sales,
    format_: Annotated[ReportFormat, typer.Option("--format", help="File format.")] = ReportFormat.csv,
) -> None:
    """Generate a report into storage/reports/ and print its path.

    The users report lists the users imported by import:data. One file per type and day:
    generating it again the same day replaces it.
    """
    title = f"{type_.value} report {date.today().isoformat()}"
    path = storage() / "reports" / f"{type_.value}-{date.today().isoformat()}.{format_.value}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(report_rows(type_), format_, title), encoding="utf-8")
    print(path)
