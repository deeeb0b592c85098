"""``readable``: which descriptors are readable, like ``select.select(fds, [], [], timeout)[0]``
but through poll(2), so a test process with more than 1,024 open descriptors (pytest keeps many
through a long run) still works: select(2) refuses any descriptor number over FD_SETSIZE."""

from __future__ import annotations

import select
from typing import Any


def readable(fds: list[Any], timeout: float | None) -> list[Any]:
    poller = select.poll()
    by_fd = {}
    for f in fds:
        fd = f if isinstance(f, int) else f.fileno()
        by_fd[fd] = f
        poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
    events = poller.poll(None if timeout is None else max(0, int(timeout * 1000)))
    return [by_fd[fd] for fd, _ in events]
