"""The outcome journal of a Redis connection: a list per minute, running totals in a hash.

- ``<prefix>:stats:m:<minute>`` (minute = Unix time // 60, the recording host's clock): the
  minute's records (``forge.stats.records``), newest ``MAX_MINUTE_RECORDS`` kept, expiring
  after the retention;
- ``<prefix>:stats:totals``: the counters behind the Prometheus metrics, ``<queue>|done``,
  ``<queue>|runtime|<bucket>``, ``<queue>|runtime|sum`` and so on (``|`` is not allowed in a
  queue name), incremented with the record in one pipeline.
"""

from __future__ import annotations

import time
from typing import Any

from . import records as rec

#: Records kept per minute (the newest): about 100,000 a minute, bounded in memory.
MAX_MINUTE_RECORDS = 100_000


class RedisJournal:
    def __init__(self, backend: Any, retention: float) -> None:
        self.backend = backend
        self.retention = retention

    def _minute_key(self, minute: int) -> str:
        return self.backend._key("stats", "m", str(minute))

    def write(self, line: bytes, record: rec.Record) -> None:
        b = self.backend
        key = self._minute_key(int(time.time() // 60))
        totals = b._key("stats", "totals")
        q = record[1]
        with b._io():
            pipe = b._r.pipeline(transaction=True)
            pipe.rpush(key, line)
            pipe.ltrim(key, -MAX_MINUTE_RECORDS, -1)
            pipe.expire(key, int(self.retention) + 120)
            pipe.hincrby(totals, f"{q}|{record[3]}", 1)
            for name, value in (("wait", record[5]), ("runtime", record[6])):
                if value is not None:
                    pipe.hincrby(totals, f"{q}|{name}|{rec.bucket_index(float(value))}", 1)
                    pipe.hincrbyfloat(totals, f"{q}|{name}|sum", float(value))
            pipe.execute()

    def read(self, since: float, until: float) -> list[rec.Record]:
        b = self.backend
        minutes = range(int(since // 60) - 1, int(until // 60) + 2)
        out: list[rec.Record] = []
        with b._io():
            pipe = b._r.pipeline(transaction=False)
            for m in minutes:
                pipe.lrange(self._minute_key(m), 0, -1)
            for lines in pipe.execute():
                if lines:
                    out += [r for r in rec.decode_lines(b"\n".join(lines)) if since <= r[0] <= until]
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
