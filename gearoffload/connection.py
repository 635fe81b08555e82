"""One TCP connection to one Gearman server, speaking binary packets.

Used by ``Client`` and ``Worker``; it knows sockets and framing, not jobs. A reader
greenlet decodes every complete packet with the shared codec and hands it to
``on_packet``; writes are queued and flushed once the greenlets that are ready in this
turn of the event loop have run, so that everything they send leaves in one write (many
greenlets submitting at once cost one syscall, not one each). ``on_close`` is called once,
with the reason, however the connection ends.

A plain TCP connection is read and written with ``os.read``/``os.write`` on its
(non-blocking) descriptor, waiting on one libev watcher per direction only when the
kernel has nothing to give or takes no more, and flushed from a loop callback: gevent's
socket methods and a writer greenlet cost about 25 µs of Python per wake-up on top of the
system call, which for one request at a time was most of a job's CPU. TLS connections use
gevent's SSL socket, read by the reader greenlet and written by a writer greenlet.

Example::

    from gearoffload.connection import Connection, parse_address
    from gearoffload.protocol import PacketType

    conn = Connection(parse_address("127.0.0.1:4730"), on_packet=print)
    conn.connect(timeout=5)
    conn.send(PacketType.ECHO_REQ, b"ping")   # prints Packet(... type=17, args=(b'ping',))
"""

from __future__ import annotations

import functools
import logging
import os
import re
import socket as _stdlib_socket
from collections.abc import Callable, Iterable

import gevent
from gevent import socket, ssl
from gevent.event import Event

from .errors import GearmanError
from .protocol import (
    DEFAULT_MAX_PACKET_SIZE,
    REQ,
    RES,
    Decoder,
    Packet,
    PacketType,
    encode,
    encode_request,
)
from .tls import tls_error_text, wrap_client

__all__ = ["DEFAULT_PORT", "Address", "Connection", "parse_address", "parse_servers"]

log = logging.getLogger("gearoffload.connection")

DEFAULT_PORT = 4730
RECV_SIZE = 256 * 1024
#: The ECHO that proves a TLS server accepted us (``Connection._confirm_tls``).
_TLS_PROBE = b"gearoffload-tls"

Address = tuple[str, int]


def _no_lines(line: bytes) -> None:
    """Never called: the decoder of a connection to a server takes no text lines."""


#: A host name or IPv4 address as the resolver takes it (IPv6 goes in brackets).
_HOST = re.compile(r"[\w.-]+")
_PORT = re.compile(r"[0-9]{1,5}")
_EXAMPLE = "e.g. 127.0.0.1:4730"


def _port(text: str, server: str) -> int:
    port = int(text) if _PORT.fullmatch(text) else 0
    if not 1 <= port <= 65535:
        raise ValueError(f"bad port in server address {server!r}: expected host:port with "
                         f"a port from 1 to 65535, {_EXAMPLE}")
    return port


def parse_address(server: str | tuple[str, int]) -> Address:
    """One server address: ``"host:port"``, ``"host"`` (port 4730), ``"[::1]:4730"``
    (IPv6 in brackets) or ``(host, port)``.

    Strict, so that a mistake is refused where it is made, with what to write instead,
    not met as a connect error at every request: the port must be 1 to 65535, and a URL
    (``http://host:port``), a ``;`` or a space inside the address is refused.
    Every entry point reads addresses with this (``Client``, ``Worker``,
    ``AdminClient``, the commands, the offload settings).

    Example::

        parse_address("10.0.0.5:4730")     # ('10.0.0.5', 4730)
        parse_address("[::1]")             # ('::1', 4730)
        parse_address("http://h:4730")     # ValueError: ... drop the http://: ...
    """
    if isinstance(server, tuple):
        if len(server) != 2:
            raise ValueError(f"a server address is (host, port), not {server!r}")
        host, port = server
        if (not isinstance(host, str) or not host.strip() or isinstance(port, bool)
                or not isinstance(port, int) or not 1 <= port <= 65535):
            raise ValueError(f"bad server address {server!r}: expected (host, port) with a "
                             f"port from 1 to 65535")
        return host.strip(), port
    if not isinstance(server, str):
        raise ValueError(f"a server address is a 'host:port' string, not "
                         f"{type(server).__name__} {server!r}")
    text = server.strip()
    if not text:
        raise ValueError(f"empty server address: expected host:port, {_EXAMPLE}")
    scheme, sep, rest = text.partition("://")
    if sep:
        bare = rest.split("/", 1)[0] or "HOST:PORT"
        raise ValueError(f"{server!r} is a URL: drop the {scheme}://: a Gearman server is "
                         f"HOST:PORT ({bare})")
    if ";" in text or any(ch.isspace() for ch in text):
        fixed = ",".join(part for part in re.split(r"[;\s]+", text) if part)
        raise ValueError(f"{server!r}: separate servers with commas ({fixed})")
    if text.startswith("["):  # [IPv6]:port
        host, closed, rest = text[1:].partition("]")
        if not closed or not host:
            raise ValueError(f"bad server address {server!r}: expected [IPv6 address]:port, "
                             f"e.g. [::1]:4730")
        if rest and not rest.startswith(":"):
            raise ValueError(f"bad server address {server!r}: expected [IPv6 address]:port, "
                             f"e.g. [::1]:4730")
        return host, _port(rest[1:], server) if rest else DEFAULT_PORT
    if text.count(":") > 1:
        raise ValueError(f"{server!r}: put an IPv6 address in brackets, e.g. [::1]:4730")
    host, sep, port = text.rpartition(":")
    if not sep:
        host = text
    if not host:
        raise ValueError(f"no host in server address {server!r}: expected host:port, "
                         f"{_EXAMPLE}")
    if not _HOST.fullmatch(host):
        raise ValueError(f"bad host {host!r} in server address {server!r}: expected "
                         f"host:port (a host name or IP address), {_EXAMPLE}")
    return host, _port(port, server) if sep else DEFAULT_PORT


def parse_servers(servers: str | tuple[str, int] | Iterable[str | tuple[str, int]]
                  ) -> list[Address]:
    """Server addresses: one, a comma-separated string, or a list of addresses (each as
    ``parse_address`` takes it); at least one, no duplicates.

    Example::

        parse_servers("10.0.0.5:4730, 10.0.0.6")   # [('10.0.0.5', 4730), ('10.0.0.6', 4730)]
        parse_servers("a:4730;b:4730")             # ValueError: ... separate servers with commas
    """
    if isinstance(servers, tuple) and len(servers) == 2 and isinstance(servers[1], int):
        items: list = [servers]
    elif isinstance(servers, str):
        items = [s for s in servers.split(",") if s.strip()]
    elif isinstance(servers, (bytes, bytearray)) or not isinstance(servers, Iterable):
        raise ValueError(f"servers are 'host:port,host:port' or a list of them, not "
                         f"{type(servers).__name__} {servers!r}")
    else:
        items = list(servers)
    addresses = [parse_address(s) for s in items]
    if not addresses:
        raise ValueError(f"no servers given: expected host:port[,host:port...], {_EXAMPLE}")
    for index, address in enumerate(addresses):
        if address in addresses[:index]:
            raise ValueError(f"server {format_address(address)} is listed twice in "
                             f"{servers!r}")
    return addresses


def format_address(address: Address) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Connection:
    """A packet connection to one server; not reusable after ``close()``.

    With ``tls`` (a context, see ``gearoffload.tls.client_context``) the socket speaks
    TLS, and the server's certificate must name the host of ``address``.

    ``on_packet(packet)`` runs in the reader greenlet for every packet, in stream order;
    it must not block for long (it delays every later packet). ``on_close(reason)`` runs
    once when the connection ends, whoever ended it.
    """

    def __init__(
        self,
        address: Address,
        on_packet: Callable[[Packet], None],
        on_close: Callable[[BaseException | None], None] | None = None,
        max_packet_size: int = DEFAULT_MAX_PACKET_SIZE,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.address = address
        self.tls = tls
        self.max_packet_size = max_packet_size
        self.name = format_address(address)
        self._on_packet = on_packet
        self._on_close = on_close
        self._sock: socket.socket | None = None
        self._fd = -1  # plain TCP only: read and written directly
        self._watchers: tuple = ()  # (readable, writable) for the descriptor
        self._out: list[bytes] = []
        self._kicked = False  # a flush of ``_out`` is on its way
        self._wakeup = Event()
        self._kick: Callable[[], object] = self._wakeup.set
        self._reader: gevent.Greenlet | None = None
        #: TLS: the writer greenlet. Plain TCP: writes are flushed from a loop callback;
        #: this greenlet exists only while the kernel takes no more (``_drain``).
        self._writer: gevent.Greenlet | None = None
        self.closed = False
        self.close_reason: BaseException | None = None
        self._close_after_flush: tuple[BaseException | None] | None = None
        #: The TCP connection was made: a ``connect()`` that failed with this set failed
        #: in the TLS handshake (the server is up), else the server was not reached.
        self.reached = False

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("open" if self._sock else "new")
        return f"<Connection {self.name} {state}>"

    def connect(self, timeout: float | None = 5.0) -> None:
        """Open the socket (raises ``OSError`` on failure) and start reading."""
        sock = socket.create_connection(self.address, timeout=timeout)
        self.reached = True
        try:
            sock.setsockopt(_stdlib_socket.IPPROTO_TCP, _stdlib_socket.TCP_NODELAY, 1)
            # A peer that vanished without a FIN (power loss, partition) is noticed
            # eventually instead of never.
            sock.setsockopt(_stdlib_socket.SOL_SOCKET, _stdlib_socket.SO_KEEPALIVE, 1)
            if self.tls is not None:  # bounded by the connect timeout, like connecting
                sock = wrap_client(self.tls, sock, self.address[0])
                self._confirm_tls(sock)
            sock.settimeout(None)
        except OSError:
            sock.close()
            raise
        if self.closed:  # close() was called while we were connecting
            sock.close()
            raise ConnectionError(f"connection to {self.name} closed while connecting")
        self._sock = sock
        if self.tls is None:
            self._fd = sock.fileno()  # non-blocking: gevent made it so
            loop = gevent.get_hub().loop
            self._watchers = (loop.io(self._fd, 1), loop.io(self._fd, 2))
            # A callback, not a greenlet: it runs after every greenlet that is ready in
            # this turn of the loop, so their packets still leave in one write.
            self._kick = functools.partial(loop.run_callback, self._flush)
        else:
            self._writer = gevent.spawn(self._write_loop)
        self._reader = gevent.spawn(self._read_loop)
        if self._out:  # queued before we were connected
            self._kicked = True
            self._kick()

    def _confirm_tls(self, sock: ssl.SSLSocket) -> None:
        """One ECHO round trip before the connection counts as open.

        Under TLS 1.3 the client's handshake ends before the server has checked our
        certificate: a server that requires one (``--tls-require-client-cert``) refuses
        it only at our first read. Without this, a refused client would "connect", send,
        lose the connection and send again forever; with it, the refusal is a connect
        error (logged with its reason, retried with back-off like an unreachable server).
        """
        try:
            sock.sendall(encode_request(PacketType.ECHO_REQ, _TLS_PROBE))
            decoder = Decoder(self.max_packet_size, text=False, magic=RES)
            while True:
                data = sock.recv(RECV_SIZE)
                if not data:
                    raise ConnectionError("closed during the TLS handshake")
                for packet in decoder.feed(data):
                    if packet.type == PacketType.ECHO_RES and packet.args == (_TLS_PROBE,):
                        return
                    raise ConnectionError(f"unexpected {packet.name} after the TLS handshake")
        except (OSError, GearmanError) as exc:  # connect() closes the socket
            raise ConnectionRefusedError(
                f"{self.name} refused the TLS connection: {tls_error_text(exc)}") from None

    def send(self, ptype: int, *args: bytes) -> None:
        """Queue one request packet; it leaves with everything else queued this turn."""
        self.send_raw(encode(REQ, ptype, args))  # encode_request() is a frame more

    def send_raw(self, data: bytes) -> None:
        """Queue already-encoded packets."""
        if self.closed:
            raise ConnectionError(f"connection to {self.name} is closed")
        self._out.append(data)
        if not self._kicked:
            self._kicked = True
            self._kick()

    def close(self, reason: BaseException | None = None, flush: bool = False) -> None:
        """Close the socket (idempotent) and report ``reason`` to ``on_close`` once.

        With ``flush``, what is queued is sent first (the writer closes afterwards), so
        that e.g. a worker's last WORK_COMPLETE is not lost when it disconnects.
        """
        if self.closed:
            return
        if flush and self._output_on_its_way():
            self._close_after_flush = (reason,)  # the flush or the writer closes then
            return
        self.closed = True
        self.close_reason = reason
        self._out.clear()
        self._wakeup.set()
        sock, self._sock = self._sock, None
        watchers, self._watchers = self._watchers, ()
        if sock is not None:
            try:
                sock.shutdown(_stdlib_socket.SHUT_RDWR)
            except OSError:
                pass
            # Our watchers leave the loop before the descriptor is closed (and its number
            # reused), as gevent does for its own socket's watchers.
            gevent.get_hub().cancel_waits_close_and_then(watchers, socket.cancel_wait_ex,
                                                         sock.close)
        current = gevent.getcurrent()
        for greenlet in (self._reader, self._writer):
            if greenlet is not None and greenlet is not current:
                greenlet.kill(block=False)
        if self._on_close is not None:
            try:
                self._on_close(reason)
            except Exception:  # a broken callback must not break whoever closed us
                log.exception("on_close callback of %s failed", self.name)

    def _read_loop(self) -> None:
        """The reader greenlet: hand every packet to ``on_packet``; close when the
        connection ends, with the reason."""
        decoder = Decoder(self.max_packet_size, text=False, magic=RES)
        try:
            reason = self._read_fd(decoder) if self._fd >= 0 else self._read_tls(decoder)
        except gevent.GreenletExit:
            return
        except (OSError, GearmanError) as exc:
            reason = exc
        except Exception as exc:  # a bug in on_packet: log it, but do not hang the peer
            log.exception("handling a packet from %s failed", self.name)
            reason = exc
        if reason is not None:
            self.close(reason)

    def _read_fd(self, decoder: Decoder) -> BaseException | None:
        """Plain TCP: read the descriptor until the server closes (the reason) or we do
        (None: on_packet may have closed us, and then the descriptor is not ours)."""
        fd = self._fd
        readable = self._watchers[0]
        wait = gevent.get_hub().wait
        on_packet = self._on_packet
        while not self.closed:
            try:
                data = os.read(fd, RECV_SIZE)
            except BlockingIOError:
                wait(readable)
                continue
            if not data:
                return ConnectionError(f"{self.name} closed the connection")
            decoder.dispatch(data, on_packet, _no_lines)
        return None

    def _read_tls(self, decoder: Decoder) -> BaseException | None:
        """TLS: read the SSL socket until the server closes."""
        recv = self._sock.recv
        on_packet = self._on_packet
        while True:
            data = recv(RECV_SIZE)
            if not data:
                return ConnectionError(f"{self.name} closed the connection")
            decoder.dispatch(data, on_packet, _no_lines)

    def _output_on_its_way(self) -> bool:
        """Whether queued output will still be written (``close(flush=True)`` waits)."""
        if self._fd >= 0:  # a scheduled _flush() or the running _drain() writes it
            return bool(self._out) or self._writer is not None
        return bool(self._out) and self._writer is not None and not self._writer.dead

    def _flush(self) -> None:
        """Plain TCP, a loop callback: write everything queued in one non-blocking write.
        What the kernel does not take goes to ``_drain``, and newer output queues
        behind it. Runs in the hub, so it never blocks and never calls ``close()``
        itself (``on_close`` may reconnect, which needs a greenlet)."""
        self._kicked = False
        out = self._out
        if self.closed or self._writer is not None or not out:
            return  # closed, or _drain() writes ``out`` after its backlog
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        try:
            sent = os.write(self._fd, data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            gevent.spawn(self.close, exc)
            return
        if sent < len(data):
            self._writer = gevent.spawn(self._drain, memoryview(data)[sent:])
        elif self._close_after_flush is not None:
            gevent.spawn(self.close, self._close_after_flush[0])

    def _drain(self, rest: memoryview) -> None:
        """Plain TCP, after a partial write: wait for room, write the rest, then what was
        queued meanwhile; ends when everything is written."""
        writable = self._watchers[1]
        wait = gevent.get_hub().wait
        out = self._out
        try:
            while rest:
                wait(writable)
                if self.closed:
                    return
                try:
                    rest = rest[os.write(self._fd, rest):]
                except BlockingIOError:
                    pass
                if not rest and out:
                    rest = memoryview(out[0] if len(out) == 1 else b"".join(out))
                    out.clear()
        except gevent.GreenletExit:
            return
        except OSError as exc:
            self.close(exc)
            return
        finally:
            self._writer = None
        if self._close_after_flush is not None:
            self.close(self._close_after_flush[0])

    def _write_loop(self) -> None:
        """TLS: write what is queued, with the SSL socket's ``sendall``."""
        wakeup = self._wakeup
        out = self._out
        try:
            while not self.closed:
                wakeup.wait()
                wakeup.clear()
                self._kicked = False
                while out and self._sock is not None:
                    data = out[0] if len(out) == 1 else b"".join(out)
                    out.clear()
                    self._sock.sendall(data)
                if self._close_after_flush is not None:
                    self.close(self._close_after_flush[0])
                    return
        except gevent.GreenletExit:
            return
        except OSError as exc:
            self.close(exc)
