"""Batching, group commits, and the replies that wait for them.

Everything about "a JOB_CREATED leaves only once its job is durable" lives here:

- ``Batch``: the saves and deletes that become durable together, and ``acks``, the
  JOB_CREATED replies that refer to its jobs;
- ``held``: for each peer sent such a reply, the newest batch it waits for (the shell
  writes nothing of that peer's output meanwhile);
- ``GroupCommit``: the committer greenlet that writes one batch at a time in a thread and
  then releases what its peers were held for.

The state only appends saves and deletes to the store's open batch (``QueueStore.save``
calls ``Batch.ack``). One committer greenlet at a time takes that batch and writes it in a
thread (one transaction); all that arrives meanwhile goes into the next batch, so under
load each commit carries a whole burst. A held peer's reader goes on reading (clients keep
pipelining). When the committer takes batch B it notes, for each peer with a reply about
B, how long that peer's ``out`` is: everything before that point refers only to jobs of B
or earlier batches (later submissions go into B+1). Once B is durable that prefix is
sent; a peer whose newest batch is B is released entirely. All output that names a
not-yet-durable job as created goes to such a held peer (only submissions produce it), so
no acknowledgement leaves early, and other peers' output (workers, foreground clients) is
never delayed. Should the write fail, the held replies are still in ``out`` and become
ERROR QUEUE_ERROR (``fail_batch``; the state drops the jobs: ``store_failed``).

Example (the shell's side; ``connections`` maps a ``Peer`` to its connection)::

    commit = GroupCommit(store, state, connections, config.max_output_buffer)
    commit.after_round()     # after each poll round: start or hurry the committer
    commit.close()           # at exit: write what is pending, close the store
"""

from __future__ import annotations

import logging
import time

import gevent
from gevent.event import Event

from gearoffload.protocol import RES, PacketType, encode

log = logging.getLogger("gearoffload.server")

#: A batch that acknowledges no submission (only deletes of ended jobs, dead-letter marks)
#: waits up to this long, or until a submission or DELETE_BATCH rows arrive, before it is
#: written: a drain then commits hundreds of deletes at once instead of a few. It widens
#: the at-least-once window (a job that ended this long before a crash may run again).
DELETE_LINGER = 0.02
DELETE_BATCH = 4096


class Batch:
    """Saves and deletes that become durable together, in one transaction.

    ``acks`` lists every JOB_CREATED that refers to a job saved in this batch:
    ``(peer, reply bytes, job, attached)``, ``attached`` true for a foreground submission
    (the peer waits on the job); the reply object sits in ``peer.out``. Should the write
    fail, each such reply is swapped for an ``ERROR QUEUE_ERROR`` (it is still in ``out``,
    because a peer waiting for a batch is not written to) and the jobs are dropped.

    ``result_puts`` are kept results to insert (``ResultRow`` fields) and
    ``result_drops`` the ids of kept results to delete, after the inserts (a result may
    be kept and dropped within one batch). ``held`` is the store's map of peers to the
    newest batch they wait for (shared by all its batches). ``last_handle``, set by the
    committer as it takes the batch, is the highest handle number issued so far (0: not
    known): the store keeps it so that handles are not reused after a restart.
    """

    __slots__ = ("seq", "saves", "deletes", "marks", "acks", "result_puts", "result_drops",
                 "done", "error", "held", "last_handle")

    def __init__(self, seq: int, held: dict | None = None) -> None:
        self.seq = seq
        self.saves: list[tuple] = []   # rows: StoredJob fields
        self.deletes: list[int] = []
        #: (dead 0/1, died, attempts, failures, error, id): a dead letter, or a requeue
        self.marks: list[tuple] = []
        self.acks: list[tuple] = []
        self.result_puts: list[tuple] = []
        self.result_drops: list[int] = []
        self.done = False
        self.error: str | None = None
        self.held = {} if held is None else held
        self.last_handle = 0

    @property
    def pending(self) -> bool:
        return bool(self.saves or self.deletes or self.marks or self.result_puts or
                    self.result_drops)

    def ack(self, peer, reply: bytes, job, attached: bool = False) -> None:
        """``reply``, about to go into ``peer.out``, tells of ``job`` (saved in this
        batch); ``attached``: the submission was a foreground one. The peer is held
        until this batch is durable."""
        self.acks.append((peer, reply, job, attached))
        held = self.held
        waits = held.get(peer)
        if waits is None or waits.seq < self.seq:
            held[peer] = self


def write_now(batch: Batch) -> bool:
    """Whether a store batch must be written without DELETE_LINGER: a submission waits
    for its JOB_CREATED, or DELETE_BATCH rows have piled up."""
    return bool(batch.saves) or len(batch.deletes) + len(batch.marks) >= DELETE_BATCH


class GroupCommit:
    """The committer of one store: one batch at a time, in a thread, then the release of
    the replies that waited for it. ``connections`` maps each live ``Peer`` to its
    connection (anything with ``wake()``, ``release(n)``, ``abort(reason)`` and
    ``backlog``); a peer gone from it is not written to."""

    def __init__(self, store, state, connections: dict, max_output_buffer: int) -> None:
        self.store = store
        self.state = state
        self.held: dict = store.held
        self._connections = connections
        self._limit = max_output_buffer
        self._committer: gevent.Greenlet | None = None
        self._lingering: Event | None = None  # set() ends a committer's DELETE_LINGER
        self._closed = False

    def after_round(self) -> None:
        """Called once per poll round (and after each timer): start the committer when
        the open batch has rows, or end its linger when a submission arrived."""
        if self._committer is None:
            if self.store.batch.pending:
                self._committer = gevent.spawn(self._commit_loop)
        elif self._lingering is not None and write_now(self.store.batch):
            self._lingering.set()

    def _commit_loop(self) -> None:
        store = self.store
        pool = gevent.get_hub().threadpool
        debug = log.isEnabledFor(logging.DEBUG)
        try:
            while store.batch.pending:
                if not write_now(store.batch):
                    self._lingering = Event()
                    self._lingering.wait(DELETE_LINGER)
                    self._lingering = None
                batch = store.take_batch()
                batch.last_handle = self.state.last_handle()
                cuts = {ack[0]: len(ack[0].out) for ack in batch.acks}
                started = time.perf_counter()
                try:
                    pool.spawn(store.write, batch).get()
                    if debug:
                        log.debug("store batch %d: %d saves, %d deletes in %.2f ms", batch.seq,
                                  len(batch.saves), len(batch.deletes),
                                  (time.perf_counter() - started) * 1000)
                except Exception as exc:  # StoreError, or a bug: never acknowledge
                    batch.error = str(exc)
                    dropped = fail_batch(self.state, batch,
                                         b"Job could not be saved: " + str(exc).encode())
                    log.error("queue store write failed (%s): %d submissions refused with "
                              "QUEUE_ERROR, %d deletes lost (those jobs may run again "
                              "after a restart)", exc, dropped, len(batch.deletes),
                              extra={"event": "store.write_failed"})
                batch.done = True
                self._release(batch, cuts)
        finally:
            self._committer = None

    def _release(self, batch: Batch, cuts: dict) -> None:
        """``batch`` is durable (or failed): send what its peers were held for."""
        limit = self._limit
        held = self.held
        connections = self._connections
        for peer in {ack[0]: None for ack in batch.acks}:
            waits = held.get(peer)
            if waits is None:
                continue
            conn = connections.get(peer)
            if waits.done:
                del held[peer]
                if conn is None:
                    continue
                if peer.out_bytes + len(conn.backlog or b"") > limit:
                    conn.abort(f"more than {limit} bytes of replies unread")
                elif peer.out:
                    conn.wake()
            elif conn is not None and peer in cuts:
                conn.release(cuts[peer])

    def close(self) -> None:
        """At exit: write what is still pending (deletes of finished jobs), then close the
        store. Runs once (stop() may run twice: graceful, then TERM)."""
        if self._closed:
            return
        self._closed = True
        store = self.store
        committer = self._committer
        if committer is not None:
            committer.join(10.0)
        if self._committer is None:
            # Always once, even with no rows: the last handle issued must be on disk.
            batch = store.take_batch()
            batch.last_handle = self.state.last_handle()
            try:
                store.write(batch)
            except Exception as exc:
                log.error("queue store: final write failed: %s", exc,
                          extra={"event": "store.write_failed"})
        store.close()


def fail_batch(state, batch: Batch, text: bytes) -> int:
    """``batch`` could not be written: each JOB_CREATED about one of its jobs, still held
    in its peer's ``out``, becomes ``ERROR QUEUE_ERROR text``, and the state drops the
    jobs (``JobServerState.store_failed``). Returns how many jobs were dropped.

    Example::

        dropped = fail_batch(state, store.take_batch(), b"Job could not be saved: disk full")
    """
    error = encode(RES, PacketType.ERROR, (b"QUEUE_ERROR", text))
    replies: dict = {}
    for peer, reply, _job, _attached in batch.acks:
        replies.setdefault(peer, set()).add(id(reply))
    for peer, ids in replies.items():
        out = peer.out
        for i, item in enumerate(out):
            if id(item) in ids:  # the very reply object, not an equal one
                out[i] = error
                peer.out_bytes += len(error) - len(item)
    return state.store_failed(batch)
