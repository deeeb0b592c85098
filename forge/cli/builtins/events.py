"""``forge events:list``: the events forge raises and the project's listeners."""

from __future__ import annotations

from typing import Annotated

import typer

from forge import output
from forge.cli.builtins._shared import Json


def list_(
    json_out: Json = False,
    events_only: Annotated[bool, typer.Option("--events", help="Only the event names and what they mean.")] = False,
) -> int:
    """List the events forge raises and every listener: from forge.toml, @forge.on and plugins."""
    from forge.config import load_settings
    from forge.events.bus import build_bus
    from forge.events.config import events_config
    from forge.events.model import NAMES
    from forge.events.worker import check_listeners
    from forge.registry.discovery import build_registry

    settings = load_settings()
    listeners = []
    if not events_only:
        registry = build_registry(settings, strict=False)
        bus = build_bus(settings, lambda event, data: None, python=True)
        check_listeners(bus, registry, settings)  # a bad listener: the error a worker would give
        listeners = [x.describe() for x in bus.listeners]
    cfg = events_config(settings)
    if json_out:
        th = cfg.thresholds
        output.print_json({"version": 1, "events": [{"event": n, "description": d} for n, d in NAMES.items()],
                           "listeners": listeners, "budget": cfg.budget,
                           "thresholds": {"waiting_too_long": dict(th.waiting_too_long), "too_long": dict(th.too_long),
                                          "retried_many": dict(th.retried_many)}})
        return 0
    output.table(["event", "description"], NAMES.items(), title="Events")
    if events_only:
        return 0
    if not listeners:
        output.info("No listeners: add [[listeners]] to forge.toml or @forge.on to a command module.")
        return 0
    rows = []
    for x in listeners:
        what = (f"job {x['command']} {' '.join(x['args'])}".rstrip() + f" on {x['queue'] or settings.default_queue}"
                if x["kind"] == "durable" else f"{x['function']} (budget {(x['budget'] or cfg.budget) * 1000:g} ms)")
        rows.append([", ".join(x["events"]), x["kind"], what, x["source"]])
    output.line()
    output.table(["events", "kind", "runs", "source"], rows, title="Listeners")
    return 0
