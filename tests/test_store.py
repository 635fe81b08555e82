"""Nothing lost: the queue stores with real server processes, kill -9 and restarts.

The behaviours every store must have run against sqlite and redis (``store_url``); the
redis runs use a ``redis-server`` this file starts on a free loopback port (Debian package
redis-server), one key prefix per test. Everything runs on loopback against processes
this file starts (stopped by PID only).
"""

from __future__ import annotations

import base64
import itertools
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import (
    ROOT,
    RawConn,
    ServerProcess,
    free_port,
    missing,
    need_module,
    need_tool,
    stop_process,
    wait_for_port,
)
from gearoffload.protocol import Decoder, encode_request
from gearoffload.protocol import PacketType as T

N_JOBS = 10_000


_started: list[ServerProcess] = []


@pytest.fixture(autouse=True)
def _stop_started_servers():
    yield
    while _started:
        _started.pop().stop()  # by PID; a no-op for those already stopped or killed


class RedisServer:
    """A throwaway ``redis-server`` on a free loopback port, nothing saved to disk."""

    def __init__(self, binary: str, port: int | None = None) -> None:
        self.binary = binary
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--daemonize", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port, self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout=5)

    def url(self, prefix: str) -> str:
        return f"redis://127.0.0.1:{self.port}/0?prefix={prefix}"


def need_redis() -> str:
    """The redis-server binary, with the redis package the store uses (the ``redis``
    extra); a skip locally without either, a failure under CI=true."""
    need_module("redis")
    return need_tool("redis-server", "redis-server")


@pytest.fixture(scope="session")
def redis_server():
    server = RedisServer(need_redis()).start()
    yield server
    server.stop()


_prefixes = itertools.count()


@pytest.fixture(params=["sqlite", "redis"])
def store_url(request, tmp_path) -> str:
    """A fresh, empty queue: a sqlite file or a key prefix of its own in the redis."""
    if request.param == "sqlite":
        return f"sqlite://{tmp_path / 'queue.db'}"
    redis_server = request.getfixturevalue("redis_server")
    return redis_server.url(f"test{os.getpid()}-{next(_prefixes)}")


def start(db, *args: str, port: int | None = None) -> ServerProcess:
    """A server on the queue ``db``: a sqlite file path or a whole ``--queue`` URL."""
    url = db if str(db).startswith(("sqlite://", "redis://")) else f"sqlite://{db}"
    server = ServerProcess("gearoffload", ["--queue", url, *args])
    if port is not None:
        server.port = port
    _started.append(server)
    return server.start()


def drain(port: int, until_count: int | None = None, limit_s: float = 30.0,
          times: list[float] | None = None) -> list[bytes]:
    """A raw worker for ``f``: runs jobs (records their data) until NO_JOB, or until it has
    done ``until_count`` of them. Returns the data of every job it completed; ``times``
    gets the monotonic time of each WORK_COMPLETE."""
    done: list[bytes] = []
    deadline = time.monotonic() + limit_s
    with RawConn(port) as w:
        w.send(T.CAN_DO, b"f")
        while time.monotonic() < deadline:
            w.send(T.GRAB_JOB_UNIQ)
            packet = w.recv()
            if packet.type == T.NO_JOB:
                return done
            handle, _, _, data = packet.args
            w.send(T.WORK_COMPLETE, handle, b"")
            done.append(data)
            if times is not None:
                times.append(time.monotonic())
            if until_count is not None and len(done) >= until_count:
                w.send(T.ECHO_REQ, b"sync")  # the last WORK_COMPLETE has been applied
                w.expect(T.ECHO_RES)
                return done
    raise AssertionError(f"drain did not finish within {limit_s}s ({len(done)} jobs)")


def submit_and_kill(server: ServerProcess) -> list[bytes]:
    """Stream N_JOBS background submissions on one connection; once half of them are
    sent and some are acknowledged, SIGKILL the server while the stream goes on. Returns
    the data of every job that got its JOB_CREATED."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    payloads = [b"%d" % i for i in range(N_JOBS)]
    some_acked = threading.Event()

    def send_all() -> None:
        try:
            for start_at in range(0, N_JOBS, 200):
                if start_at == N_JOBS // 2:
                    some_acked.wait(10)
                    server.proc.send_signal(signal.SIGKILL)  # our own child, by PID
                sock.sendall(b"".join(
                    encode_request(T.SUBMIT_JOB_BG, b"f", b"", p)  # empty unique: Q11
                    for p in payloads[start_at:start_at + 200]))
        except OSError:
            pass  # the server is gone

    sender = threading.Thread(target=send_all, daemon=True)
    sender.start()
    decoder = Decoder()
    acked = 0
    try:
        while True:
            data = sock.recv(1 << 16)
            if not data:
                break
            for packet in decoder.feed(data):
                assert packet.type == T.JOB_CREATED, packet
                acked += 1
            if acked >= N_JOBS // 10:
                some_acked.set()
    except OSError:
        pass  # reset by the kill
    sender.join(10)
    sock.close()
    assert server.proc.wait(10) == -signal.SIGKILL
    # On one connection JOB_CREATED replies come in submission order.
    return payloads[:acked]


def test_kill_9_mid_stream_then_mid_drain_loses_no_acknowledged_job(store_url):
    db = store_url
    first = start(db)
    acked = submit_and_kill(first)
    count = len(acked)
    assert N_JOBS // 10 <= count <= N_JOBS // 2

    # Restart: every acknowledged job is back. Run some of them, then kill -9 again.
    second = start(db)
    with second.connect() as admin:
        total = int(admin.admin("status").split(b"\t")[1])
    assert count <= total < N_JOBS
    times: list[float] = []
    phase2 = drain(second.port, until_count=total // 2, times=times)
    second.proc.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    second.proc.wait(10)

    third = start(db)
    phase3 = drain(third.port)
    third.stop()

    executed = phase2 + phase3
    assert set(acked) <= set(executed), "an acknowledged job was lost"
    assert set(executed) <= {b"%d" % i for i in range(N_JOBS)}
    twice = set(phase2) & set(phase3)
    # Deletes are written lazily (at-least-once): only jobs completed in the last moments
    # before the kill, whose delete was still in the commit under way or the next batch,
    # may run again; never one whose completion was long done.
    completed_at = dict(zip(phase2, times, strict=True))
    late = sorted(killed_at - completed_at[d] for d in twice)
    assert not late or late[-1] < 0.5, (
        f"{len(twice)} ran twice, one completed {late[-1]:.2f}s before the kill")
    assert len(phase3) == len(set(phase3)) and len(phase2) == len(set(phase2))


def test_replay_keeps_priority_order_uniques_and_epoch_jobs(store_url):
    db = store_url
    server = start(db)
    with server.connect() as c:
        for ptype, unique, data in [
            (T.SUBMIT_JOB_LOW_BG, b"", b"low"), (T.SUBMIT_JOB_BG, b"u1", b"normal1"),
            (T.SUBMIT_JOB_HIGH_BG, b"", b"high"), (T.SUBMIT_JOB_BG, b"", b"normal2"),
        ]:
            c.send(ptype, b"f", unique, data)
            c.expect(T.JOB_CREATED)
        c.send(T.SUBMIT_JOB_EPOCH, b"f", b"", b"%d" % (time.time() + 3600), b"later")
        c.expect(T.JOB_CREATED)
        c.send(T.SUBMIT_JOB, b"f", b"", b"foreground")  # not persisted
        c.expect(T.JOB_CREATED)
        jobs = c.admin("show jobs").splitlines()
    assert sorted(line.split(b"\t")[3] for line in jobs[:-1]) == [b"0"] + [b"1"] * 5
    assert server.stop() == 0  # SIGTERM: drains, writes the store, exits 0

    server = start(db)
    with server.connect() as c:
        c.send(T.SUBMIT_JOB_BG, b"f", b"u1", b"again")  # coalesces onto the replayed job
        handle, = c.expect(T.JOB_CREATED)
        assert c.admin("status") == b"f\t5\t0\t0\n.\n"
        with server.connect() as w:
            w.send(T.CAN_DO, b"f")
            order = []
            for _ in range(4):
                w.send(T.GRAB_JOB_UNIQ)
                h, _, unique, data = w.expect(T.JOB_ASSIGN_UNIQ)
                if unique == b"u1":
                    assert h == handle
                order.append(data)
                w.send(T.WORK_COMPLETE, h, b"")
            w.send(T.GRAB_JOB_UNIQ)
            w.expect(T.NO_JOB)  # the epoch job waits for its time
    assert order == [b"high", b"normal1", b"normal2", b"low"]
    assert server.stop() == 0
    server = start(db)
    with server.connect() as c:
        assert c.admin("status") == b"f\t1\t0\t0\n.\n"  # only the epoch job is left
    server.stop()


def test_worker_killed_mid_job_requeued_then_failed_after_retries_and_deleted(store_url):
    db = store_url
    server = start(db, "--job-retries", "2")
    with server.connect() as c:
        c.send(T.SUBMIT_JOB_BG, b"f", b"", b"doomed")
        c.expect(T.JOB_CREATED)
        for attempt in range(2):
            w = server.connect()
            w.send(T.CAN_DO, b"f")
            w.send(T.GRAB_JOB)
            assert w.expect(T.JOB_ASSIGN)[2] == b"doomed"
            w.close()  # the worker dies holding it: requeued, then failed at the 2nd loss
            deadline = time.monotonic() + 5
            # At the 2nd loss the job fails and the function, with no worker and no job
            # left, is forgotten (issue #17).
            expected = b"f\t1\t0\t0\n.\n" if attempt == 0 else b".\n"
            while c.admin("status") != expected and time.monotonic() < deadline:
                time.sleep(0.02)
            assert c.admin("status") == expected
        c.send(T.SUBMIT_JOB_BG, b"f", b"", b"survivor")
        c.expect(T.JOB_CREATED)
        assert drain(server.port) == [b"survivor"]
        c.send(T.SUBMIT_JOB_BG, b"g", b"", b"sync")  # acknowledged once durable, and
        c.expect(T.JOB_CREATED)                      # batches are written in order
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(10)
    server = start(db)
    with server.connect() as c:
        # Both deletes (retry limit, completion) were in a batch written before the sync.
        assert c.admin("status") == b"g\t1\t0\t0\n.\n"
    server.stop()


def test_dead_letters_survive_a_restart_and_can_be_requeued(store_url):
    db = store_url
    server = start(db, "--retry-failed", "1", "--retry-backoff", "0.1")
    with server.connect() as c, server.connect() as w:
        c.send(T.SUBMIT_JOB_BG, b"f", b"u", b"flaky")
        c.expect(T.JOB_CREATED)
        w.send(T.CAN_DO, b"f")
        for _ in range(2):  # the first failure is retried after 0.1 s, the second is final
            w.send(T.GRAB_JOB)
            packet = w.recv()
            deadline = time.monotonic() + 3
            while packet.type == T.NO_JOB and time.monotonic() < deadline:
                time.sleep(0.05)
                w.send(T.GRAB_JOB)
                packet = w.recv()
            assert packet.type == T.JOB_ASSIGN
            w.send(T.WORK_FAIL, packet.args[0])
        w.send(T.ECHO_REQ, b"sync")
        w.expect(T.ECHO_RES)
        assert c.admin("status") == b"f\t0\t0\t1\n.\n"
        dead_line = c.admin("show dead jobs").splitlines()[0]
        assert dead_line.endswith(b"\tf\tu\t2")
        c.send(T.SUBMIT_JOB_BG, b"g", b"", b"sync")  # acknowledged once durable, and
        c.expect(T.JOB_CREATED)                      # batches are written in order
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(10)

    server = start(db)
    with server.connect() as c:
        listing = c.admin("show dead jobs").splitlines()
        # Its handle and failure count survive the crash (they used to be H:...:1 and 0).
        assert listing == [dead_line, b"."]
        handle = dead_line.split(b"\t")[0]
        assert c.admin(f"requeue dead job {handle.decode()}") == b"OK\r\n"
        assert c.admin("show dead jobs") == b".\n"
    assert drain(server.port) == [b"flaky"]


def fail_until_dead(worker: RawConn, times: int, text: bytes) -> bytes:
    """Grab the next job of ``f`` ``times`` times (waiting out back-offs) and answer
    WORK_EXCEPTION ``text`` each time; returns its handle."""
    for _ in range(times):
        deadline = time.monotonic() + 5
        while True:
            worker.send(T.GRAB_JOB)
            packet = worker.recv()
            if packet.type == T.JOB_ASSIGN or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert packet.type == T.JOB_ASSIGN, packet
        worker.send(T.WORK_EXCEPTION, packet.args[0], text)
    worker.send(T.ECHO_REQ, b"sync")
    worker.expect(T.ECHO_RES)
    return packet.args[0]


def dead_job(client: RawConn, handle: bytes) -> tuple[int, float, bytes]:
    """``show dead job HANDLE``: (attempts, died, error)."""
    reply = client.admin(f"show dead job {handle.decode()}")
    ok, _function, _unique, attempts, died, _data, error = reply.rstrip(b"\n").split(b"\t")
    assert ok == b"OK", reply
    return int(attempts), float(died), base64.b64decode(error) if error != b"-" else b""


def test_restart_keeps_dead_letters_whole_and_never_reuses_a_handle(store_url):
    """The user's report: two dead letters (3 and 2 failures), SIGTERM, start again on
    the same store. Each keeps its handle, failures, death time and error; a queued job
    keeps its handle (GET_STATUS on it still finds it); new handles continue past every
    handle issued before, foreground ones included."""
    server = start(store_url, "--retry-failed", "2", "--retry-backoff", "0.05")
    with server.connect() as c, server.connect() as w:
        w.send(T.CAN_DO, b"f")
        c.send(T.SUBMIT_JOB_BG, b"f", b"a", b"three")
        first, = c.expect(T.JOB_CREATED)
        assert fail_until_dead(w, 3, b"ValueError: three\n  File \"app.py\"") == first
        for n in range(5):  # foreground handles in between: never stored
            c.send(T.SUBMIT_JOB_BG if n == 4 else T.SUBMIT_JOB, b"g", b"", b"fg%d" % n)
            if n < 4:
                fg, = c.expect(T.JOB_CREATED)
        queued, = c.expect(T.JOB_CREATED)       # the last one: background, stays queued
        # Its own policy (@offload(retries=1)): dead after 2 failures.
        c.send(T.SUBMIT_JOB_BG, b"f", b"b", b"GOR1 1 0.05 1 0\ntwo")
        second, = c.expect(T.JOB_CREATED)
        assert fail_until_dead(w, 2, b"KeyError: two") == second
        before = {h: dead_job(c, h) for h in (first, second)}
        assert before[first][0] == 3 and before[first][1] > 0 and before[second][0] == 2
        assert before[first][2] == b'ValueError: three\n  File "app.py"'
        listing = c.admin("show dead jobs")
        c.send(T.SUBMIT_JOB, b"h", b"", b"last")  # the highest handle before the stop
        last, = c.expect(T.JOB_CREATED)
    assert server.stop() == 0

    server = start(store_url)
    with server.connect() as c:
        assert c.admin("show dead jobs") == listing
        assert {h: dead_job(c, h) for h in (first, second)} == before
        c.send(T.GET_STATUS, queued)
        assert c.expect(T.STATUS_RES) == (queued, b"1", b"0", b"0", b"0")
        c.send(T.GET_STATUS, fg)  # a foreground job of before: gone, and not renamed
        assert c.expect(T.STATUS_RES) == (fg, b"0", b"0", b"0", b"0")
        c.send(T.SUBMIT_JOB, b"h", b"", b"new")
        new, = c.expect(T.JOB_CREATED)
        number = int(new.rsplit(b":", 1)[1])
        assert number > int(last.rsplit(b":", 1)[1]), (new, last)
    server.stop()


def assert_foreground_works(client: RawConn, worker: RawConn, function: bytes) -> None:
    """While the store refuses writes, foreground jobs (never stored) still run."""
    worker.send(T.CAN_DO, function)
    client.send(T.SUBMIT_JOB, function, b"", b"foreground")
    handle, = client.expect(T.JOB_CREATED)
    worker.send(T.GRAB_JOB)
    assert worker.expect(T.JOB_ASSIGN)[2] == b"foreground"
    worker.send(T.WORK_COMPLETE, handle, b"done")
    assert client.expect(T.WORK_COMPLETE) == (handle, b"done")


def immutable(path, on: bool) -> bool:
    result = subprocess.run(["chattr", "+i" if on else "-i", str(path)], capture_output=True)
    return result.returncode == 0


def test_unwritable_store_refuses_with_queue_error_and_recovers(tmp_path):
    """An unwritable store, for real even as root: ``chattr +i`` on the database and its
    WAL file makes every write fail with EPERM (root ignores permission bits, not the
    immutable flag). The server keeps running, foreground jobs still work, and once the
    flag is gone submissions are stored again."""
    need_tool("chattr", "e2fsprogs")
    db = tmp_path / "queue.db"
    server = start(db)
    wal = tmp_path / "queue.db-wal"
    files = [db, wal]
    # The port accepts before the store is opened, but answers only after: an ECHO answered
    # means the store's start-up writes (schema, added columns) are done, so the flag
    # below hits the batches only (set during them, the server would refuse to start).
    with server.connect() as probe:
        probe.send(T.ECHO_REQ, b"ready?")
        assert probe.expect(T.ECHO_RES) == (b"ready?",)
    assert wal.exists()
    if not all(immutable(f, True) for f in files):
        for f in files:
            immutable(f, False)
        missing("this filesystem does not support the immutable flag")
    try:
        with server.connect() as c, server.connect() as w:
            c.send(T.SUBMIT_JOB_BG, b"f", b"u", b"x")
            c.send(T.SUBMIT_JOB_BG, b"f", b"", b"y")
            for _ in range(2):
                code, text = c.expect(T.ERROR)
                assert code == b"QUEUE_ERROR" and b"could not be saved" in text, text
            assert c.admin("status") == b".\n"  # the refused jobs are gone (and so is f)
            assert_foreground_works(c, w, b"f")
            for f in files:
                immutable(f, False)
            c.send(T.SUBMIT_JOB_BG, b"f", b"", b"z")
            c.expect(T.JOB_CREATED)
    finally:
        for f in files:
            immutable(f, False)
    assert server.stop() == 0
    assert "queue store write failed" in server.stderr_text()
    server = start(db)
    with server.connect() as c:
        assert c.admin("status") == b"f\t1\t0\t0\n.\n"
    server.stop()


def test_full_store_refuses_with_queue_error(tmp_path):
    """A full store: ``?max_size=`` caps the file (sqlite's max_page_count), so sqlite
    itself reports SQLITE_FULL exactly as on a full disk."""
    server = start(f"{tmp_path / 'queue.db'}?max_size=64k")
    payload = b"x" * 4000
    with server.connect() as c:
        refused = 0
        for _ in range(40):
            c.send(T.SUBMIT_JOB_BG, b"f", b"", payload)
            packet = c.recv()
            if packet.type == T.ERROR:
                assert packet.args[0] == b"QUEUE_ERROR" and b"full" in packet.args[1]
                refused += 1
            else:
                assert packet.type == T.JOB_CREATED and refused == 0
        assert refused
        c.send(T.ECHO_REQ, b"alive")
        assert c.expect(T.ECHO_RES) == (b"alive",)
    server.stop()


@pytest.mark.parametrize("queue, message", [
    ("postgres://x", "unknown queue"),
    ("redis://localhost:notaport/0", "port must be a number"),
    ("redis://localhost:6379/zero", "database must be a number"),
    ("redis://localhost:6379/0?prefx=a", "unknown redis option 'prefx'"),
    ("sqlite:///proc/no/such/dir/q.db", "cannot create the queue directory"),
])
def test_bad_queue_is_one_line_and_exit_2(queue, message):
    result = subprocess.run(
        [sys.executable, "-m", "gearoffload_server", "--port", str(free_port()),
         "--queue", queue], cwd=ROOT, capture_output=True, text=True, timeout=10)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr


def test_second_server_on_the_same_file_refuses_to_start(tmp_path):
    db = tmp_path / "queue.db"
    first = start(db)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "gearoffload_server", "--port", str(free_port()),
             "--queue", f"sqlite://{db}"], cwd=ROOT, capture_output=True, text=True,
            timeout=10)
        assert result.returncode == 2 and "another server" in result.stderr, result.stderr
    finally:
        first.stop()


def test_sigterm_lets_running_jobs_finish_and_gives_no_new_ones(store_url):
    server = start(store_url, "--shutdown-timeout", "5")
    with server.connect() as c, server.connect() as w:
        for data in (b"running", b"queued"):
            c.send(T.SUBMIT_JOB_BG, b"f", b"", data)
            c.expect(T.JOB_CREATED)
        w.send(T.CAN_DO, b"f")
        w.send(T.GRAB_JOB)
        handle, _, data = w.expect(T.JOB_ASSIGN)
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert server.proc.poll() is None  # waiting for the running job
        w.send(T.GRAB_JOB)
        w.expect(T.NO_JOB)  # nothing new during shutdown
        w.send(T.WORK_COMPLETE, handle, b"")
        assert server.proc.wait(5) == 0
    server = start(store_url)
    assert drain(server.port) == [b"queued"]
    server.stop()




# -- redis only ---------------------------------------------------------------------------


def test_redis_unreachable_mid_run_refuses_with_queue_error_and_recovers():
    """Redis goes away while the server runs: background submissions get ERROR
    QUEUE_ERROR naming redis, the server keeps running and foreground jobs still work;
    once Redis is back on its port, submissions are stored again."""
    own = RedisServer(need_redis()).start()
    try:
        server = start(own.url("outage"))
        with server.connect() as c, server.connect() as w:
            c.send(T.SUBMIT_JOB_BG, b"f", b"", b"before")
            c.expect(T.JOB_CREATED)
            own.stop()
            c.send(T.SUBMIT_JOB_BG, b"f", b"u", b"x")
            c.send(T.SUBMIT_JOB_BG, b"f", b"", b"y")
            for _ in range(2):
                code, text = c.expect(T.ERROR)
                assert code == b"QUEUE_ERROR" and b"could not be saved" in text, text
                assert b"redis queue redis://127.0.0.1:" in text, text
            assert c.admin("status") == b"f\t1\t0\t0\n.\n"  # the refused jobs are gone
            assert_foreground_works(c, w, b"g")
            own.start()  # the same port, empty (nothing was saved)
            c.send(T.SUBMIT_JOB_BG, b"f", b"", b"z")
            c.expect(T.JOB_CREATED)
        assert server.stop() == 0
        assert "queue store write failed" in server.stderr_text()
        server = start(own.url("outage"))
        assert drain(server.port) == [b"z"]
    finally:
        own.stop()


def test_redis_not_answering_at_start_is_one_line_and_exit_2():
    need_module("redis")  # without it the server names the missing package instead
    port = free_port()  # nothing listens there
    result = subprocess.run(
        [sys.executable, "-m", "gearoffload_server", "--port", str(free_port()),
         "--queue", f"redis://127.0.0.1:{port}/0"], cwd=ROOT, capture_output=True,
        text=True, timeout=15)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert f"cannot reach the redis queue at redis://127.0.0.1:{port}/0" in result.stderr


def test_redis_default_prefix_is_per_port_so_two_servers_share_one_redis(redis_server):
    url = f"redis://127.0.0.1:{redis_server.port}/0"
    first, second = start(url), start(url)
    for server, data in ((first, b"one"), (second, b"two")):
        with server.connect() as c:
            c.send(T.SUBMIT_JOB_BG, b"f", b"", data)
            c.expect(T.JOB_CREATED)
        assert server.stop() == 0
    for server, data in ((first, b"one"), (second, b"two")):
        again = start(url, port=server.port)  # the same port: the same default prefix
        assert drain(again.port) == [data]
        again.stop()
