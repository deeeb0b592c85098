"""Pure helpers of the Redis backend: its Lua scripts, unique-key names, microseconds, shared
limits, and the translation of Redis client errors into forge's queue errors.

The scripts live in ``scripts.lua`` next to this module (shipped as package data). Each
starts at a marker line ``-- @script <name>``; the comment lines right after the marker
document its KEYS and ARGV and are not sent to the server, and every script is sent with the
``prelude`` section in front of it.
"""

from __future__ import annotations

import functools
import os
import re

from forge.config import mask_url
from forge.errors import DispatchFailed, QueueError, QueueUnavailable

SCRIPTS_FILE = "scripts.lua"
LOG_CAP = 1024 * 1024
#: Ids fetched per round trip when listing.
CHUNK = 100
_MARKER = re.compile(r"^-- @script ([a-z_]+)[ \t]*\n", re.M)
_UNAVAILABLE_REPLIES = ("BUSY", "LOADING", "READONLY", "MASTERDOWN", "NOAUTH", "WRONGPASS",
                        "NOPERM", "CLUSTERDOWN", "TRYAGAIN", "NOREPLICAS")


def us(seconds: float) -> int:
    """Seconds as integer microseconds (how times cross the Lua boundary)."""
    return int(round(seconds * 1_000_000))


def hash_key(key: str) -> str:
    """The name of a unique key inside Redis (``P:unique:<this>``)."""
    import hashlib  # only a dispatch with a unique key needs it (2 ms to import)

    return hashlib.sha256(key.encode()).hexdigest()[:40]


@functools.cache
def load_scripts(promote_batch: int) -> dict[str, str]:
    """Script name -> the Lua source to register (prelude, then the script's body), read once
    from ``scripts.lua``. ``PROMOTE_BATCH`` in the prelude becomes ``promote_batch``."""
    try:  # a plain file next to this module (importlib.resources costs milliseconds to import)
        with open(os.path.join(os.path.dirname(__file__), SCRIPTS_FILE), encoding="utf-8") as fh:
            text = fh.read()
    except OSError:  # installed as a zip, say
        from importlib import resources

        text = resources.files(__package__).joinpath(SCRIPTS_FILE).read_text(encoding="utf-8")
    parts = _MARKER.split(text)
    bodies: dict[str, str] = {}
    for name, section in zip(parts[1::2], parts[2::2], strict=True):
        if name in bodies:
            raise ValueError(f"{SCRIPTS_FILE}: script {name!r} is defined twice")
        lines = section.splitlines(keepends=True)
        while lines and lines[0].startswith("--"):  # the script's documentation
            del lines[0]
        bodies[name] = "\n" + "".join(lines).rstrip("\n") + "\n"
    prelude = bodies.pop("prelude").replace("PROMOTE_BATCH", str(promote_batch))
    return {name: prelude + body for name, body in bodies.items()}


def translate(exc: Exception, where: str, dispatch: bool, url_from: str = "forge.toml") -> QueueError:
    """One line a user can act on; the URL's password never appears. ``url_from`` says where
    the URL came from (``forge.toml``, ``$FORGE_REDIS_URL``, ...), for the hint to fix it there."""
    from forge.backends.redis import resp as _resp

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
