"""Limits on the Redis backend (``forge.limits``): the ``limits`` script (``scripts/limits.lua``).

A limited claim is one script run: it walks the due jobs of each queue in order (up to
``SCAN_MAX`` of them per queue and claim), skips those whose scope is already known to be
full, and claims the first whose holds are all free, taking them in the same step. A slot is a
member of the scope's sorted set scored by the job's lease, renewed with it, so a dead
worker's slot frees when its lease runs out, as its job does. A held-back job stays in its
pending list, untouched. Releasing a slot pushes one wake-up token to each queue that has a
job waiting on the scope, so one idle worker wakes, not all of them.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from forge.backends.base import KILL_GRACE, LEASE_MARGIN, Claim
from forge.backends.redis import lua
from forge.backends.redis.claim import Claimer
from forge.backends.redis.layout import us as _us
from forge.backends.redis.server import Server
from forge.config import validate_queue_name
from forge.errors import QueueUnavailable
from forge.limits.spec import LimitsConfig, Need

#: Due jobs one limited claim looks at per queue before it calls the rest held back.
SCAN_MAX = 5000


@dataclass
class RedisHolds:
    """What a limited claim (or a direct run's lock) holds: the slots of ``scopes``, as
    ``holder`` (a job id, or ``run:<token>:<host>:<pid>``)."""

    holder: str
    scopes: list[str] = field(default_factory=list)


class Limiter:
    """Limited claims and holds on one ``Server``, through the ``Claimer``'s tokens.

    After a ``claim_limited`` that returned None, ``wake_at`` is when a held-back job may
    become claimable (a rate's next slot, local clock) and ``blocked`` whether due jobs were
    held back at all (``forge.limits.gate`` reads both)."""

    __slots__ = ("srv", "claimer", "wake_at", "blocked")

    def __init__(self, srv: Server, claimer: Claimer) -> None:
        self.srv = srv
        self.claimer = claimer
        self.wake_at: float | None = None
        self.blocked = False

    def claim_limited(self, queues: Sequence[str], worker: str, timeout: float, cfg: LimitsConfig) -> Claim | None:
        """Claim the first due job whose holds (``cfg`` and its own limits) are all free, taking
        them in the same script run; ``Claim.holds`` is its ``RedisHolds`` (None if it needs
        none). None when nothing may run now (see ``wake_at`` and ``blocked``)."""
        self.wake_at, self.blocked = None, False
        if not queues:
            return None
        for q in queues:
            validate_queue_name(q)
        srv, claimer = self.srv, self.claimer
        token = claimer.token()  # reused until a reply arrives: a lost reply's job comes back
        with srv.io():
            reply = srv.run(lua.LIMITS, "claim", json.dumps(worker), token, _us(timeout), _us(KILL_GRACE),
                            _us(LEASE_MARGIN), _us(srv.lease_window), json.dumps(cfg.to_wire()), SCAN_MAX,
                            *queues)
            srv.clock()
        claimer.retry_token = None
        if len(reply) == 1:
            return None
        if len(reply) == 4:
            self.blocked = reply[1] == b"blocked"
            self.wake_at = srv.local(reply[2]) if reply[2] else None
            return None
        _, job_id, record, attempt, deadline, lease, scopes, _dropped = reply
        job = claimer.claimed_job(token, job_id, record, attempt)
        if job is None:  # failed as corrupt: its holds go too
            self.release_holds(RedisHolds(job_id.decode(), _list(scopes)))
            return None
        claim = Claim(job, int(attempt), srv.local(reply[0]), srv.local(deadline),
                      srv.local(lease), token, f"{job.id}/{token}", int(reply[0]))
        held = _list(scopes)
        claim.holds = RedisHolds(job.id, held) if held else None
        return claim

    def release_holds(self, holds: Any, *, wake: bool = True) -> None:
        """Free the slots of ``holds`` (a ``RedisHolds``; anything else is ignored) and wake one
        waiting worker per queue with a job waiting on them; ``holds`` is emptied."""
        if isinstance(holds, RedisHolds) and holds.scopes:
            with self.srv.io():
                self.srv.run(lua.LIMITS, "release", holds.holder, *holds.scopes)
            holds.scopes = []

    def renew_holds(self, claim: Claim) -> bool:
        """Move the claim's slots' leases to its lease (those still held); always True."""
        holds = claim.holds
        if not isinstance(holds, RedisHolds) or not holds.scopes or claim.lease_until is None:
            return True
        srv = self.srv
        with srv.io():
            srv.run(lua.LIMITS, "renew", holds.holder, _us(claim.lease_until + srv.clock()), *holds.scopes)
        return True

    def hand_back(self, claim: Claim) -> None:
        """Put a job a plain claim took back at the head of its queue, its attempt un-counted."""
        with self.srv.io():
            self.srv.run(lua.LIMITS, "handback", claim.job.id, claim.handle)

    # -- a direct run's isolation lock -------------------------------------------------------

    def lock_scope(self, need: Need, holder: dict[str, Any]) -> RedisHolds | None:
        """Take a slot for a run outside any worker, as a lease of ``lease_window`` the caller
        renews (``renew_lock``); None if it is held."""
        member = f"run:{os.urandom(8).hex()}:{socket.gethostname()}:{os.getpid()}"
        srv = self.srv
        with srv.io():
            reply = srv.run(lua.LIMITS, "lock", member, _us(srv.lease_window), need.scope, need.max)
        if int(reply[0]) != 1:
            return None
        return RedisHolds(member, [need.scope])

    def renew_lock(self, holds: RedisHolds) -> None:
        """Move a direct run's lock on by ``lease_window`` from now."""
        srv = self.srv
        with srv.io():
            lease = _us(time.time() + srv.clock() + srv.lease_window)
            srv.run(lua.LIMITS, "renew", holds.holder, lease, *holds.scopes)

    # -- inspection -------------------------------------------------------------------------

    def limit_scopes(self) -> list[str]:
        """Every scope a limit has used, sorted (for ``queue:limits``)."""
        srv = self.srv
        with srv.io():
            return sorted(s.decode() for s in srv.r.smembers(srv.key("lim", "scopes")))

    def _state(self, scopes: Sequence[str]) -> dict[str, tuple[list[tuple[str, float]], float | None]]:
        if not scopes:
            return {}
        srv = self.srv
        with srv.io():
            reply = srv.run(lua.LIMITS, "state", *scopes)
        out = {}
        for i, s in enumerate(scopes):
            flat = _list(reply[1 + 2 * i])
            holders = [(flat[j], srv.local(flat[j + 1])) for j in range(0, len(flat), 2)]
            tat = reply[2 + 2 * i]
            out[s] = (holders, srv.local(tat) if tat else None)
        return out

    def slot_holders(self, scope: str) -> list[dict[str, Any]]:
        """The live holders of ``scope``'s slots: a job (``job``) or a direct run (``run``,
        ``host``, ``pid``), each with its ``lease_until`` (local clock)."""
        holders, _ = self._state([scope]).get(scope, ([], None))
        out: list[dict[str, Any]] = []
        for n, (member, lease) in enumerate(holders):
            if member.startswith("run:"):
                _, _, host, pid = member.split(":", 3)
                out.append({"slot": n, "run": True, "host": host, "pid": int(pid) if pid.isdigit() else pid,
                            "lease_until": lease})
            else:
                out.append({"slot": n, "job": member, "lease_until": lease})
        return out

    def rate_state(self, scope: str) -> float | None:
        """A rate scope's theoretical arrival time (GCRA, local clock), or None if unused."""
        return self._state([scope]).get(scope, ([], None))[1]


def _list(blob: Any) -> list[Any]:
    """A JSON array from the script (cjson encodes an empty one as ``{}``)."""
    try:
        value = json.loads(blob)
    except (TypeError, ValueError):
        raise QueueUnavailable("The Redis limits script returned something unexpected.") from None
    return [v.decode() if isinstance(v, bytes) else v for v in value] if isinstance(value, list) else []
