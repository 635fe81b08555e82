"""The job server's state: functions, priority queues, the unique index, workers, sleepers.

A plain object with no sockets in it. ``JobServerState.handle(peer, packet)`` applies one
decoded packet and appends whatever must be sent to the ``out`` list of each peer
concerned; the I/O shell (``server.py``) writes those lists out, one write per peer per
batch. Time enters only through the injected ``Scheduler`` (``now()`` and
``call_later()``), so every rule can be unit-tested without I/O or real waiting.

Where Cython was there at install, this module runs compiled from this very file, with
the types declared in ``state.pxd`` (``gearoffload_server.STATE_COMPILED``). Methods that
``state.pxd`` declares ``cpdef`` may not create closures (no lambdas or generators).

Example::

    >>> from gearoffload_server.state import JobServerState, ManualScheduler, Peer
    >>> from gearoffload_server.settings import ServerConfig
    >>> from gearoffload.protocol import Packet, REQ, PacketType as T
    >>> state = JobServerState(ServerConfig(handle_prefix="H:box"), ManualScheduler())
    >>> client = state.connect(Peer(fd=7, address="127.0.0.1"))
    >>> state.handle(client, Packet(REQ, T.SUBMIT_JOB, (b"upper", b"", b"abc")))
    >>> client.out
    [b'\\x00RES\\x00\\x00\\x00\\x08\\x00\\x00\\x00\\tH:box:1']
"""

from __future__ import annotations

import functools
import heapq
import itertools
import logging
import re
from bisect import bisect_left
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from typing import Protocol

from gearoffload.protocol import PT as T
from gearoffload.protocol import REQ, RES, Packet, Router, encode
from gearoffload.retry import MAGIC as RETRY_MAGIC
from gearoffload.retry import RetryPolicy

from .history import JobHistory, short_error
from .settings import ServerConfig
from .stats import BUCKETS as LATENCY_BUCKETS
from .stats import DETAIL_CHARS, RECENT_FAILURES, DeadLetter, Failure, LatencyHistogram
from .stores import QueueStore, StoredJob

log = logging.getLogger("gearoffload.server")

HIGH, NORMAL, LOW = 0, 1, 2
#: Unique IDs of up to 64 bytes are kept whole (gearmand truncates a 64-byte one: Q2).
MAX_UNIQUE = 64
MAX_HANDLE = 63
#: libgearman caps function names at 512 bytes; gearmand does not check (docs/protocol.md §1.5).
MAX_FUNCTION_NAME = 512
MAX_CLIENT_ID = 127
#: Above this many dead entries in one queue (and more dead than live), the queue is
#: compacted, so that submit-and-disconnect loops cannot grow memory without bound.
COMPACT_THRESHOLD = 1024
#: The maxqueue of a function without one (shared: ``Function.limits`` is only replaced).
_NO_LIMITS = (0, 0, 0)
#: Seconds a woken worker has to grab before other sleepers are woken for the same work.
WAKE_GRACE = 1.0

# Job lifecycle.
QUEUED, SCHEDULED, RUNNING, DONE, DEAD = range(5)
# Worker sleep state (docs/protocol.md §3.6).
AWAKE, SLEEPING, WOKEN = range(3)

# type -> (priority, background)
_SUBMISSIONS = {
    T.SUBMIT_JOB: (NORMAL, False),
    T.SUBMIT_JOB_BG: (NORMAL, True),
    T.SUBMIT_JOB_HIGH: (HIGH, False),
    T.SUBMIT_JOB_HIGH_BG: (HIGH, True),
    T.SUBMIT_JOB_LOW: (LOW, False),
    T.SUBMIT_JOB_LOW_BG: (LOW, True),
    T.SUBMIT_JOB_EPOCH: (NORMAL, True),
    T.SUBMIT_REDUCE_JOB: (NORMAL, False),
    T.SUBMIT_REDUCE_JOB_BACKGROUND: (NORMAL, True),
}
_SERVER_ONLY = (
    T.UNUSED, T.NOOP, T.JOB_CREATED, T.NO_JOB, T.JOB_ASSIGN, T.ECHO_RES, T.ERROR,
    T.STATUS_RES, T.ALL_YOURS, T.OPTION_RES, T.JOB_ASSIGN_UNIQ, T.SUBMIT_JOB_SCHED,
    T.JOB_ASSIGN_ALL, T.STATUS_RES_UNIQUE,
)
_NOT_FOUND_TEXT = {
    T.WORK_STATUS: b"Job given in work result not found",
    T.WORK_COMPLETE: b"Job given in work result not found",
    T.WORK_FAIL: b"Job given in work result not found",
    T.WORK_DATA: b"Job does not exist on server",
    T.WORK_WARNING: b"Job does not exist on server",
    T.WORK_EXCEPTION: b"An exception was received for a job that does not exist",
}
_NOOP = encode(RES, T.NOOP)
_NO_JOB = encode(RES, T.NO_JOB)
_LEADING_INT = re.compile(rb"\s*([+-]?)(\d*)")
_WHITESPACE = re.compile(rb"\s+")
#: Bytes a function name may not hold: they are the admin protocol's separators.
_ADMIN_UNSAFE = re.compile(rb"[\t\n\r]")


def _error(code: bytes, text: bytes) -> bytes:
    return encode(RES, T.ERROR, (code, text))


def _job_fields(job: Job, event: str, peer: Peer | None = None) -> dict[str, object]:
    """The structured log fields of a job event (``gearoffload.logfmt``); only built on
    the rare paths that log, never per job."""
    fields: dict[str, object] = {
        "event": event, "handle": job.handle.decode("latin-1"),
        "function": job.function.name.decode(errors="replace"),
        "unique": job.unique.decode(errors="replace") or None}
    if peer is not None:
        fields["peer"] = peer.address
        fields["fd"] = peer.fd
    return fields


def strtoul32(text: bytes) -> int:
    """Parse as gearmand does, C ``strtol`` (saturating at the signed 64-bit range) cast to
    uint32: ``abc``→0, ``12xyz``→12, ``-1``→4294967295, ``2**63``→4294967295,
    ``-2**63-1``→0."""
    sign, digits = _LEADING_INT.match(text).groups()
    if not digits:
        return 0
    value = -int(digits) if sign == b"-" else int(digits)
    return max(-(1 << 63), min(value, (1 << 63) - 1)) & 0xFFFFFFFF


def strtoll(text: bytes) -> int | None:
    """Parse like C ``strtoll``; ``None`` when the value overflows a signed 64-bit integer."""
    sign, digits = _LEADING_INT.match(text).groups()
    if not digits:
        return 0
    value = -int(digits) if sign == b"-" else int(digits)
    if not -(1 << 63) <= value < 1 << 63:
        return None
    return value


class Timer(Protocol):
    def cancel(self) -> None: ...


class Scheduler(Protocol):
    """Where the state gets time from. The I/O shell supplies one backed by the event loop."""

    def now(self) -> float: ...

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer: ...


class ManualScheduler:
    """A ``Scheduler`` whose clock only moves when told to: for tests and doctests."""

    def __init__(self, start: float = 1_000_000.0) -> None:
        self.time = start
        self._timers: list[tuple[float, int, _ManualTimer]] = []
        self._seq = itertools.count()

    def now(self) -> float:
        return self.time

    def call_later(self, delay: float, callback: Callable[[], None]) -> _ManualTimer:
        timer = _ManualTimer(callback)
        heapq.heappush(self._timers, (self.time + delay, next(self._seq), timer))
        return timer

    def advance(self, seconds: float) -> None:
        """Move the clock forward, firing every timer that falls due on the way."""
        deadline = self.time + seconds
        while self._timers and self._timers[0][0] <= deadline:
            due, _, timer = heapq.heappop(self._timers)
            self.time = max(self.time, due)
            if not timer.cancelled:
                timer.callback()
        self.time = deadline


class _ManualTimer:
    __slots__ = ("callback", "cancelled")

    def __init__(self, callback: Callable[[], None]) -> None:
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Peer:
    """One connection as the state sees it: a client, a worker, an admin, or all three.

    ``out`` collects encoded replies until the I/O shell writes them. Only protocol state
    lives here: the shell's connection (``transport.Connection``) owns its ``Peer``, and
    which store batch a peer's replies wait for is ``commit.py``'s business.
    """

    __slots__ = (
        "fd", "address", "loopback", "client_id", "out", "out_bytes",
        "exceptions", "functions", "timeouts", "jobs", "attached", "sleep", "rr",
        "last_exception", "_dirty", "_flagged", "waiting",
    )

    def __init__(self, fd: int = -1, address: str = "-", loopback: bool = True) -> None:
        self.fd = fd
        self.address = address
        self.loopback = loopback
        self.client_id = b"-"
        self.out: list[bytes] = []
        self.out_bytes = 0
        self.exceptions = False
        self.functions: list[Function] = []   # registration order, de-duplicated
        self.timeouts: dict[Function, float] = {}
        self.jobs: dict[bytes, Job] = {}       # held as a worker, by handle
        self.attached: dict[Job, int] = {}     # waited on as a client: submissions per job
        self.waiting = 0                       # sum of ``attached`` (--max-client-jobs)
        self.sleep = AWAKE
        self.rr = 0                            # round-robin position in ``functions``
        self.last_exception: bytes | None = None
        self._dirty: list[Peer] | None = None
        self._flagged = False  # in ``_dirty`` since the last ``take_dirty()``

    def send(self, data: bytes) -> None:
        if not self._flagged and self._dirty is not None:
            # Listed once per batch, even while earlier output is still being written,
            # so that the shell sees every peer whose backlog grew.
            self._flagged = True
            self._dirty.append(self)
        self.out.append(data)
        self.out_bytes += len(data)

    def take_output(self) -> bytes:
        """Everything queued for this peer as one buffer (empties ``out``)."""
        out = self.out
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        self.out_bytes = 0
        return data

    def __repr__(self) -> str:
        return f"<Peer fd={self.fd} {self.address} {self.client_id.decode(errors='replace')}>"


class Function:
    """A function name with its three priority queues, its workers and its sleepers."""

    __slots__ = ("name", "queues", "queued", "ready", "scheduled", "running", "total",
                 "dead", "workers", "sleepers", "woken", "limits", "wake_timer",
                 "submitted", "coalesced", "completed", "failed", "exceptions", "latency",
                 "pinned", "retried")

    def __init__(self, name: bytes) -> None:
        self.name = name
        # Made at the first enqueue: three empty deques are 1.8 KiB, more than half of
        # what a function costs, and most names registered never queue a job.
        self.queues: tuple[deque[Job], deque[Job], deque[Job]] | None = None
        self.queued = [0, 0, 0]       # live runnable jobs per priority
        self.ready = 0                # sum of ``queued``
        self.scheduled = 0            # epoch jobs not yet due
        self.running = 0
        self.total = 0                # queued + scheduled + running
        self.dead = [0, 0, 0]         # removed jobs still sitting in a deque
        self.workers: dict[Peer, None] = {}
        self.sleepers: dict[Peer, None] = {}  # asleep and not yet sent a NOOP, oldest first
        self.woken = 0                # registered workers sent a NOOP that have not grabbed
        self.limits = _NO_LIMITS      # maxqueue per priority, 0 = unlimited (replaced whole)
        self.wake_timer: Timer | None = None  # see JobServerState._wake_overdue
        # Monotonic counters for /metrics (plain ints: a Prometheus Counter takes a lock).
        self.submitted = 0            # jobs created (not coalesced, restored or retried)
        self.coalesced = 0            # submissions attached to a queued or running job
        self.completed = 0            # WORK_COMPLETE
        self.failed = 0               # WORK_FAIL, WORK_EXCEPTION, failed after lost workers
        self.exceptions = 0           # of which WORK_EXCEPTION
        self.retried = 0              # failed background attempts scheduled to run again
        # Runnable -> completed or failed. (A queue-wait histogram, runnable -> assigned,
        # would cost a clock read and an observe() more per job, about as much again as
        # this one: left out.)
        self.latency = LatencyHistogram()
        #: Created or limited by admin (``create function``, ``maxqueue``): kept when it
        #: has no worker and no job; other functions are then forgotten (``_reclaim``).
        self.pinned = False

    def __repr__(self) -> str:
        return f"<Function {self.name!r} total={self.total} running={self.running}>"


class Job:
    __slots__ = ("handle", "function", "unique", "data", "priority", "background",
                 "reducer", "when", "clients", "worker", "numerator", "denominator",
                 "retries", "abandoned", "timer", "state", "coalesce", "stored", "batch",
                 "failures", "since", "submitted")

    def __init__(self, handle: bytes, function: Function, unique: bytes, data: bytes,
                 priority: int, background: bool, reducer: bytes | None, when: int) -> None:
        self.handle = handle
        self.function = function
        self.unique = unique
        self.data = data
        self.priority = priority
        self.background = background
        self.reducer = reducer
        self.when = when
        self.clients: list[Peer] = []
        self.worker: Peer | None = None
        self.numerator = 0
        self.denominator = 0
        self.retries = 0
        self.failures = 0      # WORK_FAIL/WORK_EXCEPTION answers (--retry-failed)
        self.abandoned = False
        self.timer: Timer | None = None
        self.state = QUEUED
        self.coalesce = False  # indexed for coalescing (cleared when the window closes)
        self.stored = 0        # the store's id for this job's row, 0 when not stored
        self.batch = None      # the store batch that saves it (see ``commit.Batch``)
        #: When it became runnable: submitted, restored, requeued from the dead letters, or
        #: (epoch jobs, retries) fell due. Start of its latency (``Function.latency``).
        self.since = 0.0
        self.submitted = 0.0   # when first submitted (the history's), 0.0 when unknown

    def __repr__(self) -> str:
        return f"<Job {self.handle!r} {self.function.name!r} state={self.state}>"


# -- kept results of background jobs (an extension: docs/protocol.md) ------------------------

KEPT_DONE, KEPT_FAILED, KEPT_DEAD = b"done", b"failed", b"dead"
KEPT_STATES = (KEPT_DONE, KEPT_FAILED, KEPT_DEAD)
#: Bytes counted per kept result besides its unique and its data: the entry object, its
#: float and store id, the ordered dict's slot and link (about 280 B by tracemalloc, 50,000
#: results, compiled, CPython 3.11), and the headers of the unique's and the data's bytes
#: objects (2 x 33 B). tests/test_results_state.py checks it against a measurement.
ENTRY_OVERHEAD = 350
#: The sweep of expired results runs at most this often (seconds), on a keep or a read.
SWEEP_INTERVAL = 1.0


class Kept:
    """One kept outcome. ``data`` is ``None`` when it was too large (``too_large`` then
    holds its size in bytes)."""

    __slots__ = ("state", "numerator", "denominator", "expires", "data", "too_large",
                 "size", "row")

    def __init__(self, state: bytes, numerator: int, denominator: int, expires: float,
                 data: bytes | None, too_large: int, size: int, row: int = 0) -> None:
        self.state = state
        self.numerator = numerator
        self.denominator = denominator
        self.expires = expires
        self.data = data
        self.too_large = too_large
        self.size = size
        self.row = row         # the store's id for it, 0 when not stored

    def __repr__(self) -> str:
        return f"<Kept {self.state.decode()} expires={self.expires:.3f}>"


class KeptResults:
    """The outcomes of ended background jobs, by unique, bounded in time and in bytes
    (admin ``result UNIQUE``; docs/protocol.md, "Extension: kept results of background
    jobs").

    A background job has no client to hear its result. When one with a unique (not empty,
    not ``-``) ends, the state keeps its outcome here: ``done`` (the WORK_COMPLETE data),
    ``failed`` (the WORK_EXCEPTION text; nothing for WORK_FAIL and for a job that failed
    after ``--job-retries``) or ``dead`` (a dead letter after ``--retry-failed``; the last
    exception text, if any), for ``--result-ttl`` seconds.

    Bounded: a result over ``--result-max-size`` bytes is kept without its data, as a
    marker with its size; past ``--result-memory`` bytes in all, the oldest go first.
    Every result has the same TTL, so the oldest is also the first to expire: one ordered
    dict, swept from its front at most every ``SWEEP_INTERVAL`` seconds and checked on
    read, with no timer per result. Compiled with this module (``state.pxd``): keeping a
    result costs a background job well under a microsecond.

    ``holder``, when given, is the object whose ``store`` attribute is the queue store
    (the ``JobServerState``, whose store is set after it is made): every kept result goes
    into the store's open batch, the one that deletes the row of the job that produced it
    (one transaction), and every one dropped (expired, evicted, or replaced by a newer
    outcome of its unique) is deleted with a later batch. ``restore()`` brings them back
    at start-up.

    Example::

        >>> clock = [1000.0]
        >>> kept = KeptResults(600, 1024, 1 << 20, lambda: clock[0])
        >>> kept.keep(b"report-7", KEPT_DONE, 3, 3, b"42")
        >>> entry = kept.get(b"report-7")
        >>> entry.state, entry.data, entry.expires - clock[0]
        (b'done', b'42', 600.0)
        >>> clock[0] += 601
        >>> kept.get(b"report-7") is None
        True
    """

    __slots__ = ("ttl", "max_size", "memory", "entries", "used", "kept", "expired",
                 "evicted", "oversized", "_holder", "_now", "_sweep_at")

    def __init__(self, ttl: float, max_size: int, memory: int, now: Callable[[], float],
                 holder=None) -> None:
        self.ttl = ttl
        self.max_size = max_size
        self.memory = memory
        self._holder = holder
        self._now = now
        self.entries: OrderedDict[bytes, Kept] = OrderedDict()
        self.used = 0
        self._sweep_at = 0.0
        # Monotonic counters (for /metrics).
        self.kept = 0
        self.expired = 0
        self.evicted = 0
        self.oversized = 0

    def __len__(self) -> int:
        return len(self.entries)

    def keep(self, unique: bytes, state: bytes, numerator: int, denominator: int,
             data: bytes) -> None:
        """Keep the outcome of the job ``unique`` for ``ttl`` seconds from now."""
        now = self._now()
        entry = self._put(unique, state, numerator, denominator, now + self.ttl, data)
        self.kept += 1
        store = self._holder.store if self._holder is not None else None
        if store is not None:
            entry.row = store.keep_result(unique, entry)
        if self.used > self.memory or now >= self._sweep_at:
            self._trim(now)

    def _put(self, unique: bytes, state: bytes, numerator: int, denominator: int,
             expires: float, data: bytes | None, too_large: int = 0) -> Kept:
        entries = self.entries
        old = entries.pop(unique, None)
        if old is not None:  # the newest outcome of a unique wins
            self.used -= old.size
            if old.row:
                store = self._holder.store if self._holder is not None else None
                if store is not None:
                    store.drop_result(old.row)
        if data is not None and len(data) > self.max_size:
            too_large = len(data)
            data = None
            self.oversized += 1
        size = ENTRY_OVERHEAD + len(unique) + (len(data) if data is not None else 0)
        entry = entries[unique] = Kept(state, numerator, denominator, expires, data,
                                       too_large, size)
        self.used += size
        return entry

    def get(self, unique: bytes) -> Kept | None:
        """The kept outcome of ``unique``, or ``None`` (never kept, expired or evicted)."""
        now = self._now()
        if now >= self._sweep_at:
            self._trim(now)
        entry = self.entries.get(unique)
        if entry is None or entry.expires > now:
            return entry
        self._drop(unique, entry)  # expired behind a younger one (clock or TTL change)
        self.expired += 1
        return None

    def _trim(self, now: float) -> None:
        """Drop expired results from the front, then the oldest while over ``memory``."""
        self._sweep_at = now + SWEEP_INTERVAL
        entries = self.entries
        while entries:
            unique = next(iter(entries))
            entry = entries[unique]
            if entry.expires <= now:
                self.expired += 1
            elif self.used > self.memory:
                self.evicted += 1
            else:
                break
            self._drop(unique, entry)

    def _drop(self, unique: bytes, entry: Kept) -> None:
        del self.entries[unique]
        self.used -= entry.size
        if entry.row:
            store = self._holder.store if self._holder is not None else None
            if store is not None:
                store.drop_result(entry.row)

    def restore(self, rows: Iterable[tuple]) -> int:
        """Results read back from the store at start-up (``QueueStore.load_results``:
        ``(id, unique, state, numerator, denominator, expires, data, too_large)``, in the
        order they were kept). Expired ones are skipped, and deleted from the store with its next
        batch; none expires later than ``ttl`` from now (the TTL may have been
        shortened), so the front of the dict stays the oldest. Returns how many were
        restored."""
        now = self._now()
        latest = now + self.ttl
        store = self._holder.store if self._holder is not None else None
        count = 0
        for row, unique, state, numerator, denominator, expires, data, too_large in rows:
            if expires <= now or state not in KEPT_STATES:
                if store is not None:
                    store.drop_result(row)
                continue
            entry = self._put(unique, state, numerator, denominator, min(expires, latest),
                              data, too_large or 0)
            entry.row = row
            count += 1
        if self.used > self.memory:
            self._trim(now)
        return count


class JobServerState:
    """All jobs, functions and connections of one server, and the rules that move them."""

    def __init__(self, config: ServerConfig, scheduler: Scheduler,
                 store: QueueStore | None = None) -> None:
        self.config = config
        self.scheduler = scheduler
        #: Where background jobs are saved (docs/protocol.md §3.13); ``None`` for
        #: ``--queue memory``.
        self.store = store
        self.functions: dict[bytes, Function] = {}
        self.jobs: dict[bytes, Job] = {}               # every live job by handle
        self.peers: dict[Peer, None] = {}              # connection order, for admin
        self._uniques: dict[bytes, Job | list[Job]] = {}  # coalescing + GET_STATUS_UNIQUE
        self._hyphen: dict[tuple[bytes, bytes], Job] = {}  # unique "-": coalesce on data
        self._epochs: list[tuple[int, int, Job]] = []  # (when, seq, job) heap
        self._epoch_timer: Timer | None = None
        self._epoch_timer_due: int | None = None
        self._prefix = config.handle_prefix.encode() + b":"
        self._max_client_jobs = config.max_client_jobs
        self._counter = itertools.count(1)
        self._dirty: list[Peer] = []
        #: Background jobs that failed more than ``--retry-failed`` times, by handle.
        self.dead: dict[bytes, Job] = {}
        #: What is known of each dead letter beyond its job: when it died, its last error.
        self.dead_info: dict[bytes, DeadLetter] = {}
        #: Workers still running an attempt that timed out (CAN_DO_TIMEOUT) of a job that
        #: is to run again: handles by worker. Such a worker is not handed that job's
        #: retry while its own attempt may still run, and its late answer ends it quietly.
        self._stale: dict[Peer, set[bytes]] = {}
        #: Shutting down (SIGTERM): grabs get NO_JOB, running jobs may finish.
        self.draining = False
        #: The last jobs that failed, newest last (the status page's "recent failures").
        self.failures: deque[Failure] = deque(maxlen=RECENT_FAILURES)
        self._now = scheduler.now  # bound once: read on every submission and result
        #: Outcomes of ended background jobs by unique (``KeptResults``; admin ``result``);
        #: ``None`` with ``--result-ttl 0``.
        self.results: KeptResults | None = KeptResults(
            config.result_ttl, config.result_max_size, config.result_memory, scheduler.now,
            self) if config.result_ttl > 0 else None
        #: Recently ended jobs (``--history-max``, ``--history-per-function``); ``None``
        #: with ``--history-max 0``.
        self.history: JobHistory | None = JobHistory(
            config.history_per_function, config.history_max) if config.history_max > 0 \
            else None
        #: Called by admin ``shutdown [graceful]`` when enabled; set by the I/O shell.
        self.on_shutdown: Callable[[bool], None] | None = None
        self._handlers: list[Callable[[Peer, Packet], None]] = [self._invalid_command] * 43
        for ptype in _SUBMISSIONS:
            self._handlers[ptype] = self._submit
        self._handlers[T.SUBMIT_JOB_EPOCH] = self._submit_epoch
        self._handlers[T.SUBMIT_REDUCE_JOB] = self._submit_reduce
        self._handlers[T.SUBMIT_REDUCE_JOB_BACKGROUND] = self._submit_reduce
        for ptype in (T.WORK_STATUS, T.WORK_COMPLETE, T.WORK_FAIL, T.WORK_EXCEPTION,
                      T.WORK_DATA, T.WORK_WARNING):
            self._handlers[ptype] = self._work
        for ptype in (T.GRAB_JOB, T.GRAB_JOB_UNIQ, T.GRAB_JOB_ALL):
            self._handlers[ptype] = self._grab
        self._handlers[T.CAN_DO] = self._can_do
        self._handlers[T.CAN_DO_TIMEOUT] = self._can_do
        self._handlers[T.CANT_DO] = self._cant_do
        self._handlers[T.RESET_ABILITIES] = self._reset_abilities
        self._handlers[T.PRE_SLEEP] = self._pre_sleep
        self._handlers[T.GET_STATUS] = self._get_status
        self._handlers[T.GET_STATUS_UNIQUE] = self._get_status_unique
        self._handlers[T.ECHO_REQ] = self._echo
        self._handlers[T.OPTION_REQ] = self._option
        self._handlers[T.SET_CLIENT_ID] = self._set_client_id
        for ptype in _SERVER_ONLY:
            self._handlers[ptype] = self._invalid_command

    # -- connections -----------------------------------------------------------------

    def connect(self, peer: Peer) -> Peer:
        peer._dirty = self._dirty
        self.peers[peer] = None
        return peer

    def disconnect(self, peer: Peer) -> None:
        """Forget a connection: requeue the jobs it held, detach it from jobs it waited on."""
        if peer not in self.peers:
            return
        del self.peers[peer]
        if self._stale:
            self._stale.pop(peer, None)
        was_woken = peer.sleep == WOKEN
        self._set_sleep(peer, AWAKE)
        for job in list(peer.jobs.values()):
            # Not the per-job hot path: only jobs whose worker vanished while running them.
            log.info("job %s of %s: its worker %s fd=%d disconnected; requeued unless its "
                     "retries are used up", job.handle.decode(),
                     job.function.name.decode(errors="replace"), peer.address, peer.fd,
                     extra=_job_fields(job, "job.worker_lost", peer))
            self._lose(job)
        for func in peer.functions:
            del func.workers[peer]
            if was_woken and func.ready and func.sleepers:
                self._wake(func)  # the NOOP it took must not be lost with it
            if not func.total and not func.workers and not func.pinned:
                self._reclaim(func)
        peer.functions.clear()
        peer.timeouts.clear()
        for job in list(peer.attached):
            self._detach(job, peer)
        peer._dirty = None  # what is still in ``out`` is the I/O shell's to deliver or drop

    def take_dirty(self) -> list[Peer]:
        """The peers that have output waiting since the last call."""
        dirty = self._dirty[:]
        self._dirty.clear()
        for peer in dirty:
            peer._flagged = False
        return dirty

    # -- packets ---------------------------------------------------------------------

    def handle(self, peer: Peer, packet: Packet) -> None:
        """Apply one packet from ``peer``. Replies go to the ``out`` lists of the peers."""
        if packet.magic != REQ:
            self._wrong_magic(peer, packet)
            return
        self._handlers[packet.type](peer, packet)

    def router(self, peer: Peer) -> Router:
        """``handle`` bound to ``peer``, for ``Decoder.dispatch()``: the C ``Router`` calls
        the packet's handler without a Python frame in between (three packets a job)."""
        return Router(self._handlers, peer, REQ, self._wrong_magic)

    def _wrong_magic(self, peer: Peer, packet: Packet) -> None:
        peer.send(_error(b"INVALID_MAGIC", b"Request magic expected"))

    def _invalid_command(self, peer: Peer, packet: Packet) -> None:
        peer.send(_error(b"INVALID_COMMAND", b"Command not expected"))

    def _echo(self, peer: Peer, packet: Packet) -> None:
        peer.send(encode(RES, T.ECHO_RES, packet.args))

    def _option(self, peer: Peer, packet: Packet) -> None:
        option = packet.args[0]
        if option.lower() == b"exceptions":
            peer.exceptions = True
            peer.send(encode(RES, T.OPTION_RES, packet.args))
        else:
            peer.send(_error(b"UNKNOWN_OPTION", b"Server does not recognize given option"))

    def _set_client_id(self, peer: Peer, packet: Packet) -> None:
        # Whitespace would break admin parsers that split ``workers`` lines on spaces.
        client_id = _WHITESPACE.sub(b"", packet.args[0])[:MAX_CLIENT_ID]
        peer.client_id = client_id or b"-"

    # -- submission and coalescing (docs/protocol.md §3.3) ------------------------------

    def _submit_epoch(self, peer: Peer, packet: Packet) -> None:
        when = strtoll(packet.args[2])
        if when is None:
            peer.send(_error(b"INVALID_ARGUMENT", b"Epoch time out of range"))
            return
        self._submit(peer, packet, when=when)

    def _submit_reduce(self, peer: Peer, packet: Packet) -> None:
        reducer = packet.args[2]
        if len(reducer) > MAX_UNIQUE:
            peer.send(_error(b"ARGUMENT_TOO_LARGE", b"Unique value too large"))
            return
        self._submit(peer, packet, reducer=reducer)

    def _submit(self, peer: Peer, packet: Packet, reducer: bytes | None = None,
                when: int = 0) -> None:
        """Every SUBMIT_*: the epoch and reduce variants come through the two above."""
        args = packet.args
        priority, background = _SUBMISSIONS[packet.type]
        name, unique = args[0], args[1]
        data = args[-1]
        if len(unique) > MAX_UNIQUE:
            peer.send(_error(b"ARGUMENT_TOO_LARGE", b"Unique value too large"))
            return
        func = self.functions.get(name)  # known functions have valid names
        if func is None:
            func = self._named_function(peer, name)
            if func is None:
                return
        if not background and self._max_client_jobs and \
                peer.waiting >= self._max_client_jobs:
            peer.send(_error(b"QUEUE_ERROR", b"Too many jobs waiting on this connection"))
            return
        job = self._find_coalesced(func, unique, data) if unique else None
        if job is not None:
            created = encode(RES, T.JOB_CREATED, (job.handle,))
            if background and not job.background:
                self._promote(job, peer, created)
            else:
                batch = job.batch
                if batch is not None and not batch.done:
                    # Not durable yet: this reply is held.
                    batch.ack(peer, created, job, not background)
            peer.send(created)
            if not background:
                self._attach(job, peer)
            func.coalesced += 1
            return
        if background and unique.startswith(b"once:") and self.results is not None \
                and self.results.get(unique) is not None:
            # Run-once unique (docs/protocol.md, "Extension: run-once uniques"): this
            # slot already ran; a late copy is acknowledged and dropped.
            peer.send(encode(RES, T.JOB_CREATED, (b"%s%d" % (self._prefix,
                                                             next(self._counter)),)))
            func.coalesced += 1
            return
        limit = func.limits[priority]
        if limit and func.total >= limit:
            peer.send(_error(b"QUEUE_ERROR", b"Job queue is full"))
            return
        handle = b"%s%d" % (self._prefix, next(self._counter))
        job = Job(handle, func, unique, data, priority, background, reducer, when)
        self.jobs[handle] = job
        func.total += 1
        func.submitted += 1
        job.since = job.submitted = now = self._now()
        if unique:
            self._index(job)
        created = encode(RES, T.JOB_CREATED, (handle,))
        if background and self.store is not None:
            self.store.save(job, peer, created)
        peer.send(created)
        if not background:
            self._attach(job, peer)
        if when and when > now:
            self._schedule(job)
        else:
            self._enqueue(job)

    def _promote(self, job: Job, peer: Peer, created: bytes) -> None:
        """A background submission coalesced onto a foreground job: the job becomes a
        background one, so that it outlives its foreground clients, and is saved; the
        JOB_CREATED ``created`` for ``peer`` is held until the save is durable (issue
        #17 item 5: a JOB_CREATED for a background submission always means durable)."""
        job.background = True
        job.abandoned = False  # its clients may have left while it ran: wanted again
        if self.store is not None:
            self.store.save(job, peer, created)

    def _named_function(self, peer: Peer, name: bytes) -> Function | None:
        """The function a packet names (created on first use, docs/protocol.md §3.2), or
        ``None`` after answering ERROR for an empty or over-long name (gearmand takes any,
        docs/protocol.md §1.5)."""
        if not name or len(name) > MAX_FUNCTION_NAME:
            peer.send(_error(b"INVALID_FUNCTION_NAME",
                             b"Function name must be 1 to 512 bytes long"))
            return None
        if _ADMIN_UNSAFE.search(name):
            # Admin listings are tab-separated lines ending with "."; such a name could
            # forge rows or end a listing early (issue #17).
            peer.send(_error(b"INVALID_FUNCTION_NAME",
                             b"Function name must not contain tabs or line breaks"))
            return None
        return self.function(name)

    def _find_coalesced(self, func: Function, unique: bytes, data: bytes) -> Job | None:
        if unique == b"-":
            return self._hyphen.get((func.name, data)) if data else None
        entry = self._uniques.get(unique)
        if entry is None:
            return None
        if type(entry) is Job:
            return entry if entry.function is func else None
        for job in entry:
            if job.function is func:
                return job
        return None

    def _index(self, job: Job) -> None:
        if job.unique == b"-":
            if not job.data:
                return
            self._hyphen[(job.function.name, job.data)] = job
        else:
            entry = self._uniques.get(job.unique)
            if entry is None:
                self._uniques[job.unique] = job
            elif type(entry) is Job:
                self._uniques[job.unique] = [entry, job]
            else:
                entry.append(job)
        job.coalesce = True

    def _unindex(self, job: Job) -> None:
        if not job.coalesce:
            return
        job.coalesce = False
        if job.unique == b"-":
            del self._hyphen[(job.function.name, job.data)]
            return
        entry = self._uniques[job.unique]
        if entry is job:
            del self._uniques[job.unique]
        else:
            entry.remove(job)
            if len(entry) == 1:
                self._uniques[job.unique] = entry[0]

    def _attach(self, job: Job, peer: Peer) -> None:
        # One attachment per submission: the same connection twice gets every packet twice.
        job.clients.append(peer)
        job.abandoned = False  # revive a job whose clients had all left (Q4)
        peer.attached[job] = peer.attached.get(job, 0) + 1
        peer.waiting += 1

    def _detach(self, job: Job, peer: Peer) -> None:
        """``peer`` stops waiting for ``job``; a foreground job nobody waits for goes."""
        peer.waiting -= peer.attached.pop(job, 0)
        job.clients = [c for c in job.clients if c is not peer]
        if job.clients or job.background:
            return
        if job.state == RUNNING:
            job.abandoned = True  # let the worker finish; its results go nowhere
        else:
            self._ended(job, "cancelled", "every client waiting on it left")
            self._remove(job)  # nobody will ever read the result (Q5: at once)

    # -- queues ------------------------------------------------------------------------

    def _enqueue(self, job: Job) -> None:
        func = job.function
        job.state = QUEUED
        queues = func.queues
        if queues is None:
            queues = func.queues = (deque(), deque(), deque())
        queues[job.priority].append(job)
        func.queued[job.priority] += 1
        func.ready += 1
        if func.sleepers:
            self._wake(func)

    def _schedule(self, job: Job) -> None:
        job.state = SCHEDULED
        job.function.scheduled += 1
        heapq.heappush(self._epochs, (job.when, id(job), job))
        self._arm_epoch_timer()

    def _arm_epoch_timer(self) -> None:
        while self._epochs and self._epochs[0][2].state != SCHEDULED:
            heapq.heappop(self._epochs)  # removed while waiting
        if not self._epochs:
            return
        due = self._epochs[0][0]
        if self._epoch_timer is not None:
            if self._epoch_timer_due <= due:
                return
            self._epoch_timer.cancel()
        self._epoch_timer_due = due
        self._epoch_timer = self.scheduler.call_later(
            max(0.0, due - self.scheduler.now()), self._epochs_due)

    def _epochs_due(self) -> None:
        """Timer: move every epoch job whose time has come to its queue and wake workers (Q7)."""
        self._epoch_timer = None
        now = self.scheduler.now()
        while self._epochs and self._epochs[0][0] <= now:
            _, _, job = heapq.heappop(self._epochs)
            if job.state == SCHEDULED:
                job.function.scheduled -= 1
                job.since = now
                self._enqueue(job)
        self._arm_epoch_timer()

    def _remove(self, job: Job) -> None:
        """Take a job out of the server entirely, wherever it is."""
        func = job.function
        state = job.state
        if state == DONE:
            return
        if job.stored:
            self.store.delete(job)
        if state == QUEUED:
            p = job.priority
            func.queued[p] -= 1
            func.ready -= 1
            func.dead[p] += 1
            if func.dead[p] > COMPACT_THRESHOLD and func.dead[p] > func.queued[p]:
                # A list, not a generator: no closures in a cpdef method (state.pxd).
                live = deque([j for j in func.queues[p] if j.state == QUEUED and j is not job])
                func.queues[p].clear()
                func.queues[p].extend(live)
                func.dead[p] = 0
        elif state == SCHEDULED:
            func.scheduled -= 1
        elif state == RUNNING:
            self._unassign(job)
        job.state = DONE
        func.total -= 1
        del self.jobs[job.handle]
        if job.coalesce:
            self._unindex(job)
        for client in job.clients:
            client.waiting -= client.attached.pop(job, 0)
        job.clients = []
        if not func.total and not func.workers and not func.pinned:
            self._reclaim(func)

    def _pop_runnable(self, func: Function, priority: int) -> Job:
        queue = func.queues[priority]
        while True:
            job = queue.popleft()
            if job.state == QUEUED:
                return job
            func.dead[priority] -= 1

    # -- workers: registration, sleeping, grabbing (docs/protocol.md §3.5–§3.7, §3.9) ------

    def _can_do(self, peer: Peer, packet: Packet) -> None:
        name = packet.args[0]
        timeout = 0.0
        if packet.type == T.CAN_DO_TIMEOUT:
            raw = packet.args[1]
            if len(raw) > 20:
                peer.send(_error(b"INVALID_ARGUMENT", b"Timeout value too long"))
                return
            ms = strtoll(raw) or 0
            if ms > 0:
                timeout = max(ms, 1000) / 1000.0
        cap = self.config.max_functions_per_connection
        if cap and len(peer.functions) >= cap:
            known = self.functions.get(name)
            if known is None or peer not in known.workers:
                peer.send(_error(b"TOO_MANY_FUNCTIONS",
                                 b"More functions registered on this connection than "
                                 b"--max-functions-per-connection allows"))
                return
        func = self._named_function(peer, name)
        if func is None:
            return
        if timeout:
            peer.timeouts[func] = timeout
        else:
            peer.timeouts.pop(func, None)
        if peer in func.workers:
            return
        func.workers[peer] = None
        peer.functions.append(func)
        if peer.sleep == SLEEPING:
            func.sleepers[peer] = None
        elif peer.sleep == WOKEN:
            func.woken += 1

    def _cant_do(self, peer: Peer, packet: Packet) -> None:
        func = self.functions.get(packet.args[0])
        if func is not None and peer in func.workers:
            self._unregister(peer, func)

    def _reset_abilities(self, peer: Peer, packet: Packet) -> None:
        for func in list(peer.functions):
            self._unregister(peer, func)

    def _unregister(self, peer: Peer, func: Function) -> None:
        for job in [j for j in peer.jobs.values() if j.function is func]:
            self._lose(job)
        del func.workers[peer]
        func.sleepers.pop(peer, None)
        if peer.sleep == WOKEN:
            func.woken -= 1
            if func.ready and func.sleepers:
                self._wake(func)  # pass on the NOOP this worker will not act on for func
        peer.functions.remove(func)
        peer.timeouts.pop(func, None)
        peer.rr = 0
        if not func.total and not func.workers and not func.pinned:
            self._reclaim(func)

    def _reclaim(self, func: Function) -> None:
        """Forget a function with no worker, no job and no admin entry (issue #17: names
        registered by a connection that closed stayed for good). Its counters go with
        it (/metrics sees a counter reset); a later CAN_DO or submission makes it anew."""
        if self.functions.get(func.name) is func:
            del self.functions[func.name]
        if func.wake_timer is not None:
            func.wake_timer.cancel()
            func.wake_timer = None

    def _set_sleep(self, peer: Peer, sleep: int) -> None:
        old = peer.sleep
        if old == sleep:
            return
        for func in peer.functions:
            if old == SLEEPING:
                func.sleepers.pop(peer, None)
            elif old == WOKEN:
                func.woken -= 1
            if sleep == SLEEPING:
                func.sleepers[peer] = None
            elif sleep == WOKEN:
                func.woken += 1
        peer.sleep = sleep

    def _pre_sleep(self, peer: Peer, packet: Packet) -> None:
        if self._stale and peer in self._stale:
            # What is ready may be the retry it was just refused: no NOOP at once, else
            # GRAB/NO_JOB/PRE_SLEEP/NOOP would spin. New jobs and _end_stale() wake it.
            self._set_sleep(peer, SLEEPING)
            return
        for func in peer.functions:
            if func.ready:
                # Rule 1: close the race between NO_JOB and PRE_SLEEP.
                self._set_sleep(peer, WOKEN)
                peer.send(_NOOP)
                return
        self._set_sleep(peer, SLEEPING)

    def _wake(self, func: Function) -> None:
        """NOOP sleepers of ``func``: as many as it has runnable jobs not yet claimed by a
        woken worker (times ``--worker-wakeup``; 0 wakes them all, like gearmand)."""
        per_job = self.config.worker_wakeup
        sleepers = func.sleepers
        woke = False
        while sleepers and (not per_job or func.ready * per_job > func.woken):
            worker = next(iter(sleepers))
            self._set_sleep(worker, WOKEN)
            worker.send(_NOOP)
            woke = True
        if woke and per_job and func.wake_timer is None:
            func.wake_timer = self.scheduler.call_later(
                WAKE_GRACE, lambda: self._wake_overdue(func))

    def _wake_overdue(self, func: Function) -> None:
        """Timer: jobs still wait although workers were woken for them. Those workers may be
        busy, slow or ignoring NOOPs; stop counting on them and wake other sleepers, so
        that waking one worker per job never leaves a job stranded."""
        func.wake_timer = None
        count = min(func.ready, len(func.sleepers))
        for _ in range(count):
            worker = next(iter(func.sleepers))
            self._set_sleep(worker, WOKEN)
            worker.send(_NOOP)
        if count:
            func.wake_timer = self.scheduler.call_later(
                WAKE_GRACE, lambda: self._wake_overdue(func))

    def _grab(self, peer: Peer, packet: Packet) -> None:
        was_woken = peer.sleep == WOKEN
        if peer.sleep != AWAKE:
            self._set_sleep(peer, AWAKE)
        job = None if self.draining else self._next_job(peer)
        if job is not None and self._stale and self._refuse_stale(peer, job):
            job = None
        if job is None:
            peer.send(_NO_JOB)
        else:
            self._assign(peer, job, packet.type)
        if was_woken:
            # This worker may have taken another function's job (or none): whatever it
            # left runnable must not wait for lack of a woken worker.
            for func in peer.functions:
                if func.ready and func.sleepers:
                    self._wake(func)

    def _refuse_stale(self, peer: Peer, job: Job) -> bool:
        """Whether ``job`` (just popped for ``peer``) is the retry of an attempt that timed
        out on ``peer`` and may still run there: then it goes back to the head of its
        queue (its counters never moved) for another worker."""
        stale = self._stale.get(peer)
        if stale is None or job.handle not in stale:
            return False
        func = job.function
        func.queues[job.priority].appendleft(job)
        if func.sleepers:
            self._wake(func)  # someone else may take it now
        return True

    def _next_job(self, peer: Peer) -> Job | None:
        """Global priority across the worker's functions, round-robin among them (the
        gearmand 2.0 rule, docs/protocol.md §3.5), FIFO within a priority."""
        funcs = peer.functions
        count = len(funcs)
        if count == 1:
            func = funcs[0]
            if not func.ready:
                return None
            queued = func.queued
            priority = HIGH if queued[HIGH] else NORMAL if queued[NORMAL] else LOW
            return self._pop_runnable(func, priority)
        start = peer.rr
        for priority in (HIGH, NORMAL, LOW):
            for i in range(count):
                func = funcs[(start + i) % count]
                if func.queued[priority]:
                    peer.rr = (start + i + 1) % count
                    return self._pop_runnable(func, priority)
        return None

    def _assign(self, peer: Peer, job: Job, grab_type: int) -> None:
        func = job.function
        func.queued[job.priority] -= 1
        func.ready -= 1
        func.running += 1
        job.state = RUNNING
        job.worker = peer
        peer.jobs[job.handle] = job
        if grab_type == T.GRAB_JOB:
            peer.send(encode(RES, T.JOB_ASSIGN, (job.handle, func.name, job.data)))
        elif grab_type == T.GRAB_JOB_ALL and job.reducer is not None:
            peer.send(encode(RES, T.JOB_ASSIGN_ALL,
                             (job.handle, func.name, job.unique, job.reducer, job.data)))
        else:
            peer.send(encode(RES, T.JOB_ASSIGN_UNIQ,
                             (job.handle, func.name, job.unique, job.data)))
        timeout = peer.timeouts.get(func) if peer.timeouts else None
        if timeout:
            job.timer = self.scheduler.call_later(  # partial: no lambda here (state.pxd)
                timeout, functools.partial(self._timed_out, job, peer))

    def _timed_out(self, job: Job, worker: Peer) -> None:
        """CAN_DO_TIMEOUT ran out: a failed attempt, as if the worker had answered
        WORK_FAIL (issue #17; the Perl server does the same). Its clients get WORK_FAIL; a
        background job runs again as its retry policy (or ``--retry-failed``) allows,
        then becomes a dead letter (at once with no retries: a job that always outlives
        its timeout is kept, not lost and not retried forever)."""
        if job.state != RUNNING or job.worker is not worker:
            return
        job.timer = None
        log.warning("job %s of %s timed out on %r: a failed attempt", job.handle.decode(),
                    job.function.name.decode(errors="replace"), worker,
                    extra=_job_fields(job, "job.timeout", worker))
        self._failed(job, "timeout", f"no result from worker {worker.address} "
                     f"fd={worker.fd} within CAN_DO_TIMEOUT")
        if job.clients:
            self._relay_to_clients(job, encode(RES, T.WORK_FAIL, (job.handle,)))
        if not job.background:
            self._ended(job, "timeout", "no result within CAN_DO_TIMEOUT")
            self._remove(job)
            return
        self._retry_or_bury(job, timeout=True)
        if job.state == SCHEDULED:  # to run again: not beside this attempt on this worker
            stale = self._stale.get(worker)
            if stale is None:
                stale = self._stale[worker] = set()
            stale.add(job.handle)

    def _end_stale(self, worker: Peer, handle: bytes) -> None:
        """The worker answered for an attempt that had timed out: it may have that job's
        retry now; wake it if it sleeps while work waits (it was refused some)."""
        stale = self._stale[worker]
        stale.discard(handle)
        if stale:
            return
        del self._stale[worker]
        if worker.sleep == SLEEPING:
            for func in worker.functions:
                if func.ready:
                    self._set_sleep(worker, WOKEN)
                    worker.send(_NOOP)
                    return

    def _lose(self, job: Job) -> None:
        """The worker holding ``job`` is gone (disconnect, CANT_DO, timeout): requeue it at
        the tail, or fail it once ``--job-retries`` attempts are used up (docs/protocol.md §3.7)."""
        func = job.function
        job.retries += 1
        limit = self.config.job_retries
        if limit >= 0 and job.retries >= max(limit, 1):
            log.warning("job %s of %s failed after %d attempts", job.handle.decode(),
                        func.name.decode(errors="replace"), job.retries,
                        extra=_job_fields(job, "job.retries_exhausted", job.worker))
            self._relay_to_clients(job, encode(RES, T.WORK_FAIL, (job.handle,)))
            self._failed(job, "lost worker", f"failed after {job.retries} attempts "
                         "(--job-retries)")
            if job.background:
                self._keep(job, KEPT_FAILED, b"")
            self._ended(job, "lost", f"worker lost; failed after {job.retries} attempts "
                        "(--job-retries)", counted=1)
            self._remove(job)
            return
        if job.abandoned or (not job.clients and not job.background):
            # Cancelled, or its clients left while it ran: nobody wants a rerun.
            self._ended(job, "lost", "worker lost", counted=1)
            self._remove(job)
            return
        self._ended(job, "requeued", "worker lost: requeued", counted=1)
        self._unassign(job)
        job.numerator = job.denominator = 0
        self._enqueue(job)

    def _unassign(self, job: Job) -> None:
        """Take a running job back from its worker (its timeout timer too)."""
        worker = job.worker
        del worker.jobs[job.handle]
        job.worker = None
        if job.timer is not None:
            job.timer.cancel()
            job.timer = None
        func = job.function
        func.running -= 1

    # -- results (docs/protocol.md §3.4, §3.10) ---------------------------------------------

    def _work(self, peer: Peer, packet: Packet) -> None:
        ptype = packet.type
        handle = packet.args[0]
        job = peer.jobs.get(handle)
        if job is None:
            stale = self._stale.get(peer) if self._stale else None
            if stale is not None and handle in stale:
                # The late word of an attempt that timed out: taken quietly.
                if ptype == T.WORK_EXCEPTION:
                    peer.last_exception = handle  # its WORK_FAIL may follow
                if ptype == T.WORK_COMPLETE or ptype == T.WORK_FAIL or \
                        ptype == T.WORK_EXCEPTION:
                    self._end_stale(peer, handle)
                return
            if ptype == T.WORK_FAIL:
                if handle == peer.last_exception:
                    # python-gearman and Perl send WORK_FAIL after WORK_EXCEPTION; an
                    # ERROR would make them drop the connection (docs/protocol.md §3.10).
                    peer.last_exception = None
                    return
                if len(handle) > MAX_HANDLE:
                    peer.send(_error(
                        b"ARGUMENT_TOO_LARGE",
                        b"Error occurred due to GEARMAND_JOB_HANDLE_SIZE being too small "
                        b"from snprintf"))
                    return
            peer.send(_error(b"JOB_NOT_FOUND", _NOT_FOUND_TEXT[ptype]))
            return
        if ptype == T.WORK_STATUS:
            job.numerator = strtoul32(packet.args[1])
            job.denominator = strtoul32(packet.args[2])
        if job.clients:
            if ptype == T.WORK_EXCEPTION:
                exception = encode(RES, ptype, packet.args)
                fail = encode(RES, T.WORK_FAIL, (handle,))
                for client in job.clients:
                    client.send(exception if client.exceptions else fail)
            else:
                self._relay_to_clients(job, encode(RES, ptype, packet.args))
        if ptype == T.WORK_COMPLETE:
            # The common ending first, on its own: one comparison on the hot path.
            peer.last_exception = None
            func = job.function
            func.completed += 1
            # LatencyHistogram.observe(), inlined: this runs once per job.
            now = self._now()
            seconds = now - job.since
            latency = func.latency
            latency.counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1
            latency.sum += seconds
            history = self.history
            if history is not None:
                history.add((job.handle, func.name, job.unique,
                             "cancelled" if job.abandoned else "done",
                             job.submitted or job.since, now,
                             job.failures + job.retries + 1, ""))
            if job.background:  # the only extra test a foreground job pays
                self._keep(job, KEPT_DONE, packet.args[1])
            self._remove(job)
        elif ptype == T.WORK_FAIL or ptype == T.WORK_EXCEPTION:
            if ptype == T.WORK_FAIL:
                peer.last_exception = None
                self._failed(job, "fail", "")
                text = b""
            else:
                peer.last_exception = handle
                job.function.exceptions += 1
                text = packet.args[1]
                self._failed(job, "exception", text.decode(errors="replace"))
            if job.background and (self.config.retry_failed or
                                   job.data.startswith(RETRY_MAGIC)):
                self._retry_or_bury(job, text)
            else:
                if job.background:
                    self._keep(job, KEPT_FAILED, text)
                self._ended(job, "failed", text)
                self._remove(job)

    def _ended(self, job: Job, outcome: str, text: bytes | str = b"",
               counted: int = 0) -> None:
        """Record an ending (or a failed attempt to run again) in the history; ``counted``
        is 1 when this attempt is already in ``job.failures``/``job.retries``. Off the hot
        path: WORK_COMPLETE records its own."""
        history = self.history
        if history is None:
            return
        if isinstance(text, bytes):
            text = text.decode(errors="replace")
        history.record(job.handle, job.function.name, job.unique,
                       "cancelled" if job.abandoned and outcome != "dead" else outcome,
                       job.submitted or job.since, self._now(),
                       job.failures + job.retries + 1 - counted, short_error(text))

    def _keep(self, job: Job, state: bytes, data: bytes) -> None:
        """Keep the outcome of an ending background job for admin ``result`` (when
        results are kept and it has a unique). Before ``_remove``/``mark_dead``, so that
        the result goes into the same store batch as the end of the job's row."""
        results = self.results
        unique = job.unique
        if results is None or not unique or unique == b"-" or job.abandoned:
            return  # no unique: nobody can ask for it; abandoned: cancelled
        results.keep(unique, state, job.numerator, job.denominator, data)

    def _failed(self, job: Job, what: str, detail: str, count: bool = True) -> None:
        """Count a failed job (unless ``count`` is false: a timeout, which ``_lose()``
        requeues or counts, or a dead letter, counted at its last failure) and keep a
        record of it for the status page. Off the hot path."""
        now = self._now()
        if count:
            func = job.function
            func.failed += 1
            func.latency.observe(now - job.since)
        self.failures.append(Failure(now, job.function.name, job.handle, job.unique, what,
                                     short_error(detail)[:DETAIL_CHARS]))

    @staticmethod
    def _relay_to_clients(job: Job, data: bytes) -> None:
        for client in job.clients:
            client.send(data)

    # -- status (docs/protocol.md §2.1) ----------------------------------------------------

    def _get_status(self, peer: Peer, packet: Packet) -> None:
        handle = packet.args[0]
        if len(handle) > MAX_HANDLE:
            peer.send(_error(b"ARGUMENT_TOO_LARGE", b"Job handle too large"))
            return
        job = self.jobs.get(handle)
        if job is None:
            peer.send(encode(RES, T.STATUS_RES, (handle, b"0", b"0", b"0", b"0")))
            return
        peer.send(encode(RES, T.STATUS_RES, (
            handle, b"1", b"1" if job.state == RUNNING else b"0",
            b"%d" % job.numerator, b"%d" % job.denominator)))

    def _get_status_unique(self, peer: Peer, packet: Packet) -> None:
        unique = packet.args[0]
        if len(unique) > MAX_UNIQUE:
            peer.send(_error(b"ARGUMENT_TOO_LARGE", b"Unique value too large"))
            return
        entry = self._uniques.get(unique) if unique else None
        job = entry[0] if isinstance(entry, list) else entry
        if job is None:
            peer.send(encode(RES, T.STATUS_RES_UNIQUE, (unique, b"0", b"0", b"0", b"0", b"0")))
            return
        peer.send(encode(RES, T.STATUS_RES_UNIQUE, (
            unique, b"1", b"1" if job.state == RUNNING else b"0",
            b"%d" % job.numerator, b"%d" % job.denominator, b"%d" % len(job.clients))))

    # -- admin actions (used by admin.py) --------------------------------------------------

    def function(self, name: bytes) -> Function:
        """The function called ``name``, created if it does not exist yet
        (docs/protocol.md §3.2)."""
        func = self.functions.get(name)
        if func is None:
            func = self.functions[name] = Function(name)
            if self.config.max_queue:
                func.limits = [self.config.max_queue] * 3  # --max-queue
        return func

    def cancel(self, handle: bytes) -> bool:
        """Admin ``cancel job``: clients get WORK_FAIL and are detached (Q10); a queued job
        goes at once (Q5); a running one may finish, its result going nowhere."""
        job = self.jobs.get(handle)
        if job is None:
            return False
        fail = encode(RES, T.WORK_FAIL, (handle,))
        for client in job.clients:
            client.send(fail)
            client.waiting -= client.attached.pop(job, 0)
        job.clients = []
        if job.state == RUNNING:
            job.abandoned = True
            self._unindex(job)  # the coalescing window closes with the cancel
        else:
            self._ended(job, "cancelled")
            self._remove(job)
        return True


    # -- the queue store (docs/protocol.md §3.13) ------------------------------------------

    def restore(self, rows: Iterable[StoredJob], last_handle: int = 0) -> int:
        """Replay stored background jobs at start-up, oldest first: each keeps the handle
        it was given (a row saved before handles were stored gets a fresh one), so a
        client that holds it across the restart still finds the job; the unique index
        (so coalescing works for them), counters and queues as if just submitted; epoch
        jobs keep their due time; dead letters stay dead letters, with their death time,
        attempts and last error. New handles continue past ``last_handle`` (the highest
        number issued before, ``QueueStore.last_handle``) and past every restored one:
        a handle never names two jobs across restarts (docs/protocol.md §3.13).
        Returns how many rows were restored."""
        rows = list(rows)
        prefix = self._prefix
        highest = last_handle
        for row in rows:
            if row.handle.startswith(prefix) and row.handle[len(prefix):].isdigit():
                highest = max(highest, int(row.handle[len(prefix):]))
        if highest:
            self._counter = itertools.count(max(highest + 1, self.last_handle() + 1))
        now = self.scheduler.now()
        count = 0
        for row in rows:
            func = self.function(row.function)
            handle = row.handle
            if not handle or handle in self.jobs or handle in self.dead:
                handle = b"%s%d" % (self._prefix, next(self._counter))
            job = Job(handle, func, row.unique, row.data, row.priority, True, row.reducer,
                      row.when)
            job.stored = row.id
            job.since = now
            if row.dead:
                job.state = DEAD
                job.failures = row.failures
                job.retries = max(row.attempts - row.failures, 0)
                self.dead[handle] = job
                if row.died:
                    self.dead_info[handle] = DeadLetter(
                        row.died, row.attempts, row.error.decode(errors="replace"))
                count += 1
                continue
            self.jobs[handle] = job
            func.total += 1
            if row.unique and self._find_coalesced(func, row.unique, row.data) is None:
                self._index(job)
            if row.when and row.when > now:
                self._schedule(job)
            else:
                self._enqueue(job)
            count += 1
        return count

    def last_handle(self) -> int:
        """The highest handle number issued so far (0: none). Read by the committer once
        per store batch, never per job."""
        issued = next(self._counter)
        self._counter = itertools.count(issued)
        return issued - 1

    def store_failed(self, batch) -> int:
        """The store could not write ``batch``: its jobs leave the server, and the
        submissions told JOB_CREATED about them no longer wait on them (their replies
        become ERROR: ``commit.fail_batch``, which calls this). A foreground job that a
        background submission promoted stays its own clients'. Returns how many jobs were
        dropped."""
        jobs: dict[Job, None] = {}
        for peer, _reply, job, attached in batch.acks:
            jobs[job] = None
            if attached and peer.attached.get(job):
                # A foreground submission told ERROR: it no longer waits on the job.
                job.clients.remove(peer)
                peer.waiting -= 1
                peer.attached[job] -= 1
                if not peer.attached[job]:
                    del peer.attached[job]
        dropped = 0
        for job in jobs:
            job.stored = 0  # there is no row to delete
            if job.clients and job.state != DONE:
                # A foreground job promoted by a background submission (``_promote``):
                # its own clients were told JOB_CREATED long before; it stays theirs.
                job.background = False
                continue
            self._remove(job)  # detaches no one: every submission was told ERROR
            dropped += 1
        return dropped

    # -- kept results (--result-ttl, KeptResults; admin ``result``) ----------------------

    def result_of(self, unique: bytes) -> tuple[bytes, int, int, Kept | None]:
        """What is known of the job with unique ``unique``: ``(state, numerator,
        denominator, kept)``. A live job wins (``queued``, also while scheduled or waiting
        for a retry, or ``running``, with its progress); else its kept outcome (``done``,
        ``failed``, ``dead``, with ``kept`` set); else a dead letter with that unique, kept
        or not (it waits for a person longer than ``--result-ttl``; found by a scan of the
        dead letters, on this path only); else ``unknown``."""
        entry = self._uniques.get(unique) if unique else None
        if entry is not None:
            if type(entry) is Job:
                job = entry
            else:  # the same unique under several functions: a background one first
                job = next((j for j in entry if j.background), entry[0])
            state = b"running" if job.state == RUNNING else b"queued"
            return state, job.numerator, job.denominator, None
        kept = self.results.get(unique) if self.results is not None and unique else None
        if kept is None:
            dead = next((j for j in self.dead.values() if j.unique == unique), None) \
                if unique and self.dead else None
            if dead is None:
                return b"unknown", 0, 0, None
            info = self.dead_info.get(dead.handle)
            text = info.error.encode() if info is not None else b""
            # Read as kept while the dead letter lasts: each read says another TTL.
            kept = Kept(KEPT_DEAD, 0, 0, self.scheduler.now() + self.config.result_ttl,
                        text, 0, len(text))
        return kept.state, kept.numerator, kept.denominator, kept

    def restore_results(self, rows: Iterable[tuple]) -> int:
        """Kept results read back from the store at start-up (``load_results``); none
        when results are not kept. Returns how many were restored."""
        if self.results is None:
            return 0
        return self.results.restore(rows)

    # -- retries and dead letters (--retry-failed, --retry-backoff) --------------------------

    def _retry_or_bury(self, job: Job, text: bytes = b"", timeout: bool = False) -> None:
        """A background job's worker answered WORK_FAIL or WORK_EXCEPTION, or its attempt
        timed out (its clients, if any coalesced onto it, were told and are detached). Run
        it again after a back-off, or once its retries are used up, move it to the dead
        letters (``show dead jobs``); ``text`` (the exception's, or empty) is then kept as
        its ``dead`` result and in ``dead_info``. The job's own policy (``GOR1`` line,
        ``gearoffload.retry``) wins over ``--retry-failed``/``--retry-backoff``."""
        func = job.function
        self._unassign(job)
        for client in job.clients:
            client.waiting -= client.attached.pop(job, 0)
        job.clients = []
        job.failures += 1
        numerator, denominator = job.numerator, job.denominator
        error = text or (b"no result within CAN_DO_TIMEOUT" if timeout else b"")
        job.numerator = job.denominator = 0
        name = func.name.decode(errors="replace")
        policy = RetryPolicy.parse(job.data)
        if policy is None:
            policy = RetryPolicy(self.config.retry_failed, self.config.retry_backoff,
                                 float("inf"), False)
        if job.failures <= policy.retries and not job.abandoned:
            delay = policy.delay(job.failures)
            log.info("job %s of %s failed (%d of %d retries); again in %.3gs",
                     job.handle.decode(), name, job.failures, policy.retries, delay,
                     extra=_job_fields(job, "job.retry"))
            func.retried += 1
            self._ended(job, "retrying", error, counted=1)
            job.when = self.scheduler.now() + delay
            self._schedule(job)
            return
        job.state = DEAD
        func.total -= 1
        del self.jobs[job.handle]
        self._unindex(job)
        if not func.total and not func.workers and not func.pinned:
            self._reclaim(func)
        self._ended(job, "dead", error, counted=1)
        if job.abandoned:  # cancelled while it ran: gone, not dead
            if job.stored:
                self.store.delete(job)
            return
        self.dead[job.handle] = job
        died = self._now()
        self.dead_info[job.handle] = DeadLetter(died, job.failures + job.retries,
                                                text.decode(errors="replace"))
        job.numerator, job.denominator = numerator, denominator
        self._keep(job, KEPT_DEAD, text)
        job.numerator = job.denominator = 0
        if job.stored:
            self.store.mark_dead(job, True, died, text)
        self._failed(job, "dead letter", f"failed {job.failures} times",
                     count=False)  # counted as failed when its last attempt failed
        log.warning("job %s of %s failed %d times: moved to the dead letters",
                    job.handle.decode(), name, job.failures,
                    extra=_job_fields(job, "job.dead_letter"))

    def requeue_dead(self, handle: bytes) -> bool:
        """Admin ``requeue dead job H``: a dead job runs again with its handle, its
        failure count reset; its unique coalesces again unless a live job took it."""
        job = self.dead.pop(handle, None)
        if job is None:
            return False
        self.dead_info.pop(handle, None)
        job.function = func = self.function(job.function.name)  # it may have been dropped
        job.failures = job.retries = 0
        job.abandoned = False
        job.when = 0
        job.since = self._now()
        self.jobs[handle] = job
        func.total += 1
        if job.unique and self._find_coalesced(func, job.unique, job.data) is None:
            self._index(job)
        if job.stored:
            self.store.mark_dead(job, False)
        self._enqueue(job)
        return True

    def delete_dead(self, handle: bytes) -> bool:
        """Admin ``delete dead job H``: forget a dead letter (its row in the store too).
        Its kept ``dead`` result stays until it expires: a reader still learns its end."""
        job = self.dead.pop(handle, None)
        if job is None:
            return False
        self.dead_info.pop(handle, None)
        if job.stored:
            self.store.delete(job)
        return True
