"""The queued-commands library API: ``QueuedCommand``, ``CommandQueue``, ``QueueManager``, ``JobDispatch``.

>>> from forge.queue import CommandQueue, QueuedCommand

The queue's errors import from here too, as the queued-commands guide writes them.
"""

from forge.errors import (
    DispatchFailed,
    DuplicateJob,
    InvalidCommand,
    JobNotFound,
    QueueError,
    QueueUnavailable,
    RetryBlocked,
)
from forge.queue.command import QueuedCommand
from forge.queue.manager import CommandQueue, JobDispatch, QueueManager

__all__ = [
    "CommandQueue", "DispatchFailed", "DuplicateJob", "InvalidCommand", "JobDispatch", "JobNotFound",
    "QueueError", "QueueManager", "QueueUnavailable", "QueuedCommand", "RetryBlocked",
]
