"""A claim whose reply is lost (the server ran it, then the connection died) must not orphan the
job it took: found by the multi-host test of a Redis crash (tests/test_hosts.py), where such a
job sat reserved by no one until its lease lapsed and then failed "abandoned" without ever
running (tries = 1). A TCP proxy between the client and the real Redis drops the reply of
exactly one claim, as a crash between the server's fsync and its reply does."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlparse

import pytest
from fdwait import readable

from forge.backends.redis.backend import RedisBackend
from forge.errors import QueueUnavailable
from forge.job import Event, Job

WORKER = "lost-reply-worker"


class Proxy:
    """Forwards TCP to Redis; ``drop_claim()`` makes it forward the next claim request and then
    cut that connection before the reply; ``refuse`` makes it close new connections at once."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.refuse = False
        self.dropped = threading.Event()
        self._drop = False
        self._open: list[socket.socket] = []
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def drop_claim(self) -> None:
        self.dropped.clear()
        self._drop = True

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.refuse:
                client.close()
                continue
            server = socket.create_connection(self.target)
            self._open += [client, server]
            threading.Thread(target=self._pump, args=(client, server), daemon=True).start()

    def _pump(self, client: socket.socket, server: socket.socket) -> None:
        try:
            while True:
                ready = readable([client, server], 1.0)
                for s in ready:
                    data = s.recv(65536)
                    if not data:
                        return
                    if s is client:
                        server.sendall(data)
                        if self._drop and WORKER.encode() in data:  # the claim script's request
                            self._drop = False
                            server.recv(65536)  # the server ran it: throw its reply away
                            self.dropped.set()
                            return
                    else:
                        client.sendall(data)
        except OSError:
            return
        finally:
            client.close()
            server.close()

    def close(self) -> None:
        self._stop = True
        self.listener.close()
        for s in self._open:
            s.close()


@pytest.fixture
def proxied(redis_url: str, redis_prefix: str) -> Iterator[tuple[Proxy, RedisBackend, Any]]:
    u = urlparse(redis_url)
    proxy = Proxy(u.hostname or "127.0.0.1", u.port or 6379)
    backend = RedisBackend(f"redis://127.0.0.1:{proxy.port}{u.path or '/0'}", prefix=redis_prefix, connect_timeout=2)
    direct = RedisBackend(redis_url, prefix=redis_prefix)
    try:
        yield proxy, backend, direct
    finally:
        backend.close()
        direct.close()
        proxy.close()


def _jobs(n: int) -> list[Job]:
    from forge.queue import QueuedCommand

    return [QueuedCommand("demo:sleep").with_args([str(i)]).to_job("default") for i in range(n)]


def test_a_claim_retried_after_its_reply_was_lost_gets_the_job_it_took(proxied: Any) -> None:
    proxy, backend, direct = proxied
    jobs = _jobs(3)
    direct.push(jobs)
    proxy.drop_claim()
    c = backend.claim(["default"], WORKER, 60)  # the client's retry gets an answer
    assert proxy.dropped.is_set()
    assert c is not None and c.job.id == jobs[0].id and c.attempt == 1
    (st,) = direct.stats(["default"])
    assert (st.reserved, st.size) == (1, 2), "no job left reserved by no one"
    info = direct.find(jobs[0].id)
    assert info.attempts == 1 and [e.event for e in info.events] == ["claimed"]
    backend.ack(c, Event("done", 1, time.time(), worker=WORKER))
    nxt = backend.claim(["default"], WORKER, 60)
    assert nxt is not None and nxt.job.id == jobs[1].id  # a new claim takes the next job


def test_the_next_claim_after_an_outage_gets_the_job_a_lost_reply_took(proxied: Any) -> None:
    proxy, backend, direct = proxied
    jobs = _jobs(2)
    direct.push(jobs)
    proxy.refuse = True  # the client's retries find no server ...
    proxy.drop_claim()
    # ... once the first connection (opened now, before refusing bites) loses its reply.
    proxy.refuse = False
    backend.server.c.call("PING")  # the hot path's own connection
    proxy.refuse = True
    with pytest.raises(QueueUnavailable):
        backend.claim(["default"], WORKER, 60)
    assert proxy.dropped.is_set()
    assert direct.find(jobs[0].id).attempts == 1  # the server ran that claim
    proxy.refuse = False
    c = backend.claim(["default"], WORKER, 60)
    assert c is not None and c.job.id == jobs[0].id and c.attempt == 1
    (st,) = direct.stats(["default"])
    assert (st.reserved, st.size) == (1, 1)
