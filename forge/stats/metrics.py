"""Prometheus metrics of a connection: ``render_metrics`` (``queue:metrics``, the dashboard's ``/metrics``).

Built with the official client library (``prometheus_client``, the ``metrics`` extra) as a
custom collector over the store, so every scrape reads the current state and counters that
survive restarts (they come from the outcome journal's totals, ``forge.stats``):

- per queue (label ``queue``): gauges ``forge_queue_jobs_pending``, ``_delayed``,
  ``_reserved``, ``_failed``, ``_done`` (kept for the retention), ``forge_queue_paused``,
  ``forge_queue_oldest_pending_age_seconds``; counters ``forge_queue_jobs_processed_total``
  (attempts that succeeded), ``forge_queue_jobs_failures_total`` (jobs failed for good),
  ``forge_queue_jobs_retries_total`` (attempts that failed and were released for a retry);
  histograms ``forge_queue_job_runtime_seconds`` and ``forge_queue_job_wait_seconds``;
- per worker (labels ``worker``, ``host``): ``forge_worker_up`` (1 for every live worker),
  ``forge_worker_busy`` (1 while it runs a job), ``forge_worker_jobs_done`` and
  ``forge_worker_jobs_failed`` (since it started, as ``queue:workers`` shows).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from forge.errors import ConfigError

if TYPE_CHECKING:
    from forge.queue.manager import QueueManager

INSTALL_HINT = "pip install 'forge-jobs[metrics]'"


def _client() -> Any:
    try:
        import prometheus_client
    except ImportError:
        raise ConfigError(f"Prometheus metrics need the prometheus_client library: {INSTALL_HINT}") from None
    return prometheus_client


def _manager(manager: Any) -> Any:
    if manager is None or isinstance(manager, str):
        from forge.queue.manager import QueueManager

        return QueueManager(manager)
    return manager


class ForgeCollector:
    """A ``prometheus_client`` collector reading one connection's store at each ``collect``."""

    def __init__(self, manager: QueueManager | str | None = None) -> None:
        self.manager = _manager(manager)

    def collect(self) -> Iterator[Any]:
        """The metric families of the connection's queues at this moment: their sizes by state
        and the journal's totals (outcome counters, run and wait histograms), read from the store
        on each call."""
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        from forge.stats import journal_for
        from forge.stats.records import BUCKETS

        backend = self.manager.backend
        now = time.time()
        stats = backend.stats(None)
        enabled = gc.isenabled()
        gc.disable()  # folding the open minutes builds many small acyclic lists (see forge.stats.compute)
        try:
            totals = journal_for(backend).totals()
        finally:
            if enabled:
                gc.enable()
        names = sorted({s.queue for s in stats} | set(totals))
        by_queue = {s.queue: s for s in stats}

        gauges = {state: GaugeMetricFamily(f"forge_queue_jobs_{state}", f"Jobs {state} in the queue now.",
                                           labels=["queue"])
                  for state in ("pending", "delayed", "reserved", "failed", "done")}
        gauges["done"].documentation = "Done jobs kept in the store (for done_retention)."
        paused = GaugeMetricFamily("forge_queue_paused", "1 if the queue is paused.", labels=["queue"])
        oldest = GaugeMetricFamily("forge_queue_oldest_pending_age_seconds",
                                   "Age of the oldest due job waiting in the queue (0 when none).", labels=["queue"])
        processed = CounterMetricFamily("forge_queue_jobs_processed", "Job attempts that succeeded.", labels=["queue"])
        failed = CounterMetricFamily("forge_queue_jobs_failures", "Jobs that failed for good (no attempts left).",
                                     labels=["queue"])
        retried = CounterMetricFamily("forge_queue_jobs_retries", "Failed attempts released for a retry.",
                                      labels=["queue"])
        runtime = HistogramMetricFamily("forge_queue_job_runtime_seconds", "Duration of job attempts.",
                                        labels=["queue"])
        wait = HistogramMetricFamily("forge_queue_job_wait_seconds",
                                     "Time from a job becoming available to its first claim.", labels=["queue"])
        for q in names:
            s = by_queue.get(q)
            for state, g in gauges.items():
                g.add_metric([q], float(getattr(s, state)) if s else 0.0)
            paused.add_metric([q], 1.0 if s and s.paused else 0.0)
            age = now - s.oldest_pending_at if s and s.oldest_pending_at else 0.0
            oldest.add_metric([q], max(age, 0.0))
            t = totals.get(q)
            processed.add_metric([q], float(t.done if t else 0))
            failed.add_metric([q], float(t.failed if t else 0))
            retried.add_metric([q], float(t.released if t else 0))
            for fam, h in ((runtime, t.runtime if t else None), (wait, t.wait if t else None)):
                counts = h.counts if h else [0] * (len(BUCKETS) + 1)
                cumulative, buckets = 0, []
                for bound, n in zip([*map(_bound, BUCKETS), "+Inf"], counts, strict=True):
                    cumulative += n
                    buckets.append((bound, float(cumulative)))
                fam.add_metric([q], buckets, h.sum if h else 0.0)
        yield from gauges.values()
        yield from (paused, oldest, processed, failed, retried, runtime, wait)
        yield from self._workers()

    def _workers(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        up = GaugeMetricFamily("forge_worker_up", "1 for every live worker.", labels=["worker", "host"])
        busy = GaugeMetricFamily("forge_worker_busy", "1 while the worker runs a job.", labels=["worker", "host"])
        done = GaugeMetricFamily("forge_worker_jobs_done", "Jobs the worker finished since it started.",
                                 labels=["worker", "host"])
        failed = GaugeMetricFamily("forge_worker_jobs_failed", "Jobs the worker failed since it started.",
                                   labels=["worker", "host"])
        for w in self.manager.workers():
            labels = [w.name, w.host]
            up.add_metric(labels, 1.0)
            busy.add_metric(labels, 1.0 if w.job_id else 0.0)
            done.add_metric(labels, float(w.done))
            failed.add_metric(labels, float(w.failed))
        yield from (up, busy, done, failed)


def _bound(b: float) -> str:
    return repr(float(b))


def render_metrics(manager: QueueManager | str | None = None) -> bytes:
    """The connection's metrics in the Prometheus text exposition format (version 0.0.4).

    ``manager``: a ``forge.QueueManager``, or a connection name (None: the default one).
    Raises ``ConfigError`` (with the pip command) when ``prometheus_client`` is missing.
    """
    client = _client()
    registry = client.CollectorRegistry(auto_describe=False)
    registry.register(ForgeCollector(manager))
    return bytes(client.generate_latest(registry))


#: The Content-Type of ``render_metrics``' output (for an HTTP endpoint such as ``/metrics``).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
