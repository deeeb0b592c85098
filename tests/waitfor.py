"""``wait_for``: poll a condition until it holds, the one polling wait of the tests (and of the
reliability harness and the multi-host lab, which ``bench/`` also runs), so that every wait ends
with the same failure: an ``AssertionError`` naming what was awaited and what the last look saw."""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float = 30.0, interval: float = 0.02, what: str = "") -> T:
    """``predicate()``'s first true value, looked at every ``interval`` seconds; an
    ``AssertionError`` naming ``what`` (by default the predicate's source) once ``timeout``
    seconds have passed. The predicate is always looked at once more after the deadline, so a
    condition that holds by then passes however slow the machine (and ``timeout=0`` looks once)."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= end:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what or _source(predicate)}"
                                 f" (the last look gave {_short(value)})")
        time.sleep(interval)


def _source(predicate: Callable[[], object]) -> str:
    """The predicate as written (a lambda's line), else its name."""
    name = getattr(predicate, "__qualname__", None) or repr(predicate)
    if name.endswith("<lambda>"):
        try:
            return _short(" ".join(inspect.getsource(predicate).split()), repr_it=False)
        except (OSError, TypeError):
            pass
    return name


def _short(value: object, limit: int = 200, *, repr_it: bool = True) -> str:
    text = repr(value) if repr_it else str(value)
    return text if len(text) <= limit else text[:limit] + "..."
