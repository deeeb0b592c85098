"""The worker: ``forge queue:work``. It supervises one job process (``forge.jobproc``).

The job process claims a job, runs it, records the outcome and claims the next, with no
process switch per job. The worker around it stays small and safe: it enforces timeouts by
killing the job process's whole group, renews leases, copies long jobs' output to their logs
as it appears, recovers abandoned jobs, handles signals, and when the job process dies
mid-job it adopts the claim and records what happened. One job runs at a time per worker, as
in Laravel; run several workers for parallelism.
"""

from __future__ import annotations

import contextlib
import functools
import os
import select
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TextIO

from .backends.base import Claim
from .errors import QueueUnavailable
from .job import Event, Reason, backoff_delay
from .jobproc import spawn
from .jobshare import PAUSE, STOP, OutputBuffer, SharedState
from .reporting import Reporter, console_reporter
from .worker_options import StopReason, WorkerOptions, parse_queues

if TYPE_CHECKING:
    from .backends.base import Backend
    from .registry import CommandRegistry


def _no_report(event: str, data: dict[str, Any]) -> None:
    return None


@dataclass
class Worker:
    """Runs jobs from ``options.queues`` until a stop condition; see ``run``."""

    backend_factory: Callable[[], Backend]
    registry: CommandRegistry
    options: WorkerOptions = field(default_factory=WorkerOptions)
    make_reporter: Callable[[TextIO], Reporter] = lambda stream: _no_report
    cwd: str | None = None  # where jobs run: the project root
    #: The supervisor's own store client (short timeouts); default: ``backend_factory``.
    supervisor_factory: Callable[[], Backend] | None = None

    def __post_init__(self) -> None:
        self.backend = (self.supervisor_factory or self.backend_factory)()
        self.report = self.make_reporter(sys.stdout)
        self.shared = SharedState()
        self.output = OutputBuffer(self.shared)
        self.pid = 0
        self.pidfd = -1
        self.restart_seen: tuple[float | None] | None = None
        self.started_at = time.time()
        self._signals = 0
        self._stop: StopReason | None = None
        self._killed_for: str | None = None
        self._outage = 0.0
        self._respawn_at = self._respawn_delay = 0.0
        self._lease: tuple[str, float] = ("", 0.0)
        self._sig_r, self._sig_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    # -- helpers shared with the job process ------------------------------------------------

    def job_timeout(self, claim: Claim) -> float:
        return claim.job.timeout if claim.job.timeout is not None else self.options.timeout

    def event_info(self, claim: Claim, started: float) -> dict[str, Any]:
        job = claim.job
        return {"job_id": job.id, "command": job.command, "queue": job.queue, "attempt": claim.attempt,
                "started": started}

    def record(self, claim: Claim, reply: dict[str, Any], started: float, info: dict[str, Any],
               *, tail: str, retry: bool) -> None:
        """Acknowledge, release with backoff, or fail the claim according to ``reply``."""
        job, opts = claim.job, self.options
        duration = time.time() - started
        ms = round(duration * 1000, 1)
        code = reply.get("exit_code", 1)
        if code == 0:
            done = Event("done", claim.attempt, time.time(), worker=opts.name, exit_code=0,
                         duration=round(duration, 6))
            self._durably(lambda: self.backend.ack(claim, done))
            self.report("done", {**info, "duration_ms": ms})
            return
        final = not retry or claim.attempt >= (job.max_attempts or opts.tries)
        event = Event("failed" if final else "released", claim.attempt, time.time(), worker=opts.name,
                      reason=reply.get("reason"), error=reply.get("error"), exit_code=code,
                      duration=round(duration, 6), output_tail=tail or None)
        data = {**info, "duration_ms": ms, "reason": reply.get("reason"), "error": reply.get("error"),
                "exit_code": code}
        if final:
            self._durably(lambda: self.backend.fail(claim, event))
            self.report("failed", data)
        else:
            delay = backoff_delay(job.backoff if job.backoff is not None else opts.backoff, claim.attempt)
            self._durably(lambda: self.backend.release(claim, event, delay))
            self.report("released", {**data, "retry_in": delay})

    def _durably(self, action: Callable[[], None]) -> None:
        """Record an outcome, retrying through a store outage until it lands."""
        delay = 0.1
        while True:
            try:
                action()
                return
            except QueueUnavailable as exc:
                if self._stop is StopReason.FORCED:
                    return  # the claim's lock or lease lapses; recovery records it later
                self.report("backend_unavailable", {"error": str(exc), "retry_in": delay})
                time.sleep(delay)
                delay = min(delay * 2, 10.0)

    # -- signals ----------------------------------------------------------------------------

    def _on_stop_signal(self, signum: int, frame: Any) -> None:
        self._signals += 1
        self._stop = StopReason.SIGNAL if self._signals == 1 else StopReason.FORCED

    def _on_pause(self, signum: int, frame: Any) -> None:
        # No output here: a handler must not write to a stream it may have interrupted.
        self.shared.set_flag(PAUSE, signum == signal.SIGUSR2)

    def install_signals(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            signal.signal(sig, self._on_stop_signal)
        signal.signal(signal.SIGUSR2, self._on_pause)
        signal.signal(signal.SIGCONT, self._on_pause)
        # The job process installs its own SIGUSR1 handler; until it has, ignore (not die of) it.
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        signal.set_wakeup_fd(self._sig_w, warn_on_full_buffer=False)

    # -- the supervisor loop ------------------------------------------------------------------

    def run(self) -> StopReason:
        opts = self.options
        started = time.monotonic()
        self.report("worker_started", {"queues": list(opts.queues), "name": opts.name, "pid": os.getpid()})
        self.restart_seen = self._call(lambda: (self.backend.restart_requested_at(),))
        next_maintenance = 0.0
        next_flush = next_beat = 0.0
        reason: StopReason | None = None
        paused_reported = False
        try:
            while reason is None:
                now = time.monotonic()
                if now >= next_maintenance:
                    counts = self._call(lambda: self.backend.maintain(opts.tries))
                    if counts and any(counts.values()):
                        self.report("maintenance", counts)
                    next_maintenance = now + opts.maintenance_interval
                if opts.max_time and now - started >= opts.max_time and self._stop is None:
                    self._stop = StopReason.MAX_TIME
                if self._stop is not None and not self.pid:
                    reason = self._stop
                    break
                if self._stop is StopReason.FORCED:
                    self._kill("forced")
                elif self._stop is not None and not self.shared.flag(STOP):
                    self.shared.set_flag(STOP, True)
                    self._wake_job_process()
                if not self.pid:
                    if self._outage and not self._store_reachable():
                        self._pause_for_outage()
                        continue
                    if time.monotonic() < self._respawn_at:
                        self._wait(self._respawn_at - time.monotonic())
                        continue
                    self.shared.set_record(None)
                    self.pid = spawn(self)
                    self.pidfd = os.pidfd_open(self.pid)
                if self.shared.flag(PAUSE) != paused_reported:
                    paused_reported = self.shared.flag(PAUSE)
                    self.report("paused" if paused_reported else "resumed", {})
                record = self.shared.record()
                wake = next_maintenance
                if opts.max_time:
                    wake = min(wake, started + opts.max_time)
                running = bool(record and "id" in record)
                if running:
                    assert record is not None
                    deadline = record["timeout_at"]
                    now_wall = time.time()
                    if now_wall >= deadline:
                        self._kill("timeout")
                        continue
                    mono_offset = time.monotonic() - now_wall
                    wake = min(wake, deadline + mono_offset, next_flush)
                    if now >= next_flush:
                        self.output.flush_to_log(self.backend, record["id"],
                                                 still_running=functools.partial(self._running, record["id"]))
                        next_flush = now + 0.5
                    if record.get("lease_until") is not None:
                        if self._lease[0] != record["ref"]:
                            self._lease = (record["ref"], record["lease_until"])
                        if now_wall >= self._lease[1] - opts.grace - 1.0:
                            # The lease is about to lapse (renewals failed or were too slow):
                            # another worker may take the job, so this run must end first.
                            self._kill("lease")
                            continue
                        if now >= next_beat:
                            self._heartbeat(record)
                            next_beat = now + opts.heartbeat_interval
                        wake = min(wake, next_beat)
                # Poll the job record at least every 0.1 s: a job that starts while the worker
                # sleeps must still have its timeout enforced (the job process never wakes us).
                self._wait(min(max(wake - time.monotonic(), 0.0), 0.1))
        finally:
            if self.pid:
                self._kill("forced")
            self.backend.close()
        self.report("worker_stopped", {"reason": str(reason), "jobs": self.shared.jobs_done})
        return reason

    def _call(self, fn: Callable[[], Any]) -> Any:
        """Call the store; on an outage log it, remember it, and return None."""
        try:
            result = fn()
        except QueueUnavailable as exc:
            self._outage = min(max(self._outage * 2, 0.5), 10.0)
            self.report("backend_unavailable", {"error": str(exc), "retry_in": self._outage})
            return None
        if self._outage:
            self._outage = 0.0
            self.report("backend_available", {})
        return result

    def _store_reachable(self) -> bool:
        return self._call(lambda: self.backend.paused()) is not None

    def _pause_for_outage(self) -> None:
        self._wait(self._outage)

    def _wait(self, timeout: float) -> None:
        fds = [self._sig_r] + ([self.pidfd] if self.pidfd >= 0 else [])
        with contextlib.suppress(InterruptedError):
            ready, _, _ = select.select(fds, [], [], timeout)
            if self._sig_r in ready:
                with contextlib.suppress(BlockingIOError, OSError):
                    while os.read(self._sig_r, 64):
                        pass
            if self.pidfd >= 0 and self.pidfd in ready:
                self._reap()

    def _wake_job_process(self) -> None:
        if self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGUSR1)

    def _kill(self, why: str) -> None:
        """End the job process's whole group: SIGTERM, up to the grace period, then SIGKILL."""
        if not self.pid:
            return
        self._killed_for = why
        grace = self.options.grace if why == "timeout" else min(self.options.grace, 1.0)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGTERM)
        end = time.monotonic() + grace
        while time.monotonic() < end and _group_alive(self.pid):
            time.sleep(0.01)
        self._reap()

    def _reap(self) -> None:
        """The job process ended (or is being ended): kill what is left of its group, wait
        until it is gone (a forked descendant may hold the claim), then reap it and record its
        running job's outcome, or learn why it stopped. Until it is reaped, the job process
        keeps its group id ours, so the group signalled is never someone else's."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        end = time.monotonic() + 2.0
        while time.monotonic() < end and _group_alive(self.pid):
            time.sleep(0.005)
        try:
            _, status = os.waitpid(self.pid, 0)
            code = os.waitstatus_to_exitcode(status)
        except ChildProcessError:
            code = 0
        os.close(self.pidfd)
        self.pid, self.pidfd = 0, -1
        why, self._killed_for = self._killed_for, None
        record = self.shared.record() or {}
        self.shared.set_record(None)
        if "id" in record:
            self._adopt_and_record(record, code, why)
            done = self.shared.add_job()
            opts = self.options
            if opts.once and self._stop is None:
                self._stop = StopReason.ONCE
            if opts.max_jobs and done >= opts.max_jobs and self._stop is None:
                self._stop = StopReason.MAX_JOBS
            return
        exit_reason = record.get("exit")
        if exit_reason is None and why is None:
            # It died between jobs (a bug or a broken environment): do not respawn in a loop.
            self._respawn_delay = min(max(self._respawn_delay * 2, 0.5), 30.0)
            self.report("job_process_died", {"status": code, "retry_in": self._respawn_delay})
            self._respawn_at = time.monotonic() + self._respawn_delay
            return
        self._respawn_delay = 0.0
        if exit_reason in ("empty", "once", "max_jobs", "memory", "restart"):
            if self._stop is None or self._stop is StopReason.SIGNAL and exit_reason != "signal":
                self._stop = StopReason(exit_reason)
        elif exit_reason == "signal" and self._stop is None:
            self._stop = StopReason.SIGNAL  # the worker's parent went away

    def _adopt_and_record(self, record: dict[str, Any], code: int, why: str | None) -> None:
        claim = None
        for _ in range(50):
            try:
                claim = self.backend.adopt(record["ref"])
                break
            except QueueUnavailable as exc:
                self.report("backend_unavailable", {"error": str(exc), "retry_in": 0.2})
                time.sleep(0.2)
        tail = self.output.tail(2048) if self.output.size() else ""
        if claim is None:  # finished or recovered meanwhile; or a descendant still holds it
            self.output.flush_to_log(self.backend, record["id"], reset=True)
            return
        self.output.flush_to_log(self.backend, record["id"], reset=True)
        info = {k: record[k] for k in ("command", "queue", "attempt")} | {
            "job_id": record["id"],
            "started": record["started"]}
        if why == "forced":
            self._durably(lambda: self.backend.release(claim, None, 0))
            self.report("released", {**info, "reason": "interrupted", "counted": False})
            return
        if why == "timeout":
            timeout = record["timeout_at"] - claim.claimed_at
            reply = {"exit_code": -int(signal.SIGKILL), "reason": str(Reason.TIMEOUT),
                     "error": f"timed out after {timeout:g} s"}
        elif why == "lease":
            reply = {"exit_code": -int(signal.SIGKILL), "reason": str(Reason.ABANDONED),
                     "error": "lost the job's lease (queue server unreachable)"}
        else:
            desc = f"killed by signal {-code}" if code < 0 else f"exited with status {code}"
            reply = {"exit_code": code or 1, "reason": str(Reason.EXIT_CODE), "error": f"job process {desc}"}
        self.record(claim, reply, record["started"], info, tail=tail, retry=True)

    def _running(self, job_id: str) -> bool:
        return (self.shared.record() or {}).get("id") == job_id

    def _heartbeat(self, record: dict[str, Any]) -> None:
        """Renew the running job's lease; end the job at once if its claim was lost."""
        ref = record["ref"]
        try:
            claim = self.backend.adopt(ref)
            ok = claim is not None and self.backend.heartbeat(claim)
        except QueueUnavailable:
            return  # the loop kills the job before the lease it has lapses
        if ok:
            assert claim is not None
            if claim.lease_until:
                self._lease = (ref, claim.lease_until)
        elif (self.shared.record() or {}).get("ref") == ref:  # lost, and not finished meanwhile
            self._kill("lease")


def _group_alive(pgid: int) -> bool:
    """Whether a live (not zombie) process is in process group ``pgid``."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                fields = fh.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != b"Z" and int(fields[2]) == pgid:
            return True
    return False


__all__ = ["StopReason", "Worker", "WorkerOptions", "console_reporter", "parse_queues"]
