"""The Redis backend's Lua scripts: one file per script, every file used, every used script
there, and each one accepted by a real server."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest

from forge.backends.redis import lua

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "forge" / "backends" / "redis"
SCRIPTS = PACKAGE / lua.SCRIPTS_DIR
#: The modules that run scripts (the backend's package and the Redis stats journal).
USERS = [p for p in PACKAGE.glob("*.py") if p.name != "lua.py"] + [ROOT / "forge" / "stats" / "redisjournal.py"]


def _constants() -> dict[str, lua.Script]:
    return {name: v for name, v in vars(lua).items() if type(v) is lua.Script}


def test_every_script_file_is_a_script_and_every_script_has_a_file() -> None:
    files = {p.stem for p in SCRIPTS.glob("*.lua")}
    assert lua.PRELUDE in files
    assert files - {lua.PRELUDE} == set(lua.SCRIPTS)
    assert {s.name for s in _constants().values()} == set(lua.SCRIPTS)
    assert not [p for p in SCRIPTS.iterdir() if p.suffix != ".lua"]


def test_every_script_is_used_and_every_used_script_exists() -> None:
    text = "\n".join(p.read_text(encoding="utf-8") for p in USERS)
    used = set(re.findall(r"\blua\.([A-Z][A-Z_]*)\b", text))
    scripts = {name for name in used
               if name not in ("SCRIPTS", "PROMOTE_BATCH", "SCRIPTS_DIR", "PRELUDE", "JOURNALED", "JOURNAL_ARGS")}
    # forge.stats.journal names the scripts it runs with an outcome's journal line by name
    # (RedisJournal.finish_and_write: "finish", "ack_claim", the keys of lua.JOURNALED).
    journal = (ROOT / "forge" / "stats" / "journal.py").read_text(encoding="utf-8")
    by_name = set(re.findall(r'finish_and_write\(\s*(?:#[^\n]*\n\s*)?"([a-z_]+)"', journal))
    assert by_name == {"finish", "ack_claim"} == set(lua.JOURNALED)
    scripts |= {name.upper() for name in by_name}
    constants = _constants()
    assert scripts <= set(constants), f"used but not defined: {sorted(scripts - set(constants))}"
    assert set(constants) <= scripts, f"defined but never used: {sorted(set(constants) - scripts)}"


def test_documentation_is_not_sent_and_the_prelude_comes_first() -> None:
    source = lua.CLAIM.source
    assert source.startswith(f"local PROMOTE_BATCH = {lua.PROMOTE_BATCH}\n")
    assert "-- Claim the first due job of the first unpaused queue" not in source  # its documentation
    assert source.index("local function claim_next") < source.index("return claim_next(")
    header = (SCRIPTS / "claim.lua").read_text(encoding="utf-8").splitlines()[0]
    assert header.startswith("--")


def test_the_library_registers_every_script_once_and_is_named_by_its_source() -> None:
    name, source = lua.library()
    assert source.startswith(f"#!lua name={name}\n") and name.startswith(f"{lua.LIBRARY}_")
    registered = re.findall(r"redis\.register_function\('([^']+)'", source)
    expected = [s.function for s in (*lua.SCRIPTS.values(), *lua.JOURNALED.values())]
    assert sorted(registered) == sorted(expected) and len(set(registered)) == len(registered)
    assert all(f.startswith(name + "_") for f in registered)
    assert source.count("local function now_us()") == 1  # the prelude once, at the top level
    assert "ARGV[1]" not in source.split("redis.register_function", 1)[0].split("local function s_", 1)[0]
    # another source is another name: two versions of forge on one server never share functions
    lua._library = None
    saved = dict(lua._texts)
    try:
        lua._texts["push"] = lua.read("push") + "-- changed\n"
        assert lua.library()[0] != name
    finally:
        lua._texts.clear()
        lua._texts.update(saved)
        lua._library = None
    assert lua.library() == (name, source)


@pytest.mark.redis
def test_every_script_compiles_on_the_server() -> None:
    """Both forms: each script's EVAL source (servers without Functions) and the library."""
    url = os.environ.get("FORGE_TEST_REDIS_URL")
    if not url:
        pytest.skip("FORGE_TEST_REDIS_URL is not set")
    redis = pytest.importorskip("redis")

    client = redis.Redis.from_url(url, socket_connect_timeout=5)
    try:
        sources = [s.source for s in (*lua.SCRIPTS.values(), *lua.JOURNALED.values())]
        for source in sources:
            sha = client.script_load(source)  # a syntax error is an error reply
            assert client.script_exists(sha) == [True]
        name, library = lua.library()
        try:
            client.function_load(library)
        except redis.ResponseError as exc:
            assert "already exists" in str(exc)
        (listed,) = client.function_list(library=name)  # RESP2: flat lists of names and values
        functions = {f[f.index(b"name") + 1].decode() for f in listed[listed.index(b"functions") + 1]}
        assert functions == {s.function for s in (*lua.SCRIPTS.values(), *lua.JOURNALED.values())}
    finally:
        client.close()


@pytest.mark.redis
def test_ack_claim_claims_only_from_the_queues_it_is_given(redis_backend: Any) -> None:
    """The journaled ``ack_claim`` (prelude, journal, body as functions) must read its queue
    names from its own arguments: the script's whole ARGV also holds the journal's and the ack's
    (an attempt "1", keep_done "1"...), and a queue may be named "1"."""
    import time

    from conftest import make_job

    from forge.job import Event

    b = redis_backend
    mine, other = make_job(queue="default"), make_job(queue="1")
    b.push([mine, other])
    c = b.claim(["default"], "w", 60)
    assert c is not None and c.job.id == mine.id and c.attempt == 1
    nxt = b.ack_claim(c, Event("done", 1, time.time(), exit_code=0, duration=0.1), ["default"], "w", 60)
    assert nxt is None  # queue "1" is not one of this worker's
    assert b.stats(["1"])[0].pending == 1 and b.stats(["default"])[0].done == 1

