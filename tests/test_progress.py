"""Job progress through real workers on both backends: the ``::forge-progress`` line and
``forge.progress``, the record in ``queue:show --json`` and ``queue:list``, and the bars of
``queue:log --follow`` and ``queue:dispatch --wait`` on a terminal (a pty)."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from fdwait import readable
from waitfor import wait_for

from forge.jobprogress import format_line, parse_line

STEPS = Path(__file__).resolve().parent / "progressproject" / "commands"


@pytest.fixture
def target(queue_target: Any) -> Any:
    config = Path(queue_target.env["FORGE_CONFIG"])
    text = config.read_text()
    config.write_text(text.replace('commands = ["', f'commands = ["{STEPS}", "', 1))
    return queue_target


def forge(target: Any, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "forge", *args], env=target.env, capture_output=True,
                          text=True, timeout=timeout)


def worker(target: Any) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "forge", "queue:work", "--max-jobs=1"], env=target.env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def shown(target: Any, job_id: str) -> dict[str, Any]:
    r = forge(target, "queue:show", job_id, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["job"]


def test_parse_and_format() -> None:
    assert parse_line("::forge-progress 30/100 downloading files\n") == parse_line(format_line(30, 100, "downloading files"))
    r = parse_line("::forge-progress 45.5% resizing")
    assert r is not None and r.percent == 45.5 and r.message == "resizing"
    assert parse_line("::forge-progress 3/4").percent == 75.0  # type: ignore[union-attr]
    for bad in ("::forge-progress", "::forge-progress 5/0", "::forge-progress 7/5", "::forge-progress 101%",
                "::forge-progress -1/5", " ::forge-progress 1/2", "forge-progress 1/2", "::forge-progress x/2"):
        assert parse_line(bad) is None, bad
    assert parse_line("::forge-progress 1/2 \x1b[31mred\x07").message == "[31mred"  # type: ignore[union-attr]
    for args in ((-1, 10), (11, 10), (1, 0), (101,), (float("nan"),), (True, 2)):
        with pytest.raises(ValueError, match="forge.progress"):
            format_line(*args)


def test_progress_outside_a_job_prints_nothing(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import forge as forge_api

    monkeypatch.delenv("FORGE_JOB_ID", raising=False)
    forge_api.progress(3, 10, "direct run")
    assert capsys.readouterr() == ("", "")
    monkeypatch.setenv("FORGE_JOB_ID", "x")
    forge_api.progress(3, 10, "in a job")
    assert capsys.readouterr().err == "::forge-progress 3/10 in a job\n"


def test_progress_is_recorded_by_the_worker(target: Any, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    r = forge(target, "queue:dispatch", "steps:run", "--", "--gate", str(gate), "--flood", "5000")
    job_id = r.stdout.strip()
    w = worker(target)
    try:
        p = wait_for(lambda: shown(target, job_id)["progress"], timeout=60)
        assert (p["done"], p["total"], p["percent"], p["message"], p["attempt"]) == (30, 100, 30.0, "downloading", 1)
        assert p["updated_at"].endswith("Z")
        listing = forge(target, "queue:list")
        assert "30% downloading" in listing.stdout.replace("\n", " ")
        human = forge(target, "queue:show", job_id)
        assert "30% downloading" in human.stdout
        gate.touch()
        assert w.wait(timeout=60) == 0
    finally:
        if w.poll() is None:
            w.kill()
            w.wait()
    job = shown(target, job_id)
    assert job["state"] == "done"
    p = job["progress"]
    assert (p["percent"], p["message"], p["eta_seconds"]) == (100.0, "all done", 0.0)  # the last line wins
    log = forge(target, "queue:log", job_id).stdout  # piped: the log as the job wrote it
    assert "::forge-progress 30/100 downloading\n" in log and "a line of ordinary output" in log


def _read_pty(fd: int, until: Any, timeout: float = 60) -> str:
    out, end = b"", time.monotonic() + timeout
    while time.monotonic() < end:
        ready = readable([fd], 0.5)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # the other side closed
                break
            if not chunk:
                break
            out += chunk
            if until(out.decode(errors="replace")):
                break
    return out.decode(errors="replace")


def _on_pty(target: Any, *args: str) -> tuple[subprocess.Popen[bytes], int]:
    main, sub = pty.openpty()
    env = {**target.env, "COLUMNS": "100", "TERM": "xterm"}
    proc = subprocess.Popen([sys.executable, "-m", "forge", *args], env=env, stdin=sub, stdout=sub, stderr=sub)
    os.close(sub)
    return proc, main


@pytest.mark.parametrize("how", ["log", "wait"])
def test_progress_bar_on_a_terminal(target: Any, tmp_path: Path, how: str) -> None:
    gate = tmp_path / "gate"
    w = worker(target)
    try:
        if how == "log":
            job_id = forge(target, "queue:dispatch", "steps:run", "--", "--gate", str(gate)).stdout.strip()
            wait_for(lambda: shown(target, job_id)["progress"], timeout=60)
            proc, fd = _on_pty(target, "queue:log", "--follow", job_id)
        else:
            proc, fd = _on_pty(target, "queue:dispatch", "--wait", "steps:run", "--", "--gate", str(gate))
        try:
            seen = _read_pty(fd, lambda s: "downloading" in s and "30%" in s)
            assert "━" in seen and "30%" in seen, seen  # a Rich bar at 30%
            gate.touch()
            rest = _read_pty(fd, lambda s: False)
            assert proc.wait(timeout=60) == 0
        finally:
            os.close(fd)
            if proc.poll() is None:
                proc.kill()
        assert "100%" in rest and "all done" in rest
        if how == "log":
            assert "a line of ordinary output" in seen + rest
            assert "::forge-progress" not in seen + rest  # the bar replaces the raw lines
        assert w.wait(timeout=60) == 0
    finally:
        if w.poll() is None:
            w.kill()
            w.wait()


def test_the_tracker_throttles_writes_and_keeps_the_last(tmp_path: Path) -> None:
    """Fed output continuously for over a second: at most one write per half second plus the
    last; a progress line split across two chunks still counts; other lines are ignored."""
    from forge.backends.file.backend import FileBackend
    from forge.job import new_id
    from forge.jobprogress.store import get_progress
    from forge.jobprogress.tracker import MIN_INTERVAL, ProgressTracker

    b = FileBackend(tmp_path / "q")
    job_id = new_id()
    t = ProgressTracker(b)
    t.start(job_id, 1, time.time())
    record = tmp_path / "q" / "progress" / f"{job_id}.json"
    inodes, n = set(), 0
    start = time.monotonic()
    while time.monotonic() - start < 1.2:
        n += 1
        t.feed(f"noise {n}\n::forge-progress {n % 100}/100 step {n}\n  ::forge-progress 99 of 100 (no)\n".encode())
        if record.exists():
            inodes.add(record.stat().st_ino)  # every write renames a new file into place
    elapsed = time.monotonic() - start
    assert 2 <= len(inodes) <= elapsed / MIN_INTERVAL + 2, (len(inodes), elapsed)
    t.feed(b"::forge-prog")
    t.feed(b"ress 7/10 split\nand more")
    t.finish()
    p = get_progress(b, [job_id])[job_id]
    assert (p["done"], p["total"], p["message"], p["attempt"]) == (7.0, 10.0, "split", 1)
