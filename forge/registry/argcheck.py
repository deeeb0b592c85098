"""Checking a job's arguments against its command before it is queued (``CommandQueue`` and the
event listeners call :func:`check_job_args`).

What the argument spec (``forge.registry.argspec``) accepts, Click accepts: that answer is
3-10x faster than asking Click, and is taken whenever the spec models the command. Otherwise
Click parses the arguments (``forge.registry.runner.check_args``), and a burst of identical
dispatches parses once.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

from forge.errors import InvalidCommand, UsageError
from forge.registry.argspec import accepts, describe

#: Argument lists that Click parsed against their command recently: (spec, args) -> until when.
#: Only for commands the argument spec cannot model. Parsing is deterministic except for
#: checks that look at the world (a file that must exist), so an entry lives only a few
#: seconds; a burst of identical dispatches parses once instead of once per job.
_parsed_ok: dict[tuple[Any, tuple[str, ...]], float] = {}
PARSED_OK_TTL = 5.0


#: Each command function's argument spec (``forge.registry.argspec``), or None where it cannot be modelled.
_arg_specs: dict[Any, Any] = {}
_UNKNOWN = object()


_cwd_lock = threading.Lock()


@contextlib.contextmanager
def in_dir(path: str | None) -> Iterator[None]:
    """Run the block with ``path`` as the current directory (then back): a job's path
    arguments are checked where the worker will run it, the project root, not where the
    dispatcher happens to stand. A no-op when already there (the usual case)."""
    if path is None:
        yield
        return
    with _cwd_lock:
        try:
            here = os.getcwd()
        except OSError:
            here = None
        if here == path:
            yield
            return
        os.chdir(path)
        try:
            yield
        finally:
            if here is not None:
                os.chdir(here)


def params_of(spec: Any, args: Sequence[str], root: str | None = None) -> dict[str, Any]:
    """A run's parameters by name, parsed as the command will parse them (in ``root``, the
    project root): what an isolation key template is filled in with (``forge.limits.isolation``)."""
    from forge.registry.runner import click_command

    cmd = click_command(spec)
    with in_dir(root):
        ctx = cmd.make_context(f"forge {spec.name}", list(args), resilient_parsing=False)
    with ctx:
        return dict(ctx.params)


def check_job_args(spec: Any, args: tuple[str, ...], root: str | None = None) -> None:
    """Check that ``spec``'s command accepts ``args``, as its Click parser would, with ``root``
    (the project root, where the worker will run it) as the current directory for the path
    checks. Raises ``InvalidCommand`` with Click's message and a hint to the command's --help."""
    described = _described(spec)
    if described is not None and not _has_paths(described) and accepts(described, args):
        return  # no parameter looks at the disk: where this process stands does not matter
    with in_dir(root):
        _check_args_here(spec, args, described)


def _described(spec: Any) -> Any:
    """The argument spec of ``spec``'s command (``forge.registry.argspec.describe``), or None
    where it cannot be modelled; made once per command function."""
    fn = spec.load()
    described = _arg_specs.get(fn, _UNKNOWN)
    if described is _UNKNOWN:
        from forge.registry.runner import click_command

        described = _arg_specs[fn] = describe(click_command(spec))
    return described


def _has_paths(described: dict[str, Any]) -> bool:
    """Whether any parameter of the argument spec is a path (checked against the disk)."""
    paths = described.get("_paths")
    if paths is None:  # found once per spec (not saved)
        paths = described["_paths"] = any(p["type"]["kind"] == "path"
                                          for p in (*described["options"], *described["arguments"]))
    return bool(paths)


def _check_args_here(spec: Any, args: tuple[str, ...], described: Any) -> None:
    if described is not None and accepts(described, args):
        return  # what the spec accepts, Click accepts (3-10x faster than asking Click; paths checked now)
    key = (spec, args)
    now = time.monotonic()
    until = _parsed_ok.get(key)
    if until is not None and until > now:
        return
    from forge.registry.runner import check_args

    try:
        check_args(spec, args)
    except UsageError as exc:
        raise InvalidCommand(exc.message, hint=f"Run `forge {spec.name} --help`.") from None
    if len(_parsed_ok) >= 4096:
        _parsed_ok.clear()
    _parsed_ok[key] = now + PARSED_OK_TTL
