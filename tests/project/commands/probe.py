"""Probe commands for the worker and reliability tests.

``probe:run`` appends one line per run to the ledger named by ``FORGE_PROBE_LEDGER``:
``job_id attempt pid start end`` (start and end as Unix times), written in one append
when the run ends, plus a ``start`` line when it begins so that runs killed midway show up.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Annotated

import typer

from forge import command


def _ledger(kind: str, payload: dict) -> None:
    path = os.environ.get("FORGE_PROBE_LEDGER")
    if not path:
        return
    line = json.dumps({"kind": kind, "job": os.environ.get("FORGE_JOB_ID"),
                       "attempt": int(os.environ.get("FORGE_JOB_ATTEMPT", "0")),
                       "queue": os.environ.get("FORGE_QUEUE"), "token": os.environ.get("FORGE_JOB_TOKEN"),
                       "pid": os.getpid(), "ppid": os.getppid(), **payload})
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


@command("probe:run")
def run(
    args: Annotated[list[str] | None, typer.Argument(help="Recorded as given.")] = None,
    sleep: Annotated[float, typer.Option(help="Seconds to sleep.")] = 0.0,
    exit_code: Annotated[int, typer.Option(help="Exit with this code.")] = 0,
    fail: Annotated[bool, typer.Option("--fail", help="Raise an exception.")] = False,
    kill_worker: Annotated[bool, typer.Option("--kill-worker", help="SIGKILL the worker: its supervisor and this job process.")] = False,
    crash: Annotated[bool, typer.Option("--crash", help="SIGKILL this job process only.")] = False,
    ignore_term: Annotated[bool, typer.Option("--ignore-term", help="Ignore SIGTERM.")] = False,
    grandchild: Annotated[str | None, typer.Option(help="Start a sleeping grandchild; write its pid here.")] = None,
    say: Annotated[str | None, typer.Option(help="Print this.")] = None,
    print_mb: Annotated[int, typer.Option(help="Print this many MiB of numbered lines, then log 'printed'.")] = 0,
    ignore_chld: Annotated[bool, typer.Option("--ignore-chld", help="Leave SIGCHLD ignored.")] = False,
    run_false: Annotated[bool, typer.Option("--run-false", help="Exit with the code of `false` run as a child.")] = False,
    close_fds: Annotated[bool, typer.Option("--close-fds", help="Close every inherited descriptor above 2.")] = False,
    unlock_fds: Annotated[bool, typer.Option("--unlock-fds", help="flock(LOCK_UN) every descriptor above 2.")] = False,
    dup_stdout: Annotated[str | None, typer.Option(help="Point fds 1 and 2 at this file (and leave them so).")] = None,
    mess: Annotated[bool, typer.Option("--mess", help="Change everything a job can change in its process.")] = False,
    mess_restorable: Annotated[bool, typer.Option("--mess-restorable", help="Change what the job process puts back.")] = False,
    daemon: Annotated[str | None, typer.Option(help="Start a setsid() daemon ignoring SIGTERM; write its pid here.")] = None,
    ignore_alrm: Annotated[bool, typer.Option("--ignore-alrm", help="Ignore SIGALRM.")] = False,
    first_sleep: Annotated[float, typer.Option(help="Seconds to sleep on attempt 1 (instead of --sleep).")] = 0.0,
    ticks: Annotated[str | None, typer.Option(help="While sleeping, append 'pid time' here every 50 ms.")] = None,
    leak_mb: Annotated[int, typer.Option(help="Keep this many MiB alive in the module after the run.")] = 0,
    lines: Annotated[int, typer.Option(help="Print this many numbered lines.")] = 0,
) -> int:
    """Record this run in the probe ledger, then do what the options say."""
    start = time.time()
    _ledger("start", {"start": start, "args": args or []})
    if say:
        print(say)
    if print_mb:
        sys.stdout.flush()
        for i in range(print_mb * 1024 * 1024 // 32):
            os.write(1, f"{i:031d}\n".encode())
        _ledger("printed", {"start": start})
    if ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if ignore_chld:
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    if run_false:
        exit_code = subprocess.run(["false"]).returncode
    if grandchild:
        child = subprocess.Popen([sys.executable, "-c",
                                  "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
        with open(grandchild, "w") as fh:
            fh.write(str(child.pid))
    if unlock_fds:
        import fcntl

        for fd in range(3, 1024):
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            except OSError:
                pass
    for i in range(lines):
        print(f"{i:031d}")
    if leak_mb:
        _LEAK.append(bytearray(b"x" * (leak_mb * 1024 * 1024)))
    if close_fds:
        os.closerange(3, 65536)
    if dup_stdout:
        fd = os.open(dup_stdout, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        print("printed after dup2", flush=True)
    if mess or mess_restorable:
        _mess(everything=mess)
    if daemon:
        _start_daemon(daemon)
    if ignore_alrm:
        signal.signal(signal.SIGALRM, signal.SIG_IGN)
    if first_sleep and os.environ.get("FORGE_JOB_ATTEMPT") == "1":
        sleep = first_sleep
    if kill_worker:
        os.kill(os.getppid(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)
    if crash:
        os.kill(os.getpid(), signal.SIGKILL)
    if sleep and ticks:
        end = time.time() + sleep
        while time.time() < end:
            with open(ticks, "a") as fh:
                fh.write(f"{os.getpid()} {time.time()}\n")
            time.sleep(0.05)
    elif sleep:
        time.sleep(sleep)
    _ledger("end", {"start": start, "end": time.time(), "args": args or []})
    if fail:
        raise RuntimeError("probe failed on purpose")
    return exit_code


_LEAK: list[bytearray] = []


def _mess(everything: bool) -> None:
    """Change the process state a job can change (the next job must see none of it). Without
    ``everything``, only what the job process puts back itself (it then stays for the next job)."""
    import ctypes
    import resource
    import tempfile
    import threading

    os.chdir("/")
    os.environ["FORGE_PROBE_MESS"] = "1"
    os.umask(0o077)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1, signal.SIGINT})
    sys.setrecursionlimit(77)
    signal.setitimer(signal.ITIMER_REAL, 30)
    signal.setitimer(signal.ITIMER_VIRTUAL, 30)
    libc = ctypes.CDLL("libc.so.6")
    libc.prctl(1, 0, 0, 0, 0)  # PR_SET_PDEATHSIG: none
    sys.path.insert(0, "/nonexistent")
    sys.setswitchinterval(0.5)
    tempfile.tempdir = "/nonexistent"
    sys.excepthook = print
    if not everything:
        return
    import faulthandler

    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 128))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    threading.Thread(target=time.sleep, args=(3600,), daemon=False).start()
    threading.current_thread().name = "messed"
    libc.prctl(15, b"messed", 0, 0, 0)  # PR_SET_NAME
    os.putenv("FORGE_PROBE_PUTENV", "1")
    os.nice(1)
    faulthandler.enable()
    sys.stdout.reconfigure(encoding="ascii")
    os.close(0)


def _start_daemon(pidfile: str) -> None:
    """Fork a daemon the classic way (fork, setsid, fork), ignoring SIGTERM; the job goes on."""
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            with open(pidfile + ".tmp", "w") as fh:
                fh.write(str(os.getpid()))
            os.rename(pidfile + ".tmp", pidfile)
            os.closerange(0, 65536)
            time.sleep(600)
        os._exit(0)
    while not os.path.exists(pidfile):  # ready: as a daemonising program waits for its daemon
        time.sleep(0.01)


@command("probe:state")
def state() -> None:
    """Print the process state a job could have changed, as JSON."""
    import resource
    import threading

    umask = os.umask(0)
    os.umask(umask)
    fds = {}
    for fd in (0, 1, 2):
        try:
            fds[fd] = os.readlink(f"/proc/self/fd/{fd}").split(" (")[0].split(":[")[0]
        except OSError:
            fds[fd] = None
    import ctypes
    import faulthandler
    import tempfile

    pdeath = ctypes.c_int(-1)
    ctypes.CDLL("libc.so.6").prctl(2, ctypes.byref(pdeath), 0, 0, 0)  # PR_GET_PDEATHSIG
    child_env = subprocess.run(["env"], capture_output=True, text=True).stdout
    print(json.dumps({
        "itimers": [signal.getitimer(signal.ITIMER_REAL), signal.getitimer(signal.ITIMER_VIRTUAL)],
        "pdeathsig": pdeath.value, "comm": open("/proc/self/comm").read(),
        "putenv": "FORGE_PROBE_PUTENV" in child_env, "path0": sys.path[0], "switch": sys.getswitchinterval(),
        "tempdir": tempfile.tempdir, "nice": os.getpriority(os.PRIO_PROCESS, 0),
        "excepthook": repr(sys.excepthook), "faulthandler": faulthandler.is_enabled(),
        "encoding": sys.stdout.encoding, "pid": os.getpid(),
        "cwd": os.getcwd(), "mess": os.environ.get("FORGE_PROBE_MESS"), "umask": umask,
        "sigterm": str(signal.getsignal(signal.SIGTERM)), "sigusr2": str(signal.getsignal(signal.SIGUSR2)),
        "blocked": sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])),
        "nofile": resource.getrlimit(resource.RLIMIT_NOFILE), "core": resource.getrlimit(resource.RLIMIT_CORE),
        "threads": threading.active_count(), "thread": threading.current_thread().name,
        "recursion": sys.getrecursionlimit(), "fds": fds,
    }))


@command("probe:env")
def env() -> None:
    """Print the job's FORGE_* environment as JSON."""
    print(json.dumps({k: v for k, v in os.environ.items() if k.startswith("FORGE_JOB") or k == "FORGE_QUEUE"}))


@command("probe:noop")
def noop() -> None:
    """Do nothing (for throughput tests)."""


@command("probe:stamp")
def stamp(marker: Annotated[str, typer.Argument(help="Recorded as given.")]) -> None:
    """Record a start line with ``marker`` in the ledger, nothing else: the twin of
    bench/_peers/hueyapp.py's ``stamp(marker)`` (one argument), for latency figures."""
    _ledger("start", {"start": time.time(), "args": [marker]})


@command("probe:tick")
def tick(ms: Annotated[int, typer.Argument(help="Milliseconds to sleep.")] = 0) -> None:
    """Record a start and an end line in the ledger, sleeping ``ms`` between (cheap: for soaks)."""
    start = time.time()
    _ledger("start", {"start": start, "args": []})
    if ms:
        time.sleep(ms / 1000)
    _ledger("end", {"start": start, "end": time.time(), "args": []})
