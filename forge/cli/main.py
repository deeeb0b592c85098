"""The ``forge`` executable: parse, call the library once, turn errors into one line and an exit code.

The exit code of every error is decided here, in :func:`exit_code_of_error`, and nowhere else
(the README's table). ``forge --version`` is answered without Typer; ``queue:dispatch`` and
``schedule:run`` try their Typer-free fast path (``forge.cli.fastpath``) first, and with
``-v``/``FORGE_VERBOSE=1`` a line on stderr says why one fell back to the full command.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Sequence

from forge.errors import EXIT_ERROR, EXIT_USAGE, ForgeError, UnknownCommand, UnknownQueuedCommand

#: The global options that ``forge --version`` may come with and still be answered without Typer.
_VERSION_OPTIONS = frozenset({"--version", "-v", "--verbose"})


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``forge`` and ``python -m forge``; returns (and exits with) the exit code."""
    if argv is None:
        _open_standard_streams()
    args = list(sys.argv[1:] if argv is None else argv)
    verbose = "-v" in args[:1] or "--verbose" in args[:1] or os.environ.get("FORGE_VERBOSE") == "1"
    if verbose:
        from forge.registry import runner

        runner.strict_discovery = True
    code, quick = _run(args, verbose)
    if argv is None:
        if sys.stdout is not None:
            sys.stdout.flush()
        if quick:
            # A dispatch from the fast path has written, synced and closed everything it opened:
            # skip the interpreter's teardown of every module, 7 ms of a 55 ms dispatch.
            with contextlib.suppress(OSError, ValueError):
                if sys.stderr is not None:  # None when fd 2 was closed
                    sys.stderr.flush()
            os._exit(code)
        sys.exit(code)
    return code


def _open_standard_streams() -> None:
    """Put ``/dev/null`` on whichever of fds 0-2 was closed at start (``forge ... >&-``, as cron
    and some supervisors leave them): otherwise the next file forge opens (a job file, a lock)
    would take fd 1 and a job process would print into it, and writing a job's id would fail
    after the job was queued. Output to a closed stream goes nowhere, as to ``>/dev/null``."""
    for fd, name in ((0, "stdin"), (1, "stdout"), (2, "stderr")):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)  # the lowest free fd: this one, when those below are open
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
            if getattr(sys, name) is None:
                setattr(sys, name, open(fd, "r" if fd == 0 else "w", closefd=False))  # noqa: SIM115


def exit_code_of_error(exc: ForgeError, args: Sequence[str]) -> int:
    """The exit code of ``forge ARGS`` that raised ``exc``: the error's own code, except that a
    command name the user typed that is not defined (``forge NAME``, ``forge help NAME``) exits 1,
    as artisan does; an unknown command elsewhere (a queued job's, ``forge.call``'s) keeps 3."""
    if isinstance(exc, UnknownCommand) and not isinstance(exc, UnknownQueuedCommand):
        names = [a for a in args if not a.startswith("-")]
        typed = names[1:2] if names[:1] == ["help"] else names[:1]
        if typed == [exc.name]:
            return EXIT_ERROR
    return exc.exit_code


def _version_only(args: list[str]) -> bool:
    """True for ``forge --version`` (maybe with -v) and nothing else: Typer would print the
    version too, but only after resolving a command named beside it."""
    return "--version" in args and set(args) <= _VERSION_OPTIONS


def _run(args: list[str], verbose: bool) -> tuple[int, bool]:
    """Run ``forge ARGS``: its exit code, and whether the fast path ran it (nothing left to tear down)."""
    import warnings

    from forge import output

    warnings.showwarning = lambda msg, cat, *a, **k: output.warn(str(msg))
    try:
        if _version_only(args):
            from forge import __version__

            print(f"forge {__version__}")
            return 0, False
        from forge.cli import fastpath

        fast = fastpath.attempt(args)
        if fast is not None and fast.code is not None:
            return fast.code, True
        if fast is not None and verbose:
            output.debug(f"{args[0]}: the full command runs, not the fast path: {fast.reason}.")
        elif verbose and args[1:2] and args[1] in fastpath.COMMANDS:
            output.debug(f"{args[1]}: the full command runs, not the fast path: {args[0]} comes before it"
                         " (FORGE_VERBOSE=1 shows why a fast path falls back).")
        code = run_full(args)
        if fast is not None:
            fast.after_full_run(code)
        return code, False
    except SystemExit as exc:  # sys.exit() in a command: the code it means, as forge.call says
        from forge.registry.runner import system_exit_code

        return system_exit_code(exc), False
    except ForgeError as exc:
        if verbose:
            import traceback

            traceback.print_exc()
        directive = getattr(exc, "directive", None)  # forge.Retry(after=...): the delay, for a caller
        if directive:
            sys.stderr.write(directive + "\n")
        output.error(exc.message, exc.hint)
        return exit_code_of_error(exc, args), False
    except KeyboardInterrupt:
        output.error("Interrupted.")
        return 130, False
    except BrokenPipeError:
        sys.stderr.close()
        return EXIT_ERROR, False
    except Exception as exc:
        if verbose:
            import traceback

            traceback.print_exc()
            output.error(f"{type(exc).__name__}: {exc}")
        else:
            output.error(f"{type(exc).__name__}: {exc}", "(run with -v for the traceback)")
        return EXIT_ERROR, False


def run_full(args: Sequence[str]) -> int:
    """Run ``forge ARGS`` through the Typer app, never the fast path: the command's exit code
    (Click's own errors become one line and exit 2). Other errors propagate, for :func:`main`."""
    from typer._click.exceptions import ClickException
    from typer.exceptions import Abort, Exit

    from forge import output
    from forge.cli.app import build_app

    group = build_app()
    try:
        rv = group.main(list(args), prog_name="forge", standalone_mode=False)
    except Exit as exc:
        return int(exc.exit_code)
    except Abort:
        output.error("Aborted.")
        return EXIT_ERROR
    except ClickException as exc:
        output.error(exc.format_message(), _usage_hint(args))
        return exc.exit_code if exc.exit_code else EXIT_USAGE
    from forge.registry.runner import exit_code_of

    return exit_code_of(rv)


def _usage_hint(args: Sequence[str]) -> str | None:
    names = [a for a in args if not a.startswith("-")]
    return f"Run `forge {names[0]} --help` for its usage." if names else "Run `forge --help`."
