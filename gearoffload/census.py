"""How many workers serve a function: each server's admin ``status``, cached per process.

``Client.workers_for()`` and ``Client.submit(require_worker=True)`` read it, so that a
caller learns at once that no worker serves a function instead of waiting out its timeout.
It answers from a cache of each server's ``status`` listing (``AdminClient.status``, the
same command for our server and gearmand), shared by every ``Client`` of the process
(``gearoffload.offloading`` makes one per thread):

- a listing is fetched at most once per ``MAX_AGE`` (1 s) per server, and only when
  someone asks; a cached answer costs a dictionary lookup or two (about a microsecond);
- a listing up to ``STALE_LIMIT`` (5 s) old is answered from at once while a newer one
  is fetched, unless it says 0 for the function (a 0 is never older than ``MAX_AGE``);
  otherwise (or with none yet) the caller waits for the fetch, for at most its ``wait``,
  and gets ``None`` (unknown) if it has not come by then;
- the fetch runs in a thread of the calling hub's threadpool (gevent's), not on the hub:
  reading a listing of 100,000 functions takes about 0.25 s of CPU, which would stall
  every greenlet of the hub (measured: 0.26 s at once from a greenlet, 0.03 s from a
  thread, which gives the interpreter back every few milliseconds). This holds in a
  monkey-patched process, unpatched, and in plain threads (each has its own hub and
  threadpool). ``AdminClient`` itself uses gevent's sockets, so its I/O never blocks
  a hub, in a greenlet or in a thread;
- a server that cannot be asked (down, refusing admin commands, TLS refused) is
  *unknown* for ``MAX_AGE``, then asked again.

Example::

    from gearoffload.census import workers_for

    workers_for([("127.0.0.1", 4730)], None, "resize")   # 2, 0, or None (unknown)
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Iterable

import gevent
from gevent import monkey

from .admin import AdminClient
from .connection import Address, format_address

__all__ = ["MAX_AGE", "STALE_LIMIT", "workers_for", "forget"]

log = logging.getLogger("gearoffload.census")

#: A server's listing is fetched at most this often (seconds), and only on demand.
MAX_AGE = 1.0
#: A listing older than this is not answered from; the caller waits for a fresh one.
STALE_LIMIT = 5.0
#: Bounds connecting to a server and reading its listing (in the threadpool).
ADMIN_TIMEOUT = 2.0
#: How often a caller that waits for a listing looks whether it has come.
_POLL = 0.005
_PENDING = object()  # no usable answer from a server yet: worth waiting for

# A lock that is a real lock in a monkey-patched process too: the threadpool's threads
# and the threads of a threaded web server share these entries. It is held only for a
# check-and-set, never across a wait.
_lock = monkey.get_original("_thread", "allocate_lock")()


class _Entry:
    """One server's cached ``status``: function name -> worker registrations."""

    __slots__ = ("counts", "fetched_at", "refreshing_since")

    def __init__(self) -> None:
        self.counts: dict[str, int] | None = None  # None: unknown (never asked, or failed)
        self.fetched_at = -1e9  # monotonic time of the last answer (or failure)
        self.refreshing_since: float | None = None


_entries: dict[Address, _Entry] = {}


def forget() -> None:
    """Drop every cached listing (tests; a process that changed servers)."""
    with _lock:
        _entries.clear()


def _fetch(entry: _Entry, address: Address, tls: ssl.SSLContext | None) -> None:
    """In a threadpool thread: ask the server, store the answer (or unknown)."""
    counts: dict[str, int] | None = None
    try:
        with AdminClient(address, timeout=ADMIN_TIMEOUT, tls=tls) as admin:
            counts = {row.name: row.workers for row in admin.status()}
    except Exception as exc:  # noqa: BLE001 - any failure means "unknown", never a crash
        log.debug("cannot read the status of %s: %s", format_address(address), exc)
    entry.counts = counts  # before fetched_at: a reader never sees new time, old data
    entry.fetched_at = time.monotonic()
    entry.refreshing_since = None


def _refresh(entry: _Entry, address: Address, tls: ssl.SSLContext | None,
             now: float) -> None:
    """Start fetching ``address``'s listing unless a fetch is already under way."""
    with _lock:
        since = entry.refreshing_since
        if since is not None and now - since < 2 * ADMIN_TIMEOUT + 1:
            return
        entry.refreshing_since = now
    try:
        gevent.get_hub().threadpool.spawn(_fetch, entry, address, tls)
    except Exception:  # noqa: BLE001 - e.g. no thread can be started: on the hub, then
        gevent.spawn(_fetch, entry, address, tls)


def _answer(entry: _Entry, function: str, now: float) -> object:
    """The entry's count for ``function``; None if unknown; ``_PENDING`` if nothing
    usable yet."""
    age = now - entry.fetched_at
    if entry.counts is None:
        return None if age < MAX_AGE else _PENDING
    count = entry.counts.get(function, 0)
    if age >= MAX_AGE and (count == 0 or age > STALE_LIMIT):
        # A stale 0 is not answered: it would fail callers fast (503) although a worker
        # may have come since, so they wait for the fresh listing. A stale count of
        # workers only means a caller may wait for a worker that has just left, as
        # without this module.
        return _PENDING
    return count


def workers_for(addresses: Iterable[Address], tls: ssl.SSLContext | None,
                function: str | bytes, wait: float = 0.25) -> int | None:
    """Worker registrations for ``function`` summed over ``addresses``; ``None`` when not
    known (no server could be asked within ``wait`` seconds, or every server that could
    says 0 while another could not be asked).

    0 means every server was asked and none has a worker for ``function``, at most
    ``MAX_AGE`` (1 s) ago; a count of workers may be up to ``STALE_LIMIT`` (5 s) old.
    ``wait`` counts from when the fetch started: while a server hangs, callers after the
    first one get ``None`` at once instead of each waiting again.
    """
    name = function if isinstance(function, str) else bytes(function).decode(
        "utf-8", "surrogateescape")  # as AdminClient decodes the names it lists
    now = time.monotonic()
    entries = []
    for address in addresses:
        entry = _entries.get(address)
        if entry is None:
            with _lock:
                entry = _entries.setdefault(address, _Entry())
        if now - entry.fetched_at >= MAX_AGE:
            _refresh(entry, address, tls, now)
        entries.append(entry)
    answers = [_answer(entry, name, now) for entry in entries]
    if _PENDING in answers and wait > 0:
        # Waited for from when the fetch started, not from now: while a server hangs,
        # one caller after another must not each wait ``wait`` (the next ones get None).
        started = [entry.refreshing_since for entry, answer in zip(entries, answers, strict=True)
                   if answer is _PENDING and entry.refreshing_since is not None]
        deadline = max(started) + wait if started else now
        while now < deadline:
            gevent.sleep(_POLL)
            now = time.monotonic()
            answers = [_answer(entry, name, now) for entry in entries]
            if _PENDING not in answers:
                break
    known = [n for n in answers if type(n) is int]
    total = sum(known)
    if total or len(known) == len(answers):
        return total
    return None
