"""The README's code blocks as a test: each ```bash and ```python block runs in a fresh copy of
the example project (its forge.toml, commands/ and users.csv, a queue of its own), so the
examples stay true.

A block preceded by ``<!-- not run: REASON -->`` is skipped, with its reason; there are few.
A bash block runs line by line (comments stripped): each line must exit 0, or with one of the
codes the README documents for "nothing matched" outcomes on example ids (5: no such job) and
thresholds (8: queue:monitor --max, 7: a failed job) -- never 1 (an error), 2 (a usage error)
or 127. A line that runs until stopped (a worker, --watch, --follow, --wait without a worker) is
stopped after a few seconds and passes if it was still running. A python block runs as a script.

The README's example ids stand for real jobs: before a block that uses them, the test queues
three jobs (failed ones for queue:retry and queue:forget, pending ones otherwise) and puts their
ids in place of 3f2b5c1e-..., 9d0e and 7c1d0e42-....
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
FENCE = re.compile(r"^```(bash|python)\n(.*?)^```\n", re.S | re.M)
NOT_RUN = re.compile(r"<!-- not run: ([^>]+?) -->\s*\Z")
OK_CODES = {0, 5, 7, 8}
LONG_RUNNING = re.compile(r"queue:work(?!.*(--stop-when-empty|--once|--max-))|--watch|--follow|--wait\b|schedule:work")


def _blocks() -> list[tuple[int, str, str, str | None]]:
    out = []
    for m in FENCE.finditer(README):
        line = README.count("\n", 0, m.start()) + 1
        before = README[max(0, m.start() - 300):m.start()]
        skip = NOT_RUN.search(before)
        out.append((line, m.group(1), m.group(2), skip.group(1) if skip else None))
    return out


BLOCKS = _blocks()


def test_few_blocks_are_skipped_and_each_says_why() -> None:
    skipped = [(line, why) for line, _, _, why in BLOCKS if why]
    assert len(BLOCKS) >= 10
    assert len(skipped) <= 4, skipped
    assert all(len(why) > 10 for _, why in skipped)


@pytest.fixture
def fresh_project(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    proj = tmp_path / "app"
    proj.mkdir()
    shutil.copy(ROOT / "forge.toml", proj / "forge.toml")
    shutil.copy(ROOT / "users.csv", proj / "users.csv")
    shutil.copytree(ROOT / "commands", proj / "commands", ignore=shutil.ignore_patterns("__pycache__"))
    (proj / "storage").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORGE_")}
    env.update(FORGE_NO_PLUGINS="1", FORGE_QUEUE_DIR=str(tmp_path / "queue"), PWD=str(proj),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
               XDG_CACHE_HOME=str(tmp_path / "cache"))
    return proj, env


def _lines(body: str) -> list[str]:
    out = []
    for raw in body.splitlines():
        text = re.sub(r"\s+#\s.*$", "", raw).strip()  # an end-of-line comment (after a space)
        if text and not text.startswith("#"):
            out.append(text)
    return out


@pytest.mark.parametrize(("line", "lang", "body", "skip"), BLOCKS, ids=[f"README.md:{b[0]}" for b in BLOCKS])
def test_readme_block_runs(line: int, lang: str, body: str, skip: str | None,
                           fresh_project: tuple[Path, dict[str, str]]) -> None:
    if skip:
        pytest.skip(f"README.md:{line}: {skip}")
    proj, env = fresh_project
    if lang == "python":
        res = subprocess.run([sys.executable, "-c", body], cwd=proj, env=env, capture_output=True, text=True,
                             timeout=120)
        assert res.returncode == 0, f"README.md:{line}: python block failed:\n{res.stderr}"
        return
    if "3f2b5c1e" in body:
        body = _real_ids(body, proj, env)
    for text in _lines(body):
        try:
            res = subprocess.run(["bash", "-c", text], cwd=proj, env=env, capture_output=True, text=True,
                                 timeout=5 if LONG_RUNNING.search(text) else 120, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            assert LONG_RUNNING.search(text), f"README.md:{line}: {text!r} did not finish"
            continue
        assert res.returncode in OK_CODES, f"README.md:{line}: {text!r} exited {res.returncode}:\n{res.stderr}"
        assert "Traceback" not in res.stderr, f"README.md:{line}: {text!r}:\n{res.stderr}"


EXAMPLE_IDS = ("3f2b5c1e-8a8e-4a53-9d57-0f1ad0c0e7b1", "9d0e", "7c1d0e42-5b6f-4e3a-8d9c-1a2b3c4d5e6f")


def _real_ids(body: str, proj: Path, env: dict[str, str]) -> str:
    failed = "queue:retry" in body or "queue:forget" in body
    argv = ["demo:fail"] if failed else ["demo:sleep", "0"]

    def forge(*args: str) -> str:
        res = subprocess.run([sys.executable, "-m", "forge", *args], cwd=proj, env=env, capture_output=True,
                             text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        return res.stdout.strip()

    ids = [forge("queue:dispatch", *argv) for _ in EXAMPLE_IDS]
    if failed:
        forge("queue:work", "--stop-when-empty", "--sleep=0.1", "--tries=1")
    for example, real in zip(EXAMPLE_IDS, ids, strict=True):
        body = body.replace(example + "...", real).replace(example, real)
        body = body.replace(example[:8], real[:8])
    return body
