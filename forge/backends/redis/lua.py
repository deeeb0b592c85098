"""The Redis backend's server-side Lua scripts: one file per script in ``scripts/``.

``scripts/<name>.lua`` is the script ``name``; its leading comment lines document its KEYS,
ARGV and reply and are not sent to the server. Every script shares two parts, in this order:

1. the constants the scripts share, as Lua locals written from the Python constants here
   (``local PROMOTE_BATCH = 1000``), so a number is defined once, in Python;
2. ``scripts/prelude.lua`` (key helpers, the server clock and the state transitions several
   scripts share), which is not a script of its own. The key prefix ``P`` is ARGV[1] of every
   call.

On Redis 7 and newer the scripts run as one Functions library (``library``): the constants, the
prelude, each script as a local function and each registered as ``<library>_<name>``, loaded
once per server (``FUNCTION LOAD``) and called with ``FCALL``, so the prelude's helpers are
defined once per load instead of on every call. The library's name carries a checksum of its
source, so two versions of forge on one server each call their own. On an older server (no
``FCALL``, or ``FUNCTION LOAD`` refused) each script's ``source`` is the prelude followed by
the script, run by SHA (EVALSHA, loaded again on NOSCRIPT). ``Server.run`` picks the way.

Each script is a ``Script`` constant below (``PUSH``, ``CLAIM``...), the only way the backend
names one (``Server.run``), so a test can check that every file is used and every used
script exists (``tests/test_redis_scripts.py``); ``JOURNALED`` holds the two scripts made of
two (an outcome and its stats journal record). A source is read from disk once per process,
on its first use.
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


def constants() -> str:
    """The Lua locals written from the Python constants (the start of every script's code)."""
    return f"local PROMOTE_BATCH = {PROMOTE_BATCH}\n"


def prelude() -> str:
    """What every script is sent after on a server without Functions: the shared constants,
    the prefix ``P`` (ARGV[1]), then ``scripts/prelude.lua``."""
    return (constants() + "if redis.replicate_commands then redis.replicate_commands() end\n"
            + "local P = ARGV[1]\n" + read(PRELUDE))


class Script:
    """One server-side script, ``scripts/<name>.lua``: its ``source`` is what an EVAL runs,
    ``function`` what an FCALL calls (in ``library``)."""

    __slots__ = ("name", "_source", "_sha")

    def __init__(self, name: str) -> None:
        self.name = name
        self._source: str | None = None
        self._sha: str | None = None

    @property
    def body(self) -> str:
        """The script's own code (without the prelude), read on first use."""
        return read(self.name)

    @property
    def lua(self) -> str:
        """The script's code as the body of a Lua function of ``ARGV`` (in the library, and in
        a source on a server without Functions)."""
        return self.body

    @property
    def source(self) -> str:
        """The full source an EVAL sends: the prelude, then the body (built once)."""
        source = self._source
        if source is None:
            source = self._source = prelude() + self.lua
        return source

    @property
    def sha(self) -> str:
        """The SHA1 of ``source`` (what EVALSHA names it by)."""
        sha = self._sha
        if sha is None:
            import hashlib  # here: 2-5 ms of a one-shot process, which never needs it on Redis 7

            sha = self._sha = hashlib.sha1(self.source.encode()).hexdigest()
        return sha

    @property
    def function(self) -> str:
        """The name ``FCALL`` calls it by: the library's name, then the script's."""
        return f"{library()[0]}_{self.name}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class Joined(Script):
    """A script made of two, each run as a function of its own part of ARGV: ``first`` takes
    ARGV[2..1 + first_args], ``second`` the rest, and both see P as ARGV[1] (so a second script
    with a variable tail, ``ack_claim``'s queues, keeps its own numbering). Used to journal an
    outcome in the script that makes it: ``second`` (``finish``, ``ack_claim``) runs, and then
    ``first`` (``stats_journal``) only if the claim held (``second`` answered 1, or a reply
    whose first element is 1), unconditionally (its argument ``first_args``, the job id of
    ``stats_journal``, cleared: its own check of the claim would find the job finished, or
    gone): recorded exactly when the outcome took effect."""

    __slots__ = ("first", "second", "first_args")

    def __init__(self, first: Script, second: Script, first_args: int) -> None:
        super().__init__(f"{second.name}_journaled")
        self.first, self.second, self.first_args = first, second, first_args

    @property
    def body(self) -> str:
        """Both scripts' code (read on first use)."""
        return self.first.body + self.second.body

    @property
    def lua(self) -> str:
        """The two scripts as two local functions, called in turn with their parts of ARGV."""
        n = self.first_args
        return ("local function second_body(ARGV)\n" + self.second.lua + "\nend\n"
                + "local function first_body(ARGV)\n" + self.first.lua + "\nend\n"
                + f"local J, M = {{}}, {{ARGV[1]}}\nfor i = 1, {1 + n} do J[i] = ARGV[i] end\n"
                + f"for i = {2 + n}, #ARGV do M[#M + 1] = ARGV[i] end\n"
                + "local r = second_body(M)\n"
                + f"if (type(r) == 'table' and r[1] or r) == 1 then J[{n}] = '' first_body(J) end\n"
                + "return r\n")


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

#: How many arguments ``stats_journal`` takes after P (``forge.stats.redisjournal``).
JOURNAL_ARGS = 11
#: The outcomes that are journaled in the same script, by the outcome script's name:
#: ``stats_journal`` then ``finish`` or ``ack_claim``.
JOURNALED: dict[str, Joined] = {s.name: Joined(STATS_JOURNAL, s, JOURNAL_ARGS) for s in (FINISH, ACK_CLAIM)}

#: The name every library's name starts with (then ``_`` and its checksum).
LIBRARY = "forge"
_library: tuple[str, str] | None = None


def library() -> tuple[str, str]:
    """The Functions library of every script, as (name, source) (built once per process).

    The prelude is at the library's top level, so its helpers are made once per load; each
    script is a local function of ARGV, registered as ``<name>_<script>`` by a wrapper that
    sets P from ARGV[1]. The name is ``forge_`` and a checksum of the rest of the source
    (CRC-32 and length: a version tag, not a defence, and ``binascii`` costs a one-shot
    process nothing where ``hashlib`` costs milliseconds)."""
    global _library
    if _library is None:
        import binascii

        parts = [constants(), "local P\n", read(PRELUDE)]
        registered = []
        for script in (*SCRIPTS.values(), *JOURNALED.values()):
            parts.append(f"local function s_{script.name}(ARGV)\n{script.lua}\nend\n")
            registered.append(script.name)
        code = "".join(parts)
        tag = f"{binascii.crc32(code.encode()):08x}{len(code):x}"
        name = f"{LIBRARY}_{tag}"
        code += "".join(f"redis.register_function('{name}_{n}', function(_, ARGV) P = ARGV[1]"
                        f" return s_{n}(ARGV) end)\n" for n in registered)
        _library = (name, f"#!lua name={name}\n" + code)
    return _library
