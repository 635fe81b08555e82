"""``Worker``: serve Gearman jobs from one or more servers, up to M at once in greenlets.

The loop follows docs/protocol.md §3.6 and §8: register (``CAN_DO`` / ``CAN_DO_TIMEOUT``,
``SET_CLIENT_ID``), ``GRAB_JOB_UNIQ``; on ``NO_JOB`` send ``PRE_SLEEP`` and wait for
``NOOP``; after every ``NOOP`` grab again. Each server has its own connection and loop, so
a server that is down does not stop the others; a lost connection is reopened with
back-off and everything is registered again. Jobs the worker held on a lost connection are
requeued by the server.

Example::

    from gearoffload import Worker

    worker = Worker("127.0.0.1:4730", concurrency=10)

    @worker.task("upper")
    def upper(job):
        job.send_status(1, 2)
        return job.data.upper()

    worker.work()          # until worker.stop() (e.g. from a signal handler)

Tasks run in greenlets: I/O-bound work (HTTP calls, databases through gevent-friendly
drivers, sub-jobs) overlaps; CPU-bound work blocks every greenlet of the process, so run
it with ``concurrency=1`` in several processes (``gearoffload-worker --processes N``).
"""

from __future__ import annotations

import logging
import random
import time
from collections import deque
from collections.abc import Iterable
from typing import Any

import gevent
from gevent.event import Event
from gevent.hub import Waiter
from gevent.pool import Group

from .connection import Address, Connection, format_address, parse_servers
from .errors import JobFailed
from .protocol import PT as T
from .protocol import Packet, PacketType, encode_request, to_bytes
from .registry import Task, TaskFunction, TaskRegistry
from .tls import TlsOption, client_context

__all__ = ["Worker", "WorkerJob"]

log = logging.getLogger("gearoffload.worker")

#: Reconnect back-off: 0.1 s doubling to 1 s, each wait jittered down by up to half.
#: Capped this low so that a restarted server gets its workers back within about a second
#: (connection refused costs a down server next to nothing).
_BACKOFF_START = 0.1
_BACKOFF_MAX = 1.0
_ASSIGN_TYPES = frozenset((T.JOB_ASSIGN, T.JOB_ASSIGN_UNIQ, T.JOB_ASSIGN_ALL))
_GRAB_JOB_UNIQ = encode_request(T.GRAB_JOB_UNIQ)  # sent about once per job: encoded once
#: How long a stopping worker waits for the answers to GRABs it already sent.
_GRAB_ANSWER_TIMEOUT = 5.0
_STOP = object()  # put in a session's inbox: stop grabbing


class _Closed:
    """Put in a session's inbox when its connection ends."""

    __slots__ = ("reason",)

    def __init__(self, reason: BaseException | None) -> None:
        self.reason = reason


def _job_fields(job: WorkerJob, event: str) -> dict[str, object]:
    """Structured log fields of a task event (``gearoffload.logfmt``)."""
    return {"event": event, "handle": job.handle, "function": job.function,
            "unique": job.unique or None, "server": job.server}


def _as_bytes(value: Any) -> bytes:
    """A task's result (or data it sends): bytes, str (UTF-8) or None (empty)."""
    if type(value) is bytes:  # the usual case, without to_bytes()'s checks
        return value
    return b"" if value is None else to_bytes(value, "a task's result")


class _Mailbox:
    """What a session's greenlet is handed by the connection's reader: one consumer.

    A deque and one gevent ``Waiter``: a wait and the wake-up that ends it cost about
    3.4 µs, against 7.0 µs through a ``gevent.queue.Queue`` (100 greenlets, measured).
    """

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: deque[Any] = deque()
        self._waiter: Waiter | None = None

    def put(self, item: Any) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None  # woken once, however many items come before it runs
            waiter.hub.loop.run_callback(waiter.switch, None)

    def get(self) -> Any:
        items = self._items
        while not items:
            waiter = self._waiter = Waiter()
            try:
                waiter.get()
            finally:
                self._waiter = None
        return items.popleft()


class _Slots:
    """How many more jobs the worker may take: a counter, and the sessions (one per
    server) waiting for a job to finish when none is free.

    A gevent ``BoundedSemaphore`` did the same at about 0.3 µs per call, and a session
    calls it twice a job (the second call finds no slot free) and a runner once.
    """

    __slots__ = ("free", "_waiters")

    def __init__(self, count: int) -> None:
        self.free = count
        self._waiters: deque[Waiter] = deque()

    def take(self) -> bool:
        """Take a slot if one is free."""
        if self.free:
            self.free -= 1
            return True
        return False

    def release(self) -> None:
        self.free += 1
        if self._waiters:
            waiter = self._waiters.popleft()
            waiter.hub.loop.run_callback(waiter.switch, True)

    def wait(self, timeout: float) -> bool:
        """Block until a slot is released (True; it may be taken by then) or ``timeout``
        seconds pass (False)."""
        waiter = Waiter()
        timer = waiter.hub.loop.timer(timeout)
        timer.start(waiter.switch, False)
        self._waiters.append(waiter)
        try:
            return waiter.get()
        finally:
            timer.close()
            if waiter in self._waiters:
                self._waiters.remove(waiter)


class _Runners:
    """The greenlets that run a worker's jobs: long-lived, handed one job at a time.

    A greenlet per job costs about 22 µs to spawn, start and finish, twice what a job
    costs the worker (compiled). Jobs wait in ``_pending``; a runner that finishes one takes the
    next without a switch (jobs come in batches, one per read). Idle runners (each parked
    on a ``Waiter``) are woken from the hub for the jobs the busy ones have not taken by
    then; a new runner is started when more jobs wait than runners are idle. So there
    are about as many runners as jobs ever ran at once (the worker's slots bound those).
    """

    def __init__(self, run: Any) -> None:
        self._run = run
        self._greenlets: set[gevent.Greenlet] = set()
        self._pending: deque[tuple] = deque()
        self._idle: list[Waiter] = []  # one per runner waiting for a job
        self._waking = False  # _wake() is scheduled
        self.active = 0      # jobs handed over and not finished
        self._finished = Event()
        self._finished.set()

    def __len__(self) -> int:
        return self.active

    def __contains__(self, greenlet: object) -> bool:
        return greenlet in self._greenlets

    def spawn(self, *args: Any) -> None:
        """Run ``run(*args)`` in a runner, now or as soon as the hub switches."""
        self.active += 1
        if self.active == 1:
            self._finished.clear()
        pending = self._pending
        pending.append(args)
        if len(pending) > len(self._idle):
            # More jobs wait than idle runners could take (a job that runs blocks its
            # runner): a runner more. Busy ones may still take them first, and then the
            # new one waits idle.
            self._greenlets.add(gevent.spawn(self._loop))
        elif not self._waking:
            self._waking = True
            gevent.get_hub().loop.run_callback(self._wake)

    def _wake(self) -> None:
        # In the hub, after the busy runners have had their turn: what they have not
        # taken goes to idle ones. Each switch returns here once that runner waits again.
        self._waking = False
        pending, idle = self._pending, self._idle
        while pending and idle:
            idle.pop().switch(None)

    def join(self, timeout: float | None = None) -> bool:
        """Wait until no job runs; False if ``timeout`` passed first."""
        return self._finished.wait(timeout)

    def kill(self) -> None:
        """Kill every runner (their jobs are abandoned) and start afresh."""
        gevent.killall(list(self._greenlets))
        self._greenlets.clear()
        self._pending = deque()
        self._idle = []
        self.active = 0
        self._finished.set()

    def _loop(self) -> None:
        pending, idle = self._pending, self._idle
        try:
            while True:
                while pending:
                    args = pending.popleft()
                    try:
                        self._run(*args)
                    finally:
                        self.active -= 1
                        if not self.active:
                            self._finished.set()
                # A runner woken for a job another runner took finds nothing: it waits
                # again.
                waiter = Waiter()
                idle.append(waiter)
                waiter.get()
        finally:
            self._greenlets.discard(gevent.getcurrent())


class WorkerJob:
    """The job a task receives: its data and ways to report back while it runs.

    Example::

        @worker.task("count")
        def count(job):
            lines = job.data.splitlines()
            for i, line in enumerate(lines, 1):
                job.send_status(i, len(lines))      # WORK_STATUS, for Job.status()
            job.send_data(b"partial")               # WORK_DATA, for Job.updates()
            return str(len(lines))                  # WORK_COMPLETE
    """

    __slots__ = ("handle", "function", "unique", "data", "server", "_handle", "_conn")

    def __init__(self, conn: Connection, handle: bytes, function: bytes, unique: bytes,
                 data: bytes) -> None:
        self._conn = conn
        self._handle = handle
        self.handle = handle.decode("latin-1")
        self.function = function.decode("utf-8", "replace")
        self.unique = unique.decode("utf-8", "replace")
        self.data = data
        self.server = conn.name

    def __repr__(self) -> str:
        return f"<WorkerJob {self.function} {self.handle} unique={self.unique!r}>"

    @property
    def text(self) -> str:
        """``data`` decoded as UTF-8."""
        return self.data.decode()

    def _send(self, ptype: int, *args: bytes) -> None:
        try:
            self._conn.send(ptype, self._handle, *args)
        except ConnectionError:
            # The connection is gone, so the server has requeued the job already; the
            # result can only be dropped.
            log.debug("connection lost; dropping %s for %s", PacketType(ptype).name, self.handle)

    def send_status(self, numerator: int, denominator: int) -> None:
        """Report progress (WORK_STATUS): ``numerator`` of ``denominator`` done."""
        self._send(T.WORK_STATUS, str(int(numerator)).encode(), str(int(denominator)).encode())

    def send_data(self, data: bytes | str) -> None:
        """Send a chunk of partial output to waiting clients (WORK_DATA)."""
        self._send(T.WORK_DATA, _as_bytes(data))

    def send_warning(self, data: bytes | str) -> None:
        """Send a warning to waiting clients (WORK_WARNING); the job goes on."""
        self._send(T.WORK_WARNING, _as_bytes(data))


class Worker:
    """A Gearman worker: registers tasks with every server and runs the jobs it grabs.

    ``servers``: ``"host:port"``, comma-separated, or a list. ``concurrency``: jobs run at
    once (greenlets), across all servers. ``registry``: a shared ``TaskRegistry`` (default:
    a fresh one). ``client_id`` is shown by the admin ``workers`` command. ``tls``: as for
    ``Client`` (``None``, ``True``, an ``ssl.SSLContext`` or ``tls_context()``'s arguments).

    Example::

        worker = Worker(["127.0.0.1:4730", "127.0.0.1:4731"], concurrency=20)
        worker.register("reverse", lambda job: job.data[::-1])
        gevent.spawn(worker.work)
        ...
        worker.stop()          # graceful: running jobs finish first
    """

    def __init__(
        self,
        servers: str | Iterable[str] = "127.0.0.1:4730",
        client_id: str | None = None,
        concurrency: int = 1,
        registry: TaskRegistry | None = None,
        connect_timeout: float = 5.0,
        tls: TlsOption = None,
    ) -> None:
        self.addresses: list[Address] = parse_servers(servers)
        self.tls = client_context(tls)
        self.client_id = "".join((client_id or "").split()) or None
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.concurrency = concurrency
        self.registry = registry if registry is not None else TaskRegistry()
        self.connect_timeout = connect_timeout
        self._stop_event = Event()
        self._done = Event()
        self._done.set()
        self._graceful = True
        self._drain_timeout: float | None = None
        self._working = False
        self._slots: _Slots | None = None
        self._concurrency = concurrency  # work(concurrency=...) may change it
        self._jobs = _Runners(self._run)
        #: Live connections and the handles of the jobs running on each (a draining worker
        #: closes a connection once its jobs are done: closing earlier would requeue them).
        self._conns: dict[Connection, dict[bytes, int]] = {}
        self._sleeping: set[Connection] = set()
        self._inboxes: set[_Mailbox] = set()
        self.jobs_done = 0

    def __repr__(self) -> str:
        servers = [format_address(a) for a in self.addresses]
        return f"<Worker {servers} tasks={self.registry.names()}>"

    # -- tasks ----------------------------------------------------------------------

    def task(self, name: str | TaskFunction | None = None, timeout: float | None = None) -> Any:
        """Decorator registering a task: ``@worker.task("name", timeout=None)``.

        ``timeout`` (seconds) is sent as CAN_DO_TIMEOUT: past it the server gives the job
        to another worker, and this worker abandons it.
        """
        if callable(name):
            self.register(name.__name__, name)
            return name

        def decorate(fn: TaskFunction) -> TaskFunction:
            self.register(name or fn.__name__, fn, timeout)
            return fn

        return decorate

    def register(self, name: str, fn: TaskFunction, timeout: float | None = None) -> Task:
        """Register ``fn(job)`` as the task for function ``name`` (also while working)."""
        entry = self.registry.register(name, fn, timeout)
        for conn in list(self._conns):
            self._announce(conn, entry)
            if conn in self._sleeping:
                # Jobs of this function may be queued already, and a server wakes
                # sleepers only for new jobs; PRE_SLEEP again gets an immediate NOOP
                # if one is runnable (docs/protocol.md §3.6 rule 1).
                conn.send(T.PRE_SLEEP)
        return entry

    @staticmethod
    def _announce(conn: Connection, entry: Task) -> None:
        name = entry.name.encode()
        if entry.timeout:
            conn.send(T.CAN_DO_TIMEOUT, name, str(max(1, round(entry.timeout * 1000))).encode())
        else:
            conn.send(T.CAN_DO, name)

    # -- running --------------------------------------------------------------------

    @property
    def active_jobs(self) -> int:
        """How many jobs are running now."""
        return len(self._jobs)

    def work(self, concurrency: int | None = None) -> None:
        """Serve jobs until ``stop()``; then drain (or not) and return.

        Connects to every server and keeps working while some are down.
        """
        if self._working:
            raise RuntimeError("this worker is already working")
        if not len(self.registry):
            raise ValueError("no tasks registered: use @worker.task or worker.register()")
        self._working = True
        self._done.clear()
        self._concurrency = concurrency or self.concurrency
        self._slots = _Slots(self._concurrency)
        sessions = Group()
        try:
            for address in self.addresses:
                sessions.spawn(self._serve, address)
            self._stop_event.wait()
        except gevent.GreenletExit:
            self._graceful = False
            raise
        finally:
            if self._graceful:
                # Stop grabbing, but take the answers to GRABs already sent: a job
                # assigned to us runs (and is drained) instead of waiting for a requeue.
                # Each session leaves its server once nothing runs on its connection.
                for inbox in list(self._inboxes):
                    inbox.put(_STOP)
            try:
                self._drain()
                if self._graceful:
                    sessions.join(timeout=_GRAB_ANSWER_TIMEOUT)
            finally:
                sessions.kill()
                for conn in list(self._conns):
                    conn.close(flush=True)
                self._conns.clear()
                self._stop_event.clear()
                self._graceful = True
                self._working = False
                self._done.set()

    def _drain(self) -> None:
        if self._graceful and len(self._jobs):
            log.info("draining: waiting for %d running jobs", len(self._jobs))
            if not self._jobs.join(timeout=self._drain_timeout):
                log.warning("drain timeout: abandoning %d jobs (the servers requeue them)",
                            len(self._jobs))
        self._jobs.kill()

    def stop(self, graceful: bool = True, wait: bool = True, timeout: float | None = None) -> None:
        """Stop working. ``graceful``: stop grabbing, let running jobs finish (for at most
        ``timeout`` seconds), then return; otherwise abandon them at once (the servers
        requeue them). ``wait``: block until ``work()`` has returned (never from inside a
        task, which would wait for itself).
        """
        if not graceful:
            self._graceful = False
        self._drain_timeout = timeout
        self._stop_event.set()
        if wait and self._working and gevent.getcurrent() not in self._jobs:
            self._done.wait()

    def _serve(self, address: Address) -> None:
        """One server: connect, register, grab; reconnect with back-off when lost."""
        name = format_address(address)
        backoff = _BACKOFF_START
        down_since: float | None = None
        while not self._stop_event.is_set():
            inbox = _Mailbox()
            conn = Connection(address, self._packet_handler(inbox),
                              lambda reason, inbox=inbox: inbox.put(_Closed(reason)),
                              tls=self.tls)
            try:
                conn.connect(timeout=self.connect_timeout)
            except OSError as exc:
                delay = backoff * (0.5 + 0.5 * random.random())  # jitter: no stampede
                # One warning per outage, not one per attempt (about one a second).
                level = logging.WARNING if down_since is None else logging.DEBUG
                if down_since is None:
                    down_since = time.monotonic()
                log.log(level, "cannot connect to %s: %s (retry in %.2fs)", name, exc, delay,
                        extra={"event": "worker.connect_failed", "server": name})
                if self._stop_event.wait(delay):
                    return
                backoff = min(backoff * 2, _BACKOFF_MAX)
                continue
            connected_at = time.monotonic()
            if down_since is None:
                log.info("connected to %s", name,
                         extra={"event": "worker.connected", "server": name})
            else:
                log.info("connected to %s again after %.1fs", name, connected_at - down_since,
                         extra={"event": "worker.connected", "server": name})
                down_since = None
            self._conns[conn] = {}
            self._inboxes.add(inbox)
            try:
                self._session(conn, inbox)
                return  # stopped
            except ConnectionError as exc:
                if self._stop_event.is_set():
                    return  # a draining worker closed it
                # A server may close a connection idle between packets (--idle-timeout);
                # with no job running on it nothing is lost, and it is reopened at once.
                idle = not self._conns.get(conn)
                log.log(logging.INFO if idle else logging.WARNING,
                        "lost connection to %s%s: %s", name, " (idle)" if idle else "", exc,
                        extra={"event": "worker.connection_lost", "server": name})
            finally:
                self._inboxes.discard(inbox)
                if conn.closed:
                    self._conns.pop(conn, None)
            # A connection that dies at once again and again must not spin.
            if time.monotonic() - connected_at < 1.0:
                if self._stop_event.wait(backoff * (0.5 + 0.5 * random.random())):
                    return
                backoff = min(backoff * 2, _BACKOFF_MAX)
            else:
                backoff = _BACKOFF_START

    def _packet_handler(self, inbox: _Mailbox):
        def on_packet(packet: Packet) -> None:
            ptype = packet.type
            if ptype == T.ERROR:
                code, text = packet.args
                # JOB_NOT_FOUND: the server took the job back (timeout, cancel) before our
                # result arrived; nothing to do (docs/protocol.md §8).
                level = logging.DEBUG if code == b"JOB_NOT_FOUND" else logging.WARNING
                log.log(level, "server error %s: %s", code.decode("latin-1"),
                        text.decode("utf-8", "replace"))
            elif ptype in _ASSIGN_TYPES or ptype in (T.NOOP, T.NO_JOB):
                inbox.put(packet)
            elif ptype not in (T.ECHO_RES, T.OPTION_RES):
                log.warning("ignoring unexpected %s", packet.name)

        return on_packet

    @staticmethod
    def _next(inbox: _Mailbox) -> Any:
        """The next packet, or ``_STOP``; ``ConnectionError`` once the connection is gone."""
        item = inbox.get()
        if isinstance(item, _Closed):
            inbox.put(item)
            raise ConnectionError(str(item.reason or "connection closed"))
        return item

    def _session(self, conn: Connection, inbox: _Mailbox) -> None:
        if self.client_id:
            conn.send(T.SET_CLIENT_ID, self.client_id.encode())
        for entry in self.registry:
            self._announce(conn, entry)
        slots = self._slots
        # GRABs in flight, oldest first; True where the GRAB holds a slot. With free slots
        # the worker sends one GRAB per slot at once instead of one round trip per job:
        # the answers come in order (JOB_ASSIGN* or NO_JOB), one per GRAB, and a worker
        # may hold several jobs (docs/protocol.md §3.7).
        grabs: deque[bool] = deque()
        exhausted = False  # a NO_JOB came: grab no more until we have slept
        # GRABs kept in flight at most (and no more than free slots). After a NOOP, as
        # many as the last waking brought jobs (at least one), doubled by every job a GRAB
        # brings. A GRAB per free slot after each NOOP would cost the server and us a
        # NO_JOB for each of them: O(concurrency) packets per job when jobs come one at a
        # time (a web app's usual case), 100 per job at concurrency 100.
        concurrency = self._concurrency
        window = concurrency
        got = 0  # jobs received since the last NOOP
        stopping = self._stop_event.is_set()
        try:
            while True:
                if stopping:
                    if not grabs and not self._conns.get(conn):
                        conn.close(flush=True)  # nothing runs here: leave the server now
                        return
                elif not exhausted:
                    while len(grabs) < window and slots.take():
                        # Counted before it is sent: a send to a connection that just
                        # died raises, and ``finally`` gives back only what ``grabs``
                        # holds (a slot lost there stalled a one-slot worker for good).
                        grabs.append(True)
                        conn.send_raw(_GRAB_JOB_UNIQ)
                if not grabs and not stopping:
                    if exhausted:
                        conn.send(T.PRE_SLEEP)
                        self._sleeping.add(conn)
                        try:
                            packet = self._next(inbox)
                            while packet is not _STOP and packet.type != T.NOOP:
                                packet = self._next(inbox)
                        finally:
                            self._sleeping.discard(conn)
                        if packet is _STOP:
                            stopping = True
                            # The server still counts this connection as asleep: a NOOP
                            # may come, and is answered below.
                        else:
                            # always grab after a NOOP (docs/protocol.md §3.6 rule 4)
                            exhausted = False
                            window, got = max(1, min(got, concurrency)), 0
                        continue
                    # Every slot is busy: wait for a job to finish (or for stop()).
                    while not slots.take():
                        if not slots.wait(0.5) and self._stop_event.is_set():
                            return
                    grabs.append(True)  # before the send, as above
                    conn.send_raw(_GRAB_JOB_UNIQ)
                packet = self._next(inbox)
                if packet is _STOP:
                    stopping = True
                    continue
                if packet.type == T.NOOP:
                    if stopping and not grabs:
                        # Even a draining worker grabs after a NOOP (docs/protocol.md §3.6
                        # rule 4): the server chose it to run a job, and a server that wakes
                        # one sleeper per job would let that job wait until we disconnect.
                        # It never sleeps again, so this happens at most once.
                        grabs.append(slots.take())  # before the send, as above
                        conn.send_raw(_GRAB_JOB_UNIQ)
                    continue  # otherwise a late wake-up: our GRABs are answered anyway
                holds_slot = grabs.popleft()
                if packet.type == T.NO_JOB:
                    if holds_slot:
                        slots.release()
                    exhausted = True
                else:
                    got += 1
                    window = min(window * 2, concurrency)  # jobs are there: grab more
                    self._jobs.spawn(conn, packet, holds_slot)
        finally:
            for holds_slot in grabs:  # GRABs that will never be answered here
                if holds_slot:
                    slots.release()

    def _run(self, conn: Connection, packet: Packet, holds_slot: bool = True) -> None:
        args = packet.args
        handle, function = args[0], args[1]
        unique = args[2] if packet.type != T.JOB_ASSIGN else b""
        job = WorkerJob(conn, handle, function, unique, args[-1])
        entry = self.registry.get(job.function)
        running = self._conns.get(conn)
        if running is not None:
            running[handle] = running.get(handle, 0) + 1
        try:
            if entry is None:
                raise JobFailed(f"no task registered for {job.function!r}")
            if entry.timeout:
                # The server's CAN_DO_TIMEOUT fires first and requeues the job; the local
                # limit, a little later, frees this slot (and covers servers that do not
                # requeue, such as gearmand 1.1.20 once the connection sent PRE_SLEEP, Q6).
                with gevent.Timeout(entry.timeout * 1.1 + 1.0):
                    result = entry.fn(job)
            else:
                result = entry.fn(job)
            job._send(T.WORK_COMPLETE, _as_bytes(result))
        except gevent.Timeout:
            log.warning("task %s timed out after %ss on job %s", job.function,
                        entry.timeout if entry else "?", job.handle,
                        extra=_job_fields(job, "task.timeout"))
            if running is not None and running.get(handle, 0) > 1:
                pass  # requeued and grabbed again by this connection: leave that attempt be
            else:
                # If the server requeued the job, it answers ERROR JOB_NOT_FOUND (ignored);
                # if it did not, this ends the job instead of leaving it held forever.
                job._send(T.WORK_FAIL)
        except JobFailed as exc:
            log.info("task %s failed job %s: %s", job.function, job.handle, exc,
                     extra=_job_fields(job, "task.failed"))
            job._send(T.WORK_FAIL)
        except Exception as exc:
            # A TaskError carries the task's traceback as its message and its exception as
            # its cause: logging it would print that traceback twice (chained, then in the
            # message). Its cause alone is the task's traceback, once.
            cause = exc.__cause__ if getattr(exc, "job_text", None) else None
            log.warning("task %s raised on job %s", job.function, job.handle,
                        exc_info=(type(cause), cause, cause.__traceback__) if cause is not None
                        else True, extra=_job_fields(job, "task.raised"))
            # A task may carry its own text (the web layer sends its traceback).
            text = (getattr(exc, "job_text", None) or f"{type(exc).__name__}: {exc}").encode(
                "utf-8", "replace")
            job._send(T.WORK_EXCEPTION, text)
        finally:
            self.jobs_done += 1
            if holds_slot:
                self._slots.release()
            if running is not None:
                if running[handle] == 1:
                    del running[handle]
                else:
                    running[handle] -= 1
                if not running and self._stop_event.is_set() and self._graceful:
                    # Draining, and this connection's last job is done.
                    conn.close(flush=True)
