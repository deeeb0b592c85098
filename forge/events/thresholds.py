"""Threshold events: ``queue.waiting_too_long`` and ``queue.too_long``, evaluated by every
running worker at its maintenance pass and raised once per crossing, whichever worker or host
sees it first.

A crossing is a *mark* in the store (a file ``events/<kind>.<queue>.fired`` created with
``O_EXCL`` under the queue directory; a Redis ``SET NX`` key ``<prefix>:events:<kind>:<queue>``):
the worker that creates it raises the event, and no other can while it stands. When the
condition clears, any worker deletes the mark (re-armed). The mark holds the event; a second
mark (``.sent``) records that its listener jobs were stored, so a worker killed in between is
made good by the next worker that looks (the same event id: stored once).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from forge.events.config import Thresholds
from forge.events.model import Event

#: A crossing whose listener jobs are not recorded as stored after this long is re-sent.
RESEND_AFTER = 10.0
KINDS = {"waiting_too_long": "queue.waiting_too_long", "too_long": "queue.too_long"}


class Marks(Protocol):
    """Crossing marks shared by every worker of a store."""

    def create(self, key: str, doc: dict[str, Any]) -> bool:
        """Atomically create the mark ``key`` holding ``doc``; False if it exists."""

    def read(self, key: str) -> tuple[dict[str, Any] | None, bool]:
        """The mark's document (None if there is none) and whether it was sent."""

    def sent(self, key: str) -> None:
        """Record that the listener jobs of mark ``key``'s crossing are stored, so no watcher
        re-sends it."""

    def clear(self, key: str) -> None:
        """Delete the mark (no error if there is none)."""


class FileMarks:
    """Crossing marks as files in the queue directory's ``events/``: ``KEY.fired`` holds the
    document (created exclusively), ``KEY.sent`` says it was sent."""

    def __init__(self, backend: Any) -> None:
        from forge.backends.file.fsio import private_dir

        self.uid = backend.uid
        rfd = private_dir(str(backend.root), self.uid, root=True)
        try:
            os.close(private_dir(f"{backend.root}/events", self.uid, name="events", dir_fd=rfd))
        finally:
            os.close(rfd)
        self.dir = f"{backend.root}/events"

    def create(self, key: str, doc: dict[str, Any]) -> bool:
        """Create ``KEY.fired`` holding ``doc``, synced, only if it does not exist; False if it
        does."""
        from forge.backends.file.fsio import write_new

        try:
            write_new(f"{self.dir}/{key}.fired", json.dumps(doc).encode(), sync=True)
        except FileExistsError:
            return False
        return True

    def read(self, key: str) -> tuple[dict[str, Any] | None, bool]:
        """The ``KEY.fired`` document (None if absent or unreadable) and whether ``KEY.sent`` is
        set."""
        from forge.backends.file.fsio import marker_set, read_json

        doc = read_json(Path(f"{self.dir}/{key}.fired"))
        return doc, doc is not None and marker_set(f"{self.dir}/{key}.sent", self.uid)

    def sent(self, key: str) -> None:
        """Create ``KEY.sent`` (already there is fine)."""
        from forge.backends.file.fsio import write_new

        with contextlib.suppress(FileExistsError):
            write_new(f"{self.dir}/{key}.sent", b"")

    def clear(self, key: str) -> None:
        """Delete ``KEY.sent`` and ``KEY.fired`` (absent is fine)."""
        for suffix in (".sent", ".fired"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{self.dir}/{key}{suffix}")


class RedisMarks:
    """Crossing marks as Redis keys ``PREFIX:events:KEY`` (the document, set with NX) and
    ``PREFIX:events:KEY:sent``."""

    def __init__(self, backend: Any) -> None:
        self._r = backend.server.r
        self.prefix = f"{backend.prefix}:events"

    def create(self, key: str, doc: dict[str, Any]) -> bool:
        """SET NX the mark holding ``doc``; False if it exists."""
        return bool(self._r.set(f"{self.prefix}:{key}", json.dumps(doc), nx=True))

    def read(self, key: str) -> tuple[dict[str, Any] | None, bool]:
        """The mark's document (None if absent or not a JSON object) and whether its ``:sent``
        key is set, read in one MGET."""
        raw, sent = self._r.mget([f"{self.prefix}:{key}", f"{self.prefix}:{key}:sent"])
        try:
            doc = json.loads(raw) if raw is not None else None
        except ValueError:
            doc = None
        return (doc if isinstance(doc, dict) else None), sent is not None

    def sent(self, key: str) -> None:
        """Set the mark's ``:sent`` key."""
        self._r.set(f"{self.prefix}:{key}:sent", b"1")

    def clear(self, key: str) -> None:
        """Delete the mark and its ``:sent`` key (absent is fine)."""
        self._r.delete(f"{self.prefix}:{key}:sent", f"{self.prefix}:{key}")


def marks_for(backend: Any) -> Marks:
    """The marks over ``backend``'s own storage. Raises TypeError for a backend that is neither
    the file nor the Redis one."""
    for cls in type(backend).__mro__:
        if cls.__name__ == "FileBackend":
            return FileMarks(backend)
        if cls.__name__ == "RedisBackend":
            return RedisMarks(backend)
    raise TypeError(f"The {type(backend).__name__} queue backend cannot keep threshold marks.")


class ThresholdWatch:
    """Checks the queue thresholds and raises each crossing once (see the module docstring)."""

    def __init__(self, thresholds: Thresholds, worker: str,
                 deliver: Callable[[list[Event], bool], None], clock: Callable[[], float] = time.time) -> None:
        self.thresholds = thresholds
        self.worker = worker
        #: Stores the events' listener jobs (raising on a store error), then, when asked, runs the
        #: in-process ones.
        self.deliver = deliver
        self.clock = clock
        self._marks: Marks | None = None

    def check(self, backend: Any) -> list[Event]:
        """One look at every queue; returns the events this call raised."""
        if self._marks is None:
            self._marks = marks_for(backend)
        marks, now, raised = self._marks, self.clock(), []
        for st in backend.stats():
            for kind, name in KINDS.items():
                limit = self.thresholds.for_queue(kind, st.queue)
                if not limit:
                    continue
                age = now - st.oldest_pending_at if st.oldest_pending_at is not None and st.pending else 0.0
                over = age > limit if kind == "waiting_too_long" else st.pending > limit
                key = f"{kind}.{st.queue}"
                if not over:
                    marks.clear(key)
                    continue
                shown: float | int = limit if kind == "waiting_too_long" else int(limit)
                data = {"queue": st.queue, "pending": st.pending, "threshold": shown,
                        "oldest_pending_at": _iso(st.oldest_pending_at), "oldest_age": round(age, 3),
                        "worker": self.worker}
                ev = Event(name, str(uuid.uuid4()), now, data)
                if marks.create(key, ev.to_dict()):
                    self.deliver([ev], True)
                    marks.sent(key)
                    raised.append(ev)
                    continue
                doc, sent = marks.read(key)
                if doc is not None and not sent:
                    old = Event.from_dict(doc)
                    if now - old.at > RESEND_AFTER:  # its raiser died before storing its listener jobs
                        self.deliver([old], False)
                        marks.sent(key)
        return raised


def _iso(t: float | None) -> str | None:
    from forge.events.model import rfc3339

    return rfc3339(t)
