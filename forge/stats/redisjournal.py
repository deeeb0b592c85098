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
from typing import Any

from . import records as rec

#: A minute's records stop here (about 100,000 records), as in the file journal.
MAX_MINUTE_BYTES = 12 * 1024 * 1024


@functools.cache
def finish_journaled_source() -> str:
    """One script made of two in redis_scripts.lua, each run as a function: ``stats_journal``
    (which records only while the claim holds, so exactly when ``finish`` will take effect),
    then ``finish``. ARGV: P, the eight of ``finish``, then the eleven of ``stats_journal``."""
    from importlib import resources

    from ..backends import _redis_helpers as h
    from ..backends.redis import PROMOTE_BATCH

    text = resources.files("forge.backends").joinpath(h.SCRIPTS_FILE).read_text(encoding="utf-8")
    parts = h._MARKER.split(text)
    bodies = {name: "".join(x for x in body.splitlines(keepends=True) if not x.startswith("--"))
              for name, body in zip(parts[1::2], parts[2::2], strict=True)}
    prelude = bodies["prelude"].replace("PROMOTE_BATCH", str(PROMOTE_BATCH))
    return (prelude
            + "\nlocal function finish_body()\n" + bodies["finish"] + "\nend\n"
            + "local function journal_body(ARGV)\n" + bodies["stats_journal"] + "\nend\n"
            + "local J = {ARGV[1]}\nfor i = 10, #ARGV do J[#J + 1] = ARGV[i] end\n"
            + "journal_body(J)\nreturn finish_body()\n")


class RedisJournal:
    def __init__(self, backend: Any, retention: float) -> None:
        self.backend = backend
        self.retention = retention

    def _minute_key(self, minute: int) -> str:
        return self.backend._key("stats", "m", str(minute))

    def args(self, line: bytes, record: rec.Record, job_id: str = "", token: str = "") -> list[Any]:
        """The ``stats_journal`` script's arguments after P (see redis_scripts.lua)."""
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
        with self.backend._io():
            self.backend._run("stats_journal", *self.args(line, record))

    def finish_and_write(self, finish_args: Sequence[Any], job_id: str, token: str,
                         line: bytes, record: rec.Record) -> bool:
        """Run the backend's ``finish`` script and journal its outcome in one atomic script
        (``finish_journaled``): recorded once, and only if the finish takes effect. Returns
        what ``finish`` returned."""
        b = self.backend
        script = getattr(b, "_forge_finish_journaled", None)
        if script is None:
            script = b._forge_finish_journaled = b._r.register_script(finish_journaled_source())
        with b._io():
            return bool(script(keys=[], args=[b.prefix, *finish_args, *self.args(line, record, job_id, token)]))

    def read(self, since: float, until: float) -> list[rec.Record]:
        b = self.backend
        minutes = range(int(since // 60) - 1, int(until // 60) + 2)
        out: list[rec.Record] = []
        with b._io():
            pipe = b._r.pipeline(transaction=False)
            for m in minutes:
                pipe.get(self._minute_key(m))
            for data in pipe.execute():
                if data:
                    out += [r for r in rec.decode_lines(data) if since <= r[0] <= until]
        return out

    def totals(self) -> dict[str, rec.QueueTotals]:
        b = self.backend
        with b._io():
            raw = b._r.hgetall(b._key("stats", "totals"))
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
        pass
