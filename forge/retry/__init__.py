"""A job's retry policy: how long to wait before each retry, when to stop retrying, and the
outcome protocol a command (any program) uses to ask for a retry or a final failure.

- ``backoff``: the delay before a retry (a list of seconds, or exponential with a cap and
  jitter), computed in one function, :func:`forge.retry.backoff.delay`;
- ``bounds``: the bounds beyond the attempt count (``retry_until``, ``max_exceptions``,
  ``max_releases``), part of the job record;
- ``rules``: a command's declared defaults (``@command(..., tries=5)``) and dispatch deadlines;
- ``outcome``: the exit codes 75 (retry later, uncounted) and 65 (fail now), the
  ``::forge-retry-after`` line, and ``forge.Retry`` / ``forge.Fail``;
- ``policy``: the one decision a worker takes after an attempt (release or fail, after how
  long, counted or not), and the schedule ``queue:show`` prints.

Importing this package is cheap; each module imports only what it uses.
"""
