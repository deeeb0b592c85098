"""The dashboard without a browser: paging at any depth on both backends, the listen address,
the guard's Host rules, the start-up lines and the error without the extra."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import forge_cmd
from dashboard_support import start_dashboard, write_project

from forge.dashboard import listing
from forge.dashboard.security import Guard
from forge.dashboard.server import parse_listen
from forge.errors import UsageError
from forge.job import State
from forge.queue import QueuedCommand


def _fill(target: Any, n: int, queue: str = "paging") -> list[str]:
    q = target.queue(queue)
    ids: list[str] = []
    for start in range(0, n, 100):
        ids += q.dispatch_many([QueuedCommand("probe:run").with_args([f"a{i}"]) for i in range(start, min(n, start + 100))])
    return ids


def test_pages_walk_the_listing_in_order_on_both_backends(queue_target: Any) -> None:
    ids = _fill(queue_target, 230)
    b = queue_target.backend
    order = [i.id for i in b.jobs(queue="paging", state=State.PENDING)]
    assert order == ids  # FIFO: the order the pages must follow
    seen: list[str] = []
    offset: int | None = 0
    while offset is not None:
        pg = listing.page(b, "paging", State.PENDING, offset=offset, limit=50)
        assert pg.total == 230
        seen += [j.id for j in pg.jobs]
        offset = pg.next_offset
    assert seen == ids
    # small pages: near the head, in the middle and near the tail (three ways to pick a page)
    small: list[str] = []
    offset = 0
    while offset is not None:
        pg = listing.page(b, "paging", State.PENDING, offset=offset, limit=10)
        small += [j.id for j in pg.jobs]
        offset = pg.next_offset
    assert small == ids
    deep = listing.page(b, "paging", State.PENDING, offset=200, limit=50)
    assert [j.id for j in deep.jobs] == ids[200:] and deep.next_offset is None and deep.prev_offset == 150


def test_failed_pages_are_newest_first_and_the_command_filter_scans(queue_target: Any) -> None:
    ids = _fill(queue_target, 12)
    q = queue_target.queue("paging")
    odd = q.dispatch(QueuedCommand("probe:noop"))
    m = __import__("forge.queue", fromlist=["QueueManager"]).QueueManager(queue_target.backend)
    for i in [*ids[:6], odd]:
        m.cancel(i)
    b = queue_target.backend
    pg = listing.page(b, "paging", State.FAILED, offset=0, limit=3)
    assert pg.total == 7 and [j.id for j in pg.jobs] == [odd, ids[5], ids[4]]
    assert [j.id for j in listing.page(b, "paging", State.FAILED, offset=6, limit=3).jobs] == [ids[0]]
    assert [j.id for j in listing.page(b, "paging", State.FAILED, offset=5, limit=1).jobs] == [ids[1]]
    only = listing.page(b, "paging", State.FAILED, offset=0, limit=10, command="probe:noop")
    assert [j.id for j in only.jobs] == [odd] and only.next_offset is None
    pending = listing.page(b, "paging", State.PENDING, offset=0, limit=2, command="probe:run")
    assert [j.id for j in pending.jobs] == ids[6:8] and pending.next_offset == 2
    delayed = q.dispatch(QueuedCommand("probe:run").with_delay(3600))
    assert [j.id for j in listing.page(b, "paging", State.DELAYED).jobs] == [delayed]
    assert listing.page(b, "paging", State.PENDING).total == 6


@pytest.mark.parametrize(("text", "host", "port"), [
    ("127.0.0.1:8765", "127.0.0.1", 8765), ("9000", "127.0.0.1", 9000), (":0", "127.0.0.1", 0),
    ("[::1]:8080", "::1", 8080), ("0.0.0.0:80", "0.0.0.0", 80), ("localhost:1234", "localhost", 1234),
])
def test_listen_addresses(text: str, host: str, port: int) -> None:
    assert (parse_listen(text).host, parse_listen(text).port) == (host, port)


@pytest.mark.parametrize("text", ["127.0.0.1:http", "1.2.3.4:70000", "[::1", "host:"])
def test_bad_listen_addresses(text: str) -> None:
    with pytest.raises(UsageError, match="--listen"):
        parse_listen(text)


def test_host_rules() -> None:
    loop = Guard("127.0.0.1", 8765)
    assert loop.host_ok("127.0.0.1:8765") and loop.host_ok("localhost:8765") and loop.host_ok("[::1]:8765")
    assert not loop.host_ok("evil.example:8765") and not loop.host_ok("127.0.0.1:9999") and not loop.host_ok("")
    wild = Guard("0.0.0.0", 8765, extra_hosts=("dash.internal",))
    assert wild.host_ok("10.1.2.3:8765") and wild.host_ok("dash.internal:8765") and wild.host_ok("[fe80::1]:8765")
    assert not wild.host_ok("rebind.attacker.example:8765") and not wild.host_ok("10.1.2.3:1")
    assert Guard("127.0.0.1", 1).csrf != Guard("127.0.0.1", 1).csrf  # a new token each start


def test_dashboard_without_the_extra_says_how_to_install_it(tmp_path: Path) -> None:
    code = ("import sys; sys.modules['starlette'] = None; from forge.cli.main import main; "
            "sys.exit(main(['dashboard']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'forge-jobs[dashboard]'" in lines[0] and "starlette" in lines[0]


def test_bad_listen_and_a_busy_port_are_one_line_errors(tmp_path: Path) -> None:
    env = write_project(tmp_path / "p", "file", None)
    bad = subprocess.run([*forge_cmd(), "dashboard", "--listen=127.0.0.1:http"], env=env, capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "--listen" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        busy = subprocess.run([*forge_cmd(), "dashboard", f"--listen=127.0.0.1:{port}"], env=env,
                              capture_output=True, text=True, timeout=60)
    assert busy.returncode == 1 and "in use" in busy.stderr and len(busy.stderr.strip().splitlines()) == 1


def test_start_up_says_where_it_listens_and_warns_off_loopback(tmp_path: Path) -> None:
    env = write_project(tmp_path / "p", "file", None)
    d = start_dashboard(env)
    d.stop()
    err = "".join(d.stderr)
    assert "read-only" in err and "this machine only" in err and "Warning" not in err
    wide = start_dashboard(env, "--listen=0.0.0.0:0")  # start_dashboard adds --listen 127.0.0.1:0 first
    wide.stop()
    assert "Warning" in "".join(wide.stderr) and "every interface" in "".join(wide.stderr)


def test_file_listings_match_the_backend_and_see_every_change(queue_target: Any) -> None:
    if queue_target.kind != "file":
        pytest.skip("the file backend's reusable listings")
    b = queue_target.backend
    ids = _fill(queue_target, 30)
    q = queue_target.queue("paging")
    q.dispatch(QueuedCommand("probe:run").with_delay(3600))
    from forge.queue import QueueManager

    QueueManager(b).cancel(ids[0])
    dirs = b.listings  # the backend's own, behind its page()
    dirs.SETTLED = 0.0  # reuse every listing: what a quiet queue gets after a second
    assert dirs.stats() == b.stats()
    assert dirs.stats() == b.stats()  # from the cache
    new = q.dispatch(QueuedCommand("probe:run"))
    assert dirs.stats() == b.stats() and dirs.stats()[0].pending == 30
    last = listing.page(b, "paging", State.PENDING, offset=29, limit=5, dirs=dirs)
    assert [j.id for j in last.jobs] == [new]


def test_bad_page_and_stream_parameters_are_400s(tmp_path: Path) -> None:
    import http.client

    env = write_project(tmp_path / "p", "file", None)
    d = start_dashboard(env)
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=60)
    headers = {"Host": f"127.0.0.1:{d.port}", "Cookie": f"forge_dashboard_{d.port}={d.token}"}
    try:
        for path in ("/live?view=jobs&queue=default&state=bogus", "/live?view=nope", "/live?view=job&id=x",
                     "/queues/default/jobs?state=bogus", "/queues/default/jobs?offset=-x",
                     "/queues/bad%20name/jobs", "/live?view=jobs&queue=bad%20name"):
            conn.request("GET", path, headers=headers)
            resp = conn.getresponse()
            body = resp.read()
            assert resp.status == 400, (path, resp.status, body[:200])
        conn.request("GET", "/jobs/0123", headers=headers)  # a prefix that matches nothing
        resp = conn.getresponse()
        assert resp.status == 404 and b"No such job" in resp.read()
    finally:
        conn.close()
        d.stop()
    assert "Traceback" not in "".join(d.stderr)
