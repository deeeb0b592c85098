"""The worker: claims jobs, runs each in an isolated job process, and records the outcome.

``Worker.run()`` is what ``forge queue:work`` calls. One job runs at a time per worker, as in
Laravel; run several workers for parallelism.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from .backends.base import KILL_GRACE, Claim
from .config import validate_queue_name
from .errors import EXIT_MEMORY, QueueUnavailable, UsageError
from .job import MAX_OUTPUT_TAIL, Event, Reason, backoff_delay
from .jobproc import JobProcess

if TYPE_CHECKING:
    from .backends.base import Backend
    from .registry import CommandRegistry


class StopReason(StrEnum):
    EMPTY = "empty"
    ONCE = "once"
    MAX_JOBS = "max_jobs"
    MAX_TIME = "max_time"
    MEMORY = "memory"
    RESTART = "restart"
    SIGNAL = "signal"
    FORCED = "forced"

    @property
    def exit_code(self) -> int:
        return {StopReason.MEMORY: EXIT_MEMORY, StopReason.FORCED: 1}.get(self, 0)


@dataclass(frozen=True)
class WorkerOptions:
    """``forge queue:work``'s options; a job's own tries, timeout and backoff win over these."""

    queues: tuple[str, ...] = ("default",)
    once: bool = False
    stop_when_empty: bool = False
    max_jobs: int = 0
    max_time: float = 0.0
    sleep: float = 3.0
    rest: float = 0.0
    timeout: float = 60.0
    tries: int = 1
    backoff: tuple[float, ...] = (0.0,)
    memory: int = 128
    name: str = ""
    grace: float = KILL_GRACE
    recycle_after: int = 1000
    maintenance_interval: float = 2.0
    heartbeat_interval: float = 5.0

    def __post_init__(self) -> None:
        if not self.queues:
            raise UsageError("Give at least one queue, e.g. --queue=high,default.")
        for q in self.queues:
            validate_queue_name(q)
        for what, value in (("max-jobs", self.max_jobs), ("max-time", self.max_time), ("sleep", self.sleep),
                            ("rest", self.rest), ("memory", self.memory)):
            if value < 0:
                raise UsageError(f"--{what} must not be negative, not {value}.")
        if self.timeout <= 0:
            raise UsageError(f"--timeout must be more than 0 seconds, not {self.timeout}.")
        if self.tries < 1:
            raise UsageError(f"--tries must be at least 1, not {self.tries}.")
        if not self.name:
            object.__setattr__(self, "name", f"{socket.gethostname()}:{os.getpid()}")


Reporter = Callable[[str, dict[str, Any]], None]


class _Wakeup(Exception):
    """Raised by a signal handler to end an idle wait early."""


@dataclass
class Worker:
    backend: Backend
    registry: CommandRegistry
    options: WorkerOptions = field(default_factory=WorkerOptions)
    report: Reporter = lambda event, data: None
    cwd: str | None = None  # where jobs run: the project root

    def __post_init__(self) -> None:
        self.proc = JobProcess(self.registry, lease_based=self.backend.lease_based, cwd=self.cwd)
        self.jobs_done = 0
        self._stop: StopReason | None = None
        self._signals = 0
        self._paused = False
        self._idle = False
        self._current: Claim | None = None
        self._sig_r, self._sig_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    # -- signals --------------------------------------------------------------------------

    def _on_stop_signal(self, signum: int, frame: Any) -> None:
        self._signals += 1
        self._stop = StopReason.SIGNAL if self._signals == 1 else StopReason.FORCED
        with contextlib.suppress(OSError):
            os.write(self._sig_w, b"x")
        if self._idle and not self.backend.lease_based:
            raise _Wakeup()

    def _on_pause(self, signum: int, frame: Any) -> None:
        self._paused = signum == signal.SIGUSR2
        self.report("paused" if self._paused else "resumed", {})
        if self._idle and not self.backend.lease_based:
            raise _Wakeup()

    def install_signals(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            signal.signal(sig, self._on_stop_signal)
        signal.signal(signal.SIGUSR2, self._on_pause)
        signal.signal(signal.SIGCONT, self._on_pause)

    # -- the loop -------------------------------------------------------------------------

    def _outage(self, exc: Exception) -> None:
        """The queue's store is unreachable: log it once per try and back off (up to 10 s)."""
        self._outage_delay = min(max(self._outage_delay * 2, 0.1), 10.0)
        self.report("backend_unavailable", {"error": str(exc), "retry_in": self._outage_delay})
        self._sleep(self._outage_delay)

    def _record(self, action: Callable[[], None]) -> bool:
        """Record a job's outcome, retrying through an outage until it lands (or a forced stop)."""
        while True:
            try:
                action()
                self._outage_delay = 0.0
                return True
            except QueueUnavailable as exc:
                if self._stop is StopReason.FORCED:
                    return False
                self._outage(exc)

    def run(self) -> StopReason:
        opts = self.options
        started = time.monotonic()
        self._outage_delay = 0.0
        restart_seen = None
        while restart_seen is None:
            try:
                restart_seen = (self.backend.restart_requested_at(),)
            except QueueUnavailable as exc:
                if self._stop is not None:
                    return self._stop
                self._outage(exc)
        self.report("worker_started", {"queues": list(opts.queues), "name": opts.name, "pid": os.getpid()})
        next_maintenance = 0.0
        next_restart_check = 0.0
        reason: StopReason
        try:
            while True:
                if self._stop is not None:
                    reason = self._stop
                    break
                if opts.max_time and time.monotonic() - started >= opts.max_time:
                    reason = StopReason.MAX_TIME
                    break
                now = time.monotonic()
                try:
                    if now >= next_restart_check:  # a stat or a round trip: not before every job
                        if (self.backend.restart_requested_at(),) != restart_seen:
                            reason = StopReason.RESTART
                            break
                        next_restart_check = now + 0.1
                    if now >= next_maintenance:
                        counts = self.backend.maintain(opts.tries)
                        if any(counts.values()):
                            self.report("maintenance", counts)
                        next_maintenance = now + opts.maintenance_interval
                    if not self.proc.alive:
                        self.proc.start()  # fork before claiming: the fork must not copy a claim
                    claim = None if self._paused else self.backend.claim(opts.queues, opts.name, opts.timeout)
                    if claim is None:
                        if opts.once or opts.stop_when_empty:
                            reason = StopReason.EMPTY
                            break
                        self._idle_wait(next_maintenance)
                        continue
                except QueueUnavailable as exc:
                    self._outage(exc)
                    continue
                if self._outage_delay:
                    self.report("backend_available", {})
                    self._outage_delay = 0.0
                self.process(claim)
                if self._stop is StopReason.FORCED:
                    reason = StopReason.FORCED
                    break
                if opts.once:
                    reason = StopReason.ONCE
                    break
                if opts.max_jobs and self.jobs_done >= opts.max_jobs:
                    reason = StopReason.MAX_JOBS
                    break
                if opts.memory and rss_mb() >= opts.memory:
                    reason = StopReason.MEMORY
                    break
                if opts.rest:
                    self._sleep(opts.rest)
        finally:
            self.proc.stop()
            self._idle = False
        self.report("worker_stopped", {"reason": str(reason), "jobs": self.jobs_done})
        return reason

    def _idle_wait(self, next_maintenance: float) -> None:
        timeout = self.options.sleep or 0.05
        due = self.backend.next_due(self.options.queues)
        if due is not None:
            timeout = min(timeout, max(due - time.time(), 0.001))
        timeout = min(timeout, max(next_maintenance - time.monotonic(), 0.001))
        if self.backend.lease_based:
            timeout = min(timeout, 1.0)  # signals cannot interrupt a blocking server call
        self._idle = True
        try:
            if self._stop is None and not self._paused:
                self.backend.wait(self.options.queues, timeout)
            elif self._stop is None:
                self._sleep(timeout)
        except _Wakeup:
            pass
        finally:
            self._idle = False

    def _sleep(self, seconds: float) -> None:
        self._idle = True
        try:
            time.sleep(seconds)
        except _Wakeup:
            pass
        finally:
            self._idle = False

    # -- one job --------------------------------------------------------------------------

    def process(self, claim: Claim) -> None:
        """Run one claimed job to an outcome: ack, release with backoff, or fail."""
        job = claim.job
        started = time.time()
        when = datetime.fromtimestamp(started).strftime("%Y-%m-%d %H:%M:%S")
        info = {"job_id": job.id, "command": job.command, "queue": job.queue, "attempt": claim.attempt,
                "time": when}
        self._current = claim
        try:
            if self.registry.get(job.command) is None:
                self._finish(claim, {"exit_code": 1, "reason": str(Reason.UNKNOWN_COMMAND),
                                     "error": f'Command "{job.command}" is not defined (renamed or removed since dispatch).'},
                             started, info, retry=False)
                return
            self.report("starting", info)
            reply = self._execute(claim)
            if reply is None:  # forced stop: hand the job back without counting this attempt
                self._record(lambda: self.backend.release(claim, None, 0))
                self.report("released", {**info, "reason": "interrupted", "counted": False})
                return
            self._finish(claim, reply, started, info, retry=True)
        finally:
            self._current = None

    def _execute(self, claim: Claim) -> dict[str, Any] | None:
        job, opts = claim.job, self.options
        if not self.proc.alive:
            self.proc.start()  # a fresh process closes the claim descriptors it inherits
        timeout = job.timeout if job.timeout is not None else opts.timeout
        deadline = claim.claimed_at + timeout
        msg = {"id": job.id, "attempt": claim.attempt, "queue": job.queue, "command": job.command,
               "args": list(job.args), "deadline": claim.deadline}
        self.proc.send(msg, claim.fds)
        next_beat = time.time() + opts.heartbeat_interval
        next_flush = time.time() + 0.5
        while True:
            now = time.time()
            wake = min(deadline, next_flush)
            if claim.lease_until is not None:
                wake = min(wake, next_beat)
            reply = self.proc.receive(wake - now, [self._sig_r])
            if reply is not None:
                break
            self._drain_signal_pipe()
            now = time.time()
            if self._stop is StopReason.FORCED:
                self.proc.kill(min(opts.grace, 1.0))
                self._save_output(job.id)
                return None
            if now >= deadline:
                self.proc.kill(opts.grace)
                self._save_output(job.id)
                return {"exit_code": -int(signal.SIGKILL), "reason": str(Reason.TIMEOUT),
                        "error": f"timed out after {timeout:g} s"}
            if now >= next_flush:
                self._save_output(job.id)
                next_flush = now + 0.5
            if claim.lease_until is not None and now >= next_beat:
                next_beat = now + opts.heartbeat_interval
                ok = False
                with contextlib.suppress(Exception):
                    ok = self.backend.heartbeat(claim)
                if not ok and now >= claim.lease_until - opts.heartbeat_interval:
                    # The lease is about to lapse and cannot be renewed: another worker may take
                    # the job, so this run must end now.
                    self.proc.kill(min(opts.grace, 1.0))
                    return {"exit_code": -int(signal.SIGKILL), "reason": str(Reason.ABANDONED),
                            "error": "lost the job's lease (queue server unreachable)", "lost": True}
        if not reply:  # the job process died without a reply
            status = self.proc.exit_status()
            desc = f"killed by signal {-status}" if status and status < 0 else f"exited with status {status}"
            reply = {"exit_code": status if status else 1, "reason": str(Reason.EXIT_CODE),
                     "error": f"job process {desc}"}
        else:
            self.proc.jobs_run += 1
        self._save_output(job.id)
        rss_kb = reply.get("maxrss_kb", 0)
        if self.proc.alive and (self.proc.jobs_run >= opts.recycle_after
                                or (opts.memory and rss_kb / 1024 >= opts.memory)):
            self.proc.recycle()
        return reply

    def _drain_signal_pipe(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            while os.read(self._sig_r, 64):
                pass

    def _save_output(self, job_id: str) -> None:
        if self.proc.memfd < 0:
            return
        data = self.proc.read_output()
        if data:
            with contextlib.suppress(Exception):
                self.backend.append_log(job_id, data)

    def _finish(self, claim: Claim, reply: dict[str, Any], started: float, info: dict[str, Any],
                *, retry: bool) -> None:
        job, opts = claim.job, self.options
        self.jobs_done += 1
        duration = time.time() - started
        ms = round(duration * 1000, 1)
        code = reply.get("exit_code", 1)
        if reply.get("lost"):
            self.report("failed", {**info, "duration_ms": ms, "reason": reply["reason"], "error": reply["error"],
                                   "lost": True})
            return
        if code == 0:
            done = Event("done", claim.attempt, time.time(), worker=opts.name, exit_code=0,
                         duration=round(duration, 6))
            self._record(lambda: self.backend.ack(claim, done))
            self.report("done", {**info, "duration_ms": ms})
            return
        ran = reply.get("reason") != Reason.UNKNOWN_COMMAND
        tail = self.proc.output_tail(MAX_OUTPUT_TAIL) if ran and self.proc.memfd >= 0 else ""
        tries = job.max_attempts or opts.tries
        final = not retry or claim.attempt >= tries
        event = Event("failed" if final else "released", claim.attempt, time.time(), worker=opts.name,
                      reason=reply.get("reason"), error=reply.get("error"), exit_code=code,
                      duration=round(duration, 6), output_tail=tail or None)
        data = {**info, "duration_ms": ms, "reason": reply.get("reason"), "error": reply.get("error"),
                "exit_code": code}
        if final:
            self._record(lambda: self.backend.fail(claim, event))
            self.report("failed", data)
        else:
            delay = backoff_delay(job.backoff if job.backoff is not None else opts.backoff, claim.attempt)
            self._record(lambda: self.backend.release(claim, event, delay))
            self.report("released", {**data, "retry_in": delay})


def rss_mb() -> float:
    """This process's resident memory in MB."""
    try:
        with open("/proc/self/statm", "rb") as fh:
            pages = int(fh.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / (1024 * 1024)
    except (OSError, ValueError, IndexError):  # pragma: no cover - non-Linux
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def console_reporter(json_out: bool, verbose: bool = False) -> Reporter:
    """Laravel-style lines for people, or one JSON object per event for log shippers."""
    from . import output

    if json_out:
        def report_json(event: str, data: dict[str, Any]) -> None:
            output.print_jsonl({"event": event, "ts": time.time(), **data})

        return report_json

    def report_human(event: str, data: dict[str, Any]) -> None:
        if event == "starting":
            output.status_print(output.status_line(data["time"], data["command"], "RUNNING"), "RUNNING")
        elif event in ("done", "failed", "released"):
            status = {"done": "DONE", "failed": "FAIL", "released": "RETRY"}[event]
            detail = f"{data.get('duration_ms', 0):.0f} ms" if "duration_ms" in data else ""
            when = datetime.now().strftime("%Y-%m-%d %H:%M:%S")
            output.status_print(output.status_line(when, data["command"], status, detail), status)
            if event != "done" and data.get("error"):
                sys.stdout.write(f"    {data.get('reason')}: {data['error']}\n")
        elif event == "backend_unavailable":
            output.warn(f"Queue unavailable: {data['error']} (retrying in {data['retry_in']:.1f} s)")
        elif event == "backend_available":
            output.info("Queue available again.")
        elif event == "worker_stopped":
            output.info(f"Worker stopped ({data['reason']}) after {data['jobs']} jobs.")
        elif event in ("paused", "resumed") or (verbose and event in ("maintenance", "worker_started")):
            output.info(f"{event}: {data}")

    return report_human


def parse_queues(value: str | Sequence[str]) -> tuple[str, ...]:
    parts = value.split(",") if isinstance(value, str) else list(value)
    return tuple(validate_queue_name(p.strip()) for p in parts if p.strip())
