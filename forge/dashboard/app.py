"""The dashboard's Starlette application: pages, the live-update stream, actions, ``/metrics``.

Pages are Jinja2 templates (autoescaped, every one); each live part of a page is a partial
template in a ``data-region`` element, and ``/live`` re-renders those partials from the store
every couple of seconds and pushes the ones that changed as server-sent events, which the
small vendored ``dashboard.js`` swaps in (and appends a job's new log output as text). So
there is one way to render anything, on the server, escaped.
"""

from __future__ import annotations

import json
import secrets
import time
import traceback
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode

import anyio
import jinja2
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from forge.config import validate_queue_name
from forge.dashboard import listing
from forge.dashboard.security import CSRF_FIELD, CSRF_HEADER, Guard, GuardMiddleware
from forge.dashboard.stats_view import sparkline
from forge.dashboard.views import PAGE_SIZES, Views, decode_group
from forge.durations import format_duration
from forge.errors import ForgeError
from forge.job import State, valid_id
from forge.queue.manager import QueueManager

#: Seconds between two looks at the store for one open page, at least; a page whose render
#: takes longer is looked at less often (``LOAD_FACTOR`` times its render time).
INTERVAL = 1.5
LOAD_FACTOR = 40
MAX_INTERVAL = 15.0
KEEPALIVE = 15.0
MAX_FORM = 64 * 1024


def _num(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and not value.is_integer():
        return f"{value:,.1f}"
    return f"{int(value):,}"


def _ago(seconds: Any) -> str:
    return "" if seconds is None else format_duration(max(float(seconds), 0.0))


def _clock(t: Any) -> str:
    if not t:
        return ""
    dt = datetime.fromtimestamp(float(t))
    return dt.strftime("%H:%M:%S" if dt.date() == datetime.now().date() else "%Y-%m-%d %H:%M")


def _full_time(t: Any) -> str:
    """Local date and time (what ``queue:show`` prints)."""
    return datetime.fromtimestamp(float(t)).strftime("%Y-%m-%d %H:%M:%S") if t else ""


def _iso_text(text: Any) -> str:
    """An RFC 3339 string from the scheduler, shown as local time."""
    if not text:
        return ""
    try:
        return _clock(datetime.fromisoformat(str(text).replace("Z", "+00:00")).timestamp())
    except ValueError:
        return str(text)


def environment() -> jinja2.Environment:
    """The Jinja environment of the dashboard's packaged templates: autoescaping on, undefined
    names an error, with the dashboard's filters and globals."""
    env = jinja2.Environment(loader=jinja2.PackageLoader("forge.dashboard", "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters.update(num=_num, ago=_ago, clock=_clock, full_time=_full_time, iso_text=_iso_text,
                       duration=lambda s: "" if s is None else format_duration(float(s)))
    env.globals.update(sparkline=sparkline, states=[str(s) for s in listing.STATES], page_sizes=PAGE_SIZES)
    return env


class Dashboard:
    """One running dashboard: its store views, its guard and its templates."""

    def __init__(self, manager: QueueManager, guard: Guard, *, interval: float = INTERVAL) -> None:
        self.views = Views(manager)
        self.guard = guard
        self.env = environment()
        self.interval = interval
        self.location = manager.location
        self.flashes: dict[str, tuple[str, str]] = {}

    # -- plumbing -----------------------------------------------------------------------

    async def store(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run a blocking store call in a worker thread, one at a time."""
        def call() -> Any:
            with self.views.lock:
                return fn(*args, **kwargs)
        return await anyio.to_thread.run_sync(call)

    def render(self, name: str, **context: Any) -> str:
        """Template ``name`` rendered with ``context`` and what every page has (CSRF token,
        whether actions are allowed, the store's location)."""
        base = {"csrf": self.guard.csrf, "csrf_field": CSRF_FIELD, "actions": self.guard.allow_actions,
                "location": self.location}
        return self.env.get_template(name).render(**base, **context)

    def page(self, request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
        """The HTML response of page ``name``, with ``status``, carrying the flash message the
        request's ``flash`` key names (shown once)."""
        flash = self.flashes.pop(request.query_params.get("flash", ""), None)
        return HTMLResponse(self.render(name, flash=flash, path=request.url.path,
                                        here=_here(request), **context), status_code=status)

    def unauthorized(self, scope: dict[str, Any]) -> bytes:
        """The page a request without the token gets (the guard's 401 body)."""
        return self.render("unauthorized.html", flash=None, path="", here="/").encode()

    # -- pages --------------------------------------------------------------------------

    async def overview(self, request: Request) -> Response:
        """GET /: the queues, workers and schedules of the store."""
        data = await self.store(self.views.overview)
        return self.page(request, "overview.html", live=_live("overview"), nav="overview", **data)

    def _list_args(self, request: Request, queue: str) -> dict[str, Any]:
        q = request.query_params
        state = q.get("state") or "pending"
        if state not in {str(s) for s in listing.STATES}:
            raise _BadRequest(f"Unknown state {state!r}: one of {', '.join(map(str, listing.STATES))}.")
        try:
            offset = max(int(q.get("offset") or 0), 0)
            limit = int(q.get("limit") or 50)
        except ValueError:
            raise _BadRequest("offset and limit must be whole numbers.") from None
        if limit not in PAGE_SIZES:
            limit = 50
        command = (q.get("command") or "").strip() or None
        return {"queue": validate_queue_name(queue), "state": State(state), "offset": offset,
                "limit": limit, "command": command}

    async def jobs(self, request: Request) -> Response:
        """GET /queues/{queue}/jobs: one page of the queue's jobs in one state, optionally of one
        command. A bad state, offset or limit is a 400."""
        args = self._list_args(request, request.path_params["queue"])
        data = await self.store(self.views.job_list, args["queue"], args["state"], offset=args["offset"],
                                limit=args["limit"], command=args["command"])
        live = _live("jobs", queue=args["queue"], state=str(args["state"]), offset=args["offset"],
                     limit=args["limit"], command=args["command"] or "")
        return self.page(request, "jobs.html", live=live, nav="jobs", **data)

    async def jobs_index(self, request: Request) -> Response:
        """GET /jobs: the first queue's job list (a 303), or a message when no queue exists yet."""
        names = await self.store(self.views.manager.list)
        if not names:
            return self.page(request, "message.html", nav="jobs", title="No queues yet",
                             text="No job has been dispatched to this connection yet.")
        return RedirectResponse(f"/queues/{names[0]}/jobs", status_code=303)

    async def job(self, request: Request) -> Response:
        """GET /jobs/{id}: a job's detail and log tail. An id prefix or partial id redirects to
        the full id; an unknown job is a 404."""
        job_id = request.path_params["job_id"]
        if not valid_id(job_id):
            try:
                job_id = await self.store(self.views.manager.resolve_id, job_id.strip())
            except ForgeError as exc:
                return self.page(request, "message.html", 404, nav="", title="No such job", text=exc.message)
            return RedirectResponse(f"/jobs/{job_id}", status_code=303)
        detail = await self.store(self.views.job, job_id)
        if detail is None:
            return self.page(request, "message.html", 404, nav="", title="No such job",
                             text=f"No job {job_id} on this connection (done jobs are kept for the done retention).")
        tail, end = await self.store(self.views.log_tail, job_id)
        return self.page(request, "job.html", live=_live("job", id=job_id, log=end), nav="", d=detail,
                         log=tail, log_end=end)

    async def find(self, request: Request) -> Response:
        """GET /find?id=...: a redirect to that job's page (to / without an id)."""
        text = (request.query_params.get("id") or "").strip().lower()
        return RedirectResponse(f"/jobs/{text}" if text else "/", status_code=303)

    async def failed(self, request: Request) -> Response:
        """GET /failed: the failed jobs grouped by queue, command and reason, optionally of one
        queue."""
        queue = request.query_params.get("queue") or None
        if queue:
            validate_queue_name(queue)
        data = await self.store(self.views.failed_groups, queue)
        return self.page(request, "failed.html", live=_live("failed", queue=queue or ""), nav="failed", **data)

    async def metrics(self, request: Request) -> Response:
        """GET /metrics: the store's metrics in the Prometheus text format; 501 when the metrics
        module is not installed."""
        try:
            from forge.stats.metrics import render_metrics
        except ImportError:
            return Response("The metrics module is not installed with this forge.\n", status_code=501,
                            media_type="text/plain")
        body = await self.store(render_metrics, self.views.manager)
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    # -- live updates -------------------------------------------------------------------

    def regions(self, view: str, q: dict[str, str]) -> dict[str, str]:
        """The live regions of a page, rendered (blocking; called under the store lock)."""
        v = self.views
        here = _view_path(view, q)
        if view == "overview":
            if v.stats.stale():
                v.stats.refresh()
            data = v.overview()
            return {"r-queues": self.render("_queues.html", here=here, **data),
                    "r-workers": self.render("_workers.html", here=here, **data),
                    "r-schedules": self.render("_schedules.html", here=here, **data)}
        if view == "jobs":
            data = v.job_list(validate_queue_name(q.get("queue", "")), State(q.get("state", "pending")),
                              offset=int(q.get("offset") or 0), limit=int(q.get("limit") or 50),
                              command=q.get("command") or None)
            return {"r-tabs": self.render("_tabs.html", here=here, **data),
                    "r-jobs": self.render("_jobs.html", here=here, **data)}
        if view == "job":
            detail = v.job(q.get("id", ""))
            if detail is None:
                return {"r-job": self.render("_gone.html")}
            return {"r-job": self.render("_job.html", here=here, d=detail)}
        if view == "failed":
            data = v.failed_groups(q.get("queue") or None)
            return {"r-failed": self.render("_failed.html", here=here, **data)}
        return {}

    async def live(self, request: Request) -> Response:
        """GET /live: a server-sent event stream for one page view (overview, jobs, job or
        failed) sending each region when its HTML changes, the job log as it grows, and a problem
        event while the store is unreadable. A bad view or query is a 400."""
        q = dict(request.query_params)
        view = q.get("view", "")
        if view not in ("overview", "jobs", "job", "failed"):
            return Response("Unknown view.\n", status_code=400, media_type="text/plain")
        if view == "job" and not valid_id(q.get("id")):
            return Response("Invalid job id.\n", status_code=400, media_type="text/plain")
        if view == "jobs":  # the same checks as the page's (a bad one: 400 now, not an error per tick)
            args = self._list_args(request, q.get("queue", ""))
            q.update(queue=args["queue"], state=str(args["state"]), offset=str(args["offset"]),
                     limit=str(args["limit"]), command=args["command"] or "")
        if view == "failed" and q.get("queue"):
            validate_queue_name(q["queue"])
        try:
            log_offset = int(q.get("log", "-1"))
        except ValueError:
            log_offset = -1
        if log_offset > 1 << 40:  # no log is that long (a store's range would overflow): no log
            log_offset = -1

        async def stream() -> AsyncIterator[str]:
            nonlocal log_offset
            last: dict[str, str] = {}
            yield "retry: 3000\n\n"
            quiet_since = time.monotonic()
            while True:
                start = time.monotonic()
                try:
                    regions = await self.store(self.regions, view, q)
                except ForgeError as exc:
                    regions = {}
                    last.clear()  # sent again once the store is back: that clears the message
                    yield _event("problem", {"text": exc.message})
                except Exception:  # a bug: say so once a tick, keep the page's last state
                    traceback.print_exc()
                    regions = {}
                    last.clear()
                    yield _event("problem", {"text": "The dashboard failed to read the store (see its log)."})
                for rid, html in regions.items():
                    if last.get(rid) != html:
                        last[rid] = html
                        quiet_since = time.monotonic()
                        yield _event("region", {"id": rid, "html": html})
                if view == "job" and log_offset >= 0 and regions:  # not while the store is away
                    try:
                        data = await self.store(self.views.log, q["id"], log_offset)
                    except ForgeError as exc:  # gone since the regions were read: say so, go on
                        data = b""
                        last.clear()
                        yield _event("problem", {"text": exc.message})
                    if data:
                        log_offset += len(data)
                        quiet_since = time.monotonic()
                        yield _event("log", {"text": data.decode(errors="replace"), "offset": log_offset})
                if time.monotonic() - quiet_since > KEEPALIVE:
                    quiet_since = time.monotonic()
                    yield ": keep-alive\n\n"
                cost = time.monotonic() - start
                await anyio.sleep(min(max(self.interval, cost * LOAD_FACTOR), MAX_INTERVAL))

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"cache-control": "no-store", "x-accel-buffering": "no"})

    # -- actions ------------------------------------------------------------------------

    async def action(self, request: Request) -> Response:
        """POST /actions/{name}: run an action (retry, forget, cancel, pause, resume, ...) from a
        urlencoded form with the CSRF token, then redirect (303) to the form's ``next`` page on
        this site with the outcome as a flash. 413 for a form over the cap, 415 for another
        content type, 403 for a missing or wrong CSRF token."""
        # A urlencoded form (what the pages post), parsed with the standard library: Starlette's
        # own form parser needs python-multipart, which nothing else here needs.
        body = await request.body()
        if len(body) > MAX_FORM:
            return Response("Form too large.\n", status_code=413, media_type="text/plain")
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if body and ctype != "application/x-www-form-urlencoded":
            return Response("Expected a form (application/x-www-form-urlencoded).\n", status_code=415,
                            media_type="text/plain")
        fields = dict(parse_qsl(body.decode("utf-8", errors="replace"), keep_blank_values=True))
        supplied = fields.get(CSRF_FIELD) or request.headers.get(CSRF_HEADER)
        if not self.guard.csrf_ok(supplied):
            return Response("Missing or wrong CSRF token: reload the dashboard page and try again.\n",
                            status_code=403, media_type="text/plain")
        name = request.path_params["name"]
        try:
            kind, text = await self.store(self._act, name, fields)
        except ForgeError as exc:
            kind, text = "error", exc.message
        except _BadRequest as exc:
            kind, text = "error", str(exc)
        key = secrets.token_urlsafe(8)
        if len(self.flashes) > 100:
            self.flashes.clear()
        self.flashes[key] = (kind, text)
        back = fields.get("next") or "/"
        if not back.startswith("/") or back.startswith("//") or "\\" in back:
            back = "/"
        sep = "&" if "?" in back else "?"
        return RedirectResponse(f"{back}{sep}flash={key}", status_code=303)

    def _act(self, name: str, f: dict[str, str]) -> tuple[str, str]:
        m = self.views.manager
        job_id = f.get("job", "")
        queue = f.get("queue", "")
        if name in ("retry", "forget", "cancel"):
            if not valid_id(job_id):
                raise _BadRequest("No valid job id given.")
            if name == "retry":
                done = m.retry([job_id])
                return ("ok", f"Job {job_id} is pending again.") if done else \
                    ("error", f"Job {job_id} is not failed (or its unique key is held): nothing retried.")
            if name == "forget":
                return ("ok", f"Job {job_id} deleted.") if m.forget(job_id) else \
                    ("error", f"Job {job_id} is not a failed job: nothing deleted.")
            info = m.cancel_waiting(job_id)  # with its events, as queue:cancel
            if info is not None:
                return "ok", f"Job {job_id} cancelled."
            now = m.backend.find(job_id)
            if now is not None and now.state == State.RESERVED:
                m.backend.request_cancel(job_id)
                return "ok", f"Asked the worker of job {job_id} to kill it (it is failed as cancelled)."
            return "error", f"Job {job_id} is {now.state if now else 'gone'}: only a waiting or running job can be cancelled."
        if name in ("pause", "resume", "clear", "retry-queue", "flush-queue"):
            queue = validate_queue_name(queue)
            if name == "pause":
                m.pause(queue)
                return "ok", f"Queue {queue} paused: workers claim nothing from it until it is resumed."
            if name == "resume":
                m.resume(queue)
                return "ok", f"Queue {queue} resumed."
            if name == "clear":
                n = m.backend.clear(queue)
                return "ok", f"Deleted {n:,} pending and delayed job{'s' if n != 1 else ''} of queue {queue}."
            if name == "retry-queue":
                n = len(m.retry("all", queue=queue))
                return "ok", f"Retried {n:,} failed job{'s' if n != 1 else ''} of queue {queue}."
            n = m.flush(queue=queue)
            return "ok", f"Deleted {n:,} failed job{'s' if n != 1 else ''} of queue {queue}."
        if name in ("retry-group", "forget-group"):
            key = decode_group(f.get("group", ""))
            if key is None:
                raise _BadRequest("No valid failure group given.")
            ids = self.views.group_ids(key, queue or None)
            if name == "retry-group":
                n = len(m.retry(ids)) if ids else 0
                return "ok", f"Retried {n:,} job{'s' if n != 1 else ''} of {key[0]}."
            n = sum(1 for i in ids if m.forget(i))
            return "ok", f"Deleted {n:,} failed job{'s' if n != 1 else ''} of {key[0]}."
        raise _BadRequest(f"Unknown action {name!r}.")


class _BadRequest(Exception):
    pass


def _event(name: str, data: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def _live(view: str, **params: Any) -> str:
    return "/live?" + urlencode({"view": view, **{k: v for k, v in params.items() if v is not None}})


def _view_path(view: str, q: dict[str, str]) -> str:
    """The page a live view belongs to (where its action buttons return)."""
    if view == "jobs":
        keep = {k: q[k] for k in ("state", "offset", "limit", "command") if q.get(k)}
        return f"/queues/{q.get('queue', '')}/jobs" + ("?" + urlencode(keep) if keep else "")
    if view == "job":
        return f"/jobs/{q.get('id', '')}"
    if view == "failed":
        return "/failed" + (f"?{urlencode({'queue': q['queue']})}" if q.get("queue") else "")
    return "/"


def _here(request: Request) -> str:
    """The current page's path and query without the flash marker (where an action returns)."""
    query = [(k, v) for k, v in request.query_params.multi_items() if k != "flash"]
    return request.url.path + ("?" + urlencode(query) if query else "")


def build_app(manager: QueueManager, guard: Guard, *, interval: float = INTERVAL) -> Starlette:
    """The dashboard's Starlette app over ``manager``'s store: every route behind ``guard``
    (host, token, CSRF), pages refreshed every ``interval`` seconds; store errors become 400/503
    pages."""
    dash = Dashboard(manager, guard, interval=interval)

    async def bad_request(request: Request, exc: Exception) -> Response:
        return dash.page(request, "message.html", 400, nav="", title="Bad request", text=str(exc))

    async def forge_error(request: Request, exc: Exception) -> Response:
        text = exc.message if isinstance(exc, ForgeError) else str(exc)
        return dash.page(request, "message.html", 400 if exc.exit_code == 2 else 503,  # type: ignore[attr-defined]
                         nav="", title="The store said no", text=text)

    async def not_found(request: Request, exc: Exception) -> Response:
        return dash.page(request, "message.html", 404, nav="", title="Not found", text="No such page.")

    routes = [
        Route("/", dash.overview),
        Route("/jobs", dash.jobs_index),
        Route("/find", dash.find),
        Route("/jobs/{job_id}", dash.job),
        Route("/queues/{queue}/jobs", dash.jobs),
        Route("/failed", dash.failed),
        Route("/live", dash.live),
        Route("/metrics", dash.metrics),
        Route("/actions/{name}", dash.action, methods=["POST"]),
        Mount("/static", StaticFiles(packages=[("forge.dashboard", "static")]), name="static"),
    ]
    app = Starlette(routes=routes, exception_handlers={_BadRequest: bad_request, ForgeError: forge_error,
                                                       404: not_found},
                    middleware=[Middleware(GuardMiddleware, guard=guard, unauthorized=dash.unauthorized)])
    app.state.dashboard = dash
    return app
