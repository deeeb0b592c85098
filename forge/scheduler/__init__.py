"""The scheduler: recurring commands, each tick dispatched exactly once on any number of hosts.

* ``entry``: ``ScheduleEntry`` (one recurring command, its expression, zone and policies);
* ``load``: finding entries in ``forge.toml`` ``[[schedule]]`` and ``@command(..., schedule=)``;
* ``state``: what the store keeps per entry, and the ``ScheduleStore`` seam (file and Redis
  implementations live with their backends: ``backends/file/schedule``, ``backends/redis/schedule``);
* ``scheduler``: ``Scheduler``, deciding and dispatching due ticks (``run``, ``plan``, ...);
* ``loop``: ``schedule:work``'s long-running loop.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CatchUp", "Overlap", "ScheduleEntry", "ScheduleError", "Scheduler", "TickAction"]

_WHERE = {"CatchUp": "entry", "Overlap": "entry", "ScheduleEntry": "entry", "ScheduleError": "entry",
          "Scheduler": "scheduler", "TickAction": "scheduler"}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'forge.scheduler' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
