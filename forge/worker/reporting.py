"""How a worker tells people and log shippers what it does: Laravel-style status lines on a
terminal or in a log, or one JSON object per event (``--json``).
"""

from __future__ import annotations

import contextlib
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

_COLOURS = {"DONE": "32", "FAIL": "31", "RUNNING": "33", "RETRY": "33"}
_WORDS = {"done": "DONE", "failed": "FAIL", "released": "RETRY"}


def console_reporter(json_out: bool, verbose: bool = False) -> Callable[[TextIO], Reporter]:
    """A factory of reporters writing to a stream: Laravel-style lines for people (with
    ``verbose``, every event), or one JSON object per event for log shippers (``json_out``).
    A reporter never raises for a stream that cannot be written (a closed pipe)."""

    def make(stream: TextIO) -> Reporter:
        return JsonLines(stream) if json_out else StatusLines(stream, verbose=verbose)

    return make


def _writer(stream: TextIO) -> Callable[[str], None]:
    """Write one line and flush it; a stream that cannot be written loses the line."""

    def emit(text: str) -> None:
        with contextlib.suppress(OSError, ValueError):
            stream.write(text + "\n")
            stream.flush()

    return emit


class JsonLines:
    """One JSON object per event: ``{"event": NAME, "ts": UNIX_TIME, **data}``."""

    def __init__(self, stream: TextIO) -> None:
        import json

        self._dumps = json.dumps
        self._emit = _writer(stream)

    def __call__(self, event: str, data: dict[str, Any]) -> None:
        """Write the event as one line of JSON (values JSON cannot hold as their ``str``)."""
        self._emit(self._dumps({"event": event, "ts": time.time(), **data}, default=str))


class StatusLines:
    """Laravel-style lines: a status line when a job starts and ends, a sentence for the
    worker's own events, the rest only when ``verbose``. Colours on a terminal only."""

    def __init__(self, stream: TextIO, *, verbose: bool = False) -> None:
        from forge.output import is_tty, status_line

        self.tty = is_tty(stream)
        self.verbose = verbose
        self._emit = _writer(stream)
        self._status_line = status_line
        self._second = -1
        self._stamp = ""
        self._lines: dict[str, Callable[[str, dict[str, Any]], None]] = {
            "starting": self._starting, "done": self._finished, "failed": self._finished,
            "released": self._finished, "worker_started": self._worker_started, "stopping": self._stopping,
            "backend_unavailable": self._backend_unavailable, "record_failed": self._record_failed,
            "maintenance_failed": self._maintenance_failed, "backend_available": self._backend_available,
            "quarantined": self._quarantined, "listener_failed": self._listener, "listener_slow": self._listener,
            "events_failed": self._listener, "worker_stopped": self._worker_stopped, "paused": self._paused,
            "resumed": self._paused,
        }

    def __call__(self, event: str, data: dict[str, Any]) -> None:
        """Write the lines ``event`` has (none for an event only ``verbose`` shows)."""
        line = self._lines.get(event)
        if line is not None:
            line(event, data)
        elif event.startswith("schedule_"):  # queue:work --schedule
            detail = data.get("job_id") or data.get("error") or ""
            self._say(f"Schedule {data.get('entry', '')} [{data.get('tick', '')}]: {event[9:]} {detail}".rstrip())
        elif self.verbose and event == "maintenance":
            done = ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in data.items() if v)
            self._say(f"Maintenance: {done}.")
        elif self.verbose:
            detail = ", ".join(f"{k}={v}" for k, v in data.items())
            self._say(event.replace("_", " ") + (f": {detail}" if detail else ""))

    # -- the parts of a line -------------------------------------------------------------------

    def _when(self, t: float) -> str:
        """``t`` as local time; two lines a job, thousands a second: each second formatted once."""
        second = int(t)
        if self._second != second:
            self._second, self._stamp = second, datetime.fromtimestamp(second).strftime("%Y-%m-%d %H:%M:%S")
        return self._stamp

    def _say(self, text: str) -> None:
        """A line of the worker's own: the time now, then ``text``."""
        self._emit(f"{self._when(time.time())} {text}")

    def _status(self, when: str, data: dict[str, Any], word: str, detail: str = "") -> None:
        """A job's status line: ``when id queue command ..... detail WORD``."""
        name = f"{str(data.get('job_id', ''))[:8]} {data.get('queue', '')} {data['command']}"
        text = self._status_line(when, name, word, detail)
        if self.tty:
            text = text[: -len(word)] + f"\x1b[1;{_COLOURS[word]}m{word}\x1b[0m"
        self._emit(text)

    # -- one method per event ------------------------------------------------------------------

    def _starting(self, event: str, data: dict[str, Any]) -> None:
        self._status(self._when(data["started"]), data, "RUNNING")

    def _finished(self, event: str, data: dict[str, Any]) -> None:
        """done, failed, released: the status line, and for a failure its reason and error."""
        detail = f"{data['duration_ms']:.0f} ms" if "duration_ms" in data else ""
        self._status(self._when(time.time()), data, _WORDS[event], detail)
        if event != "done" and data.get("error"):
            again = data.get("retry_in")
            later = "" if again is None else f" (runs again in {format_duration(again)}" + (
                ", this attempt not counted)" if data.get("counted") is False else ")")
            self._emit(f"    {data.get('reason')}: {data['error']}{later}")

    def _worker_started(self, event: str, data: dict[str, Any]) -> None:
        queues = data["queues"]
        order = " (in this order)" if len(queues) > 1 else ""
        where = f" on connection {data['connection']}: {data['location']}" if data.get("connection") else ""
        self._say(f"Processing jobs from queue{'s' if len(queues) > 1 else ''} {', '.join(queues)}{order}{where}."
                  f" Worker {data['name']}.")

    def _stopping(self, event: str, data: dict[str, Any]) -> None:
        # On a fresh line: a terminal has just echoed ^C after the last one.
        self._emit(("\n" if self.tty else "") + f"{self._when(time.time())} Finishing {data['job_id'][:8]} "
                   f"{data['command']}; press Ctrl-C again (or send another SIGTERM) to stop now.")

    def _backend_unavailable(self, event: str, data: dict[str, Any]) -> None:
        retry = data.get("retry_in")
        self._say(f"Queue unavailable: {data['error']}" + (f" (retrying in {retry:.1f} s)" if retry else ""))

    def _record_failed(self, event: str, data: dict[str, Any]) -> None:
        self._say(f"Cannot record a job's outcome: {data['error']} (the job stays claimed; retrying until it lands)")

    def _maintenance_failed(self, event: str, data: dict[str, Any]) -> None:
        self._say(f"Queue maintenance failed: {data['error']} (retrying at the next round)")

    def _backend_available(self, event: str, data: dict[str, Any]) -> None:
        self._say("Queue available again.")

    def _quarantined(self, event: str, data: dict[str, Any]) -> None:
        count = data["count"]
        self._say(f"{count} job file{'s' if count != 1 else ''} in quarantine ({data['where']}):"
                  " see the .reason file beside each.")

    def _listener(self, event: str, data: dict[str, Any]) -> None:
        """A listener failed or was slow, or storing listener jobs failed (forge.events)."""
        if event == "listener_slow":
            what = (f"took {data['ms']:.0f} ms, over its {data['budget_ms']:.0f} ms budget"
                    + ("; cut off" if data.get("cut_off") else ""))
        else:
            what = f"failed: {data.get('error')}"
        who = f"Listener {data['listener']}" if data.get("listener") else "Storing listener jobs"
        self._say(f"{who} for {data.get('event_name')} {what} (the job's outcome is unchanged).")

    def _worker_stopped(self, event: str, data: dict[str, Any]) -> None:
        jobs = data["jobs"]
        where = f" ({data['location']})" if data.get("location") else ""
        why = STOP_TEXT.get(data["reason"], data["reason"])
        self._say(f"Worker stopped: {why}, after {jobs} job{'' if jobs == 1 else 's'}{where}.")

    def _paused(self, event: str, data: dict[str, Any]) -> None:
        self._say(f"Worker {event}" + (" (SIGCONT resumes it)." if event == "paused" else "."))
