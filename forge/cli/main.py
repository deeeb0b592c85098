"""The ``forge`` executable: parse, call the library once, turn errors into one line and an exit code."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Sequence

from forge.errors import EXIT_ERROR, EXIT_USAGE, ForgeError


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``forge`` and ``python -m forge``; returns (and exits with) the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    verbose = "-v" in args[:1] or "--verbose" in args[:1] or os.environ.get("FORGE_VERBOSE") == "1"
    global _quick_exit
    _quick_exit = False
    if verbose:
        from forge.registry import runner

        runner.strict_discovery = True
    code = _run(args, verbose)
    if argv is None:
        if sys.stdout is not None:
            sys.stdout.flush()
        if _quick_exit:
            # A dispatch from the fast path has written, synced and closed everything it opened:
            # skip the interpreter's teardown of every module, 7 ms of a 55 ms dispatch.
            with contextlib.suppress(OSError, ValueError):
                if sys.stderr is not None:  # None when fd 2 was closed
                    sys.stderr.flush()
            os._exit(code)
        sys.exit(code)
    return code


_quick_exit = False


def _run(args: list[str], verbose: bool) -> int:
    import warnings

    from forge import output

    warnings.showwarning = lambda msg, cat, *a, **k: output.warn(str(msg))
    try:
        if args[:1] == ["queue:dispatch"]:
            from forge.cli.fastpath.dispatch import run as fast_dispatch

            code = fast_dispatch(args[1:])
            if code is not None:
                global _quick_exit
                _quick_exit = True
                return code
        if args[:1] == ["schedule:run"]:
            from forge.cli.fastpath.schedule import run as fast_schedule

            code = fast_schedule(args[1:])
            if code is not None:
                return code
        from typer._click.exceptions import ClickException
        from typer.exceptions import Abort, Exit

        from forge.cli.app import build_app

        group = build_app()
        try:
            rv = group.main(args, prog_name="forge", standalone_mode=False)
        except Exit as exc:
            return exc.exit_code
        except Abort:
            output.error("Aborted.")
            return EXIT_ERROR
        except ClickException as exc:
            output.error(exc.format_message(), _usage_hint(args))
            return exc.exit_code if exc.exit_code else EXIT_USAGE
        from forge.registry.runner import exit_code_of

        return exit_code_of(rv)
    except SystemExit as exc:  # sys.exit() in a command: the code it means, as forge.call says
        from forge.registry.runner import system_exit_code

        return system_exit_code(exc)
    except ForgeError as exc:
        if verbose:
            import traceback

            traceback.print_exc()
        directive = getattr(exc, "directive", None)  # forge.Retry(after=...): the delay, for a caller
        if directive:
            sys.stderr.write(directive + "\n")
        output.error(exc.message, exc.hint)
        return exc.exit_code
    except KeyboardInterrupt:
        output.error("Interrupted.")
        return 130
    except BrokenPipeError:
        sys.stderr.close()
        return EXIT_ERROR
    except Exception as exc:
        if verbose:
            import traceback

            traceback.print_exc()
            output.error(f"{type(exc).__name__}: {exc}")
        else:
            output.error(f"{type(exc).__name__}: {exc}", "(run with -v for the traceback)")
        return EXIT_ERROR


def _usage_hint(args: list[str]) -> str | None:
    names = [a for a in args if not a.startswith("-")]
    return f"Run `forge {names[0]} --help` for its usage." if names else "Run `forge --help`."
