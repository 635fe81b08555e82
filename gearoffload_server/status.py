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

from gearoffload.retry import RetryPolicy

from .history import Entry
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


#: Per function, the history entries ``/history.json`` lists (newest first).
HISTORY_SHOWN = 20
#: Dead letters ``/history.json`` lists at most (the total is reported beside them).
MAX_DEAD = 200
#: The error text of a dead letter shown at most (a traceback).
DEAD_ERROR_CHARS = 20000
#: The start of a dead letter's data shown (its arguments, for an admitted viewer).
DEAD_DATA_BYTES = 2000
_WHERE = {0: "queued", 1: "scheduled", 2: "running", 4: "dead"}


def _text(value: bytes) -> str:
    return value.decode("utf-8", "backslashreplace")


def _data(data: bytes) -> str:
    """The start of a job's data as text, without the retry line a job server reads (a
    gearoffload job's JSON arguments are then readable inside its seal)."""
    return _text(RetryPolicy.strip(data)[:DEAD_DATA_BYTES])


def _entry(e: Entry) -> dict[str, Any]:
    row = e.as_dict()
    row["handle"], row["function"], row["unique"] = (_text(e.handle), _text(e.function),
                                                     _text(e.unique))
    return row


def jobs_named(state: JobServerState, key: bytes) -> list:
    """The live jobs and dead letters whose handle or unique key is ``key``: by index
    (handle, or the unique-key index of coalescing), never a scan of the queues; dead
    letters are scanned (they are few, and ``show dead jobs`` lists them all anyway)."""
    if key in state.jobs:
        found = [state.jobs[key]]
    else:
        indexed = state._uniques.get(key)
        found = [] if indexed is None else list(indexed) if isinstance(indexed, list) \
            else [indexed]
    return found + [j for j in state.dead.values() if j.handle == key or j.unique == key]


def history_snapshot(state: JobServerState, key: bytes = b"",
                     shown: int = HISTORY_SHOWN, with_data: bool = False) -> dict[str, Any]:
    """The job history, the dead letters, and the jobs whose handle or unique is
    ``key`` (``/history.json``; ``?q=KEY``). O(history + dead letters), off the hot path.
    ``with_data`` adds the start of each dead letter's data (``data``; else ``None``):
    a job's arguments may be personal, so only viewers the admin port would admit see it.

    >>> from gearoffload_server.state import ManualScheduler
    >>> from gearoffload_server.config import ServerConfig
    >>> history_snapshot(JobServerState(ServerConfig(), ManualScheduler()))["dead"]
    []
    """
    history = state.history
    functions = {} if history is None else {
        _text(name): [_entry(e) for e in history.recent(name, shown)]
        for name in history.functions()}
    dead = []
    for handle, job in list(state.dead.items())[:MAX_DEAD]:
        info = state.dead_info.get(handle)
        error = info.error if info is not None else ""
        if not error and state.results is not None and job.unique:
            kept = state.results.get(job.unique)
            if kept is not None and kept.state == b"dead" and kept.data:
                error = kept.data.decode(errors="replace")
        dead.append({"handle": _text(handle), "function": _text(job.function.name),
                     "unique": _text(job.unique),
                     "attempts": info.attempts if info is not None else
                     job.failures + job.retries,
                     "died": info.died if info is not None else 0.0,
                     "error": error[:DEAD_ERROR_CHARS],
                     "data": _data(job.data) if with_data else None,
                     "size": len(job.data)})
    found = None
    if key:
        found = [_entry(e) for e in history.find(key)] if history is not None else []
        for job in jobs_named(state, key):
            found.append({"handle": _text(job.handle), "function": _text(job.function.name),
                          "unique": _text(job.unique), "outcome": _WHERE.get(job.state, "?"),
                          "submitted": job.submitted or job.since, "ended": 0.0,
                          "duration": 0.0,
                          "attempts": job.failures + job.retries + (job.state != 4),
                          "error": ""})
    return {"enabled": history is not None, "functions": functions, "dead": dead,
            "dead_total": len(state.dead), "query": _text(key), "found": found}
