"""The Redis backend's inspection and management operations, as a mixin of ``RedisBackend``.

``RedisBackend`` (``redis``) is the core: connection and clock, dispatch, claiming, outcomes,
maintenance. This module holds what reads or rearranges jobs from outside that life cycle:

* inspection: ``find``, ``jobs``, ``stats``, ``queues``;
* management: ``retry``, ``forget``, ``flush``, ``prune_done``, ``clear``, ``pause``,
  ``resume``, the restart marker, and the capped output logs.

``RedisAdmin`` keeps no state of its own: it works through the client and helpers the core sets
up (declared below for type checking), so it is only ever used as ``RedisBackend``'s base.
"""

from __future__ import annotations

import contextlib
import dataclasses
import heapq
import json
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from forge.backends.base import QueueStats
from forge.backends.redis.helpers import CHUNK, LOG_CAP
from forge.backends.redis.helpers import us as _us
from forge.config import validate_queue_name
from forge.errors import RetryBlocked, UsageError
from forge.job import CorruptJob, Event, JobInfo, Reason, State, decode_file, valid_id

#: How long the restart marker read with a wait's wake-up stands for a fresh read (seconds).
RESTART_FRESH = 0.05


class RedisAdmin:
    """Inspection and management of a Redis queue (mixed into ``RedisBackend``)."""

    _r: Any  # redis-py's client (imported on first use)
    _c: Any  # the hot path's client (forge.backends.redis.resp, or redis-py's calls for TLS)
    _restart_cache: tuple[float, Any] | None  # (monotonic time, value of P:restart) read by wait

    if TYPE_CHECKING:  # provided by RedisBackend
        def _io(self, dispatch: bool = False) -> contextlib.AbstractContextManager[None]: ...
        def _run(self, name: str, *args: Any) -> Any: ...
        def _key(self, *parts: str) -> str: ...
        def _clock(self) -> float: ...
        def _local(self, server_us: Any) -> float: ...
        def _server_now(self) -> float: ...

    # -- inspection -----------------------------------------------------------------------

    def _fetch_keyed(self, ids: Sequence[bytes | str]) -> list[tuple[int, JobInfo] | None]:
        """Records, states and attempts of ``ids`` with their listing sort keys, read in one
        atomic step."""
        if not ids:
            return []
        reply = self._run("fetch", *ids)
        out: list[tuple[int, JobInfo] | None] = []
        for i in range(1, len(reply), 5):
            state, attempts, updated, key, record = reply[i:i + 5]
            if not state:
                out.append(None)
                continue
            try:
                job, events = decode_file(record)
            except CorruptJob:
                out.append(None)
                continue
            st = State(state.decode())
            if st in (State.PENDING, State.DELAYED) and key and int(key):
                due = self._local(key)  # a release or retry moves "avail", not the record's available_at
                if abs(due - job.available_at) > 0.001:
                    job = dataclasses.replace(job, available_at=due)
            out.append((int(key or 0), JobInfo(job, st, int(attempts), tuple(events),
                                               self._local(updated) if updated else None)))
        return out

    def _fetch(self, ids: Sequence[bytes | str]) -> list[JobInfo | None]:
        return [k[1] if k else None for k in self._fetch_keyed(ids)]

    def find(self, job_id: str) -> JobInfo | None:
        if not valid_id(job_id):
            raise UsageError(f"Invalid job id {job_id!r}: expected a UUID like 3f2b…-….")
        with self._io():
            return self._fetch([job_id])[0]

    def _ids(self, queue: str, state: State, now_us: int, offset: int, n: int) -> list[bytes]:
        """One page of ids in ``state``, in listing order."""
        r, key = self._r, self._key("q", queue, "")
        if state == State.DELAYED:
            return r.zrangebyscore(key + "delayed", f"({now_us}", "+inf", start=offset, num=n)
        if state == State.PENDING:
            ids = r.lrange(key + "pending", offset, offset + n - 1)
            if len(ids) < n:
                # Due but not yet promoted: they follow the list (see the module docstring).
                skip = max(0, offset - r.llen(key + "pending"))
                ids += r.zrangebyscore(key + "delayed", "-inf", now_us, start=skip, num=n - len(ids))
            return ids
        return r.zrevrange(key + str(state), offset, offset + n - 1)

    def jobs(self, *, queue: str | None = None, state: State | None = None,
             command: str | None = None, limit: int | None = None) -> Iterator[JobInfo]:
        queues = [validate_queue_name(queue)] if queue else self.queues()
        order = [State.RESERVED, State.PENDING, State.DELAYED, State.FAILED, State.DONE]
        count = 0
        with self._io():
            now_us = _us(self._server_now())
            for st in order:
                if state is not None and st != state:
                    continue
                # Each queue's stream is in listing order; merged like the file backend's
                # listing: oldest first, failed and done newest first.
                streams = [self._stream(q, st, now_us, command, limit) for q in queues]
                newest_first = st in (State.FAILED, State.DONE)
                merged = streams[0] if len(streams) == 1 else heapq.merge(
                    *streams, key=lambda item: item[:2], reverse=newest_first)
                for _, _, info in merged:
                    yield info
                    count += 1
                    if limit is not None and count >= limit:
                        return

    def _stream(self, q: str, st: State, now_us: int, command: str | None,
                limit: int | None) -> Iterator[tuple[int, str, JobInfo]]:
        """(sort key, id, info) of one queue's jobs in ``st``, read a page at a time."""
        if st == State.RESERVED:  # as many as there are running jobs: read them at once
            ids = self._r.zrange(self._key("q", q, "reserved"), 0, -1)
            items = [(k, i.id, i) for k, i in filter(None, self._fetch_keyed(ids))
                     if i.state == st and (not command or i.job.command == command)]
            yield from sorted(items, key=lambda item: item[:2])
            return
        offset, n = 0, 8
        while True:
            if limit is not None and not command:
                n = min(n, limit)
            ids = self._ids(q, st, now_us, offset, n)
            if not ids:
                return
            offset += len(ids)
            for found in self._fetch_keyed(ids):
                if found is None:
                    continue
                key, info = found
                if info.state == st and (not command or info.job.command == command):
                    yield key, info.id, info
            if len(ids) < n:
                return
            n = min(2 * n, CHUNK)

    def stats(self, queues: Sequence[str] | None = None) -> list[QueueStats]:
        names = list(queues) if queues else self.queues()
        if not names:
            return []
        with self._io():
            reply = self._run("stats", *(validate_queue_name(q) for q in names))
            self._clock()
        out = []
        for i, q in enumerate(names):
            pending, delayed, reserved, done, failed, oldest, paused = reply[1 + 7 * i: 8 + 7 * i]
            out.append(QueueStats(q, pending, delayed, reserved, done, failed,
                                  self._local(oldest) if oldest else None, bool(paused)))
        return out

    def queues(self) -> list[str]:
        with self._io():
            return sorted(m.decode() for m in self._c.call("SMEMBERS", self._key("queues")))

    # -- management -----------------------------------------------------------------------

    def retry(self, job_ids: Sequence[str] | None, *, queue: str | None = None,
              reason: str | None = None, command: str | None = None) -> Iterator[JobInfo | RetryBlocked]:
        with self._io():
            if job_ids is not None:
                for job_id in job_ids:
                    if valid_id(job_id):
                        info = self._fetch([job_id])[0]
                        if info is not None and info.state == State.FAILED:
                            retried = self._retry_one(info)
                            if retried is not None:
                                yield retried
                return
            start = _us(self._server_now())
            for q in [validate_queue_name(queue)] if queue else self.queues():
                for ids in self._failed_pages(q, start):
                    for info in self._fetch(ids):
                        if info is None or info.state != State.FAILED:
                            continue
                        if command and info.job.command != command:
                            continue
                        failure = info.failure
                        if reason and (failure is None or failure.reason != reason):
                            continue
                        retried = self._retry_one(info)
                        if retried is not None:
                            yield retried

    def _failed_pages(self, queue: str, until_us: int) -> Iterator[list[bytes]]:
        """Failed ids (failed before ``until_us``) oldest first, a page at a time, by a
        score cursor: pages stay correct while earlier entries are being removed."""
        key = self._key("q", queue, "failed")
        low: str | int = "-inf"
        while True:
            page = self._r.zrangebyscore(key, low, until_us, start=0, num=CHUNK, withscores=True)
            if not page:
                return
            last = page[-1][1]
            if len(page) == CHUNK:
                # Take every member sharing the last score, then continue strictly after it.
                page = [p for p in page if p[1] != last]
                page += self._r.zrangebyscore(key, last, last, withscores=True)
            yield [m for m, _ in page]
            low = f"({int(last)}"

    def _retry_one(self, info: JobInfo) -> JobInfo | RetryBlocked | None:
        now = time.time()
        ev = Event("retried", 0, now)
        job = info.job
        ttl = str(max(1, _us(job.unique_ttl) // 1000)) if job.unique_key and job.unique_ttl else ""
        reply = self._run("retry", info.id, ev.to_json(), ttl)
        if isinstance(reply, list):  # ['dup', holder]: another live job holds the unique key
            return RetryBlocked(info.id, job.unique_key or "", reply[1].decode())
        if not reply:
            return None
        return JobInfo(job, State.PENDING, 0, (*info.events, ev), now)

    def forget(self, job_id: str) -> bool:
        if not valid_id(job_id):
            return False
        with self._io():
            return bool(self._run("delete", "failed", job_id))

    def _delete_older(self, state: str, older_than: float | None, queue: str | None) -> int:
        removed = 0
        with self._io():
            cutoff: str | int = "+inf"
            if older_than is not None:
                cutoff = _us(self._server_now() - older_than)
            for q in [validate_queue_name(queue)] if queue else self.queues():
                key = self._key("q", q, state)
                while True:
                    ids = self._c.call("ZRANGEBYSCORE", key, "-inf", cutoff, "LIMIT", 0, 500)
                    if not ids:
                        break
                    deleted = self._run("delete", state, *ids)
                    removed += deleted
                    if not deleted:
                        break
        return removed

    def flush(self, *, older_than: float | None = None, queue: str | None = None) -> int:
        return self._delete_older("failed", older_than, queue)

    def prune_done(self, *, older_than: float | None = None) -> int:
        return self._delete_older("done", older_than, None)

    def clear(self, queue: str) -> int:
        validate_queue_name(queue)
        removed = 0
        with self._io():
            while True:
                deleted, taken = self._run("clear", queue, 500)
                removed += deleted
                if not taken:
                    return removed

    def pause(self, queue: str) -> None:
        validate_queue_name(queue)
        with self._io():
            pipe = self._r.pipeline(transaction=True)
            pipe.sadd(self._key("queues"), queue)
            pipe.sadd(self._key("paused"), queue)
            pipe.execute()

    def resume(self, queue: str) -> None:
        validate_queue_name(queue)
        notify = self._key("q", queue, "notify")
        with self._io():
            pipe = self._r.pipeline(transaction=True)
            pipe.srem(self._key("paused"), queue)
            pipe.rpush(notify, "1")
            pipe.ltrim(notify, -8, -1)
            pipe.execute()

    def forget_queue(self, queue: str) -> bool:
        """Remove an empty queue (its name and pause marker); False if it holds any job."""
        validate_queue_name(queue)
        import redis

        keys = [self._key("q", queue, s) for s in ("pending", "delayed", "reserved", "done", "failed")]
        with self._io():
            with self._r.pipeline(transaction=True) as pipe:
                while True:
                    try:
                        pipe.watch(*keys)
                        if any(pipe.exists(k) for k in keys):
                            pipe.unwatch()
                            return False
                        pipe.multi()
                        pipe.srem(self._key("queues"), queue)
                        pipe.srem(self._key("paused"), queue)
                        pipe.delete(self._key("q", queue, "notify"))
                        pipe.execute()
                        return True
                    except redis.WatchError:
                        continue

    def paused(self) -> set[str]:
        with self._io():
            return {m.decode() for m in self._r.smembers(self._key("paused"))}

    def request_restart(self) -> float:
        now = time.time()
        self._restart_cache = None
        with self._io():
            self._r.set(self._key("restart"), repr(now))
        return now

    def restart_requested_at(self) -> float | None:
        cached = self._restart_cache
        if cached is not None and time.monotonic() - cached[0] < RESTART_FRESH:
            value = cached[1]  # read with the wake-up of a wait just now
        else:
            with self._io():
                value = self._c.call("GET", self._key("restart"))
        try:
            return float(value) if value is not None else None
        except ValueError:
            return None

    # -- cancelling, the worker registry ---------------------------------------------------

    def ids_with_prefix(self, prefix: str, limit: int = 100) -> list[str]:
        start = len(self._key("info", ""))
        found: list[str] = []
        with self._io():
            for key in self._r.scan_iter(match=self._key("info", prefix) + "*", count=5000):
                found.append(key.decode()[start:])
                if len(found) >= limit:
                    break
        return sorted(found)

    def cancel(self, job_id: str) -> JobInfo | None:
        if not valid_id(job_id):
            return None
        with self._io():
            info = self._fetch([job_id])[0]
            if info is None or info.state not in (State.PENDING, State.DELAYED):
                return None
            event = Event("failed", info.attempts, time.time(), reason=str(Reason.CANCELLED),
                          error="cancelled (queue:cancel)")
            status, _ = self._run("cancel", job_id, event.to_json())
            return self._fetch([job_id])[0] if status == b"ok" else None

    def request_cancel(self, job_id: str) -> None:
        with self._io():
            self._r.set(self._key("cancel", job_id), repr(time.time()), ex=86400)

    def cancel_requested(self, job_id: str) -> bool:
        with self._io():
            return bool(self._c.call("EXISTS", self._key("cancel", job_id)))

    def clear_cancel(self, job_id: str) -> None:
        with self._io():
            self._c.call("DEL", self._key("cancel", job_id))

    def put_worker(self, name: str, record: bytes, ttl: float) -> None:
        with self._io():
            _raise_first(self._c.pipeline([
                ("MULTI",), ("SET", self._key("worker", name), record, "PX", max(int(ttl * 1000), 1000)),
                ("ZADD", self._key("workers"), repr(time.time() + ttl), name), ("EXEC",)]))

    def drop_worker(self, name: str) -> None:
        with self._io():
            _raise_first(self._c.pipeline([("MULTI",), ("DEL", self._key("worker", name),
                                                         self._key("wclaim", json.dumps(name))),
                                           ("ZREM", self._key("workers"), name), ("EXEC",)]))

    def worker_records(self) -> list[bytes]:
        with self._io():
            names = self._r.zrange(self._key("workers"), 0, -1)
            if not names:
                return []
            records = self._r.mget([self._key("worker", n.decode()) for n in names])
            gone = [n for n, r in zip(names, records, strict=True) if r is None]
            if gone:  # expired: the worker died without removing its record
                self._r.zrem(self._key("workers"), *gone)
            return [r for r in records if r is not None]

    # -- logs -----------------------------------------------------------------------------

    def append_log(self, job_id: str, data: bytes) -> None:
        if not valid_id(job_id) or not data:
            return
        with self._io():
            self._run("append_log", job_id, data[:LOG_CAP], LOG_CAP)

    def read_log(self, job_id: str, offset: int = 0) -> bytes:
        if not valid_id(job_id):
            raise UsageError(f"Invalid job id {job_id!r}.")
        with self._io():
            offset = max(0, offset)
            return self._r.getrange(self._key("log", job_id), offset, offset + LOG_CAP - 1) or b""


def _raise_first(replies: list[Any]) -> list[Any]:
    """A pipeline's replies, or its first error reply raised."""
    for r in replies:
        if isinstance(r, Exception):
            raise r
    return replies
