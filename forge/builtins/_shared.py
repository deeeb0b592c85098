"""What the queue commands share: their common options, the queue manager and time formatting.

Cheap to import (typer and forge only): ``queue:dispatch`` imports it on every run.
"""

from __future__ import annotations

import shlex
import sys
from datetime import datetime
from typing import Annotated

import typer

from .. import output
from ..durations import format_duration
from ..job import JobInfo
from ..queue import QueueManager
from ..runner import default_registry

JSON_VERSION = 1

Connection = Annotated[str | None, typer.Option(help="The connection to use (default: queue.connection).")]
Json = Annotated[bool, typer.Option("--json", help="Machine-readable output on stdout.")]
QueueOpt = Annotated[str | None, typer.Option("--queue", help="Only this queue.")]
JobId = Annotated[str, typer.Argument(metavar="ID", help="The job id (a UUID).")]


def manager(connection: str | None) -> QueueManager:
    """The queue manager over the process's one registry (the one the CLI already built)."""
    return QueueManager(connection, registry=default_registry())


def fmt_time(t: float | None) -> str:
    return datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S") if t else ""


def ago(t: float | None, now: float) -> str:
    return format_duration(max(now - t, 0.0)) if t else ""


def argv(info: JobInfo) -> str:
    return shlex.join([info.job.command, *info.job.args])


def err_tty() -> bool:
    return output.is_tty(sys.stderr)
