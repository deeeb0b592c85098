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

import functools
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from forge.stats import records as rec

if TYPE_CHECKING:
    from forge.backends.redis.server import Server

#: A minute's records stop here (about 100,000 records), as in the file journal.
MAX_MINUTE_BYTES = 12 * 1024 * 1024
#: A window of more minutes than this (two days, past the default retention) is read from
#: the minute keys that exist (a SCAN), not by asking for every minute it spans.
SCAN_OVER = 2 * 1440


@functools.cache
def journaled_source(body: str) -> str:
    """One script made of two (``scripts/stats_journal.lua`` and ``scripts/<body>.lua``), each
    run as a function after the shared prelude: ``stats_journal`` (which records only while the
    claim holds, so exactly when the outcome will take effect), then ``body`` (``finish`` or
    ``ack_claim``). ARGV: P, the eleven of ``stats_journal``, then those of ``body`` after its P
    (so a body with a variable tail, ``ack_claim``'s queues, keeps its own numbering)."""
    from forge.backends.redis import lua

    return (lua.prelude()
            + "\nlocal function main_body(ARGV)\n" + lua.SCRIPTS[body].body + "\nend\n"
            + "local function journal_body(ARGV)\n" + lua.STATS_JOURNAL.body + "\nend\n"
            + f"local J, M = {{}}, {{ARGV[1]}}\nfor i = 1, {1 + JOURNAL_ARGS} do J[i] = ARGV[i] end\n"
            + f"for i = {2 + JOURNAL_ARGS}, #ARGV do M[#M + 1] = ARGV[i] end\n"
            + "journal_body(J)\nreturn main_body(M)\n")


#: How many arguments ``stats_journal`` takes after P (``RedisJournal.args``).
JOURNAL_ARGS = 11


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
                         line: bytes, record: rec.Record) -> Any:
        """Run the backend's ``body`` script (``finish`` or ``ack_claim``) and journal its outcome
        in one atomic script (``journaled_source``): recorded once, and only if the outcome takes
        effect. Returns what ``body`` returned."""
        srv = self.server
        jargs = self.args(line, record, job_id, token)
        assert len(jargs) == JOURNAL_ARGS
        with srv.io():
            return srv.c.script(journaled_source(body), srv.prefix, *jargs, *body_args)

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
