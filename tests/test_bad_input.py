"""Bad input never takes the server down, and never loses a queued job.

Each case: the offending connection gets an ERROR where the stream is still in sync and is
closed; the server logs one line and keeps serving everyone else.
"""

from __future__ import annotations

import socket
import struct
import time

import pytest

from conftest import RawConn, ServerProcess
from gearoffload.protocol import REQ, RES
from gearoffload.protocol import PacketType as T


@pytest.fixture
def server_with_job(our_server: ServerProcess):
    """Our server holding one queued background job that must survive every case."""
    with our_server.connect() as c:
        c.send(T.SUBMIT_JOB_BG, b"precious", b"keep-me", b"data")
        c.expect(T.JOB_CREATED)
    return our_server


def assert_still_serving(server: ServerProcess) -> None:
    with server.connect() as c:
        c.send(T.ECHO_REQ, b"alive")
        assert c.expect(T.ECHO_RES) == (b"alive",)
        assert b"precious\t1\t0\t0\n" in c.admin("status")
    assert server.proc.poll() is None


def assert_logged(server: ServerProcess, text: str) -> None:
    server.stop()
    log = server.stderr_text()
    assert text in log, log


@pytest.mark.parametrize("garbage", [
    b"\0GARBAGE\0\0\0\0\0",
    REQ + struct.pack(">II", 0, 0),
    REQ + struct.pack(">II", 43, 0),
    REQ + struct.pack(">II", 999, 4) + b"abcd",
])
def test_garbage_and_unknown_types_close_the_connection(server_with_job, garbage):
    with server_with_job.connect() as c:
        c.send_raw(garbage)
        assert c.is_closed()
    assert_still_serving(server_with_job)
    assert_logged(server_with_job, "protocol error")


def test_response_magic_gets_error_and_stays_open(server_with_job):
    with server_with_job.connect() as c:
        c.send_raw(RES + struct.pack(">II", T.ECHO_REQ, 2) + b"hi")
        assert c.expect(T.ERROR) == (b"INVALID_MAGIC", b"Request magic expected")
        c.send(T.ECHO_REQ, b"still here")
        assert c.expect(T.ECHO_RES) == (b"still here",)


def test_missing_nuls_error_then_close(server_with_job):
    with server_with_job.connect() as c:
        c.send_raw(REQ + struct.pack(">II", T.SUBMIT_JOB, 5) + b"fname"
                   + REQ + struct.pack(">II", T.ECHO_REQ, 0))
        code, text = c.expect(T.ERROR)
        assert code == b"INVALID_PACKET" and b"SUBMIT_JOB needs 3 fields" in text
        assert c.is_closed()
    assert_still_serving(server_with_job)


def test_four_gib_header_error_then_close(server_with_job):
    with server_with_job.connect() as c:
        c.send_raw(REQ + struct.pack(">II", T.SUBMIT_JOB, 0xFFFFFFFF) + b"f\0")
        code, text = c.expect(T.ERROR)
        assert code == b"ARGUMENT_TOO_LARGE" and b"exceeds the limit" in text
        assert c.is_closed()
    assert_still_serving(server_with_job)


def test_max_packet_size_is_configurable(server_factory):
    server = server_factory("gearoffload", "--max-packet-size", "4k")
    with server.connect() as c:
        c.send(T.ECHO_REQ, b"x" * 4000)
        assert c.expect(T.ECHO_RES) == (b"x" * 4000,)
        c.send(T.ECHO_REQ, b"x" * 5000)
        assert c.expect(T.ERROR)[0] == b"ARGUMENT_TOO_LARGE"
        assert c.is_closed()


def test_half_packet_then_close(server_with_job):
    packet = REQ + struct.pack(">II", T.SUBMIT_JOB_BG, 30) + b"f\0u\0" + b"x" * 26
    for cut in (3, 11, 20):
        with server_with_job.connect() as c:
            c.send_raw(packet[:cut])
    # A worker that vanished mid-packet after grabbing: its job is requeued, not lost.
    with server_with_job.connect() as w:
        w.send(T.CAN_DO, b"precious")
        w.send(T.GRAB_JOB)
        w.expect(T.JOB_ASSIGN)
        w.send_raw(REQ + struct.pack(">II", T.WORK_COMPLETE, 100) + b"H:")
    time.sleep(0.2)
    assert_still_serving(server_with_job)
    with server_with_job.connect() as c:
        assert c.admin("show jobs") == b"H:test:1\t1\t0\t1\n.\n"  # one retry, still queued


def test_megabyte_text_line_gets_err_and_close(server_with_job):
    with server_with_job.connect() as c:
        try:
            c.send_raw(b"x" * (1 << 20))
        except OSError:
            pass  # the server may close while we are still sending
        data = b""
        c.sock.settimeout(5)
        try:
            while chunk := c.sock.recv(65536):
                data += chunk
        except OSError:
            pass
        assert data.startswith(b"ERR LINE_TOO_LONG ")
    assert_still_serving(server_with_job)


def test_too_many_words_gets_err_not_a_close(server_with_job):
    with server_with_job.connect() as c:
        assert c.admin("status a b c d e").startswith(b"ERR INVALID_ARGUMENTS")
        assert c.admin("version").startswith(b"OK ")


def test_thousands_of_idle_connections(server_with_job):
    idle = []
    try:
        for _ in range(2000):
            idle.append(socket.create_connection(("127.0.0.1", server_with_job.port)))
        assert_still_serving(server_with_job)
        with server_with_job.connect() as c:
            assert c.admin("workers").count(b"\n") >= 2001
    finally:
        for s in idle:
            s.close()
    time.sleep(0.3)
    with server_with_job.connect() as c:
        assert c.admin("workers").count(b"\n") < 10


def test_client_that_never_reads_is_disconnected(server_factory):
    server = server_factory("gearoffload", "--max-output-buffer", "1M")
    with server.connect() as c:
        c.send(T.SUBMIT_JOB_BG, b"precious", b"keep-me", b"data")
        c.expect(T.JOB_CREATED)
    hog = RawConn(server.port)
    hog.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    payload = REQ + struct.pack(">II", T.ECHO_REQ, 65536) + b"e" * 65536
    closed = False
    deadline = time.monotonic() + 20
    hog.sock.settimeout(2)
    try:
        while time.monotonic() < deadline:  # never reads a reply
            hog.sock.sendall(payload * 16)
    except OSError:
        closed = True
    assert closed, "the server kept a peer that reads nothing"
    hog.close()
    assert_still_serving(server)
    assert_logged(server, "unread")
