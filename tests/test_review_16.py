"""Defects found reviewing issue 16 (stats, metrics, progress, dashboard), each with its case."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from forge.jobprogress import parse_line

ONCE = '''
import os
import sys
import time

from forge import command


@command("review:once")
def once(gate: str) -> None:
    """The first run reports progress (a line of 400 digits first) and fails; a later run
    waits for GATE without reporting any."""
    if not os.path.exists(gate + ".first"):
        open(gate + ".first", "w").close()
        print("::forge-progress 1/" + "9" * 400 + " too big", file=sys.stderr, flush=True)
        print("::forge-progress 90/100 almost", file=sys.stderr, flush=True)
        raise SystemExit(1)
    end = time.monotonic() + 120
    while not os.path.exists(gate) and time.monotonic() < end:
        time.sleep(0.05)
'''


def _strict(text: str) -> Any:
    """JSON as a script's parser (jq, JavaScript) reads it: no NaN or Infinity."""
    def refuse(name: str) -> Any:
        raise ValueError(f"not JSON: {name}")
    return json.loads(text, parse_constant=refuse)


def forge(target: Any, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "forge", *args], env=target.env, capture_output=True,
                          text=True, timeout=timeout)


def shown(target: Any, job_id: str) -> dict[str, Any]:
    r = forge(target, "queue:show", job_id, "--json")
    assert r.returncode == 0, r.stderr
    return _strict(r.stdout)["job"]


def test_progress_numbers_beyond_a_float_are_not_progress() -> None:
    # float("9" * 400) is inf: the record would hold Infinity/NaN, which is not JSON.
    assert parse_line("::forge-progress 1/" + "9" * 400) is None
    assert parse_line("::forge-progress " + "9" * 400 + "/" + "9" * 400) is None
    assert parse_line("::forge-progress " + "9" * 400 + "%") is None
    assert parse_line("::forge-progress 1/" + "9" * 300).percent == 0.0  # type: ignore[union-attr]
