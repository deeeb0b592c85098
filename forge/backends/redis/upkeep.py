"""Keeping a Redis queue healthy, and what workers publish beside their jobs: ``maintain``
(due delayed jobs promoted, claims whose lease ran out recovered or failed as abandoned, done
jobs pruned), pause/resume and the restart marker, the worker registry, cancel requests, and
the capped per-job output logs.
"""

from __future__ import annotations

import json
import time
from typing import Any

from forge.backends.base import Claim
from forge.backends.redis import lua
from forge.backends.redis.admin import Admin
from forge.backends.redis.claim import Claimer
from forge.backends.redis.layout import CHUNK, us
from forge.backends.redis.server import Server, raise_first
from forge.backends.retention import LOG_CAP, prune_age
from forge.config import validate_queue_name
from forge.errors import CorruptJob, UsageError
from forge.job import Event, Job, Reason, decode_file, valid_id
from forge.stats.journal import record_outcome

#: How long the restart marker read with a wait's wake-up stands for a fresh read (seconds).
RESTART_FRESH = 0.05


class Upkeep:
    """Maintenance and the workers' side records of one ``Server``. ``journal_owner`` is the
    backend whose journal records recovered outcomes and whose ``on_recovered`` hook (set by
    the worker, ``forge.events``) hears of them."""

    __slots__ = ("srv", "claimer", "admin", "journal_owner")

    def __init__(self, srv: Server, claimer: Claimer, admin: Admin, journal_owner: Any) -> None:
        self.srv = srv
        self.claimer = claimer
        self.admin = admin
        self.journal_owner = journal_owner

    # -- maintenance ----------------------------------------------------------------------

    def maintain(self, default_tries: int = 1) -> dict[str, int]:
        """``Backend.maintain``: promote due jobs, recover expired claims, prune done jobs past
        the retention. Returns counts (recovered, abandoned, pruned, temp_removed)."""
        srv = self.srv
        counts = {"recovered": 0, "abandoned": 0, "pruned": 0, "temp_removed": 0}
        with srv.io():
            for q in self.admin.queues():
                srv.run(lua.PROMOTE, q)
                seen: set[bytes] = set()
                while True:
                    now_us = us(srv.server_now())
                    expired = srv.c.call("ZRANGEBYSCORE", srv.layout.queue(q, "reserved"), "-inf", now_us,
                                         "LIMIT", 0, CHUNK)
                    fresh = [i for i in expired if i not in seen]
                    if not fresh:
                        break
                    seen.update(fresh)
                    for job_id in fresh:
                        outcome = self._recover(job_id.decode(), default_tries)
                        if outcome:
                            counts[outcome] += 1
        age = prune_age(srv.done_retention)
        if age is not None:
            counts["pruned"] = self.admin.prune_done(older_than=age)
        return counts

    def _recover(self, job_id: str, default_tries: int) -> str | None:
        """Release or fail (as abandoned) one claim whose lease ran out; which it was, or None
        if it is no longer reserved or its lease was renewed meanwhile."""
        srv = self.srv
        replies = raise_first(srv.c.pipeline([
            ("MULTI",), ("GET", srv.key("job", job_id)),
            ("HMGET", srv.key("info", job_id), "state", "token", "attempts", "ahead"), ("EXEC",)]))
        record, (state, token, attempts, ahead) = replies[-1]
        if state != b"reserved" or token is None:
            return None
        attempt = int(attempts or 0)
        if ahead is not None and ahead == token:
            # Claimed ahead (forge.worker.supervisor) by a worker that died before it said the
            # job started: this attempt never ran; released uncounted, no event. Its next claim
            # is never made ahead (noahead, set first: harmless if the finish is refused), so a
            # job that kills its worker as it starts gets one uncounted try at most.
            srv.c.call("HSET", srv.key("info", job_id), "noahead", "1")
            if not self.claimer.finish(token.decode(), job_id, "release", None, attempt - 1, 0.0, only_expired=True):
                return None
            return "recovered"
        try:
            job: Job | None = decode_file(record)[0]
        except CorruptJob:
            job = None
        from forge.retry.policy import recovery  # here: recovering is rare

        exhausted, delay = (True, 0.0) if job is None else recovery(job, attempt, default_tries)
        event = Event("failed" if exhausted else "released", attempt, time.time(),
                      reason=Reason.ABANDONED, error="the worker died during this attempt")
        mode = "failed" if exhausted else "release"
        if not self.claimer.finish(token.decode(), job_id, mode, event, attempt, delay, only_expired=True):
            return None
        hook = getattr(self.journal_owner, "on_recovered", None)  # forge.events: the worker's job events
        if hook is not None and job is not None:
            hook(job, attempt, event)
        if job is not None:
            record_outcome(self.journal_owner, Claim(job, attempt, event.at, event.at), event)
        return "abandoned" if exhausted else "recovered"

    # -- pause, resume, restart -----------------------------------------------------------

    def pause(self, queue: str) -> None:
        """``Backend.pause``: workers stop claiming from ``queue`` (it is listed from now on)."""
        validate_queue_name(queue)
        srv = self.srv
        with srv.io():
            pipe = srv.r.pipeline(transaction=True)
            pipe.sadd(srv.key("queues"), queue)
            pipe.sadd(srv.key("paused"), queue)
            pipe.execute()

    def resume(self, queue: str) -> None:
        """``Backend.resume``: ``queue`` is claimable again; one idle worker is woken."""
        validate_queue_name(queue)
        srv = self.srv
        notify = srv.layout.queue(queue, "notify")
        with srv.io():
            pipe = srv.r.pipeline(transaction=True)
            pipe.srem(srv.key("paused"), queue)
            pipe.rpush(notify, "1")
            pipe.ltrim(notify, -8, -1)
            pipe.execute()

    def forget_queue(self, queue: str) -> bool:
        """Remove an empty queue (its name and pause marker); False if it holds any job."""
        validate_queue_name(queue)
        import redis

        srv = self.srv
        keys = [srv.layout.queue(queue, s) for s in ("pending", "delayed", "reserved", "done", "failed")]
        with srv.io():
            with srv.r.pipeline(transaction=True) as pipe:
                while True:
                    try:
                        pipe.watch(*keys)
                        if any(pipe.exists(k) for k in keys):
                            pipe.unwatch()
                            return False
                        pipe.multi()
                        pipe.srem(srv.key("queues"), queue)
                        pipe.srem(srv.key("paused"), queue)
                        pipe.delete(srv.layout.queue(queue, "notify"))
                        pipe.execute()
                        return True
                    except redis.WatchError:
                        continue

    def paused(self) -> set[str]:
        """``Backend.paused``: the paused queues' names."""
        srv = self.srv
        with srv.io():
            return {m.decode() for m in srv.r.smembers(srv.key("paused"))}

    def request_restart(self) -> float:
        """``Backend.request_restart``: the marker's time."""
        now = time.time()
        srv = self.srv
        srv.restart_cache = None
        with srv.io():
            srv.r.set(srv.key("restart"), repr(now))
        return now

    def restart_requested_at(self) -> float | None:
        """``Backend.restart_requested_at``: the last restart marker's time, if any; the value
        read with an idle wait's wake-up stands for ``RESTART_FRESH`` seconds."""
        srv = self.srv
        cached = srv.restart_cache
        if cached is not None and time.monotonic() - cached[0] < RESTART_FRESH:
            value = cached[1]  # read with the wake-up of a wait just now
        else:
            with srv.io():
                value = srv.c.call("GET", srv.key("restart"))
        try:
            return float(value) if value is not None else None
        except ValueError:
            return None

    # -- cancel requests, the worker registry ---------------------------------------------

    def request_cancel(self, job_id: str) -> None:
        """``Backend.request_cancel`` (the request expires after a day)."""
        srv = self.srv
        with srv.io():
            srv.r.set(srv.key("cancel", job_id), repr(time.time()), ex=86400)

    def cancel_requested(self, job_id: str) -> bool:
        """``Backend.cancel_requested``: one EXISTS."""
        srv = self.srv
        with srv.io():
            return bool(srv.c.call("EXISTS", srv.key("cancel", job_id)))

    def clear_cancel(self, job_id: str) -> None:
        """``Backend.clear_cancel``: the request is gone (no error if there was none)."""
        srv = self.srv
        with srv.io():
            srv.c.call("DEL", srv.key("cancel", job_id))

    def put_worker(self, name: str, record: bytes, ttl: float) -> None:
        """``Backend.put_worker``: the record and its registry entry in one transaction."""
        srv = self.srv
        with srv.io():
            raise_first(srv.c.pipeline([
                ("MULTI",), ("SET", srv.key("worker", name), record, "PX", max(int(ttl * 1000), 1000)),
                ("ZADD", srv.key("workers"), repr(time.time() + ttl), name), ("EXEC",)]))

    def drop_worker(self, name: str) -> None:
        """``Backend.drop_worker``: its record, registry entry and last-claim key removed."""
        srv = self.srv
        with srv.io():
            raise_first(srv.c.pipeline([("MULTI",), ("DEL", srv.key("worker", name),
                                                      srv.key("wclaim", json.dumps(name))),
                                        ("ZREM", srv.key("workers"), name), ("EXEC",)]))

    def worker_records(self) -> list[bytes]:
        """``Backend.worker_records``: every live record; expired entries leave the registry."""
        srv = self.srv
        with srv.io():
            names = srv.r.zrange(srv.key("workers"), 0, -1)
            if not names:
                return []
            records: list[bytes | None] = srv.r.mget([srv.key("worker", n.decode()) for n in names])
            gone = [n for n, r in zip(names, records, strict=True) if r is None]
            if gone:  # expired: the worker died without removing its record
                srv.r.zrem(srv.key("workers"), *gone)
            return [r for r in records if r is not None]

    # -- logs -----------------------------------------------------------------------------

    def append_log(self, job_id: str, data: bytes) -> None:
        """``Backend.append_log``: appended up to ``LOG_CAP`` bytes in all (the rest dropped)."""
        if not valid_id(job_id) or not data:
            return
        srv = self.srv
        with srv.io():
            srv.run(lua.APPEND_LOG, job_id, data[:LOG_CAP], LOG_CAP)

    def read_log(self, job_id: str, offset: int = 0) -> bytes:
        """``Backend.read_log``: at most ``LOG_CAP`` bytes from ``offset``; raises ``UsageError``
        for an invalid id."""
        if not valid_id(job_id):
            raise UsageError(f"Invalid job id {job_id!r}.")
        srv = self.srv
        with srv.io():
            offset = max(0, offset)
            data: bytes | None = srv.r.getrange(srv.key("log", job_id), offset, offset + LOG_CAP - 1)
            return data or b""
