"""Queue backends, named in a static table and imported on demand, and ``connect``: the one
backend per process of each configured connection (``forge.queue.connect`` is this)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from forge.backends.retention import DONE_RETENTION
from forge.errors import ConfigError

if TYPE_CHECKING:
    from forge.backends.base import Backend
    from forge.config import Connection, Settings

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


#: The backends ``connect`` opened, by connection and retention (the job process drops them).
_backends: dict[tuple[Any, float], Backend] = {}


def connect(connection: str | None = None, settings: Settings | None = None) -> Backend:
    """The backend of a configured connection (one per process and connection); ``settings``
    default to the project's (``forge.config.load_settings``)."""
    if settings is None:
        from forge.config import load_settings

        settings = load_settings()
    conn = settings.connection_config(connection)
    # Keyed by the connection itself (its path or URL), not its name: two projects, or one
    # project with FORGE_QUEUE_DIR changed, must never share a backend.
    key = (conn, settings.done_retention)
    backend = _backends.get(key)
    if backend is None:
        backend = _backends[key] = open_backend(conn, done_retention=settings.done_retention)
    return backend
