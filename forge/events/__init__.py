"""Events and hooks: what forge raises (``NAMES``), ``@forge.on`` listeners, and delivery.

- ``model``: the ``Event`` record, the event names, event ids;
- ``listeners``: ``@forge.on``, the ``Listener`` record, the entry-point group ``forge.listeners``;
- ``config``: ``[[listeners]]`` and ``[events]`` in forge.toml;
- ``bus``: delivery (durable listeners as jobs keyed by the event id; in-process ones within a budget);
- ``worker``: the events a worker raises, and where they are delivered around an outcome's record;
- ``thresholds``: ``queue.waiting_too_long`` and ``queue.too_long``, once per crossing;
- ``hooks``: events raised by dispatchers, ``queue:cancel`` and the scheduler.

Importing this package is cheap (nothing heavy), as command files import ``forge.on``.
"""

from __future__ import annotations

from forge.events.listeners import ENTRY_POINT_GROUP, Listener, on
from forge.events.model import ENV_VAR, NAMES, Event, current

__all__ = ["ENTRY_POINT_GROUP", "ENV_VAR", "NAMES", "Event", "Listener", "current", "on"]
