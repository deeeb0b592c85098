"""Schedule state in the Redis backend: the hash ``P:schedule`` (entry name -> state JSON).

A read-modify-write is an optimistic transaction (WATCH the hash, read, MULTI/EXEC the writes;
retried if another host wrote meanwhile), so updates from many hosts never interleave, and
with the server's persistence a stored state is as durable as a stored job.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterable
from typing import Any

from forge.backends.redis.server import Server, translate
from forge.scheduler.state import EntryState, Updater


class RedisScheduleStore:
    """``ScheduleStore`` (``forge.scheduler.state``) over a ``RedisBackend``'s server and
    prefix; each method's contract is the protocol's. Redis errors become ``QueueUnavailable``."""

    def __init__(self, backend: Any) -> None:
        srv: Server = backend.server
        self._srv = srv
        self._r = srv.r
        self.key = srv.key("schedule")
        #: The states last read, by their stored bytes: a value unchanged since (most of them,
        #: from a run's first read to its update) is not parsed again.
        self._seen: dict[bytes, EntryState] = {}

    def _parse(self, raw: Any, keep: dict[bytes, EntryState]) -> EntryState:
        if raw is None:
            return EntryState()
        got = self._seen.get(raw)
        if got is None:
            got = EntryState.from_dict(_json(raw))
        keep[raw] = got
        return got

    def _call(self, fn: Callable[[], Any]) -> Any:
        from redis import exceptions as rx

        try:
            return fn()
        except rx.RedisError as exc:
            raise translate(exc, self._srv.where, dispatch=False, url_from=self._srv.url_from) from None

    def read(self, names: Iterable[str] | None = None) -> dict[str, EntryState]:
        """The stored states of ``names`` (those that have one), or of every entry."""
        keep: dict[bytes, EntryState] = {}
        if names is None:
            raw = self._call(lambda: self._r.hgetall(self.key))
            out = {k.decode(): self._parse(v, keep) for k, v in raw.items()}
        else:
            names = list(names)
            vals = self._call(lambda: self._r.hmget(self.key, names)) if names else []
            out = {n: self._parse(v, keep) for n, v in zip(names, vals, strict=True) if v is not None}
        self._seen = keep
        return out

    def update(self, names: Iterable[str], fn: Updater) -> dict[str, EntryState]:
        """Read ``names``, apply ``fn``, write what it changed: one optimistic transaction
        (retried if another host wrote meanwhile). Returns the states after it."""
        names = list(names)
        out: dict[str, EntryState] = {}

        def txn(pipe: Any) -> None:
            vals = pipe.hmget(self.key, names) if names else []
            keep: dict[bytes, EntryState] = {}
            cur = {n: self._parse(v, keep) for n, v in zip(names, vals, strict=True)}
            self._seen = keep
            new = fn(cur)
            cur.update(new)
            out.clear()
            out.update(cur)
            if new:
                pipe.multi()
                pipe.hset(self.key, mapping={n: json.dumps(s.to_dict(), separators=(",", ":"))
                                             for n, s in new.items()})

        self._call(lambda: self._r.transaction(txn, self.key))
        return out

    def names(self) -> list[str]:
        """Every entry name with a stored state."""
        return [k.decode() for k in self._call(lambda: self._r.hkeys(self.key))]

    def drop(self, names: Iterable[str], fn: Callable[[EntryState], bool]) -> list[str]:
        """Delete, atomically, the states of ``names`` for which ``fn`` holds; returns those."""
        names = list(names)
        gone: list[str] = []

        def txn(pipe: Any) -> None:
            vals = pipe.hmget(self.key, names) if names else []
            gone[:] = [n for n, v in zip(names, vals, strict=True)
                       if v is not None and fn(EntryState.from_dict(_json(v)))]
            if gone:
                pipe.multi()
                pipe.hdel(self.key, *gone)

        self._call(lambda: self._r.transaction(txn, self.key))
        return gone

    def session(self) -> Any:
        """No lock is needed around a run (every update is a transaction): a no-op context."""
        return contextlib.nullcontext()

    def close(self) -> None:
        """Nothing to close: the connection is the backend's."""


def _json(v: Any) -> Any:
    if v is None:
        return None
    try:
        return json.loads(v)
    except ValueError:
        return None
