"""The job process: a child of the worker that runs jobs' code, and nothing else.

The worker (``forge.worker.supervisor``) claims each job, holds the claim (the file backend's lock, a
Redis lease), supervises the run and records its outcome. It forks this process once the
commands are loaded, so a job pays neither for Python start-up nor for importing the command
modules, and hands it a :class:`JobContext`. Before any job's code runs, the job process

- closes every descriptor the fork copied (the claim's lock, the store's sockets, the
  worker's watches) but its two control pipes: the worker alone holds the claim, so nothing a
  job's code closes, unlocks, replaces or execs away can release it or lose the outcome (which
  goes through a shared page, ``forge.worker.shared``; a copy of the lock's descriptor would share
  its lock, and ``LOCK_UN`` on it would free the worker's);
- dies with the worker (``PR_SET_PDEATHSIG``), since nobody could record its outcome;
- keeps a kernel timer that sends it SIGKILL when the running job must be dead (its timeout's
  backstop, or its lease's end, moved on by the worker after each renewal): a stopped or
  frozen worker cannot let a job run past its lease, and a run frozen past it dies on thaw.

It then runs one job per request from the worker. After each job (once its outcome is
reported) it puts back what a job may change and can be put back exactly (working directory,
environment, umask, signal handlers and mask, recursion limit) and checks the rest
(descriptors 0-2 and its control pipes, resource limits, threads, the standard streams,
tracing), all before it reads the next request; if anything differs, it exits without taking
that request and the worker forks a fresh one for it. So nothing one job
changes in its process reaches the next, and a trivial job costs no process start.
"""

from __future__ import annotations

import _signal
import contextlib
import os
import resource
import signal
import sys
import threading
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

from forge import _linux
from forge.errors import ForgeError, UsageError
from forge.job import Reason
from forge.registry.runner import invoke, system_exit_code
from forge.retry.outcome import Fail, Retry, reply_of
from forge.worker.outcome import Outcome
from forge.worker.shared import NEVER, JobReply, JobRequest, SharedState

if TYPE_CHECKING:
    from forge.registry.spec import CommandRegistry, CommandSpec

#: How often the job process's watcher moves its kill timer to the worker's latest instant.
RENEW_POLL = 0.5
#: The job process's exit status when its own set-up failed (EX_SOFTWARE).
SETUP_FAILED = 70


@dataclass(frozen=True)
class JobContext:
    """Exactly what the job process needs from the worker, fixed at the fork: it reads
    nothing else of the worker's, and changes none of it."""

    registry: CommandRegistry
    cwd: str | None
    output_fd: int
    shared: SharedState
    supervisor: int  # the worker's pid
    go: int  # read end: the worker asks for a job (its request is in the shared page)
    done: int  # write end: the job process says the outcome is in the shared page
    renew: bool  # whether the kill instant may move while a job runs (a renewed lease)
    fresh: bool = False  # one job per job process (queue:work --fresh-process)
    memory: int = 0  # MB: past it, the job process is replaced after its job (0: no limit)


def run(ctx: JobContext) -> NoReturn:
    """The job process's whole life (called in the forked child; never returns)."""
    code = SETUP_FAILED
    try:
        runner = _Runner(ctx)
        code = runner.loop()
    except BaseException:  # noqa: BLE001 - nothing may escape a forked child
        with contextlib.suppress(Exception):
            traceback.print_exc(file=sys.__stderr__)
    finally:
        os._exit(code)


_HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGCONT,
            signal.SIGHUP, signal.SIGALRM, signal.SIGCHLD)
_SIGNALS = tuple(s for s in range(1, signal.NSIG) if s not in (signal.SIGKILL, signal.SIGSTOP, 32, 33))
_LIMITS = tuple(getattr(resource, n) for n in dir(resource) if n.startswith("RLIMIT_"))
_KEEP_ALIVE: list[Any] = []


class _Runner:
    """The job process's state: its context, its kill timer, and the state jobs start from."""

    def __init__(self, ctx: JobContext) -> None:
        self.ctx = ctx
        self.me = os.getpid()
        os.setpgid(0, 0)
        _linux.set_parent_death_signal(signal.SIGKILL)
        if os.getppid() != ctx.supervisor:  # the worker died before the line above
            os._exit(SETUP_FAILED)
        signal.set_wakeup_fd(-1)
        for sig in _HANDLED:
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # as Python starts
        signal.pthread_sigmask(signal.SIG_SETMASK, ())
        self.timer = _linux.KillTimer(NEVER)
        self.running = False
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(ctx.output_fd, 1)
        os.dup2(ctx.output_fd, 2)
        _forget_inherited()
        low = 3
        for fd in sorted((ctx.go, ctx.done)):  # close_range(2) around them
            os.closerange(low, fd)
            low = fd + 1
        os.closerange(low, 1 << 20)
        from forge.registry.runner import forget_tty

        forget_tty()  # stdout is the same object, no longer the worker's terminal
        with contextlib.suppress(Exception):
            sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
            sys.stderr.reconfigure(line_buffering=True)  # type: ignore[union-attr]
        if ctx.cwd:
            os.chdir(ctx.cwd)
        if ctx.renew:
            threading.Thread(target=self._follow, name="forge-lease", daemon=True).start()
        self.base = _State.read(self)

    def _follow(self) -> None:
        """Move the kill timer with the worker's renewals. Job code may hold this thread up
        (the GIL): then the timer fires at the last instant the worker was sure of, which
        errs on the safe side."""
        while True:
            time.sleep(RENEW_POLL)
            at = self.ctx.shared.kill_at
            if self.running and at != self.timer.at:
                self.timer.set(at)

    def loop(self) -> int:
        """Run a job per request until the worker closes the pipe or this process must be
        replaced; returns the exit status."""
        ctx = self.ctx
        while True:
            try:
                if not os.read(ctx.go, 1):
                    return 0  # the worker closed the pipe: it is stopping
            except OSError:
                return 0
            with contextlib.suppress(ChildProcessError):  # the last job's ended leftovers
                while os.waitpid(-1, os.WNOHANG)[0]:
                    pass
            request = ctx.shared.request()
            if request is None:
                return SETUP_FAILED
            ctx.shared.taken = request.seq
            outcome = self._run(request)
            if os.getpid() != self.me:  # a fork the job made and returned from: never go on
                os._exit(0)
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            # The outcome goes first; the state is put back and checked after, while the worker
            # records the outcome (on another core). A request the worker sends meanwhile waits
            # in the pipe until that is done; if the check fails, this process ends without
            # taking it, and the worker, seeing ``taken`` short of it, hands it to a fresh one.
            fresh = not ctx.fresh and not _over(ctx.memory)
            ctx.shared.put_reply(JobReply(request.seq, outcome, recycle=not fresh))
            try:
                os.write(ctx.done, b".")
            except OSError:
                return 0
            if not fresh or not self.base.restore(self):
                return 0

    def _run(self, request: JobRequest) -> Outcome:
        spec = self.ctx.registry.get(request.command)
        if spec is None:
            return Outcome.failure(1, Reason.UNKNOWN_COMMAND, f'Command "{request.command}" is not defined.')
        self.running = True
        self.timer.set(self.ctx.shared.kill_at)
        try:
            return run_command(spec, list(request.args), request.env)
        finally:
            self.timer.set(NEVER)
            self.running = False


_ITIMERS = (signal.ITIMER_REAL, signal.ITIMER_VIRTUAL, signal.ITIMER_PROF)


@dataclass
class _State:
    """What a job can change in its process, as the job process had it before the first job.

    ``restore`` puts back what can be put back exactly and checks the rest. This guards against
    what job code does by accident or through a library (daemonising, closing descriptors,
    lowering limits, leaving timers or threads); code that sets out to tamper with forge's own
    objects in its process is not contained by it (it runs as you: it could as well edit the
    queue), and ``queue:work --fresh-process`` gives every job a new process instead.
    """

    put_back: dict[str, Any]
    checked: tuple[Any, ...]

    @classmethod
    def read(cls, runner: _Runner) -> _State:
        umask = os.umask(0)
        os.umask(umask)
        return cls(
            put_back={
                "cwd": os.getcwd(), "environ": dict(os.environ._data),  # type: ignore[attr-defined]
                "umask": umask,
                "handlers": [_signal.getsignal(s) for s in _SIGNALS],
                "recursion": sys.getrecursionlimit(), "path": list(sys.path),
                "switch": sys.getswitchinterval(), "excepthook": sys.excepthook,
                "thread_excepthook": threading.excepthook, "dlopen": sys.getdlopenflags(),
                "int_digits": sys.get_int_max_str_digits(),
            },
            checked=_checked(runner),
        )

    def restore(self, runner: _Runner) -> bool:
        """Put back what can be put back exactly; False if anything else differs (then the
        job process must not run another job)."""
        base = self.put_back
        fresh = True
        try:
            if os.getcwd() != base["cwd"]:
                os.chdir(base["cwd"])
        except OSError:
            fresh = False
        data, before = os.environ._data, base["environ"]  # type: ignore[attr-defined]
        if data != before:  # as os.environ's own __delitem__/__setitem__ do, on the bytes
            for key in [k for k in data if k not in before]:
                os.unsetenv(key)
                del data[key]
            for key, value in before.items():
                if data.get(key) != value:
                    os.putenv(key, value)
                    data[key] = value
        os.umask(base["umask"])
        for sig, handler in zip(_SIGNALS, base["handlers"], strict=True):
            if _signal.getsignal(sig) != handler:
                try:
                    signal.signal(sig, handler)
                except (OSError, ValueError, TypeError):
                    fresh = False
        if signal.pthread_sigmask(signal.SIG_BLOCK, ()):
            signal.pthread_sigmask(signal.SIG_SETMASK, ())
        signal.set_wakeup_fd(-1)
        for which in _ITIMERS:  # an alarm the job left must not go off in the next one
            if signal.getitimer(which) != (0.0, 0.0):
                signal.setitimer(which, 0)
        _linux.set_parent_death_signal(signal.SIGKILL)  # a job may have cleared it
        if os.getppid() != runner.ctx.supervisor:
            os._exit(0)
        sys.setrecursionlimit(base["recursion"])
        if sys.path != base["path"]:
            sys.path[:] = base["path"]
        sys.setswitchinterval(base["switch"])
        sys.excepthook = base["excepthook"]
        threading.excepthook = base["thread_excepthook"]
        sys.setdlopenflags(base["dlopen"])
        sys.set_int_max_str_digits(base["int_digits"])
        tempfile = sys.modules.get("tempfile")
        if tempfile is not None:
            tempfile.tempdir = None  # type: ignore[attr-defined]
        return fresh and _checked(runner) == self.checked


def _checked(runner: _Runner) -> tuple[Any, ...]:
    """What cannot be put back exactly: if any of it changed, the job process is replaced."""
    streams = tuple((id(f), f.closed, getattr(f, "encoding", None), getattr(f, "errors", None),
                     getattr(f, "line_buffering", None)) for f in (sys.stdin, sys.stdout, sys.stderr))
    faulthandler = sys.modules.get("faulthandler")
    return (
        _fd_ids((0, 1, 2, runner.ctx.go, runner.ctx.done)),
        [resource.getrlimit(r) for r in _LIMITS],
        frozenset(t.ident or 0 for t in threading.enumerate()),
        threading.current_thread().name,
        streams,
        sys.gettrace(), sys.getprofile(),
        frozenset(_linux.c_environ()),  # os.putenv() changes it behind os.environ's back
        _linux.posix_timers(),  # timers made with timer_create besides the kill timer
        os.getpriority(os.PRIO_PROCESS, 0),
        os.sched_getaffinity(0),
        _linux.process_name(),
        os.getpgrp(), os.getsid(0),
        bool(faulthandler and faulthandler.is_enabled()),
    )


def _over(memory_mb: int) -> bool:
    """Whether this process's resident memory passed ``memory_mb`` (a job's leak must not
    stay with the job process for ever)."""
    if not memory_mb or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss < memory_mb * 1024:
        return False  # its peak (one system call) is below: so is its resident memory
    try:
        with open("/proc/self/statm", "rb") as fh:
            pages = int(fh.read().split()[1])
    except (OSError, ValueError, IndexError):
        return False
    return pages * os.sysconf("SC_PAGE_SIZE") >= memory_mb * 1024 * 1024


def _fd_ids(fds: tuple[int, ...]) -> list[tuple[int, int]]:
    out = []
    for fd in fds:
        try:
            st = os.fstat(fd)
            out.append((st.st_dev, st.st_ino))
        except OSError:
            out.append((-1, -1))
    return out


def _forget_inherited() -> None:
    """Drop the worker's cached store clients before their descriptors are closed, keeping the
    objects alive (never finalised), so that no finaliser closes a descriptor number the job
    has reused meanwhile; a job that dispatches gets clients of its own."""
    backends_mod = sys.modules.get("forge.backends")
    cached = getattr(backends_mod, "_backends", None)
    if isinstance(cached, dict):
        _KEEP_ALIVE.append(dict(cached))
        cached.clear()


def run_command(spec: CommandSpec, args: list[str], env: Mapping[str, str]) -> Outcome:
    """Run one command in this process and return its outcome; never raises (what the
    command raised is the outcome, its traceback in the job's output).

    ``env`` is added to the environment for the run (the job process puts it back after).
    The exit code follows ``forge.registry.runner``'s rule, as ``forge NAME`` and ``forge.call``.
    """
    os.environ.update(env)
    try:
        code = invoke(spec, args)
    except UsageError as exc:
        print(f"Error: {exc.message}", file=sys.stderr)
        return Outcome.of_usage_error(exc.message)
    except SystemExit as exc:
        code = system_exit_code(exc)
    except (Retry, Fail) as exc:  # the outcome protocol (forge.retry.outcome)
        print(exc.message, file=sys.stderr)
        return Outcome.from_record(reply_of(exc)) or Outcome.of_exception(exc.exit_code, exc.message)
    except ForgeError as exc:
        print(f"Error: {exc.message}", file=sys.stderr)
        return Outcome.of_exception(exc.exit_code, exc.message)
    except BaseException as exc:  # noqa: BLE001 - report everything the job raised
        traceback.print_exc()
        return Outcome.of_exception(1, f"{type(exc).__name__}: {exc}")
    return Outcome.of_exit_code(code)


__all__ = ["JobContext", "run", "run_command"]
