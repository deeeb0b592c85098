"""The worker: ``forge queue:work``. It claims jobs and runs each in a fresh job process.

The worker (the supervisor) claims a job and holds the claim (the file backend's lock, a Redis
lease it renews) for exactly as long as the run lives; it forks a job process for the run
(``forge.worker.jobproc``), which has none of the worker's descriptors, so nothing the job's code
does to its own process can release the claim. The worker enforces the timeout by ending the
job process and every process it started (it is their child subreaper, so a ``setsid()``
daemon cannot slip away), copies the job's output to its log as it appears, and records the
outcome: acknowledged, released for a retry, or failed. One job runs at a time per worker, as
in Laravel; run several workers for parallelism.
"""

from __future__ import annotations

import contextlib
import gc
import os
import resource
import select
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TextIO

from forge import _linux
from forge.backends.base import Claim
from forge.errors import QueueUnavailable
from forge.events.model import META_KEY, job_env
from forge.job import Reason
from forge.jobprogress.tracker import ProgressTracker
from forge.limits import LIMITS_KEY
from forge.registry import runner
from forge.retry import policy as retry_policy
from forge.retry.backoff import outage_wait
from forge.worker import jobproc
from forge.worker.heartbeat import Heartbeat, WorkerState
from forge.worker.options import StopReason, WorkerOptions, parse_queues
from forge.worker.outcome import Ending, Outcome, Recorder, RunningJob
from forge.worker.reporting import Reporter, console_reporter
from forge.worker.shared import NEVER, JobRequest, OutputBuffer, SharedState

if TYPE_CHECKING:
    from forge.backends.base import Backend
    from forge.events.worker import WorkerEvents
    from forge.limits.gate import Gate
    from forge.registry.spec import CommandRegistry, CommandSpec

#: The job process's own kill timer fires this long after the job's deadline (timeout + kill
#: grace), in case the worker cannot kill it (stopped, frozen, or dead with its children left).
BACKSTOP = 0.5
#: ... and this long before its lease ends (the store's clock is read before the request that
#: set the lease was sent, so the job process dies before any other worker can claim the job).
LEASE_SAFETY = 1.0
_TAIL = 2048
#: A claim made ahead is run only if it is this young (seconds past its hold bound) and its lease
#: has this much left beyond the grace and LEASE_SAFETY: the worker's timeout counts from the
#: job's start, and its SIGKILL must still come before the backstop (deadline + BACKSTOP).
AHEAD_STALE = 0.4
AHEAD_LEASE = 1.0
#: How soon a failed hand-back of a claim made ahead (or a failed mark of one's start) is tried again.
AHEAD_RETRY = 0.5


def _no_report(event: str, data: dict[str, Any]) -> None:
    return None


@dataclass(frozen=True)
class _JobProcess:
    """The worker's job process: its pid, a pidfd, and the two ends of its control pipes."""

    pid: int
    pidfd: int
    go: int  # the worker writes a byte: a job request is in the shared page
    done: int  # the job process writes a byte: its outcome is in the shared page


class _Wakeup(Exception):
    """Raised by a signal handler to end an idle wait early."""


@dataclass
class _Loop:
    """The run loop's clocks (monotonic) and what it has seen."""

    started: float
    next_maintenance: float = 0.0
    next_restart_check: float = 0.0
    paused_reported: bool = False
    #: The restart marker when the worker started (None: the store was unreachable then).
    restart_seen: tuple[float | None] | None = None


@dataclass(frozen=True)
class _Ended:
    """How a run in the job process ended: why the worker ended it (None: it did not), the
    outcome the job process reported (None: it reported none), and the job process's exit
    status (0 while it lives on)."""

    ending: Ending | None
    outcome: Outcome | None
    status: int


@dataclass
class _Watch:
    """What the worker's watch over one run has seen: why it ended the run (None: it has not),
    when SIGKILL follows its SIGTERM, and its clocks (monotonic)."""

    claim: Claim
    proc: _JobProcess
    seq: int  # the request's number in the shared page
    timeout_at: float  # wall clock
    deadline_kill: float  # boot clock: the job process's own backstop
    beat_every: float
    next_beat: float
    next_flush: float
    done_fd: int  # -1 once the job process closed its end
    why: Ending | None = None
    kill_at: float | None = None
    announced: bool = False
    cancel_asked: bool = False

    @classmethod
    def begin(cls, claim: Claim, proc: _JobProcess, seq: int, timeout_at: float, deadline_kill: float,
              heartbeat_interval: float) -> _Watch:
        """The watch at the start of a run: a lease is renewed six times over its length (one
        lost reply costs nothing), at least every ``heartbeat_interval``."""
        now = time.monotonic()
        beat_every = heartbeat_interval
        if claim.lease_until is not None:
            beat_every = min(beat_every, max((claim.lease_until - claim.claimed_at) / 6, 0.2))
        next_beat = now + beat_every if claim.lease_until is not None else float("inf")
        return cls(claim, proc, seq, timeout_at, deadline_kill, beat_every, next_beat, now + 0.5, proc.done)

    def wake(self, now: float, wall: float, grace: float) -> float:
        """When (monotonic) the watch must look again, if the job process says nothing."""
        wake = min(self.next_flush, self.next_beat, now + max(self.timeout_at - wall, 0.0))
        if self.claim.lease_until is not None:
            wake = min(wake, now + max(self.claim.lease_until - grace - LEASE_SAFETY - wall, 0.0))
        if self.kill_at is not None:
            wake = min(wake, self.kill_at)
        return wake


@dataclass
class Worker:
    """Runs jobs from ``options.queues`` until a stop condition; see ``run``."""

    backend_factory: Callable[[], Backend]
    registry: CommandRegistry
    options: WorkerOptions = field(default_factory=WorkerOptions)
    make_reporter: Callable[[TextIO], Reporter] = lambda stream: _no_report
    cwd: str | None = None  # where jobs run: the project root
    #: A store client with short timeouts for lease renewals (default: the main one).
    supervisor_factory: Callable[[], Backend] | None = None
    #: The connection's name and where its jobs are, for the start banner and the stop line.
    where: dict[str, str] = field(default_factory=dict)
    #: Called at every maintenance pass (``queue:work --schedule``: dispatch due ticks); it
    #: reports its own errors and must not raise.
    tick: Callable[[], None] | None = None
    #: The project's listeners (``forge.events.worker.WorkerEvents``), or None when there are none.
    events: WorkerEvents | None = None
    #: Claims through ``[limits]`` (``forge.limits.gate``); None: the plain claim path.
    gate: Gate | None = None

    def __post_init__(self) -> None:
        self.backend = self.backend_factory()
        self._renewer: Backend | None = None
        self.report = self.make_reporter(sys.stdout)
        self.shared = SharedState()
        self.output = OutputBuffer()
        self._proc: _JobProcess | None = None
        self._seq = 0
        self.jobs_done = 0
        self.jobs_failed = 0
        self.started_at = time.time()
        self._signals = 0
        self._stop: StopReason | None = None
        self._paused = False
        self._idle = False
        self._outage = 0.0
        self._quarantined = 0
        self._loop = _Loop(started=time.monotonic())
        #: A claim made as the idle wait woke (``Backend.wait_claim``), or made ahead while the
        #: last job ran (``_claim_ahead``), run by the next ``_claim``.
        self._woken: Claim | None = None
        #: Claiming ahead (Redis): the claim in ``_woken`` if it was made ahead; when it goes
        #: back if the current job still runs then (monotonic); a claim made ahead being handed
        #: back (never to run: its hand-back may have landed unheard); the claim made ahead that
        #: now runs, until the server hears it started; how long the last run took.
        self._ahead: Claim | None = None
        self._give_back_at: float | None = None
        self._giving_back: Claim | None = None
        self._owed: Claim | None = None
        self._last_run: float | None = None
        self._sig_r, self._sig_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.options.echo:
            self.output.echo = _echo
        self.progress = ProgressTracker(self.backend)  # ::forge-progress lines -> the job's record
        self.output.scan = self.progress.feed
        self.heartbeat = Heartbeat(self.backend, self.options.name, self.options.queues,
                                   self.options.maintenance_interval)
        #: Records every outcome (ack, release, fail); its ``events`` are set by ``run``.
        self.recorder = Recorder(self.backend, self.registry, self.options, report=self.report,
                                 heartbeat=self.heartbeat, durably=self._durably)

    def job_timeout(self, claim: Claim) -> float:
        """The claimed job's timeout in seconds: its own, else the worker's ``--timeout``."""
        return claim.job.timeout if claim.job.timeout is not None else self.options.timeout

    # -- signals ----------------------------------------------------------------------------

    def _on_stop_signal(self, signum: int, frame: Any) -> None:
        self._signals += 1
        self._stop = StopReason.SIGNAL if self._signals == 1 else StopReason.FORCED
        if self._idle:
            raise _Wakeup()

    def _on_pause(self, signum: int, frame: Any) -> None:
        # No output here: a handler must not write to a stream it may have interrupted.
        self._paused = signum == signal.SIGUSR2
        if self._idle:
            raise _Wakeup()

    def install_signals(self) -> None:
        """SIGTERM, SIGINT, SIGQUIT: stop after the job (a second: now); SIGUSR2 pauses,
        SIGCONT resumes. Call it in the main thread before ``run``."""
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            signal.signal(sig, self._on_stop_signal)
        signal.signal(signal.SIGUSR2, self._on_pause)
        signal.signal(signal.SIGCONT, self._on_pause)
        signal.set_wakeup_fd(self._sig_w, warn_on_full_buffer=False)

    # -- the loop -----------------------------------------------------------------------------

    def run(self) -> StopReason:
        """Run jobs until a stop condition (Laravel's ``Worker::daemon``): each round does
        its upkeep when due, stops, pauses or restarts when asked, else claims the next job
        and runs it, or waits for one. Returns why it stopped; the job process and anything
        a job left running are ended on the way out, whatever happened."""
        self._start()
        try:
            while True:
                now = time.monotonic()
                self._maintain_when_due(now)
                if self._stopping(now):
                    break
                if self._pausing(now) or self._restart_asked(now):
                    continue
                claim = self._claim()
                if claim is None:
                    self._when_empty()
                    continue
                if self._stop is not None:  # asked to stop while claiming: hand it back, uncounted
                    self.recorder.hand_back(claim)
                    break
                self._run_job(claim)
                self.recorder.let_go(claim)
                self._after_job()
        finally:
            self._shut_down()
        return self._stopped()

    def _start(self) -> None:
        """Become the job processes' subreaper, load what every job process shares, announce."""
        _linux.set_child_subreaper()
        _linux.boottime()
        _linux.preload()  # ctypes and libc now, not in every job process
        gc.freeze()  # the commands and forge, loaded once, are shared with job processes untouched
        self.recorder.events = self.events
        self._loop = _Loop(started=time.monotonic())
        self.report("worker_started", {"queues": list(self.options.queues), "name": self.options.name,
                                       "pid": os.getpid(), **self.where})
        if self.events is not None:
            self.events.worker_started()
        self.heartbeat.update(state=WorkerState.IDLE)
        self._loop.restart_seen = self._restart_marker()

    def _maintain_when_due(self, now: float) -> None:
        """Every ``maintenance_interval``: the backend's upkeep, then the schedule's tick."""
        if now < self._loop.next_maintenance:
            return
        self.recorder.flush()
        self._maintain()
        if self.tick is not None:
            self.tick()
        self._loop.next_maintenance = now + self.options.maintenance_interval

    def _stopping(self, now: float) -> bool:
        """Whether to stop now (asked, or past ``--max-time``); a waiting ack is sent first."""
        opts = self.options
        if opts.max_time and now - self._loop.started >= opts.max_time and self._stop is None:
            self._stop = StopReason.MAX_TIME
        if self._stop is None:
            return False
        self.recorder.flush()
        return True

    def _pausing(self, now: float) -> bool:
        """Report a pause or resume (SIGUSR2, SIGCONT); while paused, sleep a round instead of
        claiming (True)."""
        loop = self._loop
        if self._paused:  # first let go of what it holds: a worker that says "paused" holds no job
            self.recorder.flush()
            self._unclaim_woken()
        if self._paused != loop.paused_reported:
            loop.paused_reported = self._paused
            self.report("paused" if self._paused else "resumed", {})
            self.heartbeat.update(state=WorkerState.PAUSED if self._paused else WorkerState.IDLE)
        if not self._paused:
            return False
        self.heartbeat.beat()
        self._idle_sleep(min(loop.next_maintenance - now, 1.0))
        return True

    def _restart_asked(self, now: float) -> bool:
        """Whether ``queue:restart`` was asked since this worker started (then it stops: True).
        Checked every 0.1 s at most: a stat or a round trip, not one before every job."""
        loop = self._loop
        if now < loop.next_restart_check:
            return False
        marker = self._restart_marker()
        if marker is not None:
            if loop.restart_seen is None:
                # The store was down at start: a marker set after we started counts.
                loop.restart_seen = (None,) if (marker[0] or 0) > self.started_at else marker
            if marker != loop.restart_seen:
                self.recorder.flush()
                self._stop = StopReason.RESTART
                return True
        loop.next_restart_check = now + 0.1
        return False

    def _restart_marker(self) -> tuple[float | None] | None:
        """The backend's restart marker (in a tuple), or None when the store is unreachable."""
        marker: tuple[float | None] | None = self._call(lambda: (self.backend.restart_requested_at(),))
        return marker

    def _when_empty(self) -> None:
        """No job was claimed: stop if draining (``--once``, ``--stop-when-empty``), else wait
        for one (not during an outage: ``_claim`` has slept already)."""
        opts = self.options
        if self._stop is not None or self._outage:
            return
        if (opts.once or opts.stop_when_empty) and not (self.gate and self.gate.blocked):
            self._stop = StopReason.EMPTY
        else:
            self.heartbeat.beat()  # before the wait, not on the way to the next job
            self._idle_wait(self._loop.next_maintenance, self._loop.started)

    def _after_job(self) -> None:
        """Count the job; stop after it when a limit is reached; rest (``--rest``) if asked."""
        opts = self.options
        self.jobs_done += 1
        if self._stop is None:
            if opts.once:
                self._stop = StopReason.ONCE
            elif opts.max_jobs and self.jobs_done >= opts.max_jobs:
                self._stop = StopReason.MAX_JOBS
            elif opts.memory and _peak_mb() >= opts.memory and _rss_mb() >= opts.memory:
                self._stop = StopReason.MEMORY
        if opts.rest and self._stop is None:
            self.recorder.flush()
            self._idle_sleep(opts.rest)

    def _shut_down(self) -> None:
        """Send a waiting ack, hand back a woken claim, end the job process and whatever it
        left, say so to the listeners, and close the store's clients."""
        self.recorder.flush()
        self._unclaim_woken()
        if self._proc is not None:
            self._signal_all(signal.SIGKILL)
            self._reap(self._proc)
            self._end_leftovers()
        if self.events is not None:
            self.events.worker_stopped(str(self._stop), self.jobs_done)
        self.heartbeat.remove()
        self.backend.close()
        if self._renewer is not None:
            self._renewer.close()

    def _stopped(self) -> StopReason:
        """Report the quarantine and the stop line; the reason it stopped."""
        reason = self._stop
        assert reason is not None  # the loop ends only once a reason is set
        with contextlib.suppress(QueueUnavailable):
            self._report_quarantine()  # files set aside while it ran
        self.report("worker_stopped", {"reason": str(reason), "jobs": self.jobs_done, **self.where})
        return reason

    def _claim(self) -> Claim | None:
        opts = self.options
        claim: Claim | None = None
        if self._giving_back is not None:
            self._hand_back_ahead()
        try:
            if self.gate is None:
                if self._woken is not None:
                    claim, self._woken = self._woken, None
                    if claim is self._ahead:
                        claim = self._take_ahead(claim)
                if claim is None:
                    if self.recorder.pending:
                        claim = self.recorder.ack_claim(opts.queues, opts.name, opts.timeout)
                    else:
                        claim = self.backend.claim(opts.queues, opts.name, opts.timeout)
                if claim is not None and LIMITS_KEY in claim.job.metadata:  # limits of its own
                    from forge.limits.gate import switch_on

                    self._owed = None  # handed back: its ahead mark goes with it
                    self.gate = switch_on(None, self.backend, claim)
                    claim = self.gate.claim(self.backend, opts.queues, opts.name, opts.timeout)
            else:
                self.recorder.flush()  # the limits' claim is a call of its own
                claim = self.gate.claim(self.backend, opts.queues, opts.name, opts.timeout)
        except (QueueUnavailable, OSError) as exc:
            error = _store_error(exc)
            if opts.once or opts.stop_when_empty:
                # A drainer (cron) must not call an unusable queue empty: exit 6, say why.
                self.report("backend_unavailable", {"error": error, "retry_in": None})
                self._stop = StopReason.UNAVAILABLE
                return None
            self._outage = outage_wait(self._outage)
            self.report("backend_unavailable", {"error": error, "retry_in": self._outage})
            self._idle_sleep(self._outage)
            return None
        if self._outage:
            self._outage = 0.0
            self.report("backend_available", {})
        return claim

    # -- claiming ahead (Redis) ----------------------------------------------------------------

    def _may_claim_ahead(self) -> bool:
        """Whether to claim the next job while this one runs: on a backend that can (Redis),
        without limits, when the worker goes on after this job (no ``--once``, ``--rest``, stop,
        pause, nor ``--max-jobs`` reached) and its last run was short (a long job gains nothing,
        and would only keep a job from another worker)."""
        opts = self.options
        return (opts.ahead_hold > 0 and self.gate is None and not opts.once and not opts.rest
                and self._stop is None and not self._paused and self._woken is None
                and self._giving_back is None and (not opts.max_jobs or self.jobs_done + 1 < opts.max_jobs)
                and self._last_run is not None and self._last_run < opts.ahead_after
                and getattr(self.backend, "claim_ahead", None) is not None)

    def _claim_ahead(self, retry: bool = False) -> None:
        """Right after a job went to the job process: the waiting ack, that a claim made ahead
        started (``_owed``), and, if ``_may_claim_ahead``, the next claim from its first queue, held in ``_woken``,
        in one quick call. On an outage nothing is held: the ack and the mark are tried again
        at the watch's next flush (``retry``: that try, with no claim) and the ack is sent
        after the job as without claiming ahead (fenced; a claim whose reply was lost comes
        back to the next claim, which carries its token)."""
        ahead = not retry and self._may_claim_ahead()
        if self._owed is None and not self.recorder.pending and not ahead:
            return
        if getattr(self.backend, "claim_ahead", None) is None:
            return
        opts = self.options
        try:
            # From the first of its queues only: a job of a later queue claimed ahead would run
            # before one dispatched to an earlier queue while the current job runs (strict
            # priority); a later queue's job is claimed between jobs, as without claiming ahead.
            held = self.recorder.ahead(self._owed, opts.queues[:1] if ahead else (), opts.name, opts.timeout)
        except (QueueUnavailable, OSError):
            return
        self._owed = None
        if held is not None:
            self._woken = self._ahead = held
            self._give_back_at = time.monotonic() + opts.ahead_hold

    def _take_ahead(self, claim: Claim) -> Claim | None:
        """The claim made ahead, to run now if it is young and its lease has ample time left
        (it has, unless the worker was held up between jobs); else handed back (None)."""
        self._ahead = None
        self._give_back_at = None
        wall = time.time()
        young = wall - claim.claimed_at <= self.options.ahead_hold + AHEAD_STALE
        lease_left = (claim.lease_until - wall) if claim.lease_until is not None else float("inf")
        if young and lease_left > self.options.grace + LEASE_SAFETY + AHEAD_LEASE:
            self._owed = claim  # its start is told to the server with the next claim ahead
            return claim
        self._giving_back = claim
        self._hand_back_ahead()
        return None

    def _hold_expired(self, now: float) -> None:
        """The current job still runs ``ahead_hold`` after the claim made ahead: hand that claim
        back (to the head of its queue, uncounted: ``give_back``), so an idle worker runs it."""
        if self._woken is not None and self._woken is self._ahead:
            self._giving_back, self._woken, self._ahead = self._woken, None, None
        self._give_back_at = None
        if self._giving_back is not None:
            self._hand_back_ahead(now)

    def _hand_back_ahead(self, now: float | None = None) -> None:
        """One quick try to hand back ``_giving_back``; failed, it is tried again at the next
        wake (``AHEAD_RETRY``), never in a loop while a job runs. Fenced: a hand-back whose
        reply was lost and landed is a no-op the second time; the claim is never run."""
        claim = self._giving_back
        if claim is None:
            return
        try:
            self.backend.give_back(claim)  # type: ignore[attr-defined]
        except (QueueUnavailable, OSError):
            self._give_back_at = (now if now is not None else time.monotonic()) + AHEAD_RETRY
            return
        self._giving_back = None

    def _maintain(self) -> None:
        try:
            counts = self.backend.maintain(self.options.tries)
        except (QueueUnavailable, OSError) as exc:
            # A full disk or an outage must not stop the worker: it retries at the next round.
            error = _store_error(exc)
            self.report("maintenance_failed", {"error": error})
            return
        if counts and any(counts.values()):
            self.report("maintenance", counts)
        self._report_quarantine()
        if self.events is not None:
            self.events.upkeep(self.backend)

    def _report_quarantine(self) -> None:
        """Log the quarantine's size when it changes (and is not empty), so an operator learns of it."""
        count_fn = getattr(self.backend, "quarantined", None)
        if not callable(count_fn):
            return
        try:
            count = int(count_fn())
        except OSError:
            return
        if count and count != self._quarantined:
            self.report("quarantined", {"count": count, "where": f"{getattr(self.backend, 'root', '')}/quarantine"})
        self._quarantined = count

    def _call(self, fn: Callable[[], Any]) -> Any:
        """Call the store; on an outage log it and return None."""
        try:
            return fn()
        except (QueueUnavailable, OSError) as exc:
            error = _store_error(exc)
            self.report("backend_unavailable", {"error": error, "retry_in": 0.1})
            self._outage = max(self._outage, 0.1)  # the next claim that gets through says so
            return None

    def _idle_wait(self, next_maintenance: float, started: float) -> None:
        opts = self.options
        timeout = opts.sleep or 0.05
        timeout = min(timeout, max(next_maintenance - time.monotonic(), 0.001))
        if opts.max_time:
            timeout = min(timeout, max(started + opts.max_time - time.monotonic(), 0.001))
        try:
            due = self.backend.next_due(opts.queues)
            if due is not None:
                timeout = min(timeout, max(due - time.time(), 0.001))
            if self.gate is not None:  # a held job's rate frees a token then
                soon = self.gate.soon(timeout)
                if soon is not None:
                    self._idle_sleep(soon)
                    return
                timeout = self.gate.wait_for(timeout)
            if self.backend.lease_based:
                # A signal must not interrupt a server call mid-reply: wait in short steps.
                timeout = min(timeout, 1.0)
                wait_claim = getattr(self.backend, "wait_claim", None)
                if wait_claim is not None and self.gate is None and not self.recorder.pending:
                    self._woken = wait_claim(opts.queues, timeout, opts.name, opts.timeout)  # claimed on waking
                else:
                    self.backend.wait(opts.queues, timeout)
                return
            self._idle = True
            if self._stop is None:
                self.backend.wait(opts.queues, timeout)
        except _Wakeup:
            pass
        except (QueueUnavailable, OSError) as exc:
            error = _store_error(exc)
            self.report("backend_unavailable", {"error": error, "retry_in": timeout})
            self._outage = max(self._outage, timeout)  # the next claim that gets through says so
            self._idle_sleep(timeout)
        finally:
            self._idle = False

    def _idle_sleep(self, seconds: float) -> None:
        self._idle = True
        try:
            if self._stop is None:
                self._wait(seconds)
        except _Wakeup:
            pass
        finally:
            self._idle = False

    def _wait(self, timeout: float, *fds: int) -> list[int]:
        """Sleep until a signal, one of ``fds`` is readable, or ``timeout``; returns the
        readable ones of ``fds``."""
        watch = [self._sig_r, *(fd for fd in fds if fd >= 0)]
        try:
            ready, _, _ = select.select(watch, [], [], max(timeout, 0.0))
        except InterruptedError:
            return []
        if self._sig_r in ready:
            with contextlib.suppress(BlockingIOError, OSError):
                while os.read(self._sig_r, 64):
                    pass
        return [fd for fd in ready if fd != self._sig_r]

    # -- one job ------------------------------------------------------------------------------

    def _run_job(self, claim: Claim) -> None:
        """Run one claimed job in the job process, supervise it and record its outcome."""
        run = RunningJob(claim, time.time())
        spec = self.registry.get(claim.job.command)
        refusal = self._refusal(run, spec)
        if refusal is not None:
            self.recorder.record(run, refusal, tail="", retry=False)
            return
        assert spec is not None  # refused otherwise
        ended = self._run_in_job_process(run, spec)
        self._end_leftovers()
        self._owed = None  # its outcome, once recorded, clears its ahead mark
        self._record(run, ended)

    def _refusal(self, run: RunningJob, spec: CommandSpec | None) -> Outcome | None:
        """Why the job must not start at all (its command is gone, or a retry past its
        retry-until deadline), or None."""
        job = run.job
        if spec is None:
            return Outcome.failure(1, Reason.UNKNOWN_COMMAND,
                                   f'Command "{job.command}" is not defined (renamed or removed since dispatch).')
        attempt = run.claim.attempt
        if attempt > 1 and (job.retry or spec.defaults) and retry_policy.expired(self.recorder.policy(job), attempt):
            return Outcome.failure(1, Reason.RETRY_UNTIL, "not started: its retry-until deadline passed while it waited")
        return None

    def _request(self, claim: Claim) -> JobRequest:
        """The job process's request for the claim: the command, its arguments, and its
        environment (``FORGE_JOB_ID`` and the rest)."""
        job = claim.job
        env = {"FORGE_JOB_ID": job.id, "FORGE_JOB_ATTEMPT": str(claim.attempt), "FORGE_QUEUE": job.queue,
               "FORGE_JOB_TOKEN": str(claim.fence)}
        if isinstance(job.metadata.get("scheduled_for"), str):  # dispatched by the scheduler
            env["FORGE_SCHEDULED_FOR"] = job.metadata["scheduled_for"]
        if META_KEY in job.metadata:  # a listener job: its event in FORGE_EVENT
            env.update(job_env(job.metadata))
        self._seq += 1
        return JobRequest(self._seq, job.command, list(job.args), env)

    def _run_in_job_process(self, run: RunningJob, spec: CommandSpec) -> _Ended:
        """Hand the job to the job process and supervise it to its end; a request the job
        process ended without taking goes to a fresh one (twice at most)."""
        claim = run.claim
        # From the job's start: a claim made ahead starts up to ahead_hold + AHEAD_STALE after
        # it was made, and its deadline (claim + timeout + KILL_GRACE) and lease stay ahead of
        # the kill (the job process's own timer, kill_at, still counts from the claim).
        timeout_at = run.started + self.job_timeout(claim)
        deadline_kill = _to_boot(claim.deadline) + BACKSTOP
        lease_kill = _to_boot(claim.lease_until) - LEASE_SAFETY if claim.lease_until is not None else None
        kill_at = min(deadline_kill, lease_kill) if lease_kill is not None else deadline_kill
        request = self._request(claim)
        if self.events is not None:  # stored before the job's code runs
            self.events.job_started(claim, run.started)
        self.progress.start(claim.job.id, claim.attempt, run.started, claim.fence / 1e6 if claim.fence else None)
        proc = self._hand_over(spec, request, kill_at)
        # Reported and published once the job runs (a write and, on Redis, a round trip), not
        # on the way to the job's start.
        self.report("starting", run.report())
        self.heartbeat.update(state=WorkerState.RUNNING, job_id=claim.job.id, job_command=claim.job.command,
                              job_since=run.started)
        self._claim_ahead()  # while the job runs: the last ack, and the next claim
        try:
            ended = self._supervise(claim, proc, timeout_at, deadline_kill)
            for _ in range(2):
                if ended.ending is not Ending.UNTAKEN:
                    break
                # The job process ended before taking the request (its check after the last
                # job failed): the job has not started; hand it to a fresh job process.
                proc = self._hand_over(spec, request, kill_at)
                ended = self._supervise(claim, proc, timeout_at, deadline_kill)
            if ended.ending is Ending.UNTAKEN:
                ended = _Ended(None, ended.outcome, ended.status)
        finally:
            self._last_run = time.time() - run.started
            self.recorder.run_later()
            self.heartbeat.update(state=WorkerState.STOPPING if self._stop else WorkerState.IDLE,
                                  job_id=None, job_command=None, job_since=None)
        return ended

    def _record(self, run: RunningJob, ended: _Ended) -> None:
        """Copy the rest of the job's output to its log, then record the run's outcome: the
        job process's, or the worker's own when it ended the run."""
        job_id = run.job.id
        if ended.ending is Ending.CANCELLED:
            self._finish_output(job_id)
            outcome = Outcome.of_ending(Ending.CANCELLED, timeout=self.job_timeout(run.claim), status=ended.status)
            self.recorder.record(run, outcome, tail="", retry=False)
            with contextlib.suppress(Exception):
                self.backend.clear_cancel(job_id)
            return
        if ended.ending is Ending.FORCED:
            self._finish_output(job_id)
            self.recorder.interrupted(run)
            return
        if ended.ending is not None:  # timeout, lease
            outcome = Outcome.of_ending(ended.ending, timeout=self.job_timeout(run.claim))
        else:
            outcome = ended.outcome or Outcome.of_exit_status(ended.status)
        tail = self.output.tail(_TAIL) if not outcome.ok and self.output.size() else ""
        self._finish_output(job_id)
        self.recorder.record(run, outcome, tail=tail, retry=True)

    def _finish_output(self, job_id: str) -> None:
        """Copy what is left of the job's output to its log, empty the buffer, end its progress."""
        self.output.flush_to_log(self.backend, job_id, reset=True)
        self.progress.finish()

    def _hand_over(self, spec: CommandSpec, request: JobRequest, kill_at: float) -> _JobProcess:
        """Give the job to the job process (forking one first if there is none)."""
        self.shared.kill_at = kill_at
        self.shared.put_request(request)
        for _ in range(2):
            proc = self._proc or self._spawn(spec)
            try:
                os.write(proc.go, b".")
                return proc
            except OSError:  # it died between jobs (a leftover of the last job killed it)
                self._reap(proc)
        raise RuntimeError("cannot start a job process")  # pragma: no cover - fork would have failed

    def _spawn(self, spec: CommandSpec) -> _JobProcess:
        runner.click_command(spec)  # built once here, inherited by every job process
        go_r, go_w = os.pipe2(os.O_CLOEXEC)
        done_r, done_w = os.pipe2(os.O_CLOEXEC)
        ctx = jobproc.JobContext(self.registry, self.cwd, self.output.fd, self.shared, os.getpid(),
                                 go_r, done_w, renew=self.backend.lease_based,
                                 fresh=self.options.fresh_process, memory=self.options.memory)
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            jobproc.run(ctx)
        os.close(go_r)
        os.close(done_w)
        with contextlib.suppress(OSError):
            os.setpgid(pid, pid)  # also done in the child; whichever runs first wins
        self._proc = _JobProcess(pid, os.pidfd_open(pid), go_w, done_r)
        return self._proc

    def _reap(self, proc: _JobProcess) -> int:
        """Wait for the job process to end (it has, or is being killed); its exit code."""
        try:
            _, status = os.waitpid(proc.pid, 0)
            code = os.waitstatus_to_exitcode(status)
        except ChildProcessError:  # pragma: no cover - reaped elsewhere
            code = 0
        for fd in (proc.pidfd, proc.go, proc.done):
            with contextlib.suppress(OSError):
                os.close(fd)
        if self._proc is proc:
            self._proc = None
        return code

    def _supervise(self, claim: Claim, proc: _JobProcess, timeout_at: float,
                   deadline_kill: float) -> _Ended:
        """Wait for the job to end, enforcing the timeout and the lease, copying its output
        and renewing its lease meanwhile; returns how it ended."""
        watch = _Watch.begin(claim, proc, self._seq, timeout_at, deadline_kill, self.options.heartbeat_interval)
        ready: list[int] = []
        while True:
            if watch.done_fd in ready:
                ended = self._took_outcome(watch)
                if ended is not None:
                    return ended
            if proc.pidfd in ready:
                return self._exited(watch)
            now, wall = time.monotonic(), time.time()
            if self._stop is StopReason.SIGNAL and not watch.announced:
                self._announce_stopping(watch)
            if watch.why is None:
                end = self._due_ending(watch, wall)
                if end is not None:
                    # It may have finished while this worker was not looking (stopped, or
                    # busy): an outcome already reported wins over a deadline seen late.
                    ready = self._wait(0, proc.pidfd, watch.done_fd)
                    if ready and end is not Ending.FORCED:
                        continue
                    self._end_run(watch, end, now)
            if watch.kill_at is not None and now >= watch.kill_at:
                self._signal_all(signal.SIGKILL)
                watch.kill_at = now + 0.1
            if now >= watch.next_flush:
                self._flush(watch, now)
            if watch.why is None and now >= watch.next_beat:
                if not self._heartbeat(claim, deadline_kill):
                    ready = []
                    continue  # lost: the checks above end the run
                watch.next_beat = now + watch.beat_every
            wake = watch.wake(now, wall, self.options.grace)
            if self._give_back_at is not None:
                if now >= self._give_back_at:
                    self._hold_expired(now)
                if self._give_back_at is not None:
                    wake = min(wake, self._give_back_at)
            ready = self._wait(wake - now, proc.pidfd, watch.done_fd)

    def _took_outcome(self, watch: _Watch) -> _Ended | None:
        """The job process wrote on its pipe: how the run ended if that was its outcome (None:
        a byte the job's own code wrote there, or the pipe closed as the process ends)."""
        try:
            got = os.read(watch.done_fd, 64)
        except OSError:
            got = b""
        if not got:
            watch.done_fd = -1  # closed: the job process is ending; wait for it
        reply = self.shared.reply(watch.seq)
        if reply is None or watch.why is not None:
            return None
        self.shared.kill_at = NEVER
        if reply.recycle:
            self._reap(watch.proc)  # it exits after a job that changed it
        return _Ended(None, reply.outcome, 0)

    def _exited(self, watch: _Watch) -> _Ended:
        """The job process ended: how the run ended, with the outcome it reported, if any."""
        code = self._reap(watch.proc)
        job_kill_at, self.shared.kill_at = self.shared.kill_at, NEVER
        reply = self.shared.reply(watch.seq)
        why = watch.why
        if reply is None and why is None and self.shared.taken < watch.seq:
            return _Ended(Ending.UNTAKEN, None, code)
        if why is None and reply is None and code == -signal.SIGKILL and _linux.boottime() >= job_kill_at - 0.05:
            # The job process's own timer ended it: the worker was stopped (or too slow) to.
            why = Ending.TIMEOUT if job_kill_at >= watch.deadline_kill - 0.001 else Ending.LEASE
        return _Ended(why, reply.outcome if reply is not None else None, code)

    def _announce_stopping(self, watch: _Watch) -> None:
        """A stop signal came while a job runs: say so once (the job runs on to its end)."""
        watch.announced = True
        job = watch.claim.job
        self.report("stopping", {"job_id": job.id, "command": job.command, "queue": job.queue})
        if self.events is not None:
            self.events.worker_stopping(str(self._stop))

    def _due_ending(self, watch: _Watch, wall: float) -> Ending | None:
        """Why the run must be ended now (forced stop, timeout, a lease about to lapse, a
        cancel), or None."""
        claim = watch.claim
        if self._stop is StopReason.FORCED:
            return Ending.FORCED
        if wall >= watch.timeout_at:
            return Ending.TIMEOUT
        if claim.lease_until is not None and wall >= claim.lease_until - self.options.grace - LEASE_SAFETY:
            return Ending.LEASE  # renewals failed: the run must end before the lease does
        if watch.cancel_asked:
            return Ending.CANCELLED
        return None

    def _end_run(self, watch: _Watch, why: Ending, now: float) -> None:
        """End the run: SIGTERM now, SIGKILL after the grace (a timeout's full grace; at most
        1 s for the rest)."""
        watch.why = why
        self._signal_all(signal.SIGTERM)
        grace = self.options.grace
        watch.kill_at = now + (grace if why is Ending.TIMEOUT else min(grace, 1.0))

    def _flush(self, watch: _Watch, now: float) -> None:
        """Every half second of a run: copy its output to its log, look for a cancel request,
        and beat the worker's heartbeat."""
        job_id = watch.claim.job.id
        self.output.flush_to_log(self.backend, job_id)
        watch.next_flush = now + 0.5
        with contextlib.suppress(QueueUnavailable, OSError):
            watch.cancel_asked = watch.cancel_asked or self.backend.cancel_requested(job_id)
        if self._owed is not None or self.recorder.pending:
            self._claim_ahead(retry=True)  # the quick call right after the hand-over failed
        self.heartbeat.beat()

    def _heartbeat(self, claim: Claim, deadline_kill: float) -> bool:
        """Renew the lease and move the job process's kill timer with it; False if lost."""
        renewer = self._renewer
        if renewer is None:
            renewer = self._renewer = self.supervisor_factory() if self.supervisor_factory else self.backend
        before = _linux.boottime() - time.time()  # the wall clock's offset, read before the request
        try:
            ok = renewer.heartbeat(claim)
        except Exception:  # noqa: BLE001 - an outage: the run is ended before its lease lapses
            return True
        if not ok:
            claim.lease_until = time.time()  # lost to another worker: end the run now
            return False
        if claim.lease_until is not None:
            self.shared.kill_at = min(deadline_kill, claim.lease_until + before - LEASE_SAFETY)
        if claim.holds is not None:
            from forge.limits.gate import renew

            with contextlib.suppress(Exception):  # an outage: the job's own lease ends the run first
                renew(renewer, claim)
        return True

    def _signal_all(self, sig: int) -> None:
        """Signal the job process's group and every other process it started, in any session."""
        for pid in _linux.descendants():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)

    def _end_leftovers(self) -> None:
        """End what a finished job left running (as systemd ends a unit's processes): SIGTERM,
        up to a second's grace, then SIGKILL; reap the orphans among them (the worker is their
        subreaper). The job process itself stays, idle, for the next job."""
        keep = self._proc.pid if self._proc is not None else 0
        if _linux.main_thread_children(os.getpid()) == ([keep] if keep else []) and (
                not keep or not _linux.main_thread_children(keep)):
            return  # the usual case, in two reads: nothing but the idle job process
        left = self._leftovers(keep)
        if not left:
            return
        self._signal(left, signal.SIGTERM)
        end = time.monotonic() + min(self.options.grace, 1.0)
        give_up = end + 5.0
        while True:
            left = self._leftovers(keep)
            if not left:
                return
            if time.monotonic() >= give_up:  # not ours to kill (another uid), or stuck in the kernel
                self.report("leftovers", {"pids": left})
                return
            if time.monotonic() >= end:
                self._signal(left, signal.SIGKILL)
            time.sleep(0.01)

    def _leftovers(self, keep: int) -> list[int]:
        """Live processes under the worker but the job process ``keep``; reaps dead orphans."""
        live = []
        mine = set(_linux.descendants(os.getpid(), depth=1))
        for pid in _linux.descendants():
            if pid == keep:
                continue
            if _linux.is_zombie(pid):
                if pid in mine:
                    with contextlib.suppress(ChildProcessError):
                        os.waitpid(pid, os.WNOHANG)
                continue
            live.append(pid)
        return live

    @staticmethod
    def _signal(pids: list[int], sig: int) -> None:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)

    # -- recording the outcome (forge.worker.outcome) ------------------------------------------

    def _unclaim_woken(self) -> None:
        """Hand back, uncounted, a claim made on waking or ahead that this worker will not run
        now (one made ahead to the head of its queue: ``give_back``; one made on waking to its
        tail, as ``release`` puts a job back)."""
        if self._woken is not None:
            claim, self._woken = self._woken, None
            if claim is self._ahead:
                self._ahead, self._give_back_at, self._giving_back = None, None, claim
            else:
                self.recorder.hand_back(claim)
        back = self._giving_back
        if back is not None:
            self._durably(lambda: self.backend.give_back(back))  # type: ignore[attr-defined]
            self._giving_back = self._give_back_at = None

    def _durably(self, action: Callable[[], None]) -> None:
        """Record an outcome, retrying through a store outage or a full disk until it lands.

        The claim stays held meanwhile (the lock stays open; a lease is not renewed, so on
        Redis another worker recovers the job once it lapses and this record is refused)."""
        delay = 0.1
        reported = False
        while True:
            try:
                action()
                if reported:
                    self.report("backend_available", {})
                return
            except FileNotFoundError as exc:
                # The claimed file is gone: recovered by another worker after the lease lapsed
                # (this worker was stopped or frozen), or removed. Nothing of ours to record.
                self.report("record_refused", {"error": _os_error(exc)})
                return
            except (QueueUnavailable, OSError) as exc:
                if self._stop is StopReason.FORCED:
                    return  # the claim's lock or lease lapses; recovery records it later
                if not reported:  # once per outage, not once per retry
                    error = _store_error(exc)
                    self.report("record_failed", {"error": error, "retry_in": delay})
                    reported = True
                self._idle_sleep(delay)
                delay = outage_wait(delay, first=0.1)


def _echo(data: bytes) -> None:
    """``queue:work --echo``: a job's output on the worker's console as well as in its log."""
    sys.stdout.flush()
    out = getattr(sys.stdout, "buffer", None)
    if out is not None:
        out.write(data)
        out.flush()


def _to_boot(wall: float) -> float:
    """A wall-clock instant on CLOCK_BOOTTIME (which no clock step moves)."""
    return wall - time.time() + _linux.boottime()


def _peak_mb() -> float:
    """The peak resident memory: one system call, and never below the current (``_rss_mb``)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm", "rb") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1024 / 1024
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _store_error(exc: QueueUnavailable | OSError) -> str:
    """What a store outage or an I/O error says, for the worker's report lines."""
    return str(exc) if isinstance(exc, QueueUnavailable) else _os_error(exc)


def _os_error(exc: OSError) -> str:
    where = f" ({exc.filename})" if exc.filename else ""
    return f"{exc.strerror or exc}{where}"


__all__ = ["StopReason", "Worker", "WorkerOptions", "console_reporter", "parse_queues"]
