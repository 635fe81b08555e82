"""Cheap per-function statistics kept by the state on its hot path: a latency histogram
and the record of a failed job. Plain Python, no locks, no I/O; ``metrics.py`` and
``status.py`` read them at scrape time.

Prometheus's own ``Histogram.observe()`` takes a lock and walks its buckets on each call;
here a finished job costs one ``bisect`` and two additions.

Example::

    >>> h = LatencyHistogram()
    >>> h.observe(0.003)
    >>> h.observe(42.0)
    >>> h.count(), round(h.sum, 3)
    (2, 42.003)
    >>> h.cumulative()[:3]
    [('0.001', 0), ('0.0025', 0), ('0.005', 1)]
"""

from __future__ import annotations

from bisect import bisect_left
from typing import NamedTuple

#: Upper bounds (seconds, "less than or equal") of the latency buckets: jobs range from
#: sub-millisecond echoes to hour-long reports.
BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)


class LatencyHistogram:
    """Bucket counts and a sum: what a Prometheus histogram exports, at a bisect per value."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bound's bucket (le).
        self.counts[bisect_left(BUCKETS, seconds)] += 1
        self.sum += seconds

    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, int]]:
        """``(le, cumulative count)`` pairs, ending with ``("+Inf", count)``."""
        pairs = []
        total = 0
        for bound, count in zip((*map(_bound, BUCKETS), "+Inf"), self.counts, strict=True):
            total += count
            pairs.append((bound, total))
        return pairs


def _bound(value: float) -> str:
    return repr(value) if value != int(value) else f"{value:.1f}"


class Failure(NamedTuple):
    """One job that did not complete, for the status page's "recent failures"."""

    time: float        #: when (the state's clock, epoch seconds)
    function: bytes
    handle: bytes
    unique: bytes
    what: str          #: ``fail``, ``exception``, ``lost worker``, ``timeout``, ``dead letter``
    detail: str        #: exception text, attempts, ... (truncated)


class DeadLetter(NamedTuple):
    """What the state knows of a dead letter beyond its job (admin ``show dead job``)."""

    died: float        #: when it was buried (epoch seconds)
    attempts: int      #: attempts in all: failed ones and ones whose worker was lost
    error: str         #: the last exception text (with the worker's traceback), or ""


#: Failures kept for the status page; older ones fall off.
RECENT_FAILURES = 50
#: Characters of exception text kept per failure.
DETAIL_CHARS = 300
