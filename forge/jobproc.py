"""The job process: a fresh child of the worker for every job, which runs the job's code only.

The worker (``forge.worker``) claims the job, holds the claim (the file backend's lock, a
Redis lease), supervises the run and records its outcome. It forks this process once the
commands are loaded, so a job pays neither for Python start-up nor for importing the command
modules, and it hands it a :class:`JobContext`: exactly what the run needs, nothing of the
worker's. Before the job's code runs, the job process

- closes every descriptor the fork copied (the claim's lock, the store's sockets, the
  worker's watches): the worker alone holds the claim, so nothing the job's code closes,
  unlocks, replaces or execs away can release it or break the recording of the outcome (a
  copy of the lock's descriptor would share its lock: ``LOCK_UN`` on it frees the worker's);
- dies with the worker (``PR_SET_PDEATHSIG``), since nobody could record its outcome;
- arms a kernel timer that sends it SIGKILL when it must be dead (its timeout's backstop, or
  its lease's end, moved on by the worker after each renewal): a stopped or frozen worker
  cannot let it run past its lease, and a run frozen past it dies on thaw.

Its outcome goes to a shared page (``forge.jobshare``), its output to a memfd the worker
copies to the job's log. A fresh process per job means nothing one job changes in its process
(descriptors, directory, environment, umask, signals, limits, threads, module state) reaches
the next.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

from . import _linux
from .errors import EXIT_USAGE, ForgeError, UsageError
from .job import Reason
from .jobshare import SharedState
from .runner import invoke

if TYPE_CHECKING:
    from .registry import CommandSpec

#: How often the job process's watcher moves its kill timer to the worker's latest instant.
RENEW_POLL = 0.5
#: The job process's exit status when its own set-up failed (EX_SOFTWARE).
SETUP_FAILED = 70


@dataclass(frozen=True)
class JobContext:
    """What one run needs, handed from the worker to its job process."""

    spec: CommandSpec
    args: tuple[str, ...]
    env: Mapping[str, str]
    cwd: str | None
    output_fd: int
    shared: SharedState
    supervisor: int  # the worker's pid
    keep_fds: tuple[int, ...]  # descriptors to keep (none: the claim's lock is the worker's)
    renew: bool  # whether the kill instant may move (a renewed lease)


def run(ctx: JobContext) -> NoReturn:
    """The job process's whole life (called in the forked child; never returns)."""
    code = SETUP_FAILED
    try:
        _setup(ctx)
        reply = run_command(ctx.spec, list(ctx.args), ctx.env)
        if os.getpid() == _me[0]:  # not a fork the job made and returned from
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            ctx.shared.set_record(reply)
            code = reply["exit_code"] & 0xFF
        else:
            code = 0
    except BaseException:  # noqa: BLE001 - nothing may escape a forked child
        with contextlib.suppress(Exception):
            traceback.print_exc(file=sys.__stderr__)
    finally:
        os._exit(code)


_me = [0]
_HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGCONT,
            signal.SIGHUP, signal.SIGALRM, signal.SIGCHLD)
_KEEP_ALIVE: list[Any] = []


def _setup(ctx: JobContext) -> None:
    _me[0] = os.getpid()
    os.setpgid(0, 0)
    _linux.set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != ctx.supervisor:  # the worker died before the line above
        os._exit(SETUP_FAILED)
    signal.set_wakeup_fd(-1)
    for sig in _HANDLED:
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # as Python starts
    signal.pthread_sigmask(signal.SIG_SETMASK, ())
    _KillWatch(ctx.shared, ctx.renew)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(ctx.output_fd, 1)
    os.dup2(ctx.output_fd, 2)
    _forget_inherited()
    low = 3
    for fd in sorted(ctx.keep_fds):  # close_range(2) around them: sockets, watches, pipes
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, 1 << 20)
    from .runner import forget_tty

    forget_tty()  # stdout is the same object, no longer the worker's terminal
    with contextlib.suppress(Exception):
        sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
        sys.stderr.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    if ctx.cwd:
        os.chdir(ctx.cwd)


def _forget_inherited() -> None:
    """Drop the worker's cached store clients before their descriptors are closed, keeping the
    objects alive (never finalised), so that no finaliser closes a descriptor number the job
    has reused meanwhile; a job that dispatches gets clients of its own."""
    queue_mod = sys.modules.get("forge.queue")
    cached = getattr(queue_mod, "_backends", None)
    if isinstance(cached, dict):
        _KEEP_ALIVE.append(dict(cached))
        cached.clear()


class _KillWatch:
    """The job process's kill timer, and (under a renewed lease) the thread that follows the
    worker's renewals. Job code may hold up the thread (the GIL): then the timer fires at the
    last instant the worker was sure of, which errs on the safe side."""

    def __init__(self, shared: SharedState, renew: bool) -> None:
        self.shared = shared
        self.timer = _linux.KillTimer(shared.kill_at)
        _KEEP_ALIVE.append(self)
        if renew:
            threading.Thread(target=self._follow, name="forge-lease", daemon=True).start()

    def _follow(self) -> None:
        while True:
            time.sleep(RENEW_POLL)
            at = self.shared.kill_at
            if at != self.timer.at:
                self.timer.set(at)


def run_command(spec: CommandSpec, args: list[str], env: Mapping[str, str]) -> dict[str, Any]:
    """Run one command in this process; returns ``{"exit_code", "reason"?, "error"?}``.

    ``env`` is added to the (job process's own) environment.
    """
    os.environ.update(env)
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


__all__ = ["JobContext", "run", "run_command"]
