"""The worker's side of the limits: claims through them, and lets go of the holds after a run.

A worker gets a ``Gate`` only when ``[limits]`` configures something; without one it claims as
it always did (the plain claim path, untouched) and checks each job it claims for limits of
its own (one dictionary lookup). The first such job is handed back, its attempt un-counted,
and from then on the worker claims through a ``Gate`` (see :func:`switch_on`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from forge.backends.base import Backend, Claim, LimitedClaims
from forge.limits.spec import LimitsConfig

#: A held job's token freeing sooner than this is waited for by the worker's own sleep.
SOON = 0.25


class Gate:
    """Claims through ``cfg`` on one backend; remembers when a blocked job may start."""

    def __init__(self, cfg: LimitsConfig) -> None:
        self.cfg = cfg
        #: After a claim that found nothing: the earliest time a rate frees a token for a held
        #: job (Unix time), else None; and whether any due job was held back.
        self.wake_at: float | None = None
        self.blocked = False

    def claim(self, backend: Backend, queues: Sequence[str], worker: str, timeout: float) -> Claim | None:
        """Claim the next job of ``queues`` whose holds are free (``claim_limited``). On None, ``wake_at``
        and ``blocked`` say when a rate frees a token and whether a due job was held back."""
        claim = backend.claim_limited(queues, worker, timeout, self.cfg)
        self.wake_at = backend.limits_wake_at if claim is None else None
        self.blocked = backend.limits_blocked if claim is None else False
        return claim

    def soon(self, timeout: float) -> float | None:
        """How long until a held job's rate frees a token, when that is sooner than both
        ``timeout`` and ``SOON``: the worker then sleeps that long itself, as a store's own
        blocking wait may be coarser (Redis times a BLPOP out at its ``hz``: 100 ms)."""
        if self.wake_at is None:
            return None
        left = self.wake_at - time.time()
        return max(left, 0.001) if left < min(timeout, SOON) else None

    def wait_for(self, timeout: float) -> float:
        """``timeout`` cut short to a little (``SOON``) before a held job's rate frees a token:
        the store's wait may be coarse, and the last stretch is slept by ``soon``."""
        if self.wake_at is None:
            return timeout
        return min(timeout, max(self.wake_at - time.time() - SOON, 0.001))


def release(backend: LimitedClaims, claim: Claim) -> None:
    """Free the slots a claim held (after its outcome is recorded); safe to call twice."""
    holds, claim.holds = claim.holds, None
    if holds is not None:
        backend.release_holds(holds)


def renew(backend: LimitedClaims, claim: Claim) -> None:
    """Extend the holds' leases with the job's (Redis); nothing to do on the file backend."""
    if claim.holds is not None:
        backend.renew_holds(claim)


def for_worker(settings: Any) -> Gate | None:
    """The worker's gate: None when forge.toml configures no limits (the plain claim path)."""
    from forge.limits.spec import load

    cfg = load(settings)
    return Gate(cfg) if cfg else None


def switch_on(gate: Gate | None, backend: LimitedClaims, claim: Claim) -> Gate:
    """A plain claim took a job with limits of its own: hand it back (attempt un-counted,
    nothing else changed) and return the gate to claim through from now on."""
    backend.hand_back(claim)
    return gate or Gate(LimitsConfig())
