"""``Client``: submit jobs to one or more Gearman servers from any number of greenlets.

One multiplexed connection per server is shared by every greenlet. Replies to
submissions are matched by order (docs/protocol.md §3.3, §8); ``WORK_*`` packets are routed by
(server, handle) to every waiter. Jobs with a unique go to the server picked by a
consistent hash of (function, unique), so coalescing holds across a fleet; jobs without
one are spread round-robin. A dead server is skipped by every client of the process for
``DOWN_INTERVAL`` and then tried again; with none left a submission fails at once
(``NoServersAvailable``). A foreground job lost with its server is resubmitted once, with
the same unique.

Example::

    from gearoffload import Client

    client = Client(["127.0.0.1:4730", "127.0.0.1:4731"], timeout=30)
    job = client.submit("upper", b"hello")
    print(job.result())                                     # b'HELLO'
    jobs = client.submit_many([("upper", b"a"), ("upper", b"b")])
    print([j.result() for j in jobs])                       # [b'A', b'B']
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import logging
import math
import random
import time
import uuid
from collections import deque
from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import Any, NamedTuple

import gevent
from gevent import monkey
from gevent.event import AsyncResult, Event
from gevent.hub import Waiter
from gevent.queue import Empty, Queue

from . import census
from .connection import Address, Connection, format_address, parse_address, parse_servers
from .errors import (
    GearmanError,
    JobException,
    JobFailed,
    JobLost,
    JobTimeout,
    NoServersAvailable,
    NoWorkers,
    ProtocolError,
    ServerError,
)
from .protocol import PT as T
from .protocol import Packet, PacketType, encode_request, to_bytes
from .tls import TlsOption, client_context

__all__ = ["Client", "Job", "JobStatus", "JobUpdate", "Data"]

log = logging.getLogger("gearoffload.client")

Data = bytes | bytearray | memoryview | str

#: (foreground, background) submission packet per priority name.
_SUBMIT_TYPES = {
    "normal": (T.SUBMIT_JOB, T.SUBMIT_JOB_BG),
    "high": (T.SUBMIT_JOB_HIGH, T.SUBMIT_JOB_HIGH_BG),
    "low": (T.SUBMIT_JOB_LOW, T.SUBMIT_JOB_LOW_BG),
}
_REPLY_TYPES = frozenset(
    (T.JOB_CREATED, T.ERROR, T.OPTION_RES, T.STATUS_RES, T.STATUS_RES_UNIQUE, T.ECHO_RES)
)
_WORK_TYPES = frozenset(
    (T.WORK_STATUS, T.WORK_COMPLETE, T.WORK_FAIL, T.WORK_EXCEPTION, T.WORK_DATA, T.WORK_WARNING)
)
_FINAL_TYPES = frozenset((T.WORK_COMPLETE, T.WORK_FAIL, T.WORK_EXCEPTION))
#: Virtual points per server on the hash ring: enough for an even spread over a few servers.
_RING_POINTS = 160
#: Reconnect back-off: 0.25 s doubling to 1 s, each wait jittered down by up to half.
#: Capped this low so that a restarted server is found again within about a second
#: (with 30 s, a web tier answered 503 for seconds after its server was back); one connect
#: attempt per link per wait, shared by every greenlet, is all a down server sees.
_BACKOFF_START = 0.25
_BACKOFF_MAX = 1.0
#: A connection that answered and lived this long is reconnected at once when it closes
#: (the server closed it while idle, or restarted); one that dies sooner backs off, so
#: that a server that drops us again and again is not hammered.
_HEALTHY_AFTER = 1.0
#: A server that a ``Client`` of this process could not reach (connection refused, host
#: unreachable, unknown host, no answer within ``connect_timeout``) is skipped by every
#: Client of the process for this long, jittered down by up to half, so that a request
#: learns at once that it is down instead of each one waiting through connect attempts
#: (1.3-1.9 s per 503 before). Then one submission tries it again (the others still skip
#: it while that attempt runs); a successful connect forgets it.
DOWN_INTERVAL = 1.0
#: The servers found down: address -> (monotonic time of the next try, why). Shared by the
#: clients of every thread (``gearoffload.offloading`` makes one per thread).
_down: dict[Address, tuple[float, str]] = {}
# A real lock in a monkey-patched process too: the threads of a threaded web server share
# ``_down``. Held only for a check-and-set, on the path of a server that is down.
_down_lock = monkey.get_original("_thread", "allocate_lock")()
#: How many times a submission is sent again after its connection closed before the
#: server accepted it (a server closing an idle connection as we send is one).
_MAX_DROPS = 3
_END = object()  # end of a job's update stream
#: Results are as large as the worker makes them (docs/protocol.md §8: accept any payload size); the
#: 32-bit size field is the only bound.
MAX_RESULT_SIZE = 1 << 32


def _number(text: bytes) -> int:
    return int(text) if text.isdigit() else 0


def _hash(key: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big")


def _skip_down(address: Address, now: float, hold: float) -> tuple[float, str] | None:
    """Whether a connect to ``address`` should be skipped: its ``_down`` entry while that
    is current; None when it may be tried. The first caller after the entry's time is up
    holds the retry for ``hold`` seconds (its connect timeout), so that every other
    caller still skips the server meanwhile instead of trying it too."""
    entry = _down.get(address)
    if entry is None:
        return None
    with _down_lock:
        entry = _down.get(address)
        if entry is None:
            return None
        if now < entry[0]:
            return entry
        _down[address] = (now + hold, entry[1])
    return None


def forget_down() -> None:
    """Forget every server found down (tests; a process that knows they are back)."""
    with _down_lock:
        _down.clear()


class _Expired(BaseException):
    """Thrown into a greenlet whose wait outlived its deadline (see ``_Deadlines``)."""


class _Deadline:
    __slots__ = ("greenlet", "done")

    def __init__(self, greenlet: Any) -> None:
        self.greenlet = greenlet
        self.done = False


class _Deadlines:
    """Timeouts for many concurrent waits on one periodic timer.

    A ``gevent.Timeout`` costs about 10 µs to arm and cancel, i.e. half of what a job
    costs the client (compiled); a set entry in a bucket per tick costs about 1 µs. The price is
    resolution: a wait may overrun its deadline by up to two ticks.
    """

    TICK = 0.05

    def __init__(self) -> None:
        self._buckets: dict[int, set[_Deadline]] = {}
        self._ticker: gevent.Greenlet | None = None

    def run(self, timeout: float | None, wait: Any) -> Any:
        """``wait()`` (a blocking gevent wait); ``_Expired`` after ``timeout`` seconds."""
        if timeout is None:
            return wait()
        key = math.ceil((time.monotonic() + timeout) / self.TICK)
        entry = _Deadline(gevent.getcurrent())
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = set()
        bucket.add(entry)
        if self._ticker is None:
            self._ticker = gevent.spawn(self._tick)
        try:
            return wait()
        finally:
            entry.done = True
            bucket.discard(entry)
            if not bucket and self._buckets.get(key) is bucket:
                del self._buckets[key]

    def _tick(self) -> None:
        loop = gevent.get_hub().loop
        try:
            while self._buckets:
                gevent.sleep(self.TICK)
                now = math.floor(time.monotonic() / self.TICK)
                for key in [key for key in self._buckets if key <= now]:
                    for entry in self._buckets.pop(key):
                        # From the hub, like gevent.Timeout: the waiter may be resumed
                        # by its result first, and then it is left alone.
                        loop.run_callback(self._expire, entry)
        finally:
            self._ticker = None

    @staticmethod
    def _expire(entry: _Deadline) -> None:
        if not entry.done:
            entry.done = True
            entry.greenlet.throw(_Expired())


class JobStatus(NamedTuple):
    """A job's status as the server reports it (GET_STATUS / GET_STATUS_UNIQUE).

    ``waiting`` (the number of attached foreground clients) is only filled in by
    ``Client.status_unique``.
    """

    known: bool
    running: bool
    numerator: int
    denominator: int
    handle: str | None = None
    unique: str | None = None
    server: str | None = None
    waiting: int | None = None


class JobUpdate(NamedTuple):
    """One event from a running job: ``kind`` is ``"data"``, ``"warning"`` or ``"status"``.

    ``data`` holds the WORK_DATA / WORK_WARNING bytes; ``numerator``/``denominator`` the
    WORK_STATUS numbers (``None`` for the other kinds).
    """

    kind: str
    data: bytes = b""
    numerator: int | None = None
    denominator: int | None = None


class _Reply:
    """A pending non-submission request (OPTION_REQ, GET_STATUS, ECHO_REQ...)."""

    __slots__ = ("expect", "result")

    def __init__(self, expect: int) -> None:
        self.expect = expect
        self.result = AsyncResult()

    def on_reply(self, link: _Link, packet: Packet) -> None:
        self.result.set(packet.args)

    def on_error(self, link: _Link, exc: GearmanError) -> None:
        self.result.set_exception(exc)

    def on_lost(self, link: _Link, reason: BaseException | None) -> None:
        self.result.set_exception(
            NoServersAvailable(f"connection to {link.name} lost: {reason}"))


class _Attachment:
    """The waiters for one (server, handle), and how many copies of each WORK_* to expect.

    A connection that submitted the same unique twice is attached twice and receives every
    WORK_* packet twice in a row (docs/protocol.md §3.3); ``skip`` drops the extra copies.
    """

    __slots__ = ("subs", "copies", "skip")

    def __init__(self, sub: _Submission | None) -> None:
        self.subs: list[_Submission] = [sub] if sub is not None else []
        self.copies = 1
        self.skip = 0


class _Submission:
    """One job as the client tracks it across (re)submissions; shared by coalesced Jobs."""

    expect = T.JOB_CREATED

    __slots__ = ("client", "function", "unique", "data", "ptype", "epoch", "background",
                 "key", "link", "handle", "replied", "_created", "finished", "value", "error",
                 "_waiters", "jobs", "losses", "drops")

    def __init__(self, client: Client, function: bytes, unique: bytes, data: bytes,
                 ptype: int, background: bool, epoch: int | None, key: tuple | None) -> None:
        self.client = client
        self.function = function
        self.unique = unique
        self.data = data
        self.ptype = ptype
        self.background = background
        self.epoch = epoch
        self.key = key
        self.link: _Link | None = None
        self.handle: bytes | None = None
        self.replied = False  # JOB_CREATED came, or the submission ended before it
        self._created: Event | None = None  # made only for a submitter that waits for it
        # The outcome, set once by finish(): the result bytes or the error to raise.
        self.finished = False
        self.value: bytes | None = None
        self.error: BaseException | None = None
        self._waiters: list[Waiter] | None = None  # greenlets in wait_finished()
        self.jobs: list[Job] = []
        self.losses = 0  # lost with its server after it was accepted
        self.drops = 0  # connections that closed while it waited for JOB_CREATED

    def packet(self) -> bytes:
        if self.epoch is not None:
            return encode_request(T.SUBMIT_JOB_EPOCH, self.function, self.unique,
                                  str(self.epoch).encode(), self.data)
        return encode_request(self.ptype, self.function, self.unique, self.data)

    # Called by the connection's reader, in stream order.

    def on_reply(self, link: _Link, packet: Packet) -> None:
        if self.finished:
            # The submitter gave up (timeout). The server attached this submission all
            # the same, so its copies of WORK_* packets must still be counted.
            if not self.background:
                link.attach(packet.args[0], None)
            return
        self.handle = packet.args[0]
        self.link = link
        if self.background:
            self.finish(None)
        else:
            link.attach(self.handle, self)
        self._replied()

    def _replied(self) -> None:
        self.replied = True
        if self._created is not None:
            self._created.set()  # wake submitters waiting for JOB_CREATED

    def wait_finished(self) -> bytes | None:
        """Block until finish(); the result, or raise the job's error.

        One gevent ``Waiter`` per waiting greenlet instead of an ``AsyncResult`` per job:
        a wait and its wake-up cost about 3.3 µs instead of 6.8 (measured with 100
        greenlets), and most jobs have one waiter or none.
        """
        if not self.finished:
            waiter = Waiter()
            if self._waiters is None:
                self._waiters = [waiter]
            else:
                self._waiters.append(waiter)
            try:
                waiter.get()
            finally:
                if not self.finished:  # left early (_Expired, a kill): unregister
                    self._waiters.remove(waiter)
        if self.error is not None:
            raise self.error
        return self.value

    def wait_replied(self) -> None:
        """Block until JOB_CREATED came or the submission ended (``replied``)."""
        if not self.replied:
            if self._created is None:
                self._created = Event()
            self._created.wait()

    def on_error(self, link: _Link, exc: GearmanError) -> None:
        self.finish(exc=exc)

    def deliver(self, ptype: int, args: tuple[bytes, ...]) -> None:
        if ptype == T.WORK_COMPLETE:
            self.finish(args[1])
        elif ptype == T.WORK_FAIL:
            self.finish(exc=JobFailed("the worker failed the job", self.handle_text))
        elif ptype == T.WORK_EXCEPTION:
            self.finish(exc=JobException(args[1].decode("utf-8", "replace"), self.handle_text))
        elif ptype == T.WORK_STATUS:
            self.update(JobUpdate("status", b"", _number(args[1]), _number(args[2])))
        elif ptype == T.WORK_DATA:
            self.update(JobUpdate("data", args[1]))
        elif ptype == T.WORK_WARNING:
            self.update(JobUpdate("warning", args[1]))

    @property
    def handle_text(self) -> str | None:
        return self.handle.decode("latin-1") if self.handle is not None else None

    def update(self, update: JobUpdate) -> None:
        for job in self.jobs:
            job._push(update)

    def finish(self, value: bytes | None = None, exc: BaseException | None = None) -> None:
        if self.finished:
            return
        self.finished = True
        self.value = value
        self.error = exc
        waiters = self._waiters
        if waiters:  # [] once every waiter has left early (timed out): nobody to wake
            self._waiters = None
            # Waiter.switch runs in the hub; this runs in the connection's reader.
            run_callback = waiters[0].hub.loop.run_callback
            for waiter in waiters:
                run_callback(waiter.switch, None)
        if not self.replied:
            self._replied()
        for job in self.jobs:
            job._push(_END)
        # Job._sub points back here: without this, every job would be a reference cycle
        # that only the cyclic GC frees (gen-0 collections took about 7% of the client's
        # CPU). No update comes after the end.
        self.jobs.clear()
        if self.key is not None and self.client._inflight.get(self.key) is self:
            del self.client._inflight[self.key]


class _Link:
    """The client's side of one server: its connection, pending replies and attached jobs."""

    def __init__(self, client: Client, address: Address) -> None:
        self.client = client
        self.address = address
        self.name = format_address(address)
        self.conn: Connection | None = None
        self.pending: deque[_Submission | _Reply] = deque()
        self.jobs: dict[bytes, _Attachment] = {}
        self.retry_at = 0.0
        self.backoff = _BACKOFF_START
        self._connecting: AsyncResult | None = None
        self.connected_at = 0.0
        self.down_since: float | None = None  # the first failed attempt of an outage
        self._background: gevent.Greenlet | None = None  # connect_soon()'s attempt
        self.attempts = 0  # connect attempts made, failed or not (tests, diagnostics)
        self.last_error = ""  # why the last connect failed (NoServersAvailable says it)

    def __repr__(self) -> str:
        return f"<_Link {self.name} {'up' if self.conn else 'down'}>"

    def available(self, now: float) -> bool:
        return self.conn is not None or now >= self.retry_at

    def ensure_connected(self) -> Connection:
        """The live connection, connecting first if needed (raises ``OSError``)."""
        conn = self.conn
        if conn is not None:
            return conn
        if self._connecting is not None:  # another greenlet is connecting: share its result
            return self._connecting.get()
        if _down:
            now = time.monotonic()
            down = _skip_down(self.address, now, self.client.connect_timeout)
            if down is not None:  # found down by this or another client of the process
                # Not the whole entry: it may be another client's retry hold (up to its
                # connect timeout) that ends early when that client connects.
                self.retry_at = min(down[0], now + DOWN_INTERVAL * 0.5)
                if self.down_since is None:
                    self.down_since = now
                self.last_error = f"{down[1]}; tried again in {down[0] - now:.2f}s"
                raise ConnectionRefusedError(f"{self.name} is down ({self.last_error})")
        connecting = self._connecting = AsyncResult()
        conn = Connection(self.address, self._on_packet, max_packet_size=MAX_RESULT_SIZE,
                          tls=self.client.tls)
        conn._on_close = lambda reason: self._on_close(conn, reason)
        self.attempts += 1
        try:
            conn.connect(timeout=self.client.connect_timeout)
        except OSError as exc:
            self._connecting = None
            now = time.monotonic()
            self.last_error = str(exc) or type(exc).__name__
            if conn.reached:  # up, but the TLS handshake failed: this client backs off
                self.mark_down()
            else:  # not reached: every client of the process skips it for a while
                self.retry_at = now + DOWN_INTERVAL * (0.5 + 0.5 * random.random())
                with _down_lock:
                    _down[self.address] = (self.retry_at, self.last_error)
            # One warning per outage, not one per attempt (about one a second).
            first = self.down_since is None
            if first:
                self.down_since = now
            log.log(logging.WARNING if first else logging.DEBUG,
                    "cannot connect to %s: %s (retry in %.2fs)", self.name, exc,
                    self.retry_at - now)
            connecting.set_exception(exc)
            raise
        if _down:
            with _down_lock:
                _down.pop(self.address, None)
        self._connecting = None
        self.conn = conn
        self.connected_at = time.monotonic()
        self.last_error = ""
        if self.down_since is not None:
            log.info("connected to %s again after %.1fs", self.name,
                     self.connected_at - self.down_since)
            self.down_since = None
        # The back-off starts over once the server has answered (_on_packet), not here: a
        # port that accepts and then drops us (a TLS-only server, another service) must
        # look like a server that is down, with growing back-off, or a submission would
        # be resent to it forever.
        if self.client.client_id:
            conn.send(T.SET_CLIENT_ID, self.client.client_id)
        if self.client.exceptions:
            self.pending.append(_Reply(T.OPTION_RES))
            conn.send(T.OPTION_REQ, b"exceptions")
        connecting.set(conn)
        return conn

    def connect_soon(self) -> None:
        """Connect in a greenlet of its own (once at a time); failures only back off."""
        if self._background is None and self._connecting is None:
            self._background = gevent.spawn(self._connect_in_background)

    def _connect_in_background(self) -> None:
        try:
            if not self.client._closed:
                self.ensure_connected()
                if self.client._closed:  # closed while we were connecting
                    self.close()
        except OSError:
            pass  # logged and backed off by ensure_connected()
        finally:
            self._background = None

    def mark_down(self) -> None:
        # Jitter: the web processes of a fleet do not all reconnect in the same instant.
        self.retry_at = time.monotonic() + self.backoff * (0.5 + 0.5 * random.random())
        self.backoff = min(self.backoff * 2, _BACKOFF_MAX)

    def enqueue(self, entry: _Submission | _Reply, data: bytes) -> None:
        conn = self.ensure_connected()
        conn.send_raw(data)  # raises ConnectionError if it just died: nothing was queued
        self.pending.append(entry)

    def attach(self, handle: bytes, sub: _Submission | None) -> None:
        attachment = self.jobs.get(handle)
        if attachment is None:
            self.jobs[handle] = _Attachment(sub)
            return
        attachment.copies += 1
        if sub is not None and sub not in attachment.subs:
            attachment.subs.append(sub)

    def _on_packet(self, packet: Packet) -> None:
        if self.backoff != _BACKOFF_START:
            self.backoff = _BACKOFF_START  # the server answers: it is up
        ptype = packet.type
        if ptype in _WORK_TYPES:
            handle = packet.args[0]
            if ptype == T.WORK_FAIL and handle.endswith(b"\0"):
                # gearmand's converted WORK_EXCEPTION (docs/protocol.md §3.10, Q1)
                handle = handle[:-1]
            attachment = self.jobs.get(handle)
            if attachment is None:
                return  # a job nobody waits for any more
            if attachment.skip:
                attachment.skip -= 1
                return
            attachment.skip = attachment.copies - 1
            if ptype in _FINAL_TYPES:
                del self.jobs[handle]
            for sub in attachment.subs:
                try:
                    sub.deliver(ptype, packet.args)
                except Exception:
                    # The stream is still in step: one job's bad bookkeeping must not
                    # drop the connection with every other caller's job on it.
                    log.exception("delivering %s for job %r from %s failed", packet.name,
                                  handle, self.name)
        elif ptype in _REPLY_TYPES:
            if not self.pending:
                if ptype == T.ERROR:
                    log.warning("unsolicited ERROR from %s: %r", self.name, packet.args)
                    return
                raise ProtocolError(f"{packet.name} from {self.name} answers no request")
            entry = self.pending.popleft()
            if ptype == T.ERROR:
                code, text = packet.args
                entry.on_error(self, ServerError(code.decode("latin-1"),
                                                 text.decode("utf-8", "replace")))
            elif ptype != entry.expect:
                raise ProtocolError(f"{packet.name} from {self.name}, expected "
                                    f"{PacketType(entry.expect).name}")
            else:
                entry.on_reply(self, packet)
        elif ptype != T.NOOP:
            log.warning("ignoring unexpected %s from %s", packet.name, self.name)

    def _on_close(self, conn: Connection, reason: BaseException | None) -> None:
        if conn is not self.conn:
            return
        self.conn = None
        pending = list(self.pending)
        self.pending.clear()
        attachments = list(self.jobs.values())
        self.jobs.clear()
        if (self.backoff == _BACKOFF_START
                and time.monotonic() - self.connected_at >= _HEALTHY_AFTER):
            # It answered and lived: reconnect at the next need, without waiting. If the
            # server is really gone, that attempt fails and the back-off starts.
            self.retry_at = 0.0
        else:
            self.mark_down()
            self.last_error = f"lost the connection: {reason}"
        if not self.client._closed:
            # A server may close a connection idle between packets (--idle-timeout):
            # nothing was lost then, and the next submission reconnects.
            idle = not pending and not attachments
            log.log(logging.INFO if idle else logging.WARNING, "lost connection to %s%s: %s",
                    self.name, " (idle)" if idle else "", reason)
        self.client._connection_lost(self, pending, attachments, reason)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close(ConnectionError("client closed"))


class Job:
    """A submitted job. Obtained from ``Client.submit``; safe to share between greenlets.

    Example::

        job = client.submit("resize", image_bytes)
        for update in job.updates():            # progress while it runs
            print(update.kind, update.numerator, update.denominator)
        thumbnail = job.result(timeout=10)      # bytes, or raises JobFailed/JobException
    """

    __slots__ = ("_client", "_sub", "_updates", "_ended")

    def __init__(self, client: Client, sub: _Submission) -> None:
        self._client = client
        self._sub = sub
        # Created on the first update or updates() call: most jobs have neither, and a
        # queue per job is a measurable share of a submission's cost.
        self._updates: Queue | None = None
        self._ended = False

    def _push(self, item: object) -> None:
        if self._updates is None:
            if item is _END:
                self._ended = True
                return
            self._updates = Queue()
        self._updates.put(item)

    def __repr__(self) -> str:
        state = "done" if self.done else "pending"
        return f"<Job {self.function}/{self.handle} on {self.server} {state}>"

    @property
    def handle(self) -> str | None:
        """The server's job handle (changes if the job is resubmitted after a failover)."""
        return self._sub.handle_text

    @property
    def server(self) -> str | None:
        """``host:port`` of the server that holds the job."""
        return self._sub.link.name if self._sub.link else None

    @property
    def function(self) -> str:
        return self._sub.function.decode("utf-8", "replace")

    @property
    def unique(self) -> str:
        return self._sub.unique.decode("utf-8", "replace")

    @property
    def background(self) -> bool:
        return self._sub.background

    @property
    def done(self) -> bool:
        """True once the result (or failure) is known; at once for background jobs."""
        return self._sub.finished

    def result(self, timeout: float | None = None) -> bytes | None:
        """Wait for the job and return the worker's result bytes (``None`` for background
        jobs, which have no result: poll ``status()``).

        Raises ``JobFailed``, ``JobException`` (the worker raised), ``JobTimeout`` (after
        ``timeout`` seconds, default: the client's timeout), or ``NoServersAvailable``
        (no server accepted the job; one lost after it was accepted is ``JobFailed``).
        """
        if timeout is None:
            timeout = self._client.timeout
        sub = self._sub
        if sub.finished:
            return sub.wait_finished()
        try:
            return self._client._deadlines.run(timeout, sub.wait_finished)
        except _Expired:
            raise JobTimeout(f"no result for {self.function} job {self.handle} within "
                             f"{timeout}s") from None

    def status(self, timeout: float | None = None) -> JobStatus:
        """Ask the job's server for its status (GET_STATUS): known, running, progress."""
        sub = self._sub
        link, handle = sub.link, sub.handle
        if link is None or handle is None:
            return JobStatus(False, False, 0, 0)
        return self._client._get_status(link, handle, timeout)

    def updates(self, timeout: float | None = None) -> Iterator[JobUpdate]:
        """Iterate WORK_DATA, WORK_WARNING and WORK_STATUS events as they arrive; stops
        when the job ends (then call ``result()``). Only one consumer per ``Job``.

        Raises ``JobTimeout`` if the job has not ended ``timeout`` seconds (default: the
        client's timeout) after the iteration started.
        """
        if timeout is None:
            timeout = self._client.timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        if self._updates is None:
            if self._ended or self._sub.background:
                return
            self._updates = Queue()
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                item = self._updates.get(timeout=remaining)
            except Empty:
                raise JobTimeout(f"{self.function} job {self.handle} still running after "
                                 f"{timeout}s") from None
            if item is _END:
                self._updates.put(_END)  # a second iteration ends at once too
                return
            yield item


class Client:
    """A Gearman client for any number of greenlets (greenlet-safe, not thread-safe).

    ``servers`` is ``"host:port"``, a comma-separated string, or a list of them.
    ``timeout`` bounds every wait (``Job.result()``, ``status()``; seconds, ``None`` =
    wait forever); ``connect_timeout`` bounds one connect attempt, and how long a job lost
    with its server waits for a server to be resubmitted to. A server that cannot be
    reached is skipped by every client of the process for ``DOWN_INTERVAL`` (0.5-1 s),
    and a submission with every server down raises ``NoServersAvailable`` at once. With
    ``exceptions=True`` the client asks servers for WORK_EXCEPTION, so a worker's
    exception text reaches ``JobException``; otherwise it arrives as ``JobFailed``.
    ``tls``: ``None`` (plain TCP), ``True`` (TLS, system CA certificates), an
    ``ssl.SSLContext``, or ``gearoffload.tls_context()``'s arguments as a dict, e.g.
    ``{"ca": "ca.pem", "cert": "me.pem", "key": "me.key"}``.

    Example::

        client = Client("127.0.0.1:4730")
        print(client.submit("upper", "hello").result())   # b'HELLO'
        client.close()
    """

    def __init__(
        self,
        servers: str | Iterable[str] = "127.0.0.1:4730",
        timeout: float | None = 60.0,
        exceptions: bool = True,
        connect_timeout: float = 10.0,
        client_id: str | None = None,
        tls: TlsOption = None,
    ) -> None:
        self.tls = client_context(tls)
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.exceptions = exceptions
        self.client_id = "".join((client_id or "").split()).encode() or None
        self._links = [_Link(self, address) for address in parse_servers(servers)]
        self._extra_links: dict[Address, _Link] = {}
        ring = []
        for index, link in enumerate(self._links):
            for point in range(_RING_POINTS):
                ring.append((_hash(f"{link.name}#{point}".encode()), index))
        ring.sort()
        self._ring_points = [point for point, _ in ring]
        self._ring_links = [index for _, index in ring]
        self._round_robin = itertools.count()
        #: In-flight foreground jobs by (function, unique): a second submission of the same
        #: unique from this client joins the first one instead of attaching twice
        #: (docs/protocol.md §3.3).
        self._inflight: dict[tuple, _Submission] = {}
        self._deadlines = _Deadlines()
        self._closed = False

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Client {[link.name for link in self._links]}>"

    @property
    def servers(self) -> list[str]:
        return [link.name for link in self._links]

    def close(self) -> None:
        """Close every connection; jobs still waiting fail with ``NoServersAvailable``."""
        self._closed = True
        for link in [*self._links, *self._extra_links.values()]:
            link.close()

    # -- submitting ---------------------------------------------------------------

    def submit(
        self,
        function: str,
        data: Data = b"",
        unique: str | bytes | None = None,
        priority: str = "normal",
        background: bool = False,
        run_at: float | datetime | None = None,
        wait: bool = True,
        require_worker: bool = False,
    ) -> Job:
        """Submit one job; returns once the server has accepted it (JOB_CREATED), or at
        once with ``wait=False`` (then a refusal surfaces from ``Job.result()``, and
        ``Job.handle`` is ``None`` until the server has accepted the job).

        ``unique`` makes concurrent submissions of the same (function, unique) share one
        execution (coalescing); ``"-"`` coalesces on identical data. ``priority`` is
        ``"normal"``, ``"high"`` or ``"low"``. ``background=True`` returns at once and
        the job has no result. ``run_at`` (a Unix time or ``datetime``) schedules a
        background job for later (SUBMIT_JOB_EPOCH; normal priority only).
        ``require_worker=True`` raises ``NoWorkers`` at once, submitting nothing, when
        ``workers_for(function)`` is 0 (and goes ahead when that is unknown).

        Raises ``ServerError`` (e.g. the queue is full), ``NoServersAvailable``,
        ``NoWorkers`` or ``JobTimeout``.

        Example::

            job = client.submit("thumbnail", image, unique="img-42", priority="high")
            client.submit("cleanup", b"", background=True, run_at=time.time() + 3600)
        """
        # The one-job case of submit_many(), without the batch bookkeeping (hot path).
        sub = self._prepare(function, data, unique, priority, background, run_at)
        if require_worker:
            self._require_worker(sub.function)
        sub, new = self._join_inflight(sub)
        job = Job(self, sub)
        sub.jobs.append(job)
        if new:
            try:
                self._route(sub, time.monotonic() + self.connect_timeout)
            except GearmanError as exc:
                sub.finish(exc=exc)
        if wait and not sub.replied:
            self._wait_created([sub])
        self._raise_if_refused(sub)
        return job

    def call(self, function: str, data: Data = b"", unique: str | bytes | None = None,
             priority: str = "normal", timeout: float | None = None,
             require_worker: bool = False) -> bytes:
        """Run a foreground job and return its result: ``submit(..., wait=False)
        .result(timeout)``, one wait instead of two (about a quarter less client CPU per
        job than ``submit(...).result()``). ``timeout`` covers the whole call (default:
        the client's timeout).

        Raises what ``submit`` and ``Job.result`` raise.

        Example::

            thumbnail = client.call("resize", image, unique="img-42", timeout=10)
        """
        return self.submit(function, data, unique, priority, wait=False,
                           require_worker=require_worker).result(timeout)

    def workers_for(self, function: str | bytes, wait: float = 0.25) -> int | None:
        """How many workers serve ``function`` on this client's servers: the worker
        registrations their admin ``status`` lists (ours and gearmand alike), summed;
        ``None`` when that is not known.

        0 means every server was asked and none has a worker for it. ``None``: no server
        could be asked (down, refusing admin commands), or one could not be while the
        others say 0. The answer comes from a cache shared by the process's clients,
        refreshed at most once a second per server and only on demand, in a thread (see
        ``gearoffload.census``): a cached answer costs about two microseconds. A 0 is at
        most a second old (a stale 0 is asked again and waited for, for at most ``wait``
        seconds: a worker that has just come is not turned away); a count of workers may
        be up to 5 s old. With no answer yet (the first call) this waits for the servers
        for at most ``wait`` seconds too, then answers ``None``.

        Example::

            if client.workers_for("resize") == 0:
                return "503 no worker serves resize"
        """
        return census.workers_for([link.address for link in self._links], self.tls,
                                  function, wait)

    def _require_worker(self, function: bytes) -> None:
        if self.workers_for(function) == 0:
            raise NoWorkers(function.decode("utf-8", "replace"), self.servers)

    def _join_inflight(self, sub: _Submission) -> tuple[_Submission, bool]:
        """The in-flight submission ``sub`` joins (itself if none); whether it is new."""
        if sub.key is None:
            return sub, True
        existing = self._inflight.get(sub.key)
        if existing is not None:
            return existing, False
        self._inflight[sub.key] = sub
        return sub, True

    def _wait_created(self, subs: list[_Submission]) -> None:
        timeout = None if self.timeout is None else max(self.timeout, self.connect_timeout)

        def wait_all() -> None:
            for sub in subs:
                sub.wait_replied()

        try:
            self._deadlines.run(timeout, wait_all)
        except _Expired:
            pass
        for sub in subs:
            if not sub.replied:
                sub.finish(exc=JobTimeout(f"{sub.function!r} was not accepted within "
                                          f"{timeout}s"))

    @staticmethod
    def _raise_if_refused(sub: _Submission) -> None:
        if sub.handle is None and sub.error is not None:
            raise sub.error

    def submit_many(self, submissions: Iterable[tuple | dict[str, Any]]) -> list[Job]:
        """Submit a batch in one pipelined write per server; return the Jobs in order.

        Each item is ``(function, data)``, ``(function, data, {options})`` or a dict of
        ``submit()`` keyword arguments. Waits until every job is accepted and raises the
        first error if one was refused.

        Example::

            jobs = client.submit_many([("upper", w) for w in words])
            results = [job.result() for job in jobs]
        """
        prepared: list[_Submission] = []
        for item in submissions:  # validate the whole batch before anything is sent
            if isinstance(item, dict):
                options = dict(item)
                function, data = options.pop("function"), options.pop("data", b"")
            else:
                function, data, *rest = item
                options = dict(rest[0]) if rest else {}
            prepared.append(self._prepare(function, data, **options))
        jobs: list[Job] = []
        new: list[_Submission] = []
        for sub in prepared:
            sub, is_new = self._join_inflight(sub)
            if is_new:
                new.append(sub)
            job = Job(self, sub)
            sub.jobs.append(job)
            jobs.append(job)
        deadline = time.monotonic() + self.connect_timeout
        for sub in new:
            try:
                self._route(sub, deadline)
            except GearmanError as exc:
                sub.finish(exc=exc)
        self._wait_created([job._sub for job in jobs])
        for job in jobs:
            self._raise_if_refused(job._sub)
        return jobs

    def _prepare(self, function: str | bytes, data: Data, unique: str | bytes | None = None,
                 priority: str = "normal", background: bool = False,
                 run_at: float | datetime | None = None) -> _Submission:
        func = function.encode() if type(function) is str else to_bytes(function, "function")
        # find(), not ``in``: bytes.__contains__ tries the argument as an int first and
        # builds (and drops) a TypeError with its message each time, 0.3 µs a call.
        if not func or func.find(b"\0") >= 0:
            raise ValueError(f"bad function name {function!r}")
        payload = data if type(data) is bytes else to_bytes(data, "data")
        types = _SUBMIT_TYPES.get(priority)
        if types is None:
            raise ValueError(f"priority must be 'normal', 'high' or 'low', not {priority!r}")
        epoch = None
        if run_at is not None:
            if priority != "normal":
                raise ValueError("run_at jobs always run at normal priority")
            # SUBMIT_JOB_EPOCH is background by definition (docs/protocol.md §3.11)
            background = True
            # The epoch is whole seconds: rounded up, so a job never runs before it is
            # due (at most a second after).
            when = run_at.timestamp() if isinstance(run_at, datetime) else run_at
            if isinstance(when, bool) or not isinstance(when, (int, float)):
                raise TypeError(f"run_at must be a Unix time or a datetime, not "
                                f"{type(run_at).__name__} {run_at!r}")
            if not math.isfinite(when):
                raise ValueError(f"run_at must be a finite Unix time, not {run_at!r}")
            epoch = math.ceil(when)
        if unique is None:
            # Background jobs carry a UUID so that persistent stores keyed by unique do not
            # collide (docs/protocol.md §8); foreground ones go without, so they never
            # coalesce by accident.
            uniq = uuid.uuid4().hex.encode() if background else b""
        else:
            uniq = to_bytes(unique, "unique")
            if len(uniq) > 64 or uniq.find(b"\0") >= 0:
                raise ValueError("unique must be at most 64 bytes, without NUL")
        key = None
        if not background and uniq and uniq != b"-":
            key = (func, uniq)
        ptype = types[1] if background else types[0]
        return _Submission(self, func, uniq, payload, ptype, background, epoch, key)

    def _candidates(self, sub: _Submission) -> list[_Link]:
        """The servers to try for ``sub``, best first."""
        links = self._links
        if len(links) == 1:
            return links
        if sub.unique and sub.unique != b"-":
            start = bisect.bisect(self._ring_points, _hash(sub.function + b"\0" + sub.unique))
            order: list[_Link] = []
            count = len(self._ring_links)
            for step in range(count):
                link = links[self._ring_links[(start + step) % count]]
                if link not in order:
                    order.append(link)
                    if len(order) == len(links):
                        break
            return order
        start = next(self._round_robin) % len(links)
        return links[start:] + links[:start]

    def _route(self, sub: _Submission, deadline: float, patient: bool = False) -> None:
        """Send ``sub`` to the first available server, else raise ``NoServersAvailable``.

        A server that is down (its connect failed, or its connection died young and it
        backs off) is not waited for: with every candidate down the caller knows at once,
        as a web request must (a 503 now, not after a second of retries). Only a
        ``patient`` caller (the resubmission of a job lost with its server: its caller
        already waits for the result) waits for the next try of some server, until
        ``deadline``.
        """
        links = self._links
        if len(links) == 1 and not self._closed:
            link = links[0]
            conn = link.conn
            if conn is not None and not conn.closed:  # the usual case, without the loop
                # _Link.enqueue() inlined: calling it (and ensure_connected()) costs about
                # 0.5 µs per job, measured.
                conn.send_raw(sub.packet())
                link.pending.append(sub)
                return
        while True:
            if self._closed:
                raise NoServersAvailable("client closed")
            candidates = self._candidates(sub)
            # A server that is down is tried again about once a second. While another one
            # is connected, that attempt runs beside the submission instead of in front of
            # it: a host that drops SYNs would otherwise hold a caller for the whole
            # connect_timeout every second. Only once an attempt has failed (down_since):
            # a server not connected yet is connected to first, or a new client would
            # place unique jobs off their ring server, breaking coalescing.
            connected = any([link.conn is not None for link in candidates])
            now = time.monotonic()
            for link in candidates:
                if not link.available(now):
                    continue
                if connected and link.conn is None and link.down_since is not None:
                    link.connect_soon()
                    continue
                try:
                    link.enqueue(sub, sub.packet())
                except OSError:  # includes ConnectionError: that server is down
                    continue
                return
            now = time.monotonic()
            if patient:
                next_try = min([link.retry_at for link in candidates])
                if next_try < deadline and now < deadline:
                    gevent.sleep(max(0.0, next_try - now))
                    continue
            elif any([link.available(now) and link.down_since is None
                      for link in candidates]):
                # Its connection closed during this pass (without failing a connect):
                # it may be reconnected to at once.
                continue
            raise NoServersAvailable("no job server reachable: " + ", ".join(
                [f"{link.name} ({link.last_error})" if link.last_error else link.name
                 for link in candidates]))

    def _connection_lost(self, link: _Link, pending: list, attachments: list[_Attachment],
                         reason: BaseException | None) -> None:
        resubmit: list[_Submission] = []
        for entry in pending:
            if isinstance(entry, _Submission):
                if entry.finished:
                    continue
                entry.drops += 1
                if entry.drops > _MAX_DROPS:
                    # A port that accepts and then drops us (a TLS-only server, another
                    # service): with the back-off capped at 1 s, resending would go on
                    # for ever.
                    entry.finish(exc=NoServersAvailable(
                        f"{link.name} closed the connection {entry.drops} times before "
                        f"accepting the job ({reason})"))
                else:
                    resubmit.append(entry)  # never accepted: not a loss, just send it again
            else:
                entry.on_lost(link, reason)
        for attachment in attachments:
            for sub in attachment.subs:
                if sub.finished:
                    continue
                sub.losses += 1
                if sub.losses > 1 or self._closed:
                    sub.finish(exc=JobFailed(
                        f"job lost with server {link.name} ({reason})", sub.handle_text))
                else:
                    resubmit.append(sub)
        if resubmit and not self._closed:
            gevent.spawn(self._resubmit, resubmit)
        elif resubmit:
            for sub in resubmit:
                sub.finish(exc=NoServersAvailable("client closed"))

    def _resubmit(self, subs: list[_Submission]) -> None:
        deadline = time.monotonic() + self.connect_timeout
        for sub in subs:
            if sub.finished:
                continue
            sub.link = None
            sub.handle = None
            log.info("resubmitting %s job (unique %r)", sub.function.decode("utf-8", "replace"),
                     sub.unique.decode("utf-8", "replace"))
            try:
                # Patient only for a job its server had accepted (the caller waits for its
                # result anyway). One that was never accepted (sent as its connection
                # closed: a server that died while the client was idle) is a new
                # submission: with every server down it fails at once, like one.
                self._route(sub, deadline, patient=sub.losses > 0)
            except NoServersAvailable as exc:
                if sub.losses:
                    # It was accepted (and may have run) before its server went: a failed
                    # job. NoServersAvailable means no server ever took it, so a caller
                    # may run it elsewhere (the web layer's local fallback).
                    sub.finish(exc=JobLost(f"job lost with its server; no server to "
                                           f"resubmit it to ({exc})"))
                else:
                    sub.finish(exc=exc)
            except GearmanError as exc:
                sub.finish(exc=exc)

    # -- status -------------------------------------------------------------------

    def _link_for(self, server: str | Address) -> _Link:
        address = parse_address(server)
        for link in self._links:
            if link.address == address:
                return link
        link = self._extra_links.get(address)
        if link is None:
            link = self._extra_links[address] = _Link(self, address)
        return link

    def _request(self, link: _Link, ptype: int, arg: bytes, expect: int,
                 timeout: float | None) -> tuple[bytes, ...]:
        if timeout is None:
            timeout = self.timeout
        entry = _Reply(expect)
        try:
            link.enqueue(entry, encode_request(ptype, arg))
        except OSError as exc:
            raise NoServersAvailable(f"cannot reach {link.name}: {exc}") from None
        try:
            return entry.result.get(timeout=timeout)
        except gevent.Timeout:
            raise JobTimeout(f"no {PacketType(expect).name} from {link.name} within {timeout}s") \
                from None

    def _get_status(self, link: _Link, handle: bytes, timeout: float | None) -> JobStatus:
        args = self._request(link, T.GET_STATUS, handle, T.STATUS_RES, timeout)
        return JobStatus(args[1] == b"1", args[2] == b"1", _number(args[3]),
                         _number(args[4]), args[0].decode("latin-1"), None, link.name)

    def status(self, handle: str | bytes, server: str | None = None,
               timeout: float | None = None) -> JobStatus:
        """GET_STATUS for a job handle on ``server`` (``host:port``; handles belong to the
        server that issued them). ``server`` may be omitted with a single server.

        Example::

            print(client.status(job.handle, job.server))
            # JobStatus(known=True, running=True, numerator=3, denominator=10, ...)
        """
        handle_bytes = to_bytes(handle, "handle")
        if len(handle_bytes) > 63:
            raise ValueError("job handles are at most 63 bytes")
        if server is None:
            if len(self._links) != 1:
                raise ValueError("status() needs the server that issued the handle")
            link = self._links[0]
        else:
            link = self._link_for(server)
        return self._get_status(link, handle_bytes, timeout)

    def status_unique(self, unique: str | bytes, timeout: float | None = None) -> JobStatus:
        """GET_STATUS_UNIQUE on every server; the status from the one that knows the job
        (``waiting`` = foreground clients attached), or an unknown status.

        Example::

            status = client.status_unique("report-2024-06")
            if status.known and not status.running:
                print("queued,", status.waiting, "clients waiting")
        """
        uniq = to_bytes(unique, "unique")
        if len(uniq) > 64:
            raise ValueError("unique must be at most 64 bytes")

        def ask(link: _Link) -> JobStatus:
            args = self._request(link, T.GET_STATUS_UNIQUE, uniq, T.STATUS_RES_UNIQUE,
                                 timeout)
            return JobStatus(args[1] == b"1", args[2] == b"1", _number(args[3]),
                             _number(args[4]), None, args[0].decode("utf-8", "replace"),
                             link.name, _number(args[5]))

        greenlets = [gevent.spawn(ask, link) for link in self._links]
        gevent.joinall(greenlets)
        answers = [g.value for g in greenlets if g.successful()]
        if not answers:
            raise greenlets[0].exception or NoServersAvailable("no server answered")
        known = [a for a in answers if a.known]
        if known:
            return max(known, key=lambda a: (a.running, a.waiting or 0))
        return JobStatus(False, False, 0, 0, None, uniq.decode("utf-8", "replace"), None, 0)
