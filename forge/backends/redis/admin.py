"""Inspection and management of a Redis queue, from outside a job's life cycle:

* inspection: ``find``, ``jobs``, ``page``, ``stats``, ``queues``, ``ids_with_prefix``;
* management: ``retry``, ``forget``, ``flush``, ``prune_done``, ``clear``, ``cancel``.

Listings read through redis-py (``Server.r``) and fetch records with the ``fetch`` script, a
page of ids at a time, so a listing reads only as many records as it yields.
"""

from __future__ import annotations

import dataclasses
import heapq
import time
from collections.abc import Iterator, Sequence
from typing import Any

from forge.backends.base import PAGE_SCAN_BUDGET, JobPage, QueueStats
from forge.backends.redis import lua
from forge.backends.redis.layout import CHUNK, unique_ttl_ms, us
from forge.backends.redis.server import Server
from forge.backends.retention import cutoff
from forge.config import validate_queue_name
from forge.errors import CorruptJob, RetryBlocked, UsageError
from forge.job import Event, JobInfo, Reason, State, decode_file, valid_id


class Admin:
    """Inspection and management operations on one ``Server``."""

    __slots__ = ("srv",)

    def __init__(self, srv: Server) -> None:
        self.srv = srv

    # -- inspection -----------------------------------------------------------------------

    def fetch_keyed(self, ids: Sequence[bytes | str]) -> list[tuple[int, JobInfo] | None]:
        """Records, states and attempts of ``ids`` with their listing sort keys, read in one
        atomic step."""
        srv = self.srv
        if not ids:
            return []
        reply = srv.run(lua.FETCH, *ids)
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
                due = srv.local(key)  # a release or retry moves "avail", not the record's available_at
                if abs(due - job.available_at) > 0.001:
                    job = dataclasses.replace(job, available_at=due)
            out.append((int(key or 0), JobInfo(job, st, int(attempts), tuple(events),
                                               srv.local(updated) if updated else None)))
        return out

    def fetch(self, ids: Sequence[bytes | str]) -> list[JobInfo | None]:
        """The ``JobInfo`` of each id (None where the job is missing or corrupt), in one atomic read."""
        return [k[1] if k else None for k in self.fetch_keyed(ids)]

    def find(self, job_id: str) -> JobInfo | None:
        """``QueueOperations.find``; raises ``UsageError`` for an id that is not a job id."""
        srv = self.srv
        if not valid_id(job_id):
            raise UsageError(f"Invalid job id {job_id!r}: expected a UUID like 3f2b…-….")
        with srv.io():
            return self.fetch([job_id])[0]

    def page_ids(self, queue: str, state: State, now_us: int, offset: int, n: int) -> list[bytes]:
        """One page of ids in ``state``, in listing order."""
        srv = self.srv
        r, key = srv.r, srv.key("q", queue, "")
        if state == State.DELAYED:
            return list(r.zrangebyscore(key + "delayed", f"({now_us}", "+inf", start=offset, num=n))
        if state == State.PENDING:
            ids: list[bytes] = r.lrange(key + "pending", offset, offset + n - 1)
            if len(ids) < n:
                # Due but not yet promoted: they follow the list (see the module docstring).
                skip = max(0, offset - r.llen(key + "pending"))
                ids += r.zrangebyscore(key + "delayed", "-inf", now_us, start=skip, num=n - len(ids))
            return ids
        return list(r.zrevrange(key + str(state), offset, offset + n - 1))

    def jobs(self, *, queue: str | None = None, state: State | None = None,
             command: str | None = None, limit: int | None = None) -> Iterator[JobInfo]:
        """``QueueOperations.jobs``: each queue read a page of ids at a time, the queues merged
        in listing order (reserved, pending, delayed oldest first; failed, done newest first)."""
        srv = self.srv
        queues = [validate_queue_name(queue)] if queue else self.queues()
        order = [State.RESERVED, State.PENDING, State.DELAYED, State.FAILED, State.DONE]
        count = 0
        with srv.io():
            now_us = us(srv.server_now())
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
        srv = self.srv
        if st == State.RESERVED:  # as many as there are running jobs: read them at once
            ids = srv.r.zrange(srv.key("q", q, "reserved"), 0, -1)
            items = [(k, i.id, i) for k, i in filter(None, self.fetch_keyed(ids))
                     if i.state == st and (not command or i.job.command == command)]
            yield from sorted(items, key=lambda item: item[:2])
            return
        offset, n = 0, 8
        while True:
            if limit is not None and not command:
                n = min(n, limit)
            ids = self.page_ids(q, st, now_us, offset, n)
            if not ids:
                return
            offset += len(ids)
            for found in self.fetch_keyed(ids):
                if found is None:
                    continue
                key, info = found
                if info.state == st and (not command or info.job.command == command):
                    yield key, info.id, info
            if len(ids) < n:
                return
            n = min(2 * n, CHUNK)

    def page(self, queue: str, state: State, *, offset: int = 0, limit: int = 50,
             command: str | None = None) -> JobPage:
        """``QueueOperations.page``: positions come from what Redis keeps in order (``pending``
        a list, the other states sorted sets), so ``LRANGE``/``ZRANGE`` start at ``offset``
        directly and only the page's records are fetched. Reserved jobs are in lease order,
        close to claim order. Raises ``UsageError`` for a bad queue name."""
        validate_queue_name(queue)
        srv = self.srv
        offset, limit = max(0, offset), max(0, limit)
        with srv.io():
            now_us = us(srv.server_now())
            r: Any = srv.r
            total = self._count(queue, state, now_us)
            jobs: list[JobInfo] = []
            pos = offset
            budget = PAGE_SCAN_BUDGET if command else limit
            while len(jobs) < limit and pos < total and pos - offset < budget:
                n = limit if not command else min(200, budget - (pos - offset))
                if state == State.RESERVED:  # scored by lease expiry: claim order is close to it
                    ids: list[bytes] = r.zrange(srv.layout.queue(queue, "reserved"), pos, pos + n - 1)
                else:
                    ids = self.page_ids(queue, state, now_us, pos, n)
                if not ids:
                    break
                for found in self.fetch_keyed(ids):
                    if len(jobs) >= limit:
                        break  # the page is full: the next one starts here
                    pos += 1
                    info = found[1] if found else None
                    if info is not None and info.state == state and (not command or info.job.command == command):
                        jobs.append(info)
                if not command:
                    pos = max(pos, offset + len(ids))
                    break
        return JobPage(jobs, total, offset, limit, pos if pos < total else None, pos - offset)

    def _count(self, queue: str, state: State, now_us: int) -> int:
        """How many of ``queue``'s jobs are in ``state`` (due delayed jobs count as pending)."""
        srv = self.srv
        r: Any = srv.r
        if state == State.PENDING:
            return int(r.llen(srv.layout.queue(queue, "pending"))
                       + r.zcount(srv.layout.queue(queue, "delayed"), "-inf", now_us))
        if state == State.DELAYED:
            return int(r.zcount(srv.layout.queue(queue, "delayed"), f"({now_us}", "+inf"))
        return int(r.zcard(srv.layout.queue(queue, str(state))))

    def stats(self, queues: Sequence[str] | None = None) -> list[QueueStats]:
        """``QueueOperations.stats``: one script run for all the queues."""
        srv = self.srv
        names = list(queues) if queues else self.queues()
        if not names:
            return []
        with srv.io():
            reply = srv.run(lua.STATS, *(validate_queue_name(q) for q in names))
            srv.clock()
        out = []
        for i, q in enumerate(names):
            pending, delayed, reserved, done, failed, oldest, paused = reply[1 + 7 * i: 8 + 7 * i]
            out.append(QueueStats(q, pending, delayed, reserved, done, failed,
                                  srv.local(oldest) if oldest else None, bool(paused)))
        return out

    def queues(self) -> list[str]:
        """``QueueOperations.queues``: the members of ``P:queues``, sorted."""
        srv = self.srv
        with srv.io():
            return sorted(m.decode() for m in srv.c.call("SMEMBERS", srv.key("queues")))

    # -- management -----------------------------------------------------------------------

    def retry(self, job_ids: Sequence[str] | None, *, queue: str | None = None,
              reason: str | None = None, command: str | None = None) -> Iterator[JobInfo | RetryBlocked]:
        """``QueueOperations.retry``: each job moved by one ``retry`` script run (its unique key
        taken back in the same step); with ``job_ids`` None, only jobs failed before the call."""
        srv = self.srv
        with srv.io():
            if job_ids is not None:
                for job_id in job_ids:
                    if valid_id(job_id):
                        info = self.fetch([job_id])[0]
                        if info is not None and info.state == State.FAILED:
                            retried = self._retry_one(info)
                            if retried is not None:
                                yield retried
                return
            start = us(srv.server_now())
            for q in [validate_queue_name(queue)] if queue else self.queues():
                for ids in self._failed_pages(q, start):
                    for info in self.fetch(ids):
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
        srv = self.srv
        key = srv.key("q", queue, "failed")
        low: str | int = "-inf"
        while True:
            page = srv.r.zrangebyscore(key, low, until_us, start=0, num=CHUNK, withscores=True)
            if not page:
                return
            last = page[-1][1]
            if len(page) == CHUNK:
                # Take every member sharing the last score, then continue strictly after it.
                page = [p for p in page if p[1] != last]
                page += srv.r.zrangebyscore(key, last, last, withscores=True)
            yield [m for m, _ in page]
            low = f"({int(last)}"

    def _retry_one(self, info: JobInfo) -> JobInfo | RetryBlocked | None:
        srv = self.srv
        now = time.time()
        ev = Event("retried", 0, now)
        job = info.job
        ttl = unique_ttl_ms(job.unique_key, job.unique_ttl)
        reply = srv.run(lua.RETRY, info.id, ev.to_json(), ttl)
        if isinstance(reply, list):  # ['dup', holder]: another live job holds the unique key
            return RetryBlocked(info.id, job.unique_key or "", reply[1].decode())
        if not reply:
            return None
        return JobInfo(job, State.PENDING, 0, (*info.events, ev), now)

    def forget(self, job_id: str) -> bool:
        """``QueueOperations.forget``: False for an invalid id or a job that is not failed."""
        srv = self.srv
        if not valid_id(job_id):
            return False
        with srv.io():
            return bool(srv.run(lua.DELETE, "failed", job_id))

    def _delete_older(self, state: str, older_than: float | None, queue: str | None) -> int:
        srv = self.srv
        removed = 0
        with srv.io():
            before = cutoff(srv.server_now(), older_than)
            last: str | int = "+inf" if before is None else us(before)
            for q in [validate_queue_name(queue)] if queue else self.queues():
                key = srv.key("q", q, state)
                while True:
                    ids = srv.c.call("ZRANGEBYSCORE", key, "-inf", last, "LIMIT", 0, 500)
                    if not ids:
                        break
                    deleted = srv.run(lua.DELETE, state, *ids)
                    removed += deleted
                    if not deleted:
                        break
        return removed

    def flush(self, *, older_than: float | None = None, queue: str | None = None) -> int:
        """``QueueOperations.flush``: failed jobs deleted 500 per script run; returns how many."""
        return self._delete_older("failed", older_than, queue)

    def prune_done(self, *, older_than: float | None = None) -> int:
        """``QueueOperations.prune_done``: done jobs deleted 500 per script run; returns how many."""
        return self._delete_older("done", older_than, None)

    def clear(self, queue: str) -> int:
        """``QueueOperations.clear``: waiting jobs deleted 500 per script run (their unique keys
        freed); returns how many."""
        srv = self.srv
        validate_queue_name(queue)
        removed = 0
        with srv.io():
            while True:
                deleted, taken = srv.run(lua.CLEAR, queue, 500)
                removed += int(deleted)
                if not taken:
                    return removed

    # -- ids, cancelling ---------------------------------------------------------------

    def ids_with_prefix(self, prefix: str, limit: int = 100) -> list[str]:
        """``QueueOperations.ids_with_prefix``: a SCAN of ``P:info:<prefix>*``."""
        srv = self.srv
        start = len(srv.key("info", ""))
        found: list[str] = []
        with srv.io():
            for key in srv.r.scan_iter(match=srv.key("info", prefix) + "*", count=5000):
                found.append(key.decode()[start:])
                if len(found) >= limit:
                    break
        return sorted(found)

    def cancel(self, job_id: str) -> JobInfo | None:
        """``QueueOperations.cancel``: one ``cancel`` script run; the job as failed, or None."""
        srv = self.srv
        if not valid_id(job_id):
            return None
        with srv.io():
            info = self.fetch([job_id])[0]
            if info is None or info.state not in (State.PENDING, State.DELAYED):
                return None
            event = Event("failed", info.attempts, time.time(), reason=str(Reason.CANCELLED),
                          error="cancelled (queue:cancel)")
            status, _ = srv.run(lua.CANCEL, job_id, event.to_json())
            return self.fetch([job_id])[0] if status == b"ok" else None
