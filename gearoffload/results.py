"""Result backends: where the web side reads what became of a background job.

A background job is a Gearman background job (``SUBMIT_JOB_BG``) with a unique key that
names it everywhere; the backend answers ``read(unique)`` with an ``Outcome`` in any web
process on any host, whichever one submitted the job:

- ``ServerResults`` (the default, ``GEAROFFLOAD_RESULTS = "server"``): our job server keeps
  the outcome of every background job with a unique for its ``--result-ttl`` and answers
  the admin command ``result UNIQUE`` (docs/protocol.md, "Extension: kept results of
  background jobs"). No extra service; with the sqlite queue the results survive a restart.
- ``RedisResults`` (``"redis://host:port/db"``): the worker writes the outcome to Redis with
  a TTL; progress and the queued/running state come from the job server through
  ``GET_STATUS_UNIQUE``. This is the backend to use when the job server is gearmand.
- ``MemoryResults`` (``"memory"``): this process only; what eager mode (tests) uses.

Example::

    backend = open_results("server", client)
    outcome = backend.read("bg-3f9a...")
    outcome.state          # "queued", "running", "done", "failed", "dead" or "unknown"
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Any, NamedTuple

from gevent import monkey

__all__ = ["MemoryResults", "Outcome", "RedisResults", "ResultBackend", "ServerResults",
           "open_results"]

#: The states in which a job has ended (the others: queued, running, and unknown: never
#: seen, lost, or expired).
ENDED = ("done", "failed", "dead")


class Outcome(NamedTuple):
    """What became of a background job. ``data`` is the result (``done``) or the worker's
    error text with its traceback (``failed``/``dead``); ``too_large`` is the size of a
    result the backend did not keep because it was over its limit."""

    state: str
    numerator: int = 0
    denominator: int = 0
    data: bytes | None = None
    too_large: int | None = None


UNKNOWN = Outcome("unknown")
#: A per-OS-thread local, whether or not the process is monkey-patched (where the patched
#: one would be per greenlet).
_thread_local = monkey.get_original("threading", "local")


class ResultBackend:
    """Where outcomes are read (every backend) and written (``writes_results``: the worker
    writes the outcome itself; otherwise the job server keeps it)."""

    #: Whether the worker must call ``write()`` when a background job ends.
    writes_results = False

    def read(self, unique: str) -> Outcome:
        raise NotImplementedError

    def write(self, unique: str, outcome: Outcome) -> None:
        """Record an outcome (only for backends with ``writes_results``)."""

    def check(self) -> None:
        """Raise ``ValueError`` with advice when the backend cannot work (at start-up)."""


class ServerResults(ResultBackend):
    """Read outcomes from our job servers' kept results (admin ``result UNIQUE``).

    One admin connection per server and OS thread, reused; a server that is down is
    skipped. The servers are asked in order until one knows the job.
    """

    def __init__(self, servers: list[str], timeout: float = 2.0, tls: Any = None) -> None:
        self.servers = list(servers)
        self.timeout = timeout
        self.tls = tls
        # Idle admin connections per OS thread and server: a reader takes one (or opens
        # one) and puts it back, so that concurrent greenlets never share a connection,
        # and a connection stays with the thread (the gevent hub) that made it.
        self._local = _thread_local()

    def _ask(self, server: str, unique: str) -> Any:
        from .admin import AdminClient
        from .errors import GearmanError

        pools = getattr(self._local, "idle", None)
        if pools is None:
            pools = self._local.idle = {name: [] for name in self.servers}
        idle = pools[server]
        while True:
            reused = bool(idle)
            admin = idle.pop() if reused else AdminClient(server, timeout=self.timeout,
                                                          tls=self.tls)
            try:
                kept = admin.result(unique)
            except GearmanError:
                admin.close()
                if reused:  # it may have died idle (a server restart): one fresh try
                    continue
                raise
            except BaseException:
                admin.close()
                raise
            idle.append(admin)
            return kept

    def read(self, unique: str) -> Outcome:
        from .admin import ResultsUnsupported
        from .errors import GearmanError

        reachable = False
        for server in self.servers:
            try:
                kept = self._ask(server, unique)
            except ResultsUnsupported:
                raise
            except GearmanError:
                continue
            reachable = True
            if kept.state != "unknown":
                return Outcome(kept.state, kept.numerator, kept.denominator, kept.data,
                               kept.too_large)
        if not reachable:
            from .errors import NoServersAvailable
            raise NoServersAvailable("no job server answered the result query")
        return UNKNOWN


class RedisResults(ResultBackend):
    """Outcomes in Redis (the worker writes them); live progress from the job server.

    ``url``: ``redis://host:port/db``; keys are ``{prefix}:{unique}`` hashes that expire
    after ``ttl`` seconds.
    """

    writes_results = True

    def __init__(self, url: str, ttl: float, status: Any = None,
                 prefix: str = "gearoffload:result") -> None:
        try:
            import redis
        except ImportError:  # pragma: no cover - depends on the install
            raise ValueError("GEAROFFLOAD_RESULTS is a redis:// URL but redis-py is not "
                             "installed: pip install 'gearoffload[redis]'") from None
        self.url = url
        self.redis = redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
        self.ttl = max(1, int(ttl))
        self.prefix = prefix
        #: ``unique -> (known, running, numerator, denominator)`` from the job server.
        self.status = status

    def check(self) -> None:
        try:
            self.redis.ping()
        except Exception as exc:
            raise ValueError(f"GEAROFFLOAD_RESULTS={self.url}: Redis does not answer "
                             f"({exc}); start it or fix the URL") from None

    def write(self, unique: str, outcome: Outcome) -> None:
        key = f"{self.prefix}:{unique}"
        fields = {"state": outcome.state, "numerator": outcome.numerator,
                  "denominator": outcome.denominator, "data": outcome.data or b"",
                  "too_large": outcome.too_large or 0}
        pipe = self.redis.pipeline()
        pipe.hset(key, mapping=fields)
        pipe.expire(key, self.ttl)
        pipe.execute()

    def read(self, unique: str) -> Outcome:
        raw = self.redis.hgetall(f"{self.prefix}:{unique}")
        if raw:
            fields = {k.decode(): v for k, v in raw.items()}
            return Outcome(fields["state"].decode(), int(fields["numerator"]),
                           int(fields["denominator"]), fields["data"],
                           int(fields["too_large"]) or None)
        if self.status is not None:
            known, running, numerator, denominator = self.status(unique)
            if known:
                return Outcome("running" if running else "queued", numerator, denominator)
        return UNKNOWN


class MemoryResults(ResultBackend):
    """Outcomes in this process (eager mode and tests), bounded and expiring.

    Example::

        results = MemoryResults(ttl=60)
        results.write("u1", Outcome("done", data=b"42"))
        assert results.read("u1").data == b"42"
    """

    writes_results = True

    def __init__(self, ttl: float = 600.0, max_entries: int = 10_000) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._entries: OrderedDict[str, tuple[float, Outcome]] = OrderedDict()
        self._lock = threading.Lock()

    def write(self, unique: str, outcome: Outcome) -> None:
        with self._lock:
            self._entries[unique] = (time.monotonic() + self.ttl, outcome)
            self._entries.move_to_end(unique)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def read(self, unique: str) -> Outcome:
        with self._lock:
            entry = self._entries.get(unique)
            if entry is None:
                return UNKNOWN
            if entry[0] < time.monotonic():
                del self._entries[unique]
                return UNKNOWN
            return entry[1]


def open_results(spec: str, servers: list[str], ttl: float, tls: Any = None,
                 status: Any = None) -> ResultBackend:
    """The backend named by ``GEAROFFLOAD_RESULTS``: ``server``, ``memory`` or a
    ``redis://`` URL (``status(unique)`` gives live progress for Redis)."""
    if spec == "server":
        return ServerResults(servers, tls=tls)
    if spec == "memory":
        return MemoryResults(ttl)
    if spec.startswith(("redis://", "rediss://", "unix://")):
        return RedisResults(spec, ttl, status=status)
    raise ValueError(f"GEAROFFLOAD_RESULTS must be 'server' (our job server keeps them), "
                     f"'memory' (this process only) or a redis:// URL, not {spec!r}")

