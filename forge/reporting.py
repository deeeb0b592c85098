"""How a worker tells people and log shippers what it does: Laravel-style status lines on a
terminal or in a log, or one JSON object per event (``--json``).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any, TextIO

#: Receives each worker event: its name and its data.
Reporter = Callable[[str, dict[str, Any]], None]


def console_reporter(json_out: bool, verbose: bool = False) -> Callable[[TextIO], Reporter]:
    """Laravel-style lines for people, or one JSON object per event for log shippers."""
    import json

    def make(stream: TextIO) -> Reporter:
        try:
            tty = stream.isatty() and os.environ.get("TERM") != "dumb"
        except (AttributeError, ValueError):
            tty = False

        def emit(text: str) -> None:
            with contextlib.suppress(OSError, ValueError):
                stream.write(text + "\n")
                stream.flush()

        if json_out:
            def report_json(event: str, data: dict[str, Any]) -> None:
                emit(json.dumps({"event": event, "ts": time.time(), **data}, default=str))

            return report_json

        colours = {"DONE": "32", "FAIL": "31", "RUNNING": "33", "RETRY": "33"}
        from .output import status_line

        def status(when: str, name: str, word: str, detail: str = "") -> None:
            text = status_line(when, name, word, detail)
            if tty:
                text = text[: -len(word)] + f"\x1b[1;{colours[word]}m{word}\x1b[0m"
            emit(text)

        stamp: list[Any] = [None, ""]

        def when(t: float) -> str:  # two lines a job, thousands a second: format each second once
            second = int(t)
            if stamp[0] != second:
                stamp[:] = [second, datetime.fromtimestamp(second).strftime("%Y-%m-%d %H:%M:%S")]
            return str(stamp[1])

        def report_human(event: str, data: dict[str, Any]) -> None:
            if event == "starting":
                status(when(data["started"]), data["command"], "RUNNING")
            elif event in ("done", "failed", "released"):
                word = {"done": "DONE", "failed": "FAIL", "released": "RETRY"}[event]
                detail = f"{data['duration_ms']:.0f} ms" if "duration_ms" in data else ""
                status(when(time.time()), data["command"], word, detail)
                if event != "done" and data.get("error"):
                    emit(f"    {data.get('reason')}: {data['error']}")
            elif event == "backend_unavailable":
                retry = data.get("retry_in")
                emit(f"Queue unavailable: {data['error']}" + (f" (retrying in {retry:.1f} s)" if retry else ""))
            elif event == "record_failed":
                emit(f"Cannot record a job's outcome: {data['error']} (the job stays claimed; "
                     f"retrying until it lands)")
            elif event == "maintenance_failed":
                emit(f"Queue maintenance failed: {data['error']} (retrying at the next round)")
            elif event == "backend_available":
                emit("Queue available again.")
            elif event.startswith("schedule_"):  # queue:work --schedule
                detail = data.get("job_id") or data.get("error") or ""
                emit(f"Schedule {data.get('entry', '')} [{data.get('tick', '')}]: {event[9:]} {detail}".rstrip())
            elif event == "worker_stopped":
                emit(f"Worker stopped ({data['reason']}) after {data['jobs']} jobs.")
            elif event in ("paused", "resumed") or (verbose and event in ("maintenance", "worker_started")):
                emit(f"{event}: {data}")

        return report_human

    return make
