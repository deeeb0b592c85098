"""The queued-commands library API: ``QueuedCommand``, ``CommandQueue``, ``QueueManager``, ``JobDispatch``.

>>> from forge.queue import CommandQueue, QueuedCommand

The queue's errors import from here too, as the queued-commands guide writes them, and so do
``connect`` (a connection's backend) and ``batch_key``: the same names ``forge.queue`` always had.
"""

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
from forge.queue.command import QueuedCommand
from forge.queue.manager import CommandQueue, JobDispatch, QueueManager, batch_key, connect

__all__ = ["AmbiguousJobId", "CommandQueue", "DispatchFailed", "DuplicateJob", "ForgeError", "InvalidCommand",
           "JobDispatch", "JobNotFound", "QueueError", "QueueManager", "QueueUnavailable", "QueuedCommand",
           "RetryBlocked", "UnknownQueuedCommand", "batch_key", "connect"]
