"""An idle Redis worker's wake-up that carries its claim: ``BLPOP`` on the queues' notify
lists, then the ``claim`` script, pipelined on one connection.

The server runs the pipelined script the moment the ``BLPOP`` returns (woken by a dispatch,
or at its timeout), so a job dispatched to an idle worker is claimed without the round trip
the worker would otherwise make after waking. The claim is the ``claim`` script's own (same
token handling: a reply lost on the way is answered by the worker's last-claim key), and the
worker treats what it returns as it treats any claim (one it may not run is released).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from forge.backends.redis.helpers import load_scripts

if TYPE_CHECKING:
    from forge.backends.base import Claim
    from forge.backends.redis.backend import RedisBackend

_shas: dict[str, str] = {}


def _sha(source: str) -> str:
    sha = _shas.get(source)
    if sha is None:
        import hashlib

        sha = _shas[source] = hashlib.sha1(source.encode()).hexdigest()
    return sha


def wait_claim(b: RedisBackend, queues: Sequence[str], timeout: float, worker: str,
               claim_timeout: float) -> Claim | None:
    """``b.wait(queues, timeout)`` and then ``b.claim(queues, worker, claim_timeout)``, in one
    round trip. None: nothing was claimed (the caller claims as usual next). Unlike ``wait``,
    it does not look up the next delayed job's due time: the caller (the worker's idle wait)
    has just capped ``timeout`` at it."""
    from forge.backends.redis import resp as _resp
    from forge.backends.redis.backend import BLOCK_CAP, PROMOTE_BATCH

    if timeout <= 0.001 or not queues:
        return None
    keys = [b._key("q", q, "notify") for q in queues]
    block = min(timeout, BLOCK_CAP)
    source = load_scripts(PROMOTE_BATCH)["claim"]
    token = b._token()
    claim: list[Any] = ["EVALSHA", _sha(source), 0, b.prefix, *b._claim_args(queues, worker, token, claim_timeout)]
    with b._io():
        # The restart marker comes with the wake-up: a worker checks it before its next claim.
        woke, marker, reply = b._c.pipeline([("BLPOP", *keys, f"{block:.3f}"), ("GET", b._key("restart")), claim],
                                            timeout=block + b._socket_timeout)
        if isinstance(woke, Exception):
            raise woke
        if not isinstance(marker, Exception):
            b._restart_cache = (time.monotonic(), marker)
        if isinstance(reply, _resp.ReplyError):
            if str(reply).startswith("NOSCRIPT"):
                return None  # a flushed server: the next plain claim loads the script again
            raise reply
    b._retry_token = None
    return b._claimed(reply, token)
