"""gearoffload.admin.AdminClient against real servers: each ``server`` test runs against our
server and Debian's gearmand; a few edge cases (silence, a dropped connection, replies
trickling in byte by byte) use a scripted peer on a loopback socket.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import gevent
import gevent.socket
import pytest
from wire_helpers import grab, submit, sync, worker

from conftest import ServerProcess, gevent_time_limit
from gearoffload.admin import (
    AdminClient,
    AdminError,
    FunctionStatus,
    JobInfo,
    PriorityStatus,
)
from gearoffload.errors import JobTimeout, NoServersAvailable, ProtocolError, ServerError
from gearoffload.protocol import PacketType as T

TEST_TIME_LIMIT = 20


time_limit = gevent_time_limit(TEST_TIME_LIMIT)


@pytest.fixture
def admin(server) -> Iterator[AdminClient]:
    with AdminClient(server.address, timeout=5) as client:
        yield client


def by_name(rows):
    return {row.name: row for row in rows}


def test_values_version_getpid_verbose(server, admin):
    assert admin.version()
    assert admin.getpid() == server.proc.pid
    assert admin.verbose() in ("FATAL", "ALERT", "CRITICAL", "ERROR", "WARNING", "NOTICE",
                               "INFO", "DEBUG")


def test_status_priority_status_jobs_and_unique_jobs(server, admin):
    with server.connect() as client, worker(server, b"adm_a", client_id=b"w-1") as w:
        high = submit(client, b"adm_a", b"u-high", b"1", T.SUBMIT_JOB_HIGH_BG)
        submit(client, b"adm_a", b"u-low", b"2", T.SUBMIT_JOB_LOW_BG)
        fg = submit(client, b"adm_a", b"", b"3")
        submit(client, b"adm_b", b"u-b", b"4", T.SUBMIT_JOB_BG)
        assert grab(w, T.GRAB_JOB)[0] == high  # high priority first: one job running
        sync(w)

        status = by_name(admin.status())
        assert status["adm_a"] == FunctionStatus("adm_a", total=3, running=1, workers=1)
        assert status["adm_a"].queued == 2
        assert status["adm_b"] == FunctionStatus("adm_b", 1, 0, 0)
        assert [row.name for row in admin.status()] == sorted(status)

        prio = by_name(admin.priority_status())
        assert prio["adm_a"] == PriorityStatus("adm_a", high=0, normal=1, low=1, workers=1)
        assert prio["adm_b"] == PriorityStatus("adm_b", 0, 1, 0, 0)

        jobs = {job.handle: job for job in admin.jobs()}
        assert len(jobs) == 4
        assert jobs[high.decode()] == JobInfo(high.decode(), 0, False, True)
        assert jobs[fg.decode()].persisted is False
        assert not any(job.abandoned for job in jobs.values())

        assert sorted(admin.unique_jobs()) == ["", "u-b", "u-high", "u-low"]


def test_workers_lists_every_connection(server, admin):
    with worker(server, b"adm_w1", b"adm_w2", client_id=b"worker-7"), server.connect() as c:
        sync(c)
        rows = admin.workers()
        mine = [row for row in rows if row.client_id == "worker-7"]
        assert len(mine) == 1
        assert mine[0].address == "127.0.0.1" and mine[0].fd > 0
        assert mine[0].functions == ("adm_w2", "adm_w1")  # most recent first
        plain = [row for row in rows if row.client_id is None]
        assert len(plain) >= 2  # the raw client and this admin connection
        assert all(row.functions == () for row in plain)


def test_cancel_job(server, admin):
    with server.connect() as client:
        handle = submit(client, b"adm_cancel", b"", b"x")
        admin.cancel_job(handle.decode())
        assert client.expect(T.WORK_FAIL)[0] == handle
        with pytest.raises(AdminError) as info:
            admin.cancel_job("H:nowhere:999999")
    assert info.value.code == "UNKNOWN_JOB"
    assert isinstance(info.value, ServerError)


def test_create_and_drop_function(server, admin):
    admin.create_function("adm_created")
    assert by_name(admin.status())["adm_created"] == FunctionStatus("adm_created", 0, 0, 0)
    admin.drop_function("adm_created")
    assert "adm_created" not in by_name(admin.status())

    with pytest.raises(AdminError) as info:
        admin.drop_function("adm_never_seen")
    assert (info.value.code, info.value.text) == ("", "function not found")
    assert "function not found" in str(info.value)

    with worker(server, b"adm_busy"):
        with pytest.raises(AdminError) as info:
            admin.drop_function("adm_busy")
    assert "still connected workers" in info.value.text


def test_maxqueue_limits_and_unlimits(server, admin):
    admin.create_function("adm_q")
    admin.maxqueue("adm_q", 1)
    with server.connect() as client:
        submit(client, b"adm_q", b"", b"1", T.SUBMIT_JOB_BG)
        client.send(T.SUBMIT_JOB_BG, b"adm_q", b"", b"2")
        assert client.expect(T.ERROR)[0] == b"QUEUE_ERROR"
        admin.maxqueue("adm_q")  # unlimited again
        submit(client, b"adm_q", b"", b"3", T.SUBMIT_JOB_BG)
        admin.maxqueue("adm_q", 5, 1, 0)
        client.send(T.SUBMIT_JOB_BG, b"adm_q", b"", b"4")
        assert client.expect(T.ERROR)[0] == b"QUEUE_ERROR"
        submit(client, b"adm_q", b"", b"5", T.SUBMIT_JOB_HIGH_BG)
    assert by_name(admin.status())["adm_q"].total == 3


def test_error_reply_code_and_text_with_plus_decoded(server, admin):
    # Not reachable through the typed API: send an unknown command the way it would.
    with pytest.raises(AdminError) as info:
        admin._value("frobnicate")
    assert info.value.code == "UNKNOWN_COMMAND"
    assert info.value.text == "Unknown server commandfrobnicate"
    assert admin.version()  # the connection is still in step


def test_many_greenlets_share_one_connection(server, admin):
    admin.create_function("adm_g")
    greenlets = [gevent.spawn(admin.status) if i % 2 else gevent.spawn(admin.getpid)
                 for i in range(40)]
    gevent.joinall(greenlets, timeout=10, raise_error=True)
    for i, g in enumerate(greenlets):
        if i % 2:
            assert "adm_g" in by_name(g.value)
        else:
            assert g.value == server.proc.pid


def test_bad_arguments_are_refused_before_sending(admin):
    for bad in ("two words", "", "tab\there", "line\n"):
        with pytest.raises(ValueError):
            admin.create_function(bad)
    with pytest.raises(ValueError):
        admin.maxqueue("f", 1, 2)
    with pytest.raises(TypeError):
        admin.maxqueue("f", "1")  # type: ignore[arg-type]


def test_an_over_long_line_is_refused_before_sending_and_the_next_call_works(our_server):
    with AdminClient(our_server.address, timeout=5) as admin:
        with pytest.raises(ValueError, match="8191 bytes"):
            admin.find_job("x" * 9000)
        assert admin.find_job("y") == []  # the same client, the same connection


def test_after_line_too_long_from_the_server_the_next_call_reconnects(our_server,
                                                                     monkeypatch):
    """A server with a smaller line limit than the client's answers ERR LINE_TOO_LONG
    and closes the connection (ours does, past 8191 bytes): the client drops it too."""
    import gearoffload.admin

    monkeypatch.setattr(gearoffload.admin, "MAX_LINE_SIZE", 1 << 20)
    with AdminClient(our_server.address, timeout=5) as client:
        with pytest.raises(AdminError) as caught:
            client.find_job("x" * 9000)
        assert caught.value.code == "LINE_TOO_LONG"
        assert client.find_job("y") == []  # was: NoServersAvailable, connection reset
        assert client.find_job("z") == []


def test_find_job_without_a_key_is_a_usage_error(our_server):
    with our_server.connect() as conn:
        for line in ("find job", "find", "find job a b"):
            reply = conn.admin(line)
            assert reply.startswith(b"ERR INVALID_ARGUMENTS Usage:+find+job+"), (line, reply)
        assert conn.admin("find jobs x").startswith(b"ERR UNKNOWN_COMMAND")


def test_reconnects_after_the_server_restarts():
    first = ServerProcess("gearoffload").start()
    second = ServerProcess("gearoffload")
    second.port = first.port
    try:
        with AdminClient(first.address, timeout=3) as admin:
            assert admin.getpid() == first.proc.pid
            first.stop()
            with pytest.raises(NoServersAvailable):
                admin.getpid()
            with pytest.raises(NoServersAvailable, match="cannot connect"):
                admin.getpid()
            second.start()
            assert admin.getpid() == second.proc.pid
    finally:
        first.stop()
        second.stop()


def test_no_server_is_no_servers_available():
    port = _unused_port()
    started = time.monotonic()
    with pytest.raises(NoServersAvailable, match=f"cannot connect to 127.0.0.1:{port}"):
        AdminClient(f"127.0.0.1:{port}", timeout=2).status()
    assert time.monotonic() - started < 2


# -- a scripted peer: what no real server does on purpose -------------------------------------


def _unused_port() -> int:
    with gevent.socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def fake() -> Iterator[gevent.socket.socket]:
    listener = gevent.socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    yield listener
    listener.close()


def _serve_once(listener, reply: bytes, chunk: int = 0, then_close: bool = True):
    def run() -> bytes:
        conn, _ = listener.accept()
        with conn:
            request = conn.recv(1024)
            if chunk:
                for i in range(0, len(reply), chunk):
                    conn.sendall(reply[i:i + chunk])
                    gevent.sleep(0.001)
            else:
                conn.sendall(reply)
            if not then_close:
                gevent.sleep(5)
            return request

    return gevent.spawn(run)


def _address(listener) -> str:
    return f"127.0.0.1:{listener.getsockname()[1]}"


def test_reply_trickling_in_byte_by_byte(fake):
    peer = _serve_once(fake, b"f1\t3\t1\t2\r\nf0\t0\t0\t0\n.\n", chunk=1)
    rows = AdminClient(_address(fake), timeout=3).status()
    assert rows == [FunctionStatus("f0", 0, 0, 0), FunctionStatus("f1", 3, 1, 2)]
    assert peer.get(timeout=3) == b"status\r\n"  # sent with \r\n, as gearadmin does


def test_silence_is_a_timeout(fake):
    _serve_once(fake, b"f\t1\t0\t0\n", then_close=False)  # never ends the listing
    admin = AdminClient(_address(fake), timeout=0.3)
    started = time.monotonic()
    with pytest.raises(JobTimeout, match="no reply to 'status'"):
        admin.status()
    assert 0.25 < time.monotonic() - started < 2
    assert admin._sock is None  # out of step: closed, the next call reconnects


def test_connection_dropped_mid_listing(fake):
    _serve_once(fake, b"f\t1\t0\t0\n")
    with pytest.raises(NoServersAvailable, match="closed the connection"):
        AdminClient(_address(fake), timeout=3).status()


def test_binary_packet_or_garbage_is_a_protocol_error(fake):
    _serve_once(fake, b"\0RES\0\0\0\x06\0\0\0\0")
    with pytest.raises(ProtocolError):
        AdminClient(_address(fake), timeout=3).version()
    _serve_once(fake, b"hello\n")
    with pytest.raises(ProtocolError, match="unexpected reply"):
        AdminClient(_address(fake), timeout=3).version()
    _serve_once(fake, b"only\tthree\tfields\n.\n")
    with pytest.raises(ProtocolError):
        AdminClient(_address(fake), timeout=3).status()


def test_function_named_like_an_error_is_still_a_row(fake):
    _serve_once(fake, b"ERR x\t1\t0\t0\n.\n")
    assert AdminClient(_address(fake), timeout=3).status() == [FunctionStatus("ERR x", 1, 0, 0)]


def test_error_parsing():
    err = AdminError.from_line("ERR INVALID_ARGUMENTS An+incomplete+set", "maxqueue")
    assert (err.code, err.text, err.command) == ("INVALID_ARGUMENTS", "An incomplete set",
                                                 "maxqueue")
    assert str(err) == "INVALID_ARGUMENTS: An incomplete set (admin command 'maxqueue')"
    assert AdminError.from_line("ERR UNKNOWN_JOB").code == "UNKNOWN_JOB"
    bare = AdminError.from_line("ERR there are still connected workers or executing clients")
    assert bare.code == "" and bare.text.startswith("there are still")
