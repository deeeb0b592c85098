"""Queue backends, named in a static table and imported on demand."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from forge.backends.retention import DONE_RETENTION
from forge.errors import ConfigError

if TYPE_CHECKING:
    from forge.backends.base import Backend
    from forge.config import Connection

DRIVERS = {
    "file": "forge.backends.file.backend:FileBackend",
    "redis": "forge.backends.redis.backend:RedisBackend",
}


def open_backend(conn: Connection, *, done_retention: float = DONE_RETENTION, quick: bool = False) -> Backend:
    """Instantiate the backend for a configured connection.

    ``quick``: calls never block for long (a server backend uses short timeouts and no
    retries), for the worker's supervisor, which must be able to act on time.
    """
    target = DRIVERS.get(conn.driver)
    if target is None:
        import difflib

        close = difflib.get_close_matches(conn.driver, DRIVERS, n=1)
        hint = f' Did you mean "{close[0]}"?' if close else ""
        raise ConfigError(f'Unknown queue driver "{conn.driver}".{hint}')
    module, _, cls = target.partition(":")
    backend: Backend = getattr(importlib.import_module(module), cls).from_connection(
        conn, done_retention=done_retention, quick=quick)
    return backend
