"""The huey side of bench/peers.py: one RedisHuey and two trivial tasks.

Configured from the environment by bench/peers.py: PEERS_REDIS_URL, PEERS_HUEY_NAME (the key
prefix, unique per run, so flushing touches only this run's keys) and PEERS_LEDGER (where
``stamp`` appends its start time, as forge's probe:run does).
"""

import json
import os
import time

from huey import RedisHuey

huey = RedisHuey(os.environ.get("PEERS_HUEY_NAME", "forge-peers"),
                 url=os.environ.get("PEERS_REDIS_URL", "redis://127.0.0.1:6379/0"))


@huey.task()
def noop():
    return None


@huey.task()
def stamp(marker):
    start = time.time()
    line = json.dumps({"kind": "start", "args": [marker], "start": start})
    fd = os.open(os.environ["PEERS_LEDGER"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)
