"""The I/O shell: a gevent ``StreamServer`` around ``JobServerState``.

gevent accepts each connection and gives it its greenlet, which registers the socket with
the server's poll loop and then only waits for the close. The poll loop, one greenlet,
reads every socket that is ready (a chunk each), decodes every whole packet or admin line
in it, applies them to the state, and when the round is done sends each peer everything
the round produced for it in one non-blocking write. Compared with a reader greenlet per
connection this saves two greenlet switches and a failed ``recv`` per read, and batches
replies produced by several connections: about 1/3 less server CPU per job (measured with
the neutral load generator; see benchmarks/README.md). Output the kernel does not take at
once waits in the connection's backlog for EPOLLOUT, so a client that never reads blocks
nobody (and is disconnected once ``--max-output-buffer`` bytes pile up for it).

With ``--tls-cert`` every connection is a ``TlsConnection`` instead: TLS cannot be read
from the raw descriptor, so each has a reader and a writer greenlet of its own and stays
out of the poll loop (which then never starts); the plain path is untouched.

Example::

    from gearoffload_server.config import ServerConfig
    from gearoffload_server.server import GearmanServer

    server = GearmanServer(ServerConfig(port=4730))
    server.serve_forever()          # or server.start() ... server.stop()
"""

from __future__ import annotations

import fcntl
import functools
import ipaddress
import logging
import os
import select
import socket
import struct
import termios
import time
from collections.abc import Callable

import gevent
from gevent import monkey, ssl
from gevent.event import Event
from gevent.server import StreamServer

from gearoffload.errors import ProtocolError
from gearoffload.protocol import RES, Decoder, PacketType, encode

from .admin import AdminProtocol
from .config import ServerConfig
from .state import AWAKE, JobServerState, Peer
from .stores import open_store
from .tls import server_context

log = logging.getLogger("gearoffload.server")

RECV_SIZE = 64 * 1024
#: The real epoll: ``monkey.patch_all()`` removes it from the ``select`` module.
_epoll = monkey.get_original("select", "epoll")
EPOLLIN, EPOLLOUT = select.EPOLLIN, select.EPOLLOUT
_READABLE = select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR
#: How long a closing connection may take to deliver what was queued for it.
CLOSE_FLUSH_TIMEOUT = 5.0
#: How long a TLS peer may take to handshake when ``--idle-timeout`` is 0.
HANDSHAKE_TIMEOUT = 10.0
#: At most one "refused (--max-connections)" log line per this many seconds.
REFUSED_LOG_INTERVAL = 10.0
#: A batch that acknowledges no submission (only deletes of ended jobs, dead-letter marks)
#: waits up to this long, or until a submission or DELETE_BATCH rows arrive, before it is
#: written: a drain then commits hundreds of deletes at once instead of a few. It widens
#: the at-least-once window (a job that ended this long before a crash may run again).
DELETE_LINGER = 0.02
DELETE_BATCH = 4096
#: The --idle-timeout sweep yields to the poll loop after this many connections.
SWEEP_CHUNK = 1000


class LoopScheduler:
    """The state's ``Scheduler`` on the gevent loop; flushes output after each timer."""

    def __init__(self, after: Callable[[], None]) -> None:
        self._loop = gevent.get_hub().loop
        self._after = after

    #: The builtin itself, not a method calling it: the state reads the clock on every
    #: submission and result (job latency, issue #6), and a Python frame costs more.
    now = staticmethod(time.time)

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
    """One accepted socket, read by the server's poll loop and written without blocking.

    ``wake()`` hands the peer's output to one non-blocking write; what the kernel does not
    take waits in ``backlog`` until the socket is writable, and newer output queues behind
    it, so order is kept. The file descriptor is read and written with ``os.read`` and
    ``os.write`` (gevent leaves it non-blocking) and never after ``closed`` is set, since
    the number may belong to another connection once the socket is closed.
    """

    __slots__ = ("server", "sock", "fd", "peer", "decoder", "backlog", "events", "closing",
                 "closed", "done", "nread", "joined", "_on_packet", "_on_line",
                 "_seen", "_quiet_since", "_partial_mark", "_partial_since", "_unsent")

    def __init__(self, server: GearmanServer, sock: socket.socket, address: tuple) -> None:
        self.server = server
        self.sock = sock
        self.fd = sock.fileno()
        host = address[0] if isinstance(address, tuple) else str(address)
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        self.peer = Peer(fd=self.fd, address=host, loopback=loopback, transport=self)
        self.decoder = Decoder(server.config.max_packet_size)
        # Bound once: the decoder hands every packet and admin line straight to these.
        self._on_packet = server.state.router(self.peer)
        self._on_line = functools.partial(server.admin.handle, self.peer)
        self.backlog: bytearray | None = None
        self.events = 0       # what the poll loop watches this socket for
        self.closing = False  # no more input is taken
        self.closed = False   # gone from the state and the poll loop
        self.done = Event()   # set once the last output is delivered (or given up)
        self.nread = 0        # bytes read so far: the only per-read cost of --idle-timeout
        self.joined = False   # known to the state (TLS: once the handshake succeeded)
        # --idle-timeout bookkeeping, touched only by GearmanServer._sweep_idle.
        self._seen = 0                        # ``nread`` at the last sweep
        self._quiet_since = time.monotonic()  # when ``nread`` last moved
        self._partial_mark = -1               # bytes consumed when a partial was first seen
        self._partial_since = 0.0
        self._unsent = 0                      # _unsent() when last found idle

    def serve(self) -> None:
        """The connection's greenlet: register with the poll loop, wait for the end."""
        self.server.state.connect(self.peer)
        self.joined = True
        self.server.register(self)
        try:
            self.done.wait()
        finally:
            self.close("")
            self.sock.close()

    def on_readable(self) -> None:
        try:
            data = os.read(self.fd, RECV_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            self.close(f"socket error: {exc}")
            return
        if not data:
            self.close("" if self.closing else "closed by peer")
            return
        self.nread += len(data)
        try:
            self.decoder.dispatch(data, self._on_packet, self._on_line)
        except ProtocolError as exc:
            self._refuse(exc)
            return
        if self.closing:
            self.close("")  # abort() has said why

    def _refuse(self, exc: ProtocolError) -> None:
        """Close after malformed input, with an ERROR first where the stream is still in
        sync (the packet could be framed)."""
        if exc.in_sync and exc.code:
            self.peer.send(_error_reply(exc, binary=exc.code != "LINE_TOO_LONG"))
        self.close(f"protocol error: {exc}")

    def on_writable(self) -> None:
        backlog = self.backlog
        if backlog is None or self.closed:
            return
        peer = self.peer
        if peer.out and peer.batch is None:  # held peers wait: see GearmanServer._release
            backlog += peer.take_output()
        try:
            sent = os.write(self.fd, backlog)
        except BlockingIOError:
            return
        except OSError as exc:
            self.abort(f"write failed: {exc}", logging.INFO)
            return
        del backlog[:sent]
        if not backlog:
            self.backlog = None
            self.server.want_write(self, False)

    def wake(self) -> None:
        """Send what the state queued for this peer, without ever blocking the caller."""
        if self.backlog is not None:
            return  # on_writable() (TLS: the writer greenlet) sends ``peer.out`` after it
        # Peer.take_output(), inlined: calling it cost 0.4 µs per job (echo A/B, measured).
        peer = self.peer
        out = peer.out
        if not out:
            return  # on_writable() already took it
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        peer.out_bytes = 0
        self._send_now(data)

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
        if self.backlog is not None:
            self.backlog += data  # older than anything still in ``out``
        else:
            self._send_now(data)

    def _send_now(self, data: bytes) -> None:
        """One non-blocking write; what the kernel does not take waits for EPOLLOUT."""
        if self.closed or not data:
            return
        try:
            sent = os.write(self.fd, data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self.abort(f"write failed: {exc}", logging.INFO)
            return
        if sent < len(data):
            self.backlog = bytearray(memoryview(data)[sent:])
            self.server.want_write(self, True)

    def close(self, reason: str) -> None:
        """Leave the poll loop and the state; deliver what is still queued (bounded)."""
        if self.closed:
            return
        peer = self.peer
        held = self._leave(reason)
        rest = bytes(self.backlog or b"")
        if peer.out and not held:
            rest += peer.take_output()
        self.backlog = None
        if rest:
            # From a greenlet of its own and bounded, so a slow reader blocks nobody.
            gevent.spawn(self._deliver_then_done, rest)
        else:
            self.done.set()

    def _leave(self, reason: str) -> bool:
        """Log why, leave the poll loop and the state, mark closed. Returns whether the
        peer's remaining output is held (it acknowledges jobs not yet durable)."""
        self._log_close(reason)
        server = self.server
        held = self.peer.batch is not None
        server.unregister(self)  # a no-op for TLS connections, which never registered
        if self.joined:
            server.state.disconnect(self.peer)
            server.flush()  # a last ERROR for this peer; requeues may have woken workers
        self.closing = True
        self.closed = True
        server.connections.discard(self)
        return held

    def _deliver_then_done(self, data: bytes) -> None:
        try:
            with gevent.Timeout(CLOSE_FLUSH_TIMEOUT, False):
                self.sock.sendall(data)
        except OSError:
            pass
        finally:
            self.done.set()

    def abort(self, reason: str, level: int = logging.WARNING) -> None:
        """Disconnect this peer (it misbehaved, or we are stopping); the poll loop then
        sees the end of its input and closes it."""
        if self.closing:
            return
        self._drop_output(reason, level)
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _log_close(self, reason: str) -> None:
        peer = self.peer
        if reason.startswith("protocol error"):
            log.warning("%s fd=%d %s", peer.address, peer.fd, reason,
                        extra={"event": "conn.protocol_error", "peer": peer.address,
                               "fd": peer.fd})
        elif reason and log.isEnabledFor(logging.DEBUG):
            log.debug("%s fd=%d %s", peer.address, peer.fd, reason,
                      extra={"event": "conn.closed", "peer": peer.address, "fd": peer.fd})

    def _drop_output(self, reason: str, level: int) -> None:
        """The start of an abort: take no more input, say why, drop what is unsent."""
        self.closing = True
        log.log(level, "%s fd=%d disconnected: %s", self.peer.address, self.peer.fd, reason,
                extra={"event": "conn.aborted", "peer": self.peer.address,
                       "fd": self.peer.fd})
        self.peer.out.clear()
        self.peer.out_bytes = 0
        self.backlog = None

    def _log_internal_error(self) -> None:
        log.exception("%s fd=%d: internal error", self.peer.address, self.fd,
                      extra={"event": "conn.internal_error", "peer": self.peer.address,
                             "fd": self.fd})


class TlsConnection(Connection):
    """One accepted TLS socket (``--tls-cert``): a greenlet of its own reads it, another
    writes it.

    TLS cannot be read with ``os.read`` on the descriptor, so these connections stay out of
    the poll loop: ``serve()`` does the handshake (bounded by ``--idle-timeout``, or
    ``HANDSHAKE_TIMEOUT``), then reads with the SSL socket's ``recv`` and hands the data to
    the same decoder and state, flushing after each read. Writes never block the caller:
    ``wake()``/``release()`` append to ``backlog`` and the writer greenlet drains it with
    ``sendall``; while it is busy, new output stays in ``peer.out``, so
    ``--max-output-buffer`` and held (group-commit) output work as for plain connections.
    """

    __slots__ = ("_reader", "_writer", "_wakeup", "_reaper")

    def __init__(self, server: GearmanServer, sock, address: tuple) -> None:
        super().__init__(server, sock, address)
        self._reader: gevent.Greenlet | None = None
        self._writer: gevent.Greenlet | None = None
        self._wakeup = Event()
        self._reaper: gevent.Greenlet | None = None

    def serve(self) -> None:
        """The connection's greenlet: handshake, then read until the end."""
        self._reader = gevent.getcurrent()
        try:
            if self._handshake():
                self.server.state.connect(self.peer)
                self.joined = True
                self._writer = gevent.spawn(self._write_loop)
                self._read_loop()
        except gevent.GreenletExit:
            pass  # abort() from another greenlet
        finally:
            self.close("")
            self.done.wait()
            self.sock.close()

    def _handshake(self) -> bool:
        config = self.server.config
        timeout = config.idle_timeout or HANDSHAKE_TIMEOUT
        try:
            with gevent.Timeout(timeout, TimeoutError(f"no TLS handshake within {timeout:g}s")):
                self.sock.do_handshake()
        except (OSError, ValueError) as exc:  # ssl.SSLError, a reset, our TimeoutError
            reason = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
            # A peer gone before a word (port probes, health checks) is not worth a warning.
            gone = isinstance(exc, (ssl.SSLEOFError, ConnectionResetError))
            log.log(logging.INFO if gone else logging.WARNING,
                    "%s fd=%d TLS handshake failed: %s", self.peer.address, self.fd, reason,
                    extra={"event": "tls.handshake_failed", "peer": self.peer.address,
                           "fd": self.fd})
            return False
        return not self.closing

    def _read_loop(self) -> None:
        recv = self.sock.recv
        dispatch = self.decoder.dispatch
        flush = self.server.flush
        while not self.closing:
            try:
                data = recv(RECV_SIZE)
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                self.close(f"socket error: {exc}")
                return
            if not data:
                self.close("closed by peer")
                return
            self.nread += len(data)
            try:
                dispatch(data, self._on_packet, self._on_line)
            except ProtocolError as exc:
                self._refuse(exc)
                return
            except Exception:  # a bug must cost one connection, not the server
                self._log_internal_error()
                self.abort("internal error")
                return
            try:
                flush()
            except Exception:
                log.exception("flush failed", extra={"event": "server.flush_failed"})

    def _write_loop(self) -> None:
        """Drain ``backlog`` (then ``peer.out``) until the connection is closed and the
        last output delivered; sets ``done``."""
        try:
            while True:
                self._wakeup.wait()
                self._wakeup.clear()
                self._drain()
                if self.closed:
                    return
        except gevent.GreenletExit:
            pass
        except (OSError, ValueError) as exc:
            if not self.closed:
                self.abort(f"write failed: {exc}", logging.INFO)
        finally:
            if self._reaper is not None:
                self._reaper.kill(block=False)
            self.done.set()

    def _drain(self) -> None:
        sendall = self.sock.sendall
        peer = self.peer
        while True:
            backlog = self.backlog
            if backlog is None:
                return
            # Held peers wait: see GearmanServer._release.
            if not self.closed and peer.out and peer.batch is None:
                backlog += peer.take_output()
            if not backlog:
                self.backlog = None
                return
            data = bytes(backlog)
            del backlog[:]
            sendall(data)  # only this greenlet blocks; release() appends meanwhile

    def on_readable(self) -> None:  # never in the poll loop
        raise AssertionError("TLS connections are read by their own greenlet")

    def on_writable(self) -> None:
        if self.backlog is not None:
            self._wakeup.set()

    def _send_now(self, data: bytes) -> None:
        if self.closing or not data:
            return
        self.backlog = bytearray(data)
        self._wakeup.set()

    def close(self, reason: str) -> None:
        """Leave the state; let the writer deliver what is queued (bounded), then end."""
        if self.closed:
            return
        peer = self.peer
        held = self._leave(reason)
        if peer.out and not held:
            if self.backlog is None:
                self.backlog = bytearray()
            self.backlog += peer.take_output()
        writer = self._writer
        if writer is None or writer.dead:
            self.done.set()
        else:
            if self.backlog is not None:  # busy, or output left to deliver
                # Bounded, so a peer that never reads holds nothing for long.
                self._reaper = gevent.spawn_later(CLOSE_FLUSH_TIMEOUT, writer.kill,
                                                  block=False)
            self._wakeup.set()
        reader = self._reader
        if reader is not None and reader is not gevent.getcurrent():
            reader.kill(block=False)

    def abort(self, reason: str, level: int = logging.WARNING) -> None:
        """Disconnect this peer at once, dropping its unsent output; never blocks."""
        if self.closing:
            return
        self._drop_output(reason, level)
        current = gevent.getcurrent()
        for greenlet in (self._writer, self._reader):
            if greenlet is not None and greenlet is not current:
                greenlet.kill(block=False)
        # The reader's ``finally`` (or its loop, when it is the caller) closes us.


def _unsent(conn: Connection) -> int:
    """Bytes queued for the peer and not taken yet: our backlog plus the kernel's send
    queue (TIOCOUTQ). Only asked of connections about to be closed as idle."""
    unsent = len(conn.backlog) if conn.backlog is not None else 0
    try:
        unsent += struct.unpack("i", fcntl.ioctl(conn.fd, termios.TIOCOUTQ, b"\0" * 4))[0]
    except OSError:
        pass
    return unsent


def _in_flight(peer: Peer) -> bool:
    """Whether an idle peer still has something going on, so that --idle-timeout must
    spare it: a job it holds as a worker, a foreground job it waits on, a worker asleep
    (or just woken) waiting for work, or replies held until its jobs are durable."""
    return bool(peer.jobs or peer.waiting or peer.sleep != AWAKE or peer.batch is not None)


def _write_now(batch) -> bool:
    """Whether a store batch must be written without DELETE_LINGER: a submission waits
    for its JOB_CREATED, or DELETE_BATCH rows have piled up."""
    return bool(batch.saves) or len(batch.deletes) + len(batch.marks) >= DELETE_BATCH


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
        self._lingering: Event | None = None  # set() ends a committer's DELETE_LINGER
        #: Background jobs replayed from the store at start-up.
        self.restored = 0
        #: Kept results of background jobs read back from the store at start-up.
        self.restored_results = 0
        self.state.on_shutdown = self._admin_shutdown
        self.admin = AdminProtocol(self.state)
        self.connections: set[Connection] = set()
        self._graceful: gevent.Greenlet | None = None
        self._shutting_down: bool | None = False  # None once the store is closed
        self._epoll = _epoll()
        self._by_fd: dict[int, Connection] = {}
        self._poller: gevent.Greenlet | None = None
        self._sweeper: gevent.Greenlet | None = None
        self._refused = 0          # connections refused since the last log line
        self._refused_log_at = 0.0
        #: Built once: every accepted socket is wrapped with it (``TlsConnection``).
        self.tls_context = server_context(
            config.tls_cert, config.tls_key, config.tls_ca,
            config.tls_require_client_cert) if config.tls else None

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
                if self.state.results is not None:
                    self.restored_results = self.state.restore_results(
                        store.load_results(time.time()))

    def handle(self, sock: socket.socket, address: tuple) -> None:
        if len(self.connections) >= self.config.max_connections:
            self._refuse()
            sock.close()
            return
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tls_context is None:
            conn = Connection(self, sock, address)
        else:
            try:
                tls_sock = self.tls_context.wrap_socket(
                    sock, server_side=True, do_handshake_on_connect=False)
            except (OSError, ValueError) as exc:  # e.g. reset before we got to it
                log.info("%s: cannot start TLS: %s", address[0], exc,
                         extra={"event": "tls.handshake_failed", "peer": address[0]})
                sock.close()
                return
            conn = TlsConnection(self, tls_sock, address)
        self.connections.add(conn)
        if self.config.idle_timeout and self._sweeper is None:
            self._sweeper = gevent.spawn(self._sweep_idle)
        conn.serve()

    def _refuse(self) -> None:
        """A connection over ``--max-connections``: counted, logged once per interval."""
        self._refused += 1
        now = time.monotonic()
        if now >= self._refused_log_at:
            log.warning("%d open connections (--max-connections): refused %d new "
                        "connection(s) (logged at most every %gs)", len(self.connections),
                        self._refused, REFUSED_LOG_INTERVAL,
                        extra={"event": "conn.refused"})
            self._refused = 0
            self._refused_log_at = now + REFUSED_LOG_INTERVAL

    def _sweep_idle(self) -> None:
        """--idle-timeout, with the semantics of Redis's ``timeout``: close a connection
        that has a packet or admin line half-sent for longer than the timeout (a byte at a
        time never completes one), or that has sent nothing for that long while nothing of
        it is in flight (see ``_in_flight``). One greenlet for all connections, waking
        every quarter of the timeout (at most 5 s); the poll loop's only cost is counting
        the bytes it reads. A sweep yields to the loop every ``SWEEP_CHUNK`` connections."""
        timeout = self.config.idle_timeout
        tick = min(max(timeout / 4, 0.05), 5.0)
        try:
            while self.connections:
                gevent.sleep(tick)
                now = time.monotonic()
                for i, conn in enumerate(list(self.connections)):
                    if i and not i % SWEEP_CHUNK:
                        gevent.sleep(0)
                    if not conn.closing and conn.joined:
                        self._check_idle(conn, now, timeout)
        finally:
            self._sweeper = None

    @staticmethod
    def _check_idle(conn: Connection, now: float, timeout: float) -> None:
        read = conn.nread
        if read != conn._seen:
            conn._seen = read
            conn._quiet_since = now
        buffered = conn.decoder.buffered
        if buffered:
            # Bytes consumed only move when a whole packet or line is taken, so the same
            # figure on two sweeps means the same partial item is still waiting.
            consumed = read - buffered
            if consumed != conn._partial_mark:
                conn._partial_mark = consumed
                conn._partial_since = now
            elif now - conn._partial_since >= timeout:
                conn.abort(f"a partial packet or line not completed within {timeout:g}s "
                           "(--idle-timeout)", logging.INFO)
            return
        conn._partial_mark = -1
        if now - conn._quiet_since >= timeout and not _in_flight(conn.peer):
            # Replies the peer is still taking count as activity too (Redis counts its
            # writes): a slow download is not idleness; output that does not move is.
            unsent = _unsent(conn)
            if unsent and unsent != conn._unsent:
                conn._unsent = unsent
                conn._quiet_since = now
                return
            what = "sent nothing" if not read else "idle"
            conn.abort(f"{what} for {timeout:g}s with nothing in flight (--idle-timeout)",
                       logging.INFO)

    # -- the poll loop ---------------------------------------------------------------------

    def register(self, conn: Connection) -> None:
        self._by_fd[conn.fd] = conn
        conn.events = EPOLLIN
        self._epoll.register(conn.fd, EPOLLIN)
        if self._poller is None:
            self._poller = gevent.spawn(self._poll_loop)

    def unregister(self, conn: Connection) -> None:
        if self._by_fd.pop(conn.fd, None) is conn:
            try:
                self._epoll.unregister(conn.fd)
            except OSError:
                pass

    def want_write(self, conn: Connection, on: bool) -> None:
        if self._by_fd.get(conn.fd) is conn:
            conn.events = (conn.events | EPOLLOUT) if on else (conn.events & ~EPOLLOUT)
            self._epoll.modify(conn.fd, conn.events)

    def _poll_loop(self) -> None:
        """Read every ready connection, then flush once: the gevent hub watches only the
        epoll descriptor, so a busy server switches greenlets once per round."""
        hub = gevent.get_hub()
        watcher = hub.loop.io(self._epoll.fileno(), 1)
        poll = self._epoll.poll
        by_fd = self._by_fd
        flush = self.flush
        while True:
            hub.wait(watcher)
            for fd, events in poll(0, 1024):
                conn = by_fd.get(fd)
                if conn is None:
                    continue
                try:
                    if events & EPOLLOUT:
                        conn.on_writable()
                    if events & _READABLE:
                        conn.on_readable()
                except Exception:  # a bug must cost one connection, not the server
                    conn._log_internal_error()
                    conn.abort("internal error")
                    conn.close("")
            try:
                flush()
            except Exception:  # keep serving everyone else
                log.exception("flush failed", extra={"event": "server.flush_failed"})

    def flush(self) -> None:
        """Send every peer its output now; drop peers that stopped reading."""
        limit = self.config.max_output_buffer
        store = self.store
        if store is None:
            for peer in self.state.take_dirty():
                conn = peer.transport
                # What waits for EPOLLOUT counts too: a slow reader that takes a little now
                # and then must not grow its backlog without bound (issue #17).
                backlog = conn.backlog
                if peer.out_bytes > limit or (
                        backlog is not None and peer.out_bytes + len(backlog) > limit):
                    conn.abort(f"more than {limit} bytes of replies unread")
                else:
                    conn.wake()
            return
        if self._committer is None:
            if store.batch.pending:
                self._committer = gevent.spawn(self._commit_loop)
        elif self._lingering is not None and _write_now(store.batch):
            self._lingering.set()
        for peer in self.state.take_dirty():
            if peer.batch is not None:
                continue  # held until its batch is durable: _release() sends it
            conn = peer.transport
            backlog = conn.backlog
            if peer.out_bytes > limit or (
                    backlog is not None and peer.out_bytes + len(backlog) > limit):
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
                if not _write_now(store.batch):
                    self._lingering = Event()
                    self._lingering.wait(DELETE_LINGER)
                    self._lingering = None
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
                              "after a restart)", exc, dropped, len(batch.deletes),
                              extra={"event": "store.write_failed"})
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
                if peer.out_bytes + len(conn.backlog or b"") > limit:
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
                log.error("queue store: final write failed: %s", exc,
                          extra={"event": "store.write_failed"})
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
        if self._sweeper is not None:
            self._sweeper.kill(block=False)
        for conn in list(self.connections):
            conn.abort("server stopping", logging.INFO)
            conn.close("")
        # Before super().stop(): once that returns, serve_forever() returns and the
        # process may exit before this greenlet runs again.
        self._close_store()
        super().stop(timeout if timeout is not None else 1.0)

    def _admin_shutdown(self, graceful: bool) -> None:
        # Let the OK reach the admin before the server goes.
        gevent.spawn_later(0.05, self.stop_graceful if graceful else self.stop)
