"""forge: an artisan-style command runner and crash-safe job queue for Python.

The public API is imported lazily so that ``import forge`` (and every command file's
``from forge import command``) stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from forge.registry.spec import command

__version__ = "0.1.0"

__all__ = [
    "CallResult",
    "CommandQueue",
    "Fail",
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
    "Retry",
    "RetryBlocked",
    "call",
    "command",
    "on",
    "progress",
]

_LAZY = {
    "call": "forge.registry.runner",
    "on": "forge.events.listeners",
    "CallResult": "forge.registry.runner",
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
    "Retry": "forge.retry.outcome",
    "Fail": "forge.retry.outcome",
    "progress": "forge.jobprogress",
}

if TYPE_CHECKING:
    from forge.errors import (
        DispatchFailed,
        DuplicateJob,
        ForgeError,
        InvalidCommand,
        JobNotFound,
        QueueError,
        QueueUnavailable,
        RetryBlocked,
    )
    from forge.events.listeners import on
    from forge.jobprogress import progress
    from forge.queue.manager import CommandQueue, JobDispatch, QueuedCommand, QueueManager
    from forge.registry.runner import CallResult, call
    from forge.retry.outcome import Fail, Retry


def __getattr__(name: str) -> Any:
    if name == "events":  # the subpackage: forge.events.current(), forge.events.Event
        import importlib

        return importlib.import_module("forge.events")
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'forge' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
