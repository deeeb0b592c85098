"""Isolatable commands: ``@command(..., isolated=...)``, ``forge NAME ARGS --isolated`` and
``queue:dispatch --isolated``.

An isolated run holds a lock for exactly as long as it lives; a run that cannot take it does not
start (exit code 9, ``EXIT_ISOLATED``; as a job it waits, pending, or is dropped, per
``--on-busy``). The lock's key is, by what ``isolated=`` says:

- ``True`` (or ``--isolated`` on a command that declares nothing): the command's name, so one
  run of the command at a time;
- a string: a template filled in with the run's parameters by name, ``"import:{tenant}"``, so
  one run per tenant at a time;
- a callable: called with the run's parameters as keyword arguments, returning the key.

The lock is an isolation scope of one slot (``i:<key>`` in ``forge.limits.spec``), the same for
a direct run and a job, on the connection's store: an flock held by the ``forge`` process that
runs the command (or by the worker supervising the job) on the file backend, freed the moment
that process dies; a lease with a token on Redis, renewed while the run lives, freed when it
ends or within one lease (``[connections.redis] lease``) of its holder's death.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import socket
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from forge.errors import EXIT_ISOLATED, ForgeError, InvalidCommand, UsageError
from forge.job import Job
from forge.limits import LIMITS_KEY
from forge.limits.spec import JobLimits, Need, check_count, check_key, parse_rate

#: The attribute ``@command(isolated=...)`` sets on the function (see ``forge.registry.spec``).
MARKER = "__forge_isolated__"


class IsolationBusy(ForgeError):
    """An isolated run found its lock held by another run: it did not start."""

    exit_code = EXIT_ISOLATED


def declared(spec: Any) -> Any:
    """What the command's ``@command(isolated=...)`` says (None: not isolated)."""
    target = getattr(spec, "target", None)
    return getattr(target, MARKER, None) if callable(target) else None


def check_declaration(value: Any, name: str) -> Any:
    if value is None or value is False:
        return None
    if value is True or callable(value):
        return value
    if isinstance(value, str) and value:
        return value
    raise UsageError(f"@command({name!r}, isolated={value!r}): use True, a key template like"
                     " \"import:{tenant}\", or a function of the command's parameters.")


def key_of(spec: Any, decl: Any, params: Mapping[str, Any]) -> str:
    """The lock key of a run of ``spec`` with ``params`` (the parsed parameters, by name)."""
    if decl is None or decl is True:
        return spec.name
    if callable(decl):
        try:
            key = decl(**params)
        except Exception as exc:  # noqa: BLE001 - the project's function: say whose it is
            raise UsageError(f"{spec.name}: its isolated= function raised {type(exc).__name__}: {exc}.") from None
        if not isinstance(key, str):
            raise UsageError(f"{spec.name}: its isolated= function returned {key!r}, not a string key.")
    else:
        try:
            key = decl.format_map({k: ("" if v is None else v) for k, v in params.items()})
        except (KeyError, IndexError) as exc:
            known = ", ".join(sorted(params)) or "none"
            raise UsageError(f"{spec.name}: isolated={decl!r} names {{{exc.args[0]}}}, which is not one of its"
                             f" parameters ({known}).") from None
        except (ValueError, AttributeError) as exc:
            raise UsageError(f"{spec.name}: isolated={decl!r} is not a valid key template: {exc}.") from None
    try:
        return check_key(key, "isolation key")
    except UsageError as exc:
        raise UsageError(f"{spec.name}: {exc.message}") from None


def params_of(spec: Any, args: Sequence[str], root: str | None = None) -> dict[str, Any]:
    """A run's parameters, parsed as the command will parse them (in the project root)."""
    from forge.registry.argcheck import in_dir
    from forge.registry.runner import click_command

    cmd = click_command(spec)
    with in_dir(root):
        ctx = cmd.make_context(f"forge {spec.name}", list(args), resilient_parsing=False)
    with ctx:
        return dict(ctx.params)


# -- dispatch ---------------------------------------------------------------------------------

def options_meta(o: Mapping[str, Any]) -> dict[str, Any] | None:
    """``forge.limits`` metadata from dispatch options (``queue:dispatch``'s or a --from-file
    line's): concurrency_key, concurrency, rate_key, rate, burst, isolated, on_busy."""
    ck, n, rk, rate, burst = (o.get(k) for k in ("concurrency_key", "concurrency", "rate_key", "rate", "burst"))
    isolated, on_busy = o.get("isolated"), o.get("on_busy")
    if n is not None and ck is None:
        raise UsageError("--concurrency needs --concurrency-key (the key its jobs share, e.g. tenant:42).")
    if (rate is not None or burst is not None) and rk is None:
        raise UsageError("--rate and --burst need --rate-key (the key whose rate it is, e.g. api:stripe).")
    if on_busy is not None and on_busy not in ("wait", "drop"):
        raise UsageError(f"Invalid --on-busy {on_busy!r}: wait (stay pending until the lock frees) or drop.")
    if ck is None and rk is None and not isolated and on_busy is None:
        return None
    d: dict[str, Any] = {}
    if ck is not None:
        d["concurrency_key"] = check_key(ck, "--concurrency-key")
        if n is not None:
            d["concurrency"] = check_count(_int(n, "--concurrency"), "--concurrency")
    if rk is not None:
        d["rate_key"] = check_key(rk, "--rate-key")
        if rate is not None:
            r = parse_rate(rate, what="--rate", burst=None if burst is None else _int(burst, "--burst"))
            d.update(JobLimits(rate_key=rk, rate=r).to_dict())
    if isolated or on_busy is not None:
        d["isolation"] = True  # the key comes from the command (stamp)
        d["on_busy"] = on_busy or "wait"
    return d


def _int(value: Any, what: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    try:
        return int(str(value))
    except ValueError:
        raise UsageError(f"Invalid {what} {value!r}: a whole number.") from None


def stamp(job: Job, spec: Any, settings: Any) -> Job:
    """The job with its ``forge.limits`` checked and its isolation key filled in (from the
    command's ``isolated=`` and the job's arguments); InvalidCommand naming what is wrong."""
    raw = job.metadata.get(LIMITS_KEY)
    decl = declared(spec)
    if raw is None and decl is None:
        return job
    if raw is not None and not isinstance(raw, Mapping):
        raise InvalidCommand(f"{job.command}: metadata {LIMITS_KEY} must be an object of limits.")
    d = dict(raw or {})
    try:
        if decl is not None or d.get("isolation") is True:
            d["isolation"] = key_of(spec, decl, params_of(spec, job.args, str(settings.root)))
            d.setdefault("on_busy", "wait")
        limits = JobLimits.from_dict(d)
        _check_configured(limits, settings)
    except UsageError as exc:
        raise InvalidCommand(exc.message, hint=exc.hint) from None
    except ForgeError:
        raise
    except Exception as exc:  # a parse error Click raised: the argument check reports it too
        raise InvalidCommand(f"{job.command}: {exc}") from None
    return dataclasses.replace(job, metadata={**job.metadata, LIMITS_KEY: limits.to_dict()})


def _check_configured(limits: JobLimits, settings: Any) -> None:
    """A key given without its limit must have one in forge.toml."""
    if limits.concurrency_key is None and limits.rate_key is None:
        return
    from forge.limits.spec import load

    cfg = load(settings)
    if limits.concurrency_key is not None and limits.concurrency is None:
        kl = cfg.key(limits.concurrency_key)
        if kl is None or kl.concurrency is None:
            raise UsageError(f'--concurrency-key {limits.concurrency_key} has no limit: pass --concurrency=N, or set'
                             f' [limits.keys."{limits.concurrency_key}"] concurrency = N in forge.toml.')
    if limits.rate_key is not None and limits.rate is None:
        kl = cfg.key(limits.rate_key)
        if kl is None or kl.rate is None:
            raise UsageError(f'--rate-key {limits.rate_key} has no rate: pass --rate=100/m, or set'
                             f' [limits.keys."{limits.rate_key}"] rate = "100/m" in forge.toml.')


# -- a direct run -------------------------------------------------------------------------------

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
    from forge.queue.manager import connect

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


__all__ = ["MARKER", "IsolationBusy", "declared", "hold", "key_of", "options_meta", "stamp", "wrap_direct"]
