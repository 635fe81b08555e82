"""The I/O shell: a gevent ``StreamServer`` around ``JobServerState``.

One greenlet per connection reads a chunk, decodes every whole packet or admin line in
it, applies them to the state, and then wakes the writer of every peer that got output,
so that all replies one chunk produced leave in one write per peer. A peer's writer is
its own greenlet, so a client that never reads blocks nobody but itself (and is
disconnected once ``--max-output-buffer`` bytes pile up for it).

Example::

    from gearoffload_server.config import ServerConfig
    from gearoffload_server.server import GearmanServer

    server = GearmanServer(ServerConfig(port=4730))
    server.serve_forever()          # or server.start() ... server.stop()
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
from collections.abc import Callable

import gevent
from gevent.server import StreamServer

from gearoffload.errors import ProtocolError
from gearoffload.protocol import RES, Decoder, Packet, PacketType, encode

from .admin import AdminProtocol
from .config import ServerConfig
from .state import JobServerState, Peer
from .stores import open_store

log = logging.getLogger("gearoffload.server")

RECV_SIZE = 64 * 1024
#: How long a closing connection may take to deliver what was queued for it.
CLOSE_FLUSH_TIMEOUT = 5.0


class LoopScheduler:
    """The state's ``Scheduler`` on the gevent loop; flushes output after each timer."""

    def __init__(self, after: Callable[[], None]) -> None:
        self._loop = gevent.get_hub().loop
        self._after = after

    def now(self) -> float:
        return time.time()

    def call_later(self, delay: float, callback: Callable[[], None]) -> _LoopTimer:
        return _LoopTimer(self._loop, delay, callback, self._after)


class _LoopTimer:
    __slots__ = ("_watcher",)

    def __init__(self, loop, delay: float, callback: Callable[[], None],
                 after: Callable[[], None]) -> None:
        def fire() -> None:
            self.cancel()
            try:
                callback()
            except Exception:
                log.exception("timer callback failed")
            after()

        self._watcher = loop.timer(max(delay, 0.0))
        self._watcher.start(fire)

    def cancel(self) -> None:
        self._watcher.stop()
        self._watcher.close()


class Connection:
    """One accepted socket: this greenlet reads; output is written without blocking.

    After each batch, ``wake()`` hands the peer's output to one non-blocking ``send``.
    Only when the kernel buffer is full does a writer greenlet take over, until the
    backlog is gone; meanwhile new output queues behind it, so order is kept and a peer
    that does not read never blocks the greenlet that produced output for it.
    """

    __slots__ = ("server", "sock", "peer", "decoder", "_writer", "closing", "_released")

    def __init__(self, server: GearmanServer, sock: socket.socket, address: tuple) -> None:
        self.server = server
        self.sock = sock
        host = address[0] if isinstance(address, tuple) else str(address)
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        self.peer = Peer(fd=sock.fileno(), address=host, loopback=loopback, transport=self)
        self.decoder = Decoder(server.config.max_packet_size)
        self._writer: gevent.Greenlet | None = None
        self.closing = False
        #: Output of a held peer released by the committer while the writer was busy.
        self._released: list[bytes] = []

    def serve(self) -> None:
        server = self.server
        state = server.state
        admin = server.admin
        peer = self.peer
        decoder = self.decoder
        recv = self.sock.recv
        handle = state.handle
        flush = server.flush
        reason = "closed by peer"
        state.connect(peer)
        try:
            while True:
                data = recv(RECV_SIZE)
                if not data:
                    break
                try:
                    for item in decoder.feed(data):
                        if type(item) is Packet:
                            handle(peer, item)
                        else:
                            admin.handle(peer, item)
                except ProtocolError as exc:
                    reason = f"protocol error: {exc}"
                    if exc.in_sync and exc.code:
                        peer.send(_error_reply(exc, binary=exc.code != "LINE_TOO_LONG"))
                    break
                finally:
                    flush()
                if self.closing:
                    reason = ""  # abort() has said why
                    break
        except OSError as exc:
            reason = f"socket error: {exc}"
        finally:
            self._close(reason)

    def _close(self, reason: str) -> None:
        peer = self.peer
        if reason.startswith("protocol error"):
            log.warning("%s fd=%d %s", peer.address, peer.fd, reason)
        elif reason:
            log.debug("%s fd=%d %s", peer.address, peer.fd, reason)
        self.server.state.disconnect(peer)
        self.server.flush()  # delivers a last ERROR; requeues may have woken workers
        self.closing = True
        writer = self._writer
        if writer is not None:
            writer.join(CLOSE_FLUSH_TIMEOUT)
            writer.kill(block=False)
        self.sock.close()
        self.server.connections.discard(self)

    def wake(self) -> None:
        """Send what the state queued for this peer, without ever blocking the caller."""
        if self._writer is not None:
            return  # the writer greenlet sends ``peer.out`` after its backlog
        self._send_now(self.peer.take_output())

    def _send_now(self, data: bytes) -> None:
        """One non-blocking send; what the kernel does not take goes to a writer greenlet."""
        try:
            sent = self.sock.send(data, 0, 0.0)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self.abort(f"write failed: {exc}", logging.INFO)
            return
        if sent < len(data):
            self._writer = gevent.spawn(self._write_backlog, memoryview(data)[sent:])

    def release(self, count: int) -> None:
        """Send the first ``count`` entries of a held peer's output (their jobs are
        durable now); the rest stays held. Never blocks the caller."""
        out = self.peer.out
        count = min(count, len(out))
        if not count or self.closing:
            return
        data = b"".join(out[:count])
        del out[:count]
        self.peer.out_bytes -= len(data)
        if self._writer is not None:
            self._released.append(data)  # the writer sends it before anything newer
            return
        self._send_now(data)

    def _write_backlog(self, backlog: memoryview) -> None:
        peer = self.peer
        released = self._released
        try:
            self.sock.sendall(backlog)
            while True:
                if released:
                    data = b"".join(released)
                    released.clear()
                    self.sock.sendall(data)
                elif peer.out and peer.batch is None:  # held: see GearmanServer._release
                    self.sock.sendall(peer.take_output())
                else:
                    break
        except OSError as exc:
            self.abort(f"write failed: {exc}", logging.INFO)
        finally:
            self._writer = None

    def abort(self, reason: str, level: int = logging.WARNING) -> None:
        """Disconnect this peer from another greenlet (it misbehaved, or we are stopping)."""
        if self.closing:
            return
        self.closing = True
        log.log(level, "%s fd=%d disconnected: %s", self.peer.address, self.peer.fd, reason)
        self.peer.out.clear()
        self.peer.out_bytes = 0
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _error_reply(exc: ProtocolError, binary: bool) -> bytes:
    text = str(exc).encode()
    if binary:
        return encode(RES, PacketType.ERROR, (exc.code.encode(), text))
    return b"ERR %s %s\r\n" % (exc.code.encode(), text.replace(b" ", b"+"))


class GearmanServer(StreamServer):
    """A Gearman job server: binary protocol and text admin protocol on one port.

    Lifecycle as gevent's servers: ``start()``, ``serve_forever()``, ``stop()``;
    ``stop_graceful()`` stops accepting and stops once no job is left.
    """

    def __init__(self, config: ServerConfig, listener: object = None) -> None:
        super().__init__(listener or (config.host, config.port), backlog=1024)
        self.config = config
        #: ``None`` for ``--queue memory``: then nothing below costs anything extra.
        #: Opened once the port is bound (``init_socket``), so that a server that cannot
        #: listen neither creates nor locks a queue file.
        self.store = None
        self.state = JobServerState(config, LoopScheduler(self.flush))
        self._committer: gevent.Greenlet | None = None
        #: Background jobs replayed from the store at start-up.
        self.restored = 0
        self.state.on_shutdown = self._admin_shutdown
        self.admin = AdminProtocol(self.state)
        self.connections: set[Connection] = set()
        self._graceful: gevent.Greenlet | None = None
        self._shutting_down: bool | None = False  # None once the store is closed

    def init_socket(self) -> None:
        super().init_socket()
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.store is None and self._shutting_down is False:
            try:
                store = open_store(self.config.queue_url)
            except Exception:  # StoreError: cannot open it; do not keep the port
                self.socket.close()
                raise
            if store is not None:
                self.store = self.state.store = store
                self.restored = self.state.restore(store.load())

    def handle(self, sock: socket.socket, address: tuple) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = Connection(self, sock, address)
        self.connections.add(conn)
        conn.serve()

    def flush(self) -> None:
        """Send every peer its output now; drop peers that stopped reading."""
        limit = self.config.max_output_buffer
        store = self.store
        if store is None:
            for peer in self.state.take_dirty():
                conn = peer.transport
                if peer.out_bytes > limit:
                    conn.abort(f"more than {limit} bytes of replies unread")
                else:
                    conn.wake()
            return
        if self._committer is None and store.batch.pending:
            self._committer = gevent.spawn(self._commit_loop)
        for peer in self.state.take_dirty():
            if peer.batch is not None:
                continue  # held until its batch is durable: _release() sends it
            conn = peer.transport
            if peer.out_bytes > limit:
                conn.abort(f"more than {limit} bytes of replies unread")
            else:
                conn.wake()

    # -- group commit ----------------------------------------------------------------------
    #
    # The state only appends saves and deletes to the store's open batch. One committer
    # greenlet at a time takes that batch and writes it in a thread (one transaction); all
    # that arrives meanwhile goes into the next batch, so under load each commit carries a
    # whole burst. A peer that was sent JOB_CREATED for a job of a batch not yet durable
    # (``peer.batch``, the newest such batch) is held: ``flush()`` and the writer greenlet
    # do not write its output, but its reader goes on reading (clients keep pipelining).
    # When the committer takes batch B it notes, for each peer with a reply about B, how
    # long that peer's ``out`` is: everything before that point refers only to jobs of B or
    # earlier batches (later submissions go into B+1). Once B is durable that prefix is
    # sent; a peer whose newest batch is B is released entirely. All output that names a
    # not-yet-durable job as created goes to such a held peer (only submissions produce
    # it), so no acknowledgement leaves early, and other peers' output (workers,
    # foreground clients) is never delayed. Should the write fail, the held replies are
    # still in ``out`` and become ERROR QUEUE_ERROR (``JobServerState.store_failed``).

    def _commit_loop(self) -> None:
        store = self.store
        pool = gevent.get_hub().threadpool
        debug = log.isEnabledFor(logging.DEBUG)
        try:
            while store.batch.pending:
                batch = store.take_batch()
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
                    dropped = self.state.store_failed(
                        batch, b"Job could not be saved: " + str(exc).encode())
                    log.error("queue store write failed (%s): %d submissions refused with "
                              "QUEUE_ERROR, %d deletes lost (those jobs may run again "
                              "after a restart)", exc, dropped, len(batch.deletes))
                batch.done = True
                self._release(batch, cuts)
        finally:
            self._committer = None

    def _release(self, batch, cuts: dict[Peer, int]) -> None:
        """``batch`` is durable (or failed): send what its peers were held for."""
        limit = self.config.max_output_buffer
        for peer in {ack[0]: None for ack in batch.acks}:
            conn = peer.transport
            waits = peer.batch
            if waits is None:
                continue
            if waits.done:
                peer.batch = None
                if peer.out_bytes > limit:
                    conn.abort(f"more than {limit} bytes of replies unread")
                elif peer.out:
                    conn.wake()
            elif peer in cuts:
                conn.release(cuts[peer])

    def _close_store(self) -> None:
        """At exit: write what is still pending (deletes of finished jobs), then close."""
        store = self.store
        if store is None or self._shutting_down is None:
            return
        self._shutting_down = None  # closed: stop() may run twice (graceful, then TERM)
        committer = self._committer
        if committer is not None:
            committer.join(10.0)
        if store.batch.pending and self._committer is None:
            try:
                store.write(store.take_batch())
            except Exception as exc:
                log.error("queue store: final write failed: %s", exc)
        store.close()

    def stop_graceful(self) -> None:
        """Stop accepting connections; stop the server once no job remains (SIGUSR1)."""
        if self._graceful is None:
            log.warning("graceful shutdown: no new connections; waiting for %d jobs",
                        len(self.state.jobs))
            # Not close(): that would also end serve_forever() at once.
            self.stop_accepting()
            self.socket.close()
            self._graceful = gevent.spawn(self._stop_when_idle)

    def _stop_when_idle(self) -> None:
        while self.state.jobs:
            gevent.sleep(0.1)
        self.stop()

    def shutdown(self) -> None:
        """SIGTERM: stop accepting, hand out no new job (grabs get NO_JOB), let running
        jobs finish for up to ``--shutdown-timeout`` seconds, write the store, stop.
        Queued background jobs are in the store already; a restart replays them."""
        if self._shutting_down is not False:
            return
        self._shutting_down = True
        state = self.state
        running = sum(f.running for f in state.functions.values())
        log.warning("shutting down: %d running jobs may finish within %gs", running,
                    self.config.shutdown_timeout)
        if self._graceful is None:
            self.stop_accepting()
            self.socket.close()
        state.draining = True
        deadline = time.monotonic() + self.config.shutdown_timeout
        while running and time.monotonic() < deadline:
            gevent.sleep(0.05)
            running = sum(f.running for f in state.functions.values())
        if running:
            log.warning("%d jobs still running at shutdown; they are requeued at restart "
                        "if stored", running)
        self.stop()

    def stop(self, timeout: float | None = None) -> None:
        for conn in list(self.connections):
            conn.abort("server stopping", logging.INFO)
        # Before super().stop(): once that returns, serve_forever() returns and the
        # process may exit before this greenlet runs again.
        self._close_store()
        super().stop(timeout if timeout is not None else 1.0)

    def _admin_shutdown(self, graceful: bool) -> None:
        # Let the OK reach the admin before the server goes.
        gevent.spawn_later(0.05, self.stop_graceful if graceful else self.stop)
