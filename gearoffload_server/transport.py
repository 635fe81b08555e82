"""Connections: one interface for plain and TLS sockets, and the poll loop that reads
the plain ones.

The shell (``server.py``) makes a connection with ``accept()`` and calls ``serve()`` in the
greenlet gevent gave the socket; after that it only ever calls the interface below, the
same for both kinds:

- ``wake()``: send what the state queued for the peer, never blocking the caller;
- ``release(n)``: send the first ``n`` queued replies of a held peer (``commit.py``);
- ``abort(reason)``: disconnect now, dropping unsent output; ``close(reason)``: leave;
- ``check_idle(now, timeout)``: one ``--idle-timeout`` sweep of this connection;
- ``backlog``, ``closing``, ``joined``: what ``flush`` and the sweep read.

A ``Connection`` owns its ``Peer`` (the protocol state) and is found from it through the
shell's ``connections`` map. A plain one is read by the ``Poller``, one greenlet for all:
it reads every socket that is ready (a chunk each), decodes every whole packet or admin
line in it, applies them to the state, and when the round is done the shell sends each
peer everything the round produced for it in one non-blocking write. Compared with a
reader greenlet per connection this saves two greenlet switches and a failed ``recv`` per
read, and batches replies produced by several connections: about 1/3 less server CPU per
job (see benchmarks/README.md). Output the kernel does not take at once waits in the
connection's backlog for EPOLLOUT, so a client that never reads blocks nobody (and is
disconnected once ``--max-output-buffer`` bytes pile up for it).

TLS cannot be read from the raw descriptor, so a ``TlsConnection`` (``--tls-cert``) has its
own reader greenlet, and a writer greenlet that drains its backlog; it flushes after each
read, as the poller does after each round. Behind the interface above the shell does not
see the difference.

Example (what ``GearmanServer.handle`` does)::

    conn = accept(server, sock, address)   # None: the TLS wrap failed (already logged)
    if conn is not None:
        conn.serve()                       # returns once the connection is over
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
from typing import TYPE_CHECKING, Protocol

import gevent
from gevent import monkey, ssl
from gevent.event import Event

from gearoffload.errors import ProtocolError
from gearoffload.protocol import RES, Decoder, PacketType, encode

from .state import AWAKE, Peer

if TYPE_CHECKING:
    from .admin import AdminProtocol
    from .settings import ServerConfig
    from .state import JobServerState

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


class Shell(Protocol):
    """What a connection uses of the server that accepted it (``server.GearmanServer``):
    the state it feeds, the admin protocol, the poll loop, the replies held for a commit,
    the connections map it leaves, and ``flush`` after it changed the state on its own."""

    config: ServerConfig
    state: JobServerState
    admin: AdminProtocol
    poller: Poller
    held: dict[Peer, object]
    connections: dict[Peer, Connection]
    tls_context: ssl.SSLContext | None

    def flush(self) -> None: ...


def accept(server: Shell, sock: socket.socket, address: tuple) -> Connection | None:
    """The connection for an accepted socket: TLS when the server has a TLS context."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if server.tls_context is None:
        return Connection(server, sock, address)
    try:
        tls_sock = server.tls_context.wrap_socket(
            sock, server_side=True, do_handshake_on_connect=False)
    except (OSError, ValueError) as exc:  # e.g. reset before we got to it
        log.info("%s: cannot start TLS: %s", address[0], exc,
                 extra={"event": "tls.handshake_failed", "peer": address[0]})
        sock.close()
        return None
    return TlsConnection(server, tls_sock, address)


class Poller:
    """The poll loop: one greenlet reads every plain connection that is ready, then calls
    ``after_round`` (the shell's ``flush``) once. Started by the first ``register``."""

    def __init__(self, after_round) -> None:
        self._epoll = _epoll()
        self._by_fd: dict[int, Connection] = {}
        self._greenlet: gevent.Greenlet | None = None
        self._after_round = after_round

    def register(self, conn: Connection) -> None:
        self._by_fd[conn.fd] = conn
        conn.events = EPOLLIN
        self._epoll.register(conn.fd, EPOLLIN)
        if self._greenlet is None:
            self._greenlet = gevent.spawn(self._loop)

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

    def _loop(self) -> None:
        """Read every ready connection, then flush once: the gevent hub watches only the
        epoll descriptor, so a busy server switches greenlets once per round."""
        hub = gevent.get_hub()
        watcher = hub.loop.io(self._epoll.fileno(), 1)
        poll = self._epoll.poll
        by_fd = self._by_fd
        flush = self._after_round
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



class Connection:
    """One accepted socket, read by the server's poll loop and written without blocking.

    ``wake()`` hands the peer's output to one non-blocking write; what the kernel does not
    take waits in ``backlog`` until the socket is writable, and newer output queues behind
    it, so order is kept. The file descriptor is read and written with ``os.read`` and
    ``os.write`` (gevent leaves it non-blocking) and never after ``closed`` is set, since
    the number may belong to another connection once the socket is closed.
    """

    __slots__ = ("server", "sock", "fd", "peer", "_held", "decoder", "backlog", "events", "closing",
                 "closed", "done", "nread", "joined", "_on_packet", "_on_line",
                 "_seen", "_quiet_since", "_partial_mark", "_partial_since", "_unsent")

    def __init__(self, server: Shell, sock: socket.socket, address: tuple) -> None:
        self.server = server
        self.sock = sock
        self.fd = sock.fileno()
        host = address[0] if isinstance(address, tuple) else str(address)
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        self.peer = Peer(fd=self.fd, address=host, loopback=loopback)
        #: Peer -> the batch its replies wait for (``commit.py``); shared, read-only here.
        self._held = server.held
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
        server = self.server
        server.state.connect(self.peer)
        self.joined = True
        server.poller.register(self)
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
        if peer.out and peer not in self._held:  # held peers wait: see commit.py
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
            self.server.poller.want_write(self, False)

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
            self.server.poller.want_write(self, True)

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
        held = self.peer in self._held
        server.poller.unregister(self)  # a no-op for TLS connections: never registered
        if self.joined:
            server.state.disconnect(self.peer)
            server.flush()  # a last ERROR for this peer; requeues may have woken workers
        self.closing = True
        self.closed = True
        if server.connections.get(self.peer) is self:
            del server.connections[self.peer]
        return held

    def _deliver_then_done(self, data: bytes) -> None:
        try:
            with gevent.Timeout(CLOSE_FLUSH_TIMEOUT, False):
                self.sock.sendall(data)
        except OSError:
            pass
        finally:
            self.done.set()

    def check_idle(self, now: float, timeout: float) -> None:
        """One sweep of ``--idle-timeout`` (the shell's ``_sweep_idle``): abort when a
        packet or line has stayed half-sent for ``timeout``, or when the peer sent nothing
        for that long while nothing of it is in flight (``in_flight``) and none of its
        replies moved."""
        read = self.nread
        if read != self._seen:
            self._seen = read
            self._quiet_since = now
        buffered = self.decoder.buffered
        if buffered:
            # Bytes consumed only move when a whole packet or line is taken, so the same
            # figure on two sweeps means the same partial item is still waiting.
            consumed = read - buffered
            if consumed != self._partial_mark:
                self._partial_mark = consumed
                self._partial_since = now
            elif now - self._partial_since >= timeout:
                self.abort(f"a partial packet or line not completed within {timeout:g}s "
                           "(--idle-timeout)", logging.INFO)
            return
        self._partial_mark = -1
        if now - self._quiet_since >= timeout and not in_flight(self):
            # Replies the peer is still taking count as activity too (Redis counts its
            # writes): a slow download is not idleness; output that does not move is.
            left = unsent(self)
            if left and left != self._unsent:
                self._unsent = left
                self._quiet_since = now
                return
            what = "sent nothing" if not read else "idle"
            self.abort(f"{what} for {timeout:g}s with nothing in flight (--idle-timeout)",
                       logging.INFO)

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

    def __init__(self, server: Shell, sock, address: tuple) -> None:
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
            # Held peers wait: see commit.py.
            if not self.closed and peer.out and peer not in self._held:
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


def unsent(conn: Connection) -> int:
    """Bytes queued for the peer and not taken yet: our backlog plus the kernel's send
    queue (TIOCOUTQ). Only asked of connections about to be closed as idle."""
    unsent = len(conn.backlog) if conn.backlog is not None else 0
    try:
        unsent += struct.unpack("i", fcntl.ioctl(conn.fd, termios.TIOCOUTQ, b"\0" * 4))[0]
    except OSError:
        pass
    return unsent


def in_flight(conn: Connection) -> bool:
    """Whether an idle peer still has something going on, so that --idle-timeout must
    spare it: a job it holds as a worker, a foreground job it waits on, a worker asleep
    (or just woken) waiting for work, or replies held until its jobs are durable."""
    peer = conn.peer
    return bool(peer.jobs or peer.waiting or peer.sleep != AWAKE or peer in conn._held)


def _error_reply(exc: ProtocolError, binary: bool) -> bytes:
    text = str(exc).encode()
    if binary:
        return encode(RES, PacketType.ERROR, (exc.code.encode(), text))
    return b"ERR %s %s\r\n" % (exc.code.encode(), text.replace(b" ", b"+"))

