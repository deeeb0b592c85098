"""Everything forge shows a person or a script. The only module that imports rich.

Rich is imported lazily and only when a person reads the output (a terminal); scripts get
plain text or JSON. JSON and data go to stdout, human messages to stderr.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any

_consoles: dict[bool, Any] = {}


def is_tty(stream: Any = None) -> bool:
    """Whether a person is reading ``stream`` (default: stdout): it is a terminal and ``TERM`` is
    not ``dumb``. False for a closed or missing stream. The one such check of forge."""
    stream = stream or sys.stdout
    try:
        return bool(stream.isatty()) and os.environ.get("TERM") != "dumb"
    except (AttributeError, ValueError):
        return False


def console(stderr: bool = False) -> Any:
    """The rich Console for stdout (or stderr), made once per stream; imports rich."""
    from rich.console import Console

    con = _consoles.get(stderr)
    if con is None or con.file is not (sys.stderr if stderr else sys.stdout):
        con = Console(stderr=stderr, highlight=False, soft_wrap=False)
        _consoles[stderr] = con
    return con


def print_json(data: Any) -> None:
    """Write ``data`` as indented JSON on stdout and flush (values JSON cannot hold as their ``str``)."""
    import json

    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


def print_jsonl(data: Any) -> None:
    """Write ``data`` as one compact JSON line on stdout and flush."""
    import json

    sys.stdout.write(json.dumps(data, default=str, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def sentence(text: str) -> str:
    """``text`` ending as a sentence: one final stop (``.``, ``!``, ``?``, or a closing quote or
    backtick after one); ``..`` from a detail that already had its stop becomes ``.``."""
    text = text.rstrip()
    while text.endswith(".."):
        text = text[:-1]
    if not text or text[-1] in ".!?:)" or text.endswith(('."', ".'", ".`")):
        return text
    return text + "."


def error(message: str, hint: str | None = None) -> None:
    # A hint is a second sentence: the message ends with a stop before it (never "..").
    # (A parenthetical hint, such as "(run with -v ...)", belongs to the message's sentence.)
    """Print ``Error: message`` (and the hint, as its second sentence) on stderr; red on a terminal."""
    if not hint:
        line = message
    elif hint.startswith("("):
        line = f"{message} {hint}"
    else:
        line = f"{sentence(message)} {sentence(hint)}"
    if is_tty(sys.stderr):
        from rich.markup import escape

        console(stderr=True).print(f"[bold red]Error:[/] {escape(line)}")
    else:
        sys.stderr.write(f"Error: {line}\n")


def warn(message: str) -> None:
    """Print ``Warning: message`` on stderr; yellow on a terminal."""
    if is_tty(sys.stderr):
        from rich.markup import escape

        console(stderr=True).print(f"[yellow]Warning:[/] {escape(message)}")
    else:
        sys.stderr.write(f"Warning: {message}\n")


def debug(message: str) -> None:
    """A debug line on stderr (for ``-v``/``FORGE_VERBOSE=1``; the caller decides when), plain text."""
    with suppress(OSError, ValueError, AttributeError):  # stderr closed (cron) or None
        sys.stderr.write(f"debug: {message}\n")
        sys.stderr.flush()


def info(message: str) -> None:
    """A human message on stderr (coloured on a terminal)."""
    if is_tty(sys.stderr):
        from rich.markup import escape

        console(stderr=True).print(f"[green]✓[/] {escape(message)}")
    else:
        sys.stderr.write(message + "\n")


def line(text: str = "") -> None:
    """Write one line of plain text on stdout (not flushed)."""
    sys.stdout.write(text + "\n")


_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x09), *range(0x0b, 0x20), 0x7f)}  # all but \t and \n


def shown(text: str) -> str:
    """A job's own output made safe to print: control characters (terminal escape sequences,
    carriage returns, bells) written as ``\\x1b`` and so on, so that a job cannot move the
    cursor, rewrite the screen or retitle the terminal of whoever reads ``queue:show``
    (``queue:log`` prints the log exactly as it was written)."""
    return text.replace("\r\n", "\n").translate(_CONTROL)


#: A plain (piped) table cell longer than this is cut (``queue:show --json`` has the whole value).
PLAIN_CELL_MAX = 120


def _plain_cell(value: str) -> str:
    """One line, at most PLAIN_CELL_MAX characters, ending in "..." when cut."""
    value = value.replace("\n", "\\n")
    return value if len(value) <= PLAIN_CELL_MAX else value[:PLAIN_CELL_MAX - 3] + "..."


def table(
    columns: Sequence[str], rows: Iterable[Sequence[Any]], *, title: str | None = None,
    styles: dict[str, str] | None = None,
) -> None:
    """A Rich table on a terminal, tab-separated columns with a header elsewhere.

    An ``id`` column is never wrapped or shortened on a terminal: ids are there to be copied.
    """
    rows = [[("" if v is None else shown(str(v))) for v in row] for row in rows]  # a job's own text too
    if is_tty():
        console().print(_rich_table(columns, rows, title=title, styles=styles))
        return
    if title:
        line(title)
    keep = [c == "id" for c in columns]  # ids are there to be copied: never shortened
    rows = [[v if k else _plain_cell(v) for v, k in zip(row, keep, strict=True)] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(columns)]
    line("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for row in rows:
        line("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def _rich_table(
    columns: Sequence[str], rows: Sequence[Sequence[str]], *, title: str | None,
    styles: dict[str, str] | None = None, row_styles: Sequence[str | None] | None = None,
) -> Any:
    from rich.table import Table

    t = Table(title=title, title_justify="left", header_style="bold")
    for i, col in enumerate(columns):
        if col == "id":  # full width even when the terminal is narrow; other columns wrap instead
            width = max([len(col)] + [len(r[i]) for r in rows])
            t.add_column(col, style=(styles or {}).get(col), no_wrap=True, min_width=width)
        else:
            t.add_column(col, style=(styles or {}).get(col))
    for n, row in enumerate(rows):
        style = row_styles[n] if row_styles is not None else None
        t.add_row(*row, style=style or _row_style(row, columns))
    return t


class LiveTable:
    """A table redrawn in place on a terminal (stdout) for as long as the ``with`` block runs.

    ``row_styles`` gives one Rich style (or None) per row.
    """

    def __init__(self, columns: Sequence[str], rows: Iterable[Sequence[Any]], *, title: str | None = None,
                 row_styles: Sequence[str | None] | None = None) -> None:
        self.columns = list(columns)
        self._first = self._render(rows, title, row_styles)
        self._live: Any = None

    def _render(self, rows: Iterable[Sequence[Any]], title: str | None, row_styles: Sequence[str | None] | None) -> Any:
        cells = [[("" if v is None else str(v)) for v in row] for row in rows]
        return _rich_table(self.columns, cells, title=title, row_styles=row_styles)

    def __enter__(self) -> LiveTable:
        from rich.live import Live

        self._live = Live(self._first, console=console(), auto_refresh=False)
        self._live.__enter__()
        return self

    def update(self, rows: Iterable[Sequence[Any]], *, title: str | None = None,
               row_styles: Sequence[str | None] | None = None) -> None:
        """Replace the table with these rows and redraw it."""
        self._live.update(self._render(rows, title, row_styles), refresh=True)

    def __exit__(self, *exc: object) -> None:
        self._live.__exit__(*exc)


@contextmanager
def progress(total: int, what: str) -> Iterator[Callable[[int], None]]:
    """A progress bar on stderr when it is a terminal and there are 2+ steps; a no-op elsewhere.

    Yields ``advance(n)``. Stdout is left alone: what a command prints meanwhile (job ids for a
    pipe) goes straight to it, not through the bar.
    """
    if not is_tty(sys.stderr) or total < 2:
        yield lambda n: None
        return
    from rich.progress import Progress

    bar = Progress(console=console(stderr=True), transient=True, redirect_stdout=False, redirect_stderr=False)
    bar.start()
    try:
        task = bar.add_task(what, total=total)
        yield lambda n: bar.advance(task, n)
    finally:
        bar.stop()


_STATE_STYLES = {"failed": "red", "reserved": "cyan", "delayed": "yellow", "done": "dim", "paused": "yellow"}


def _row_style(row: Sequence[str], columns: Sequence[str]) -> str | None:
    if "state" in columns:
        return _STATE_STYLES.get(row[list(columns).index("state")])
    return None


#: The options of ``forge`` itself, before the command name (listed by ``forge`` and ``forge --help``).
GLOBAL_OPTIONS = (
    ("-v, --verbose", "Show tracebacks and debug output (also FORGE_VERBOSE=1)"),
    ("--version", "Print forge's version and exit"),
    ("-h, --help", "Show this list; `forge help COMMAND` for a command's usage"),
    ("--install-completion", "Install shell completion for forge (--show-completion prints it)"),
)


def command_list(specs: Sequence[Any], version: str, namespace: str | None = None) -> None:
    """Commands grouped by namespace, like ``php artisan list``."""
    width = max([len(s.name) for s in specs] + [10]) + 2
    tty = is_tty()
    out: list[str] = []
    if namespace is None:
        out += [f"[green]forge[/] {version}" if tty else f"forge {version}", ""]
        out += ["[yellow]Usage:[/]" if tty else "Usage:", "  forge [-v] <command> [options] [arguments]", ""]
        out += ["[yellow]Options:[/]" if tty else "Options:"]
        out += [f"  {flag:<{width + 8}}{text}" for flag, text in GLOBAL_OPTIONS] + [""]
        out += ["[yellow]Available commands:[/]" if tty else "Available commands:"]
    else:
        out += [f"[yellow]Available commands for the \"{namespace}\" namespace:[/]" if tty
                else f'Available commands for the "{namespace}" namespace:']
    current: str | None = None
    for spec in specs:
        if spec.namespace != current and spec.namespace and namespace is None:
            out.append(f" [yellow]{spec.namespace}[/]" if tty else f" {spec.namespace}")
        current = spec.namespace
        if tty:
            from rich.markup import escape

            out.append(f"  [green]{spec.name.ljust(width)}[/]{escape(spec.description)}")
        else:
            out.append(f"  {spec.name.ljust(width)}{spec.description}".rstrip())
    if tty:
        console().print("\n".join(out))
    else:
        sys.stdout.write("\n".join(out) + "\n")


def status_line(when: str, name: str, status: str, detail: str = "", *, width: int = 80) -> str:
    """``2026-11-28 10:00:00 import:data ........ 35 ms DONE`` (plain text)."""
    right = f"{detail} {status}".strip()
    dots = max(width - len(when) - len(name) - len(right) - 4, 3)
    return f"{when} {name} {'.' * dots} {right}"


def status_print(text: str, status: str) -> None:
    """Print a ``status_line`` on stdout, its status word coloured on a terminal."""
    if is_tty():
        colour = {"DONE": "green", "FAIL": "red", "RUNNING": "yellow", "RETRY": "yellow"}.get(status, "white")
        from rich.markup import escape

        head, _, _ = text.rpartition(status)
        console().print(f"{escape(head)}[bold {colour}]{status}[/]")
    else:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
