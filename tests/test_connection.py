"""``gearoffload.connection.Connection`` against a real peer socket on loopback.

The peer is a plain listening socket in the test that reads only when told to, so the
kernel's buffers fill up and the writer has to wait for room (``_drain``): order, content
and ``close(flush=True)`` must hold then too, and a connection that is gone must never
touch its old descriptor number, which the next socket may have been given.
"""

from __future__ import annotations

import re
import socket as _stdlib_socket
import struct

import gevent
import pytest
from gevent import socket

from conftest import compiled_and_source, gevent_time_limit, poll_until
from gearoffload.connection import Connection, parse_address, parse_servers
from gearoffload.protocol import REQ, Decoder, PacketType, encode, encode_response

time_limit = gevent_time_limit(30)
# The compiled modules, and their .py in this process (slow: under CI=true or --run-slow).
variant = compiled_and_source(slow=True)

BIG = 8 * 1024 * 1024  # several times what loopback buffers hold


class Peer:
    """The server side of one connection: accepts, reads on demand, answers."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(4)
        self.address = self.listener.getsockname()
        self.sock: socket.socket | None = None

    def accept(self) -> socket.socket:
        self.sock, _ = self.listener.accept()
        return self.sock

    def read_until_closed(self, limit: int = 64 * 1024 * 1024) -> bytes:
        chunks = []
        total = 0
        while total < limit:
            data = self.sock.recv(1 << 20)
            if not data:
                break
            chunks.append(data)
            total += len(data)
        return b"".join(chunks)

    def read_exactly(self, size: int) -> bytes:
        buf = bytearray()
        while len(buf) < size:
            data = self.sock.recv(min(1 << 20, size - len(buf)))
            assert data, f"peer closed after {len(buf)} of {size} bytes"
            buf += data
        return bytes(buf)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.listener.close()


@pytest.fixture
def peer():
    p = Peer()
    yield p
    p.close()


def connect(peer: Peer, **kwargs) -> tuple[Connection, list, list]:
    packets: list = []
    closes: list = []
    conn = Connection(peer.address, on_packet=packets.append, on_close=closes.append,
                      **kwargs)
    acceptor = gevent.spawn(peer.accept)
    conn.connect(timeout=5)
    acceptor.join(5)
    assert peer.sock is not None
    return conn, packets, closes


def decode_requests(wire: bytes) -> list:
    return list(Decoder(magic=REQ, text=False).feed(wire))


def test_writes_larger_than_the_socket_buffers_arrive_whole_and_in_order(peer):
    conn, _, closes = connect(peer)
    big = [bytes([i]) * BIG for i in range(3)]
    conn.send(PacketType.ECHO_REQ, big[0])
    gevent.sleep(0.1)
    # The kernel took part of it: the rest waits for room, in the writer.
    assert conn._writer is not None
    for i in range(100):  # queued behind the backlog, not before it
        conn.send(PacketType.ECHO_REQ, b"small %d" % i)
    conn.send(PacketType.ECHO_REQ, big[1])
    conn.send(PacketType.ECHO_REQ, big[2])
    sizes = [12 + BIG] + [12 + len(b"small %d" % i) for i in range(100)] + [12 + BIG] * 2
    wire = peer.read_exactly(sum(sizes))
    packets = decode_requests(wire)
    assert [p.args[0] for p in packets] == [big[0]] + [b"small %d" % i for i in range(100)] \
        + big[1:]
    assert poll_until(lambda: conn._writer is None)  # drained: back to direct writes
    conn.send(PacketType.ECHO_REQ, b"after")
    assert decode_requests(peer.read_exactly(12 + 5))[0].args == (b"after",)
    assert not closes


def test_close_with_flush_delivers_everything_first(peer):
    conn, _, closes = connect(peer)
    conn.send(PacketType.ECHO_REQ, b"a" * BIG)
    conn.send(PacketType.ECHO_REQ, b"last")
    gevent.sleep(0.05)
    conn.close(ConnectionError("done"), flush=True)
    assert not conn.closed  # still writing
    wire = peer.read_until_closed()
    assert [p.args[0] for p in decode_requests(wire)] == [b"a" * BIG, b"last"]
    assert poll_until(lambda: conn.closed)
    assert len(closes) == 1 and str(closes[0]) == "done"


def test_close_with_flush_and_nothing_queued_closes_at_once(peer):
    conn, _, closes = connect(peer)
    conn.close(None, flush=True)
    assert conn.closed and closes == [None]


def test_close_while_waiting_for_room_reports_once_and_stops_writing(peer):
    conn, _, closes = connect(peer)
    conn.send(PacketType.ECHO_REQ, b"a" * BIG)
    gevent.sleep(0.05)
    assert conn._writer is not None
    writer = conn._writer
    conn.close(ConnectionError("gone"))
    assert conn.closed and [str(c) for c in closes] == ["gone"]
    assert poll_until(lambda: writer.dead)
    with pytest.raises(ConnectionError):
        conn.send(PacketType.ECHO_REQ, b"more")
    gevent.sleep(0.1)
    assert len(closes) == 1


def test_peer_reset_closes_the_connection_with_the_error(peer):
    conn, _, closes = connect(peer)
    # RST instead of FIN: the next write (or read) fails.
    peer.sock.setsockopt(_stdlib_socket.SOL_SOCKET, _stdlib_socket.SO_LINGER,
                         struct.pack("ii", 1, 0))
    peer.sock.close()
    peer.sock = None
    gevent.sleep(0.05)
    for _ in range(3):
        if conn.closed:
            break
        try:
            conn.send(PacketType.ECHO_REQ, b"x" * 100_000)
        except ConnectionError:
            break
        gevent.sleep(0.05)
    assert poll_until(lambda: conn.closed)
    assert len(closes) == 1 and isinstance(closes[0], OSError)


def test_packets_split_across_reads_and_many_per_read(peer):
    conn, packets, _ = connect(peer)
    wire = b"".join(encode_response(PacketType.ECHO_RES, b"%d" % i) for i in range(500))
    for i in range(0, len(wire), 7):  # 7-byte pieces: headers split too
        peer.sock.sendall(wire[i:i + 7])
    assert poll_until(lambda: len(packets) == 500)
    assert [p.args[0] for p in packets] == [b"%d" % i for i in range(500)]
    peer.sock.sendall(wire)  # then all 500 in one go
    assert poll_until(lambda: len(packets) == 1000)


def test_a_closed_connection_never_touches_its_old_descriptor(peer):
    """The old connection's reader was waiting when it closed; the next socket likely
    gets the same descriptor number. Only the new connection may read and write it."""
    old, old_packets, _ = connect(peer)
    old_peer_sock = peer.sock
    old.close(ConnectionError("replaced"))
    gevent.sleep(0)
    new, new_packets, new_closes = connect(peer)
    new.send(PacketType.ECHO_REQ, b"ping")
    assert decode_requests(peer.read_exactly(12 + 4))[0].args == (b"ping",)
    peer.sock.sendall(encode_response(PacketType.ECHO_RES, b"pong"))
    assert poll_until(lambda: len(new_packets) == 1)
    gevent.sleep(0.1)
    assert [p.args for p in new_packets] == [(b"pong",)] and not old_packets
    assert not new_closes and not new.closed
    old_peer_sock.close()
    new.close()


def test_response_magic_is_required(peer):
    conn, packets, closes = connect(peer)
    peer.sock.sendall(encode(REQ, PacketType.ECHO_RES, (b"x",)))  # a request, to a client
    assert poll_until(lambda: conn.closed)
    assert not packets and "magic" in str(closes[0]).lower()


# -- server addresses: strict, in one place --------------------------------------------

@pytest.mark.parametrize(("text", "address"), [
    ("127.0.0.1:4730", ("127.0.0.1", 4730)),
    (" jobs.internal ", ("jobs.internal", 4730)),
    ("h:1", ("h", 1)),
    ("h:65535", ("h", 65535)),
    ("[::1]", ("::1", 4730)),
    ("[::1]:4731", ("::1", 4731)),
    (("10.0.0.5", 4730), ("10.0.0.5", 4730)),
])
def test_good_server_addresses(text, address):
    assert parse_address(text) == address


@pytest.mark.parametrize(("text", "message"), [
    # The user's report: each was accepted, then every request was a slow 503.
    ("127.0.0.1:99999", "bad port in server address '127.0.0.1:99999': expected host:port "
                        "with a port from 1 to 65535"),
    ("http://127.0.0.1:47401", "drop the http://: a Gearman server is HOST:PORT "
                               "(127.0.0.1:47401)"),
    ("https://jobs:4730/", "drop the https://"),
    ("127.0.0.1:47401;127.0.0.1:47402", "separate servers with commas "
                                        "(127.0.0.1:47401,127.0.0.1:47402)"),
    ("a:1 b:2", "separate servers with commas (a:1,b:2)"),
    ("h:-1", "bad port"),
    ("h:0", "a port from 1 to 65535"),
    ("h:", "bad port"),
    ("nonsense:port", "bad port in server address 'nonsense:port'"),
    (":4730", "no host in server address"),
    ("::1", "put an IPv6 address in brackets, e.g. [::1]:4730"),
    ("[::1", "expected [IPv6 address]:port"),
    ("[::1]4730", "expected [IPv6 address]:port"),
    ("[::1]:70000", "a port from 1 to 65535"),
    ("user@host:4730", "bad host 'user@host'"),
    ("", "empty server address"),
    (("h", 0), "a port from 1 to 65535"),
    (("h", "4730"), "expected (host, port)"),
])
def test_bad_server_addresses_say_what_to_write_instead(text, message):
    with pytest.raises(ValueError) as refused:
        parse_address(text)
    assert message in str(refused.value)
    assert "\n" not in str(refused.value)


def test_server_lists():
    assert parse_servers("a:1, b:2,") == [("a", 1), ("b", 2)]
    assert parse_servers(["a:1", ("b", 2)]) == [("a", 1), ("b", 2)]
    assert parse_servers(("a", 1)) == [("a", 1)]
    for servers, message in [("a:1;b:2", "separate servers with commas (a:1,b:2)"),
                             ("a:1,b:99999", "a port from 1 to 65535"),
                             ("", "no servers given"), (" , ", "no servers given"),
                             ("a:1,a:1", "server a:1 is listed twice"),
                             (b"a:1", "not bytes")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            parse_servers(servers)


def test_every_entry_point_refuses_a_bad_address():
    from gearoffload import Client, Worker
    from gearoffload.admin import AdminClient

    for make in (Client, Worker, AdminClient):
        with pytest.raises(ValueError, match="drop the http://"):
            make("http://127.0.0.1:4730")
        with pytest.raises(ValueError, match="a port from 1 to 65535"):
            make("127.0.0.1:99999")


@pytest.mark.parametrize("value, message", [
    (42, "servers are 'host:port,host:port' or a list"),
    ([("h",)], "a server address is (host, port), not"),
    ([5], "a 'host:port' string, not"),
])
def test_server_lists_of_the_wrong_shape_are_refused_clearly(value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_servers(value)
