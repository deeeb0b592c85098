"""The one object every part of the Redis backend works through: a ``Server`` holds the
connection's settings and key layout, the hot path's client, redis-py (made on first use),
the clock offset to the server, and the translation of client errors into forge's queue errors.

The hot path (dispatch, claim, outcomes, heartbeats, the idle wait, the worker's record) goes
through ``forge.backends.redis.resp``, forge's own RESP client: one round trip a call, scripts
run by SHA, and no redis-py import (80-150 ms) for a dispatch or a worker. Listings and the
other management operations use redis-py (``Server.r``), imported on first use. For URLs the
RESP client does not take (``rediss://``, other options) redis-py makes every call
(``PyClient``), with the same raw replies.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Sequence
from typing import Any, Literal, Protocol

from forge.backends.redis import lua
from forge.backends.redis import resp as _resp
from forge.backends.redis.layout import Layout
from forge.backends.redis.lua import Script
from forge.backends.retention import DONE_RETENTION
from forge.config import mask_url
from forge.errors import ConfigError, DispatchFailed, QueueError, QueueUnavailable

#: Longest a lease runs without a heartbeat (it is shorter when the job's deadline is nearer).
LEASE_WINDOW = 30.0
#: Longest a ``quick`` call (``Server.run``) waits for its reply (the supervisor's socket timeout).
QUICK_TIMEOUT = 1.0
#: Longest single BLPOP; the worker simply waits again. Below the socket timeout.
BLOCK_CAP = 5.0
#: How long a measured clock offset to the server is used before it is measured again.
SKEW_TTL = 60.0
_SCHEMES = ("redis://", "rediss://", "unix://")
_UNAVAILABLE_REPLIES = ("BUSY", "LOADING", "READONLY", "MASTERDOWN", "NOAUTH", "WRONGPASS",
                        "NOPERM", "CLUSTERDOWN", "TRYAGAIN", "NOREPLICAS")


class HotClient(Protocol):
    """What the hot path asks of a client: ``resp.Client``, or ``PyClient`` over redis-py.
    Replies are raw (bytes, ints, lists); a pipeline's error replies are values, not raised."""

    def call(self, *args: Any, timeout: float | None = None) -> Any:
        """One command's reply; an error reply is raised."""

    def pipeline(self, cmds: Sequence[Sequence[Any]], timeout: float | None = None) -> list[Any]:
        """The replies to ``cmds``, sent in one write."""

    def script(self, source: str, *args: Any, quick: float | None = None) -> Any:
        """Run a Lua script (by its SHA once loaded) with ``args`` as ARGV and no KEYS;
        ``quick``: a reply timeout of its own and no retry."""

    def fcall(self, function: str, prefix: str, args: Sequence[Any], quick: float | None = None) -> Any:
        """The reply to ``FCALL function 0 prefix *args``; an error reply as a value."""

    def close(self) -> None:
        """Close the client's connections (those made in this process)."""


class Server:
    """One Redis server (or primary) and key prefix, as the backend's parts share it.

    Raises ``ConfigError`` for a bad URL or prefix."""

    def __init__(self, url: str, *, prefix: str = "forge", done_retention: float = DONE_RETENTION,
                 connect_timeout: float = 5.0, password: str | None = None,
                 quick: bool = False, lease_window: float | None = None) -> None:
        if not isinstance(url, str) or not url.startswith(_SCHEMES):
            raise ConfigError(
                f"Invalid Redis URL {mask_url(str(url))!r}: expected redis://, rediss:// or unix://."
            )
        if not prefix or any(c.isspace() or c in "*?[]" for c in prefix):
            raise ConfigError(f"Invalid Redis key prefix {prefix!r}.")
        self.url = url
        self.layout = Layout(prefix)
        self.prefix = prefix
        self.done_retention = done_retention
        self.lease_window = LEASE_WINDOW if lease_window is None else lease_window
        self.where = f"Redis at {mask_url(url)}"
        #: Where the URL came from, for the hint to fix it there (``RedisBackend.from_connection``).
        self.url_from = "forge.toml"
        #: (monotonic time, value of P:restart) read with an idle wait's wake-up (``wake``).
        self.restart_cache: tuple[float, Any] | None = None
        self.quick = quick
        self._skew: float | None = None  # see clock
        self._skew_at = 0.0
        self._connect_timeout = connect_timeout
        self._password = password
        self._redispy: Any = None  # redis-py's client, made on first use (see r)
        #: Whether the server runs the scripts as Functions (``run``): None until a call says.
        self.functions: bool | None = None
        self._io = (_Translated(self, False), _Translated(self, True))
        addr = _resp.parse_url(url, password)
        self.c: HotClient
        if addr is None:  # TLS or options only redis-py knows: it makes every call
            self.c = PyClient(self.r)
        else:
            self.c = _resp.Client(addr, connect_timeout=connect_timeout, timeout=self.socket_timeout,
                                  retries=0 if quick else 2)

    @property
    def socket_timeout(self) -> float:
        """How long a reply may take. ``quick``: for a caller that must never block long (the
        worker's supervisor, which has to kill a job before its lease lapses; it never waits)."""
        return QUICK_TIMEOUT if self.quick else max(BLOCK_CAP + 5.0, 2 * self._connect_timeout)

    @property
    def r(self) -> Any:
        """redis-py's client, for the operations outside the hot path (imported on first use).

        Raises ``ConfigError`` if redis-py refuses the URL."""
        if self._redispy is None:
            import redis
            from redis.backoff import ExponentialWithJitterBackoff
            from redis.retry import Retry

            options: dict[str, Any] = {
                "socket_connect_timeout": self._connect_timeout,
                "socket_timeout": self.socket_timeout,
                "socket_keepalive": True,
                "health_check_interval": 30,
                # A few quick reconnects, then the caller hears QueueUnavailable. Every script is
                # safe to re-run after a lost reply: push is idempotent per job id, and the
                # outcome scripts are fenced by the claim token.
                "retry": Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), 0 if self.quick else 2),
            }
            if self._password is not None:
                options["password"] = self._password
            try:
                self._redispy = redis.Redis.from_url(self.url, **options)
            except ValueError as exc:
                raise ConfigError(f"Invalid Redis URL {mask_url(self.url)!r}: {mask_url(str(exc))}") from None
        return self._redispy

    def key(self, *parts: str) -> str:
        """The key ``P:part:...`` (``Layout.key``)."""
        return self.layout.key(*parts)

    def io(self, dispatch: bool = False) -> _Translated:
        """A context in which Redis client errors are turned into forge's queue errors
        (``translate``: ``QueueUnavailable``, or ``DispatchFailed`` for a refused dispatch),
        password masked. (A class, not a generator: it is on every call's path.)"""
        return self._io[dispatch]

    def run(self, script: Script, *args: Any, quick: bool = False) -> Any:
        """Run ``script`` with ARGV = prefix, ``args``: an ``FCALL`` of its function on Redis 7+
        (the library loaded on the first "Function not found": a new or restarted server, or a
        new version of forge), else by its SHA (``EVALSHA``, loaded on NOSCRIPT). Raises the
        client's errors (call it inside ``io``). ``quick``: a call made while a job runs, which
        must not hold up the worker's watch over it: the reply waits ``QUICK_TIMEOUT`` at most
        and a lost connection is not retried (the caller tries again later)."""
        wait = QUICK_TIMEOUT if quick else None
        if self.functions is False:
            return self.c.script(script.source, self.prefix, *args, quick=wait)
        reply = self.c.fcall(script.function, self.prefix, args, wait)
        if isinstance(reply, Exception):
            if not self.load_functions(reply):
                return self.c.script(script.source, self.prefix, *args, quick=wait)  # an older server
            reply = self.c.fcall(script.function, self.prefix, args, wait)
            if isinstance(reply, Exception):
                raise reply
        self.functions = True
        return reply

    def command(self, script: Script, *args: Any) -> tuple[Any, ...]:
        """The command that runs ``script`` (as ``run`` would) inside a pipeline; its reply is
        an error (``missing_script``) if the server does not hold it yet."""
        if self.functions is False:
            return ("EVALSHA", script.sha, 0, self.prefix, *args)
        return ("FCALL", script.function, 0, self.prefix, *args)

    @staticmethod
    def missing_script(reply: Any) -> bool:
        """Whether ``reply`` (of a ``command``) says the server does not hold the script yet, or
        cannot call functions: the next ``run`` loads it (or finds the other way)."""
        text = str(reply)
        return (isinstance(reply, Exception)
                and ("NOSCRIPT" in text or "Function not found" in text or "unknown command" in text))

    def load_functions(self, error: Exception) -> bool:
        """After ``error`` answered an ``FCALL``: load the library (``FUNCTION LOAD``) and
        return True, or return False (and run scripts by EVAL from now on) if this server has
        no Functions (before Redis 7) or refuses to load them. Raises ``error`` if it is not
        about the function (a script's own error, an outage)."""
        text = str(error)
        if ("unknown command" in text or "NOPERM" in text) and ("FCALL" in text or "fcall" in text):
            self.functions = False  # no FCALL here, or an ACL that allows EVALSHA but not FCALL
            return False
        if "Function not found" not in text:
            raise error
        name, source = lua.library()
        loaded = self.c.pipeline([("FUNCTION", "LOAD", source)])[0]
        if isinstance(loaded, Exception) and "already exists" not in str(loaded):
            if "unknown command" in str(loaded) or "NOPERM" in str(loaded) or "no permissions" in str(loaded):
                self.functions = False  # FCALL there, FUNCTION LOAD not allowed: EVAL instead
                return False
            raise loaded
        return True

    def clock(self) -> float:
        """The server's clock minus ours (seconds): from the fastest of three ``TIME`` round
        trips, measured again every minute. Kept steady in between, so a time converted to
        the server's clock and back comes out unchanged."""
        if self._skew is None or time.monotonic() - self._skew_at > SKEW_TTL:
            samples = []
            for _ in range(3):
                before = time.time()
                sec, usec = self.c.call("TIME")
                after = time.time()
                samples.append((after - before, int(sec) + int(usec) / 1e6 - (before + after) / 2))
            self._skew, self._skew_at = min(samples)[1], time.monotonic()
        return self._skew

    def local(self, server_us: Any) -> float:
        """A server time in microseconds (as a Redis reply) on our clock, in seconds."""
        return float(server_us) / 1e6 - self.clock()

    def server_now(self) -> float:
        """Now on the server's clock (Unix seconds)."""
        return time.time() + self.clock()

    def close(self) -> None:
        """Close both clients' connections; never raises."""
        with contextlib.suppress(Exception):
            self.c.close()
        if self._redispy is not None:
            with contextlib.suppress(Exception):
                self._redispy.close()


class _Translated:
    """``Server.io``'s context: a client error raised inside comes out as ``translate`` makes it."""

    __slots__ = ("srv", "dispatch")

    def __init__(self, srv: Server, dispatch: bool) -> None:
        self.srv = srv
        self.dispatch = dispatch

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> Literal[False]:
        if exc is None or not isinstance(exc, Exception):
            return False
        if isinstance(exc, _resp.RespError) or _is_redispy_error(exc):
            srv = self.srv
            raise translate(exc, srv.where, self.dispatch, srv.url_from) from None
        return False


def raise_first(replies: list[Any]) -> list[Any]:
    """A pipeline's replies, or its first error reply raised."""
    for r in replies:
        if isinstance(r, Exception):
            raise r
    return replies


def _is_redispy_error(exc: Exception) -> bool:
    rx = sys.modules.get("redis.exceptions")
    return rx is not None and isinstance(exc, rx.RedisError)


def translate(exc: Exception, where: str, dispatch: bool, url_from: str = "forge.toml") -> QueueError:
    """One line a user can act on; the URL's password never appears. ``url_from`` says where
    the URL came from (``forge.toml``, ``$FORGE_REDIS_URL``, ...), for the hint to fix it there."""
    if isinstance(exc, _resp.RespError):
        kind = {_resp.ProtocolFailed: "protocol", _resp.ReplyTimeout: "timeout",
                _resp.ConnectionFailed: "connection"}.get(type(exc), "reply")
    else:  # redis-py's (only ever called with a redis error in hand)
        from redis import exceptions as rx

        kind = ("protocol" if isinstance(exc, rx.InvalidResponse) else "timeout" if isinstance(exc, rx.TimeoutError)
                else "connection" if isinstance(exc, rx.ConnectionError)
                else "reply" if isinstance(exc, rx.ResponseError) else "other")
    detail = mask_url(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__).rstrip(".")
    if "Protocol error: unauthenticated" in detail:  # a long command before AUTH (Redis 7+)
        kind, detail = "connection", "NOAUTH Authentication required"
    fix = f"fix the url in {url_from}" if url_from.startswith("$") else f"fix the connection's url in {url_from}"
    if kind == "protocol" or detail.startswith("Protocol Error"):
        # Something answers at the URL, but not in Redis's protocol (an HTTP server, say).
        answer = detail.split(":", 1)[1].strip() if detail.startswith("Protocol Error:") else detail
        msg = f"{where} is not a Redis server (it answered {answer})."
        if dispatch:
            msg += " Nothing was queued."
        return QueueUnavailable(msg, hint=f"Check the host and port, or {fix}.")
    if kind == "timeout":
        msg = f"{where} did not answer in time ({detail})."
        if dispatch:
            msg += " The job may or may not have been stored; nothing was half-written."
        return QueueUnavailable(msg, hint="Check the server's load, or raise connect_timeout.")
    if kind == "connection":  # includes authentication and loading errors
        return QueueUnavailable(f"{where} is unavailable: {detail}.",
                                hint=f"Start the server or {fix}.")
    if kind == "reply" and str(exc).split(" ", 1)[0].upper() in _UNAVAILABLE_REPLIES:
        return QueueUnavailable(f"{where} cannot serve the queue now: {detail}.")
    if dispatch:
        return DispatchFailed(f"{where} refused the job: {detail}.",
                              hint="Check the server's memory (maxmemory) and logs; nothing was queued.")
    return QueueUnavailable(f"{where} failed: {detail}.")


class PyClient:
    """The hot path's calls made by redis-py, for URLs ``resp`` does not take (``rediss://``,
    other options): the same replies as ``resp.Client`` (raw, no response callbacks)."""

    def __init__(self, client: Any) -> None:
        import redis

        self._r: Any = redis.Redis(connection_pool=client.connection_pool)
        self._r.response_callbacks.clear()  # raw replies, as RESP gives them
        self._scripts: dict[str, Any] = {}

    def call(self, *args: Any, timeout: float | None = None) -> Any:
        """One command's raw reply (``timeout`` is redis-py's socket timeout here)."""
        return self._r.execute_command(*args)

    def pipeline(self, cmds: Sequence[Sequence[Any]], timeout: float | None = None) -> list[Any]:
        """The replies to ``cmds`` in one pipeline (no transaction), error replies as values."""
        pipe = self._r.pipeline(transaction=False)
        for c in cmds:
            pipe.execute_command(*c)
        return list(pipe.execute(raise_on_error=False))

    def fcall(self, function: str, prefix: str, args: Sequence[Any], quick: float | None = None) -> Any:
        """``FCALL function 0 prefix *args`` (an error reply returned, as ``pipeline``'s;
        ``quick`` is redis-py's socket timeout here)."""
        return self.pipeline([("FCALL", function, 0, prefix, *args)])[0]

    def script(self, source: str, *args: Any, quick: float | None = None) -> Any:
        """Run ``source`` through redis-py's registered scripts (EVALSHA, NOSCRIPT handled;
        ``quick`` is redis-py's socket timeout here)."""
        script = self._scripts.get(source)
        if script is None:
            script = self._scripts[source] = self._r.register_script(source)
        return script(keys=[], args=list(args))

    def close(self) -> None:
        """Nothing to do: the pool is the backend's redis-py client's, closed with it."""
