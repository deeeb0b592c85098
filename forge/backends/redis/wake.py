"""An idle Redis worker's wait: ``BLPOP`` on the queues' notify lists (``P:q:<queue>:notify``,
pushed by every script that makes a job due), capped at the next delayed job's due time.

``wait_claim`` pipelines the ``claim`` script behind the ``BLPOP`` on one connection: the server
runs it the moment the ``BLPOP`` returns (woken by a dispatch, or at its timeout), so a job
dispatched to an idle worker is claimed without the round trip the worker would otherwise make
after waking. The claim is the ``claim`` script's own (same token handling: a reply lost on the
way is answered by the worker's last-claim key), and the worker treats what it returns as it
treats any claim (one it may not run is released). Either wait reads the restart marker with
the wake-up (``Server.restart_cache``): a worker checks it before its next claim.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from forge.backends.base import Claim
from forge.backends.redis import lua
from forge.backends.redis.claim import Claimer
from forge.backends.redis.server import BLOCK_CAP, Server, raise_first
from forge.config import validate_queue_name


class Waker:
    """Idle waits on one ``Server``, with or without the claim that follows (``Claimer``)."""

    __slots__ = ("srv", "claimer")

    def __init__(self, srv: Server, claimer: Claimer) -> None:
        self.srv = srv
        self.claimer = claimer

    def next_due(self, queues: Sequence[str]) -> float | None:
        """``Backend.next_due``: the earliest delayed job's due time (local clock), if any."""
        srv = self.srv
        with srv.io():
            replies = raise_first(srv.c.pipeline([
                ("ZRANGE", srv.layout.queue(validate_queue_name(q), "delayed"), 0, 0, "WITHSCORES")
                for q in queues]))
            # [member, score], or [[member, score]] as redis-py parses WITHSCORES
            heads = [float(r[0][1] if isinstance(r[0], list | tuple) else r[1]) for r in replies if r]
            return srv.local(min(heads)) if heads else None

    def wait(self, queues: Sequence[str], timeout: float) -> None:
        """``Backend.wait``: block until a job may be claimable, at most ``timeout`` seconds
        (and never past ``BLOCK_CAP`` in one call, nor past the next delayed job's due time)."""
        if timeout <= 0 or not queues:
            return
        due = self.next_due(queues)
        if due is not None:
            timeout = min(timeout, due - time.time())
        if timeout <= 0.001:
            return
        srv = self.srv
        keys = [srv.layout.queue(q, "notify") for q in queues]
        block = min(timeout, BLOCK_CAP)
        with srv.io():
            woke, marker = srv.c.pipeline([("BLPOP", *keys, f"{block:.3f}"), ("GET", srv.key("restart"))],
                                          timeout=block + srv.socket_timeout)
            if isinstance(woke, Exception):
                raise woke
            if not isinstance(marker, Exception):
                srv.restart_cache = (time.monotonic(), marker)

    def wait_claim(self, queues: Sequence[str], timeout: float, worker: str,
                   claim_timeout: float) -> Claim | None:
        """``wait(queues, timeout)`` and then ``claim(queues, worker, claim_timeout)``, in one
        round trip. None: nothing was claimed (the caller claims as usual next). Unlike
        ``wait``, it does not look up the next delayed job's due time: the caller (the worker's
        idle wait) has just capped ``timeout`` at it."""
        if timeout <= 0.001 or not queues:
            return None
        srv, claimer = self.srv, self.claimer
        keys = [srv.layout.queue(q, "notify") for q in queues]
        block = min(timeout, BLOCK_CAP)
        token = claimer.token()
        claim = srv.command(lua.CLAIM, *claimer.claim_args(queues, worker, token, claim_timeout))
        with srv.io():
            woke, marker, reply = srv.c.pipeline(
                [("BLPOP", *keys, f"{block:.3f}"), ("GET", srv.key("restart")), claim],
                timeout=block + srv.socket_timeout)
            if isinstance(woke, Exception):
                raise woke
            if not isinstance(marker, Exception):
                srv.restart_cache = (time.monotonic(), marker)
            if isinstance(reply, Exception):
                if srv.missing_script(reply):
                    return None  # a new or flushed server: the next plain claim loads the script
                raise reply
        claimer.retry_token = None
        return claimer.claimed(reply, token)
