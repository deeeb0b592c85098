"""The init of one lab "host" (see ``hosts.py``): PID 1 of the host's PID namespace.

Started by the lab inside the host's network, UTS, PID and mount namespaces, it starts and
signals the host's processes on request and reaps every process of the host (orphans are
reparented to it). It speaks one JSON object per line: requests on stdin, replies on stdout.
When its stdin closes (the lab is gone) it exits, and with it, by the kernel's rule for a PID
namespace's init, every process of the host.

Requests (``op`` and its fields; every reply has ``ok``, and ``error`` when not ok):

- ``spawn`` argv, env, cwd, out: start a process, stdin /dev/null, stdout and stderr appended
  to ``out``; reply ``pid`` (in the host's PID namespace).
- ``run`` argv, env, cwd, timeout: start a process and wait for it (killed at the timeout);
  reply ``returncode`` (None if killed at the timeout), ``stdout``, ``stderr``.
- ``signal`` pid, sig; ``status`` pids: reply ``status``, pid -> exit code or None while it runs;
  ``children`` pid: reply ``children``, its child pids; ``alive`` pids: reply ``alive``, the
  pids that still run (not zombies).
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import time
from typing import Any

_exited: dict[int, int] = {}  # pid -> exit code (negative: killed by that signal), once reaped
_started: set[int] = set()


def _reap() -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        if pid in _started:
            _exited[pid] = os.waitstatus_to_exitcode(status)


def _spawn(argv: list[str], env: dict[str, str], cwd: str | None, out: str, err: str | None = None) -> int:
    actions: list[tuple[Any, ...]] = [
        (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, out, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600),
    ]
    if err is None:
        actions.append((os.POSIX_SPAWN_DUP2, 1, 2))
    else:
        actions.append((os.POSIX_SPAWN_OPEN, 2, err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
    old = os.getcwd()
    if cwd:
        os.chdir(cwd)
    try:
        pid = os.posix_spawn(argv[0], argv, env, file_actions=actions,
                             setsigdef=(signal.SIGPIPE, signal.SIGXFSZ), setpgroup=0)
    finally:
        os.chdir(old)
    _started.add(pid)
    return pid


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _run(req: dict[str, Any]) -> dict[str, Any]:
    scratch = "/tmp/.hostagent"
    os.makedirs(scratch, exist_ok=True)
    tag = f"{time.monotonic_ns()}"
    out, err = f"{scratch}/{tag}.out", f"{scratch}/{tag}.err"
    pid = _spawn(req["argv"], req["env"], req.get("cwd"), out, err)
    end = time.monotonic() + float(req.get("limit", 60))
    code: int | None = None
    while True:
        _reap()
        if pid in _exited:
            code = _exited.pop(pid)
            break
        if time.monotonic() > end:
            os.kill(pid, signal.SIGKILL)
            while pid not in _exited:
                time.sleep(0.01)
                _reap()
            _exited.pop(pid)
            break
        time.sleep(0.005)
    _started.discard(pid)
    texts = []
    for path in (out, err):
        with open(path, errors="replace") as fh:
            texts.append(fh.read())
        os.unlink(path)
    return {"ok": True, "returncode": code, "stdout": texts[0], "stderr": texts[1]}


def _handle(req: dict[str, Any]) -> dict[str, Any]:
    op = req.get("op")
    if op == "spawn":
        return {"ok": True, "pid": _spawn(req["argv"], req["env"], req.get("cwd"), req["out"])}
    if op == "run":
        return _run(req)
    if op == "signal":
        try:
            os.kill(int(req["pid"]), int(req["sig"]))
        except ProcessLookupError:
            return {"ok": False, "error": "no such process"}
        return {"ok": True}
    if op == "status":
        _reap()
        return {"ok": True, "status": {str(p): _exited.get(int(p)) for p in req["pids"]}}
    if op == "children":
        pid = int(req["pid"])
        try:
            with open(f"/proc/{pid}/task/{pid}/children") as fh:
                kids = [int(p) for p in fh.read().split()]
        except OSError:
            kids = []
        return {"ok": True, "children": kids}
    if op == "alive":
        _reap()
        return {"ok": True, "alive": [p for p in req["pids"] if _alive(int(p))]}
    return {"ok": False, "error": f"unknown op {op!r}"}


def main() -> None:
    os.write(1, json.dumps({"ok": True, "ready": True, "hostname": socket.gethostname(),
                            "pid": os.getpid()}).encode() + b"\n")
    buf = b""
    while True:
        _reap()
        ready, _, _ = select.select([0], [], [], 0.05)
        if not ready:
            continue
        data = os.read(0, 65536)
        if not data:
            return  # the lab is gone: PID 1 exits and the kernel kills the rest of the host
        buf += data
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            try:
                reply = _handle(json.loads(line))
            except Exception as exc:  # noqa: BLE001 - a bad request must not take the host down
                reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            os.write(1, json.dumps(reply).encode() + b"\n")


if __name__ == "__main__":
    main()
