"""Starting the dashboard: the listen address, the socket, the start-up lines, uvicorn."""

from __future__ import annotations

import errno
import os
import re
import socket
import sys
from dataclasses import dataclass

from forge.dashboard.security import MIN_TOKEN, Guard, host_header, is_loopback, is_wildcard
from forge.errors import ForgeError, UsageError

DEFAULT_LISTEN = "127.0.0.1:8765"
TOKEN_ENV = "FORGE_DASHBOARD_TOKEN"


@dataclass(frozen=True)
class Listen:
    """Where the dashboard listens: a host name or IP address, and a port (0: any free port)."""

    host: str
    port: int


def parse_listen(text: str) -> Listen:
    """``HOST:PORT``, ``[V6]:PORT``, ``:PORT`` or ``PORT`` (host 127.0.0.1)."""
    value = text.strip()
    host, port = "127.0.0.1", value
    if value.startswith("["):
        inner, sep, rest = value[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise UsageError(f"Invalid --listen {text!r}: expected HOST:PORT, e.g. 127.0.0.1:8765 or [::1]:8765.")
        host, port = inner, rest[1:] if rest else "8765"
    elif ":" in value:
        host, _, port = value.rpartition(":")
        host = host or "127.0.0.1"
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UsageError(f"Invalid --listen {text!r}: the port must be a number from 0 to 65535, e.g. 127.0.0.1:8765.")
    return Listen(host, int(port))


def bind(listen: Listen) -> socket.socket:
    """A listening TCP socket on ``listen`` (SO_REUSEADDR, inheritable). Raises UsageError for a
    host that does not resolve, ForgeError (naming the address) when the port is in use or cannot
    be bound."""
    family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
    try:
        infos = socket.getaddrinfo(listen.host, listen.port, family if ":" in listen.host else socket.AF_UNSPEC,
                                   socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UsageError(f"Cannot listen on {listen.host!r}: {exc.strerror}. Give an IP address or a local name.") from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        where = host_header(listen.host, listen.port)
        if exc.errno == errno.EADDRINUSE:
            raise ForgeError(f"Cannot listen on {where}: the port is in use.",
                             hint="Pick another with --listen=127.0.0.1:PORT.") from None
        raise ForgeError(f"Cannot listen on {where}: {exc.strerror}.") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def token_from_env() -> str | None:
    """The token set in FORGE_DASHBOARD_TOKEN, or None when it is not set. Raises UsageError for
    a token too short or with a character a URL or cookie would change."""
    token = os.environ.get(TOKEN_ENV)
    if token is None:
        return None
    # It goes into the printed URL's query and into a cookie as it is: '&', '#', '+', '%', ';'
    # and the like would cut or change it there, and the printed URL would never let one in.
    if len(token) < MIN_TOKEN or not _TOKEN_CHARS.fullmatch(token):
        raise UsageError(f"{TOKEN_ENV} must be at least {MIN_TOKEN} characters from A-Z a-z 0-9 - _ . ~ "
                         "(e.g. python3 -c 'import secrets; print(secrets.token_urlsafe(32))').")
    return token


_TOKEN_CHARS = re.compile(r"[A-Za-z0-9._~-]+")


def run(*, listen: str, connection: str | None, allow_actions: bool, allow_hosts: tuple[str, ...] = ()) -> int:
    """Serve the dashboard until SIGINT/SIGTERM."""
    import uvicorn

    from forge import output
    from forge.dashboard.app import build_app
    from forge.queue.manager import QueueManager
    from forge.registry.runner import default_registry

    where = parse_listen(listen)
    manager = QueueManager(connection, registry=default_registry())
    location = manager.location
    token = token_from_env()
    sock = bind(where)
    port = sock.getsockname()[1]
    guard = Guard(where.host, port, allow_actions=allow_actions, extra_hosts=allow_hosts,
                  **({"token": token} if token else {}))
    app = build_app(manager, guard)
    try:  # a store that cannot be reached fails here, with forge's own message; and it warms
        app.state.dashboard.views.overview()  # the listings and the schedule for the first page
    except BaseException:
        sock.close()
        raise
    mode = "actions allowed (retry, forget, cancel, pause, resume, clear)" if allow_actions else \
        "read-only (start with --allow-actions to retry, cancel or clear)"
    output.info(f"forge dashboard for {location}: {mode}.")
    if is_loopback(where.host):
        output.info(f"Listening on {host_header(where.host, port)} (this machine only).")
    else:
        what = "every interface" if is_wildcard(where.host) else where.host
        output.warn(f"Listening on {host_header(where.host, port)}, {what}: anyone who can reach this "
                    "address and has the token can read job arguments and output (there is no TLS).")
    sys.stdout.write(f"Open {guard.url()}\n")
    sys.stdout.flush()
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                            timeout_graceful_shutdown=2, proxy_headers=False, server_header=False)
    server = uvicorn.Server(config)
    import warnings

    # Ctrl-C in the instant before the event loop starts leaves uvicorn's coroutine unstarted:
    # that is a stop, not something to warn about.
    warnings.filterwarnings("ignore", message="coroutine 'Server.serve' was never awaited")
    server.run(sockets=[sock])
    return 0
