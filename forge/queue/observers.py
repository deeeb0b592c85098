"""The queue's seam for what it reports: a dispatch stored jobs, a cancel failed a waiting job.

The queue (``forge.queue.manager``) knows nothing of who listens. It tells the one installed
:class:`QueueObserver`: before a write (``prepare``), so that what the observer would do after
it cannot fail then, and after it (``dispatched``, ``cancelled``). ``forge.events`` implements
the observer (events ``job.dispatched``, ``job.cancelled``); the ``forge.queue`` package installs
it when it is imported, so that every process that dispatches reports its dispatches, whether it
came in through ``forge.queue``, ``forge.queue.manager`` or the CLI. With nothing installed the
queue reports nothing.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from forge.backends.base import Backend
    from forge.config import Settings
    from forge.job import Job, JobInfo


class QueueObserver(Protocol):
    """What the queue tells its observer. Each call returns once the observer is done; an
    error of ``prepare`` stops the write, the others are the observer's to report (the write
    has happened)."""

    def prepare(self, settings: Settings) -> None:
        """Before a dispatch or a cancel writes: raise (``ConfigError``) what would fail after it."""

    def dispatched(self, settings: Settings, backend: Backend, jobs: Sequence[Job], created: Sequence[bool]) -> None:
        """After ``jobs`` were pushed: ``created[n]`` is whether job ``n`` was stored (False: its
        idempotency key had been used, nothing was stored)."""

    def cancelled(self, settings: Settings, backend: Backend, info: JobInfo) -> None:
        """After a waiting job was cancelled (failed with reason ``cancelled``); ``info`` is its record."""


_installed: list[QueueObserver] = []


def may_listen(settings: Settings) -> bool:
    """Whether anything in this process may listen to events: forge.toml has [[listeners]],
    or a worker here has activated its listeners (it imported ``forge.events.hooks``). When
    not, a dispatch or a tick raises nothing and ``forge.events`` is not imported."""
    return bool(settings.listeners) or "forge.events.hooks" in sys.modules


def install(observer: QueueObserver | None) -> None:
    """Make ``observer`` the one the queue tells (None: tell nobody)."""
    _installed[:] = [] if observer is None else [observer]


def installed() -> QueueObserver | None:
    """The observer the queue tells, or None."""
    return _installed[0] if _installed else None
