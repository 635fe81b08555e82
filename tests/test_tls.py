"""TLS and mutual TLS (issue #6): a real server process with ``--tls-*``, our client,
worker, admin client, worker pool and command, with certificates made in the test.

Certificates: a CA; a server certificate for 127.0.0.1 and localhost signed by it; a
client certificate signed by it; and a client certificate of another CA (``rogue``).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import ssl
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import gevent
import gevent.socket
import pytest

from conftest import need_module

need_module("cryptography")  # the test extra: generating certificates

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: E402

from conftest import (  # noqa: E402
    ROOT,
    ServerProcess,
    gevent_time_limit,
    poll_until,
    stop_process,
    working,
)
from gearoffload import AdminClient, Client, Worker, tls_context  # noqa: E402
from gearoffload.errors import NoServersAvailable  # noqa: E402
from gearoffload.protocol import PacketType as T  # noqa: E402
from gearoffload.protocol import encode_request  # noqa: E402

time_limit = gevent_time_limit(60)


# -- certificates -----------------------------------------------------------------------

def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(key, path: Path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))


def _cert(subject: str, key, issuer_name: x509.Name, issuer_key, *, ca: bool = False,
          server: bool = False) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(_name(subject)).issuer_name(issuer_name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(hours=1))
               .not_valid_after(now + datetime.timedelta(days=2))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                          content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False), critical=True)
        builder = builder.add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    else:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False)
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName([
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
            critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


class Certs:
    """PEM files: ``ca``, ``server``/``server_key``, ``client``/``client_key`` (signed by
    ``ca``) and ``rogue``/``rogue_key`` (signed by another CA)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        pem = serialization.Encoding.PEM
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = _cert("gearoffload test CA", ca_key, _name("gearoffload test CA"), ca_key, ca=True)
        other_key = ec.generate_private_key(ec.SECP256R1())
        other = _name("some other CA")
        self.ca = root / "ca.pem"
        self.ca.write_bytes(ca.public_bytes(pem))
        for name, issuer, issuer_key, server in (
                ("server", ca.subject, ca_key, True), ("client", ca.subject, ca_key, False),
                ("rogue", other, other_key, False)):
            key = ec.generate_private_key(ec.SECP256R1())
            cert = _cert(name, key, issuer, issuer_key, server=server)
            (root / f"{name}.pem").write_bytes(cert.public_bytes(pem))
            _write_key(key, root / f"{name}.key")
            setattr(self, name, root / f"{name}.pem")
            setattr(self, f"{name}_key", root / f"{name}.key")

    def tls(self, who: str | None = "client") -> dict:
        """``Client(tls=...)`` for a peer presenting ``who``'s certificate (None: none)."""
        options = {"ca": str(self.ca)}
        if who:
            options.update(cert=str(self.root / f"{who}.pem"),
                           key=str(self.root / f"{who}.key"))
        return options


@pytest.fixture(scope="session")
def certs(tmp_path_factory) -> Certs:
    return Certs(tmp_path_factory.mktemp("certs"))


def tls_server(certs: Certs, *args: str, mutual: bool = False) -> ServerProcess:
    flags = ["--tls-cert", str(certs.server), "--tls-key", str(certs.server_key)]
    if mutual:
        flags += ["--tls-ca", str(certs.ca), "--tls-require-client-cert"]
    return ServerProcess("gearoffload", [*flags, *args]).start()


@pytest.fixture
def servers() -> Iterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    yield started
    for proc in started:
        assert proc.stop() == 0
        assert "Traceback" not in proc.stderr_text(), proc.stderr_text()


@pytest.fixture
def tls_srv(certs, servers) -> ServerProcess:
    servers.append(tls_server(certs))
    return servers[-1]


@pytest.fixture
def mtls_srv(certs, servers) -> ServerProcess:
    servers.append(tls_server(certs, mutual=True))
    return servers[-1]


def upper_worker(server: ServerProcess, tls, **kwargs) -> Worker:
    worker = Worker(server.address, tls=tls, **kwargs)
    worker.register("upper", lambda job: job.data.upper())
    return worker


def round_trip(server: ServerProcess, tls) -> bytes:
    with Client(server.address, tls=tls, timeout=10, connect_timeout=3) as client:
        return client.submit("upper", b"ping").result()


# -- TLS ------------------------------------------------------------------------------------

def test_round_trip_foreground_background_and_coalescing(certs, tls_srv):
    ran = []

    def slow_upper(job):
        ran.append(job.unique)
        gevent.sleep(0.3)
        return job.data.upper()

    worker = Worker(tls_srv.address, tls={"ca": str(certs.ca)}, concurrency=4)
    worker.register("upper", slow_upper)
    done = gevent.event.Event()
    worker.register("bg", lambda job: done.set())
    with working(worker), Client(tls_srv.address, tls={"ca": str(certs.ca)},
                                 timeout=10) as client:
        assert client.submit("upper", b"hello").result() == b"HELLO"
        jobs = [client.submit("upper", b"once", unique="same") for _ in range(5)]
        assert [job.result() for job in jobs] == [b"ONCE"] * 5
        assert ran.count("same") == 1
        client.submit("bg", b"x", background=True)
        assert done.wait(10)


def test_tls_true_and_own_context_and_stdlib_context(certs, tls_srv):
    with working(upper_worker(tls_srv, tls_context(ca=str(certs.ca)))):
        # The stdlib's (unpatched) context works as well as ours.
        context = ssl.create_default_context(cafile=str(certs.ca))
        assert round_trip(tls_srv, context) == b"PING"
        # True: the system's CAs, which do not know our test CA.
        with pytest.raises(NoServersAvailable):
            with Client(tls_srv.address, tls=True, timeout=3, connect_timeout=1) as client:
                client.submit("upper", b"x").result()


def test_host_name_is_checked(certs, servers):
    server = tls_server(certs)
    servers.append(server)
    # The certificate names 127.0.0.1 and localhost: "localhost" works...
    with working(upper_worker(server, certs.tls(None))):
        with Client(f"localhost:{server.port}", tls=certs.tls(None), timeout=10) as client:
            assert client.submit("upper", b"ok").result() == b"OK"
    # ... and verify=False skips the check (for tests and self-signed setups only).
    with working(upper_worker(server, {"verify": False})):
        assert round_trip(server, {"verify": False}) == b"PING"


def test_admin_over_tls(certs, tls_srv):
    with working(upper_worker(tls_srv, certs.tls(None))):
        deadline = time.monotonic() + 5
        with AdminClient(tls_srv.address, tls=certs.tls(None), timeout=5) as admin:
            while time.monotonic() < deadline:
                status = {row.name: row for row in admin.status()}
                if "upper" in status:
                    break
                gevent.sleep(0.05)
            assert status["upper"].workers == 1
            assert admin.version()


def test_plain_client_against_tls_server_fails_and_server_stays_up(certs, tls_srv):
    sock = socket.create_connection(("127.0.0.1", tls_srv.port), timeout=5)
    sock.sendall(encode_request(T.ECHO_REQ, b"plain"))
    reply = b""
    try:
        while chunk := sock.recv(4096):
            reply += chunk
    except OSError:
        pass
    sock.close()
    assert b"plain" not in reply  # a TLS alert at most, never a Gearman reply
    with pytest.raises(NoServersAvailable):
        AdminClient(tls_srv.address, timeout=2).status()  # plain admin: no answer
    # Our plain Client gives up too, instead of resending to a port that drops it.
    with pytest.raises(NoServersAvailable):
        with Client(tls_srv.address, timeout=None, connect_timeout=1) as client:
            client.submit("upper", b"x")
    with working(upper_worker(tls_srv, certs.tls(None))):
        assert round_trip(tls_srv, certs.tls(None)) == b"PING"
    assert tls_srv.proc.poll() is None
    assert "TLS handshake failed" in tls_srv.stderr_text()


# -- mutual TLS -----------------------------------------------------------------------------

def test_mutual_tls_refuses_missing_and_foreign_certificates(certs, mtls_srv):
    with working(upper_worker(mtls_srv, certs.tls("client"))):
        assert round_trip(mtls_srv, certs.tls("client")) == b"PING"
        for who in (None, "rogue"):
            # Under TLS 1.3 the refusal comes after the handshake; the client's echo
            # probe turns it into a connect error, not an endless resubmission.
            started = time.monotonic()
            with pytest.raises(NoServersAvailable):
                with Client(mtls_srv.address, tls=certs.tls(who), timeout=3,
                            connect_timeout=1) as client:
                    client.submit("upper", b"x").result()
            assert time.monotonic() - started < 2.5
            with pytest.raises(NoServersAvailable, match="refuses peers without"):
                AdminClient(mtls_srv.address, tls=certs.tls(who), timeout=3).status()
            # Whoever was refused, the server goes on serving the others.
            assert round_trip(mtls_srv, certs.tls("client")) == b"PING"
    log = mtls_srv.stderr_text()
    assert log.count("TLS handshake failed") >= 4, log
    assert "Traceback" not in log


def test_ca_without_require_makes_client_certificates_optional(certs, servers):
    server = tls_server(certs, "--tls-ca", str(certs.ca))
    servers.append(server)
    with working(upper_worker(server, certs.tls("client"))):
        assert round_trip(server, certs.tls(None)) == b"PING"
        assert round_trip(server, certs.tls("client")) == b"PING"
        with pytest.raises(NoServersAvailable):  # a certificate given must still be good
            with Client(server.address, tls=certs.tls("rogue"), timeout=3,
                        connect_timeout=1) as client:
                client.submit("upper", b"x").result()


# -- peers that do not play along ------------------------------------------------------------

def test_peer_that_never_handshakes_is_dropped_without_blocking_others(certs, servers):
    server = tls_server(certs, "--idle-timeout", "1")
    servers.append(server)
    silent = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    with working(upper_worker(server, certs.tls(None))):
        started = time.monotonic()
        assert round_trip(server, certs.tls(None)) == b"PING"  # not held up by ``silent``
        assert time.monotonic() - started < 1
        silent.settimeout(5)
        assert silent.recv(100) == b""  # closed by the server after the timeout
        assert time.monotonic() - started < 4
    silent.close()
    assert "TLS handshake failed" in server.stderr_text() or \
        "sent nothing" in server.stderr_text()


def test_tls_client_that_never_reads_blocks_nobody(certs, servers):
    server = tls_server(certs, "--max-output-buffer", "1M")
    servers.append(server)
    context = ssl.create_default_context(cafile=str(certs.ca))
    raw = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    greedy = context.wrap_socket(raw, server_hostname="127.0.0.1")
    # Many large echoes, never read: the server's output for this peer piles up.
    payload = encode_request(T.ECHO_REQ, b"x" * 60000)
    greedy.settimeout(0.5)
    sent = 0
    try:
        for _ in range(400):
            greedy.sendall(payload)
            sent += 1
    except OSError:
        pass  # the server stopped reading us or dropped us: either is fine
    with working(upper_worker(server, certs.tls(None))):
        started = time.monotonic()
        assert round_trip(server, certs.tls(None)) == b"PING"
        assert time.monotonic() - started < 3
    greedy.close()
    assert server.proc.poll() is None
    assert sent > 0
    assert "bytes of replies unread" in server.stderr_text()


# -- the poll loop's TLS filter (issue 18): what reading TLS from a MemoryBIO can get wrong --

HEADER = struct.Struct(">4sII")


class BioClient:
    """A TLS client over ``ssl.MemoryBIO`` on a gevent socket, so that the test decides
    which bytes leave in which write (and a worker in this process keeps running)."""

    def __init__(self, port: int, ca: Path, timeout: float = 10.0) -> None:
        self.sock = gevent.socket.create_connection(("127.0.0.1", port), timeout=timeout)
        context = ssl.create_default_context(cafile=str(ca))
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing,
                                    server_hostname="127.0.0.1")
        self.plain = b""

    def handshake(self) -> None:
        """Handshake, leaving our last flight (TLS 1.3: the client's Finished) unsent."""
        while True:
            try:
                self.tls.do_handshake()
                return
            except ssl.SSLWantReadError:
                self.sock.sendall(self.outgoing.read())
                self._feed()

    def _feed(self) -> None:
        data = self.sock.recv(1 << 16)
        if not data:
            raise ConnectionError("closed by the server")
        self.incoming.write(data)

    def send(self, *plaintexts: bytes) -> None:
        """One TLS record per plaintext, and everything pending in one raw write."""
        for data in plaintexts:
            self.tls.write(data)
        self.sock.sendall(self.outgoing.read())

    def packet(self) -> tuple[int, bytes]:
        """The next reply packet: (type, body)."""
        while True:
            if len(self.plain) >= HEADER.size:
                magic, kind, size = HEADER.unpack_from(self.plain)
                assert magic == b"\0RES", self.plain[:20]
                if len(self.plain) >= HEADER.size + size:
                    body = self.plain[HEADER.size:HEADER.size + size]
                    self.plain = self.plain[HEADER.size + size:]
                    return kind, body
            try:
                data = self.tls.read(1 << 16)
            except ssl.SSLWantReadError:
                self._feed()
                continue
            except ssl.SSLZeroReturnError:  # the server's, after ours
                data = b""
            if not data:  # the server's close_notify (read() returns b"" before ours)
                raise EOFError("close_notify")
            self.plain += data

    def read_until_closed(self, timeout: float) -> bool:
        """Read raw bytes (never decrypted) until the server closes: True if it did."""
        self.sock.settimeout(timeout)
        try:
            while self.sock.recv(1 << 16):
                pass
        except ConnectionResetError:
            pass
        except OSError:  # timeout: still open
            return False
        return True


def new_log_lines(server: ServerProcess, seen: int) -> list[str]:
    return server.stderr_text().splitlines()[seen:]


def test_end_of_handshake_and_first_packets_in_one_write(certs, tls_srv):
    """The client's Finished and its first two records reach the server in one raw read:
    the handshake ends and both packets are decoded from the same chunk."""
    client = BioClient(tls_srv.port, certs.ca)
    client.handshake()
    assert client.tls.version() == "TLSv1.3"
    assert client.outgoing.pending  # our Finished: not sent yet
    client.send(encode_request(T.SUBMIT_JOB, b"nobody", b"u1", b"payload"),
                encode_request(T.ECHO_REQ, b"and an echo"))
    kind, handle = client.packet()
    assert kind == T.JOB_CREATED and handle.startswith(b"H:test")
    assert client.packet() == (T.ECHO_RES, b"and an echo")
    client.sock.close()


def test_tls_1_2_peer(certs, tls_srv):
    """Under TLS 1.2 the server's handshake ends by sending its Finished: it must leave."""
    context = ssl.create_default_context(cafile=str(certs.ca))
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    with working(upper_worker(tls_srv, context)):
        assert round_trip(tls_srv, context) == b"PING"
    client = BioClient(tls_srv.port, certs.ca)
    client.tls = context.wrap_bio(client.incoming, client.outgoing,
                                  server_hostname="127.0.0.1")
    client.handshake()
    assert client.tls.version() == "TLSv1.2"
    client.send(encode_request(T.ECHO_REQ, b"twelve"))
    assert client.packet() == (T.ECHO_RES, b"twelve")
    client.sock.close()


def test_5_mib_payload_through_a_worker_over_tls_both_ways(certs, tls_srv):
    """More than the kernel takes at once, in both directions: the backlog and EPOLLOUT
    path carries TLS records, in order."""
    payload = os.urandom(5 << 20)
    worker = Worker(tls_srv.address, tls=certs.tls(None), concurrency=2)
    worker.register("reverse", lambda job: job.data[::-1])
    worker.register("big", lambda job: payload)
    with working(worker):
        with Client(tls_srv.address, tls=certs.tls(None), timeout=30) as client:
            jobs = [client.submit("reverse", payload), client.submit("reverse", payload[:-1])]
            assert jobs[0].result() == payload[::-1]
            assert jobs[1].result() == payload[-2::-1]
        # Replies made while a big one still waits for EPOLLOUT are encrypted behind it.
        slow = BioClient(tls_srv.port, certs.ca, timeout=30)
        slow.handshake()
        slow.send(encode_request(T.SUBMIT_JOB, b"big", b"", b""))
        assert slow.packet()[0] == T.JOB_CREATED
        gevent.sleep(0.5)  # not reading: the result fills the kernel's buffers
        slow.send(*(encode_request(T.ECHO_REQ, b"echo %d" % n) for n in range(3)))
        gevent.sleep(0.2)
        kind, body = slow.packet()
        assert kind == T.WORK_COMPLETE and body.endswith(payload)
        assert [slow.packet() for _ in range(3)] == [
            (T.ECHO_RES, b"echo %d" % n) for n in range(3)]
        slow.sock.close()
    assert "Traceback" not in tls_srv.stderr_text()


def test_tls_client_that_never_reads_results_is_dropped_past_max_output_buffer(certs,
                                                                             servers):
    """A handshaken peer that submits jobs with big results and never reads them piles up
    output: dropped past --max-output-buffer, and others are served meanwhile."""
    server = tls_server(certs, "--max-output-buffer", "1M")
    servers.append(server)
    worker = Worker(server.address, tls=certs.tls(None), concurrency=4)
    worker.register("big", lambda job: b"x" * (512 << 10))
    worker.register("upper", lambda job: job.data.upper())
    with working(worker):
        greedy = BioClient(server.port, certs.ca)
        greedy.handshake()
        greedy.send(b"".join(encode_request(T.SUBMIT_JOB, b"big", b"", b"%d" % n)
                             for n in range(40)))  # 20 MiB of results, never read
        with Client(server.address, tls=certs.tls(None), timeout=10) as client:
            deadline = time.monotonic() + 15
            while "bytes of replies unread" not in server.stderr_text():
                assert time.monotonic() < deadline, server.stderr_text()
                started = time.monotonic()
                assert client.submit("upper", b"meanwhile").result() == b"MEANWHILE"
                assert time.monotonic() - started < 5  # served, not blocked (loaded host)
            assert client.submit("upper", b"after").result() == b"AFTER"
        assert greedy.read_until_closed(10)  # what the kernel held, then the end
    assert server.proc.poll() is None


def test_protocol_error_gets_its_error_reply_then_close_notify(certs, tls_srv):
    """What is queued when the server closes goes out encrypted, then a close_notify."""
    client = BioClient(tls_srv.port, certs.ca)
    client.handshake()
    bad = HEADER.pack(b"\0REQ", T.SUBMIT_JOB, 2) + b"fn"  # one field of three
    client.send(encode_request(T.ECHO_REQ, b"first"), bad)
    assert client.packet() == (T.ECHO_RES, b"first")
    kind, body = client.packet()
    assert kind == T.ERROR and body.startswith(b"INVALID_PACKET\0")
    with pytest.raises(EOFError, match="close_notify"):
        client.packet()
    client.sock.close()
    assert "protocol error" in tls_srv.stderr_text()
    # The client's close_notify, behind its last packet in the same write: the reply,
    # then the server's close_notify.
    leaving = BioClient(tls_srv.port, certs.ca)
    leaving.handshake()
    leaving.tls.write(encode_request(T.ECHO_REQ, b"last"))
    with pytest.raises(ssl.SSLWantReadError):
        leaving.tls.unwrap()
    leaving.sock.sendall(leaving.outgoing.read())
    assert leaving.packet() == (T.ECHO_RES, b"last")
    with pytest.raises(EOFError, match="close_notify"):
        leaving.packet()
    assert leaving.read_until_closed(5)


def test_port_probe_sending_garbage_is_one_log_line(certs, tls_srv):
    # The test's own wait for the port was a probe too (connect, close): its INFO line
    # first, so that it is not counted below.
    assert poll_until(lambda: "before the handshake ended" in tls_srv.stderr_text())
    seen = len(tls_srv.stderr_text().splitlines())
    probe = socket.create_connection(("127.0.0.1", tls_srv.port), timeout=5)
    probe.sendall(b"\x00\xffnot TLS at all\r\n" * 20)
    reply = b""
    try:
        while chunk := probe.recv(4096):
            reply += chunk
    except ConnectionResetError:
        pass
    probe.close()
    assert len(reply) < 100  # a TLS alert at most
    assert poll_until(lambda: new_log_lines(tls_srv, seen), timeout=5)
    gevent.sleep(0.3)  # nothing more comes of it
    lines = new_log_lines(tls_srv, seen)
    assert len(lines) == 1 and "TLS handshake failed" in lines[0], lines
    assert "WARNING" in lines[0] or "warning" in lines[0].lower(), lines
    with working(upper_worker(tls_srv, certs.tls(None))):
        assert round_trip(tls_srv, certs.tls(None)) == b"PING"


def _client_hello(ca: Path) -> bytes:
    context = ssl.create_default_context(cafile=str(ca))
    outgoing = ssl.MemoryBIO()
    tls = context.wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname="127.0.0.1")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def test_handshake_timeout_closes_silent_and_half_handshaken_peers(certs, servers):
    """Nothing after connecting, or half a ClientHello: closed by the handshake timer
    (--idle-timeout), one line each; a TLS peer that handshook and went quiet is the idle
    sweep's. Others are served throughout."""
    server = tls_server(certs, "--idle-timeout", "0.5")
    servers.append(server)
    silent = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    half = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    hello = _client_hello(certs.ca)
    half.sendall(hello[:len(hello) // 2])
    quiet = BioClient(server.port, certs.ca)
    quiet.handshake()
    quiet.send()  # our Finished: the server knows this peer now
    started = time.monotonic()
    with working(upper_worker(server, certs.tls(None))):
        assert round_trip(server, certs.tls(None)) == b"PING"
        for sock in (silent, half):
            sock.settimeout(5)
            assert sock.recv(100) == b""
        assert quiet.read_until_closed(5)
    assert time.monotonic() - started < 4
    silent.close()
    half.close()
    log = server.stderr_text()
    assert log.count("TLS handshake failed: no TLS handshake within 0.5s") == 2, log
    assert log.count("sent nothing for 0.5s") == 1, log


@pytest.mark.slow  # 10 s: under CI=true, or --run-slow
def test_handshake_timeout_without_idle_timeout(certs, servers):
    server = tls_server(certs, "--idle-timeout", "0")
    servers.append(server)
    silent = socket.create_connection(("127.0.0.1", server.port), timeout=15)
    started = time.monotonic()
    assert silent.recv(100) == b""
    assert 9 < time.monotonic() - started < 13
    silent.close()
    assert "no TLS handshake within 10s" in server.stderr_text()


# -- configuration ------------------------------------------------------------------------

def run_server(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gearoffload_server", "--queue", "memory",
                           "--port", "0", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=15)


@pytest.mark.parametrize("args, message", [
    (["--tls-key", "{server_key}"], "--tls-key needs --tls-cert"),
    (["--tls-ca", "{ca}"], "--tls-ca needs --tls-cert"),
    (["--tls-cert", "{server}", "--tls-key", "{server_key}", "--tls-require-client-cert"],
     "--tls-require-client-cert needs --tls-ca"),
    (["--tls-cert", "/nonexistent/cert.pem"], "--tls-cert: cannot read /nonexistent"),
    (["--tls-cert", "{server}", "--tls-key", "{client_key}"], "cannot load them"),
    (["--tls-cert", "{server}", "--tls-key", "{server_key}", "--tls-ca", "{server_key}"],
     "cannot load them"),
])
def test_bad_tls_flags_exit_2_with_one_line(certs, args, message):
    paths = {name: str(getattr(certs, name)) for name in
             ("ca", "server", "server_key", "client_key")}
    result = run_server(*[arg.format(**paths) for arg in args])
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


# -- the commands ---------------------------------------------------------------------------

POOL_TASKS = '''
import gearoffload

@gearoffload.task
def shout(job):
    return job.data.upper() + b"!"
'''


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("GEAROFFLOAD_")}
    environment.update(env or {})
    return subprocess.run([sys.executable, "-m", "gearoffload.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=20, env=environment)


def test_pool_and_command_over_mutual_tls(certs, mtls_srv, tmp_path):
    (tmp_path / "tlstasks.py").write_text(POOL_TASKS)
    environment = {k: v for k, v in os.environ.items() if not k.startswith("GEAROFFLOAD_")}
    environment["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(tmp_path)])
    # The pool takes its TLS files from the command line...
    pool = subprocess.Popen(
        [sys.executable, "-m", "gearoffload.pool", "tlstasks", "--servers", mtls_srv.address,
         "--processes", "1", "--tls-ca", str(certs.ca), "--tls-cert", str(certs.client),
         "--tls-key", str(certs.client_key)],
        cwd=tmp_path, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        flags = ["--servers", mtls_srv.address, "--tls-ca", str(certs.ca),
                 "--tls-cert", str(certs.client), "--tls-key", str(certs.client_key)]
        deadline = time.monotonic() + 15
        while True:
            status = run_cli("status", "--json", *flags)
            assert status.returncode == 0, status.stderr
            if '"shout"' in status.stdout:
                break
            assert pool.poll() is None, pool.stderr.read().decode()
            assert time.monotonic() < deadline, "the pool did not register over TLS"
            time.sleep(0.1)
        result = run_cli("submit", "shout", "hey", *flags)
        assert (result.returncode, result.stdout) == (0, "HEY!"), result.stderr
        frame = run_cli("top", "--once", *flags)  # top watches a TLS server too
        assert frame.returncode == 0, frame.stderr
        assert "shout" in frame.stdout and "DOWN" not in frame.stdout, frame.stdout
        # ... the command from the environment as well.
        env = {"GEAROFFLOAD_SERVERS": mtls_srv.address,
               "GEAROFFLOAD_TLS_CA": str(certs.ca), "GEAROFFLOAD_TLS_CERT": str(certs.client),
               "GEAROFFLOAD_TLS_KEY": str(certs.client_key)}
        result = run_cli("submit", "shout", "env", env=env)
        assert (result.returncode, result.stdout) == (0, "ENV!"), result.stderr
        # Without a client certificate the server refuses it: one line, exit 2.
        refused = run_cli("status", "--servers", mtls_srv.address, "--tls-ca", str(certs.ca))
        assert refused.returncode == 2
        assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
        refused = run_cli("submit", "shout", "x", "--servers", mtls_srv.address,
                          "--tls-ca", str(certs.ca))  # gives up, does not retry forever
        assert refused.returncode == 2
        assert "no job server reachable" in refused.stderr
    finally:
        stop_process(pool)


@pytest.mark.parametrize("args, message", [
    (["--tls-ca", "/nonexistent/ca.pem"], "/nonexistent/ca.pem: No such file"),
    (["--tls-key", "{client_key}"], "needs its certificate"),
])
def test_command_with_bad_tls_files_exits_2_with_one_line(certs, args, message):
    paths = {"client_key": str(certs.client_key)}
    result = run_cli("status", *[arg.format(**paths) for arg in args])
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_pool_with_bad_tls_files_exits_2(certs):
    result = subprocess.run([sys.executable, "-m", "gearoffload.pool", "x", "--tls-ca",
                             "/nonexistent/ca.pem"], cwd=ROOT, capture_output=True, text=True,
                            timeout=20)
    assert result.returncode == 2
    assert "/nonexistent/ca.pem: No such file" in result.stderr


# -- the offload layer ---------------------------------------------------------------------

def test_offload_config_and_flask_keys_reach_the_client(certs, mtls_srv):
    from gearoffload.offloading import OffloadConfig

    config = OffloadConfig.from_mapping({
        "GEAROFFLOAD_SERVERS": mtls_srv.address, "GEAROFFLOAD_TLS_CA": str(certs.ca),
        "GEAROFFLOAD_TLS_CERT": str(certs.client), "GEAROFFLOAD_TLS_KEY": str(certs.client_key)})
    with working(upper_worker(mtls_srv, certs.tls("client"))):
        client = config.make_client()
        try:
            assert client.submit("upper", b"web").result() == b"WEB"
        finally:
            client.close()
    with pytest.raises(ValueError, match="GEAROFFLOAD_TLS_CA/CERT/KEY: /nonexistent"):
        OffloadConfig.from_mapping({"GEAROFFLOAD_TLS_CA": "/nonexistent/ca.pem"})


def test_wsgi_middleware_takes_tls(certs):
    from gearoffload.wsgi import OffloadMiddleware

    middleware = OffloadMiddleware(lambda environ, start: [], servers="127.0.0.1:4730",
                                   tls=certs.tls("client"), secret_key="k")
    assert middleware.config.tls == certs.tls("client")
    assert middleware.offloader.client.servers == ["127.0.0.1:4730"]


def test_flask_config_keys_configure_offload_with_tls(certs, monkeypatch):
    flask = need_module("flask")
    from gearoffload.flask import GearOffload
    from gearoffload.offloading import get_config

    app = flask.Flask(__name__)
    app.config.update(GEAROFFLOAD_TLS_CA=str(certs.ca), GEAROFFLOAD_TLS_CERT=str(certs.client),
                      GEAROFFLOAD_TLS_KEY=str(certs.client_key), SECRET_KEY="k")
    GearOffload(app)
    # Inside the app's context, @offload functions use the app's settings; outside, the
    # process default is untouched (init_app changes nothing process-wide).
    with app.app_context():
        assert get_config().tls == certs.tls("client")
    assert get_config().tls != certs.tls("client")


def test_durable_background_jobs_and_many_clients_over_tls(certs, servers, tmp_path):
    """Held replies (JOB_CREATED waits for the store's commit) and many peers at once."""
    server = tls_server(certs, "--queue", f"sqlite://{tmp_path}/q.db")
    servers.append(server)
    tls = tls_context(ca=str(certs.ca))
    seen: list[bytes] = []
    worker = Worker(server.address, tls=tls, concurrency=20)
    worker.register("note", lambda job: seen.append(job.data))
    with working(worker):
        def one_client(index: int) -> list[bytes]:
            with Client(server.address, tls=tls, timeout=20) as client:
                jobs = client.submit_many([("note", b"%d-%d" % (index, n), {"background": True})
                                           for n in range(50)])
                results = [client.submit("note", b"fg-%d" % index)
                           .result()]
                return [job.handle for job in jobs] + results
        greenlets = [gevent.spawn(one_client, index) for index in range(20)]
        gevent.joinall(greenlets, raise_error=True)
        handles = [h for g in greenlets for h in g.value[:-1]]
        assert len(set(handles)) == 20 * 50
        deadline = time.monotonic() + 20
        while len(seen) < 20 * 51 and time.monotonic() < deadline:
            gevent.sleep(0.05)
        assert len(seen) == 20 * 51
    with AdminClient(server.address, tls=tls, timeout=5) as admin:
        gevent.sleep(0.2)
        assert len(admin.workers()) == 1  # only this admin connection is left


def test_workers_for_asks_over_mutual_tls(certs, mtls_srv):
    """``Client.workers_for`` asks the admin ``status`` with the client's own TLS context
    (a server that requires client certificates answers it); a client refused there
    gets None (unknown), never a wrong 0."""
    from gearoffload import census

    census.forget()
    try:
        with working(upper_worker(mtls_srv, certs.tls("client"))), \
                Client(mtls_srv.address, tls=certs.tls("client"), timeout=5) as client:
            # The worker registers as it connects: 0 until then, 1 within a second.
            assert poll_until(lambda: client.workers_for("upper", wait=3) == 1, timeout=3)
            assert client.workers_for("nobody") == 0
        census.forget()
        with Client(mtls_srv.address, tls=certs.tls("rogue"), timeout=5) as rogue:
            assert rogue.workers_for("upper", wait=3) is None
    finally:
        census.forget()
