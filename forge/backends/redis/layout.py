"""How the Redis backend stores a queue: its key names, and how times and unique keys are
written into them.

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
    P:log:<id>              STRING  captured job output, capped at ``retention.LOG_CAP``
    P:restart               STRING  time of the last ``queue:restart``
    P:cancel:<id>           STRING  ``queue:cancel --running`` asked the job's worker to kill it (EX 1 day)
    P:worker:<name>         STRING  a live worker's record (``forge.worker.heartbeat``), PX = stale time
    P:wclaim:<worker>       STRING  "<token> <id>" of the worker's last claim (worker as its JSON
                                    string), so a claim retried after a lost reply gets that job
                                    back instead of leaving it reserved until its lease lapses (EX 1 day)
    P:workers               ZSET    worker names, scored by when their record expires
    P:progress:<id>         STRING  a running job's progress record (``forge.jobprogress``)
    P:schedule              HASH    the scheduler's entry states (``forge.backends.redis.schedule``)
    P:stats:...             the outcome journal (``forge.stats.redisjournal``)
    P:lim:...               limits' slots, rates and waiters (``scripts/limits.lua``)

Due delayed jobs move from ``delayed`` to the tail of ``pending`` in due order whenever a job
enters ``pending`` or a worker claims, so FIFO order is the order in which jobs became due.
Times cross into the scripts as integer microseconds (``us``) on the server's clock.
"""

from __future__ import annotations

#: Ids fetched per round trip when listing or recovering.
CHUNK = 100


def us(seconds: float) -> int:
    """Seconds as integer microseconds (how times cross the Lua boundary)."""
    return int(round(seconds * 1_000_000))


def hash_key(key: str) -> str:
    """The name of a unique key inside Redis (``P:unique:<this>``)."""
    import hashlib  # only a dispatch with a unique key needs it (2 ms to import)

    return hashlib.sha256(key.encode()).hexdigest()[:40]


def unique_ttl_ms(job_unique_key: str | None, ttl: float | None) -> str:
    """A unique key's ttl as the scripts take it: milliseconds (at least 1), or '' for none."""
    return str(max(1, us(ttl) // 1000)) if job_unique_key and ttl else ""


class Layout:
    """The key names of one prefix (see the module docstring); every key is built here."""

    __slots__ = ("prefix",)

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def key(self, *parts: str) -> str:
        """``P:part:part...``: the key named by ``parts`` under this prefix."""
        return ":".join((self.prefix, *parts))

    def queue(self, queue: str, what: str) -> str:
        """``P:q:<queue>:<what>`` (``what``: pending, delayed, reserved, done, failed, notify)."""
        return f"{self.prefix}:q:{queue}:{what}"
