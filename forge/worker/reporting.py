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

from forge.durations import format_duration

#: How the stop line says why a worker stopped.
STOP_TEXT = {"empty": "the queues are empty", "once": "--once", "max_jobs": "--max-jobs reached",
             "max_time": "--max-time reached", "memory": "over --memory", "restart": "queue:restart asked",
             "signal": "asked to stop", "forced": "forced to stop", "unavailable": "the queue is unavailable"}

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
        from forge.output import status_line

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

        def job_name(data: dict[str, Any]) -> str:
            return f"{str(data.get('job_id', ''))[:8]} {data.get('queue', '')} {data['command']}"

        def now() -> str:
            return when(time.time())

        def report_human(event: str, data: dict[str, Any]) -> None:
            if event == "starting":
                status(when(data["started"]), job_name(data), "RUNNING")
            elif event in ("done", "failed", "released"):
                word = {"done": "DONE", "failed": "FAIL", "released": "RETRY"}[event]
                detail = f"{data['duration_ms']:.0f} ms" if "duration_ms" in data else ""
                status(now(), job_name(data), word, detail)
                if event != "done" and data.get("error"):
                    again = data.get("retry_in")
                    later = "" if again is None else f" (runs again in {format_duration(again)}" + (
                        ", this attempt not counted)" if data.get("counted") is False else ")")
                    emit(f"    {data.get('reason')}: {data['error']}{later}")
            elif event == "worker_started":
                queues = ", ".join(data["queues"])
                order = " (in this order)" if len(data["queues"]) > 1 else ""
                where = f" on connection {data['connection']}: {data['location']}" if data.get("connection") else ""
                emit(f"{now()} Processing jobs from queue{'s' if len(data['queues']) > 1 else ''} {queues}{order}{where}."
                     f" Worker {data['name']}.")
            elif event == "stopping":
                # On a fresh line: a terminal has just echoed ^C after the last one.
                emit(("\n" if tty else "") + f"{now()} Finishing {data['job_id'][:8]} {data['command']};"
                     " press Ctrl-C again (or send another SIGTERM) to stop now.")
            elif event == "backend_unavailable":
                retry = data.get("retry_in")
                emit(f"{now()} Queue unavailable: {data['error']}" + (f" (retrying in {retry:.1f} s)" if retry else ""))
            elif event == "record_failed":
                emit(f"{now()} Cannot record a job's outcome: {data['error']} (the job stays claimed; "
                     f"retrying until it lands)")
            elif event == "maintenance_failed":
                emit(f"{now()} Queue maintenance failed: {data['error']} (retrying at the next round)")
            elif event == "backend_available":
                emit(f"{now()} Queue available again.")
            elif event == "quarantined":
                emit(f"{now()} {data['count']} job file{'s' if data['count'] != 1 else ''} in quarantine"
                     f" ({data['where']}): see the .reason file beside each.")
            elif event in ("listener_failed", "listener_slow", "events_failed"):  # forge.events
                if event == "listener_slow":
                    what = (f"took {data['ms']:.0f} ms, over its {data['budget_ms']:.0f} ms budget"
                            + ("; cut off" if data.get("cut_off") else ""))
                else:
                    what = f"failed: {data.get('error')}"
                who = f"Listener {data['listener']}" if data.get("listener") else "Storing listener jobs"
                emit(f"{now()} {who} for {data.get('event_name')} {what} (the job's outcome is unchanged).")
            elif event.startswith("schedule_"):  # queue:work --schedule
                detail = data.get("job_id") or data.get("error") or ""
                emit(f"{now()} Schedule {data.get('entry', '')} [{data.get('tick', '')}]: {event[9:]} {detail}".rstrip())
            elif event == "worker_stopped":
                jobs = data["jobs"]
                where = f" ({data['location']})" if data.get("location") else ""
                why = STOP_TEXT.get(data["reason"], data["reason"])
                emit(f"{now()} Worker stopped: {why}, after {jobs} job{'' if jobs == 1 else 's'}{where}.")
            elif event in ("paused", "resumed"):
                emit(f"{now()} Worker {event}" + (" (SIGCONT resumes it)." if event == "paused" else "."))
            elif verbose and event == "maintenance":
                done = ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in data.items() if v)
                emit(f"{now()} Maintenance: {done}.")
            elif verbose:
                detail = ", ".join(f"{k}={v}" for k, v in data.items())
                emit(f"{now()} {event.replace('_', ' ')}" + (f": {detail}" if detail else ""))

        return report_human

    return make
