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

This module holds the rules (the declaration, the key, a job's limits); a direct run holding
the lock is ``forge.registry.isolated``, and a run's parameters come from
``forge.registry.argcheck.params_of``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from forge.errors import EXIT_ISOLATED, ForgeError, InvalidCommand, UsageError
from forge.job import Job
from forge.limits import LIMITS_KEY
from forge.limits.spec import JobLimits, check_count, check_key, parse_rate

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
    """What ``@command(name, isolated=value)`` keeps (None: not isolated); UsageError for a value
    that is neither True, a key template nor a function."""
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


def stamp(job: Job, spec: Any, settings: Any, params: Callable[[], Mapping[str, Any]]) -> Job:
    """The job with its ``forge.limits`` checked and its isolation key filled in (from the
    command's ``isolated=`` and the job's arguments); InvalidCommand naming what is wrong.

    ``params`` returns the run's parameters by name, parsed as the command will parse them
    (``forge.registry.argcheck.params_of``, given by the queue); it is called only for a job
    that takes an isolation lock."""
    raw = job.metadata.get(LIMITS_KEY)
    decl = declared(spec)
    if raw is None and decl is None:
        return job
    if raw is not None and not isinstance(raw, Mapping):
        raise InvalidCommand(f"{job.command}: metadata {LIMITS_KEY} must be an object of limits.")
    d = dict(raw or {})
    try:
        if decl is not None or d.get("isolation") is True:
            d["isolation"] = key_of(spec, decl, params())
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


__all__ = ["MARKER", "IsolationBusy", "check_declaration", "declared", "key_of", "options_meta", "stamp"]
