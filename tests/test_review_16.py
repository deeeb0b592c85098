"""Defects found reviewing issue 16 (stats, metrics, progress, dashboard), each with its case."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import redis_answers
from waitfor import wait_for

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


@command("review:dots")
def dots() -> None:
    """A row of dots on stdout (no newline) while reporting progress with forge.progress."""
    import forge

    for i in range(1, 4):
        print(".", end="", flush=True)
        forge.progress(i, 3, f"step {i}")
    print(" done")
'''


def _with_commands(target: Any, tmp_path: Path) -> None:
    commands = tmp_path / "review_commands"
    commands.mkdir(exist_ok=True)
    (commands / "once.py").write_text(ONCE)
    config = Path(target.env["FORGE_CONFIG"])
    config.write_text(config.read_text().replace('commands = ["', f'commands = ["{commands}", "', 1))


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


def test_a_retried_job_does_not_show_its_last_attempts_progress(queue_target: Any, tmp_path: Path) -> None:
    """Attempt 1 reports 90% and fails; ``queue:retry``; while the new attempt runs (and has
    reported nothing), ``queue:show`` must not show attempt 1's "90%, ETA 0 ms"."""
    _with_commands(queue_target, tmp_path)
    gate = tmp_path / "gate"
    r = forge(queue_target, "queue:dispatch", "--tries=1", "review:once", str(gate))
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip().splitlines()[-1]
    w = forge(queue_target, "queue:work", "--stop-when-empty")
    assert w.returncode == 0, w.stdout + w.stderr
    job = shown(queue_target, job_id)
    assert job["state"] == "failed" and job["progress"]["percent"] == 90.0
    later = time.time() + 1.2  # an operator's retry comes later than the clocks' second of slack
    wait_for(lambda: time.time() > later)
    assert forge(queue_target, "queue:retry", job_id).returncode == 0
    worker = subprocess.Popen([sys.executable, "-m", "forge", "queue:work", "--max-jobs=1"], env=queue_target.env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: shown(queue_target, job_id)["state"] == "reserved", timeout=90)
        job = shown(queue_target, job_id)
        assert job["state"] == "reserved" and job["progress"] is None, job["progress"]
        human = forge(queue_target, "queue:show", job_id).stdout
        assert "90% almost" not in human.replace("::forge-progress 90/100 almost", "")
        gate.touch()
        assert worker.wait(timeout=90) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()


def test_redis_stats_over_a_long_window_read_the_minutes_that_exist(queue_target: Any) -> None:
    """``--since=36000d`` (accepted) asked Redis for 52 million minute keys, one GET each: it
    ran for minutes and gigabytes. It reads the minute keys that exist, and still counts a
    record older than the default retention (kept by a worker with FORGE_STATS_RETENTION)."""
    if queue_target.kind != "redis":
        pytest.skip("the file journal lists its minute files")
    from forge.stats.records import encode

    b = queue_target.backend
    old = time.time() - 10 * 86400
    b.server.r.set(f"{queue_target.prefix}:stats:m:{int(old // 60)}", encode(old, "default", "a:x", "done", 1, 1.0, 2.0))
    recent = time.time() - 30
    b.server.r.set(f"{queue_target.prefix}:stats:m:{int(recent // 60)}",
             encode(recent, "default", "a:x", "failed", 1, 1.0, 2.0))
    r = forge(queue_target, "queue:stats", "--since=36000d", "--json", timeout=120)
    assert r.returncode == 0, r.stderr
    t = _strict(r.stdout)["stats"]["totals"]
    assert (t["done"], t["failed"]) == (1, 1)
    r = forge(queue_target, "queue:stats", "--since=1h", "--json")
    assert _strict(r.stdout)["stats"]["totals"]["failed"] == 1 and _strict(r.stdout)["stats"]["totals"]["done"] == 0


def _sse_logs(resp: Any, want: int) -> list[str]:
    """The texts of the next ``want`` ``log`` events of a /live stream."""
    texts: list[str] = []
    event = ""
    while len(texts) < want:
        line = resp.fp.readline().decode()
        assert line, "the stream ended"
        if line.startswith("event: "):
            event = line[7:].strip()
        elif line.startswith("data: ") and event == "log":
            texts.append(json.loads(line[6:])["text"])
    return texts


def test_live_log_does_not_split_a_character_between_two_events(queue_target: Any) -> None:
    """A job's output copied in two pieces that cut a character in two ("caf\\xc3" then
    "\\xa9"): the live log showed "caf\ufffd\ufffd" where the page, reloaded, shows "café"."""
    import http.client

    from dashboard_support import start_dashboard

    from forge.queue import QueuedCommand

    b = queue_target.backend
    job_id = queue_target.queue("default").dispatch(QueuedCommand("probe:run"))
    euro, e_acute = "€".encode(), "é".encode()
    b.append_log(job_id, "naïve €".encode() + euro[:1])
    d = start_dashboard(queue_target.env)
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=60)
    try:
        headers = {"Host": f"127.0.0.1:{d.port}", "Authorization": f"Bearer {d.token}"}
        conn.request("GET", f"/jobs/{job_id}", headers=headers)
        page = conn.getresponse().read().decode()
        assert "naïve €" in page and "\ufffd" not in page
        conn.request("GET", f"/live?view=job&id={job_id}&log=0", headers=headers)
        resp = conn.getresponse()
        assert resp.status == 200
        first = _sse_logs(resp, 1)
        b.append_log(job_id, euro[1:] + b"caf" + e_acute[:1])
        second = _sse_logs(resp, 1)
        b.append_log(job_id, e_acute[1:] + b" ok\n")
        text = "".join(first + second + _sse_logs(resp, 1))
        assert text == "naïve €€café ok\n", text
    finally:
        conn.close()
        d.stop()


def _next_event(resp: Any) -> tuple[str, Any]:
    """The next event of a /live stream, as (name, data); ("", None) when the stream ends."""
    event = ""
    while True:
        line = resp.fp.readline().decode()
        if not line:
            return "", None
        if line.startswith("event: "):
            event = line[7:].strip()
        elif line.startswith("data: "):
            return event, json.loads(line[6:])
        elif line.startswith(": keep-alive"):
            return "keep-alive", None


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_a_job_pages_live_stream_outlives_redis_going_away(tmp_path: Path) -> None:
    """Redis stops while a job page is open: its live stream says so and stays open (it died
    with a traceback, reading the log, every time the browser reconnected), and once Redis is
    back the page is sent again (which clears the message). A log offset past any store's
    range is ignored, not a traceback either."""
    import http.client

    from dashboard_support import dispatch, start_dashboard, write_project

    port = _free_port()
    server = _redis_server(port)
    d = None
    try:
        env = write_project(tmp_path / "p", "redis", f"redis://127.0.0.1:{port}/0")
        job_id = dispatch(env, "dash:echo", "hello")
        d = start_dashboard(env)
        headers = {"Host": f"127.0.0.1:{d.port}", "Authorization": f"Bearer {d.token}"}
        conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=60)
        conn.request("GET", f"/live?view=job&id={job_id}&log=99999999999999999999", headers=headers)
        resp = conn.getresponse()
        assert _next_event(resp)[0] == "region"
        conn.close()
        conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=60)
        conn.request("GET", f"/live?view=job&id={job_id}&log=0", headers=headers)
        resp = conn.getresponse()
        assert _next_event(resp)[0] == "region"
        server.terminate()
        server.wait(timeout=30)
        name, data = _next_event(resp)
        while name == "log":
            name, data = _next_event(resp)
        assert name == "problem" and "unavailable" in data["text"], (name, data)
        assert _next_event(resp)[0] in ("problem", "keep-alive")  # the stream goes on
        server = _redis_server(port)
        name = _next_event(resp)[0]
        while name in ("problem", "keep-alive"):
            name = _next_event(resp)[0]
        assert name == "region"  # the page again (the job is gone: this Redis keeps no data)
        conn.close()
    finally:
        if d is not None:
            d.stop()
        server.terminate()
        server.wait(timeout=30)
    assert "Traceback" not in "".join(d.stderr if d else []), "".join(d.stderr if d else [])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _redis_server(port: int) -> subprocess.Popen[bytes]:
    import redis

    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port, socket_connect_timeout=0.5)
    try:
        wait_for(lambda: redis_answers(client), timeout=30)
    finally:
        client.close()
    return proc


def test_progress_after_a_partial_line_of_ordinary_output_is_recorded(queue_target: Any, tmp_path: Path) -> None:
    """stdout and stderr share the job's pipe: forge.progress's line (stderr) came after the
    job's row of dots (stdout, no newline), ".::forge-progress 1/3", and was not recorded."""
    _with_commands(queue_target, tmp_path)
    r = forge(queue_target, "queue:dispatch", "review:dots")
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip().splitlines()[-1]
    w = forge(queue_target, "queue:work", "--stop-when-empty")
    assert w.returncode == 0, w.stdout + w.stderr
    job = shown(queue_target, job_id)
    assert job["state"] == "done" and job["progress"] is not None
    p = job["progress"]
    assert (p["done"], p["total"], p["message"]) == (3, 3, "step 3")


def test_a_terminal_view_drops_progress_after_a_partial_line_and_keeps_the_line() -> None:
    from forge.jobprogress.view import LineFilter

    f = LineFilter()
    shown_text = [f.feed(piece) for piece in (".", "::forge-pro", "gress 1/3 a\n", ".",
                                              "::forge-progress 2/3 b\nx\n", "Name:")]
    assert shown_text == [".", "", "", ".", "x\n", "Name:"]  # a prompt shows at once
    assert f.flush() == ""


def test_a_dashboard_token_that_cannot_go_in_a_url_or_cookie_is_refused(tmp_path: Path) -> None:
    """FORGE_DASHBOARD_TOKEN=abcdefgh&ijklmnop: the printed URL's query cut it at '&' (or ';'
    in the cookie, '#' as a fragment), so nothing ever let one in (401), and nothing said why."""
    import http.client

    from dashboard_support import start_dashboard, write_project

    env = write_project(tmp_path / "p", "file", None)
    for bad in ("abcdefgh&ijklmnop1", "abcdefgh;ijklmnop1", "abcdefgh#ijklmnop1", "abcdefgh+ijklmnop1",
                "abcdefgh%41jklmnop1", "short-token"):
        r = subprocess.run([sys.executable, "-m", "forge", "dashboard", "--listen=127.0.0.1:0"],
                           env={**env, "FORGE_DASHBOARD_TOKEN": bad}, capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "FORGE_DASHBOARD_TOKEN" in r.stderr, (bad, r.returncode, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and "Open http" not in r.stdout
    d = start_dashboard({**env, "FORGE_DASHBOARD_TOKEN": "Good-token_1.2~abcdef"})
    try:
        assert d.token == "Good-token_1.2~abcdef"
        conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=60)
        conn.request("GET", d.url[len(d.base):])  # what a browser does with the printed URL
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 303
        cookie = resp.getheader("set-cookie", "").split(";")[0]
        conn.request("GET", "/", headers={"Cookie": cookie})
        resp = conn.getresponse()
        assert resp.status == 200 and b"Queues" in resp.read()
        conn.close()
    finally:
        d.stop()
