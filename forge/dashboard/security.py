"""The dashboard's access rules, as one ASGI middleware in front of every route.

* **Token.** ``forge dashboard`` makes a random token (or takes ``FORGE_DASHBOARD_TOKEN``) and
  prints a URL holding it, as Jupyter does. Opening that URL sets an ``HttpOnly``,
  ``SameSite=Strict`` cookie and redirects to the same page without the token (it stays out of
  the history and of ``Referer``). Every page, the live stream and ``/metrics`` need the cookie
  or ``Authorization: Bearer <token>``: a loopback port is open to every user of the machine,
  and job arguments and output can hold secrets that the queue directory keeps private to its
  owner.
* **Host.** A request whose ``Host`` is not the address the dashboard listens on (or a
  loopback alias of it, an IP literal on a wildcard bind, or an ``--allow-host`` name) is
  refused: a DNS-rebinding page cannot reach it under its own name.
* **Actions** (any POST) exist only with ``--allow-actions``. They must come from the
  dashboard's own origin (``Origin`` and ``Sec-Fetch-Site`` checked; a cross-origin form post
  is refused before its body is read) and carry the CSRF token (a form field or the
  ``X-Forge-CSRF`` header, an HMAC of the session token) that only the dashboard's own pages
  hold. The cookie is ``SameSite=Strict`` on top.
* **Headers.** A strict Content-Security-Policy (scripts and styles only from the dashboard's
  own files, no inline script, no framing), ``X-Content-Type-Options: nosniff``,
  ``X-Frame-Options: DENY``, ``Referrer-Policy: same-origin`` (``no-referrer`` would make the browser send ``Origin: null`` with the dashboard's own form posts), and ``no-store`` on pages.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode

Scope = dict[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
MIN_TOKEN = 16
CSRF_FIELD = "csrf"
CSRF_HEADER = "x-forge-csrf"


def is_loopback(host: str) -> bool:
    """Whether ``host`` is ``localhost`` or a loopback IP address."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_wildcard(host: str) -> bool:
    """Whether ``host`` binds every interface (``0.0.0.0``, ``::`` or empty)."""
    return host in ("0.0.0.0", "::", "")


def _ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        return False


def host_header(host: str, port: int) -> str:
    """``host:port`` as a Host header writes it (an IPv6 address in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass
class Guard:
    """The secrets and names one dashboard checks requests against."""

    host: str
    port: int
    allow_actions: bool = False
    token: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    extra_hosts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.csrf = hmac.new(self.token.encode(), b"forge-dashboard-csrf", hashlib.sha256).hexdigest()
        self.cookie = f"forge_dashboard_{self.port}"  # cookies ignore ports: one name per dashboard
        self._hosts = self._allowed_hosts()

    def _allowed_hosts(self) -> set[str]:
        names = {self.host}
        if is_loopback(self.host) or is_wildcard(self.host):
            names |= {"localhost", "127.0.0.1", "::1"}
        if is_wildcard(self.host):
            names |= {socket.gethostname(), socket.getfqdn()}
        names |= set(self.extra_hosts)
        return {host_header(n, self.port).lower() for n in names if n} | {n.lower() for n in names if n}

    def host_ok(self, value: str) -> bool:
        """Whether a request's Host header ``value`` names this dashboard: one of its allowed
        names (with or without the port), or on a wildcard bind any IP literal with the right
        port or none."""
        value = value.lower()
        if value in self._hosts:
            return True
        if is_wildcard(self.host):  # an IP literal cannot be a rebinding name
            name, _, port = value.rpartition(":") if not value.endswith("]") else (value, "", "")
            return _ip_literal(name or value) and (not port or port == str(self.port))
        return False

    def token_ok(self, value: str | None) -> bool:
        """Whether ``value`` is the session token (compared in constant time)."""
        return bool(value) and hmac.compare_digest(value.encode(), self.token.encode())  # type: ignore[union-attr]

    def csrf_ok(self, value: str | None) -> bool:
        """Whether ``value`` is the CSRF token (compared in constant time)."""
        return bool(value) and hmac.compare_digest(value.encode(), self.csrf.encode())  # type: ignore[union-attr]

    def url(self, display_host: str | None = None) -> str:
        """The URL that opens the dashboard and sets its cookie: ``http://HOST:PORT/?token=...``,
        with ``display_host`` (else the bind address, 127.0.0.1 for a wildcard) as the host."""
        host = display_host or ("127.0.0.1" if is_wildcard(self.host) else self.host)
        return f"http://{host_header(host, self.port)}/?token={self.token}"


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


def _cookie(header: str, name: str) -> str | None:
    for part in header.split(";"):
        k, _, v = part.strip().partition("=")
        if k == name:
            return v
    return None


def _security_headers(path: str) -> list[tuple[bytes, bytes]]:
    out = [(b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
           (b"x-frame-options", b"DENY"), (b"referrer-policy", b"same-origin"),
           (b"cross-origin-opener-policy", b"same-origin"), (b"cross-origin-resource-policy", b"same-origin")]
    if not path.startswith("/static/"):
        out.append((b"cache-control", b"no-store"))
    return out


class GuardMiddleware:
    """Applies ``Guard`` to every HTTP request (see the module docstring)."""

    def __init__(self, app: ASGIApp, guard: Guard, unauthorized: Callable[[Scope], bytes]) -> None:
        self.app = app
        self.guard = guard
        self.unauthorized = unauthorized

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        """Serve one ASGI request through the guard: a wrong Host is a 400; ``?token=`` sets the
        cookie and redirects without it (401 if wrong); every non-static path needs the token
        (401); a POST must pass the action checks (403). Every response gets the security
        headers."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        g = self.guard
        path = scope.get("path", "/")
        headers = _headers(scope)
        extra = _security_headers(path)

        async def reply(status: int, body: bytes, ctype: bytes = b"text/plain; charset=utf-8",
                        more: Iterable[tuple[bytes, bytes]] = ()) -> None:
            await send({"type": "http.response.start", "status": status,
                        "headers": [(b"content-type", ctype), (b"content-length", str(len(body)).encode()),
                                    *extra, *more]})
            await send({"type": "http.response.body", "body": body})

        if not g.host_ok(headers.get("host", "")):
            await reply(400, b"Host not allowed: open the dashboard at the address it printed "
                             b"(or start it with --allow-host NAME).\n")
            return
        method = scope.get("method", "GET")
        query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
        if method == "GET" and "token" in query:
            if not g.token_ok(query.get("token")):
                await reply(401, self.unauthorized(scope), b"text/html; charset=utf-8")
                return
            rest = {k: v for k, v in query.items() if k != "token"}
            location = path + ("?" + urlencode(rest) if rest else "")
            cookie = f"{g.cookie}={g.token}; Path=/; HttpOnly; SameSite=Strict"
            await reply(303, b"", more=[(b"location", location.encode()), (b"set-cookie", cookie.encode())])
            return
        if not path.startswith("/static/"):
            bearer = headers.get("authorization", "")
            supplied = bearer[7:] if bearer.lower().startswith("bearer ") else _cookie(headers.get("cookie", ""), g.cookie)
            if not g.token_ok(supplied):
                await reply(401, self.unauthorized(scope), b"text/html; charset=utf-8")
                return
        if method not in ("GET", "HEAD"):
            problem = self._post_problem(headers)
            if problem:
                await reply(403, problem.encode() + b"\n")
                return

        started = time.perf_counter()

        async def send_with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                # Server-Timing: what the request cost the server up to its first byte (bench/dashboard.py).
                took = f"app;dur={(time.perf_counter() - started) * 1000:.1f}".encode()
                message = {**message, "headers": [*message.get("headers", []), *extra, (b"server-timing", took)]}
            await send(message)

        await self.app(scope, receive, send_with_headers)

    def _post_problem(self, headers: dict[str, str]) -> str | None:
        """Why this POST must be refused before its body is read, or None."""
        if not self.guard.allow_actions:
            return "The dashboard is read-only: start it with --allow-actions to retry, cancel or clear."
        site = headers.get("sec-fetch-site")
        if site is not None and site not in ("same-origin", "none"):
            return f"Refused a {site} request: actions are only taken from the dashboard's own pages."
        origin = headers.get("origin")
        if origin is None or origin == "null" or origin.lower() != f"http://{headers.get('host', '')}".lower():
            return "Refused a request from another origin: actions are only taken from the dashboard's own pages."
        return None
