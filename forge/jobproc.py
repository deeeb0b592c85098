"""The job process: a child of the worker that claims jobs, runs them and records the outcome.

The worker forks it once the commands are loaded, so a job pays neither for Python start-up
nor for importing the command modules. It runs in a process group of its own and holds the
claim (the file backend's lock) for exactly as long as it runs a job, so:

- a crash, hang or leak in a job never takes the worker down: the worker notices the job
  process die (or kills its whole group at the job's timeout), records the outcome by
  adopting the claim, and forks a fresh one;
- if the worker is killed, the job is not handed to another worker while it still runs: the
  job process finishes it, records the outcome and exits (under a Redis lease it dies with the
  worker instead, and the job is recovered once the lease lapses: at most one extra run);
- claiming, running and acknowledging a trivial job costs no process switch at all.

It is replaced after ``recycle_after`` jobs; past ``--memory`` the worker exits (code 12). The worker and
the job process share one page of memory and the job's output buffer (``forge.jobshare``).
"""

from __future__ import annotations

import _signal
import contextlib
import os
import resource
import signal
import sys
import time
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .errors import EXIT_USAGE, ForgeError, QueueUnavailable, UsageError
from .job import Reason
from .jobshare import PAUSE, STOP, OutputBuffer, SharedState
from .runner import invoke

if TYPE_CHECKING:
    from .backends.base import Backend, Claim
    from .registry import CommandSpec
    from .worker import Worker


_PDEATH = signal.SIGRTMIN


def _kill_group(signum: int, frame: Any) -> None:
    os.killpg(0, signal.SIGKILL)


class _Wakeup(Exception):
    """Raised by SIGUSR1 to end the job process's idle wait early."""


def spawn(worker: Worker) -> int:
    """Fork the job process for ``worker``; returns its pid (in the worker)."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        with contextlib.suppress(OSError):
            os.setpgid(pid, pid)  # also done in the child; whichever runs first wins
        return pid
    code = 0
    try:
        code = _JobProcess(worker).run()
    except BaseException:  # noqa: BLE001 - nothing may escape a forked child
        with contextlib.suppress(Exception):
            traceback.print_exc(file=sys.__stderr__)
        code = 70
    finally:
        os._exit(code)


class _JobProcess:
    """The loop inside the job process."""

    def __init__(self, worker: Worker) -> None:
        self.w = worker
        self.parent = os.getppid()
        self.idle = False

    def _setup(self) -> None:
        w = self.w
        os.setpgid(0, 0)
        report_fd = os.dup(1)  # the worker's stdout: job events are reported there
        with contextlib.suppress(Exception):
            w.backend.close()  # the worker's connections: close our copies, not theirs
        keep = {w.output.fd, report_fd}
        _close_inherited(keep)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        os.dup2(w.output.fd, 1)
        os.dup2(w.output.fd, 2)
        from .runner import forget_tty

        forget_tty()  # stdout is the same object, no longer the worker's terminal
        with contextlib.suppress(Exception):
            sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
            sys.stderr.reconfigure(line_buffering=True)  # type: ignore[union-attr]
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR2, signal.SIGCONT,
                    signal.SIGHUP, signal.SIGALRM):
            signal.signal(sig, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGUSR1, self._on_wake)
        if w.cwd:
            os.chdir(w.cwd)
        # If the worker dies: under a lease the job must end at once (nobody renews the lease);
        # under a lock it may finish, and SIGALRM (default: terminate) ends it one second after
        # its deadline in any case.
        if w.backend.lease_based:
            from ._linux import set_parent_death_signal

            # The whole group, not only this process: a job's own children must not outlive
            # the lease either.
            signal.signal(_PDEATH, _kill_group)
            set_parent_death_signal(_PDEATH)
            if os.getppid() != self.parent:
                _kill_group(0, None)
        w.report = w.make_reporter(os.fdopen(report_fd, "w", buffering=1))
        w.backend = w.backend_factory()

    def _on_wake(self, signum: int, frame: Any) -> None:
        if self.idle:
            raise _Wakeup()

    def _sleep(self, seconds: float) -> None:
        self.idle = True
        try:
            time.sleep(seconds)
        except _Wakeup:
            pass
        finally:
            self.idle = False

    def run(self) -> int:
        self._setup()
        w, opts, shared = self.w, self.w.options, self.w.shared
        me = os.getpid()
        restart_seen: tuple[float | None] | None = None
        next_restart_check = 0.0
        outage = 0.0
        jobs_here = 0
        while True:
            if shared.flag(STOP) or os.getppid() != self.parent:
                return self._exit("signal")
            try:
                now = time.monotonic()
                if now >= next_restart_check:  # a stat or a round trip: not before every job
                    marker = (w.backend.restart_requested_at(),)
                    if restart_seen is None:
                        # The marker as the worker saw it at start; if the store was down then,
                        # a marker set after the worker started still counts.
                        restart_seen = w.restart_seen or (
                            (None,) if (marker[0] or 0) > w.started_at else marker)
                    if marker != restart_seen:
                        return self._exit("restart")
                    next_restart_check = now + 0.1
                if shared.flag(PAUSE):
                    self._sleep(0.1)
                    continue
                claim = w.backend.claim(opts.queues, opts.name, opts.timeout)
                if claim is None:
                    if opts.once or opts.stop_when_empty:
                        return self._exit("empty")
                    self._idle_wait()
                    continue
            except QueueUnavailable as exc:
                outage = min(max(outage * 2, 0.1), 10.0)
                w.report("backend_unavailable", {"error": str(exc), "retry_in": outage})
                self._sleep(outage)
                continue
            if outage:
                w.report("backend_available", {})
                outage = 0.0
            if shared.flag(STOP):  # asked to stop while claiming: hand it back, uncounted
                w.backend.release(claim, None, 0)
                return self._exit("signal")
            self._process(claim)
            if os.getpid() != me:  # a job forked and returned here: never run the loop twice
                os._exit(0)
            jobs_here += 1
            done = shared.add_job()
            if opts.once:
                return self._exit("once")
            if opts.max_jobs and done >= opts.max_jobs:
                return self._exit("max_jobs")
            if opts.memory and resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 >= opts.memory:
                return self._exit("memory")
            if jobs_here >= opts.recycle_after:
                return self._exit("recycle")
            if opts.rest:
                self._sleep(opts.rest)

    def _exit(self, reason: str) -> int:
        self.w.shared.set_record({"exit": reason})
        return 0

    def _idle_wait(self) -> None:
        w, opts = self.w, self.w.options
        timeout = opts.sleep or 0.05
        due = w.backend.next_due(opts.queues)
        if due is not None:
            timeout = min(timeout, max(due - time.time(), 0.001))
        if w.backend.lease_based:
            timeout = min(timeout, 1.0)  # a signal cannot interrupt a blocking server call
        self.idle = True
        try:
            if not w.shared.flag(STOP):
                w.backend.wait(opts.queues, timeout)
        except _Wakeup:
            pass
        finally:
            self.idle = False

    def _process(self, claim: Claim) -> None:
        w, job = self.w, claim.job
        started = time.time()
        w.shared.set_record({"id": job.id, "ref": claim.ref, "started": started, "command": job.command,
                             "queue": job.queue, "attempt": claim.attempt, "deadline": claim.deadline,
                             "timeout_at": claim.claimed_at + w.job_timeout(claim),
                             "lease_until": claim.lease_until})
        info = w.event_info(claim, started)
        spec = w.registry.get(job.command)
        if spec is None:
            reply = {"exit_code": 1, "reason": str(Reason.UNKNOWN_COMMAND),
                     "error": f'Command "{job.command}" is not defined (renamed or removed since dispatch).'}
            w.record(claim, reply, started, info, tail="", retry=False)
            w.shared.set_record(None)
            return
        w.report("starting", info)
        if w.cwd and os.getcwd() != w.cwd:  # a previous job changed directory
            os.chdir(w.cwd)
        signal.setitimer(signal.ITIMER_REAL, max(claim.deadline - time.time(), 0) + 1.0)
        reply = run_command(spec, list(job.args),
                            {"FORGE_JOB_ID": job.id, "FORGE_JOB_ATTEMPT": str(claim.attempt),
                             "FORGE_QUEUE": job.queue})
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        signal.setitimer(signal.ITIMER_REAL, 0)
        _restore_signals(self._on_wake)
        # If the worker died meanwhile, the outcome is still recorded here: the job ran to its
        # end. (Under a lease this process would have been killed with the worker.)
        tail = w.output.tail(_TAIL) if reply["exit_code"] != 0 and w.output.size() else ""
        if w.output.size():
            w.output.flush_to_log(w.backend, job.id, reset=True)
        w.record(claim, reply, started, info, tail=tail, retry=True)
        w.shared.set_record(None)


_DEFAULTS = (signal.SIGTERM, signal.SIGINT, signal.SIGALRM, signal.SIGHUP, signal.SIGQUIT,
             signal.SIGUSR2, signal.SIGCONT, signal.SIGCHLD)


def _restore_signals(on_wake: Callable[[int, Any], None]) -> None:
    """Undo the signal handlers and blocked signals a job left behind, so the next job starts
    as the first did (the SIGALRM backstop must stay the default; an ignored SIGCHLD would hide
    the next job's children's exit codes)."""
    # _signal.getsignal: signal.getsignal wraps each answer in an enum (15 us a job for five).
    for sig in _DEFAULTS:
        if _signal.getsignal(sig) != signal.SIG_DFL:
            signal.signal(sig, signal.SIG_DFL)
    if _signal.getsignal(signal.SIGPIPE) != signal.SIG_IGN:  # as Python starts
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    if _signal.getsignal(signal.SIGUSR1) != on_wake:
        signal.signal(signal.SIGUSR1, on_wake)
    if signal.pthread_sigmask(signal.SIG_BLOCK, ()):
        signal.pthread_sigmask(signal.SIG_SETMASK, ())


_TAIL = 2048
_base_env: dict[str, str] | None = None


def run_command(spec: CommandSpec, args: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run one command in this process; returns ``{"exit_code", "reason"?, "error"?}``.

    ``env`` is added to the environment for the run; whatever the command changes in the
    environment is undone afterwards.
    """
    global _base_env
    if _base_env is None:
        _base_env = dict(os.environ)
    os.environ.update(env)
    expected = _env_snapshot()
    try:
        try:
            code = invoke(spec, args)
        except UsageError as exc:
            print(f"Error: {exc.message}", file=sys.stderr)
            return {"exit_code": EXIT_USAGE, "reason": str(Reason.EXIT_CODE), "error": exc.message}
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except ForgeError as exc:
            print(f"Error: {exc.message}", file=sys.stderr)
            return {"exit_code": exc.exit_code, "reason": str(Reason.EXCEPTION), "error": exc.message}
        except BaseException as exc:  # noqa: BLE001 - report everything the job raised
            traceback.print_exc()
            return {"exit_code": 1, "reason": str(Reason.EXCEPTION), "error": f"{type(exc).__name__}: {exc}"}
        if code == 0:
            return {"exit_code": 0}
        return {"exit_code": code, "reason": str(Reason.EXIT_CODE), "error": f"exited with code {code}"}
    finally:
        if _env_snapshot() != expected:  # the job changed the environment: undo it
            os.environ.clear()
            os.environ.update(_base_env)


def _env_snapshot() -> Any:
    # os.environ's own byte mapping compares in a microsecond; iterating os.environ decodes
    # every entry (over 100 us per job).
    data = getattr(os.environ, "_data", None)
    return dict(data) if isinstance(data, dict) else dict(os.environ)


def _close_inherited(keep: set[int]) -> None:
    """Close every descriptor the fork copied from the worker (sockets, watches, pipes)."""
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        fds = list(range(3, 1024))
    for fd in fds:
        if fd > 2 and fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)


BackendFactory = Callable[[], "Backend"]


__all__ = ["PAUSE", "STOP", "OutputBuffer", "SharedState", "run_command", "spawn"]
