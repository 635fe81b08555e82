"""gearoffload.Client against real servers: ours and Debian's gearmand (the ``server``
fixture runs each test against both), with workers running in greenlets of this process.
"""

from __future__ import annotations

import logging
import signal
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager

import gevent
import gevent.socket
import gevent.subprocess
import pytest
from gevent.event import Event

from conftest import (
    ServerProcess,
    compiled_and_source,
    free_port,
    gevent_time_limit,
    need_tool,
    poll_until,
    working,
)
from gearoffload import Client, Worker
from gearoffload.errors import (
    GearmanError,
    JobException,
    JobFailed,
    JobTimeout,
    NoServersAvailable,
    ServerError,
)
from gearoffload.protocol import PacketType as T

TEST_TIME_LIMIT = 40


time_limit = gevent_time_limit(TEST_TIME_LIMIT)
# The compiled modules, and their .py in this process (slow: under CI=true or --run-slow).
variant = compiled_and_source(slow=True)


@contextmanager
def running_worker(servers, concurrency: int = 10, **tasks) -> Iterator[Worker]:
    """A Worker serving ``tasks`` (name -> fn) in a greenlet for the ``with`` block."""
    worker = Worker(servers, concurrency=concurrency)
    for name, fn in tasks.items():
        worker.register(name, fn)
    with working(worker):
        yield worker


def upper(job):
    return job.data.upper()


def test_submit_returns_the_workers_result(server):
    with running_worker(server.address, upper=upper), Client(server.address) as client:
        job = client.submit("upper", b"he\0llo")
        assert job.handle and job.server == server.address
        assert job.function == "upper" and not job.background
        assert job.result(timeout=5) == b"HE\0LLO"
        assert job.done
        # str data is UTF-8; an empty payload is a valid job too.
        assert client.submit("upper", "grüß").result(5) == "GRüß".encode()
        assert client.submit("upper", b"").result(5) == b""


def test_call_and_submit_without_waiting_for_job_created(server):
    with running_worker(server.address, upper=upper), Client(server.address) as client:
        assert client.call("upper", b"one", timeout=5) == b"ONE"
        job = client.submit("upper", b"two", wait=False)
        assert job.handle is None  # not accepted yet: the call did not wait for it
        assert job.result(timeout=5) == b"TWO" and job.handle
        # Coalescing works the same: three calls, one unique, one shared answer.
        calls = [gevent.spawn(client.call, "upper", b"same", "u-1", timeout=5)
                 for _ in range(3)]
        gevent.joinall(calls, raise_error=True)
        assert [c.value for c in calls] == [b"SAME"] * 3
        with pytest.raises(ValueError):  # bad arguments still fail before anything is sent
            client.call("", b"x")


def test_large_payload_roundtrip(server):
    data = bytes(range(256)) * 8192  # 2 MiB, NULs included
    with running_worker(server.address, echo=lambda job: job.data), \
            Client(server.address) as client:
        assert client.submit("echo", data).result(10) == data


def test_priorities_background_and_status(server):
    started = Event()
    release = Event()

    def hold(job):
        started.set()
        release.wait(10)
        return b"held"

    with Client(server.address) as client:
        # Queue before any worker exists, so the order is decided by priority
        # (docs/protocol.md §3.5).
        order = []
        jobs = [client.submit("prio", name, priority=prio)
                for name, prio in [("low", "low"), ("norm", "normal"), ("high", "high")]]
        bg = client.submit("prio", "bg", background=True)
        assert bg.background and bg.result() is None and bg.done
        status = client.status(bg.handle, bg.server)
        assert status.known and not status.running
        with running_worker(server.address, concurrency=1,
                            prio=lambda job: order.append(job.text) or job.data,
                            hold=hold):
            assert [j.result(5) for j in jobs] == [b"low", b"norm", b"high"]
            held = client.submit("hold", b"")
            assert started.wait(5)
            status = held.status()
            assert status.known and status.running and status.handle == held.handle
            release.set()
            assert held.result(5) == b"held"
        assert order == ["high", "norm", "bg", "low"]  # bg is normal priority, after norm
        assert not client.status(bg.handle, bg.server).known  # done and gone


def test_updates_stream_data_warning_and_status(server):
    def chatty(job):
        for i in range(1, 4):
            job.send_status(i, 3)
            job.send_data(b"part%d" % i)
            gevent.sleep(0.01)
        job.send_warning("careful")
        return b"done"

    with running_worker(server.address, chatty=chatty), Client(server.address) as client:
        job = client.submit("chatty", b"")
        updates = list(job.updates(timeout=5))
        assert [(u.kind, u.data, u.numerator, u.denominator) for u in updates] == [
            ("status", b"", 1, 3), ("data", b"part1", None, None),
            ("status", b"", 2, 3), ("data", b"part2", None, None),
            ("status", b"", 3, 3), ("data", b"part3", None, None),
            ("warning", b"careful", None, None),
        ]
        assert job.result(5) == b"done"
        assert list(job.updates()) == []  # the stream has ended


def test_worker_exception_and_failure(server):
    def boom(job):
        raise ValueError("no " + job.text)

    def refuse(job):
        raise JobFailed("not today")

    with running_worker(server.address, boom=boom, refuse=refuse):
        with Client(server.address) as client:
            with pytest.raises(JobException) as info:
                client.submit("boom", "way").result(5)
            assert info.value.text == "ValueError: no way"
            with pytest.raises(JobFailed):
                client.submit("refuse", "x").result(5)
        # Without the exceptions option the exception arrives as WORK_FAIL; gearmand
        # appends a NUL to that handle (docs/protocol.md §3.10, Q1), which the client must strip.
        with Client(server.address, exceptions=False) as client:
            with pytest.raises(JobFailed) as failed:
                client.submit("boom", "way").result(5)
            assert failed.value.handle


def test_result_timeout_and_no_servers(server):
    with Client(server.address) as client:
        job = client.submit("nobody_serves_this", b"x")
        started = time.monotonic()
        with pytest.raises(JobTimeout):
            job.result(timeout=0.3)
        assert 0.25 < time.monotonic() - started < 2
        with pytest.raises(JobTimeout):
            list(job.updates(timeout=0.2))
        assert not job.done
    dead = f"127.0.0.1:{free_port()}"
    with Client(dead, connect_timeout=0.5) as client:
        started = time.monotonic()
        with pytest.raises(NoServersAvailable):
            client.submit("upper", b"x")
        assert time.monotonic() - started < 3
        with pytest.raises(NoServersAvailable):
            client.status("H:x:1", dead)
    assert issubclass(NoServersAvailable, GearmanError)


def test_many_waits_time_out_each_on_time(server):
    with Client(server.address) as client:
        jobs = client.submit_many([("nobody_serves_this", b"%d" % i) for i in range(50)])

        def wait(job, timeout: float) -> float:
            started = time.monotonic()
            with pytest.raises(JobTimeout):
                job.result(timeout)
            return time.monotonic() - started - timeout

        greenlets = [gevent.spawn(wait, job, 0.1 + 0.01 * i) for i, job in enumerate(jobs)]
        gevent.joinall(greenlets, timeout=5, raise_error=True)
        lateness = [g.value for g in greenlets]
        assert min(lateness) >= -0.01 and max(lateness) < 0.3
        # Waiting again works, and so does the connection.
        with pytest.raises(JobTimeout):
            jobs[0].result(0.05)
        assert client.status(jobs[0].handle, jobs[0].server).known


def test_a_server_that_never_answers_times_out_the_submission():
    """A peer that accepts connections but never replies: submit() must not hang."""
    silent = gevent.socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(5)
    address = f"127.0.0.1:{silent.getsockname()[1]}"
    try:
        with Client(address, timeout=0.5, connect_timeout=0.5) as client:
            started = time.monotonic()
            with pytest.raises(JobTimeout):
                client.submit("f", b"x")
            assert 0.45 < time.monotonic() - started < 2
    finally:
        silent.close()


def test_a_late_answer_for_a_caller_that_timed_out_keeps_the_connection(server, caplog):
    """Issue #15: A times out, then its WORK_COMPLETE arrives. That used to raise
    IndexError in the reader, which dropped the connection with B's job on it (B's job
    was then resubmitted and ran twice). Now B's job completes on the same connection."""
    ran = []

    def slow(job):
        ran.append(job.data)
        gevent.sleep(0.6)
        return job.data

    with running_worker(server.address, concurrency=1, slow=slow), \
            Client(server.address) as client:
        assert client.call("slow", b"warm-up", timeout=5) == b"warm-up"
        conn = client._links[0].conn
        ran.clear()
        a = client.submit("slow", b"a", wait=True)
        b = client.submit("slow", b"b", wait=True)  # queued behind A on the one slot
        handle_b = b.handle
        with pytest.raises(JobTimeout):
            a.result(timeout=0.2)
        assert b.result(5) == b"b"  # A's late WORK_COMPLETE came first, at about 0.6 s
        assert client._links[0].conn is conn and not conn.closed
        assert b.handle == handle_b  # never resubmitted
        assert ran == [b"a", b"b"]
        assert client.call("slow", b"c", timeout=5) == b"c"
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_server_error_is_raised_from_submit(server):
    with server.connect() as admin, Client(server.address) as client:
        assert admin.admin("create function limited").startswith(b"OK")
        assert admin.admin("maxqueue limited 1").startswith(b"OK")
        first = client.submit("limited", b"1")
        with pytest.raises(ServerError) as info:
            client.submit("limited", b"2")
        assert info.value.code == "QUEUE_ERROR"
        # An ERROR answers one request; the connection and the first job are fine.
        assert client.status(first.handle, first.server).known
    with Client(server.address) as client:
        with pytest.raises(ValueError):
            client.submit("f", b"", unique="u" * 65)
        # A bad item refuses the whole batch before anything is sent or remembered, so a
        # later submission of the good item's unique is not stuck behind a phantom.
        with pytest.raises(ValueError):
            client.submit_many([("f", b"", {"unique": "fine"}), ("f", b"", {"priority": "x"})])
        assert client.status_unique("fine").known is False
        assert client.submit("f", b"", unique="fine").handle


def test_coalescing_500_greenlets_one_execution(server):
    """500 greenlets on 5 clients submit one unique while the task runs: one execution,
    500 results (coalescing in the client for one connection, in the server across)."""
    executions = []
    release = Event()

    def slow(job):
        executions.append(job.unique)
        release.wait(15)
        return b"result of " + job.data

    clients = [Client(server.address) for _ in range(5)]
    with running_worker(server.address, concurrency=5, slow=slow):
        jobs = []
        greenlets = [gevent.spawn(lambda c=c: jobs.append(c.submit("slow", b"x",
                                                                    unique="same")))
                     for c in clients for _ in range(100)]
        gevent.joinall(greenlets, timeout=10, raise_error=True)
        assert len(jobs) == 500
        assert len({(j.server, j.handle) for j in jobs}) == 1
        deadline = time.monotonic() + 5
        while not executions and time.monotonic() < deadline:
            gevent.sleep(0.01)
        status = clients[0].status_unique("same")
        assert status.known and status.running
        assert status.waiting == 5  # one attachment per client connection
        release.set()
        results = [job.result(10) for job in jobs]
    assert results == [b"result of x"] * 500
    assert executions == ["same"]
    for client in clients:
        client.close()


def test_data_coalescing_on_one_connection_delivers_each_packet_once(server):
    """Unique "-" coalesces on equal data in the server; one connection attached twice
    receives every WORK_* twice (docs/protocol.md §3.3), and each Job must still see each
    update once."""
    release = Event()

    def chunks(job):
        release.wait(10)
        job.send_data(b"one")
        job.send_status(1, 2)
        job.send_data(b"two")
        return b"end"

    with running_worker(server.address, chunks=chunks), Client(server.address) as client:
        first = client.submit("chunks", b"same data", unique="-")
        second = client.submit("chunks", b"same data", unique="-")
        assert first.handle == second.handle
        release.set()
        for job in (first, second):
            assert [(u.kind, u.data) for u in job.updates(timeout=5)] == [
                ("data", b"one"), ("status", b""), ("data", b"two")]
            assert job.result(5) == b"end"
        # The connection is still in step: the next job is answered normally.
        third = client.submit("chunks", b"other data", unique="-")
        assert third.handle != first.handle and third.result(5) == b"end"


def test_one_client_shared_by_1000_greenlets(server):
    """Replies are matched by order on one multiplexed connection: every greenlet gets
    its own result, whatever the interleaving."""
    def work(job):
        gevent.sleep(0.001 * (job.data[-1] % 7))  # finish out of order
        return b"r:" + job.data

    with running_worker(server.address, concurrency=50, work=work), \
            Client(server.address) as client:
        def one(i: int) -> bytes:
            job = client.submit("work", b"%d" % i, priority=("low", "normal", "high")[i % 3])
            return job.result(20)

        greenlets = [gevent.spawn(one, i) for i in range(1000)]
        gevent.joinall(greenlets, timeout=30, raise_error=True)
        assert [g.value for g in greenlets] == [b"r:%d" % i for i in range(1000)]


def test_submit_many_pipelines_a_batch(server):
    with running_worker(server.address, concurrency=20, upper=upper), \
            Client(server.address) as client:
        jobs = client.submit_many(
            [("upper", b"w%d" % i) for i in range(300)]
            + [{"function": "upper", "data": "dict", "priority": "high"},
               ("upper", b"bg", {"background": True})])
        assert len(jobs) == 302 and len({j.handle for j in jobs}) == 302
        assert [j.result(10) for j in jobs[:300]] == [b"W%d" % i for i in range(300)]
        assert jobs[300].result(5) == b"DICT"
        assert jobs[301].result() is None


def test_status_of_jobs_submitted_elsewhere(server):
    with Client(server.address) as submitter, Client(server.address) as observer:
        job = submitter.submit("unserved", b"x", unique="elsewhere", background=True)
        by_handle = observer.status(job.handle, job.server)
        assert by_handle.known and not by_handle.running
        by_unique = observer.status_unique("elsewhere")
        assert by_unique.known and by_unique.unique == "elsewhere"
        assert by_unique.server == server.address
        assert not observer.status_unique("never-submitted").known
        assert not observer.status("H:nope:1", server.address).known


def test_run_at_in_the_past_runs_now(server):
    with running_worker(server.address, upper=upper), Client(server.address) as client:
        job = client.submit("upper", b"x", run_at=time.time() - 5, unique="epoch-1")
        assert job.background
        deadline = time.monotonic() + 5
        while client.status_unique("epoch-1").known and time.monotonic() < deadline:
            gevent.sleep(0.05)
        assert not client.status_unique("epoch-1").known
    with pytest.raises(ValueError):
        Client(server.address).submit("f", b"", run_at=time.time(), priority="high")


def test_run_at_in_the_future_waits(our_server):
    # gearmand 1.1.20 never wakes a sleeping worker when an epoch job falls due (Q7), so
    # this runs against our server only.
    ran_at = []
    with running_worker(our_server.address, stamp=lambda job: ran_at.append(time.time())), \
            Client(our_server.address) as client:
        due = int(time.time()) + 2
        client.submit("stamp", b"", run_at=due)
        deadline = time.monotonic() + 6
        while not ran_at and time.monotonic() < deadline:
            gevent.sleep(0.05)
    assert ran_at and ran_at[0] >= due


@pytest.fixture(params=["gearoffload", "gearmand"])
def two_servers(request, server_factory):
    return server_factory(request.param), server_factory(request.param)


def test_unique_jobs_hash_to_one_server_others_round_robin(two_servers):
    servers = [s.address for s in two_servers]
    with running_worker(servers, upper=upper), Client(servers) as client:
        placed = {}
        for i in range(40):
            job = client.submit("upper", b"x", unique=f"key-{i}")
            job.result(5)
            placed[f"key-{i}"] = job.server
        assert set(placed.values()) == set(servers)  # the ring spreads keys
        for key, where in placed.items():  # ... and always to the same server
            assert client.submit("upper", b"y", unique=key).server == where
        spread = [client.submit("upper", b"z").server for _ in range(10)]
        assert spread.count(servers[0]) == spread.count(servers[1]) == 5
        # A second client (another process, say) puts the same keys on the same servers.
        with Client(list(reversed(servers))) as other:
            for key, where in list(placed.items())[:10]:
                assert other.submit("upper", b"y", unique=key).server == where


def test_a_server_that_is_down_is_skipped_then_retried_with_backoff(server):
    late_port = free_port()
    late_address = f"127.0.0.1:{late_port}"
    servers = f"{late_address},{server.address}"  # the comma-separated form
    with running_worker(servers, upper=upper), Client(servers, connect_timeout=5) as client:
        placed = {client.submit("upper", b"x", unique=f"k{i}").server for i in range(20)}
        assert placed == {server.address}  # the dead server's share failed over
        late = ServerProcess(server.kind)
        late.port = late_port
        late.start()
        try:
            deadline = time.monotonic() + 10
            job = None
            while time.monotonic() < deadline:
                job = client.submit("upper", b"back", unique=f"k{int(time.monotonic() * 10)}")
                if job.server == late_address:
                    break
                gevent.sleep(0.1)
            assert job.server == late_address  # retried after its back-off, and used
            assert job.result(15) == b"BACK"
        finally:
            late.stop()


def test_failover_when_a_server_dies_while_jobs_flow(two_servers, caplog):
    """Stop one of two servers while 20 greenlets submit jobs: no caller sees an error."""
    caplog.set_level(logging.INFO, logger="gearoffload.client")
    first, second = two_servers
    servers = [first.address, second.address]

    def work(job):
        gevent.sleep(0.02)
        return job.data

    errors: list[BaseException] = []
    results = []
    stop = Event()
    current = {}  # each submitter's job in flight

    def submitter(index: int, client: Client) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            data = b"%d-%d" % (index, n)
            unique = data.decode() if n % 2 else None  # hashed and round-robin jobs
            try:
                job = current[index] = client.submit("work", data, unique=unique)
                assert job.result(15) == data
                results.append(data)
            except BaseException as exc:  # noqa: B036 - the test reports every failure
                errors.append(exc)
                return

    with running_worker(servers, concurrency=20, work=work), \
            Client(servers, timeout=15) as client:
        greenlets = [gevent.spawn(submitter, i, client) for i in range(20)]
        gevent.sleep(0.5)
        before = len(results)
        # Jobs on the server that dies, or there would be nothing to fail over (about
        # half of the 20 in flight are there; this makes sure, instead of trusting it).
        assert poll_until(lambda: any(job.server == first.address and not job.done
                                      for job in current.values()))
        first.stop(signal.SIGKILL)
        gevent.sleep(1.0)
        stop.set()
        gevent.joinall(greenlets, timeout=20)
        assert not errors, errors[:3]
        assert before > 20 and len(results) > before + 20
        # Jobs were in flight on the dead server, and were resubmitted transparently.
        assert "resubmitting work job" in caplog.text
        # Everything after the failover went to the surviving server.
        assert client.submit("work", b"after", unique="after").server == second.address


def test_connection_drop_resubmits_into_the_same_server(our_server):
    """The connection drops but the server stays up: the client reconnects and resubmits
    with the same unique into the job its old connection abandoned. Our server revives or
    recreates that job (docs/protocol.md §3.8); gearmand 1.1.20 loses such a submission
    (Q4), which is why this runs against our server only."""
    executions = []
    with Client(our_server.address) as client:
        job = client.submit("later", b"x", unique="dropped")
        link = client._links[0]
        old_conn = link.conn
        old_conn._sock.shutdown(socket.SHUT_RDWR)  # simulate a network drop
        assert poll_until(lambda: link.conn not in (None, old_conn) and job.handle is not None)
        with running_worker(our_server.address,
                            later=lambda j: executions.append(j.unique) or b"done"):
            assert job.result(10) == b"done"
            gevent.sleep(0.2)
    assert executions == ["dropped"]


@pytest.mark.parametrize("kind", ["gearoffload", "gearmand"])
def test_foreground_job_lost_with_its_only_server_is_resubmitted(kind, server_factory):
    """The server dies with a queued job; it comes back on the same port; the client
    resubmits (same unique) and the caller gets the result as if nothing happened."""
    first = server_factory(kind)
    with Client(first.address, connect_timeout=10) as client:
        job = client.submit("upper", b"survivor", unique="survivor")
        assert job.handle
        first.stop(signal.SIGKILL)
        gevent.sleep(0.3)
        again = ServerProcess(kind)
        again.port = first.port
        again.start()
        try:
            with running_worker(again.address, upper=upper):
                assert job.result(10) == b"SURVIVOR"
            assert job.server == again.address and job.handle
        finally:
            again.stop()


@pytest.mark.parametrize("kind", ["gearoffload", "gearmand"])
def test_a_restarted_server_is_found_again_within_a_second(kind, server_factory, caplog):
    """Issue #15: after a job server restart the client answered NoServersAvailable for
    seconds (its back-off had grown towards 30 s, the worker's towards 10 s). Down for 5 s
    while a caller submits every 50 ms: few connect attempts reach the dead port, and
    within about a second of the restart jobs are accepted and run again."""
    caplog.set_level(logging.DEBUG, logger="gearoffload.worker")
    first = server_factory(kind)
    accepted: list[float] = []
    stop = Event()

    def prober(client: Client) -> None:
        while not stop.is_set():
            try:
                client.submit("upper", b"probe")
                accepted.append(time.monotonic())
            except NoServersAvailable:
                pass
            gevent.sleep(0.05)

    with running_worker(first.address, concurrency=2, upper=upper), \
            Client(first.address, connect_timeout=0.2) as client:
        assert client.call("upper", b"before", timeout=5) == b"BEFORE"
        link = client._links[0]
        first.stop(signal.SIGKILL)
        probe = gevent.spawn(prober, client)
        gevent.sleep(5.0)
        attempts = link.attempts
        worker_attempts = sum("cannot connect" in r.getMessage() for r in caplog.records)
        again = ServerProcess(kind)
        again.port = first.port
        try:
            again.start()
            back = time.monotonic()
            assert poll_until(lambda: accepted and accepted[-1] > back, timeout=3)
            found = accepted[-1] - back
            assert client.call("upper", b"after", timeout=5) == b"AFTER"
            ran = time.monotonic() - back
            stop.set()
            probe.join(2)
        finally:
            again.stop()
    # About one attempt a second once the back-off is at its cap (4 s before it): at
    # most 12, however often callers submit (100 submissions in those 5 s).
    assert 3 <= attempts - 1 <= 12, attempts
    assert 3 <= worker_attempts <= 12, worker_attempts
    assert found < 1.5, f"first accepted submission {found:.2f}s after the restart"
    assert ran < 2.0, f"first result {ran:.2f}s after the restart"


def test_a_server_that_drops_syns_never_holds_up_callers_while_another_is_up(server):
    """A down server is tried again about once a second now. A host that drops SYNs
    (here: a loopback listener with a full backlog) makes each attempt last the whole
    connect_timeout: while another server is connected, the attempt runs beside the
    callers instead of in front of one of them."""
    blackhole = socket.socket()
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(0)
    filler = socket.create_connection(blackhole.getsockname())  # the backlog is full
    dark = f"127.0.0.1:{blackhole.getsockname()[1]}"
    try:
        with running_worker(server.address, upper=upper), \
                Client([dark, server.address], connect_timeout=1.0, timeout=5) as client:
            for _ in range(2):  # whichever server the round-robin starts with
                assert client.call("upper", b"warm") == b"WARM"
            dark_link = client._links[0]
            attempts = dark_link.attempts
            slowest = 0.0
            end = time.monotonic() + 3.0
            calls = 0
            while time.monotonic() < end:
                started = time.monotonic()
                assert client.call("upper", b"x") == b"X"
                slowest = max(slowest, time.monotonic() - started)
                calls += 1
                gevent.sleep(0.02)
            retried = dark_link.attempts - attempts
    finally:
        filler.close()
        blackhole.close()
    assert slowest < 0.5, f"a call waited {slowest:.2f}s for the dark server"
    assert calls > 50
    assert 1 <= retried <= 4  # tried again, about once per second plus connect_timeout


class IdleClosingProxy:
    """Forwards to a server and closes both sides of a connection that carried no byte
    for ``idle`` seconds: a server that closes idle peers (#17 item 6), for any server."""

    def __init__(self, upstream: str, idle: float) -> None:
        from gevent.server import StreamServer

        self.upstream = upstream
        self.idle = idle
        self.closed = 0
        self._server = StreamServer(("127.0.0.1", 0), self._handle)
        self._server.start()
        self.address = f"127.0.0.1:{self._server.server_port}"

    def _handle(self, sock, _address) -> None:
        host, port = self.upstream.rsplit(":", 1)
        up = gevent.socket.create_connection((host, int(port)))
        last = [time.monotonic()]

        def pump(src, dst) -> None:
            try:
                while data := src.recv(65536):
                    last[0] = time.monotonic()
                    dst.sendall(data)
            except OSError:
                pass

        pumps = [gevent.spawn(pump, sock, up), gevent.spawn(pump, up, sock)]
        while not any(p.dead for p in pumps):
            gevent.sleep(0.05)
            if time.monotonic() - last[0] > self.idle:
                self.closed += 1
                break
        for s in (sock, up):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        gevent.killall(pumps)

    def stop(self) -> None:
        self._server.stop()


def test_idle_connections_closed_by_the_server_are_reopened_transparently(server, caplog):
    """Issue #17 item 6: a server may close a peer idle between packets. An idle
    client's next submission and an idle worker's next job just work, at once, without
    a warning (nothing was lost)."""
    caplog.set_level(logging.INFO, logger="gearoffload")
    proxy = IdleClosingProxy(server.address, idle=1.2)  # past _HEALTHY_AFTER (1 s)
    try:
        with running_worker(proxy.address, concurrency=1, upper=upper), \
                Client(proxy.address, timeout=5) as client:
            for round_ in range(3):
                assert client.call("upper", b"r%d" % round_) == b"R%d" % round_
                closed = proxy.closed
                assert poll_until(lambda c=closed: proxy.closed >= c + 2, timeout=3)
                gevent.sleep(0.1)  # both peers have seen the close
                started = time.monotonic()
                assert client.call("upper", b"again") == b"AGAIN"
                assert time.monotonic() - started < 0.5
    finally:
        proxy.stop()
    assert proxy.closed >= 6  # the client's and the worker's connection, three times
    noisy = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert noisy == []
    assert sum("(idle)" in r.getMessage() for r in caplog.records) >= 6


def test_interop_results_from_gearman_cli_workers(server):
    """Our client, `gearman -w` workers (libgearman: GRAB_JOB_ALL, a command per job)."""
    gearman = need_tool("gearman", "gearman-tools")
    workers = [gevent.subprocess.Popen(
        [gearman, "-h", "127.0.0.1", "-p", str(server.port), "-w", "-f", "cliupper",
         "--", "tr", "a-z", "A-Z"], stdout=gevent.subprocess.DEVNULL)
        for _ in range(2)]
    try:
        with Client(server.address) as client:
            jobs = [client.submit("cliupper", f"hello {i}") for i in range(10)]
            assert [j.result(10) for j in jobs] == [f"HELLO {i}".encode() for i in range(10)]
    finally:
        for proc in workers:
            proc.kill()
            proc.wait(5)


def test_an_accepted_job_lost_with_no_server_left_is_a_failure_not_unreachable(
        server_factory):
    """NoServersAvailable means no server accepted the job, so callers may run it
    elsewhere; a job accepted (and maybe run) before its only server died is JobFailed."""
    server = server_factory("gearoffload")
    with Client(server.address, timeout=10, connect_timeout=0.5) as client, \
            server.connect() as holder:
        holder.send(T.CAN_DO, b"held")
        job = client.submit("held", b"x")
        holder.send(T.GRAB_JOB)
        holder.expect(T.JOB_ASSIGN)  # running: it may have had effects already
        server.stop(signal.SIGKILL)
        with pytest.raises(JobFailed) as failed:
            job.result(10)
        assert not isinstance(failed.value, NoServersAvailable)
        assert "no server to resubmit it to" in str(failed.value)
        with pytest.raises(NoServersAvailable):  # never accepted anywhere
            client.call("held", b"y", timeout=5)
