"""Dispatch on the Redis backend: ``push`` stores and enqueues a batch of jobs in one script run
(``scripts/push.lua``), taking their unique keys and idempotency keys in the same atomic step.

A unique key is ``P:unique:<hash>`` naming the job that holds it (PX = the key's ttl); a job
whose id derives from an idempotency key is stored only if ``P:info:<id>`` does not exist
(``forge.job.idempotent_id``), so the id is the key. A push sent again after a lost reply
stores nothing twice: a job whose id exists is skipped.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from forge.backends.redis import lua
from forge.backends.redis.layout import hash_key, unique_ttl_ms, us
from forge.backends.redis.server import Server
from forge.config import validate_queue_name
from forge.errors import DuplicateJob, UsageError
from forge.job import MAX_PAYLOAD_BYTES, Job, is_idempotent_id


class Store:
    """Writes jobs into the queue of one ``Server``."""

    __slots__ = ("srv",)

    def __init__(self, srv: Server) -> None:
        self.srv = srv

    def push(self, jobs: Sequence[Job]) -> list[bool]:
        """``Backend.push``: one script run, all or nothing. Returns, per job, whether this call
        stored it. Raises ``UsageError`` (a bad queue name, a job over the payload cap),
        ``DuplicateJob`` (a unique key held), ``DispatchFailed``/``QueueUnavailable``."""
        if not jobs:
            return []
        now = time.time()
        skew = self._clock_for_push(jobs, now)
        args: list[Any] = [len(jobs)]
        keys: dict[str, str] = {}
        for job in jobs:
            queue = job.queue
            validate_queue_name(queue)
            blob = job.to_json()
            if len(blob) > MAX_PAYLOAD_BYTES:
                raise UsageError(f"Job {job.id} is {len(blob)} bytes, over the {MAX_PAYLOAD_BYTES}-byte cap.")
            ukey = ttl = ""
            if job.unique_key is not None:
                ukey = hash_key(job.unique_key)
                keys[ukey] = job.unique_key
                ttl = unique_ttl_ms(job.unique_key, job.unique_ttl)
            timeout = str(us(job.timeout)) if job.timeout is not None else ""
            due = us(job.available_at + skew) if job.available_at > now else 0
            args += (job.id, queue, blob, due, timeout, ukey, ttl)
        with self.srv.io(dispatch=True):
            reply = self.srv.run(lua.PUSH, *args)
        if reply[0] == b"dup":
            raise DuplicateJob(keys.get(reply[1].decode(), reply[1].decode()), reply[2].decode())
        # A random id that exists was stored by this very push, on a retry after a lost reply.
        if len(jobs) == 1 and reply[2] == b"1":
            return [True]
        return [flag == "1" or not is_idempotent_id(job.id) for job, flag in zip(jobs, reply[2].decode(), strict=True)]

    def _clock_for_push(self, jobs: Sequence[Job], now: float) -> float:
        """Only delayed jobs need the server's clock (a due time is stored on it)."""
        if not any(j.available_at > now for j in jobs):
            return 0.0
        with self.srv.io(dispatch=True):
            return self.srv.clock()
