"""Connections: one interface for plain and TLS sockets, and the poll loop that reads
them all.

The shell (``server.py``) makes a connection with ``accept()`` and calls ``serve()`` in the
greenlet gevent gave the socket; after that it only ever calls the interface below, the
same for both kinds:

- ``wake()``: send what the state queued for the peer, never blocking the caller;
- ``release(n)``: send the first ``n`` queued replies of a held peer (``commit.py``);
- ``abort(reason)``: disconnect now, dropping unsent output; ``close(reason)``: leave;
- ``check_idle(now, timeout)``: one ``--idle-timeout`` sweep of this connection;
- ``backlog``, ``closing``, ``joined``: what ``flush`` and the sweep read.

A ``Connection`` owns its ``Peer`` (the protocol state) and is found from it through the
shell's ``connections`` map. Every one is read by the ``Poller``, one greenlet for all:
it reads every socket that is ready (a chunk each), decodes every whole packet or admin
line in it, applies them to the state, and when the round is done the shell sends each
peer everything the round produced for it in one non-blocking write. Compared with a
reader greenlet per connection this saves two greenlet switches and a failed ``recv`` per
read, and batches replies produced by several connections: about 1/3 less server CPU per
job (see benchmarks/README.md). Output the kernel does not take at once waits in the
connection's backlog for EPOLLOUT, so a client that never reads blocks nobody (and is
disconnected once ``--max-output-buffer`` bytes pile up for it).

A ``TlsConnection`` (``--tls-cert``) is the same connection with TLS as a filter: the
poll loop reads its raw bytes into an ``ssl.MemoryBIO``, an ``SSLObject`` turns them into
plaintext for the same decoder, and its output is encrypted into records that take the
same non-blocking path (backlog, EPOLLOUT). It joins the state once its handshake has
succeeded, within ``--idle-timeout`` (``HANDSHAKE_TIMEOUT`` when that is 0). Behind the
interface above the shell does not see the difference, and the plain path pays nothing
for it: the TLS class overrides only where plaintext meets the socket.

Example (what ``GearmanServer.handle`` does)::

    conn = accept(server, sock, address)   # None: TLS could not start (already logged)
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
        return TlsConnection(server, sock, address)
    except (OSError, ValueError) as exc:  # ssl.SSLError: e.g. out of memory in OpenSSL
        log.info("%s: cannot start TLS: %s", address[0], exc,
                 extra={"event": "tls.handshake_failed", "peer": address[0]})
        sock.close()
        return None


class Poller:
    """The poll loop: one greenlet reads every connection that is ready, then calls
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
        # --idle-timeout bookkeeping, touched only by ``check_idle``.
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
            return  # on_writable() sends ``peer.out`` after it
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
        self._send_released(data)

    def _send_released(self, data: bytes) -> None:
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
        server.poller.unregister(self)
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
    """One accepted TLS socket (``--tls-cert``): a plain ``Connection`` with TLS as a
    filter between the descriptor and the decoder, read by the same poll loop.

    The stdlib's ``SSLObject`` over two ``MemoryBIO``: what ``os.read`` returns goes into
    ``_incoming``; the handshake, then ``read()`` until it wants more, turn it into
    plaintext for the decoder (one raw chunk may hold several records, or the end of the
    handshake and the first packets). Every write of plaintext goes through
    ``SSLObject.write`` and whatever ``_outgoing`` then holds takes the plain connection's
    non-blocking path (``backlog``, EPOLLOUT); so does what the handshake and reads
    produce (session tickets, alerts). Records leave in the order the ``SSLObject`` made
    them, which TLS requires: raw bytes queue behind ``backlog`` when there is one.

    The state learns of the peer (``joined``) once the handshake has succeeded; a timer
    bounds the handshake by ``--idle-timeout`` (``HANDSHAKE_TIMEOUT`` when that is 0),
    and the idle sweep skips connections that have not joined.
    """

    __slots__ = ("_tls", "_incoming", "_outgoing", "_timer")

    def __init__(self, server: Shell, sock: socket.socket, address: tuple) -> None:
        super().__init__(server, sock, address)
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = server.tls_context.wrap_bio(self._incoming, self._outgoing,
                                                server_side=True)
        self._timer: gevent.Greenlet | None = None

    def serve(self) -> None:
        """The connection's greenlet: register with the poll loop (the handshake happens
        there, bounded by a timer), wait for the end."""
        timeout = self.server.config.idle_timeout or HANDSHAKE_TIMEOUT
        self._timer = gevent.spawn_later(timeout, self._handshake_timeout, timeout)
        self.server.poller.register(self)
        try:
            self.done.wait()
        finally:
            self.close("")
            self.sock.close()

    def _handshake_timeout(self, timeout: float) -> None:
        self._timer = None
        if not self.joined and not self.closed:
            self._handshake_failed(f"no TLS handshake within {timeout:g}s", gone=False)

    def on_readable(self) -> None:
        try:
            data = os.read(self.fd, RECV_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            if self.joined or self.closing:
                self.close(f"socket error: {exc}")
            else:  # a reset during the handshake: a peer gone, not worth a warning
                self._handshake_failed(str(exc), gone=isinstance(exc, ConnectionResetError))
            return
        if not data:
            if self.joined or self.closing:
                self.close("" if self.closing else "closed by peer")
            else:  # port probes and health checks leave before a word
                self._handshake_failed("closed by the peer before the handshake ended",
                                       gone=True)
            return
        self._incoming.write(data)
        if not self.joined and not self._handshake():
            return
        tls_read = self._tls.read
        dispatch = self.decoder.dispatch
        while not self.closing:
            try:
                plain = tls_read(RECV_SIZE)
            except ssl.SSLWantReadError:
                break  # the rest of a record is still on its way
            except ssl.SSLZeroReturnError:  # close_notify once ours has gone: not here
                plain = b""
            except ssl.SSLError as exc:  # costs this connection only
                self.close(f"socket error: {exc}")
                return
            if not plain:  # the peer's close_notify; close() answers it
                self.close("closed by peer")
                return
            self.nread += len(plain)  # plaintext: what --idle-timeout's partial check counts
            try:
                dispatch(plain, self._on_packet, self._on_line)
            except ProtocolError as exc:
                self._refuse(exc)
                return
        if self._outgoing.pending and not self.closing:  # e.g. a KeyUpdate reply
            self._send_raw(self._outgoing.read())
        if self.closing:
            self.close("")  # abort() has said why

    def _handshake(self) -> bool:
        """Advance the handshake with what ``_incoming`` holds; True once it is done and
        the peer has joined the state."""
        try:
            self._tls.do_handshake()
        except ssl.SSLWantReadError:
            self._send_raw(self._outgoing.read())  # e.g. our ServerHello flight
            return False
        except ssl.SSLError as exc:  # not TLS, a refused certificate, ...
            reason = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
            self._handshake_failed(reason, gone=isinstance(exc, ssl.SSLEOFError))
            return False
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.kill(block=False)
        self.server.state.connect(self.peer)
        self.joined = True
        # --idle-timeout counts from here: the handshake had its own timer.
        self._quiet_since = time.monotonic()
        self._send_raw(self._outgoing.read())  # TLS 1.3 session tickets
        return True

    def _handshake_failed(self, reason: str, gone: bool) -> None:
        """Log one line and close; the alert the ``SSLObject`` wrote, if any, goes out."""
        log.log(logging.INFO if gone else logging.WARNING,
                "%s fd=%d TLS handshake failed: %s", self.peer.address, self.fd, reason,
                extra={"event": "tls.handshake_failed", "peer": self.peer.address,
                       "fd": self.fd})
        self.close("")

    def _send_now(self, data: bytes) -> None:
        """Encrypt ``data`` and send the records (``wake()`` and ``release()``)."""
        if self.closed or not data or not self.joined:
            return
        try:
            self._tls.write(data)
        except ssl.SSLError as exc:
            self.abort(f"TLS write failed: {exc}", logging.INFO)
            return
        self._send_raw(self._outgoing.read())

    def _send_raw(self, raw: bytes) -> None:
        """Send records: behind ``backlog`` when there is one (TLS needs their order)."""
        if not raw or self.closed:
            return
        if self.backlog is not None:
            self.backlog += raw  # EPOLLOUT is on already
        else:
            Connection._send_now(self, raw)

    def _send_released(self, data: bytes) -> None:
        # Encrypted first; the records then queue behind the backlog (``_send_raw``).
        self._send_now(data)

    def on_writable(self) -> None:
        backlog = self.backlog
        if backlog is None or self.closed:
            return
        peer = self.peer
        if peer.out and peer not in self._held:  # held peers wait: see commit.py
            try:
                self._tls.write(peer.take_output())
            except ssl.SSLError as exc:
                self.abort(f"TLS write failed: {exc}", logging.INFO)
                return
            backlog += self._outgoing.read()
        Connection.on_writable(self)

    def close(self, reason: str) -> None:
        """Leave the poll loop and the state; deliver what is queued, encrypted, then
        close_notify (bounded by ``CLOSE_FLUSH_TIMEOUT``). After ``abort()``, nothing."""
        if self.closed:
            return
        timer, self._timer = self._timer, None
        if timer is not None and timer is not gevent.getcurrent():
            timer.kill(block=False)
        aborted = self.closing
        peer = self.peer
        held = self._leave(reason)
        rest = self.backlog or bytearray()
        self.backlog = None
        if not aborted:
            tls = self._tls
            try:
                if self.joined:
                    if peer.out and not held:
                        tls.write(peer.take_output())
                    tls.unwrap()  # close_notify
            except ssl.SSLWantReadError:
                pass  # the peer's close_notify is not awaited
            except (ssl.SSLError, ValueError):
                pass  # a broken session: no more records, maybe an alert below
            rest += self._outgoing.read()  # or the alert of a failed handshake
        if rest:
            # From a greenlet of its own and bounded, so a slow reader blocks nobody.
            gevent.spawn(self._deliver_then_done, bytes(rest))
        else:
            self.done.set()


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

