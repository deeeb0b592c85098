"""Seeing the queue: ``queue:stats`` (throughput, failure rate, percentiles) and ``queue:metrics``
(the Prometheus text format). Both read the library (``forge.stats``, ``forge.stats.metrics``)."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from forge import output
from forge.cli.builtins._shared import JSON_VERSION, Connection, Json, fmt_time, manager
from forge.durations import format_duration, parse_duration
from forge.errors import UsageError

_BLOCKS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float]) -> str:
    """``values`` as a row of block characters (the highest is a full block; 0 a space)."""
    top = max(values, default=0)
    if top <= 0:
        return " " * len(values)
    return "".join(" " if v <= 0 else _BLOCKS[min(len(_BLOCKS) - 1, int(v / top * (len(_BLOCKS) - 1) + 0.5))]
                   for v in values)


def _secs(v: float | None) -> str:
    return "" if v is None else format_duration(v)


def _pcts(d: dict[str, Any]) -> str:
    if not d["count"]:
        return ""
    return " / ".join(_secs(d[k]) for k in ("p50", "p95", "p99"))


def _rate(x: float | None) -> str:
    return "" if x is None else f"{x * 100:.1f}%"


def _queues(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    names = [n.strip() for v in values for n in v.split(",") if n.strip()]
    return names or None


def stats(
    since: Annotated[str, typer.Option(help="The window: the last 15m, 1h, 24h...")] = "1h",
    queue: Annotated[list[str] | None, typer.Option("--queue", help="Only these queues (repeat, or a,b).")] = None,
    by: Annotated[str, typer.Option(help="Group by queue or by command.")] = "queue",
    json_out: Json = False,
    connection: Connection = None,
) -> None:
    """Throughput, failure rate, runtime and wait percentiles, retries and the oldest pending job's age.

    Computed from the recorded outcome of every attempt (kept 24 hours; FORGE_STATS_RETENTION
    in seconds changes it), so it reaches past done_retention and survives restarts.
    """
    from forge.stats import compute_stats
    from forge.stats.journal import retention

    window = parse_duration(since, what="--since")
    if window <= 0:
        raise UsageError(f"Invalid --since {since!r}: must be longer than 0, e.g. 1h.")
    if by not in ("queue", "command"):
        raise UsageError(f"Invalid --by {by!r}: use queue or command.")
    m = manager(connection)
    data = compute_stats(m, since=window, queues=_queues(queue), by=by)
    if json_out:
        output.print_json({"version": JSON_VERSION, "stats": data})
        return
    if window > retention():
        output.warn(f"Outcomes are kept for {format_duration(retention())}: older ones are not counted "
                    "(FORGE_STATS_RETENTION, in seconds, keeps them longer).")
    now = time.time()
    t = data["totals"]
    title = f"Last {format_duration(window)} (since {fmt_time(now - window)})"
    cols = [by, "done", "failed", "fail rate", "done/min", "retried", "runtime p50/p95/p99",
            "wait p50/p95/p99"]
    if by == "queue":
        cols += ["pending", "oldest pending"]
    rows = []
    for g in [*data["groups"], {by: "(all)", **t}] if len(data["groups"]) > 1 else data["groups"]:
        row = [g[by], g["done"], g["failed"], _rate(g["failure_rate"]), f"{g['done_per_minute']:g}", g["retried"],
               _pcts(g["runtime"]), _pcts(g["wait"])]
        if by == "queue":
            row += [g.get("pending", ""), _secs(g.get("oldest_pending_age"))]
        rows.append(row)
    if not rows:
        output.info(f"No jobs finished in the last {format_duration(window)} on {m.location}.")
        return
    output.table(cols, rows, title=title)
    if output.is_tty():
        series = data["series"]
        step = data["window"]["step_seconds"]
        output.line()
        output.line(f"done    {sparkline([p['done'] for p in series])}  per {format_duration(step)}, "
                    f"peak {max(p['done'] for p in series)}")
        output.line(f"failed  {sparkline([p['failed'] for p in series])}  peak {max(p['failed'] for p in series)}")
        output.line(f"wait    {sparkline([p['wait_p50'] or 0 for p in series])}  p50 per step")


def metrics(
    out: Annotated[Path | None, typer.Option("--output", "-o", help="Write to this file atomically (node_exporter's textfile collector) instead of stdout.")] = None,
    connection: Connection = None,
) -> None:
    """Print the queues' and workers' metrics in the Prometheus text format.

    For node_exporter's textfile collector, from cron: forge queue:metrics --output
    /var/lib/node_exporter/textfile/forge.prom (written to a temporary file, then renamed).
    """
    from forge.stats.metrics import render_metrics

    if out is not None and out.is_dir():
        raise UsageError(f"--output {out} is a directory; give a file name such as {out}/forge.prom.")
    data = render_metrics(manager(connection))
    if out is None:
        import sys

        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        return
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, out)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise UsageError(f"Cannot write --output {out}: {exc.strerror}.") from None
