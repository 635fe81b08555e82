"""The status page's data (``/status.json``), computed from the job state when asked.

Costs O(functions + workers + running jobs + recent failures), never O(queued jobs): a
server with a million queued jobs answers as fast as an idle one. It lists at most
``max_functions`` functions (the busiest, as ``/metrics`` does) and calls ``pause()``
between chunks of them, where the HTTP endpoint yields to the event loop. Names, handles and
unique keys are bytes on the wire; here they become text with undecodable bytes shown
as ``\\xNN``.

Example::

    >>> from gearoffload_server.state import JobServerState, ManualScheduler
    >>> from gearoffload_server.config import ServerConfig
    >>> state = JobServerState(ServerConfig(), ManualScheduler())
    >>> _ = state.function(b"resize")
    >>> snapshot(state)["functions"][0]["queued"]
    {'high': 0, 'normal': 0, 'low': 0}
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .metrics import CHUNK, MAX_FUNCTIONS, PRIORITIES, label, no_pause, pick_functions
from .state import JobServerState

#: Running jobs listed at most (the total is reported beside them).
MAX_RUNNING = 200


def snapshot(state: JobServerState, started: float | None = None,
             max_functions: int = MAX_FUNCTIONS,
             pause: Callable[[], None] = no_pause) -> dict[str, Any]:
    """Everything the status page shows, as JSON-ready values."""
    now = state.scheduler.now()
    functions = []
    totals = dict.fromkeys(("submitted", "coalesced", "completed", "failed"), 0)
    everything = list(state.functions.values())
    for start in range(0, len(everything), CHUNK * 20):
        if start:
            pause()
        for func in everything[start:start + CHUNK * 20]:
            totals["submitted"] += func.submitted
            totals["coalesced"] += func.coalesced
            totals["completed"] += func.completed
            totals["failed"] += func.failed
    listed, _ = pick_functions(state, max_functions, pause)
    for i, func in enumerate(listed):
        if i and not i % CHUNK:
            pause()
        row = {
            "name": label(func.name),
            "queued": dict(zip(PRIORITIES, func.queued, strict=True)),
            "scheduled": func.scheduled,
            "running": func.running,
            "workers": len(func.workers),
            "submitted": func.submitted,
            "coalesced": func.coalesced,
            "completed": func.completed,
            "failed": func.failed,
            "mean_seconds": round(func.latency.sum / n, 6)
            if (n := func.latency.count()) else None,
        }
        functions.append(row)
    pause()

    held = []
    workers = 0
    for peer in state.peers:
        if peer.functions:
            workers += 1
        held.extend((job.since, job.handle, peer, job) for job in peer.jobs.values())
    held.sort(key=lambda item: item[:2])  # the oldest first; the handle breaks ties
    running = [{
        "handle": label(job.handle),
        "function": label(job.function.name),
        "unique": label(job.unique),
        "worker": f"{peer.address} fd={peer.fd} {label(peer.client_id)}",
        "numerator": job.numerator,
        "denominator": job.denominator,
        # Since it was submitted (or fell due), not since this worker took it: the
        # state does not spend a clock read per assignment.
        "age": round(max(0.0, now - since), 3),
    } for since, _, peer, job in held[:MAX_RUNNING]]

    failures = [{
        "time": f.time,
        "function": label(f.function),
        "handle": label(f.handle),
        "unique": label(f.unique),
        "what": f.what,
        "detail": f.detail,
    } for f in reversed(state.failures)]

    return {
        "version": state.config.version,
        "time": now,
        "uptime": round(now - started, 1) if started is not None else None,
        "draining": state.draining,
        "connections": len(state.peers),
        "workers": workers,
        "jobs": len(state.jobs),
        "dead_letters": len(state.dead),
        "totals": totals,
        "functions": functions,
        "functions_total": len(everything),
        "running": running,
        "running_total": len(held),
        "failures": failures,
    }
