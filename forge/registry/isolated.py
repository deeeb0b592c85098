"""A direct run of an isolated command (``forge NAME ARGS [--isolated]``, ``forge.call``),
holding its isolation lock for exactly as long as it runs.

The rules (what ``isolated=`` declares, the lock's key) are ``forge.limits.isolation``'s; this
module takes the lock on the connection's store and runs the command under it: an flock held by
this process on the file backend, a lease renewed while the run lives on Redis. A run that
cannot take the lock does not start (``IsolationBusy``, exit code 9).
"""

from __future__ import annotations

import contextlib
import copy
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

from forge.backends import connect
from forge.limits.isolation import IsolationBusy, declared, key_of
from forge.limits.spec import Need


def wrap_direct(spec: Any, cmd: Any, args: list[str]) -> tuple[Any, list[str]]:
    """``forge NAME ARGS [--isolated]``: the Click command to run, holding the lock when the
    command is isolated or ``--isolated`` is given (taken out of the command's arguments)."""
    end = args.index("--") if "--" in args else len(args)
    flag = "--isolated" in args[:end]
    decl = declared(spec)
    if not flag and decl is None:
        return cmd, args
    if flag:
        i = args.index("--isolated")
        args = args[:i] + args[i + 1:]
    wrapped = copy.copy(cmd)
    inner = cmd.invoke

    def invoke(ctx: Any) -> Any:
        key = key_of(spec, decl, ctx.params)
        with hold(key, spec.name):
            return inner(ctx)

    wrapped.invoke = invoke
    return wrapped, args


@contextlib.contextmanager
def hold(key: str, command: str, connection: str | None = None) -> Iterator[None]:
    """Hold the isolation lock ``key`` for the block, on the default connection's store; raise
    ``IsolationBusy`` (exit 9) if another run holds it."""
    backend: Any = connect(connection)
    need = Need("slot", f"i:{key}", f"isolation {key}", 1)
    holds = backend.lock_scope(need, {"run": True, "command": command})
    if holds is None:
        raise IsolationBusy(f'{command} did not run: another run holds its isolation lock "{key}"'
                            f"{_holder(backend, need.scope)}.",
                            hint="Run it again once that run has finished (exit code 9 tells a script it did not run).")
    stop = threading.Event()
    renewer = None
    renew = getattr(backend, "renew_lock", None)
    if renew is not None:  # a lease: renew it six times a lease while the run lives
        every = max(getattr(backend, "lease_window", 30.0) / 6, 0.5)

        def loop() -> None:
            while not stop.wait(every):
                with contextlib.suppress(Exception):
                    renew(holds)

        renewer = threading.Thread(target=loop, name="forge-isolation-lease", daemon=True)
        renewer.start()
    try:
        yield
    finally:
        stop.set()
        if renewer is not None:
            renewer.join(timeout=5)
        with contextlib.suppress(Exception):
            backend.release_holds(holds)


def _holder(backend: Any, scope: str) -> str:
    try:
        holders = backend.slot_holders(scope)
    except Exception:  # noqa: BLE001 - only for the message
        return ""
    if not holders:
        return ""
    h = holders[0]
    if h.get("job"):
        return f" (job {h['job']})"
    since = h.get("since")
    when = f", since {time.strftime('%H:%M:%S', time.localtime(since))}" if isinstance(since, int | float) else ""
    host = h.get("host") or socket.gethostname()
    return f" (pid {h.get('pid', '?')} on {host}{when})"


__all__ = ["hold", "wrap_direct"]
