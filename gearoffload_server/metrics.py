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

import heapq
from collections.abc import Callable, Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

from .state import Function, JobServerState
from .stats import BUCKETS as LATENCY_BUCKETS

__all__ = ["CONTENT_TYPE_LATEST", "StateCollector", "exposition", "metrics_registry",
           "pick_functions", "render"]

PRIORITIES = ("high", "normal", "low")
#: A job is buried once its own retry policy, or the server's default, is used up.
DEAD_LETTERS_HELP = ("Background jobs kept as dead letters: their retries "
                     "(@offload(retries=...), else --retry-failed) used up.")


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
            ("gearoffload_jobs_retried", "Failed attempts of background jobs scheduled to "
             "run again (a retry policy or --retry-failed).", "retried"),
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

        dead = GaugeMetricFamily("gearoffload_dead_letters", DEAD_LETTERS_HELP,
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
    """A private registry holding only the state's collector (every function, built at
    once: for tests and tools; the HTTP endpoint uses ``render``)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StateCollector(state))
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    """The registry in the Prometheus text format (``CONTENT_TYPE_LATEST``)."""
    return generate_latest(registry)


# -- the scrape the HTTP endpoint serves: bounded, and never holding the loop --------------

#: Functions exported with their own series at most (``--metrics-max-functions``).
MAX_FUNCTIONS = 1000
#: Functions handled between two yields to the event loop.
CHUNK = 100
#: Functions scored (for choosing which ones to export) between two yields.
SCORE_CHUNK = 2000


def no_pause() -> None:
    pass


def pick_functions(state: JobServerState, limit: int,
                   pause: Callable[[], None] = no_pause) -> tuple[list[Function], int]:
    """The functions a scrape exports, at most ``limit``, and how many there are in all.

    All of them when they fit; else the busiest: those with jobs or workers now first,
    then by jobs seen (submitted, completed, failed), so that thousands of names a peer
    registered and never used cannot push the real ones out. Calls ``pause()`` between
    chunks of ``SCORE_CHUNK`` (the HTTP endpoint yields to the loop there).

    Example::

        >>> from gearoffload_server.state import JobServerState, ManualScheduler
        >>> from gearoffload_server.config import ServerConfig
        >>> state = JobServerState(ServerConfig(), ManualScheduler())
        >>> for name in (b"a", b"b", b"c"):
        ...     _ = state.function(name)
        >>> state.functions[b"b"].completed = 5
        >>> [f.name for f in pick_functions(state, 1)[0]], pick_functions(state, 1)[1]
        ([b'b'], 3)
    """
    functions = list(state.functions.values())
    total = len(functions)
    if total <= limit:
        return functions, total
    heap: list[tuple[bool, int, int, Function]] = []
    push, pushpop = heapq.heappush, heapq.heappushpop
    for start in range(0, total, SCORE_CHUNK):
        if start:
            pause()
        for i in range(start, min(start + SCORE_CHUNK, total)):
            f = functions[i]
            item = (bool(f.total or f.workers), f.submitted + f.completed + f.failed, -i, f)
            if len(heap) < limit:
                push(heap, item)
            elif item[:3] > heap[0][:3]:
                pushpop(heap, item)
    heap.sort(key=lambda item: -item[2])  # registration order, as when all fit
    return [item[3] for item in heap], total


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r'\"')


def _head(name: str, kind: str, doc: str) -> str:
    return f"# HELP {name} {doc}\n# TYPE {name} {kind}\n"


_COUNTERS = (
    ("gearoffload_jobs_submitted_total", "Jobs created by a submission (not coalesced).",
     "submitted"),
    ("gearoffload_submissions_coalesced_total",
     "Submissions attached to a queued or running job with the same unique key.",
     "coalesced"),
    ("gearoffload_jobs_completed_total", "Jobs a worker answered with WORK_COMPLETE.",
     "completed"),
    ("gearoffload_jobs_failed_total", "Jobs that failed: WORK_FAIL, WORK_EXCEPTION, or "
     "their workers were lost --job-retries times (a retried job counts each time).",
     "failed"),
    ("gearoffload_jobs_exceptions_total", "Of the failed jobs, those answered with "
     "WORK_EXCEPTION.", "exceptions"),
    ("gearoffload_jobs_retried_total", "Failed attempts of background jobs scheduled to "
     "run again (a retry policy or --retry-failed).", "retried"),
)
_BOUNDS = [*(floatToGoString(b) for b in LATENCY_BUCKETS), "+Inf"]


def render(state: JobServerState, limit: int = MAX_FUNCTIONS,
           pause: Callable[[], None] = no_pause) -> bytes:
    """The ``/metrics`` exposition (the same text ``StateCollector`` yields), built a
    chunk of ``CHUNK`` functions at a time with ``pause()`` between chunks, with per-
    function series for at most ``limit`` functions (``pick_functions``);
    ``gearoffload_functions`` and ``gearoffload_metrics_functions_omitted`` say how many
    there are and how many were left out. The state may change between chunks: a scrape
    is then a little inconsistent across functions, never wrong within one.

    Example::

        >>> from gearoffload_server.state import JobServerState, ManualScheduler
        >>> from gearoffload_server.config import ServerConfig
        >>> state = JobServerState(ServerConfig(), ManualScheduler())
        >>> _ = state.function(b"resize")
        >>> 'gearoffload_workers{function="resize"} 0.0' in render(state).decode()
        True
    """
    functions, total = pick_functions(state, limit, pause)
    go = floatToGoString
    counters: list[list[str]] = [[] for _ in _COUNTERS]
    depth: list[str] = []
    scheduled: list[str] = []
    running: list[str] = []
    workers: list[str] = []
    latency: list[str] = []
    attrs = [attr for _, _, attr in _COUNTERS]
    for start in range(0, len(functions), CHUNK):
        if start:
            pause()
        for func in functions[start:start + CHUNK]:
            name = _escape(label(func.name))
            fl = f'{{function="{name}"}} '
            for lines, attr, (metric, _, _) in zip(counters, attrs, _COUNTERS, strict=True):
                lines.append(f"{metric}{fl}{go(getattr(func, attr))}\n")
            for priority, count in zip(PRIORITIES, func.queued, strict=True):
                depth.append(f'gearoffload_queue_depth{{function="{name}",'
                             f'priority="{priority}"}} {go(count)}\n')
            scheduled.append(f"gearoffload_jobs_scheduled{fl}{go(func.scheduled)}\n")
            running.append(f"gearoffload_jobs_running{fl}{go(func.running)}\n")
            workers.append(f"gearoffload_workers{fl}{go(len(func.workers))}\n")
            cumulative = 0
            for bound, count in zip(_BOUNDS, func.latency.counts, strict=True):
                cumulative += count
                latency.append(f'gearoffload_job_duration_seconds_bucket{{function="{name}",'
                               f'le="{bound}"}} {go(cumulative)}\n')
            latency.append(f"gearoffload_job_duration_seconds_count{fl}{go(cumulative)}\n")
            latency.append(f"gearoffload_job_duration_seconds_sum{fl}"
                           f"{go(func.latency.sum)}\n")
    pause()
    dead: dict[bytes, int] = {}
    letters = list(state.dead.values())
    for start in range(0, len(letters), SCORE_CHUNK):
        if start:
            pause()
        for job in letters[start:start + SCORE_CHUNK]:
            dead[job.function.name] = dead.get(job.function.name, 0) + 1
    if len(dead) > limit:  # the functions with the most dead letters
        dead = dict(heapq.nlargest(limit, dead.items(), key=lambda item: item[1]))
    parts = [_head("gearoffload_server_info", "gauge", "The job server's version."),
             f'gearoffload_server_info{{version="{_escape(state.config.version)}"}} 1.0\n']
    for lines, (metric, doc, _) in zip(counters, _COUNTERS, strict=True):
        parts.append(_head(metric, "counter", doc))
        parts.extend(lines)
    parts.append(_head("gearoffload_queue_depth", "gauge",
                       "Jobs waiting for a worker, per priority."))
    parts.extend(depth)
    parts.append(_head("gearoffload_jobs_scheduled", "gauge",
                       "Epoch jobs and retries not yet due."))
    parts.extend(scheduled)
    parts.append(_head("gearoffload_jobs_running", "gauge", "Jobs held by a worker."))
    parts.extend(running)
    parts.append(_head("gearoffload_workers", "gauge",
                       "Connections registered as workers (CAN_DO)."))
    parts.extend(workers)
    parts.append(_head(
        "gearoffload_job_duration_seconds", "histogram",
        "Seconds from submission (or, for epoch jobs and retries, from falling due) to "
        "WORK_COMPLETE or failure."))
    parts.extend(latency)
    parts.append(_head("gearoffload_dead_letters", "gauge", DEAD_LETTERS_HELP))
    parts.extend(f'gearoffload_dead_letters{{function="{_escape(label(name))}"}} {go(count)}\n'
                 for name, count in dead.items())
    for metric, doc, value in (
            ("gearoffload_connections", "Open Gearman connections (clients, workers, admin).",
             len(state.peers)),
            ("gearoffload_draining",
             "1 while shutting down (SIGTERM): no new job is handed out.",
             1 if state.draining else 0),
            ("gearoffload_functions", "Functions the server knows (registered, with jobs, or "
             "created by admin).", total),
            ("gearoffload_metrics_functions_omitted",
             "Functions left out of the per-function series of this scrape "
             "(--metrics-max-functions: the busiest are kept).", total - len(functions))):
        parts.append(_head(metric, "gauge", doc))
        parts.append(f"{metric} {go(value)}\n")
    return "".join(parts).encode()
