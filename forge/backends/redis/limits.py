"""Limits on the Redis backend (``forge.limits``): the ``limits`` script of ``scripts.lua``.

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
from typing import TYPE_CHECKING, Any

from forge.backends.base import KILL_GRACE, LEASE_MARGIN, Claim
from forge.backends.redis.helpers import us as _us
from forge.config import validate_queue_name
from forge.errors import QueueUnavailable
from forge.job import Event, Job
from forge.limits.spec import LimitsConfig, Need

if TYPE_CHECKING:
    import contextlib

#: Due jobs one limited claim looks at per queue before it calls the rest held back.
SCAN_MAX = 5000


@dataclass
class RedisHolds:
    holder: str
    scopes: list[str] = field(default_factory=list)


class RedisLimiter:
    """Limited claims and holds (mixed into ``RedisBackend``)."""

    prefix: str
    lease_window: float
    limits_wake_at: float | None = None
    limits_blocked: bool = False

    if TYPE_CHECKING:
        def _io(self, dispatch: bool = False) -> contextlib.AbstractContextManager[None]: ...
        def _run(self, name: str, *args: Any) -> Any: ...
        def _clock(self) -> float: ...
        def _token(self) -> str: ...
        _retry_token: str | None
        def _local(self, server_us: Any) -> float: ...
        def _claimed_job(self, token: str, job_id: bytes, record: bytes, attempt: Any) -> Job | None: ...
        def release(self, claim: Claim, event: Event | None, delay: float) -> None: ...

    def claim_limited(self, queues: Sequence[str], worker: str, timeout: float, cfg: LimitsConfig) -> Claim | None:
        self.limits_wake_at, self.limits_blocked = None, False
        if not queues:
            return None
        for q in queues:
            validate_queue_name(q)
        token = self._token()  # reused until a reply arrives: a lost reply's job comes back
        with self._io():
            reply = self._run("limits", "claim", json.dumps(worker), token, _us(timeout), _us(KILL_GRACE),
                              _us(LEASE_MARGIN), _us(self.lease_window), json.dumps(cfg.to_wire()), SCAN_MAX,
                              *queues)
            self._clock()
        self._retry_token = None
        if len(reply) == 1:
            return None
        if len(reply) == 4:
            self.limits_blocked = reply[1] == b"blocked"
            self.limits_wake_at = self._local(reply[2]) if reply[2] else None
            return None
        _, job_id, record, attempt, deadline, lease, scopes, _dropped = reply
        job = self._claimed_job(token, job_id, record, attempt)
        if job is None:  # failed as corrupt: its holds go too
            self.release_holds(RedisHolds(job_id.decode(), _list(scopes)))
            return None
        claim = Claim(job, int(attempt), self._local(reply[0]), self._local(deadline),
                      self._local(lease), token, f"{job.id}/{token}", int(reply[0]))
        held = _list(scopes)
        claim.holds = RedisHolds(job.id, held) if held else None
        return claim

    def release_holds(self, holds: Any, *, wake: bool = True) -> None:
        if isinstance(holds, RedisHolds) and holds.scopes:
            with self._io():
                self._run("limits", "release", holds.holder, *holds.scopes)
            holds.scopes = []

    def renew_holds(self, claim: Claim) -> bool:
        holds = claim.holds
        if not isinstance(holds, RedisHolds) or not holds.scopes or claim.lease_until is None:
            return True
        with self._io():
            self._run("limits", "renew", holds.holder, _us(claim.lease_until + self._clock()), *holds.scopes)
        return True

    def hand_back(self, claim: Claim) -> None:
        """Put a job a plain claim took back at the head of its queue, its attempt un-counted."""
        with self._io():
            self._run("limits", "handback", claim.job.id, claim.handle)

    # -- a direct run's isolation lock -------------------------------------------------------

    def lock_scope(self, need: Need, holder: dict[str, Any]) -> RedisHolds | None:
        """Take a slot for a run outside any worker, as a lease of ``lease_window`` the caller
        renews (``renew_lock``); None if it is held."""
        member = f"run:{os.urandom(8).hex()}:{socket.gethostname()}:{os.getpid()}"
        with self._io():
            reply = self._run("limits", "lock", member, _us(self.lease_window), need.scope, need.max)
        if int(reply[0]) != 1:
            return None
        return RedisHolds(member, [need.scope])

    def renew_lock(self, holds: RedisHolds) -> None:
        with self._io():
            lease = _us(time.time() + self._clock() + self.lease_window)
            self._run("limits", "renew", holds.holder, lease, *holds.scopes)

    # -- inspection -------------------------------------------------------------------------

    def limit_scopes(self) -> list[str]:
        with self._io():
            return sorted(s.decode() for s in self._r.smembers(f"{self.prefix}:lim:scopes"))  # type: ignore[attr-defined]

    def _state(self, scopes: Sequence[str]) -> dict[str, tuple[list[tuple[str, float]], float | None]]:
        if not scopes:
            return {}
        with self._io():
            reply = self._run("limits", "state", *scopes)
        out = {}
        for i, s in enumerate(scopes):
            flat = _list(reply[1 + 2 * i])
            holders = [(flat[j], self._local(flat[j + 1])) for j in range(0, len(flat), 2)]
            tat = reply[2 + 2 * i]
            out[s] = (holders, self._local(tat) if tat else None)
        return out

    def slot_holders(self, scope: str) -> list[dict[str, Any]]:
        holders, _ = self._state([scope]).get(scope, ([], None))
        out = []
        for n, (member, lease) in enumerate(holders):
            if member.startswith("run:"):
                _, _, host, pid = member.split(":", 3)
                out.append({"slot": n, "run": True, "host": host, "pid": int(pid) if pid.isdigit() else pid,
                            "lease_until": lease})
            else:
                out.append({"slot": n, "job": member, "lease_until": lease})
        return out

    def rate_state(self, scope: str) -> float | None:
        return self._state([scope]).get(scope, ([], None))[1]


def _list(blob: Any) -> list[Any]:
    """A JSON array from the script (cjson encodes an empty one as ``{}``)."""
    try:
        value = json.loads(blob)
    except (TypeError, ValueError):
        raise QueueUnavailable("The Redis limits script returned something unexpected.") from None
    return [v.decode() if isinstance(v, bytes) else v for v in value] if isinstance(value, list) else []
