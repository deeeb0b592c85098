"""The outcome journal of a Redis connection: a list per minute, running totals in a hash.

- ``<prefix>:stats:m:<minute>`` (minute = Unix time // 60, the recording host's clock): a
  string of the minute's records (``forge.stats.records``, one a line), which stops growing at
  ``MAX_MINUTE_BYTES`` (as a file journal's minute does) and expires after the retention; a
  string rather than a list, so a window of 100,000 records is a few replies, not 100,000;
- ``<prefix>:stats:totals``: the counters behind the Prometheus metrics, ``<queue>|done``,
  ``<queue>|runtime|<bucket>``, ``<queue>|runtime|sum`` and so on (``|`` is not allowed in a
  queue name), incremented with the record in one pipeline.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from forge.backends.redis.lua import JOURNAL_ARGS
from forge.stats import records as rec

if TYPE_CHECKING:
    from forge.backends.redis.server import Server

#: A minute's records stop here (about 100,000 records), as in the file journal.
MAX_MINUTE_BYTES = 12 * 1024 * 1024
#: A window of more minutes than this (two days, past the default retention) is read from
#: the minute keys that exist (a SCAN), not by asking for every minute it spans.
SCAN_OVER = 2 * 1440


class RedisJournal:
    """The journal (``forge.stats.journal.Journal``) of a ``RedisBackend``, in its server under
    its prefix; records are kept ``retention`` seconds (plus two minutes)."""

    def __init__(self, backend: Any, retention: float) -> None:
        self.backend = backend
        self.server: Server = backend.server
        self.retention = retention

    def _minute_key(self, minute: int) -> str:
        return self.server.key("stats", "m", str(minute))

    def args(self, line: bytes, record: rec.Record, job_id: str = "", token: str = "") -> list[Any]:
        """The ``stats_journal`` script's arguments after P (see ``scripts/stats_journal.lua``)."""
        q, out = record[1], []
        for name, value in (("wait", record[5]), ("runtime", record[6])):
            if value is None:
                out += ["", ""]
            else:
                out += [f"{q}|{name}|{rec.bucket_index(float(value))}", repr(float(value))]
        return [str(int(time.time() // 60)), line, MAX_MINUTE_BYTES, int(self.retention) + 120,
                f"{q}|{record[3]}", *out, job_id, token]

    def write(self, line: bytes, record: rec.Record) -> None:
        """Record unconditionally (one script run, one round trip)."""
        from forge.backends.redis import lua

        with self.server.io():
            self.server.run(lua.STATS_JOURNAL, *self.args(line, record))

    def finish_and_write(self, body: str, body_args: Sequence[Any], job_id: str, token: str,
                         line: bytes, record: rec.Record, *, quick: bool = False) -> Any:
        """Run the backend's ``body`` script (``finish`` or ``ack_claim``) and journal its outcome
        in one atomic script (``lua.JOURNALED``: ``stats_journal``, which records only while the
        claim holds, so exactly when the outcome will take effect, then ``body``): recorded
        once, and only if the outcome takes effect. Returns what ``body`` returned."""
        srv = self.server
        jargs = self.args(line, record, job_id, token)
        assert len(jargs) == JOURNAL_ARGS
        from forge.backends.redis import lua

        with srv.io():
            return srv.run(lua.JOURNALED[body], *jargs, *body_args, quick=quick)

    def read(self, since: float, until: float) -> list[rec.Record]:
        """The records with ``since <= t <= until`` (one pipeline of the minutes' keys)."""
        srv = self.server
        minutes: Sequence[int] = range(int(since // 60) - 1, int(until // 60) + 2)
        out: list[rec.Record] = []
        with srv.io():
            if len(minutes) > SCAN_OVER:  # --since=30d: list the minutes that exist rather
                minutes = self._existing(minutes[0], minutes[-1])  # than GET 43,200 keys (36,000d: 52 million)
            pipe = srv.r.pipeline(transaction=False)
            for m in minutes:
                pipe.get(self._minute_key(m))
            for data in pipe.execute():
                if data:
                    out += [r for r in rec.decode_lines(data) if since <= r[0] <= until]
        return out

    def _existing(self, first: int, last: int) -> list[int]:
        """The minutes from ``first`` to ``last`` that have a key (one SCAN of the keys)."""
        head = self._minute_key(0)[:-1]
        pattern = "".join("\\" + c if c in "*?[]\\" else c for c in head) + "*"
        raw, found = head.encode(), []
        for key in self.server.r.scan_iter(match=pattern, count=5000):
            tail = key[len(raw):] if isinstance(key, bytes) else key[len(head):].encode()
            if tail.isdigit() and first <= int(tail) <= last:
                found.append(int(tail))
        return sorted(found)

    def totals(self) -> dict[str, rec.QueueTotals]:
        """Per-queue totals over all history (one HGETALL)."""
        srv = self.server
        with srv.io():
            raw = srv.r.hgetall(srv.key("stats", "totals"))
        out: dict[str, rec.QueueTotals] = {}
        for k, v in raw.items():
            parts = k.decode().split("|")
            t = out.get(parts[0])
            if t is None:
                t = out[parts[0]] = rec.QueueTotals()
            try:
                if len(parts) == 2 and parts[1] in rec.OUTCOMES:
                    setattr(t, parts[1], int(v))
                elif len(parts) == 3 and parts[1] in ("wait", "runtime"):
                    h = getattr(t, parts[1])
                    if parts[2] == "sum":
                        h.sum = float(v)
                    elif 0 <= int(parts[2]) < len(h.counts):
                        h.counts[int(parts[2])] = int(v)
            except ValueError:
                continue
        return out

    def close(self) -> None:
        """Nothing to close: the connection is the backend's."""
