"""The job process: a warm child of the worker that runs one job at a time, in isolation.

The worker forks it once the registry is loaded, so a job does not pay for Python start-up
or for importing the command modules; it is replaced after ``recycle_after`` jobs, after a
crash, a timeout or a memory overrun. It runs in a process group of its own, so a timeout
can kill the job and everything it started.

Protocol over a ``SOCK_SEQPACKET`` socket pair: the worker sends one JSON message per job
with the claim's file descriptors attached (``SCM_RIGHTS``): the job process holds the
claim's lock for as long as it runs, so even if the worker dies the job is not recovered
while it still runs. The reply is one JSON message with the exit code. Output (fds 1 and 2)
goes to a memfd shared with the worker, which copies it to the job's log only when there is
some.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import select
import signal
import socket
import sys
import time
import traceback
from typing import Any

from .errors import EXIT_USAGE, ForgeError, UsageError
from .job import Reason
from .registry import CommandRegistry

_MSG_MAX = 256 * 1024


class JobProcess:
    """The worker's handle on one warm job process."""

    def __init__(self, registry: CommandRegistry, *, lease_based: bool, cwd: str | None = None) -> None:
        self.registry = registry
        self.cwd = cwd
        self.lease_based = lease_based
        self.pid = 0
        self.jobs_run = 0
        self.sock: socket.socket | None = None
        self.memfd = -1
        self.output_offset = 0

    @property
    def alive(self) -> bool:
        return self.pid > 0

    def start(self) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        if self.memfd >= 0:
            os.close(self.memfd)
        self.memfd = os.memfd_create("forge-job-output", os.MFD_CLOEXEC)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the job process
            code = 0
            try:
                parent.close()
                if self.cwd:
                    os.chdir(self.cwd)
                _child_main(child, self.memfd, self.registry, self.lease_based)
            except BaseException:  # noqa: BLE001 - nothing may escape a forked child
                code = 70
            finally:
                os._exit(code)
        child.close()
        self.pid, self.sock, self.jobs_run = pid, parent, 0
        with contextlib.suppress(OSError):
            os.setpgid(pid, pid)  # also done in the child; whichever runs first wins

    def send(self, message: dict[str, Any], fds: list[int]) -> None:
        assert self.sock is not None
        self.output_offset = 0
        socket.send_fds(self.sock, [json.dumps(message).encode()], fds)

    def receive(self, timeout: float, extra: list[Any] = ()) -> dict[str, Any] | None:  # type: ignore[assignment]
        """The job's reply, ``{}`` if the process died without one, None on timeout/extra ready."""
        assert self.sock is not None
        ready, _, _ = select.select([self.sock, *extra], [], [], max(timeout, 0))
        if self.sock not in ready:
            return None
        try:
            data = self.sock.recv(_MSG_MAX)
        except OSError:
            data = b""
        if not data:
            return {}
        return json.loads(data)

    def read_output(self, limit: int | None = None) -> bytes:
        """Output written since the last call (for the job's log)."""
        size = os.fstat(self.memfd).st_size
        if size <= self.output_offset:
            return b""
        n = size - self.output_offset if limit is None else min(limit, size - self.output_offset)
        data = os.pread(self.memfd, n, self.output_offset)
        self.output_offset += len(data)
        return data

    def output_tail(self, chars: int) -> str:
        size = os.fstat(self.memfd).st_size
        start = max(0, size - chars * 4)
        return os.pread(self.memfd, size - start, start).decode("utf-8", "replace")[-chars:]

    def kill(self, grace: float) -> None:
        """SIGTERM the whole process group, wait ``grace`` seconds, then SIGKILL; reap."""
        if not self.pid:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGTERM)
        end = time.monotonic() + grace
        while time.monotonic() < end:
            done, _ = os.waitpid(self.pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.01)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        self._reap()

    def exit_status(self) -> int | None:
        """After a reply of ``{}``: how the process ended (negative = signal)."""
        if not self.pid:
            return None
        try:
            _, status = os.waitpid(self.pid, 0)
        except ChildProcessError:
            status = 0
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)  # leftovers of the group
        self.pid = 0
        self._close()
        return os.waitstatus_to_exitcode(status)

    def _reap(self) -> None:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)
        self.pid = 0
        self._close()

    def _close(self) -> None:
        # The memfd stays open: the worker still reads the dead job's output from it.
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def recycle(self) -> None:
        """End an idle job process; the next job starts a fresh one (memfd kept until then)."""
        memfd, self.memfd = self.memfd, -1
        self.stop()
        self.memfd = memfd

    def stop(self) -> None:
        """Ask an idle job process to exit (closing its socket), and reap it."""
        if not self.pid:
            return
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        try:
            end = time.monotonic() + 2
            while time.monotonic() < end:
                done, _ = os.waitpid(self.pid, os.WNOHANG)
                if done:
                    self.pid = 0
                    break
                time.sleep(0.005)
        except ChildProcessError:
            self.pid = 0
        if self.pid:
            self.kill(0.5)
        self._close()
        if self.memfd >= 0:
            os.close(self.memfd)
            self.memfd = -1


def _close_inherited(keep: set[int]) -> None:
    """Close every descriptor the fork copied from the worker (claims, sockets, watches)."""
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        fds = list(range(3, 1024))
    for fd in fds:
        if fd > 2 and fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)


def _child_main(sock: socket.socket, memfd: int, registry: CommandRegistry, lease_based: bool) -> None:
    os.setpgid(0, 0)
    _close_inherited({sock.fileno(), memfd})
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR2, signal.SIGCONT, signal.SIGHUP,
                signal.SIGALRM):
        signal.signal(sig, signal.SIG_DFL)
    signal.set_wakeup_fd(-1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(memfd, 1)
    os.dup2(memfd, 2)
    with contextlib.suppress(Exception):
        sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
        sys.stderr.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    # If the worker dies: under a lease the job must end at once (nobody renews the lease);
    # under a lock it may finish, but SIGALRM (default action: terminate) ends it one second
    # after its deadline in any case.
    if lease_based:
        from ._linux import set_parent_death_signal

        set_parent_death_signal(signal.SIGKILL)
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    base_env = dict(os.environ)
    while True:
        try:
            data, fds, _flags, _addr = socket.recv_fds(sock, _MSG_MAX, 16)
        except OSError:
            return
        if not data:
            return
        msg = json.loads(data)
        os.ftruncate(memfd, 0)
        os.lseek(memfd, 0, os.SEEK_SET)
        signal.setitimer(signal.ITIMER_REAL, max(msg["deadline"] - time.time(), 0) + 1.0)
        job_env = {"FORGE_JOB_ID": msg["id"], "FORGE_JOB_ATTEMPT": str(msg["attempt"]), "FORGE_QUEUE": msg["queue"]}
        os.environ.update(job_env)
        reply = _run(registry, msg["command"], msg["args"])
        if os.environ != {**base_env, **job_env}:  # the job changed the environment: undo it
            os.environ.clear()
            os.environ.update(base_env)
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        signal.setitimer(signal.ITIMER_REAL, 0)
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        reply["maxrss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            sock.send(json.dumps(reply).encode())
        except OSError:
            return  # the worker is gone


def _run(registry: CommandRegistry, name: str, args: list[str]) -> dict[str, Any]:
    from .runner import invoke

    spec = registry.get(name)
    if spec is None:
        return {"exit_code": 1, "reason": str(Reason.UNKNOWN_COMMAND), "error": f'Command "{name}" is not defined.'}
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
