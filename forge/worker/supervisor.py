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
import functools
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
from forge.job import Event, Reason
from forge.jobprogress.tracker import ProgressTracker
from forge.limits import LIMITS_KEY
from forge.registry import runner
from forge.retry import policy as retry_policy
from forge.worker import jobproc
from forge.worker.heartbeat import Heartbeat, WorkerState
from forge.worker.options import StopReason, WorkerOptions, parse_queues
from forge.worker.reporting import Reporter, console_reporter
from forge.worker.shared import NEVER, OUTCOME, REQUEST, OutputBuffer, SharedState

if TYPE_CHECKING:
    from forge.backends.base import Backend
    from forge.registry.spec import CommandRegistry, CommandSpec

#: The job process's own kill timer fires this long after the job's deadline (timeout + kill
#: grace), in case the worker cannot kill it (stopped, frozen, or dead with its children left).
BACKSTOP = 0.5
#: ... and this long before its lease ends (the store's clock is read before the request that
#: set the lease was sent, so the job process dies before any other worker can claim the job).
LEASE_SAFETY = 1.0
_TAIL = 2048


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
    events: Any = None
    #: Claims through ``[limits]`` (``forge.limits.gate``); None: the plain claim path.
    gate: Any = None

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
        #: A successful claim whose ack waits to go with the next claim (``Backend.ack_claim``).
        self._unacked: tuple[Claim, Event, dict[str, Any], list[Any]] | None = None
        #: A claim made as the idle wait woke (``Backend.wait_claim``), run by the next ``_claim``.
        self._woken: Claim | None = None
        self._sig_r, self._sig_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.options.echo:
            self.output.echo = _echo
        self.progress = ProgressTracker(self.backend)  # ::forge-progress lines -> the job's record
        self.output.scan = self.progress.feed
        self.heartbeat = Heartbeat(self.backend, self.options.name, self.options.queues,
                                   self.options.maintenance_interval)

    def job_timeout(self, claim: Claim) -> float:
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
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            signal.signal(sig, self._on_stop_signal)
        signal.signal(signal.SIGUSR2, self._on_pause)
        signal.signal(signal.SIGCONT, self._on_pause)
        signal.set_wakeup_fd(self._sig_w, warn_on_full_buffer=False)

    # -- the loop -----------------------------------------------------------------------------

    def run(self) -> StopReason:
        opts = self.options
        _linux.set_child_subreaper()
        _linux.boottime()
        _linux.preload()  # ctypes and libc now, not in every job process
        gc.freeze()  # the commands and forge, loaded once, are shared with job processes untouched
        started = time.monotonic()
        self.report("worker_started", {"queues": list(opts.queues), "name": opts.name, "pid": os.getpid(),
                                       **self.where})
        if self.events is not None:
            self.events.worker_started()
        self.heartbeat.update(state=WorkerState.IDLE)
        restart_seen = self._call(lambda: (self.backend.restart_requested_at(),))
        next_maintenance = next_restart_check = 0.0
        paused_reported = False
        try:
            while True:
                now = time.monotonic()
                if now >= next_maintenance:
                    self._flush_ack()
                    self._maintain()
                    if self.tick is not None:
                        self.tick()
                    next_maintenance = now + opts.maintenance_interval
                if opts.max_time and now - started >= opts.max_time and self._stop is None:
                    self._stop = StopReason.MAX_TIME
                if self._stop is not None:
                    self._flush_ack()
                    break
                if self._paused != paused_reported:
                    paused_reported = self._paused
                    self.report("paused" if paused_reported else "resumed", {})
                    self.heartbeat.update(state=WorkerState.PAUSED if self._paused else WorkerState.IDLE)
                if self._paused:
                    self._flush_ack()
                    self._unclaim_woken()
                    self.heartbeat.beat()
                    self._idle_sleep(min(next_maintenance - now, 1.0))
                    continue
                if now >= next_restart_check:  # a stat or a round trip: not before every job
                    marker = self._call(lambda: (self.backend.restart_requested_at(),))
                    if marker is not None:
                        if restart_seen is None:
                            # The store was down at start: a marker set after we started counts.
                            restart_seen = (None,) if (marker[0] or 0) > self.started_at else marker
                        if marker != restart_seen:
                            self._flush_ack()
                            self._stop = StopReason.RESTART
                            continue
                    next_restart_check = now + 0.1
                claim = self._claim()
                if claim is None:
                    if self._stop is None and not self._outage:
                        if (opts.once or opts.stop_when_empty) and not (self.gate and self.gate.blocked):
                            self._stop = StopReason.EMPTY
                        else:
                            self.heartbeat.beat()  # before the wait, not on the way to the next job
                            self._idle_wait(next_maintenance, started)
                    continue
                if self._stop is not None:  # asked to stop while claiming: hand it back, uncounted
                    self._durably(functools.partial(self.backend.release, claim, None, 0))
                    self._let_go(claim)
                    break
                self._run_job(claim)
                self._let_go(claim)
                self.jobs_done += 1
                if opts.once and self._stop is None:
                    self._stop = StopReason.ONCE
                if opts.max_jobs and self.jobs_done >= opts.max_jobs and self._stop is None:
                    self._stop = StopReason.MAX_JOBS
                if opts.memory and _peak_mb() >= opts.memory and _rss_mb() >= opts.memory and self._stop is None:
                    self._stop = StopReason.MEMORY
                if opts.rest and self._stop is None:
                    self._flush_ack()
                    self._idle_sleep(opts.rest)
        finally:
            self._flush_ack()
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
        reason = self._stop
        with contextlib.suppress(QueueUnavailable):
            self._report_quarantine()  # files set aside while it ran
        self.report("worker_stopped", {"reason": str(reason), "jobs": self.jobs_done, **self.where})
        return reason

    def _claim(self) -> Claim | None:
        opts = self.options
        claim: Claim | None
        try:
            if self.gate is None:
                if self._woken is not None:
                    claim, self._woken = self._woken, None
                elif self._unacked is not None:
                    claim = self._ack_claim()
                else:
                    claim = self.backend.claim(opts.queues, opts.name, opts.timeout)
                if claim is not None and LIMITS_KEY in claim.job.metadata:  # limits of its own
                    from forge.limits.gate import switch_on

                    self.gate = switch_on(None, self.backend, claim)
                    claim = self.gate.claim(self.backend, opts.queues, opts.name, opts.timeout)
            else:
                self._flush_ack()  # the limits' claim is a call of its own
                claim = self.gate.claim(self.backend, opts.queues, opts.name, opts.timeout)
        except (QueueUnavailable, OSError) as exc:
            error = str(exc) if isinstance(exc, QueueUnavailable) else _os_error(exc)
            if opts.once or opts.stop_when_empty:
                # A drainer (cron) must not call an unusable queue empty: exit 6, say why.
                self.report("backend_unavailable", {"error": error, "retry_in": None})
                self._stop = StopReason.UNAVAILABLE
                return None
            self._outage = min(max(self._outage * 2, 0.5), 10.0)
            self.report("backend_unavailable", {"error": error, "retry_in": self._outage})
            self._idle_sleep(self._outage)
            return None
        if self._outage:
            self._outage = 0.0
            self.report("backend_available", {})
        return claim

    def _maintain(self) -> None:
        try:
            counts = self.backend.maintain(self.options.tries)
        except (QueueUnavailable, OSError) as exc:
            # A full disk or an outage must not stop the worker: it retries at the next round.
            error = str(exc) if isinstance(exc, QueueUnavailable) else _os_error(exc)
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
            error = str(exc) if isinstance(exc, QueueUnavailable) else _os_error(exc)
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
                if wait_claim is not None and self.gate is None and self._unacked is None:
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
            error = str(exc) if isinstance(exc, QueueUnavailable) else _os_error(exc)
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
        job = claim.job
        started = time.time()
        info = {"job_id": job.id, "command": job.command, "queue": job.queue, "attempt": claim.attempt,
                "started": started}
        spec = self.registry.get(job.command)
        if spec is None:
            unknown = {"exit_code": 1, "reason": str(Reason.UNKNOWN_COMMAND),
                       "error": f'Command "{job.command}" is not defined (renamed or removed since dispatch).'}
            self.record(claim, unknown, started, info, tail="", retry=False)
            return
        if claim.attempt > 1 and (job.retry or spec.defaults) and retry_policy.expired(self._policy(job), claim.attempt):
            late = {"exit_code": 1, "reason": str(Reason.RETRY_UNTIL),
                    "error": "not started: its retry-until deadline passed while it waited"}
            self.record(claim, late, started, info, tail="", retry=False)
            return
        timeout_at = claim.claimed_at + self.job_timeout(claim)
        deadline_kill = _to_boot(claim.deadline) + BACKSTOP
        lease_kill = _to_boot(claim.lease_until) - LEASE_SAFETY if claim.lease_until is not None else None
        kill_at = min(deadline_kill, lease_kill) if lease_kill is not None else deadline_kill
        env = {"FORGE_JOB_ID": job.id, "FORGE_JOB_ATTEMPT": str(claim.attempt), "FORGE_QUEUE": job.queue,
               "FORGE_JOB_TOKEN": str(claim.fence)}
        if isinstance(job.metadata.get("scheduled_for"), str):  # dispatched by the scheduler
            env["FORGE_SCHEDULED_FOR"] = job.metadata["scheduled_for"]
        if META_KEY in job.metadata:  # a listener job: its event in FORGE_EVENT
            env.update(job_env(job.metadata))
        if self.events is not None:  # stored before the job's code runs
            self.events.job_started(claim, started)
        self._seq += 1
        request = {"seq": self._seq, "command": job.command, "args": list(job.args), "env": env}
        self.progress.start(job.id, claim.attempt, started, claim.fence / 1e6 if claim.fence else None)
        proc = self._hand_over(spec, request, kill_at)
        # Reported and published once the job runs (a write and, on Redis, a round trip), not
        # on the way to the job's start.
        self.report("starting", info)
        self.heartbeat.update(state=WorkerState.RUNNING, job_id=job.id, job_command=job.command, job_since=started)
        try:
            why, reply, code = self._supervise(claim, proc, timeout_at, deadline_kill)
            for _ in range(2):
                if why != "untaken":
                    break
                # The job process ended before taking the request (its check after the last
                # job failed): the job has not started; hand it to a fresh job process.
                proc = self._hand_over(spec, request, kill_at)
                why, reply, code = self._supervise(claim, proc, timeout_at, deadline_kill)
            if why == "untaken":
                why = None
        finally:
            self.heartbeat.update(state=WorkerState.STOPPING if self._stop else WorkerState.IDLE,
                                  job_id=None, job_command=None, job_since=None)
        self._end_leftovers()
        if why == "cancelled":
            self.output.flush_to_log(self.backend, job.id, reset=True)
            self.progress.finish()
            reply = {"exit_code": code or -int(signal.SIGTERM), "reason": str(Reason.CANCELLED),
                     "error": "cancelled while running (queue:cancel --running)"}
            self.record(claim, reply, started, info, tail="", retry=False)
            with contextlib.suppress(Exception):
                self.backend.clear_cancel(job.id)
            return
        if why == "forced":
            self.output.flush_to_log(self.backend, job.id, reset=True)
            self.progress.finish()
            evs = self.events.outcome(claim, "released", {"reason": str(Reason.INTERRUPTED)}, started,
                                      retry_in=0, counted=False) if self.events is not None else []
            self._durably(lambda: self.backend.release(claim, None, 0))
            self.report("released", {**info, "reason": "interrupted", "counted": False})
            if evs:
                self.events.after(evs)
            return
        if why == "timeout":
            reply = {"exit_code": -int(signal.SIGKILL), "reason": str(Reason.TIMEOUT),
                     "error": f"timed out after {self.job_timeout(claim):g} s"}
        elif why == "lease":
            reply = {"exit_code": -int(signal.SIGKILL), "reason": str(Reason.ABANDONED),
                     "error": "lost the job's lease (the queue server was unreachable)"}
        elif reply is None:
            if code == 0:  # it exec'd, or called os._exit(0): its exit status is its outcome
                reply = {"exit_code": 0}
            else:
                desc = f"killed by signal {-code}" if code < 0 else f"exited with status {code}"
                reply = {"exit_code": code, "reason": str(Reason.EXIT_CODE), "error": f"job process {desc}"}
        tail = self.output.tail(_TAIL) if reply["exit_code"] != 0 and self.output.size() else ""
        self.output.flush_to_log(self.backend, job.id, reset=True)
        self.progress.finish()
        self.record(claim, reply, started, info, tail=tail, retry=True)

    def _hand_over(self, spec: CommandSpec, request: dict[str, Any], kill_at: float) -> _JobProcess:
        """Give the job to the job process (forking one first if there is none)."""
        self.shared.kill_at = kill_at
        self.shared.set_record(request, REQUEST)
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
                   deadline_kill: float) -> tuple[str | None, dict[str, Any] | None, int]:
        """Wait for the job to end, enforcing the timeout and the lease, copying its output
        and renewing its lease meanwhile. Returns why the worker ended it (if it did), the
        outcome the job process reported (if it did), and the job process's exit code (0
        while it lives on)."""
        opts = self.options
        seq = self._seq
        why: str | None = None
        kill_at: float | None = None  # monotonic: when SIGKILL follows the SIGTERM
        now = time.monotonic()
        next_flush = now + 0.5
        beat_every = opts.heartbeat_interval
        if claim.lease_until is not None:  # six renewals a lease: one lost reply costs nothing
            beat_every = min(beat_every, max((claim.lease_until - claim.claimed_at) / 6, 0.2))
        next_beat = now + beat_every if claim.lease_until is not None else float("inf")
        done_fd = proc.done
        ready: list[int] = []
        announced = cancel_asked = False
        while True:
            if done_fd in ready:
                try:
                    got = os.read(done_fd, 64)
                except OSError:
                    got = b""
                if not got:
                    done_fd = -1  # closed: the job process is ending; wait for it
                reply = self._outcome(seq)
                if reply is not None and why is None:
                    self.shared.kill_at = NEVER
                    if reply.pop("recycle", False):
                        self._reap(proc)  # it exits after a job that changed it
                    return why, reply, 0
                # A byte the job's own code wrote into the pipe: not an outcome; wait on.
            if proc.pidfd in ready:
                code = self._reap(proc)
                job_kill_at, self.shared.kill_at = self.shared.kill_at, NEVER
                reply = self._outcome(seq)
                if reply is None and why is None and self.shared.taken < seq:
                    return "untaken", None, code
                if why is None and reply is None and code == -signal.SIGKILL \
                        and _linux.boottime() >= job_kill_at - 0.05:
                    # The job process's own timer ended it: the worker was stopped (or too slow) to.
                    why = "timeout" if job_kill_at >= deadline_kill - 0.001 else "lease"
                return why, reply, code
            now, wall = time.monotonic(), time.time()
            if self._stop is StopReason.SIGNAL and not announced:
                announced = True
                self.report("stopping", {"job_id": claim.job.id, "command": claim.job.command,
                                         "queue": claim.job.queue})
                if self.events is not None:
                    self.events.worker_stopping(str(self._stop))
            if why is None:
                end: str | None = None
                if self._stop is StopReason.FORCED:
                    end = "forced"
                elif wall >= timeout_at:
                    end = "timeout"
                elif claim.lease_until is not None and wall >= claim.lease_until - opts.grace - LEASE_SAFETY:
                    end = "lease"  # renewals failed: the run must end before the lease does
                elif cancel_asked:
                    end = "cancelled"
                if end is not None:
                    # It may have finished while this worker was not looking (stopped, or
                    # busy): an outcome already reported wins over a deadline seen late.
                    ready = self._wait(0, proc.pidfd, done_fd)
                    if ready and end != "forced":
                        continue
                    why = end
                    self._signal_all(signal.SIGTERM)
                    kill_at = now + (opts.grace if why == "timeout" else min(opts.grace, 1.0))
            if kill_at is not None and now >= kill_at:
                self._signal_all(signal.SIGKILL)
                kill_at = now + 0.1
            if now >= next_flush:
                self.output.flush_to_log(self.backend, claim.job.id)
                next_flush = now + 0.5
                with contextlib.suppress(QueueUnavailable, OSError):
                    cancel_asked = cancel_asked or self.backend.cancel_requested(claim.job.id)
                self.heartbeat.beat()
            if why is None and now >= next_beat:
                if not self._heartbeat(claim, deadline_kill):
                    ready = []
                    continue  # lost: the checks above end the run
                next_beat = now + beat_every
            wake = min(next_flush, next_beat, now + max(timeout_at - wall, 0.0))
            if claim.lease_until is not None:
                wake = min(wake, now + max(claim.lease_until - opts.grace - LEASE_SAFETY - wall, 0.0))
            if kill_at is not None:
                wake = min(wake, kill_at)
            ready = self._wait(wake - now, proc.pidfd, done_fd)

    def _outcome(self, seq: int) -> dict[str, Any] | None:
        reply = self.shared.record(OUTCOME)
        if reply is None or reply.get("seq") != seq or "exit_code" not in reply:
            return None
        reply.pop("seq")
        return reply

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

    # -- recording the outcome -----------------------------------------------------------------

    def record(self, claim: Claim, reply: dict[str, Any], started: float, info: dict[str, Any],
               *, tail: str, retry: bool) -> None:
        """Acknowledge, release with backoff, or fail the claim according to ``reply``."""
        job, opts = claim.job, self.options
        duration = time.time() - started
        ms = round(duration * 1000, 1)
        code = reply.get("exit_code", 1)
        events = self.events
        if code == 0:
            done = Event("done", claim.attempt, time.time(), worker=opts.name, exit_code=0,
                         duration=round(duration, 6), tries=job.max_attempts or opts.tries)
            evs = events.outcome(claim, "done", reply, started) if events is not None else []
            if getattr(self.backend, "ack_claim", None) is not None:
                self._unacked = (claim, done, {**info, "duration_ms": ms}, evs)  # sent with the next claim
                return
            self._durably(lambda: self.backend.ack(claim, done))
            self.report("done", {**info, "duration_ms": ms})
            self.heartbeat.update(done=self.heartbeat.record.done + 1)
            if evs:
                events.after(evs)
            return
        pol = self._policy(job)
        if retry:
            decision = retry_policy.decide(pol, claim.attempt, reply, tail,
                                           lambda: self._history(job.id))
        else:
            decision = retry_policy.Decision(False, reason=reply.get("reason"), error=reply.get("error"))
        event = Event("released" if decision.release else "failed", claim.attempt, time.time(), worker=opts.name,
                      reason=decision.reason, error=decision.error, exit_code=code,
                      duration=round(duration, 6), output_tail=(tail or None) if decision.counted else None,
                      tries=pol.tries)
        verdict = {"reason": decision.reason, "error": decision.error}
        data = {**info, "duration_ms": ms, **verdict, "exit_code": code}
        if not decision.release:
            evs = events.outcome(claim, "failed", {**reply, **verdict}, started) if events is not None else []
            self._durably(lambda: self.backend.fail(claim, event))
            self.report("failed", data)
            self.heartbeat.update(failed=self.heartbeat.record.failed + 1)
        else:
            delay, counted = decision.delay, decision.counted
            evs = (events.outcome(claim, "released", {**reply, **verdict}, started, retry_in=delay, counted=counted)
                   if events is not None else [])
            self._durably(lambda: self.backend.release(claim, event, delay, counted=counted))
            self.report("released", {**data, "retry_in": delay, **({} if counted else {"counted": False})})
        if evs:
            events.after(evs)

    def _policy(self, job: Any) -> retry_policy.Policy:
        """The job's retry policy: its own, its command's declaration, this worker's options."""
        spec = self.registry.get(job.command)
        return retry_policy.policy_of(job, spec.defaults if spec is not None else None,
                                      self.options.tries, self.options.backoff)

    def _history(self, job_id: str) -> list[Event]:
        """The job's events so far (read only when a retry bound counts them)."""
        try:
            info = self.backend.find(job_id)
        except (QueueUnavailable, OSError):
            return []
        return list(info.events) if info is not None else []

    def _ack_claim(self) -> Claim | None:
        """Acknowledge the last job and claim the next in one call (see ``record``)."""
        assert self._unacked is not None
        claim, done, data, evs = self._unacked
        opts = self.options
        try:
            nxt = self.backend.ack_claim(claim, done, opts.queues, opts.name, opts.timeout)  # type: ignore[attr-defined]
        except (QueueUnavailable, OSError):
            # As without ack_claim: the ack retried until it lands (fenced: never twice), then a claim.
            self._flush_ack()
            return self.backend.claim(opts.queues, opts.name, opts.timeout)
        self._unacked = None
        self._acked(data, evs)
        return nxt

    def _unclaim_woken(self) -> None:
        """Hand back, uncounted, a claim made on waking that this worker will not run now."""
        if self._woken is not None:
            claim, self._woken = self._woken, None
            self._durably(functools.partial(self.backend.release, claim, None, 0))
            self._let_go(claim)

    def _flush_ack(self) -> None:
        """Send an ack still waiting for the next claim, now (the worker will not claim next)."""
        if self._unacked is None:
            return
        claim, done, data, evs = self._unacked
        self._durably(lambda: self.backend.ack(claim, done))
        self._unacked = None
        self._acked(data, evs)

    def _acked(self, data: dict[str, Any], evs: list[Any]) -> None:
        """A deferred ack has landed: report it, then the in-process listeners of its events."""
        self.report("done", data)
        self.heartbeat.update(done=self.heartbeat.record.done + 1)
        if evs and self.events is not None:
            self.events.after(evs)

    def _let_go(self, claim: Claim) -> None:
        """Free the limits' slots the claim held, once its outcome is recorded."""
        if claim.holds is not None:
            from forge.limits.gate import release

            self._durably(lambda: release(self.backend, claim))

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
                    error = str(exc) if isinstance(exc, QueueUnavailable) else _os_error(exc)
                    self.report("record_failed", {"error": error, "retry_in": delay})
                    reported = True
                self._idle_sleep(delay)
                delay = min(delay * 2, 10.0)


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


def _os_error(exc: OSError) -> str:
    where = f" ({exc.filename})" if exc.filename else ""
    return f"{exc.strerror or exc}{where}"


__all__ = ["StopReason", "Worker", "WorkerOptions", "console_reporter", "parse_queues"]
