"""The Typer-free paths of ``queue:dispatch`` and ``schedule:run``, read from the command cache.

``forge.cli.main`` asks :func:`attempt` first. The answer is a :class:`FastResult`: either the
command ran here (``code``), or it did not, before touching the queue, and ``reason`` says why;
then the full Typer command runs, and :meth:`FastResult.after_full_run` saves the command cache
the fast path found missing or stale, so that the next run can skip Typer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from forge.config import Settings

#: The commands that have a fast path.
COMMANDS = ("queue:dispatch", "schedule:run")


class FastResult:
    """What a fast path did: ran the command (``code`` is its exit code), or fell back to the
    full command (``code`` None, ``reason`` why). ``stale`` is the cache fingerprint taken when
    the cache was missing or out of date, with its settings (see :meth:`after_full_run`);
    ``store_on`` the full command's exit codes after which the cache is saved (``schedule:run``
    exits 2 once it has dispatched the valid entries, when some entry is invalid).
    (A plain class, not a dataclass: this module is imported on every dispatch.)"""

    __slots__ = ("code", "reason", "stale", "store_on")

    def __init__(self, code: int | None = None, reason: str | None = None,
                 stale: tuple[Settings, list[Any]] | None = None, store_on: tuple[int, ...] = (0,)) -> None:
        self.code, self.reason, self.stale, self.store_on = code, reason, stale, store_on

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FastResult):
            return NotImplemented
        return (self.code, self.reason, self.stale, self.store_on) == (
            other.code, other.reason, other.stale, other.store_on)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"FastResult(code={self.code!r}, reason={self.reason!r})"

    @property
    def handled(self) -> bool:
        """True if the command ran on the fast path (its exit code is ``code``)."""
        return self.code is not None

    def after_full_run(self, code: int) -> None:
        """After the full command ran and exited ``code``: if it did its work (``store_on``) and
        the cache was stale, save the cache under the fingerprint taken before the command files were
        loaded. Best effort: a cache that cannot be written only makes the next run slower."""
        if self.stale is None or code not in self.store_on:
            return
        from forge.cli.fastpath import cache

        settings, fingerprint = self.stale
        with contextlib.suppress(Exception):  # e.g. a command file that fails to import
            cache.store(settings, fingerprint)


def fallback(reason: str, stale: tuple[Settings, list[Any]] | None = None,
             store_on: tuple[int, ...] = (0,)) -> FastResult:
    """A result saying the fast path did not run the command, and why."""
    return FastResult(None, reason, stale, store_on)


def attempt(args: Sequence[str]) -> FastResult | None:
    """Run ``forge ARGS`` on its fast path if it has one: None if the command has none, else
    what happened. Raises only the queue's own errors, after which nothing was stored."""
    if args[:1] == ["queue:dispatch"]:
        from forge.cli.fastpath.dispatch import run as fast_dispatch

        return fast_dispatch(args[1:])
    if args[:1] == ["schedule:run"]:
        from forge.cli.fastpath.schedule import run as fast_schedule

        return fast_schedule(args[1:])
    return None
