"""Run one command by name with an argv list: used by ``forge NAME ...``, ``forge.call`` and the worker.

A command function becomes a Click command through Typer once per process (cached); each run
gets a fresh Click context, so nothing leaks from one call to the next.
"""

from __future__ import annotations

import io
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from forge.errors import EXIT_ERROR, EXIT_USAGE, ForgeError, UsageError
from forge.registry.spec import CommandRegistry, CommandSpec

_click_cache: dict[Callable[..., Any], Any] = {}


def click_command(spec: CommandSpec) -> Any:
    """The Click command Typer builds from the spec's function (cached per function)."""
    fn = spec.load()
    cmd: Any = _click_cache.get(fn)
    if cmd is None:
        import typer
        from typer.main import get_command

        app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
        # A command may add Click context settings (queue:dispatch stops parsing at its COMMAND).
        settings = {"help_option_names": ["-h", "--help"], **getattr(fn, "__forge_context_settings__", {})}
        app.command(name=spec.name, context_settings=settings)(fn)
        cmd = get_command(app)
        _click_cache[fn] = cmd
    # Typer renders --help with rich whenever rich is installed; only a person at a terminal
    # gets that (and pays for importing rich); pipes, the worker and forge.call get plain text.
    cmd.rich_markup_mode = "rich" if _stdout_is_tty() else None
    return cmd


_tty: list[tuple[int, bool]] = []


def forget_tty() -> None:
    """Ask again next time (the worker's job process, after pointing fd 1 at the job's output)."""
    _tty.clear()


def _stdout_is_tty() -> bool:
    """Whether stdout is a terminal, asked once per stdout object (the worker runs thousands
    of jobs a second through here; the answer needs a system call)."""
    from forge.output import is_tty

    if not _tty or _tty[0][0] != id(sys.stdout):
        _tty[:] = [(id(sys.stdout), is_tty())]
    return _tty[0][1]


def check_args(spec: CommandSpec, args: Sequence[str]) -> None:
    """Parse ``args`` against the command's signature without running it; UsageError if they do not fit."""
    cmd = click_command(spec)
    from typer._click.exceptions import ClickException
    from typer.exceptions import Exit

    before = list(args)[: list(args).index("--")] if "--" in args else list(args)
    for flag in cmd.context_settings.get("help_option_names", ["--help"]):
        if flag in before:  # Click would print the help here, and the job would only print it
            raise UsageError(f"{spec.name}: {flag} asks for its help; it is not an argument to queue.")
    try:
        ctx = cmd.make_context(f"forge {spec.name}", list(args), resilient_parsing=False)
        ctx.close()
    except Exit:
        return  # --help and friends parse fine
    except ClickException as exc:
        raise UsageError(f"{spec.name}: {exc.format_message()}") from None


def invoke(spec: CommandSpec, args: Sequence[str], cmd: Any = None) -> int:
    """Run the command (``cmd``: its Click command, if not the usual one); return its exit
    code. Usage errors raise :class:`UsageError`.

    Exceptions raised by the command itself propagate to the caller.
    """
    cmd = cmd or click_command(spec)
    ClickException, Abort = _click_errors()  # noqa: N806 - classes
    try:
        rv = cmd.main(list(args), prog_name=f"forge {spec.name}", standalone_mode=False)
    except ClickException as exc:
        if exc.exit_code == EXIT_USAGE:
            raise UsageError(f"{spec.name}: {exc.format_message()}",
                             hint=f"Run `forge {spec.name} --help` for its usage.") from None
        raise ForgeError(exc.format_message()) from None
    except Abort:
        return 1
    return exit_code_of(rv)


#: The exit codes a command can mean: what a process's exit status can carry (8 bits).
EXIT_CODES = range(256)


def exit_code_of(rv: object) -> int:
    """The exit code a command's return value means: the one rule for ``forge NAME``,
    ``forge.call``, the job process and the worker.

    ``None`` and ``True`` are success (0) and ``False`` is failure (1); an int is the code
    itself when it is one an exit status can carry (0-255), and failure (1) otherwise (256
    would become 0, a success, in the exit status); any other value is success (0). A
    ``typer.Exit(code)`` reaches here as its ``code`` (Click returns it)."""
    if rv is None or rv is True:
        return 0
    if rv is False:
        return EXIT_ERROR
    if isinstance(rv, int):
        return rv if rv in EXIT_CODES else EXIT_ERROR
    return 0


def system_exit_code(exc: SystemExit) -> int:
    """The exit code a ``SystemExit`` (``sys.exit(...)`` in a command) means: ``None`` is 0, an
    int is itself if it is 0-255 and 1 otherwise (Python itself would wrap 300 to 44, a code
    that means something else; ``exit_code_of`` has the same rule), and
    anything else (a message) is 1, the message written to ``sys.stderr`` first."""
    code = exc.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code if code in EXIT_CODES else EXIT_ERROR
    print(code, file=sys.stderr)
    return EXIT_ERROR


_errors: list[Any] = []


def _click_errors() -> tuple[Any, Any]:
    """Click's exception classes, imported once (an import statement costs microseconds a job)."""
    if not _errors:
        from typer._click.exceptions import ClickException
        from typer.exceptions import Abort

        _errors[:] = [ClickException, Abort]
    return _errors[0], _errors[1]


@dataclass(frozen=True)
class CallResult:
    """What ``forge.call`` returns: the exit code and everything the command printed."""

    exit_code: int
    output: str
    error: str | None = None

    @property
    def ok(self) -> bool:
        """Whether the command succeeded (exit code 0)."""
        return self.exit_code == 0


_default_registry: CommandRegistry | None = None
#: Set by the CLI for ``forge -v``: a command file that fails to import is then an error with
#: its traceback, not a warning.
strict_discovery = False


def default_registry() -> CommandRegistry:
    """The project's registry (``forge.toml`` found from the working directory), built once
    per process; raises ``ConfigError`` for a configuration that does not load."""
    global _default_registry
    if _default_registry is None:
        from forge.config import load_settings
        from forge.registry.discovery import build_registry

        _default_registry = build_registry(load_settings(), strict=strict_discovery)
    return _default_registry


def call(name: str, args: Sequence[str] = (), *, registry: CommandRegistry | None = None) -> CallResult:
    """Run command ``name`` in this process with ``args`` and capture its output.

    ``UnknownCommand`` is raised for a name that is not registered; any other failure is
    reported in the result (exit code 2 for usage errors, 1 for exceptions).
    """
    if isinstance(args, str):
        raise TypeError("args must be a list of strings, not one string")
    spec = (registry or default_registry()).resolve(name)
    buf = io.StringIO()
    old_out, old_err = sys.stdout, sys.stderr
    sys.stdout = sys.stderr = buf
    error: str | None = None
    try:
        argv = [str(a) for a in args]
        wrapped = None
        if "--isolated" in argv or getattr(spec.target, "__forge_isolated__", None) is not None:
            from forge.registry.isolated import wrap_direct  # hold its isolation lock while it runs

            wrapped, argv = wrap_direct(spec, click_command(spec), argv)
        code = invoke(spec, argv, wrapped)
    except ForgeError as exc:
        code, error = exc.exit_code, exc.message
    except SystemExit as exc:
        code = system_exit_code(exc)
    except Exception as exc:
        code, error = EXIT_ERROR, f"{type(exc).__name__}: {exc}"
        traceback.print_exc(file=buf)
    finally:
        sys.stdout, sys.stderr = old_out, old_err
    return CallResult(code, buf.getvalue(), error)
