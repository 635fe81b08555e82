"""Prometheus metrics computed from the job state at scrape time.

The state keeps plain counters and histograms on its ``Function`` objects (``stats.py``);
nothing here runs per job. ``StateCollector`` turns them into metric families when
``/metrics`` is scraped, on a private registry (never prometheus_client's global one,
so that two servers in one process, as in the tests, do not mix).

Example::

    >>> from gearoffload_server.state import JobServerState, ManualScheduler
    >>> from gearoffload_server.config import ServerConfig
    >>> state = JobServerState(ServerConfig(), ManualScheduler())
    >>> _ = state.function(b"resize")
    >>> text = exposition(metrics_registry(state)).decode()
    >>> 'gearoffload_queue_depth{function="resize",priority="normal"} 0.0' in text
    True
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector, CollectorRegistry

from .state import JobServerState

__all__ = ["CONTENT_TYPE_LATEST", "StateCollector", "exposition", "metrics_registry"]

PRIORITIES = ("high", "normal", "low")


def label(name: bytes) -> str:
    """A function name as a label value: UTF-8, other bytes as ``\\xNN`` (stays unique)."""
    return name.decode("utf-8", "backslashreplace")


class StateCollector(Collector):
    """Yields the ``gearoffload_*`` metric families of one ``JobServerState``."""

    def __init__(self, state: JobServerState) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        state = self.state
        functions = list(state.functions.values())
        names = [label(f.name) for f in functions]

        info = InfoMetricFamily("gearoffload_server", "The job server's version.")
        info.add_metric([], {"version": state.config.version})
        yield info

        counters = (
            ("gearoffload_jobs_submitted", "Jobs created by a submission (not coalesced).",
             "submitted"),
            ("gearoffload_submissions_coalesced",
             "Submissions attached to a queued or running job with the same unique key.",
             "coalesced"),
            ("gearoffload_jobs_completed", "Jobs a worker answered with WORK_COMPLETE.",
             "completed"),
            ("gearoffload_jobs_failed", "Jobs that failed: WORK_FAIL, WORK_EXCEPTION, or "
             "their workers were lost --job-retries times (a retried job counts each time).",
             "failed"),
            ("gearoffload_jobs_exceptions", "Of the failed jobs, those answered with "
             "WORK_EXCEPTION.", "exceptions"),
        )
        for name, doc, attr in counters:
            family = CounterMetricFamily(name, doc, labels=["function"])
            for func, fname in zip(functions, names, strict=True):
                family.add_metric([fname], getattr(func, attr))
            yield family

        depth = GaugeMetricFamily("gearoffload_queue_depth",
                                  "Jobs waiting for a worker, per priority.",
                                  labels=["function", "priority"])
        scheduled = GaugeMetricFamily("gearoffload_jobs_scheduled",
                                      "Epoch jobs and retries not yet due.", labels=["function"])
        running = GaugeMetricFamily("gearoffload_jobs_running", "Jobs held by a worker.",
                                    labels=["function"])
        workers = GaugeMetricFamily("gearoffload_workers",
                                    "Connections registered as workers (CAN_DO).",
                                    labels=["function"])
        latency = HistogramMetricFamily(
            "gearoffload_job_duration_seconds",
            "Seconds from submission (or, for epoch jobs and retries, from falling due) to "
            "WORK_COMPLETE or failure.", labels=["function"])
        for func, fname in zip(functions, names, strict=True):
            for priority, count in zip(PRIORITIES, func.queued, strict=True):
                depth.add_metric([fname, priority], count)
            scheduled.add_metric([fname], func.scheduled)
            running.add_metric([fname], func.running)
            workers.add_metric([fname], len(func.workers))
            latency.add_metric([fname], func.latency.cumulative(), func.latency.sum)
        yield from (depth, scheduled, running, workers, latency)

        dead = GaugeMetricFamily("gearoffload_dead_letters",
                                 "Background jobs kept as dead letters (--retry-failed).",
                                 labels=["function"])
        per_function: dict[bytes, int] = {}
        for job in state.dead.values():
            per_function[job.function.name] = per_function.get(job.function.name, 0) + 1
        for fname, count in per_function.items():
            dead.add_metric([label(fname)], count)
        yield dead

        yield GaugeMetricFamily("gearoffload_connections",
                                "Open Gearman connections (clients, workers, admin).",
                                value=len(state.peers))
        yield GaugeMetricFamily("gearoffload_draining",
                                "1 while shutting down (SIGTERM): no new job is handed out.",
                                value=1 if state.draining else 0)


def metrics_registry(state: JobServerState) -> CollectorRegistry:
    """A private registry holding only the state's collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StateCollector(state))
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    """The registry in the Prometheus text format (``CONTENT_TYPE_LATEST``)."""
    return generate_latest(registry)
