"""The queued-commands library API: ``QueuedCommand``, ``CommandQueue``, ``QueueManager``, ``JobDispatch``.

>>> from forge.queue import CommandQueue, QueuedCommand

The queue's errors import from here too, as the queued-commands guide writes them, and so do
``connect`` (a connection's backend) and ``batch_key``: the same names ``forge.queue`` always had.

This package is also where the queue meets the events: it installs ``forge.events`` as the
queue's observer (``forge.queue.observers``), so every process that dispatches or cancels
raises ``job.dispatched`` and ``job.cancelled`` for its listeners, however it imported the queue.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from forge.errors import (
    AmbiguousJobId,
    DispatchFailed,
    DuplicateJob,
    ForgeError,
    InvalidCommand,
    JobNotFound,
    QueueError,
    QueueUnavailable,
    RetryBlocked,
    UnknownQueuedCommand,
)
from forge.queue import observers as _observers
from forge.queue.command import QueuedCommand
from forge.queue.manager import CommandQueue, JobDispatch, QueueManager, batch_key, connect

if TYPE_CHECKING:
    from forge.backends.base import Backend
    from forge.config import Settings
    from forge.job import Job, JobInfo

__all__ = ["AmbiguousJobId", "CommandQueue", "DispatchFailed", "DuplicateJob", "ForgeError", "InvalidCommand",
           "JobDispatch", "JobNotFound", "QueueError", "QueueManager", "QueueUnavailable", "QueuedCommand",
           "RetryBlocked", "UnknownQueuedCommand", "batch_key", "connect"]


class _Events:
    """``forge.events`` as the queue's observer, imported only once something may listen:
    forge.toml has [[listeners]] (or [events], checked before a write), or a worker in this
    process has activated its listeners (it imported ``forge.events.hooks``). A dispatch with
    neither pays nothing."""

    def prepare(self, settings: Settings) -> None:
        if settings.listeners or settings.events:
            from forge.events.config import check

            check(settings)

    def dispatched(self, settings: Settings, backend: Backend, jobs: Sequence[Job],
                   created: Sequence[bool]) -> None:
        if _observers.may_listen(settings):
            from forge.events.hooks import dispatched

            dispatched(settings, backend, jobs, created)

    def cancelled(self, settings: Settings, backend: Backend, info: JobInfo) -> None:
        if settings.listeners:
            from forge.events.hooks import cancelled

            cancelled(settings, backend, info)


_observers.install(_Events())
