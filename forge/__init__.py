"""forge: an artisan-style command runner and crash-safe job queue for Python.

The public API is imported lazily so that ``import forge`` (and every command file's
``from forge import command``) stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .registry import command

__version__ = "0.1.0"

__all__ = [
    "CallResult",
    "CommandQueue",
    "DispatchFailed",
    "DuplicateJob",
    "ForgeError",
    "InvalidCommand",
    "JobDispatch",
    "JobNotFound",
    "QueueError",
    "QueueManager",
    "QueueUnavailable",
    "QueuedCommand",
    "RetryBlocked",
    "call",
    "command",
    "progress",
]

_LAZY = {
    "call": "forge.runner",
    "CallResult": "forge.runner",
    "QueuedCommand": "forge.queue",
    "CommandQueue": "forge.queue",
    "QueueManager": "forge.queue",
    "JobDispatch": "forge.queue",
    "ForgeError": "forge.errors",
    "QueueError": "forge.errors",
    "InvalidCommand": "forge.errors",
    "QueueUnavailable": "forge.errors",
    "DispatchFailed": "forge.errors",
    "DuplicateJob": "forge.errors",
    "JobNotFound": "forge.errors",
    "RetryBlocked": "forge.errors",
    "progress": "forge.jobprogress",
}

if TYPE_CHECKING:
    from .errors import (
        DispatchFailed,
        DuplicateJob,
        ForgeError,
        InvalidCommand,
        JobNotFound,
        QueueError,
        QueueUnavailable,
        RetryBlocked,
    )
    from .jobprogress import progress
    from .queue import CommandQueue, JobDispatch, QueuedCommand, QueueManager
    from .runner import CallResult, call


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'forge' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
