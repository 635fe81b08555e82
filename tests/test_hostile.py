"""One hostile client must never stall, bloat or quietly cheat the server (issue #17).

Each test runs a real server process on loopback and attacks it with raw sockets, bounded
in count and in time; each failed before its fix.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time

import pytest
from codec_impls import IMPLS
from test_http import HttpServer

from conftest import RawConn
from gearoffload.admin import AdminClient
from gearoffload.errors import ProtocolError
from gearoffload.protocol import REQ
from gearoffload.protocol import PacketType as T


def _echo(conn: RawConn, data: bytes = b"hi") -> None:
    conn.send(T.ECHO_REQ, data)
    assert conn.expect(T.ECHO_RES) == (data,)


def _closed_by_server(sock: socket.socket, wait: float) -> bool:
    """True when the server closes ``sock`` within ``wait`` seconds (what arrives meanwhile
    is read and dropped)."""
    deadline = time.monotonic() + wait
    try:
        while time.monotonic() < deadline:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                if not sock.recv(1 << 16):
                    return True
            except TimeoutError:
                pass
    except OSError:
        return True
    return False


# -- item 2: a slow reader counts its whole backlog against --max-output-buffer ----------


def test_slow_reader_is_disconnected_at_the_output_limit(server_factory):
    # 8M, not less: a smaller limit is crossed by what piles up between two EPOLLOUTs
    # alone, which the server always caught; the backlog is what escaped the count.
    server = server_factory("gearoffload", "--max-output-buffer", "8M")
    reader = socket.create_connection(("127.0.0.1", server.port))
    reader.settimeout(2.0)
    payload = b"e" * 65536
    burst = (REQ + struct.pack(">II", T.ECHO_REQ, len(payload)) + payload) * 3
    sent = 0
    closed = False
    deadline = time.monotonic() + 15
    try:
        # 192 KiB of echoes asked for per 64 KiB read every 10 ms: over 10 MiB/s of
        # replies pile up server-side, taken a little at a time (so the socket keeps
        # becoming writable: the case that used to reset the count).
        while sent < 48 << 20 and time.monotonic() < deadline:
            reader.sendall(burst)
            sent += len(burst)
            time.sleep(0.01)
            try:
                if not reader.recv(65536):
                    closed = True
                    break
            except TimeoutError:
                pass
    except OSError:
        closed = True
    reader.close()
    assert closed, f"a slow reader asked for {sent >> 20} MiB of replies and was kept"
    assert sent < 32 << 20, f"disconnected only after {sent >> 20} MiB (limit 8 MiB)"
    with server.connect() as c:
        _echo(c)
    server.stop()
    assert "bytes of replies unread" in server.stderr_text()


# -- item 6: --idle-timeout cannot be defeated by a byte; in-flight peers are spared ----


def test_idle_timeout_closes_partial_and_idle_peers_but_spares_in_flight(server_factory):
    server = server_factory("gearoffload", "--idle-timeout", "1")
    started = time.monotonic()
    one_byte = RawConn(server.port)
    one_byte.send_raw(b"\0")  # the start of a binary packet, never finished
    half_line = RawConn(server.port)
    half_line.send_raw(b"stat")  # an admin line without its newline
    trickle = RawConn(server.port)
    header = REQ + struct.pack(">II", T.ECHO_REQ, 1000)
    idle = RawConn(server.port)
    _echo(idle)  # whole packets, then nothing: nothing in flight
    waiting = RawConn(server.port)
    waiting.send(T.SUBMIT_JOB, b"nobody-serves-this", b"", b"x")
    handle = waiting.expect(T.JOB_CREATED)[0]
    sleeper = RawConn(server.port)
    sleeper.send(T.CAN_DO, b"sleepy")
    sleeper.send(T.PRE_SLEEP)
    holder = RawConn(server.port)
    with server.connect() as c:
        c.send(T.SUBMIT_JOB_BG, b"held", b"", b"x")
        c.expect(T.JOB_CREATED)
    holder.send(T.CAN_DO, b"held")
    holder.send(T.GRAB_JOB)
    held = holder.expect(T.JOB_ASSIGN)[0]
    try:
        # A byte every 0.3 s of a packet that never completes: activity, but no progress.
        for n in range(12):
            try:
                trickle.send_raw(header[n:n + 1])
            except OSError:
                break
            time.sleep(0.3)
        elapsed = time.monotonic() - started
        assert elapsed < 8
        for conn in (one_byte, half_line, trickle, idle):
            assert conn.is_closed(0.5), "a peer with nothing in flight outlived the timeout"
        # Idle as long, yet with something in flight: kept, and served.
        holder.send(T.WORK_COMPLETE, held, b"done")
        with server.connect() as c:
            c.send(T.SUBMIT_JOB_BG, b"sleepy", b"", b"x")
            c.expect(T.JOB_CREATED)
        sleeper.expect(T.NOOP)
        with server.connect() as worker:
            worker.send(T.CAN_DO, b"nobody-serves-this")
            worker.send(T.GRAB_JOB)
            assert worker.expect(T.JOB_ASSIGN)[0] == handle
            worker.send(T.WORK_COMPLETE, handle, b"late")
        assert waiting.expect(T.WORK_COMPLETE) == (handle, b"late")
    finally:
        for conn in (one_byte, half_line, trickle, idle, waiting, sleeper, holder):
            conn.close()
    server.stop()
    log = server.stderr_text()
    assert "partial packet or line not completed within 1s" in log, log
    assert "idle for 1s with nothing in flight" in log, log


# -- item 1: a /metrics scrape never holds the event loop --------------------------------


def _create_functions(conn: RawConn, count: int) -> None:
    conn.send_raw(b"".join(b"create function f%d\n" % n for n in range(count)))
    replies = b""
    deadline = time.monotonic() + 20
    while replies.count(b"OK\r\n") < count:
        assert time.monotonic() < deadline, "admin create did not answer"
        conn.sock.settimeout(5)
        replies += conn.sock.recv(1 << 20)


def test_metrics_scrape_never_stalls_the_job_server():
    server = HttpServer().start()
    try:
        with server.connect() as admin:
            _create_functions(admin, 20000)
        results: dict[str, object] = {}

        def scrape() -> None:
            started = time.monotonic()
            for _ in range(2):
                results["metrics"] = server.get("/metrics")
                results["status"] = server.get("/status.json")
            results["seconds"] = time.monotonic() - started

        scraper = threading.Thread(target=scrape)
        worst = 0.0
        rounds = 0
        with server.connect() as client:
            scraper.start()
            deadline = time.monotonic() + 30
            while scraper.is_alive() and time.monotonic() < deadline:
                started = time.monotonic()
                _echo(client)
                worst = max(worst, time.monotonic() - started)
                rounds += 1
            scraper.join(30)
        assert not scraper.is_alive(), "the scrapes did not finish in 30 s"
        # Before: about 0.35 s of stall per 1,000 functions, i.e. seconds here.
        assert worst < 0.25, f"an echo waited {worst * 1000:.0f} ms during the scrapes"
        assert rounds >= 3, "the scrapes ended before the echoes could measure them"
        status, _, body = results["metrics"]
        assert status == 200
        text = body.decode()
        assert "\ngearoffload_functions 20000.0\n" in text
        assert "\ngearoffload_metrics_functions_omitted 19000.0\n" in text
        assert text.count("gearoffload_workers{") == 1000
        status, _, body = results["status"]
        snapshot = json.loads(body)
        assert snapshot["functions_total"] == 20000 and len(snapshot["functions"]) == 1000
    finally:
        server.stop()


# -- item 4: silent HTTP connections cannot take the HTTP port down -----------------------


def test_silent_http_connections_do_not_take_the_port():
    server = HttpServer().start()
    silent = []
    try:
        for _ in range(300):  # more than the old Pool(32), more than MAX_CONNECTIONS
            silent.append(socket.create_connection(("127.0.0.1", server.http_port)))
        started = time.monotonic()
        status, _, body = server.get("/healthz")
        assert (status, body) == (200, b"ok\n")
        assert time.monotonic() - started < 2.0
        # The oldest idle ones were evicted to make room.
        assert _closed_by_server(silent[0], 2.0)
    finally:
        for sock in silent:
            sock.close()
        server.stop()


# -- item 3: the function registry is bounded per connection and reclaimed --------------


def _status_names(conn: RawConn) -> set[bytes]:
    reply = conn.admin("status")
    return {line.split(b"\t")[0] for line in reply.split(b"\n")[:-2]}


def test_functions_are_capped_per_connection_and_reclaimed(server_factory):
    server = server_factory("gearoffload", "--max-functions-per-connection", "2000")
    with server.connect() as admin:
        assert admin.admin("create function kept-by-admin") == b"OK\r\n"
        with server.connect() as c:
            c.send(T.SUBMIT_JOB_BG, b"has-a-job", b"", b"x")
            c.expect(T.JOB_CREATED)
        hogs = [RawConn(server.port) for _ in range(3)]
        for n, hog in enumerate(hogs):
            hog.send_raw(b"".join(
                REQ + struct.pack(">II", T.CAN_DO, len(name)) + name
                for name in (b"hog%d-%d" % (n, i) for i in range(2000))))
            hog.send(T.CAN_DO, b"hog%d-1" % n)  # one it has already: still fine
            hog.send(T.CAN_DO, b"has-a-job")     # one more than the cap: refused
            code, text = hog.expect(T.ERROR)
            assert code == b"TOO_MANY_FUNCTIONS", (code, text)
            assert b"--max-functions-per-connection" in text
            _echo(hog)  # the connection stays usable
        assert len(_status_names(admin)) == 6002
        for hog in hogs:
            hog.close()
        # Gone with their connections: nor worker, nor job, nor admin entry.
        deadline = time.monotonic() + 5
        while (names := _status_names(admin)) != {b"kept-by-admin", b"has-a-job"}:
            assert time.monotonic() < deadline, f"{len(names)} functions left"
            time.sleep(0.05)
    assert server.proc.poll() is None


# -- item 7: no admin output injection through names or unique keys ---------------------


FORGED = b"aaa\t7\t7\t7\n.\n"


def test_names_with_admin_separators_are_refused_and_uniques_escaped(our_server):
    with our_server.connect() as c:
        for ptype, args in ((T.CAN_DO, (FORGED,)), (T.CAN_DO_TIMEOUT, (b"a\tb", b"5")),
                            (T.SUBMIT_JOB_BG, (b"x\ry", b"", b"data"))):
            c.send(ptype, *args)
            code, text = c.expect(T.ERROR)
            assert code == b"INVALID_FUNCTION_NAME" and b"tabs or line breaks" in text
        c.send(T.SUBMIT_JOB_BG, b"real", b"u\n.\nfake\t1", b"data")
        c.expect(T.JOB_CREATED)
        assert c.admin("create function a\tb").startswith(b"ERR INVALID_FUNCTION_NAME")
        assert c.admin("status") == b"real\t1\t0\t0\n.\n"
        assert c.admin("show unique jobs") == b"u\\n.\\nfake\\t1\n.\n"
    with AdminClient(our_server.address) as admin:
        assert [(s.name, s.total) for s in admin.status()] == [("real", 1)]
        assert admin.unique_jobs() == ["u\\n.\\nfake\\t1"]


def test_admin_client_is_not_fooled_by_a_server_that_does_not_escape():
    """A server that lets a name end a listing early (gearmand does): the client raises
    instead of returning forged rows and hiding real ones."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(1024)
            conn.sendall(FORGED + b"\t0\t0\t1\nreal\t1\t0\t0\n.\n")
            conn.recv(1024)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with AdminClient(f"127.0.0.1:{port}", timeout=5) as admin, \
                pytest.raises(ProtocolError, match="after the end"):
            admin.status()
    finally:
        listener.close()
        thread.join(5)


# -- item 8: an admin line of 8,192 bytes is too long ----------------------------------


def test_admin_line_of_8192_bytes_is_refused_and_closed(our_server):
    with our_server.connect() as c:  # the longest line allowed: 8,191 bytes
        assert c.admin_raw(b"x" * 8191 + b"\n").startswith(b"ERR UNKNOWN_COMMAND")
        assert c.admin_raw(b"x" * 8191 + b"\r\n").startswith(b"ERR UNKNOWN_COMMAND")
    with our_server.connect() as c:
        assert c.admin_raw(b"x" * 8192 + b"\n").startswith(b"ERR LINE_TOO_LONG ")
        assert c.is_closed(2.0)


@pytest.mark.parametrize("impl", IMPLS)
def test_decoders_refuse_a_line_one_byte_over_the_limit(impl):
    decoder = impl.Decoder(max_line_size=8)
    assert list(decoder.feed(b"12345678\n" + b"12345678\r\n")) == [b"12345678"] * 2
    with pytest.raises(ProtocolError) as info:
        list(impl.Decoder(max_line_size=8).feed(b"123456789\n"))
    assert info.value.code == "LINE_TOO_LONG" and info.value.in_sync


# -- item 10: a timeout is a failed attempt, not a requeue forever ----------------------


def test_timeout_fails_a_foreground_job_and_buries_a_background_one(our_server):
    with our_server.connect() as client, our_server.connect() as worker, \
            our_server.connect() as admin:
        worker.send(T.CAN_DO_TIMEOUT, b"slow", b"1000")
        client.send(T.SUBMIT_JOB, b"slow", b"", b"fg")
        fg = client.expect(T.JOB_CREATED)[0]
        worker.send(T.GRAB_JOB)
        assert worker.expect(T.JOB_ASSIGN)[0] == fg
        started = time.monotonic()
        assert client.expect(T.WORK_FAIL, timeout=5) == (fg,)  # not requeued forever
        assert 0.9 < time.monotonic() - started < 4
        client.send(T.SUBMIT_JOB_BG, b"slow", b"", b"bg")
        bg = client.expect(T.JOB_CREATED)[0]
        worker.send(T.GRAB_JOB)
        assert worker.expect(T.JOB_ASSIGN)[0] == bg
        # --retry-failed 0: a dead letter at the first timeout (kept, not lost).
        deadline = time.monotonic() + 5
        while bg not in admin.admin("show dead jobs"):
            assert time.monotonic() < deadline, "the timed-out background job vanished"
            time.sleep(0.1)
        assert admin.admin("show jobs") == b".\n"
        worker.send(T.GRAB_JOB)
        worker.expect(T.NO_JOB)


def test_timed_out_attempt_never_runs_beside_its_retry_on_one_worker(server_factory):
    server = server_factory("gearoffload", "--retry-failed", "1", "--retry-backoff", "0")
    with server.connect() as client, server.connect() as first, \
            server.connect() as admin:
        first.send(T.CAN_DO_TIMEOUT, b"slow", b"1000")
        client.send(T.SUBMIT_JOB_BG, b"slow", b"", b"x")
        handle = client.expect(T.JOB_CREATED)[0]
        first.send(T.GRAB_JOB)
        assert first.expect(T.JOB_ASSIGN)[0] == handle
        deadline = time.monotonic() + 5
        while admin.admin("status") != b"slow\t1\t0\t1\n.\n":  # timed out, queued again
            assert time.monotonic() < deadline, admin.admin("status")
            time.sleep(0.05)
        # The first attempt may still run on this worker: its retry is not handed to it.
        first.send(T.GRAB_JOB)
        first.expect(T.NO_JOB)
        with server.connect() as second:
            second.send(T.CAN_DO_TIMEOUT, b"slow", b"1000")
            second.send(T.GRAB_JOB)
            assert second.expect(T.JOB_ASSIGN)[0] == handle
            first.send(T.WORK_COMPLETE, handle, b"late")  # the old attempt ends: quietly
            first.expect_nothing(0.2)
            # The second attempt times out too: the cap (1 retry) is reached.
            deadline = time.monotonic() + 5
            while handle + b"\tslow\t\t2\n" not in admin.admin("show dead jobs"):
                assert time.monotonic() < deadline, admin.admin("show dead jobs")
                time.sleep(0.1)
        assert admin.admin("show jobs") == b".\n"


def test_idle_timeout_spares_a_slow_download(server_factory):
    """A peer that sends nothing but keeps taking a large reply is not idle (Redis counts
    writes as interaction too); one that stops reading it is."""
    server = server_factory("gearoffload", "--idle-timeout", "1")
    reader = socket.socket()
    reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    reader.connect(("127.0.0.1", server.port))
    reader.settimeout(2.0)
    stuck = socket.socket()
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    stuck.connect(("127.0.0.1", server.port))
    payload = b"d" * (6 << 20)
    echo = REQ + struct.pack(">II", T.ECHO_REQ, len(payload)) + payload
    try:
        reader.sendall(echo)
        stuck.sendall(echo)  # and never reads
        got = 0
        started = time.monotonic()
        while time.monotonic() - started < 3.0:  # three timeouts, reading all along
            chunk = reader.recv(128 * 1024)
            assert chunk, f"closed mid-download after {got} bytes"
            got += len(chunk)
            time.sleep(0.1)
        assert got < len(echo), "the download ended too soon to prove anything"
    finally:
        reader.close()
        stuck.close()
    server.stop()
    log = server.stderr_text()
    assert log.count("idle for 1s with nothing in flight") == 1, log  # the stuck one
