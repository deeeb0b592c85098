"""The Redis backend's Lua scripts: one file per script, every file used, every used script
there, and each one accepted by a real server."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from forge.backends.redis import lua

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "forge" / "backends" / "redis"
SCRIPTS = PACKAGE / lua.SCRIPTS_DIR
#: The modules that run scripts (the backend's package and the Redis stats journal).
USERS = [p for p in PACKAGE.glob("*.py") if p.name != "lua.py"] + [ROOT / "forge" / "stats" / "redisjournal.py"]


def _constants() -> dict[str, lua.Script]:
    return {name: v for name, v in vars(lua).items() if isinstance(v, lua.Script)}


def test_every_script_file_is_a_script_and_every_script_has_a_file() -> None:
    files = {p.stem for p in SCRIPTS.glob("*.lua")}
    assert lua.PRELUDE in files
    assert files - {lua.PRELUDE} == set(lua.SCRIPTS)
    assert {s.name for s in _constants().values()} == set(lua.SCRIPTS)
    assert not [p for p in SCRIPTS.iterdir() if p.suffix != ".lua"]


def test_every_script_is_used_and_every_used_script_exists() -> None:
    text = "\n".join(p.read_text(encoding="utf-8") for p in USERS)
    used = set(re.findall(r"\blua\.([A-Z][A-Z_]*)\b", text))
    scripts = {name for name in used if name not in ("SCRIPTS", "PROMOTE_BATCH", "SCRIPTS_DIR", "PRELUDE")}
    # forge.stats.journal names the scripts it runs with an outcome's journal line by name
    # (RedisJournal.finish_and_write: "finish", "ack_claim").
    journal = (ROOT / "forge" / "stats" / "journal.py").read_text(encoding="utf-8")
    by_name = set(re.findall(r'finish_and_write\(\s*(?:#[^\n]*\n\s*)?"([a-z_]+)"', journal))
    assert by_name == {"finish", "ack_claim"}
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


@pytest.mark.redis
def test_every_script_compiles_on_the_server() -> None:
    url = os.environ.get("FORGE_TEST_REDIS_URL")
    if not url:
        pytest.skip("FORGE_TEST_REDIS_URL is not set")
    redis = pytest.importorskip("redis")
    from forge.stats.redisjournal import journaled_source

    client = redis.Redis.from_url(url, socket_connect_timeout=5)
    try:
        sources = [s.source for s in lua.SCRIPTS.values()]
        sources += [journaled_source("finish"), journaled_source("ack_claim")]
        for source in sources:
            sha = client.script_load(source)  # a syntax error is an error reply
            assert client.script_exists(sha) == [True]
    finally:
        client.close()
