"""Kept results of background jobs against real server processes: the admin ``result``
command through ``AdminClient.result``, a sqlite store across ``kill -9``, bad admin input,
what a third-party client sees (nothing new), gearmand (``ResultsUnsupported``), and
issue #17 item 5 (a background submission onto a foreground job survives a ``kill -9``).
"""

from __future__ import annotations

import itertools
import os
import signal
import threading
import time
from collections.abc import Iterator

import gevent
import gevent.socket
import pytest
from test_store import redis_server  # noqa: F401 (a session fixture: one redis-server)
from wire_helpers import grab, submit, sync, wait_until, worker

from conftest import RawConn, ServerProcess, gevent_time_limit
from gearoffload.admin import AdminClient, AdminError, KeptResult, ResultsUnsupported
from gearoffload.errors import JobTimeout
from gearoffload.protocol import PacketType as T

time_limit = gevent_time_limit(60)
_started: list[ServerProcess] = []


@pytest.fixture(autouse=True)
def _stop_started_servers() -> Iterator[None]:
    yield
    while _started:
        _started.pop().stop(signal.SIGKILL)


_prefixes = itertools.count()


@pytest.fixture(params=["sqlite", "redis"])
def store_url(request, tmp_path) -> str:
    """A fresh queue: a sqlite file, or a key prefix of its own in test_store's redis."""
    if request.param == "sqlite":
        return f"sqlite://{tmp_path / 'queue.db'}"
    server = request.getfixturevalue("redis_server")
    return server.url(f"results{os.getpid()}-{next(_prefixes)}")


def start(*args: str, port: int | None = None, state_home: str | None = None) -> ServerProcess:
    server = ServerProcess("gearoffload", list(args))
    if port is not None:
        server.port = port
    if state_home is not None:
        server.state_home = state_home
    _started.append(server)
    return server.start()


def complete(conn: RawConn, *packets: tuple) -> bytes:
    """Grab one job and answer it with ``packets`` (type, args after the handle)."""
    handle = grab(conn)[0]
    for ptype, *args in packets:
        conn.send(ptype, handle, *args)
    sync(conn)
    return handle


def test_submitter_sees_only_job_created_and_any_process_reads_the_result():
    server = start()
    with server.connect() as client, worker(server, b"f") as w:
        handle = submit(client, b"f", b"report-1", b"x", T.SUBMIT_JOB_BG)
        with AdminClient(server.address, timeout=5) as admin:
            assert admin.result("report-1") == KeptResult("queued", 0, 0, None, None, None)
            handle2 = grab(w)[0]
            assert handle2 == handle
            w.send(T.WORK_STATUS, handle, b"4", b"10")
            sync(w)
            assert admin.result(b"report-1") == \
                KeptResult("running", 4, 10, None, None, None)
            w.send(T.WORK_COMPLETE, handle, b"\x00\xff binary result")
            sync(w)
            kept = admin.result("report-1")
        assert (kept.state, kept.numerator, kept.denominator, kept.data) == \
            ("done", 4, 10, b"\x00\xff binary result")
        assert 595 < kept.expires_in <= 600
        # A third-party binary client: exactly JOB_CREATED, nothing about the result.
        client.expect_nothing(0.5)
    with AdminClient(server.address, timeout=5) as other:  # another connection, later
        assert other.result("report-1").data == b"\x00\xff binary result"
        assert other.result("never-submitted").state == "unknown"


def test_failed_dead_too_large_and_expiry_with_real_time():
    server = start("--retry-failed", "1", "--retry-backoff", "0", "--result-ttl", "1",
                   "--result-max-size", "100")
    with server.connect() as client, worker(server, b"f") as w, \
            AdminClient(server.address, timeout=5) as admin:
        for unique in (b"exc", b"dead", b"big"):
            submit(client, b"f", unique, b"x", T.SUBMIT_JOB_BG)
        complete(w, (T.WORK_EXCEPTION, b"ValueError: nope"), (T.WORK_FAIL,))
        complete(w, (T.WORK_FAIL,))
        complete(w, (T.WORK_COMPLETE, b"y" * 101))
        # exc and dead were retried once; their second failures decide.
        complete(w, (T.WORK_EXCEPTION, b"again"), (T.WORK_FAIL,))
        complete(w, (T.WORK_FAIL,))
        assert (admin.result("exc").state, admin.result("exc").data) == ("dead", b"again")
        assert (admin.result("dead").state, admin.result("dead").data) == ("dead", b"")
        big = admin.result("big")
        assert (big.state, big.data, big.too_large) == ("done", None, 101)
        time.sleep(1.1)
        assert admin.result("big").state == "unknown"  # expired
        client.expect_nothing(0.1)


def test_kill_9_keeps_acknowledged_results_and_does_not_rerun(store_url):
    db = store_url
    first = start("--queue", db)
    count = 50
    with first.connect() as client, worker(first, b"f") as w:
        for i in range(count):
            submit(client, b"f", b"u%d" % i, b"%d" % i, T.SUBMIT_JOB_BG)
        for _ in range(count):
            handle, _, unique, data = grab(w)
            w.send(T.WORK_STATUS, handle, b"1", b"1")
            w.send(T.WORK_COMPLETE, handle, b"result of " + data)
        sync(w)
    time.sleep(0.5)  # deletes and results linger up to 20 ms before their commit
    first.proc.send_signal(signal.SIGKILL)  # our own child, by PID
    assert first.proc.wait(10) == -signal.SIGKILL

    second = start("--queue", db, port=first.port, state_home=first.state_home)
    with AdminClient(second.address, timeout=5) as admin:
        assert sum(f.total for f in admin.status()) == 0  # none ran again
        for i in range(count):
            kept = admin.result(f"u{i}")
            assert (kept.state, kept.numerator, kept.data) == \
                ("done", 1, b"result of %d" % i), i
            assert kept.expires_in is not None and kept.expires_in > 590
    assert "and 50 kept results" in second.stderr_text()


def test_expired_results_are_not_restored(store_url):
    db = store_url
    first = start("--queue", db, "--result-ttl", "1")
    with first.connect() as client, worker(first, b"f") as w:
        submit(client, b"f", b"short", b"x", T.SUBMIT_JOB_BG)
        complete(w, (T.WORK_COMPLETE, b"r"))
    time.sleep(0.3)
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(10)
    time.sleep(1)
    second = start("--queue", db, "--result-ttl", "1", port=first.port,
                   state_home=first.state_home)
    with AdminClient(second.address, timeout=5) as admin:
        assert admin.result("short").state == "unknown"
    assert "and 0 kept results" in second.stderr_text()


def test_background_onto_foreground_job_survives_client_exit_and_kill_9(store_url):
    """Issue #17 item 5, end to end: before the fix the job was neither stored nor
    background, so it ran 0 times once the foreground client left and the server died."""
    db = store_url
    first = start("--queue", db)
    with first.connect() as fg, first.connect() as bg:
        submit(fg, b"f", b"shared", b"payload", T.SUBMIT_JOB)
        assert submit(bg, b"f", b"shared", b"payload", T.SUBMIT_JOB_BG)  # acknowledged
    # Both connections are closed; the foreground one took nothing with it.
    with first.connect() as admin:
        wait_until(lambda: b"f\t1\t0\t0" in admin.admin("status"))
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(10)
    second = start("--queue", db, port=first.port, state_home=first.state_home)
    with worker(second, b"f") as w:
        handle, _, unique, data = grab(w)
        assert (unique, data) == (b"shared", b"payload")
        w.send(T.WORK_COMPLETE, handle, b"ran")
        sync(w)
    with AdminClient(second.address, timeout=5) as admin:
        assert admin.result("shared").data == b"ran"


def test_bad_admin_input_gets_err_and_the_server_stays_up():
    server = start()
    with server.connect() as conn:
        assert conn.admin("result").startswith(b"ERR INVALID_ARGUMENTS ")
        assert conn.admin("result a b").startswith(b"ERR INVALID_ARGUMENTS ")
        assert conn.admin_raw(b"result \x01\x02\xff\r\n").startswith(b"ERR INVALID_ARGUMENTS ")
        assert conn.admin("result " + "x" * 65).startswith(b"ERR INVALID_ARGUMENTS ")
        assert conn.admin("result ok-unique") == b"OK unknown 0 0 - -\n"  # still in step
    with server.connect() as conn:
        reply = conn.admin_raw(b"result " + b"x" * 20000 + b"\r\n")
        assert reply.startswith(b"ERR LINE_TOO_LONG"), reply[:80]
        assert conn.is_closed()
    with AdminClient(server.address, timeout=5) as admin:
        with pytest.raises(ValueError, match="1 to 64 bytes"):
            admin.result("has space")
        with pytest.raises(ValueError):
            admin.result(b"")
        assert admin.result("\u00e9t\u00e9").state == "unknown"  # UTF-8 is fine
        assert admin.getpid() == server.proc.pid


def test_results_disabled_raise_results_unsupported(server_factory):
    off = server_factory("gearoffload", "--result-ttl", "0")
    with AdminClient(off.address, timeout=5) as admin:
        with pytest.raises(ResultsUnsupported, match="--result-ttl 0") as info:
            admin.result("u")
        assert isinstance(info.value, AdminError) and info.value.code == "RESULTS_DISABLED"
        assert admin.getpid() == off.proc.pid  # still in step


def test_gearmand_raises_results_unsupported(server_factory):
    gearmand = server_factory("gearmand")  # skips locally when gearmand is missing
    with AdminClient(gearmand.address, timeout=5) as admin:
        with pytest.raises(ResultsUnsupported, match="Redis result backend"):
            admin.result("u")
        assert admin.version()  # the connection is still usable


def test_unknown_command_reply_is_results_unsupported():
    """gearmand's exact reply to an unknown command, from a scripted peer (gearmand
    itself runs in the test above where it is installed)."""
    listener = gevent.socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def serve() -> bytes:
        conn, _ = listener.accept()
        with conn:
            request = conn.recv(1024)
            conn.sendall(b"ERR UNKNOWN_COMMAND Unknown+server+commandresult\r\n")
            return request

    peer = gevent.spawn(serve)
    address = f"127.0.0.1:{listener.getsockname()[1]}"
    with pytest.raises(ResultsUnsupported) as info:
        AdminClient(address, timeout=3).result("report-7")
    message = str(info.value)
    assert "does not keep results of background jobs" in message
    assert "gearmand" in message and "Redis result backend" in message
    assert peer.get(timeout=3) == b"result report-7\r\n"
    listener.close()


def test_result_waits_cooperatively_on_gevent_and_works_from_a_thread():
    """AdminClient uses gevent sockets: a slow reply does not block the hub (other
    greenlets run meanwhile), and the timeout bounds the wait. From a plain thread it
    works too (gevent gives that thread a hub of its own)."""
    listener = gevent.socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    accepted = []

    def silent() -> None:
        conn, _ = listener.accept()
        accepted.append(conn)  # never answers
        gevent.sleep(5)

    gevent.spawn(silent)
    ticks = []
    ticker = gevent.spawn(lambda: [ticks.append(gevent.sleep(0.01)) for _ in range(1000)])
    started = time.monotonic()
    with pytest.raises(JobTimeout):
        AdminClient(f"127.0.0.1:{listener.getsockname()[1]}", timeout=0.5).result("u")
    assert 0.45 < time.monotonic() - started < 2
    assert len(ticks) >= 20, "the hub was blocked while waiting for the reply"
    ticker.kill()
    listener.close()

    server = start()
    got = []
    thread = threading.Thread(
        target=lambda: got.append(AdminClient(server.address, timeout=5).result("t")))
    thread.start()
    while thread.is_alive():
        gevent.sleep(0.01)
    assert got and got[0].state == "unknown"
