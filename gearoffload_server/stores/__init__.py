"""Queue stores: where background jobs live, so that a restart loses none (docs/protocol.md §3.13).

The state calls a store at two moments: ``save(...)`` when it accepts a new background job
and ``delete(job)`` when a stored job ends (complete, fail, exception, retry limit, cancel).
With ``--result-ttl``, the outcome of an ended background job (``state.KeptResults``) is
added by ``keep_result(...)`` in the same call as its ``delete``, so both land in one
transaction; ``drop_result(id)`` forgets one that expired, was evicted or was replaced.
All of these only append to the store's open ``Batch``; nothing touches the disk on the event loop.
The I/O shell takes the batch (``take_batch()``) and hands it to ``write(batch)`` in a
thread: one transaction per batch, so a burst of submissions costs one commit (group
commit). A submitter's JOB_CREATED is held back until the batch holding its job is durable
(``QueueStore.held`` says which batch a peer waits for; ``commit.py`` owns all of that).

Rows are keyed by a store-generated id per job, never by (function, unique) (Q11). Each
row also keeps the job's handle, and a dead letter its death time, attempts and last
error (``mark_dead``): replay (``load()``) gives a job back its handle, so a client that
holds it across a restart (GET_STATUS, ``show dead job``) still finds that job. The store
also keeps the highest handle number the server issued (``last_handle``, written with
each batch and at shutdown), so that new handles after a restart continue past every
handle a client may have been told before it, stored or not.

``--queue`` URLs:

- ``memory`` — no persistence (gearmand's default); ``open_store`` returns ``None`` and the
  state skips every store call.
- ``sqlite://PATH`` — ``sqlite:///var/lib/q.db`` is the absolute path ``/var/lib/q.db``,
  ``sqlite://q.db`` is relative to the working directory. Options as a query string:
  ``synchronous=full`` (default: a commit is on disk before JOB_CREATED leaves) or
  ``normal`` (survives a process crash, not a power cut), ``max_size=64M`` (caps the file;
  a full store answers submissions with ``ERROR QUEUE_ERROR``).
- ``redis://HOST:PORT/DB`` — a Redis the team already runs (``stores/redis.py``; needs
  ``pip install 'gearoffload[redis]'``). ``?prefix=NAME`` names its keys (``NAME:jobs``,
  ``NAME:dead``); the default ``gearoffload:PORT`` (the job server's port) keeps several
  servers on one Redis apart. Redis must answer PING at start-up.

Example::

    >>> store = open_store("memory")
    >>> store is None
    True
"""

from __future__ import annotations

import itertools
import os
from typing import NamedTuple
from urllib.parse import parse_qs, urlsplit

from ..commit import Batch  # noqa: F401  (re-exported: the stores build and write batches)

SIZE_UNITS = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
#: Bytes of a dead letter's last error kept in the store (the status page and ``show
#: dead job`` show less; a worker's traceback fits).
DEAD_ERROR_BYTES = 16384


class StoreError(Exception):
    """The store cannot be opened or written; the message says what to do."""


class StoredJob(NamedTuple):
    """One row of a store, as ``load()`` returns it (in submission order)."""

    id: int
    function: bytes
    unique: bytes
    priority: int
    data: bytes
    when: int
    reducer: bytes | None
    handle: bytes = b""   # b"": saved before handles were stored (a fresh one is given)
    dead: int = 0   # 1: its retries (per-job or --retry-failed) are used up: a dead letter
    died: float = 0.0     # dead letters: when it was buried (epoch seconds), 0.0 unknown
    attempts: int = 0     # dead letters: attempts in all
    failures: int = 0     # dead letters: of which failed (not lost workers)
    error: bytes = b""    # dead letters: the last exception text (up to DEAD_ERROR_BYTES)


class ResultRow(NamedTuple):
    """One kept result of a background job, as stored and as ``load_results()`` returns
    it. ``id`` is the store's, one per kept result, growing (rows are appended: no index
    on the unique, which only the server's memory looks up); ``expires`` is wall-clock
    time (``time.time()``); ``data`` is ``None`` when the result was too large to keep
    (``too_large`` is then its size in bytes)."""

    id: int
    unique: bytes
    state: bytes        # b"done", b"failed" or b"dead"
    numerator: int
    denominator: int
    expires: float
    data: bytes | None
    too_large: int


class QueueStore:
    """The interface the state and the shell use; subclasses implement the disk side."""

    def __init__(self) -> None:
        self._seq = itertools.count(1)
        #: Peer -> the newest batch it waits for (``commit.py``): shared by all batches.
        self.held: dict = {}
        self.batch = Batch(next(self._seq), self.held)
        self._ids = itertools.count(1)
        self._result_ids = itertools.count(1)
        #: The highest handle number issued before this start (``load()`` reads it): the
        #: state's handles continue past it.
        self.last_handle = 0

    # -- on the event loop ---------------------------------------------------------------

    def save(self, job, peer, reply: bytes) -> None:
        """Add a new background job to the open batch; ``reply`` is its JOB_CREATED,
        about to be appended to ``peer.out``."""
        job.stored = ident = next(self._ids)
        batch = self.batch
        job.batch = batch
        # The row is built here: the job may end (and lose its id) while a thread writes.
        batch.saves.append((ident, job.function.name, job.unique, job.priority, job.data,
                            job.when, job.reducer, job.handle))
        batch.ack(peer, reply, job)

    def delete(self, job) -> None:
        """A stored job ended; its row goes with the next batch (lazily: at-least-once)."""
        self.batch.deletes.append(job.stored)
        job.stored = 0

    def mark_dead(self, job, dead: bool, died: float = 0.0, error: bytes = b"") -> None:
        """A stored job became a dead letter (``True``; when it ``died``, its attempts
        and failures as counted now, its last ``error``) or was requeued (``False``)."""
        self.batch.marks.append((int(dead), died, job.failures + job.retries, job.failures,
                                 error[:DEAD_ERROR_BYTES], job.stored))

    def keep_result(self, unique: bytes, entry) -> int:
        """Write the kept result ``entry`` (``state.Kept``) of ``unique`` with the open
        batch, the one that deletes the row of the job that produced it; returns its id."""
        ident = next(self._result_ids)
        self.batch.result_puts.append((ident, unique, entry.state, entry.numerator,
                                       entry.denominator, entry.expires, entry.data,
                                       entry.too_large))
        return ident

    def drop_result(self, ident: int) -> None:
        """The kept result ``ident`` expired, was evicted or replaced: delete its row."""
        self.batch.result_drops.append(ident)

    def take_batch(self) -> Batch:
        """Close the open batch for writing; later calls go into a fresh one."""
        batch = self.batch
        self.batch = Batch(next(self._seq), self.held)
        return batch

    # -- in a worker thread (or at start-up and shutdown) --------------------------------

    def load(self) -> list[StoredJob]:
        """Every stored job, oldest first, and ``last_handle`` set. Called once, before
        the first ``save``."""
        raise NotImplementedError

    def load_results(self, now: float) -> list[ResultRow]:
        """Every kept result in the order they were kept (of one TTL: soonest expiry
        first), expired ones too (``restore`` deletes those with the first batch: loading
        never writes). Called once, before the first ``keep_result``. Stores without
        results return none."""
        return []

    def write(self, batch: Batch) -> None:
        """Make ``batch`` durable in one transaction, or raise ``StoreError``; with its
        ``last_handle`` (when not 0) as the highest handle number issued."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def describe(self) -> str:
        return type(self).__name__


def _size(text: str) -> int:
    text = text.strip().lower().removesuffix("b")
    if text and text[-1] in SIZE_UNITS:
        return int(text[:-1]) * SIZE_UNITS[text[-1]]
    return int(text)


def parse_queue_url(url: str) -> tuple[str, str, dict[str, str]]:
    """``(kind, path, options)`` for a ``--queue`` URL; ``ValueError`` says what is wrong."""
    if url == "memory":
        return "memory", "", {}
    if url.startswith("redis://"):
        return _parse_redis_url(url)
    if not url.startswith("sqlite://"):
        raise ValueError(f"unknown queue {url!r}: use memory, sqlite://PATH "
                         "(e.g. sqlite:///var/lib/gearoffload/queue.db) "
                         "or redis://HOST:PORT/DB")
    rest = url[len("sqlite://"):]
    path, _, query = rest.partition("?")
    if not path:
        raise ValueError("sqlite queue needs a file: sqlite:///absolute/path.db "
                         "or sqlite://relative/path.db")
    options: dict[str, str] = {}
    for key, values in parse_qs(query, keep_blank_values=True).items():
        value = values[-1].lower()
        if key == "synchronous":
            if value not in ("full", "normal"):
                raise ValueError("sqlite option synchronous must be full or normal")
        elif key == "max_size":
            try:
                if _size(value) < 64 * 1024:
                    raise ValueError
            except ValueError:
                raise ValueError("sqlite option max_size must be a size of at least 64k, "
                                 "e.g. 512M") from None
        else:
            raise ValueError(f"unknown sqlite option {key!r} (known: synchronous, max_size)")
        options[key] = value
    return "sqlite", path, options


def _parse_redis_url(url: str) -> tuple[str, str, dict[str, str]]:
    """``redis://[[USER]:PASSWORD@]HOST[:PORT][/DB][?prefix=NAME]``."""
    where, _, query = url.partition("?")
    parts = urlsplit(where)
    try:
        port = parts.port
    except ValueError:
        raise ValueError("redis queue: the port must be a number from 1 to 65535, "
                         "e.g. redis://localhost:6379/0") from None
    if port == 0:
        raise ValueError("redis queue: the port must be a number from 1 to 65535")
    db = parts.path.lstrip("/")
    if db and not (db.isdigit() and int(db) < 1 << 16):
        raise ValueError(f"redis queue: the database must be a number, not {db!r} "
                         "(e.g. redis://localhost:6379/0)")
    if parts.fragment:
        raise ValueError("redis queue: unexpected '#' in the URL")
    options: dict[str, str] = {}
    for key, values in parse_qs(query, keep_blank_values=True).items():
        value = values[-1]
        if key != "prefix":
            raise ValueError(f"unknown redis option {key!r} (known: prefix)")
        if not value or any(c.isspace() for c in value):
            raise ValueError("redis option prefix must be a non-empty name without spaces, "
                             "e.g. ?prefix=gearoffload:eu1")
        options[key] = value
    return "redis", where, options


def with_default_prefix(url: str, port: int) -> str:
    """A ``redis://`` URL without ``?prefix=`` gets ``gearoffload:PORT``: two job
    servers on one Redis keep their jobs apart. Other URLs are returned as they are."""
    if not url.startswith("redis://") or "prefix=" in url.partition("?")[2]:
        return url
    return f"{url}{'&' if '?' in url else '?'}prefix=gearoffload:{port}"


def open_store(url: str) -> QueueStore | None:
    """Open the store a ``--queue`` URL names (``None`` for ``memory``); ``StoreError``
    when it cannot be opened, e.g. a directory that cannot be created or a file that
    another server holds."""
    try:
        kind, path, options = parse_queue_url(url)
    except ValueError as exc:
        raise StoreError(str(exc)) from None
    if kind == "memory":
        return None
    if kind == "redis":
        from .redis import RedisStore

        return RedisStore(path, options.get("prefix", "gearoffload"))
    from .sqlite import SqliteStore

    directory = os.path.dirname(path)
    if directory:
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the queue directory {directory}: "
                             f"{exc.strerror or exc}") from None
    return SqliteStore(path, synchronous=options.get("synchronous", "full"),
                       max_size=_size(options["max_size"]) if "max_size" in options else 0)
