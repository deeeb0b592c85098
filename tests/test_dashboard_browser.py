"""The dashboard in a real headless browser: Debian's Chromium driven by Playwright, against a
real ``forge dashboard`` process, real workers and a real store (file and Redis).

One browser for the module, one dashboard per backend; each test opens its own page.
"""

from __future__ import annotations

import http.client
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from conftest import require_redis
from dashboard_support import Dashboard, start_dashboard, write_project
from waitfor import wait_for

from forge.queue import QueuedCommand, QueueManager

CHROMIUM = "/usr/bin/chromium"
DOCS = Path(__file__).resolve().parent.parent / "docs"
#: Screenshots go to the test's tmp dir; with FORGE_UPDATE_SCREENSHOTS=1 they also replace the
#: README's pictures in docs/ (a test run must not change the checkout otherwise).
UPDATE_DOCS = os.environ.get("FORGE_UPDATE_SCREENSHOTS") == "1"
HOSTILE = "<img src=x onerror=alert(1)>"

playwright_api = pytest.importorskip("playwright.sync_api", reason="the test extra installs playwright")
if not Path(CHROMIUM).exists():  # .ci/run installs it; a missing browser must not pass silently
    pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium", pytrace=False)

MS = 30_000  # Playwright timeouts (ms): generous, the machine is loaded


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    pw = playwright_api.sync_playwright().start()
    b = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
    try:
        yield b
    finally:
        b.close()
        pw.stop()


class Env:
    """A project on one backend with a dashboard (actions allowed) and, on demand, a worker."""

    def __init__(self, kind: str, root: Path) -> None:
        self.kind = kind
        self.env = write_project(root, kind, os.environ.get("FORGE_TEST_REDIS_URL"))
        self.root = root
        self.dash: Dashboard = start_dashboard(self.env, "--allow-actions")
        self.worker: subprocess.Popen[str] | None = None
        from forge.config import load_settings
        from forge.queue.manager import connect
        from forge.registry.discovery import build_registry

        settings = load_settings(env=self.env)
        self.manager = QueueManager(connect(None, settings), settings=settings, registry=build_registry(settings))

    def dispatch(self, command: str, *args: str, queue: str = "default", delay: float = 0, **meta: str) -> str:
        cmd = QueuedCommand(command).with_args(list(args))
        if delay:
            cmd = cmd.with_delay(delay)
        for k, v in meta.items():
            cmd = cmd.with_metadata(k, v)
        return self.manager.add_queue(queue).dispatch(cmd)

    def start_worker(self) -> None:
        if self.worker is None:
            self.worker = subprocess.Popen(
                [sys.executable, "-m", "forge", "queue:work", "--queue", "default,evil", "--sleep", "0.2"],
                env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)

    def job(self, job_id: str) -> Any:
        return self.manager.find(job_id)

    def state(self, job_id: str) -> str:
        return str(self.job(job_id).state)

    def paused(self) -> set[str]:
        return self.manager.backend.paused()

    def close(self) -> None:
        if self.worker is not None and self.worker.poll() is None:
            self.worker.terminate()
            try:
                self.worker.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.worker.kill()
                self.worker.wait()
        self.dash.stop()
        self.manager.backend.close()
        if self.kind == "redis":
            import redis

            client = redis.Redis.from_url(os.environ["FORGE_TEST_REDIS_URL"])
            keys = list(client.scan_iter(match=f"{self.env['FORGE_TEST_PREFIX']}:*", count=1000))
            if keys:
                client.delete(*keys)
            client.close()


@pytest.fixture(scope="module", params=["file", "redis"])
def site(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    if request.param == "redis":
        require_redis()
    e = Env(request.param, tmp_path_factory.mktemp(f"dash-{request.param}"))
    try:
        yield e
    finally:
        e.close()


@pytest.fixture
def page(browser: Any, site: Env) -> Iterator[Any]:
    """A logged-in page (the token URL sets the cookie) that records every dialog."""
    context = browser.new_context(viewport={"width": 1360, "height": 900})
    p = context.new_page()
    p.set_default_timeout(MS)
    p.dialogs = []  # type: ignore[attr-defined]

    def on_dialog(d: Any) -> None:
        p.dialogs.append(d.message)  # type: ignore[attr-defined]
        d.accept()

    p.on("dialog", on_dialog)
    p.goto(site.dash.url)
    assert p.url == site.dash.base + "/", "the token URL redirects to the page without the token"
    try:
        yield p
    finally:
        context.close()


def _marker(p: Any) -> None:
    p.evaluate("window.__notReloaded = true")


def _not_reloaded(p: Any) -> bool:
    return bool(p.evaluate("window.__notReloaded === true"))


# -- pages with real data -----------------------------------------------------------------------

def test_screenshot_overview(page: Any, site: Env, tmp_path: Path) -> None:
    """The overview with a worker, schedules, failures and sparklines, saved for the README."""
    site.start_worker()
    for _ in range(4):
        site.dispatch("dash:work", "--steps=2", "--delay=0.05")
    site.dispatch("dash:echo", "later", queue="emails", delay=3600)
    site.dispatch("dash:fail", "--why=disk full")
    for n in range(3):
        site.dispatch("dash:echo", f"report-{n}", queue="reports")
    site.manager.pause("reports")
    last = site.dispatch("dash:echo", "last")
    wait_for(lambda: site.state(last) == "done", timeout=60, interval=0.05)
    site.dispatch("dash:work", "--steps=6", "--delay=0.5")
    page.goto(site.dash.base + "/")
    page.locator("table.workers").wait_for()
    # the sparklines come from the stats journal, read again every 10 s: the jobs just done show
    page.wait_for_function("() => [...document.querySelectorAll('tr[data-queue=default] svg.spark title')]"
                           ".some(t => /peak [1-9]/.test(t.textContent))", timeout=60_000)
    page.screenshot(path=str(tmp_path / "overview.png"), full_page=True)
    assert page.locator("table.queues tbody tr").count() >= 3
    assert page.locator('tr[data-queue="reports"] .state-paused').inner_text() == "paused"
    site.manager.resume("reports")
    if site.kind == "file" and UPDATE_DOCS:
        DOCS.mkdir(exist_ok=True)
        shutil.copy(tmp_path / "overview.png", DOCS / "dashboard-overview.png")



def test_overview_shows_queues_workers_schedules_and_updates_live(page: Any, site: Env,
                                                                  tmp_path: Path) -> None:
    site.dispatch("dash:echo", "hello", queue="imports")
    page.goto(site.dash.base + "/")
    row = page.locator('tr[data-queue="imports"]')
    assert row.locator("td.num").first.inner_text() == "1"
    assert page.locator("table.schedules tbody tr").count() == 2
    assert page.locator("table.schedules").get_by_text("nightly-echo").count() == 1
    _marker(page)
    site.dispatch("dash:echo", "again", queue="imports")
    page.locator('tr[data-queue="imports"] td.num').first.filter(has_text="2").wait_for()
    site.dispatch("dash:echo", "new", queue="fresh")
    page.locator('tr[data-queue="fresh"]').wait_for()
    assert _not_reloaded(page)
    # numbers are right-aligned, as in every table
    assert page.locator('tr[data-queue="imports"] td.num').first.evaluate(
        "e => getComputedStyle(e).textAlign") == "right"


def test_job_list_paginates_and_new_jobs_appear_without_reload(page: Any, site: Env) -> None:
    for n in range(7):
        site.dispatch("dash:echo", f"item-{n}", queue="paged")
    page.goto(site.dash.base + "/queues/paged/jobs?state=pending&limit=25")
    assert page.locator("table.jobs tbody tr").count() == 7
    assert page.locator("nav.tabs .tab[aria-current=page] .count").inner_text() == "7"
    _marker(page)
    new = site.dispatch("dash:echo", "late", queue="paged")
    page.locator(f'tr[data-job="{new}"]').wait_for()
    assert _not_reloaded(page)
    # the command filter and the page size, through the form
    page.goto(site.dash.base + "/queues/paged/jobs?state=pending&limit=25&command=dash:nothing")
    assert "No pending jobs of dash:nothing" in page.locator("#r-jobs").inner_text()


def test_running_job_page_streams_progress_and_log(page: Any, site: Env, tmp_path: Path) -> None:
    site.manager.pause("default")  # it waits until the page is open
    job_id = site.dispatch("dash:work", "--steps=10", "--delay=1")  # 10 s: still running when we look
    page.goto(f"{site.dash.base}/jobs/{job_id}")
    assert page.locator("h2 .state").inner_text() == "pending"
    _marker(page)
    site.start_worker()
    site.manager.resume("default")
    page.locator("h2 .state-reserved").wait_for(timeout=60_000)
    # the bar, its message and the log advance while it runs
    page.locator("#log").filter(has_text="step 2 of 10").wait_for(timeout=60_000)
    first = float(page.locator(".job-progress progress").get_attribute("value") or 0)
    assert first < 100
    page.wait_for_function(f"() => Number(document.querySelector('.job-progress progress')?.value) > {first}",
                           timeout=60_000)
    assert "step" in page.locator(".job-progress .pmsg").inner_text()
    if page.locator("h2 .state-reserved").count():  # still running: the picture for the README
        page.screenshot(path=str(tmp_path / "job.png"))
        if site.kind == "file" and UPDATE_DOCS:
            DOCS.mkdir(exist_ok=True)
            shutil.copy(tmp_path / "job.png", DOCS / "dashboard-job.png")
    page.locator("h2 .state-done").wait_for(timeout=60_000)
    text = page.locator("#log").inner_text()
    assert text.count("step 10 of 10") == 1 and text.index("step 1 of 10") < text.index("step 10 of 10")
    assert _not_reloaded(page)
    assert page.locator("table.events").inner_text().count("done") >= 1


def test_hostile_arguments_metadata_and_output_render_as_text(page: Any, site: Env) -> None:
    site.start_worker()
    job_id = site.dispatch("dash:echo", HOSTILE, "</pre><script>alert(5)</script>", queue="evil",
                           note="<svg onload=alert(2)>", **{"<b>key</b>": '"><img src=y onerror=alert(3)>'})
    wait_for(lambda: site.state(job_id) == "done", timeout=60, interval=0.05)
    for path in (f"/jobs/{job_id}", "/queues/evil/jobs?state=done", "/"):
        page.goto(site.dash.base + path)
        page.wait_for_timeout(300)  # let the live stream swap its regions in once
        assert page.locator("main img, main svg[onload], main b[onmouseover], main script").count() == 0
    page.goto(f"{site.dash.base}/jobs/{job_id}")
    assert page.locator("ol.args code").first.inner_text() == HOSTILE
    assert "<svg onload=alert(2)>" in page.locator("pre.meta").inner_text()
    page.locator("#log").filter(has_text="<script>alert('out')</script>").wait_for()
    assert HOSTILE in page.locator("#log").inner_text()
    assert page.dialogs == []


# -- actions and their protection -----------------------------------------------------------------

def test_actions_cancel_retry_forget_pause_with_the_token(page: Any, site: Env) -> None:
    job_id = site.dispatch("dash:echo", "to-cancel", queue="idle")
    page.goto(f"{site.dash.base}/jobs/{job_id}")
    page.locator('button[data-action="cancel"]').click()
    page.locator(".flash-ok").wait_for()
    assert page.dialogs and "Cancel job" in page.dialogs[-1]
    assert site.state(job_id) == "failed" and site.job(job_id).failure.reason == "cancelled"
    page.locator("h2 .state-failed").wait_for()
    page.locator('button[data-action="retry"]').click()
    page.locator(".flash-ok").filter(has_text="pending again").wait_for()
    assert site.state(job_id) == "pending"
    # failed jobs grouped by command and error; retry the group, then forget one
    for n in range(3):
        jid = site.dispatch("dash:echo", f"group-{n}", queue="idle")
        site.manager.cancel(jid)
    page.goto(site.dash.base + "/failed?queue=idle")
    group = page.locator('tr[data-group="dash:echo"]')
    assert group.locator("td.num").inner_text() == "3"
    assert "cancelled" in group.inner_text()
    group.locator('button[data-action="retry-group"]').click()
    page.locator(".flash-ok").filter(has_text="Retried 3").wait_for()
    site.manager.cancel(job_id)
    page.goto(f"{site.dash.base}/jobs/{job_id}")
    page.locator('button[data-action="forget"]').click()
    page.locator(".flash-ok").filter(has_text="deleted").wait_for()
    assert site.manager.backend.find(job_id) is None
    # pause and resume from the overview
    page.goto(site.dash.base + "/")
    page.locator('tr[data-queue="idle"] button[data-action="pause"]').click()
    page.locator(".flash-ok").filter(has_text="paused").wait_for()
    assert "idle" in site.paused()
    page.locator('tr[data-queue="idle"] button[data-action="resume"]').click()
    page.locator(".flash-ok").filter(has_text="resumed").wait_for()
    assert "idle" not in site.paused()


def test_without_the_token_nothing_is_shown_or_done(browser: Any, site: Env) -> None:
    context = browser.new_context()
    try:
        p = context.new_page()
        resp = p.goto(site.dash.base + "/")
        assert resp.status == 401 and "needs its token" in p.inner_text("body")
        assert p.goto(site.dash.base + "/?token=wrong-token-xxxxxxxx").status == 401
        site.dispatch("dash:echo", "x", queue="guarded")
        origin = {"Origin": site.dash.base}
        for status, headers in ((401, origin), (403, {**origin, "Cookie": f"forge_dashboard_{site.dash.port}={site.dash.token}"})):
            r = context.request.post(site.dash.base + "/actions/pause", form={"queue": "guarded", "next": "/"},
                                     headers=headers, max_redirects=0)
            assert r.status == status, r.text()
        assert "guarded" not in site.paused()
        for path in ("/live?view=overview", "/metrics", f"/jobs/{'0' * 8}"):
            assert context.request.get(site.dash.base + path).status == 401
    finally:
        context.close()


def test_a_cross_origin_post_is_refused(page: Any, site: Env, tmp_path: Path) -> None:
    site.dispatch("dash:echo", "x", queue="target")
    csrf = page.locator('input[name="csrf"]').first.get_attribute("value")  # even a leaked CSRF token
    (tmp_path / "evil.html").write_text(
        f'<form id="f" method="post" action="{site.dash.base}/actions/pause">'
        f'<input name="queue" value="target"><input name="csrf" value="{csrf}"><input name="next" value="/"></form>'
        '<script>document.getElementById("f").submit()</script>')
    (tmp_path / "quiet.html").write_text("<p>another origin</p>")
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(SimpleHTTPRequestHandler, directory=str(tmp_path)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with page.expect_navigation(url=f"{site.dash.base}/actions/pause"):
            page.goto(f"http://127.0.0.1:{server.server_address[1]}/evil.html")
        assert "Refused" in page.inner_text("body")
        page.goto(f"http://127.0.0.1:{server.server_address[1]}/quiet.html")
        got = page.evaluate(f"""() => fetch("{site.dash.base}/actions/pause", {{method: "POST", mode: "no-cors",
            credentials: "include", body: new URLSearchParams({{queue: "target", csrf: "{csrf}"}})}})
            .then(r => r.type, e => String(e))""")
        assert got in ("opaque", "TypeError: Failed to fetch")
    finally:
        server.shutdown()
    assert "target" not in site.paused()


def test_host_header_of_another_name_is_refused(site: Env) -> None:
    """A DNS-rebinding page reaches the port under its own name: refused, token or not."""
    conn = http.client.HTTPConnection("127.0.0.1", site.dash.port, timeout=30)
    try:
        for host in (f"evil.example:{site.dash.port}", "evil.example"):
            conn.request("GET", "/", headers={"Host": host,
                                              "Cookie": f"forge_dashboard_{site.dash.port}={site.dash.token}"})
            resp = conn.getresponse()
            assert resp.status == 400 and b"Host not allowed" in resp.read()
        conn.request("GET", "/", headers={"Host": f"localhost:{site.dash.port}",
                                          "Cookie": f"forge_dashboard_{site.dash.port}={site.dash.token}"})
        resp = conn.getresponse()
        body = resp.read()
        assert resp.status == 200 and b"Queues" in body
        assert "script-src 'self'" in resp.getheader("Content-Security-Policy", "")
        assert "frame-ancestors 'none'" in resp.getheader("Content-Security-Policy", "")
        assert resp.getheader("X-Content-Type-Options") == "nosniff"
        conn.request("GET", "/metrics", headers={"Host": f"127.0.0.1:{site.dash.port}",
                                                 "Authorization": f"Bearer {site.dash.token}"})
        resp = conn.getresponse()
        text = resp.read().decode()
        assert resp.status == 200, text
        from prometheus_client.parser import text_string_to_metric_families

        names = {f.name for f in text_string_to_metric_families(text)}
        assert "forge_queue_jobs_pending" in names
    finally:
        conn.close()


def test_read_only_dashboard_has_no_actions(browser: Any, site: Env) -> None:
    if site.kind != "file":
        pytest.skip("the same code path on both backends: once is enough")
    ro = start_dashboard(site.env)
    context = browser.new_context()
    try:
        p = context.new_page()
        p.goto(ro.url)
        site.dispatch("dash:echo", "x", queue="ro")
        p.goto(ro.base + "/queues/ro/jobs")
        assert p.locator("table.jobs tbody tr").count() >= 1
        assert p.locator("button[data-action]").count() == 0
        assert p.locator(".mode").inner_text() == "read-only"
        r = context.request.post(ro.base + "/actions/pause", form={"queue": "ro"},
                                 headers={"Origin": ro.base}, max_redirects=0)
        assert r.status == 403 and "read-only" in r.text()
    finally:
        context.close()
        ro.stop()
    assert "ro" not in site.paused()
