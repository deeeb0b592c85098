"""Claiming jobs from the Redis backend and ending claims: ``claim`` (``scripts/claim.lua``),
``heartbeat``, the outcomes ``ack``/``release``/``fail`` (``scripts/finish.lua``), and
``ack_claim``, an ack and the next claim in one script run (a draining worker's one round trip
per job).

A claim is fenced by a random token: ``ack``/``release``/``fail``/``heartbeat`` act only if the
job is still reserved under that token, so a claim recovered after its lease expired can never
be finished twice; ``Claim.ref`` is ``<id>/<token>``. A claim whose reply was lost is sent
again with the same token (``token``), and the server answers with the job it took
(``P:wclaim:<worker>``) instead of leaving it reserved until its lease lapses. Times handed
back (deadlines, leases) are on the local clock (``Server.local``).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from typing import Any

from forge.backends.base import KILL_GRACE, LEASE_MARGIN, Claim
from forge.backends.redis import lua
from forge.backends.redis.layout import us
from forge.backends.redis.server import Server
from forge.backends.retention import keeps_done
from forge.config import validate_queue_name
from forge.errors import CorruptJob
from forge.job import Event, Job, Reason, decode_file
from forge.stats.journal import ack_claim_with_outcome, finish_with_outcome


class Claimer:
    """Claims and outcomes on one ``Server``. ``journal_owner`` is the backend whose stats
    journal records the outcomes (``forge.stats.journal`` keeps one journal per backend)."""

    __slots__ = ("srv", "journal_owner", "retry_token")

    def __init__(self, srv: Server, journal_owner: Any) -> None:
        self.srv = srv
        self.journal_owner = journal_owner
        #: The token of a claim whose reply has not arrived yet (see ``token``), else None.
        self.retry_token: str | None = None

    # -- claiming -------------------------------------------------------------------------

    def token(self) -> str:
        """A new claim token; or, after a claim whose reply was lost, that claim's token again
        (until a claim succeeds): the server then hands back the job it had claimed with it
        (``P:wclaim:<worker>``), which would otherwise wait reserved for its lease to lapse."""
        if self.retry_token is None:
            self.retry_token = os.urandom(12).hex()
        return self.retry_token

    def claim_args(self, queues: Sequence[str], worker: str, token: str, timeout: float) -> list[Any]:
        """The ``claim`` script's ARGV after P (also the tail of ``ack_claim``'s); raises
        ``UsageError`` for a bad queue name."""
        for q in queues:
            validate_queue_name(q)
        return [json.dumps(worker), token, us(timeout), us(KILL_GRACE), us(LEASE_MARGIN),
                us(self.srv.lease_window), *queues]

    def claim(self, queues: Sequence[str], worker: str, timeout: float) -> Claim | None:
        """``Backend.claim``: one script run; None when nothing is due."""
        if not queues:
            return None
        token = self.token()
        with self.srv.io():
            reply = self.srv.run(lua.CLAIM, *self.claim_args(queues, worker, token, timeout))
        self.retry_token = None
        return self.claimed(reply, token)

    def ack_claim(self, claim: Claim, event: Event, queues: Sequence[str], worker: str,
                  timeout: float) -> Claim | None:
        """``ack(claim, event)``, then ``claim(queues, worker, timeout)``, in one round trip
        (one script, the ack's outcome journaled in it). The ack is fenced as ``ack``'s is;
        the next claim is made whether or not it held."""
        token = self.token()
        args = (claim.job.id, claim.handle, event.to_json(), claim.attempt, self._keep_done(), "", "", "0",
                *self.claim_args(queues, worker, token, timeout))
        reply = ack_claim_with_outcome(self.journal_owner, args, claim, event)
        self.retry_token = None
        return self.claimed(reply[1:], token)

    def ahead(self, ack: Claim | None, event: Event | None, started: Claim | None, queues: Sequence[str],
              worker: str, timeout: float) -> Claim | None:
        """What a worker that claims ahead sends right after it handed a job to its job process,
        in one quick round trip (``Server.run``'s ``quick``: it must not hold up the watch over
        that job): ``ack(ack, event)`` if given; that ``started``, a claim made ahead, now runs
        (its ahead mark cleared: recovery counts its attempt from now on); and with ``queues``,
        the claim of the next job, ahead (marked so: if the worker dies before it starts it,
        recovery releases it uncounted). Raises on an outage: the caller tries again later,
        and a claim whose reply was lost is answered again by the next claim (``token``)."""
        token = self.token() if queues else ""
        head: tuple[Any, ...] = ((ack.job.id, ack.handle, event.to_json(), ack.attempt, self._keep_done())
                                 if ack is not None and event is not None else ("", "", "", 0, "0"))
        args = (*head, started.job.id if started is not None else "", started.handle if started is not None else "",
                "1" if queues else "", *(self.claim_args(queues, worker, token, timeout) if queues else ()))
        if ack is not None and event is not None:
            reply = ack_claim_with_outcome(self.journal_owner, args, ack, event, quick=True)
        else:
            with self.srv.io():
                reply = self.srv.run(lua.ACK_CLAIM, *args, quick=True)
        if not queues:
            return None
        self.retry_token = None
        return self.claimed(reply[1:], token)

    def give_back(self, claim: Claim) -> None:
        """A claim made ahead that the worker will not run, back at the head of its queue with
        its attempt un-counted (``limits.lua``'s handback), in one quick round trip (raises on
        an outage: the caller tries again later; the lease, unrenewed, lapses meanwhile)."""
        with self.srv.io():
            self.srv.run(lua.LIMITS, "handback", claim.job.id, claim.handle, quick=True)

    def claimed_job(self, token: str, job_id: bytes, record: bytes, attempt: Any) -> Job | None:
        """The job a claim script took; a record that does not decode (or names another id) is
        failed at once as corrupt, and None returned."""
        try:
            job, _ = decode_file(record)
            if job.id != job_id.decode():
                raise CorruptJob("record does not match its key")
        except CorruptJob as exc:
            self.finish(token, job_id.decode(), "failed", Event(
                "failed", int(attempt), time.time(), reason=Reason.EXCEPTION,
                error=f"corrupt job record: {exc}"), int(attempt), 0.0)
            return None
        return job

    def claimed(self, reply: list[Any], token: str) -> Claim | None:
        """The Claim of a claim script's reply (None: nothing was due, or it was corrupt)."""
        if len(reply) == 1:
            return None
        srv = self.srv
        with srv.io():
            srv.clock()
        _, job_id, record, attempt, deadline, lease = reply
        job = self.claimed_job(token, job_id, record, attempt)
        if job is None:
            return None
        return Claim(job, int(attempt), srv.local(reply[0]), srv.local(deadline),
                     srv.local(lease), token, f"{job.id}/{token}", int(reply[0]))

    def heartbeat(self, claim: Claim) -> bool:
        """``Backend.heartbeat``: the lease extended (``claim.lease_until`` moved on); False
        if the claim no longer holds."""
        srv = self.srv
        with srv.io():
            reply = srv.run(lua.HEARTBEAT, claim.job.id, claim.handle, us(LEASE_MARGIN), us(srv.lease_window))
            if len(reply) == 1:
                return False
            srv.clock()
        claim.lease_until = srv.local(reply[1])
        return True

    # -- outcomes -------------------------------------------------------------------------

    def _keep_done(self) -> str:
        return "1" if keeps_done(self.srv.done_retention) else "0"

    def finish(self, token: str, job_id: str, mode: str, event: Event | None, attempts: int,
               delay: float, only_expired: bool = False, claim: Claim | None = None) -> bool:
        """End the claim ``(job_id, token)`` as ``mode`` (done, release or failed); True if it
        held. ``only_expired``: only if its lease has run out (recovery). With ``claim`` and an
        outcome ``event``, the outcome is journaled in the same script run (``forge.stats``)."""
        line = event.to_json() if event else b""
        args = (job_id, token, mode, line, attempts, max(0, us(delay)), self._keep_done(),
                "1" if only_expired else "0")
        if claim is not None and event is not None:
            return finish_with_outcome(self.journal_owner, args, claim, event)
        with self.srv.io():
            return bool(self.srv.run(lua.FINISH, *args))

    def ack(self, claim: Claim, event: Event) -> None:
        """``Backend.ack`` (fenced: a lost claim is left alone)."""
        self.finish(claim.handle, claim.job.id, "done", event, claim.attempt, 0.0, claim=claim)

    def release(self, claim: Claim, event: Event | None, delay: float, *, counted: bool = True) -> None:
        """``Backend.release`` (fenced); the attempt is un-counted without an event or counted."""
        attempts = claim.attempt if event is not None and counted else claim.attempt - 1
        self.finish(claim.handle, claim.job.id, "release", event, attempts, delay, claim=claim)

    def fail(self, claim: Claim, event: Event) -> None:
        """``Backend.fail`` (fenced)."""
        self.finish(claim.handle, claim.job.id, "failed", event, claim.attempt, 0.0, claim=claim)
