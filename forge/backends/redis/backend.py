"""The Redis backend: the same queue as the file backend, shared by workers on many hosts.

Every state change is one Lua script (in ``scripts.lua``, loaded by ``_redis_helpers``)
run atomically on the server, with the server's ``TIME`` as the clock, so no transition is
ever a read-then-write race between hosts. Records are the file backend's JSON lines
(``Job.to_json`` then one ``Event.to_json`` per event), never pickle.

Key layout (``P`` is the configured prefix, ``forge`` by default; Redis Cluster is not
supported: every key of one prefix must live on one server)::

    P:job:<id>              STRING  the job's JSON line, then one line per event (APPEND)
    P:info:<id>             HASH    queue, state (pending|delayed|reserved|done|failed),
                                    attempts, avail (due time, us), timeout (us, or ""),
                                    ukey (hashed unique key, or ""), and while reserved:
                                    token (the claim's fence), claimed and deadline (us);
                                    at (us) once done or failed
    P:q:<queue>:pending     LIST    ids due now, FIFO (RPUSH in, LPOP out)
    P:q:<queue>:delayed     ZSET    ids not yet due, scored by due time (us)
    P:q:<queue>:reserved    ZSET    claimed ids, scored by lease expiry (us)
    P:q:<queue>:done        ZSET    finished ids, scored by finish time (us), kept for the retention
    P:q:<queue>:failed      ZSET    failed ids, scored by failure time (us)
    P:q:<queue>:notify      LIST    wake-up tokens (at most 8) that idle workers BLPOP on
    P:queues                SET     names of queues that hold or have held jobs
    P:paused                SET     paused queue names
    P:unique:<sha256[:40]>  STRING  id of the job holding a unique key (PX = the key's ttl)
    (an idempotency key needs no key of its own: it is the job's id, ``forge.job.idempotent_id``,
    taken while ``P:info:<id>`` exists, and freed when the job is deleted)
    P:log:<id>              STRING  captured job output, capped at 1 MiB
    P:restart               STRING  time of the last ``queue:restart``
    P:cancel:<id>           STRING  ``queue:cancel --running`` asked the job's worker to kill it (EX 1 day)
    P:worker:<name>         STRING  a live worker's record (``forge.worker.heartbeat``), PX = stale time
    P:wclaim:<worker>       STRING  "<token> <id>" of the worker's last claim (worker as its JSON
                                    string), so a claim retried after a lost reply gets that job
                                    back instead of leaving it reserved until its lease lapses (EX 1 day)
    P:workers               ZSET    worker names, scored by when their record expires

Due delayed jobs move from ``delayed`` to the tail of ``pending`` in due order whenever a job
enters ``pending`` or a worker claims, so FIFO order is the order in which jobs became due.
A claim is fenced by a random token: ``ack``/``release``/``fail``/``heartbeat`` act only if the
job is still reserved under that token, so a claim recovered after its lease expired can never
be finished twice; ``Claim.ref`` is ``<id>/<token>``. Times handed
back (``Claim`` deadlines and leases, ``next_due``, ``updated_at``) are on the local clock,
converted with the offset measured from the server's ``TIME``; a delayed job's due time is
stored on the server's clock.

The hot path (dispatch, claim, ``ack_claim``, heartbeats, the idle wait, the worker's record)
goes through ``forge.backends.redis.resp``, forge's own RESP client: one round trip a call, scripts
run by SHA, and no redis-py import (80-150 ms) for a dispatch or a worker. Listings and the
other management operations use redis-py (``_r``), imported on first use.

Durability is the server's: an acknowledged dispatch survives a Redis restart with
``appendonly yes`` (``appendfsync always`` for a crash of the machine; ``everysec`` loses up to
one second), and only up to the last snapshot with RDB alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

from forge.backends.base import KILL_GRACE, LEASE_MARGIN, Claim
from forge.backends.redis import resp as _resp
from forge.backends.redis.admin import RedisAdmin
from forge.backends.redis.helpers import CHUNK, LOG_CAP, load_scripts
from forge.backends.redis.helpers import hash_key as _hash_key
from forge.backends.redis.helpers import translate as _translate
from forge.backends.redis.helpers import us as _us
from forge.backends.redis.limits import RedisLimiter
from forge.config import Connection, mask_url, validate_queue_name
from forge.errors import ConfigError, DuplicateJob, UsageError
from forge.job import (
    MAX_PAYLOAD_BYTES,
    CorruptJob,
    Event,
    Job,
    Reason,
    decode_file,
    is_idempotent_id,
)
from forge.stats.journal import ack_claim_with_outcome, finish_with_outcome, record_outcome


def _find_redis() -> Any:
    """redis-py's module spec, or None if it is not installed. It is imported only when a call
    needs it (see ``RedisBackend._r``): the hot path speaks RESP itself (``_resp``)."""
    import importlib.util

    try:
        return importlib.util.find_spec("redis")
    except (ImportError, ValueError):  # pragma: no cover
        return None


_redis: Any = _find_redis()

#: Longest a lease runs without a heartbeat (it is shorter when the job's deadline is nearer).
LEASE_WINDOW = 30.0
#: Longest single BLPOP; the worker simply waits again. Below the socket timeout.
BLOCK_CAP = 5.0
SKEW_TTL = 60.0
PROMOTE_BATCH = 1000
_SCHEMES = ("redis://", "rediss://", "unix://")

__all__ = ["LOG_CAP", "RedisBackend"]


class RedisBackend(RedisLimiter, RedisAdmin):
    """A queue in one Redis server (or primary), shared by any number of hosts."""

    lease_based = True

    def __init__(self, url: str, *, prefix: str = "forge", done_retention: float = 3600.0,
                 connect_timeout: float = 5.0, password: str | None = None,
                 quick: bool = False, lease_window: float | None = None) -> None:
        if _redis is None:
            raise ConfigError(
                "The redis queue driver needs the Redis client: pip install 'forge-jobs[redis]'.",
                hint="Or choose the file connection: [queue] connection = \"file\".",
            )
        if not isinstance(url, str) or not url.startswith(_SCHEMES):
            raise ConfigError(
                f"Invalid Redis URL {mask_url(str(url))!r}: expected redis://, rediss:// or unix://."
            )
        if not prefix or any(c.isspace() or c in "*?[]" for c in prefix):
            raise ConfigError(f"Invalid Redis key prefix {prefix!r}.")
        self.url = url
        self.prefix = prefix
        self.done_retention = done_retention
        self.lease_window = LEASE_WINDOW if lease_window is None else lease_window
        self._where = f"Redis at {mask_url(url)}"
        #: Where the URL came from, for the hint to fix it there (see from_connection).
        self.url_from = "forge.toml"
        self._skew: float | None = None  # see _clock
        self._skew_at = 0.0
        self._quick = quick
        self._connect_timeout = connect_timeout
        self._password = password
        self._redispy: Any = None  # redis-py's client, made on first use (see _r)
        self._retry_token: str | None = None  # see _token
        self._restart_cache: tuple[float, Any] | None = None  # (when, P:restart) read by wait
        addr = _resp.parse_url(url, password)
        if addr is None:  # TLS or options only redis-py knows: it makes every call
            self._c: Any = _PyClient(self._r)
        else:
            self._c = _resp.Client(addr, connect_timeout=connect_timeout, timeout=self._socket_timeout,
                                   retries=0 if quick else 2)

    @property
    def _socket_timeout(self) -> float:
        # ``quick``: for a caller that must never block long (the worker's supervisor, which
        # has to kill a job before its lease lapses); it never calls ``wait``.
        return 1.0 if self._quick else max(BLOCK_CAP + 5.0, 2 * self._connect_timeout)

    @property
    def _r(self) -> Any:
        """redis-py's client, for the operations outside the hot path (imported on first use)."""
        if self._redispy is None:
            import redis
            from redis.backoff import ExponentialWithJitterBackoff
            from redis.retry import Retry

            options: dict[str, Any] = {
                "socket_connect_timeout": self._connect_timeout,
                "socket_timeout": self._socket_timeout,
                "socket_keepalive": True,
                "health_check_interval": 30,
                # A few quick reconnects, then the caller hears QueueUnavailable. Every script is
                # safe to re-run after a lost reply: push is idempotent per job id, and the
                # outcome scripts are fenced by the claim token.
                "retry": Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), 0 if self._quick else 2),
            }
            if self._password is not None:
                options["password"] = self._password
            try:
                self._redispy = redis.Redis.from_url(self.url, **options)
            except ValueError as exc:
                raise ConfigError(f"Invalid Redis URL {mask_url(self.url)!r}: {mask_url(str(exc))}") from None
        return self._redispy

    @classmethod
    def from_connection(cls, conn: Connection, *, done_retention: float = 3600.0,
                        quick: bool = False) -> RedisBackend:
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
            backend.url_from = "$FORGE_REDIS_URL"  # it overrides every Redis connection's url
        return backend

    # -- plumbing -------------------------------------------------------------------------

    @contextlib.contextmanager
    def _io(self, dispatch: bool = False) -> Iterator[None]:
        """Turn Redis client errors into forge's queue errors (password masked)."""
        try:
            yield
        except _resp.RespError as exc:
            raise _translate(exc, self._where, dispatch, self.url_from) from None
        except Exception as exc:
            if _is_redispy_error(exc):
                raise _translate(exc, self._where, dispatch, self.url_from) from None
            raise

    def _run(self, name: str, *args: Any) -> Any:
        """Run the server-side script ``name`` (see scripts.lua) with ARGV = prefix, args:
        by its SHA, loaded into the server on its first NOSCRIPT."""
        return self._c.script(load_scripts(PROMOTE_BATCH)[name], self.prefix, *args)

    def _key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    def _clock(self) -> float:
        """The server's clock minus ours (seconds): from the fastest of three ``TIME`` round
        trips, measured again every minute. Kept steady in between, so a time converted to
        the server's clock and back comes out unchanged."""
        if self._skew is None or time.monotonic() - self._skew_at > SKEW_TTL:
            samples = []
            for _ in range(3):
                before = time.time()
                sec, usec = self._c.call("TIME")
                after = time.time()
                samples.append((after - before, int(sec) + int(usec) / 1e6 - (before + after) / 2))
            self._skew, self._skew_at = min(samples)[1], time.monotonic()
        return self._skew

    def _local(self, server_us: Any) -> float:
        """A server time in microseconds (as a Redis reply) on our clock, in seconds."""
        return float(server_us) / 1e6 - self._clock()

    def _server_now(self) -> float:
        return time.time() + self._clock()

    # -- dispatch -------------------------------------------------------------------------

    def push(self, jobs: Sequence[Job]) -> list[bool]:
        if not jobs:
            return []
        now = time.time()
        skew = self._clock_for_push(jobs, now)
        args: list[Any] = [len(jobs)]
        keys: dict[str, str] = {}
        for job in jobs:
            validate_queue_name(job.queue)
            blob = job.to_json()
            if len(blob) > MAX_PAYLOAD_BYTES:
                raise UsageError(f"Job {job.id} is {len(blob)} bytes, over the {MAX_PAYLOAD_BYTES}-byte cap.")
            ukey = ""
            if job.unique_key is not None:
                ukey = _hash_key(job.unique_key)
                keys[ukey] = job.unique_key
            ttl = str(max(1, _us(job.unique_ttl) // 1000)) if job.unique_key and job.unique_ttl else ""
            timeout = str(_us(job.timeout)) if job.timeout is not None else ""
            due = _us(job.available_at + skew) if job.available_at > now else 0
            args += [job.id, job.queue, blob, due, timeout, ukey, ttl]
        with self._io(dispatch=True):
            reply = self._run("push", *args)
        if reply[0] == b"dup":
            raise DuplicateJob(keys.get(reply[1].decode(), reply[1].decode()), reply[2].decode())
        # A random id that exists was stored by this very push, on a retry after a lost reply.
        return [flag == "1" or not is_idempotent_id(job.id) for job, flag in zip(jobs, reply[2].decode(), strict=True)]

    def _clock_for_push(self, jobs: Sequence[Job], now: float) -> float:
        """Only delayed jobs need the server's clock (a due time is stored on it)."""
        if not any(j.available_at > now for j in jobs):
            return 0.0
        with self._io(dispatch=True):
            return self._clock()

    # -- claiming -------------------------------------------------------------------------

    def claim(self, queues: Sequence[str], worker: str, timeout: float) -> Claim | None:
        if not queues:
            return None
        token = self._token()
        with self._io():
            reply = self._run("claim", *self._claim_args(queues, worker, token, timeout))
        self._retry_token = None
        return self._claimed(reply, token)

    def ack_claim(self, claim: Claim, event: Event, queues: Sequence[str], worker: str,
                  timeout: float) -> Claim | None:
        """``ack(claim, event)``, then ``claim(queues, worker, timeout)``, in one round trip
        (one script: a worker draining a queue pays one call per job). The ack is fenced as
        ``ack``'s is; the next claim is made whether or not it held."""
        token = self._token()
        args = (claim.job.id, claim.handle, event.to_json(), claim.attempt,
                "1" if self.done_retention > 0 else "0", *self._claim_args(queues, worker, token, timeout))
        reply = ack_claim_with_outcome(self, args, claim, event)  # the outcome journaled in the same script
        self._retry_token = None
        return self._claimed(reply[1:], token)

    def _token(self) -> str:
        """A new claim token; or, after a claim whose reply was lost, that claim's token again
        (until a claim succeeds): the server then hands back the job it had claimed with it
        (``P:wclaim:<worker>``), which would otherwise wait reserved for its lease to lapse."""
        if self._retry_token is None:
            self._retry_token = os.urandom(12).hex()
        return self._retry_token

    def _claim_args(self, queues: Sequence[str], worker: str, token: str, timeout: float) -> list[Any]:
        for q in queues:
            validate_queue_name(q)
        return [json.dumps(worker), token, _us(timeout), _us(KILL_GRACE), _us(LEASE_MARGIN),
                _us(self.lease_window), *queues]

    def _claimed_job(self, token: str, job_id: bytes, record: bytes, attempt: Any) -> Job | None:
        """The job a claim script took; a record that does not decode (or names another id) is
        failed at once as corrupt, and None returned."""
        try:
            job, _ = decode_file(record)
            if job.id != job_id.decode():
                raise CorruptJob("record does not match its key")
        except CorruptJob as exc:
            self._finish(token, job_id.decode(), "failed", Event(
                "failed", int(attempt), time.time(), reason=Reason.EXCEPTION,
                error=f"corrupt job record: {exc}"), int(attempt), 0.0)
            return None
        return job

    def _claimed(self, reply: list[Any], token: str) -> Claim | None:
        """The Claim of a claim script's reply (None: nothing was due)."""
        if len(reply) == 1:
            return None
        with self._io():
            self._clock()
        _, job_id, record, attempt, deadline, lease = reply
        job = self._claimed_job(token, job_id, record, attempt)
        if job is None:
            return None
        return Claim(job, int(attempt), self._local(reply[0]), self._local(deadline),
                     self._local(lease), token, f"{job.id}/{token}", int(reply[0]))

    def heartbeat(self, claim: Claim) -> bool:
        with self._io():
            reply = self._run("heartbeat", claim.job.id, claim.handle, _us(LEASE_MARGIN), _us(self.lease_window))
            if len(reply) == 1:
                return False
            self._clock()
        claim.lease_until = self._local(reply[1])
        return True

    def next_due(self, queues: Sequence[str]) -> float | None:
        with self._io():
            replies = self._c.pipeline([("ZRANGE", self._key("q", validate_queue_name(q), "delayed"), 0, 0,
                                         "WITHSCORES") for q in queues])
            for r in replies:
                if isinstance(r, Exception):
                    raise r
            # [member, score], or [[member, score]] as redis-py parses WITHSCORES
            heads = [float(r[0][1] if isinstance(r[0], list | tuple) else r[1]) for r in replies if r]
            return self._local(min(heads)) if heads else None

    def wait(self, queues: Sequence[str], timeout: float) -> None:
        if timeout <= 0 or not queues:
            return
        due = self.next_due(queues)
        if due is not None:
            timeout = min(timeout, due - time.time())
        if timeout <= 0.001:
            return
        keys = [self._key("q", q, "notify") for q in queues]
        block = min(timeout, BLOCK_CAP)
        with self._io():
            # The restart marker comes with the wake-up: a worker checks it before its next claim.
            woke, marker = self._c.pipeline([("BLPOP", *keys, f"{block:.3f}"), ("GET", self._key("restart"))],
                                            timeout=block + self._socket_timeout)
            if isinstance(woke, Exception):
                raise woke
            if not isinstance(marker, Exception):
                self._restart_cache = (time.monotonic(), marker)

    def wait_claim(self, queues: Sequence[str], timeout: float, worker: str, claim_timeout: float) -> Claim | None:
        """``wait``, then ``claim``, in one round trip (forge.backends.redis.wake)."""
        from forge.backends.redis.wake import wait_claim

        return wait_claim(self, queues, timeout, worker, claim_timeout)

    # -- outcomes -------------------------------------------------------------------------

    def _finish(self, token: str, job_id: str, mode: str, event: Event | None, attempts: int,
                delay: float, only_expired: bool = False, claim: Claim | None = None) -> bool:
        """Run ``finish``; with ``claim``, journal the outcome in the same round trip (forge.stats)."""
        line = event.to_json() if event else b""
        args = (job_id, token, mode, line, attempts, max(0, _us(delay)), "1" if self.done_retention > 0 else "0",
                "1" if only_expired else "0")
        if claim is not None and event is not None:
            return finish_with_outcome(self, args, claim, event)
        with self._io():
            return bool(self._run("finish", *args))

    def ack(self, claim: Claim, event: Event) -> None:
        self._finish(claim.handle, claim.job.id, "done", event, claim.attempt, 0.0, claim=claim)

    def release(self, claim: Claim, event: Event | None, delay: float, *, counted: bool = True) -> None:
        attempts = claim.attempt if event is not None and counted else claim.attempt - 1
        self._finish(claim.handle, claim.job.id, "release", event, attempts, delay, claim=claim)

    def fail(self, claim: Claim, event: Event) -> None:
        self._finish(claim.handle, claim.job.id, "failed", event, claim.attempt, 0.0, claim=claim)

    # -- maintenance ----------------------------------------------------------------------

    def maintain(self, default_tries: int = 1) -> dict[str, int]:
        counts = {"recovered": 0, "abandoned": 0, "pruned": 0, "temp_removed": 0}
        with self._io():
            for q in self.queues():
                self._run("promote", q)
                seen: set[bytes] = set()
                while True:
                    now_us = _us(self._server_now())
                    expired = self._c.call("ZRANGEBYSCORE", self._key("q", q, "reserved"), "-inf", now_us,
                                           "LIMIT", 0, CHUNK)
                    fresh = [i for i in expired if i not in seen]
                    if not fresh:
                        break
                    seen.update(fresh)
                    for job_id in fresh:
                        outcome = self._recover(job_id.decode(), default_tries)
                        if outcome:
                            counts[outcome] += 1
        if self.done_retention >= 0:
            counts["pruned"] = self.prune_done(older_than=self.done_retention)
        return counts

    def _recover(self, job_id: str, default_tries: int) -> str | None:
        replies = self._c.pipeline([("MULTI",), ("GET", self._key("job", job_id)),
                                    ("HMGET", self._key("info", job_id), "state", "token", "attempts"), ("EXEC",)])
        for r in replies:
            if isinstance(r, Exception):
                raise r
        record, (state, token, attempts) = replies[-1]
        if state != b"reserved" or token is None:
            return None
        attempt = int(attempts or 0)
        try:
            job: Job | None = decode_file(record)[0]
        except CorruptJob:
            job = None
        from forge.retry.policy import recovery  # here: recovering is rare

        exhausted, delay = (True, 0.0) if job is None else recovery(job, attempt, default_tries)
        event = Event("failed" if exhausted else "released", attempt, time.time(),
                      reason=Reason.ABANDONED, error="the worker died during this attempt")
        mode = "failed" if exhausted else "release"
        if not self._finish(token.decode(), job_id, mode, event, attempt, delay, only_expired=True):
            return None
        hook = getattr(self, "on_recovered", None)  # forge.events: the worker's job events
        if hook is not None and job is not None:
            hook(job, attempt, event)
        if job is not None:
            record_outcome(self, Claim(job, attempt, event.at, event.at), event)
        return "abandoned" if exhausted else "recovered"

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._c.close()
        if self._redispy is not None:
            with contextlib.suppress(Exception):
                self._redispy.close()


def _is_redispy_error(exc: Exception) -> bool:
    rx = sys.modules.get("redis.exceptions")
    return rx is not None and isinstance(exc, rx.RedisError)


class _PyClient:
    """The hot path's calls made by redis-py, for URLs ``_resp`` does not take (``rediss://``,
    other options): the same replies as ``_resp.Client`` (raw, no response callbacks)."""

    def __init__(self, client: Any) -> None:
        import redis

        self._r = redis.Redis(connection_pool=client.connection_pool)
        self._r.response_callbacks.clear()  # raw replies, as RESP gives them
        self._scripts: dict[str, Any] = {}

    def call(self, *args: Any, timeout: float | None = None) -> Any:
        return self._r.execute_command(*args)

    def pipeline(self, cmds: Sequence[Sequence[Any]], timeout: float | None = None) -> list[Any]:
        pipe = self._r.pipeline(transaction=False)
        for c in cmds:
            pipe.execute_command(*c)
        return list(pipe.execute(raise_on_error=False))

    def script(self, source: str, *args: Any) -> Any:
        script = self._scripts.get(source)
        if script is None:
            script = self._scripts[source] = self._r.register_script(source)
        return script(keys=[], args=list(args))

    def close(self) -> None:
        pass  # the pool is the backend's redis-py client's, closed with it

