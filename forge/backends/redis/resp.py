"""A small synchronous Redis client (RESP2) for the Redis backend's hot path.

``import redis`` costs 80-150 ms in a fresh process (redis-py 5+ imports its asyncio client,
cluster and observability modules eagerly), which doubled the cost of one ``forge
queue:dispatch`` on Redis, and each redis-py call spends tens of microseconds of Python on
pools, retries and response callbacks. The backend's hot path needs only a few commands
(``EVALSHA`` of its scripts, ``BLPOP``, ``TIME``, ``GET``, ``SET``, ``EXISTS``, ``ZRANGE``...),
so it speaks the protocol itself: encode a command, send it, parse the reply. Everything else
(listing, flushing, the scheduler's transactions) keeps using redis-py, imported on first use.

What it does, as redis-py is configured by the backend: connect and socket timeouts, TCP
keep-alive and no Nagle delay, ``AUTH`` (user and password from the URL or the connection's
password) and ``SELECT`` on connect, a ``PING`` before a command on a connection idle for
over 30 s (redis-py's health check), and a few reconnects with jittered exponential backoff
when a connection fails or times out (every script of the backend is safe to send again after
a lost reply; see ``scripts/``). A connection made before a ``fork()`` is never used
by the child. Connections are pooled per client (taken and given back; never shared by two
threads at once).

URLs it takes: ``redis://[[user]:password@]host[:port][/db]`` and
``unix://[[user]:password@]/path/to/socket[?db=N]``, with query keys ``db``, ``password`` and
``username`` only. For anything else (``rediss://`` TLS, other redis-py URL options)
``parse_url`` returns None and the backend uses redis-py for every call, as before.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

#: A connection idle this long is PINGed before its next command (redis-py's health check).
HEALTH_CHECK = 30.0
_QUERY_KEYS = {"db", "password", "username"}


class RespError(Exception):
    """Base of this client's errors (the backend turns them into forge's queue errors)."""


class ReplyError(RespError):
    """The server answered with an error reply (``-ERR ...``, ``-BUSY ...``, ``-OOM ...``)."""


class ConnectionFailed(RespError):
    """No connection (refused, reset, closed, authentication refused)."""


class ReplyTimeout(RespError):
    """The server did not answer (or accept the connection) in time."""


class ProtocolFailed(RespError):
    """Something answered, but not in Redis's protocol."""


@dataclass(frozen=True)
class Address:
    """Where and how to connect: a TCP host and port or a unix socket ``path``, the database
    to ``SELECT``, and the ``AUTH`` credentials (None: no ``AUTH``)."""

    host: str = "127.0.0.1"
    port: int = 6379
    path: str | None = None  # a unix socket
    db: int = 0
    username: str | None = None
    password: str | None = None

    @property
    def where(self) -> str:
        """The address as error messages name it (``host:port`` or the socket's path)."""
        return self.path if self.path else f"{self.host}:{self.port}"


def parse_url(url: str, password: str | None = None) -> Address | None:
    """The address of a ``redis://`` or ``unix://`` URL; None when it needs redis-py."""
    try:
        parts = urlsplit(url)
        query = parse_qs(parts.query, strict_parsing=False) if parts.query else {}
        if set(query) - _QUERY_KEYS or any(len(v) != 1 for v in query.values()) or parts.fragment:
            return None
        user = unquote(parts.username) if parts.username else None
        secret = unquote(parts.password) if parts.password is not None else None
        if "username" in query:
            user = query["username"][0]
        if "password" in query:
            secret = query["password"][0]
        if password is not None:
            secret = password
        db_text = query["db"][0] if "db" in query else ""
        if parts.scheme == "redis":
            path = parts.path.strip("/")
            if path and not db_text:
                db_text = path
            elif path:
                return None
            db = int(db_text or 0)
            return Address(host=parts.hostname or "127.0.0.1", port=parts.port or 6379, db=db,
                           username=user, password=secret)
        if parts.scheme == "unix" and parts.path:
            return Address(path=parts.path, db=int(db_text or 0), username=user, password=secret)
    except ValueError:  # a bad port or db: redis-py gives the exact error
        return None
    return None


def encode(args: Sequence[Any]) -> bytes:
    """One command in RESP (an array of bulk strings): bytes as they are, str as UTF-8, ints
    in decimal, anything else as its ``repr``."""
    return b"*%d\r\n%s" % (len(args), bulks(args))


def bulks(args: Sequence[Any]) -> bytes:
    """``args`` as RESP bulk strings, one after the other (``encode`` without the array's
    header: what follows a cached head, ``Client.fcall``)."""
    out = []
    for a in args:
        t = type(a)
        if t is str:
            b = a.encode()
        elif t is bytes:
            b = a
        elif t is int:
            b = b"%d" % a
        elif isinstance(a, bytes):
            b = bytes(a)
        elif isinstance(a, str):
            b = str(a).encode()
        elif isinstance(a, int):
            b = b"%d" % a
        else:
            b = repr(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


class _Conn:
    def __init__(self, addr: Address, connect_timeout: float, timeout: float) -> None:
        self.pid = os.getpid()
        try:
            if addr.path:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(connect_timeout)
                try:
                    sock.connect(addr.path)
                except BaseException:
                    sock.close()
                    raise
            else:
                # bytes: a str host is IDNA-encoded first, which imports two modules
                host = addr.host.encode() if addr.host.isascii() else addr.host
                sock = socket.create_connection((host, addr.port), timeout=connect_timeout)  # type: ignore[arg-type]
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        except TimeoutError:
            raise ReplyTimeout(f"Timeout connecting to {addr.where}") from None
        except OSError as exc:
            code = f"Error {exc.errno} " if exc.errno else "Error "
            raise ConnectionFailed(f"{code}connecting to {addr.where}. {exc.strerror or exc}.") from None
        sock.settimeout(timeout)
        self.sock = sock
        self.file = sock.makefile("rb")
        self.timeout = timeout
        self.where = addr.where
        self.used = time.monotonic()
        try:
            if addr.password is not None:
                auth = ("AUTH", addr.username, addr.password) if addr.username else ("AUTH", addr.password)
                self._handshake(auth)
            if addr.db:
                self._handshake(("SELECT", addr.db))
        except BaseException:
            self.close()
            raise

    def _handshake(self, cmd: tuple[Any, ...]) -> None:
        reply = self.roundtrip([cmd])[0]
        if isinstance(reply, ReplyError):
            raise ConnectionFailed(str(reply))

    def roundtrip(self, cmds: Sequence[Sequence[Any]], timeout: float | None = None) -> list[Any]:
        """Send commands in one write, read their replies (error replies as ReplyError values)."""
        return self.exchange(b"".join([encode(c) for c in cmds]), len(cmds), timeout)

    def exchange(self, data: bytes, n: int, timeout: float | None = None) -> list[Any]:
        """Send ``data`` (``n`` commands in RESP) in one write, read their ``n`` replies."""
        try:
            if timeout is not None:
                self.sock.settimeout(timeout)
            self.sock.sendall(data)
            replies = [self._read() for _ in range(n)]
            if timeout is not None:
                self.sock.settimeout(self.timeout)
        except TimeoutError:
            raise ReplyTimeout(f"Timeout reading from {self.where}") from None
        except OSError as exc:
            raise ConnectionFailed(f"Error {exc.errno} while writing to or reading from {self.where}."
                                   f" {exc.strerror or exc}.") from None
        self.used = time.monotonic()
        return replies

    def _read(self, line: bytes | None = None) -> Any:
        """One reply (``line``: its first line, read already)."""
        if line is None:
            line = self.file.readline()
        if not line.endswith(b"\r\n"):
            if not line:
                raise ConnectionFailed(f"Connection closed by server ({self.where}).")
            raise ProtocolFailed(f"Protocol Error: {line[:60]!r}")
        kind, rest = line[:1], line[1:-2]
        if kind == b"$":
            return self._bulk(int(rest))
        if kind == b"*":
            n = int(rest)
            if n < 0:
                return None
            out: list[Any] = []
            for _ in range(n):  # bulk strings and integers read here, other kinds by _read
                line = self.file.readline()
                kind = line[:1]
                if kind == b"$" and line.endswith(b"\r\n"):
                    out.append(self._bulk(int(line[1:-2])))
                elif kind == b":" and line.endswith(b"\r\n"):
                    out.append(int(line[1:-2]))
                else:
                    out.append(self._read(line))
            return out
        if kind == b":":
            return int(rest)
        if kind == b"+":
            return rest
        if kind == b"-":
            return ReplyError(rest.decode("utf-8", "replace"))
        raise ProtocolFailed(f"Protocol Error: {line[:60]!r}")

    def _bulk(self, n: int) -> bytes | None:
        if n < 0:
            return None
        data = self.file.read(n + 2)
        if len(data) != n + 2:
            raise ConnectionFailed(f"Connection closed by server ({self.where}).")
        return data[:-2]

    def close(self) -> None:
        for part in (self.file, self.sock):
            try:
                part.close()
            except OSError:
                pass


class Client:
    """Commands to one Redis server over pooled connections (see the module's docstring)."""

    def __init__(self, addr: Address, *, connect_timeout: float, timeout: float, retries: int) -> None:
        self.addr = addr
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self.retries = retries
        self._idle: list[_Conn] = []
        self._shas: dict[str, str] = {}  # script source -> SHA1
        self._heads: dict[tuple[str, str], bytes] = {}  # (function, prefix) -> encoded (fcall)

    def _take(self) -> _Conn:
        pid = os.getpid()
        while self._idle:
            try:
                conn = self._idle.pop()
            except IndexError:  # another thread took the last one
                break
            if conn.pid != pid:  # made before a fork: the parent's, never touch it
                self._idle.clear()
                break
            if time.monotonic() - conn.used > HEALTH_CHECK:
                try:
                    if conn.roundtrip([("PING",)])[0] != b"PONG":
                        raise ConnectionFailed("no PONG")
                except RespError:
                    conn.close()
                    continue
            return conn
        return _Conn(self.addr, self.connect_timeout, self.timeout)

    def pipeline(self, cmds: Sequence[Sequence[Any]], timeout: float | None = None) -> list[Any]:
        """Replies to ``cmds``, sent in one write (error replies as ReplyError values, not
        raised); reconnects and sends them again up to ``retries`` times."""
        return self.exchange(b"".join([encode(c) for c in cmds]), len(cmds), timeout)

    def exchange(self, data: bytes, n: int, timeout: float | None = None, retries: int | None = None) -> list[Any]:
        """``pipeline`` of ``n`` commands encoded already (``data``); ``retries``: this call's
        own (default: the client's)."""
        retries = self.retries if retries is None else retries
        attempt = 0
        while True:
            conn: _Conn | None = None
            try:
                conn = self._take()
                replies = conn.exchange(data, n, timeout)
            except (ConnectionFailed, ReplyTimeout):
                if conn is not None:
                    conn.close()
                if attempt >= retries:
                    raise
                attempt += 1
                import random

                time.sleep(random.uniform(0, min(0.5, 0.05 * 2 ** attempt)))
                continue
            except BaseException:  # a protocol error, or a signal mid-reply: the stream is unusable
                if conn is not None:
                    conn.close()
                raise
            self._idle.append(conn)
            return replies

    def fcall(self, function: str, prefix: str, args: Sequence[Any], quick: float | None = None) -> Any:
        """The reply to ``FCALL function 0 prefix *args`` (an error reply as a ReplyError value,
        as ``pipeline``'s): the command's head is encoded once per function and prefix.
        ``quick``: this call's reply timeout, and no retry (``Server.run``)."""
        head = self._heads.get((function, prefix))
        if head is None:
            head = self._heads[(function, prefix)] = bulks(("FCALL", function, 0, prefix))
        data = b"*%d\r\n%s%s" % (len(args) + 4, head, bulks(args))
        if quick is not None:
            return self.exchange(data, 1, quick, 0)[0]
        return self.exchange(data, 1)[0]

    def call(self, *args: Any, timeout: float | None = None) -> Any:
        """One command's reply (as ``pipeline``); an error reply is raised as ``ReplyError``."""
        reply = self.pipeline([args], timeout)[0]
        if isinstance(reply, ReplyError):
            raise reply
        return reply

    def script(self, source: str, *args: Any, quick: float | None = None) -> Any:
        """Run a Lua script by its SHA (EVALSHA), loading it once per server (on NOSCRIPT).

        A script's first call in this process is an EVAL (which the server caches too): a
        one-shot process, such as a CLI dispatch, then never imports hashlib (2 ms).
        ``quick``: as ``fcall``'s."""
        retries = None if quick is None else 0
        sha = self._shas.get(source)
        if sha is None:
            self._shas[source] = ""
            reply = self.exchange(encode(("EVAL", source, 0, *args)), 1, quick, retries)[0]
            if isinstance(reply, ReplyError):
                raise reply
            return reply
        if not sha:
            import hashlib

            sha = self._shas[source] = hashlib.sha1(source.encode()).hexdigest()
        reply = self.exchange(encode(("EVALSHA", sha, 0, *args)), 1, quick, retries)[0]
        if isinstance(reply, ReplyError) and str(reply).startswith("NOSCRIPT"):
            # A restarted or flushed server: EVAL runs it and caches it again.
            reply = self.exchange(encode(("EVAL", source, 0, *args)), 1, quick, retries)[0]
        if isinstance(reply, ReplyError):
            raise reply
        return reply

    def close(self) -> None:
        """Close the idle connections this process made (never a parent's, after a fork)."""
        pid = os.getpid()
        while self._idle:
            conn = self._idle.pop()
            if conn.pid == pid:
                conn.close()
