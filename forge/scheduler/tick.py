"""``queue:work --schedule``: a worker that also dispatches the schedule's due ticks.

The worker calls the tick at each maintenance pass (every 2 s, between jobs); what it
dispatches and any error go to the worker's reporter, and an error never stops the worker.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from forge.errors import ForgeError

if TYPE_CHECKING:
    from forge.config import Settings
    from forge.registry.spec import CommandRegistry


def worker_tick(settings: Settings, registry: CommandRegistry, connection: str | None,
                report: Callable[[str, dict[str, Any]], None]) -> Callable[[], None]:
    """The worker's ``tick``: loads the schedule once, then runs it whenever something is due."""
    from forge.scheduler.scheduler import Scheduler

    sch, errors = Scheduler.load(settings=settings, registry=registry, connection=connection)
    for err in errors:
        report("schedule_error", {"error": err.message})
    due = [0.0]  # when to look next (Unix time)

    def tick() -> None:
        if not sch.entries:
            return
        now = sch.clock()
        if now < due[0]:
            return
        try:
            for action in sch.run(now):
                report(f"schedule_{action.action}", action.to_dict())
            nxt = sch.next_due()
            # At most 30 s ahead: an entry resumed elsewhere is noticed soon.
            due[0] = min(nxt, now + 30.0) if nxt is not None else now + 30.0
        except (ForgeError, OSError) as exc:
            report("schedule_failed", {"error": str(exc)})
            due[0] = 0.0  # try again at the next pass

    return tick
