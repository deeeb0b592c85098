"""Child-process scripts shared by the tests and the benchmarks (run with ``python -c``)."""

from __future__ import annotations

#: argv: queue directory, stop-file path, queue name. Claims and acknowledges until the stop
#: file exists and the queue is empty; prints the claimed job ids, one per line.
CLAIMER = """
import os, sys, time
from forge.backends.file.backend import FileBackend
from forge.job import Event
b = FileBackend(sys.argv[1])
stop, queue = sys.argv[2], sys.argv[3]
got = []
while True:
    c = b.claim([queue], str(os.getpid()), 60)
    if c is None:
        if os.path.exists(stop):
            c = b.claim([queue], str(os.getpid()), 60)
            if c is None:
                break
        else:
            b.wait([queue], 0.05)
            continue
    got.append(c.job.id)
    b.ack(c, Event("done", c.attempt, time.time()))
print("\\n".join(got))
"""
