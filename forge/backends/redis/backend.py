"""The Redis backend: the same queue as the file backend, shared by workers on many hosts.

Every state change is one Lua script (``scripts/<name>.lua``, loaded by ``lua``) run
atomically on the server, with the server's ``TIME`` as the clock, so no transition is ever a
read-then-write race between hosts. Records are the file backend's JSON lines (``Job.to_json``
then one ``Event.to_json`` per event), never pickle. The key layout is in ``layout``.

``RedisBackend`` is a façade over parts that share one ``server.Server`` (the settings, key
layout, clients and clock), each part in the module named for its concern, as in the file
backend:

* ``store``: ``push`` (dispatch, unique and idempotency keys);
* ``claim``: ``claim``, ``heartbeat``, ``ack``/``release``/``fail``, ``ack_claim``, and the
  worker's claims ahead (``claim_ahead``, ``give_back``);
* ``wake``: the idle ``wait`` and ``wait_claim``, ``next_due``;
* ``upkeep``: ``maintain`` and recovery, pause/resume/restart, worker records, cancel
  requests, logs;
* ``admin``: inspection and management (``find``, ``jobs``, ``stats``, ``retry``, ``flush``...);
* ``limits``: claims through ``forge.limits`` and their holds;
* ``schedule``: the scheduler's state store.

Only ``store`` and ``claim`` are imported with this module (a ``queue:dispatch`` needs no
more); the other parts are made on first use.

Times handed back (``Claim`` deadlines and leases, ``next_due``, ``updated_at``) are on the local
clock, converted with the offset measured from the server's ``TIME``; a delayed job's due time
is stored on the server's clock.

Durability is the server's: an acknowledged dispatch survives a Redis restart with
``appendonly yes`` (``appendfsync always`` for a crash of the machine; ``everysec`` loses up to
one second), and only up to the last snapshot with RDB alone.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator, Sequence
from functools import cached_property
from typing import TYPE_CHECKING, Any

from forge.backends.base import KILL_GRACE, LEASE_MARGIN, Claim, JobPage, QueueStats
from forge.backends.redis.claim import Claimer
from forge.backends.redis.layout import hash_key as _hash_key
from forge.backends.redis.lua import PROMOTE_BATCH
from forge.backends.redis.server import BLOCK_CAP, LEASE_WINDOW, PyClient, Server
from forge.backends.redis.server import translate as _translate
from forge.backends.redis.store import Store
from forge.backends.retention import DONE_RETENTION, LOG_CAP
from forge.config import Connection
from forge.errors import ConfigError, RetryBlocked
from forge.job import Event, Job, JobInfo, State

if TYPE_CHECKING:
    from forge.backends.redis.admin import Admin
    from forge.backends.redis.limits import Limiter, RedisHolds
    from forge.backends.redis.upkeep import Upkeep
    from forge.backends.redis.wake import Waker
    from forge.limits.spec import LimitsConfig, Need

__all__ = ["BLOCK_CAP", "KILL_GRACE", "LEASE_MARGIN", "LEASE_WINDOW", "LOG_CAP", "PROMOTE_BATCH",
           "RedisBackend", "_PyClient", "_hash_key", "_translate"]

#: Kept under its old name for tests that check which client a URL gets.
_PyClient = PyClient


def _find_redis() -> Any:
    """redis-py's module spec, or None if it is not installed (it is imported only when a call
    needs it: the hot path speaks RESP itself)."""
    try:
        return importlib.util.find_spec("redis")
    except (ImportError, ValueError):  # pragma: no cover
        return None


_redis: Any = _find_redis()


class RedisBackend:
    """A queue in one Redis server (or primary), shared by any number of hosts.

    Each method's contract is the ``Backend`` protocol's (``forge.backends.base``); this
    class only routes it to the part that implements it (see the module docstring). Raises
    ``ConfigError`` for a bad URL or prefix, or when redis-py is not installed."""

    #: Which backend this is, for the few callers that keep their own records beside the jobs
    #: (stats journal, progress records, threshold marks): they use ``server`` on Redis.
    driver = "redis"

    lease_based = True

    def __init__(self, url: str, *, prefix: str = "forge", done_retention: float = DONE_RETENTION,
                 connect_timeout: float = 5.0, password: str | None = None,
                 quick: bool = False, lease_window: float | None = None) -> None:
        if _redis is None:
            raise ConfigError(
                "The redis queue driver needs the Redis client: pip install 'forge-jobs[redis]'.",
                hint="Or choose the file connection: [queue] connection = \"file\".",
            )
        #: The shared state every part works through.
        self.server = Server(url, prefix=prefix, done_retention=done_retention,
                             connect_timeout=connect_timeout, password=password, quick=quick,
                             lease_window=lease_window)
        self._store = Store(self.server)
        self._claimer = Claimer(self.server, self)

    @classmethod
    def from_connection(cls, conn: Connection, *, done_retention: float = DONE_RETENTION,
                        quick: bool = False) -> RedisBackend:
        """The backend of a configured connection; raises ``ConfigError`` if its password
        variable is not set. ``quick``: short timeouts and no retries (the supervisor's)."""
        password = None
        if conn.password_env:
            password = os.environ.get(conn.password_env)
            if password is None:
                raise ConfigError(
                    f"Connection {conn.name!r} takes its Redis password from ${conn.password_env},"
                    " which is not set."
                )
        backend = cls(conn.url or "redis://127.0.0.1:6379/0", prefix=conn.prefix,
                      done_retention=done_retention,
                      connect_timeout=min(conn.connect_timeout, 1.0) if quick else conn.connect_timeout,
                      password=password, quick=quick, lease_window=conn.lease)
        if conn.url is not None and conn.url == os.environ.get("FORGE_REDIS_URL"):
            backend.server.url_from = "$FORGE_REDIS_URL"  # it overrides every Redis connection's url
        return backend

    # -- the parts made on first use -------------------------------------------------------

    @cached_property
    def _admin(self) -> Admin:
        from forge.backends.redis.admin import Admin

        return Admin(self.server)

    @cached_property
    def _upkeep(self) -> Upkeep:
        from forge.backends.redis.upkeep import Upkeep

        return Upkeep(self.server, self._claimer, self._admin, self)

    @cached_property
    def _waker(self) -> Waker:
        from forge.backends.redis.wake import Waker

        return Waker(self.server, self._claimer)

    @cached_property
    def _limiter(self) -> Limiter:
        from forge.backends.redis.limits import Limiter

        return Limiter(self.server, self._claimer)

    # -- settings ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The server's URL as configured (it may hold a password: print ``mask_url`` of it)."""
        return self.server.url

    @property
    def prefix(self) -> str:
        """The key prefix ``P`` of every key of this queue."""
        return self.server.prefix

    @property
    def done_retention(self) -> float:
        """Seconds a done job is kept (the policy: ``forge.backends.retention``)."""
        return self.server.done_retention

    @property
    def lease_window(self) -> float:
        """The longest lease a claim gets without a heartbeat (seconds)."""
        return self.server.lease_window

    @lease_window.setter
    def lease_window(self, value: float) -> None:
        self.server.lease_window = value

    @property
    def url_from(self) -> str:
        """Where the URL came from (``forge.toml``, ``$FORGE_REDIS_URL``), for error hints."""
        return self.server.url_from

    # -- dispatch and the hot path ---------------------------------------------------------

    def push(self, jobs: Sequence[Job]) -> list[bool]:
        """``Backend.push``: one script run (``store``)."""
        return self._store.push(jobs)

    def claim(self, queues: Sequence[str], worker: str, timeout: float) -> Claim | None:
        """``Backend.claim``: one script run (``claim``)."""
        return self._claimer.claim(queues, worker, timeout)

    def ack_claim(self, claim: Claim, event: Event, queues: Sequence[str], worker: str,
                  timeout: float) -> Claim | None:
        """``ack(claim, event)`` then ``claim(queues, worker, timeout)`` in one round trip
        (``claim.Claimer.ack_claim``)."""
        return self._claimer.ack_claim(claim, event, queues, worker, timeout)

    def claim_ahead(self, ack: Claim | None, event: Event | None, started: Claim | None, queues: Sequence[str],
                    worker: str, timeout: float) -> Claim | None:
        """A waiting ack, that a claim made ahead started, and the next claim made ahead (with
        ``queues``), in one quick round trip while a job runs (``claim.Claimer.ahead``)."""
        return self._claimer.ahead(ack, event, started, queues, worker, timeout)

    def give_back(self, claim: Claim) -> None:
        """A claim made ahead, not run: back at the head of its queue, uncounted, quickly
        (``claim.Claimer.give_back``)."""
        self._claimer.give_back(claim)

    def heartbeat(self, claim: Claim) -> bool:
        """``Backend.heartbeat``: the lease extended; False if the claim was lost."""
        return self._claimer.heartbeat(claim)

    def ack(self, claim: Claim, event: Event) -> None:
        """``Backend.ack`` (fenced by the claim's token)."""
        self._claimer.ack(claim, event)

    def release(self, claim: Claim, event: Event | None, delay: float, *, counted: bool = True) -> None:
        """``Backend.release`` (fenced by the claim's token)."""
        self._claimer.release(claim, event, delay, counted=counted)

    def fail(self, claim: Claim, event: Event) -> None:
        """``Backend.fail`` (fenced by the claim's token)."""
        self._claimer.fail(claim, event)

    def wait(self, queues: Sequence[str], timeout: float) -> None:
        """``Backend.wait``: a BLPOP on the queues' notify lists (``wake``)."""
        self._waker.wait(queues, timeout)

    def wait_claim(self, queues: Sequence[str], timeout: float, worker: str, claim_timeout: float) -> Claim | None:
        """``wait``, then ``claim``, in one round trip (``wake.Waker.wait_claim``)."""
        return self._waker.wait_claim(queues, timeout, worker, claim_timeout)

    def next_due(self, queues: Sequence[str]) -> float | None:
        """``Backend.next_due`` (``wake``)."""
        return self._waker.next_due(queues)

    # -- upkeep -------------------------------------------------------------------------------

    def maintain(self, default_tries: int = 1) -> dict[str, int]:
        """``Backend.maintain`` (``upkeep``)."""
        return self._upkeep.maintain(default_tries)

    def pause(self, queue: str) -> None:
        """``Backend.pause``."""
        self._upkeep.pause(queue)

    def resume(self, queue: str) -> None:
        """``Backend.resume``."""
        self._upkeep.resume(queue)

    def forget_queue(self, queue: str) -> bool:
        """Remove an empty queue (its name and pause marker); False if it holds any job."""
        return self._upkeep.forget_queue(queue)

    def paused(self) -> set[str]:
        """``Backend.paused``."""
        return self._upkeep.paused()

    def request_restart(self) -> float:
        """``Backend.request_restart``."""
        return self._upkeep.request_restart()

    def restart_requested_at(self) -> float | None:
        """``Backend.restart_requested_at``."""
        return self._upkeep.restart_requested_at()

    def request_cancel(self, job_id: str) -> None:
        """``Backend.request_cancel``."""
        self._upkeep.request_cancel(job_id)

    def cancel_requested(self, job_id: str) -> bool:
        """``Backend.cancel_requested``."""
        return self._upkeep.cancel_requested(job_id)

    def clear_cancel(self, job_id: str) -> None:
        """``Backend.clear_cancel``."""
        self._upkeep.clear_cancel(job_id)

    def put_worker(self, name: str, record: bytes, ttl: float) -> None:
        """``Backend.put_worker``."""
        self._upkeep.put_worker(name, record, ttl)

    def drop_worker(self, name: str) -> None:
        """``Backend.drop_worker``."""
        self._upkeep.drop_worker(name)

    def worker_records(self) -> list[bytes]:
        """``Backend.worker_records``."""
        return self._upkeep.worker_records()

    def append_log(self, job_id: str, data: bytes) -> None:
        """``Backend.append_log``."""
        self._upkeep.append_log(job_id, data)

    def read_log(self, job_id: str, offset: int = 0) -> bytes:
        """``Backend.read_log``."""
        return self._upkeep.read_log(job_id, offset)

    # -- admin --------------------------------------------------------------------------------

    def find(self, job_id: str) -> JobInfo | None:
        """``Backend.find`` (``admin``)."""
        return self._admin.find(job_id)

    def jobs(self, *, queue: str | None = None, state: State | None = None,
             command: str | None = None, limit: int | None = None) -> Iterator[JobInfo]:
        """``Backend.jobs``."""
        return self._admin.jobs(queue=queue, state=state, command=command, limit=limit)

    def page(self, queue: str, state: State, *, offset: int = 0, limit: int = 50,
             command: str | None = None) -> JobPage:
        """``QueueOperations.page``: ``LRANGE``/``ZRANGE`` from ``offset`` (``admin.Admin.page``)."""
        return self._admin.page(queue, state, offset=offset, limit=limit, command=command)

    def stats(self, queues: Sequence[str] | None = None) -> list[QueueStats]:
        """``Backend.stats``: one script run."""
        return self._admin.stats(queues)

    def queues(self) -> list[str]:
        """``Backend.queues``."""
        return self._admin.queues()

    def retry(self, job_ids: Sequence[str] | None, *, queue: str | None = None,
              reason: str | None = None, command: str | None = None) -> Iterator[JobInfo | RetryBlocked]:
        """``Backend.retry``."""
        return self._admin.retry(job_ids, queue=queue, reason=reason, command=command)

    def forget(self, job_id: str) -> bool:
        """``Backend.forget``."""
        return self._admin.forget(job_id)

    def flush(self, *, older_than: float | None = None, queue: str | None = None) -> int:
        """``Backend.flush``."""
        return self._admin.flush(older_than=older_than, queue=queue)

    def prune_done(self, *, older_than: float | None = None) -> int:
        """``Backend.prune_done``."""
        return self._admin.prune_done(older_than=older_than)

    def clear(self, queue: str) -> int:
        """``Backend.clear``."""
        return self._admin.clear(queue)

    def ids_with_prefix(self, prefix: str, limit: int = 100) -> list[str]:
        """``Backend.ids_with_prefix``."""
        return self._admin.ids_with_prefix(prefix, limit)

    def cancel(self, job_id: str) -> JobInfo | None:
        """``Backend.cancel``: one script run."""
        return self._admin.cancel(job_id)

    # -- limits -------------------------------------------------------------------------------

    def claim_limited(self, queues: Sequence[str], worker: str, timeout: float, cfg: LimitsConfig) -> Claim | None:
        """A claim through limits (``limits.Limiter.claim_limited``)."""
        return self._limiter.claim_limited(queues, worker, timeout, cfg)

    @property
    def limits_wake_at(self) -> float | None:
        """After a limited claim that returned None: when a held-back job may become claimable."""
        return self._limiter.wake_at if "_limiter" in self.__dict__ else None

    @property
    def limits_blocked(self) -> bool:
        """After a limited claim that returned None: whether due jobs were held back."""
        return self._limiter.blocked if "_limiter" in self.__dict__ else False

    def release_holds(self, holds: Any, *, wake: bool = True) -> None:
        """Free a limited claim's holds (``limits.Limiter.release_holds``)."""
        self._limiter.release_holds(holds, wake=wake)

    def renew_holds(self, claim: Claim) -> bool:
        """Move a claim's slots' leases on with its lease."""
        return self._limiter.renew_holds(claim)

    def hand_back(self, claim: Claim) -> None:
        """Put a claimed job back at the head of its queue, its attempt un-counted."""
        self._limiter.hand_back(claim)

    def lock_scope(self, need: Need, holder: dict[str, Any]) -> RedisHolds | None:
        """A direct run's isolation lock (``limits.Limiter.lock_scope``); None if held."""
        return self._limiter.lock_scope(need, holder)

    def renew_lock(self, holds: RedisHolds) -> None:
        """Renew a direct run's isolation lock."""
        self._limiter.renew_lock(holds)

    def limit_scopes(self) -> list[str]:
        """Every scope a limit has used, sorted."""
        return self._limiter.limit_scopes()

    def slot_holders(self, scope: str) -> list[dict[str, Any]]:
        """The live holders of a scope's slots (``limits.Limiter.slot_holders``)."""
        return self._limiter.slot_holders(scope)

    def rate_state(self, scope: str) -> float | None:
        """A rate scope's theoretical arrival time, or None."""
        return self._limiter.rate_state(scope)

    def close(self) -> None:
        """``Backend.close``: both clients' connections closed; never raises."""
        self.server.close()

    # -- for forge's other Redis-aware modules (stats journal, progress records, dashboard
    # -- listing, tests and benchmarks), which reach the server through these names -----------

    @property
    def _retry_token(self) -> str | None:
        return self._claimer.retry_token

    @_retry_token.setter
    def _retry_token(self, value: str | None) -> None:
        self._claimer.retry_token = value


if TYPE_CHECKING:
    from forge.backends.base import Backend

    def _is_a_backend(backend: RedisBackend) -> Backend:
        """Never called: mypy checks here that the façade implements ``Backend``."""
        return backend
