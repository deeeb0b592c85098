"""The Redis backend's server-side Lua scripts: one file per script in ``scripts/``.

``scripts/<name>.lua`` is the script ``name``; its leading comment lines document its KEYS,
ARGV and reply and are not sent to the server. Every script is sent after two shared parts,
in this order:

1. the constants the scripts share, as Lua locals written from the Python constants here
   (``local PROMOTE_BATCH = 1000``), so a number is defined once, in Python;
2. ``scripts/prelude.lua`` (the prefix ``P = ARGV[1]``, key helpers, the server clock and the
   state transitions several scripts share), which is not a script of its own.

Each script is a ``Script`` constant below (``PUSH``, ``CLAIM``...), the only way the backend
names one (``Server.run``), so a test can check that every file is used and every used
script exists (``tests/test_redis_scripts.py``). A source is read from disk once per process,
on its first use; the client runs it by SHA (EVALSHA, loaded again on NOSCRIPT:
``forge.backends.redis.resp.Client.script``).
"""

from __future__ import annotations

import os

#: Due delayed jobs one promotion moves to their pending list (``promote`` in the prelude).
PROMOTE_BATCH = 1000
#: The directory of the script files, next to this module (shipped as package data).
SCRIPTS_DIR = "scripts"
#: The shared part sent before every script (``scripts/prelude.lua``).
PRELUDE = "prelude"

_texts: dict[str, str] = {}


def read(name: str) -> str:
    """The code of ``scripts/<name>.lua`` without its leading comment lines (cached).

    Raises ``FileNotFoundError`` if there is no such file."""
    text = _texts.get(name)
    if text is None:
        filename = f"{name}.lua"
        try:  # a plain file next to this module (importlib.resources costs milliseconds to import)
            with open(os.path.join(os.path.dirname(__file__), SCRIPTS_DIR, filename), encoding="utf-8") as fh:
                raw = fh.read()
        except FileNotFoundError:  # installed as a zip, say
            from importlib import resources

            raw = resources.files(__package__).joinpath(SCRIPTS_DIR, filename).read_text(encoding="utf-8")
        lines = raw.splitlines(keepends=True)
        start = 0
        while start < len(lines) and lines[start].startswith("--"):
            start += 1
        text = _texts[name] = "".join(lines[start:]).rstrip("\n") + "\n"
    return text


def prelude() -> str:
    """What every script is sent after: the shared constants, then ``scripts/prelude.lua``."""
    return f"local PROMOTE_BATCH = {PROMOTE_BATCH}\n" + read(PRELUDE)


class Script:
    """One server-side script, ``scripts/<name>.lua``; its ``source`` is what the server runs."""

    __slots__ = ("name", "_source")

    def __init__(self, name: str) -> None:
        self.name = name
        self._source: str | None = None

    @property
    def body(self) -> str:
        """The script's own code (without the prelude), read on first use."""
        return read(self.name)

    @property
    def source(self) -> str:
        """The full source sent to the server: the prelude, then the body (built once)."""
        source = self._source
        if source is None:
            source = self._source = prelude() + self.body
        return source

    def __repr__(self) -> str:
        return f"Script({self.name!r})"


PUSH = Script("push")
CLAIM = Script("claim")
HEARTBEAT = Script("heartbeat")
FINISH = Script("finish")
ACK_CLAIM = Script("ack_claim")
FETCH = Script("fetch")
STATS = Script("stats")
RETRY = Script("retry")
DELETE = Script("delete")
CLEAR = Script("clear")
PROMOTE = Script("promote")
APPEND_LOG = Script("append_log")
CANCEL = Script("cancel")
LIMITS = Script("limits")
STATS_JOURNAL = Script("stats_journal")

#: Every script, by name.
SCRIPTS: dict[str, Script] = {s.name: s for s in (
    PUSH, CLAIM, HEARTBEAT, FINISH, ACK_CLAIM, FETCH, STATS, RETRY, DELETE, CLEAR, PROMOTE,
    APPEND_LOG, CANCEL, LIMITS, STATS_JOURNAL)}
