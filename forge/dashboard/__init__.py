"""``forge dashboard``: a web view of the queues, workers, schedules and jobs of one connection.

Installed with the ``dashboard`` extra (Starlette, uvicorn, Jinja2). The pieces:

* ``server``: parses ``--listen``, binds, prints the URL with the token, runs uvicorn;
* ``security``: the token, the Host/Origin/CSRF checks and the security headers (one middleware);
* ``app``: the Starlette routes: pages, ``/live`` (server-sent events), actions, ``/metrics``;
* ``views``: what each page shows, read from the store; ``listing``: a page of jobs at any depth;
* ``stats_view``: the overview's sparklines from ``forge.stats``;
* ``templates/`` and ``static/``: Jinja2 templates, one small script and one stylesheet.
"""

from __future__ import annotations

#: What the dashboard needs beyond forge itself (the ``dashboard`` extra).
REQUIRED = ("starlette", "uvicorn", "jinja2")
INSTALL = "pip install 'forge-jobs[dashboard]'"
