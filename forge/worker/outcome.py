"""The outcome of one run of a job, and its record: acknowledged, released for a retry, or failed.

Both processes use this module. The job process turns what a command did (returned, raised,
exited) into an :class:`Outcome` and reports it through the shared page; the worker makes one
of its own when it ended the run (an :class:`Ending`: timeout, lease, cancel, forced stop) or
the job process ended without reporting, and a :class:`Recorder` records it in the backend:
``ack`` for exit 0, otherwise ``release`` or ``fail`` as the job's retry policy decides.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from forge.errors import EXIT_USAGE, QueueUnavailable
from forge.job import Event, Reason
from forge.retry import policy as retry_policy

if TYPE_CHECKING:
    from forge.backends.base import Backend, Claim
    from forge.events.model import Event as BusEvent
    from forge.events.worker import WorkerEvents
    from forge.job import Job
    from forge.registry.spec import CommandRegistry
    from forge.worker.heartbeat import Heartbeat
    from forge.worker.options import WorkerOptions
    from forge.worker.reporting import Reporter

#: The most of an error message an outcome carries (a job's exception may be huge).
ERROR_CAP = 4096
_KILLED = -int(signal.SIGKILL)


class Ending(StrEnum):
    """Why a run ended other than by the job process reporting its outcome."""

    UNTAKEN = "untaken"  # the job process ended before taking the request: the job never started
    TIMEOUT = "timeout"  # past the job's timeout
    LEASE = "lease"  # its lease could not be renewed: it must end before the lease does
    FORCED = "forced"  # the worker was told to stop now (a second signal)
    CANCELLED = "cancelled"  # queue:cancel --running


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one run ended: its exit code (0: success), and for anything else why and what went
    wrong. ``retry_after`` is a ``forge.Retry(after=...)``'s delay in seconds."""

    exit_code: int
    reason: str | None = None  # a forge.job.Reason value
    error: str | None = None
    retry_after: float | None = None

    @property
    def ok(self) -> bool:
        """Whether the run succeeded (exit code 0): the job is acknowledged."""
        return self.exit_code == 0

    @classmethod
    def failure(cls, exit_code: int, reason: Reason, error: str) -> Outcome:
        """A run that did not succeed, its error cut to ``ERROR_CAP`` characters."""
        return cls(exit_code, str(reason), error[:ERROR_CAP])

    @classmethod
    def of_exit_code(cls, code: int) -> Outcome:
        """What a command's exit code (``forge.registry.runner.exit_code_of``) means."""
        return SUCCESS if code == 0 else cls.failure(code, Reason.EXIT_CODE, f"exited with code {code}")

    @classmethod
    def of_usage_error(cls, message: str) -> Outcome:
        """The job's arguments did not parse (exit 2, as ``forge NAME`` exits)."""
        return cls.failure(EXIT_USAGE, Reason.EXIT_CODE, message)

    @classmethod
    def of_exception(cls, exit_code: int, error: str) -> Outcome:
        """The command raised: ``error`` says what (a ForgeError's own exit code, else 1)."""
        return cls.failure(exit_code, Reason.EXCEPTION, error)

    @classmethod
    def of_exit_status(cls, status: int) -> Outcome:
        """A job process that ended without reporting an outcome (it exec'd, called
        ``os._exit``, or was killed): its exit status (negative: the signal) is the outcome."""
        if status == 0:
            return SUCCESS
        desc = f"killed by signal {-status}" if status < 0 else f"exited with status {status}"
        return cls.failure(status, Reason.EXIT_CODE, f"job process {desc}")

    @classmethod
    def of_ending(cls, ending: Ending, *, timeout: float, status: int = 0) -> Outcome:
        """The outcome of a run the worker ended (``timeout``: the job's, for the message).
        ``Ending.UNTAKEN`` and ``Ending.FORCED`` have none: the job is handed back, not recorded."""
        if ending is Ending.TIMEOUT:
            return cls.failure(_KILLED, Reason.TIMEOUT, f"timed out after {timeout:g} s")
        if ending is Ending.LEASE:
            return cls.failure(_KILLED, Reason.ABANDONED, "lost the job's lease (the queue server was unreachable)")
        if ending is Ending.CANCELLED:
            return cls.failure(status or -int(signal.SIGTERM), Reason.CANCELLED,
                               "cancelled while running (queue:cancel --running)")
        raise ValueError(f"a run ended by {ending} has no outcome to record")

    def with_verdict(self, reason: str | None, error: str | None) -> Outcome:
        """This outcome with the reason and error the retry policy recorded for it."""
        return replace(self, reason=reason, error=error)

    def to_record(self) -> dict[str, Any]:
        """Its JSON form (in the shared page, and what ``retry.policy.decide`` reads): the
        keys that are set, ``exit_code`` first."""
        out: dict[str, Any] = {"exit_code": self.exit_code}
        if self.reason is not None:
            out["reason"] = self.reason
        if self.error is not None:
            out["error"] = self.error
        if self.retry_after is not None:
            out["retry_after"] = self.retry_after
        return out

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Outcome | None:
        """The outcome of a JSON form (``to_record``, or ``retry.outcome.reply_of``); None if
        it is not one (no int ``exit_code``)."""
        code = record.get("exit_code")
        if type(code) is not int:
            return None
        if code == 0 and "reason" not in record:
            return SUCCESS
        reason, error, after = record.get("reason"), record.get("error"), record.get("retry_after")
        return cls(code, reason if isinstance(reason, str) else None, error if isinstance(error, str) else None,
                   float(after) if isinstance(after, int | float) else None)


#: The outcome of a run that succeeded.
SUCCESS = Outcome(0)
#: A run the worker's forced stop cut short: released uncounted, it has no exit code of its own.
INTERRUPTED = Outcome(_KILLED, str(Reason.INTERRUPTED))


@dataclass(frozen=True, slots=True)
class RunningJob:
    """The run of one claimed job, from the worker's start of it: what its report lines and
    events say of it. ``report()`` is the JSON form of ``queue:work --json`` (keys and order
    are read by log shippers: keep them)."""

    claim: Claim
    started: float  # Unix time

    @property
    def job(self) -> Job:
        """The claimed job."""
        return self.claim.job

    def report(self, **extra: Any) -> dict[str, Any]:
        """``job_id``, ``command``, ``queue``, ``attempt``, ``started``, then ``extra``."""
        job = self.claim.job
        return {"job_id": job.id, "command": job.command, "queue": job.queue, "attempt": self.claim.attempt,
                "started": self.started, **extra}


@dataclass(frozen=True, slots=True)
class _DeferredAck:
    """A success whose ack goes with the next claim (``Backend.ack_claim``)."""

    claim: Claim
    done: Event
    report: dict[str, Any]
    events: list[BusEvent]


class Recorder:
    """Records outcomes in the backend, each once: ``record`` (ack, release or fail),
    ``interrupted`` (released uncounted) and ``hand_back`` (an unstarted claim returned).

    Every store call goes through ``durably`` (the worker's: it retries through an outage
    until the record lands). A success is acknowledged together with the next claim when the
    backend can (``ack_claim``): ``ack_claim`` then sends it, and ``flush`` sends it alone;
    the worker must call one of them before it waits, pauses or stops.
    ``events`` (the project's listeners, or None) may be set until the worker runs.
    """

    def __init__(self, backend: Backend, registry: CommandRegistry, options: WorkerOptions, *,
                 report: Reporter, heartbeat: Heartbeat, durably: Callable[[Callable[[], None]], None]) -> None:
        self.backend = backend
        self.registry = registry
        self.options = options
        self.report = report
        self.heartbeat = heartbeat
        self.durably = durably
        self.events: WorkerEvents | None = None
        self._defer = getattr(backend, "ack_claim", None) is not None
        self._unacked: _DeferredAck | None = None
        self._later: list[BusEvent] = []  # see ahead

    @property
    def pending(self) -> bool:
        """Whether a success waits to be acknowledged with the next claim."""
        return self._unacked is not None

    def record(self, run: RunningJob, outcome: Outcome, *, tail: str, retry: bool) -> None:
        """Acknowledge ``outcome`` if it is a success; otherwise release the claim with a
        backoff or fail it, as the job's policy decides (``retry`` False: fail it as it is).
        ``tail``: the end of the job's output, for the record and the policy's directives."""
        claim, opts = run.claim, self.options
        duration = time.time() - run.started
        ms = round(duration * 1000, 1)
        if outcome.ok:
            done = Event("done", claim.attempt, time.time(), worker=opts.name, exit_code=0,
                         duration=round(duration, 6), tries=claim.job.max_attempts or opts.tries)
            evs = self.events.outcome(claim, "done", outcome, run.started) if self.events is not None else []
            self._ack(_DeferredAck(claim, done, run.report(duration_ms=ms), evs))
            return
        pol = self.policy(claim.job)
        if retry:
            decision = retry_policy.decide(pol, claim.attempt, outcome.to_record(), tail,
                                           lambda: self._history(claim.job.id))
        else:
            decision = retry_policy.Decision(False, reason=outcome.reason, error=outcome.error)
        event = Event("released" if decision.release else "failed", claim.attempt, time.time(), worker=opts.name,
                      reason=decision.reason, error=decision.error, exit_code=outcome.exit_code,
                      duration=round(duration, 6), output_tail=(tail or None) if decision.counted else None,
                      tries=pol.tries)
        verdict = outcome.with_verdict(decision.reason, decision.error)
        data = run.report(duration_ms=ms, reason=decision.reason, error=decision.error, exit_code=outcome.exit_code)
        if not decision.release:
            evs = self.events.outcome(claim, "failed", verdict, run.started) if self.events is not None else []
            self.durably(lambda: self.backend.fail(claim, event))
            self.report("failed", data)
            self.heartbeat.update(failed=self.heartbeat.record.failed + 1)
        else:
            delay, counted = decision.delay, decision.counted
            evs = (self.events.outcome(claim, "released", verdict, run.started, retry_in=delay, counted=counted)
                   if self.events is not None else [])
            self.durably(lambda: self.backend.release(claim, event, delay, counted=counted))
            self.report("released", {**data, "retry_in": delay, **({} if counted else {"counted": False})})
        self._after(evs)

    def interrupted(self, run: RunningJob) -> None:
        """The worker was forced to stop during the run: release the job at once, this
        attempt not counted (it was not the job's doing)."""
        claim = run.claim
        evs = (self.events.outcome(claim, "released", INTERRUPTED, run.started, retry_in=0, counted=False)
               if self.events is not None else [])
        self.durably(lambda: self.backend.release(claim, None, 0))
        self.report("released", run.report(reason=str(Reason.INTERRUPTED), counted=False))
        self._after(evs)

    def hand_back(self, claim: Claim) -> None:
        """Return a claim whose job did not start (the worker is stopping or pausing):
        released at once, uncounted, with no event; its limits' slots are freed."""
        self.durably(lambda: self.backend.release(claim, None, 0))
        self.let_go(claim)

    def let_go(self, claim: Claim) -> None:
        """Free the limits' slots the claim held, once its outcome is recorded."""
        if claim.holds is not None:
            from forge.limits.gate import release

            self.durably(lambda: release(self.backend, claim))

    def ack_claim(self, queues: tuple[str, ...], name: str, timeout: float) -> Claim | None:
        """Send the waiting ack and claim the next job in one call; without a waiting ack,
        or when that call fails (then the ack is sent alone, durably), claim plainly."""
        pending = self._unacked
        if pending is None:
            return self.backend.claim(queues, name, timeout)
        try:
            nxt: Claim | None = self.backend.ack_claim(  # type: ignore[attr-defined]
                pending.claim, pending.done, queues, name, timeout)
        except (QueueUnavailable, OSError):
            # As without ack_claim: the ack retried until it lands (fenced: never twice), then a claim.
            self.flush()
            return self.backend.claim(queues, name, timeout)
        self._unacked = None
        self._acked(pending)
        return nxt

    def ahead(self, started: Claim | None, queues: tuple[str, ...], name: str, timeout: float) -> Claim | None:
        """While a job runs (the worker claims ahead): the waiting ack, that ``started`` (a claim
        made ahead) runs now, and with ``queues`` the next claim, made ahead, in one quick call
        (``claim_ahead``). Raises on an outage (``QueueUnavailable``, ``OSError``), the ack still
        waiting: never retried here, where a job runs. The ack's in-process listeners wait for
        ``run_later`` (they must not hold up the watch over the running job)."""
        pending = self._unacked
        nxt: Claim | None = self.backend.claim_ahead(  # type: ignore[attr-defined]
            pending.claim if pending is not None else None, pending.done if pending is not None else None,
            started, queues, name, timeout)
        if pending is not None:
            self._unacked = None
            self._acked(pending, listeners_now=False)
        return nxt

    def run_later(self) -> None:
        """The in-process listeners of acks ``ahead`` sent while the last job ran."""
        if self._later:
            evs, self._later = self._later, []
            self._after(evs)

    def flush(self) -> None:
        """Send a waiting ack now, alone (the worker will not claim next)."""
        pending = self._unacked
        if pending is None:
            return
        self.durably(lambda: self.backend.ack(pending.claim, pending.done))
        self._unacked = None
        self._acked(pending)

    def policy(self, job: Job) -> retry_policy.Policy:
        """The job's retry policy: its own, its command's declaration, this worker's options."""
        spec = self.registry.get(job.command)
        return retry_policy.policy_of(job, spec.defaults if spec is not None else None,
                                      self.options.tries, self.options.backoff)

    def _ack(self, success: _DeferredAck) -> None:
        if self._defer:
            # One still waiting (the call made as this job started failed: an outage) is sent
            # first, durably: replaced, it would be lost and its job recovered as abandoned.
            self.flush()
            self._unacked = success  # sent with the next claim
            return
        self.durably(lambda: self.backend.ack(success.claim, success.done))
        self._acked(success)

    def _acked(self, success: _DeferredAck, *, listeners_now: bool = True) -> None:
        """An ack has landed: report it, then the in-process listeners of its events (or, sent
        while a job runs, at ``run_later``)."""
        self.report("done", success.report)
        self.heartbeat.update(done=self.heartbeat.record.done + 1)
        if listeners_now:
            self._after(success.events)
        else:
            self._later.extend(success.events)

    def _after(self, evs: list[BusEvent]) -> None:
        if evs and self.events is not None:
            self.events.after(evs)

    def _history(self, job_id: str) -> list[Event]:
        """The job's events so far (read only when a retry bound counts them)."""
        try:
            info = self.backend.find(job_id)
        except (QueueUnavailable, OSError):
            return []
        return list(info.events) if info is not None else []


__all__ = ["ERROR_CAP", "INTERRUPTED", "SUCCESS", "Ending", "Outcome", "Recorder", "RunningJob"]
