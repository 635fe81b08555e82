"""gearoffload.Worker against real servers: ours and Debian's gearmand (``server`` runs each
test against both). Workers run in greenlets of this process, or as child processes when
a test has to kill one.
"""

from __future__ import annotations

import importlib.util
import json
import signal
import sys
import time

import gevent
import gevent.socket
import gevent.subprocess
import pytest
from gevent.event import Event

from conftest import (
    ROOT,
    ServerProcess,
    compiled_and_source,
    free_port,
    gevent_time_limit,
    need_tool,
    poll_until,
    working,
)
from gearoffload import Client, TaskRegistry, Worker
from gearoffload.errors import JobFailed
from gearoffload.worker import _Mailbox, _Runners, _Slots

TEST_TIME_LIMIT = 40


time_limit = gevent_time_limit(TEST_TIME_LIMIT)
# The compiled modules, and their .py in this process (slow: under CI=true or --run-slow).
variant = compiled_and_source(slow=True)


def test_task_sees_the_job(server):
    seen = {}
    worker = Worker(server.address, client_id="test worker")

    @worker.task("inspect")
    def inspect(job):
        seen.update(handle=job.handle, function=job.function, unique=job.unique,
                    data=job.data, server=job.server)
        return None  # an empty result

    with working(worker), Client(server.address) as client:
        job = client.submit("inspect", b"pay\0load", unique="u-1")
        assert job.result(5) == b""
    assert seen == {"handle": job.handle, "function": "inspect", "unique": "u-1",
                    "data": b"pay\0load", "server": server.address}
    with server.connect() as admin:  # the worker is gone; nothing stays registered
        status = admin.admin("status")
        if server.kind == "gearmand":
            assert b"inspect\t0\t0\t0" in status
        else:  # nor worker nor job: the function is forgotten (issue #17)
            assert b"inspect\t" not in status


def test_concurrency_runs_m_jobs_at_once(server):
    running = []
    peak = []

    def slow(job):
        running.append(job)
        peak.append(len(running))
        gevent.sleep(0.3)
        running.remove(job)
        return job.data

    worker = Worker(server.address, concurrency=5)
    worker.register("slow", slow)
    with working(worker), Client(server.address) as client:
        started = time.monotonic()
        jobs = client.submit_many([("slow", b"%d" % i) for i in range(10)])
        assert [j.result(5) for j in jobs] == [b"%d" % i for i in range(10)]
        elapsed = time.monotonic() - started
    assert max(peak) == 5
    assert 0.55 < elapsed < 2.0  # two waves of five, not ten in a row


def test_worker_keeps_serving_when_one_server_is_down_and_picks_it_up_later(server):
    late_port = free_port()
    late_address = f"127.0.0.1:{late_port}"
    worker = Worker([late_address, server.address])
    worker.register("ping", lambda job: b"pong " + job.data)
    with working(worker):
        with Client(server.address) as client:
            assert client.submit("ping", b"1").result(5) == b"pong 1"
        late = ServerProcess(server.kind)
        late.port = late_port
        late.start()
        try:
            with Client(late_address) as client:  # reconnect back-off is at most 1 s
                assert client.submit("ping", b"2").result(15) == b"pong 2"
        finally:
            late.stop()


def test_worker_reconnects_and_reregisters_after_server_restart(server):
    worker = Worker(server.address, client_id="rejoin")
    worker.register("ping", lambda job: b"pong")
    with working(worker):
        with Client(server.address) as client:
            assert client.submit("ping").result(5) == b"pong"
        server.stop(signal.SIGKILL)
        again = ServerProcess(server.kind)
        again.port = server.port
        again.start()
        try:
            with Client(again.address) as client:
                assert client.submit("ping").result(15) == b"pong"
            with again.connect() as admin:
                workers = admin.admin("workers").decode()
            assert any(line.split()[2:] == ["rejoin", ":", "ping"]
                       for line in workers.splitlines())
        finally:
            again.stop()


WORKER_THAT_HANGS = """
import sys, time
from gearoffload import Worker
worker = Worker(sys.argv[1])

@worker.task("fragile")
def fragile(job):
    print("started", job.handle, flush=True)
    time.sleep(60)  # killed long before this ends

worker.work()
"""


def test_worker_killed_mid_job_the_job_is_requeued_and_completes(server):
    proc = gevent.subprocess.Popen([sys.executable, "-c", WORKER_THAT_HANGS, server.address],
                                   stdout=gevent.subprocess.PIPE, cwd=ROOT)
    try:
        with Client(server.address) as client:
            job = client.submit("fragile", b"data")
            line = proc.stdout.readline().decode().split()
            assert line == ["started", job.handle]
            proc.send_signal(signal.SIGKILL)
            proc.wait(5)
            rescuer = Worker(server.address)
            rescuer.register("fragile", lambda j: b"completed " + j.data + j.handle.encode())
            with working(rescuer):
                # Requeued by the server, not resubmitted: same handle.
                assert job.result(10) == b"completed data" + job.handle.encode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


@pytest.mark.parametrize("kind", ["gearoffload", "gearmand"])
def test_worker_killed_with_job_retries_exhausted_fails_the_job(kind, server_factory):
    """With --job-retries 1 the first lost attempt ends the job: the client gets
    JobFailed (WORK_FAIL from the server) at once instead of waiting."""
    server = server_factory(kind, "--job-retries", "1")
    proc = gevent.subprocess.Popen([sys.executable, "-c", WORKER_THAT_HANGS, server.address],
                                   stdout=gevent.subprocess.PIPE, cwd=ROOT)
    try:
        with Client(server.address) as client:
            job = client.submit("fragile", b"data")
            assert proc.stdout.readline().decode().split() == ["started", job.handle]
            proc.send_signal(signal.SIGKILL)
            with pytest.raises(JobFailed):
                job.result(5)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(5)


def test_graceful_stop_finishes_running_jobs_and_grabs_no_more(server):
    started = Event()

    def slow(job):
        started.set()
        gevent.sleep(0.5)
        return b"finished"

    worker = Worker(server.address, concurrency=1)
    worker.register("slow", slow)
    greenlet = gevent.spawn(worker.work)
    with Client(server.address) as client:
        first = client.submit("slow")
        assert started.wait(5)
        second = client.submit("slow")  # queued behind the running one
        stopped_at = time.monotonic()
        worker.stop(graceful=True)  # returns once the running job is done
        assert 0.3 < time.monotonic() - stopped_at < 3
        assert greenlet.dead
        assert first.result(5) == b"finished"
        status = second.status()
        assert status.known and not status.running  # never grabbed
        # The same Worker can work again; it picks up what is left.
        with working(worker):
            assert second.result(5) == b"finished"


def test_a_draining_worker_does_not_hold_up_new_jobs(server):
    """A worker asleep with a long job still running is told to drain; a new job must not
    wait for that drain (a server that wakes one sleeper per job may pick the draining
    worker, which therefore still answers that NOOP with a GRAB: docs/protocol.md §3.6
    rule 4)."""
    started = Event()

    def long(job):
        started.set()
        gevent.sleep(2)
        return b"long"

    draining = Worker(server.address, concurrency=2)
    draining.register("long", long)
    draining.register("quick", lambda job: b"quick")
    other = Worker(server.address)
    other.register("quick", lambda job: b"quick")
    other.register("warm", lambda job: b"warm")
    with working(draining), working(other), Client(server.address) as client:
        long_job = client.submit("long")
        assert started.wait(5)
        assert client.submit("warm").result(5) == b"warm"  # `other` now sleeps last
        gevent.sleep(0.2)
        draining.stop(wait=False)
        gevent.sleep(0.2)
        started_at = time.monotonic()
        assert client.submit("quick").result(5) == b"quick"
        assert time.monotonic() - started_at < 1.0
        assert long_job.result(5) == b"long"


def test_stop_is_prompt_even_while_a_server_is_down(server):
    worker = Worker([f"127.0.0.1:{free_port()}", server.address], concurrency=3)
    worker.register("ping", lambda job: b"pong")
    greenlet = gevent.spawn(worker.work)
    with Client(server.address) as client:
        assert client.submit("ping").result(5) == b"pong"
    gevent.sleep(0.5)  # the dead server's reconnect loop is backing off by now
    started = time.monotonic()
    worker.stop()
    assert time.monotonic() - started < 1.0
    assert greenlet.dead


def test_hard_stop_abandons_jobs_to_another_worker(server):
    started = Event()

    def stuck(job):
        started.set()
        gevent.sleep(30)

    worker = Worker(server.address)
    worker.register("stuck", stuck)
    greenlet = gevent.spawn(worker.work)
    with Client(server.address) as client:
        job = client.submit("stuck", b"x")
        assert started.wait(5)
        worker.stop(graceful=False)
        assert greenlet.join(5) is None and greenlet.dead
        rescuer = Worker(server.address)
        rescuer.register("stuck", lambda j: b"rescued")
        with working(rescuer):
            assert job.result(10) == b"rescued"


@pytest.mark.parametrize("kind", ["gearoffload", "gearmand"])
def test_a_one_slot_worker_runs_on_after_one_of_its_servers_is_killed(kind, server_factory):
    """Issue #17 item 9: with jobs flowing through both servers, kill -9 one of them. A
    GRAB sent to the dead connection held the only slot for good, and the worker never
    ran another job; now 100 calls complete on the surviving server."""
    first, second = server_factory(kind), server_factory(kind)
    servers = [first.address, second.address]
    ran = []

    def work(job):
        ran.append(job.server)
        gevent.sleep(0.005)
        return job.data

    worker = Worker(servers, concurrency=1)
    worker.register("work", work)
    stop = Event()
    flowing = []

    def caller(client: Client) -> None:
        while not stop.is_set():
            flowing.append(client.call("work", b"x", timeout=10))

    with working(worker), Client(servers, timeout=10) as client:
        callers = [gevent.spawn(caller, client) for _ in range(4)]
        deadline = time.monotonic() + 10
        while not {first.address, second.address} <= set(ran[-20:]):
            assert time.monotonic() < deadline, "jobs never flowed through both servers"
            gevent.sleep(0.05)
        first.stop(signal.SIGKILL)
        stop.set()
        gevent.joinall(callers, timeout=15)
        assert all(g.dead for g in callers)
        started = time.monotonic()
        results = []

        def ten(index: int) -> None:
            for n in range(10):
                results.append(client.call("work", b"%d-%d" % (index, n), timeout=10))

        batch = [gevent.spawn(ten, i) for i in range(10)]
        gevent.joinall(batch, timeout=20)
        assert [g.exception for g in batch if not g.successful()] == []
        assert len(results) == 100
        assert time.monotonic() - started < 10
        # Nothing runs now: once its last GRAB is answered the worker sleeps, slot free.
        assert poll_until(lambda: worker._slots.free == 1, timeout=3)


def test_task_timeout_lets_the_server_requeue(server):
    attempts = []

    def sometimes_slow(job):
        attempts.append(time.monotonic())
        if len(attempts) == 1:
            gevent.sleep(20)  # over the 1 s limit: the server takes the job back
        return b"attempt %d" % len(attempts)

    # concurrency=1: against gearmand 1.1.20 a PRE_SLEEP (which a worker with a free slot
    # sends) cancels the CAN_DO_TIMEOUT timer (Q6), and the job would fail instead.
    worker = Worker(server.address, concurrency=1)
    worker.task("sometimes_slow", timeout=1)(sometimes_slow)
    with working(worker), Client(server.address) as client:
        job = client.submit("sometimes_slow", b"")
        if server.kind == "gearoffload":
            # Ours fails a timed-out attempt to its caller, as the Perl server does
            # (issue #17: a job that always outlives its timeout ran forever).
            with pytest.raises(JobFailed):
                job.result(10)
            assert len(attempts) == 1
            return
        assert job.result(10) == b"attempt 2"
    assert 0.9 < attempts[1] - attempts[0] < 5


def test_task_timeout_fails_the_job_if_the_server_keeps_it(server):
    """A server that does not take the job back (gearmand after PRE_SLEEP, Q6): the
    worker's own limit ends the job with WORK_FAIL instead of holding it forever."""
    worker = Worker(server.address, concurrency=2)
    worker.task("hangs", timeout=1)(lambda job: gevent.sleep(30))
    with working(worker), Client(server.address) as client:
        job = client.submit("hangs", b"")
        started = time.monotonic()
        with pytest.raises(JobFailed):
            job.result(10)
        # Ours fails the attempt at its CAN_DO_TIMEOUT (issue #17); gearmand keeps the
        # job and the worker's own limit (1.1 x timeout + 1 s) fails it.
        low = 1.5 if server.kind == "gearmand" else 0.9
        assert low < time.monotonic() - started < 5


def test_registering_while_working_and_unknown_functions(server):
    worker = Worker(server.address)
    worker.register("first", lambda job: b"1")
    with working(worker), Client(server.address) as client:
        assert client.submit("first").result(5) == b"1"
        worker.register("second", lambda job: b"2")
        assert client.submit("second").result(5) == b"2"
        gevent.sleep(0.1)  # the worker is asleep now
        queued = client.submit("third")  # queued before anyone can do it
        worker.register("third", lambda job: b"3")
        assert queued.result(5) == b"3"
    with pytest.raises(ValueError):
        Worker(server.address).work()  # nothing registered
    with pytest.raises(TypeError):
        worker.register("bad", "not callable")


def test_task_returning_a_bad_type_or_failing_explicitly(server):
    worker = Worker(server.address)
    worker.register("number", lambda job: 42)

    @worker.task
    def refuse(job):
        raise JobFailed("no")

    with working(worker), Client(server.address) as client:
        with pytest.raises(Exception) as info:
            client.submit("number").result(5)
        assert "TypeError" in str(info.value)
        with pytest.raises(JobFailed):
            client.submit("refuse").result(5)


def test_a_task_skips_stale_jobs_fast_by_raising_job_failed(server):
    """Issue #15 "stale work": the web layer carries a deadline in its envelope and its
    task refuses a job whose caller has given up, without running anything:
    ``raise JobFailed(...)`` is a WORK_FAIL at once. A one-slot worker with 100 stale
    jobs queued ahead gets through them at once, and the job behind them runs."""
    ran = []

    def guarded(job):
        deadline = float(job.data.split(b" ", 1)[0])
        if time.time() > deadline:
            raise JobFailed("the caller's deadline has passed")  # nothing runs
        ran.append(job.data)
        gevent.sleep(0.05)
        return b"done"

    with Client(server.address, timeout=10) as client:
        past = time.time() - 1
        stale = client.submit_many([("guarded", b"%f stale-%d" % (past, i))
                                    for i in range(100)])
        fresh = client.submit("guarded", b"%f fresh" % (time.time() + 30))
        worker = Worker(server.address, concurrency=1)
        worker.register("guarded", guarded)
        with working(worker):
            started = time.monotonic()
            assert fresh.result(10) == b"done"
            took = time.monotonic() - started
            for job in stale:
                with pytest.raises(JobFailed):
                    job.result(5)
    assert [data.split(b" ", 1)[1] for data in ran] == [b"fresh"]
    assert took < 3.0  # 100 refusals and one 50 ms job behind them, on one slot


def _load_wordcount():
    spec = importlib.util.spec_from_file_location("wordcount_example",
                                                  ROOT / "examples" / "wordcount.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_map_reduce_word_count_without_deadlock(server, tmp_path):
    """More reducers than mapper slots can ever block: each runs in its own Worker."""
    wordcount = _load_wordcount()
    files = []
    for i in range(6):
        path = tmp_path / f"f{i}.txt"
        path.write_text(("apple banana " * (i + 1)) + "cherry\n")
        files.append(str(path))
    map_worker, reduce_worker = wordcount.run_workers(server.address, map_concurrency=2,
                                                      reduce_concurrency=4)
    try:
        with Client(server.address) as client:
            # Four reducers at once, all waiting on sub-jobs: still no deadlock.
            jobs = [client.submit("wordcount", json.dumps(files)) for _ in range(4)]
            results = [json.loads(job.result(20)) for job in jobs]
        assert results == [{"apple": 21, "banana": 21, "cherry": 6}] * 4
    finally:
        map_worker.stop(graceful=False)
        reduce_worker.stop(graceful=False)
        wordcount.client().close()


def test_interop_serves_jobs_from_the_gearman_cli(server):
    """`gearman -f FUNC data` (libgearman client, UUID uniques) against our worker."""
    gearman = need_tool("gearman", "gearman-tools")
    tasks = TaskRegistry()
    tasks.register("shout", lambda job: job.data.upper() + b"!")
    with working(Worker(server.address, registry=tasks, concurrency=4)):
        outputs = []
        for word in ("hello", "gear man"):
            out = gevent.subprocess.run(
                [gearman, "-h", "127.0.0.1", "-p", str(server.port), "-f", "shout", word],
                capture_output=True, timeout=10)
            assert out.returncode == 0, out.stderr
            outputs.append(out.stdout)
        background = gevent.subprocess.run(
            [gearman, "-h", "127.0.0.1", "-p", str(server.port), "-b", "-f", "shout", "bg"],
            capture_output=True, timeout=10)
        assert background.returncode == 0
    assert outputs == [b"HELLO!", b"GEAR MAN!"]


def test_runners_are_reused_and_never_make_a_job_wait_for_another():
    """The worker's job greenlets (``_Runners``): a job goes to an idle runner or a new
    one, never behind a job that blocks; runners are reused; a runner that dies of an
    escaping exception is replaced."""
    started, release, order = [], Event(), []

    class Escape(BaseException):
        """Not an Exception: the worker's own handlers let it through."""

    def run(name, blocks):
        started.append(name)
        if blocks:
            release.wait()
        if name == "dies":
            raise Escape("kills its runner")
        order.append(name)

    runners = _Runners(run)
    with gevent.Timeout(5):
        runners.spawn("slow", True)
        runners.spawn("fast-1", False)  # a second runner: does not wait behind slow
        while len(started) < 2:
            gevent.sleep(0.01)
        runners.spawn("fast-2", False)  # fast-1's runner is idle again: reused
        while len(started) < 3:
            gevent.sleep(0.01)
        assert order == ["fast-1", "fast-2"] and len(runners) == 1
        assert len(runners._greenlets) == 2
        assert not runners.join(0.05)
        release.set()
        assert runners.join(1) and order == ["fast-1", "fast-2", "slow"]
        runners.spawn("dies", False)
        gevent.sleep(0.05)
        runners.spawn("after", False)
        assert runners.join(1) and order[-1] == "after" and len(runners) == 0
        runners.kill()
        assert not runners._greenlets


def test_jobs_handed_over_at_once_all_run_even_with_one_runner_idle():
    """Several jobs handed over with no switch in between (one read's JOB_ASSIGNs) while
    a single runner is idle: each gets a runner of its own. A version that woke the idle
    runner for the first and started no others ran the rest one after another."""
    running, release = [0], Event()

    def run(blocks):
        running[0] += 1
        if blocks:
            release.wait()
        running[0] -= 1

    runners = _Runners(run)
    with gevent.Timeout(5):
        runners.spawn(False)
        assert runners.join(1) and len(runners._greenlets) == 1  # one runner, idle
        for _ in range(3):
            runners.spawn(True)
        for _ in range(100):
            if running[0] == 3:
                break
            gevent.sleep(0.01)
        assert running[0] == 3 and len(runners._greenlets) == 3
        release.set()
        assert runners.join(1) and len(runners._greenlets) == 3  # kept for later jobs
        runners.kill()


def test_slots_count_and_wake_a_waiting_session():
    """The worker's job slots (``_Slots``): take() until none is free; wait() returns
    True when a slot is released, False when its timeout passes first."""
    slots = _Slots(2)
    assert slots.take() and slots.take() and not slots.take()
    with gevent.Timeout(5):
        started = time.monotonic()
        assert slots.wait(0.05) is False and time.monotonic() - started >= 0.04
        gevent.spawn_later(0.05, slots.release)
        assert slots.wait(2) is True
        assert slots.take() and not slots.take()
        # Two waiters, two releases: each is woken once, none is left registered.
        woken = []
        waiters = [gevent.spawn(lambda: woken.append(slots.wait(2))) for _ in range(2)]
        gevent.sleep(0.01)
        slots.release()
        slots.release()
        gevent.joinall(waiters)
        assert woken == [True, True] and not slots._waiters and slots.free == 2


def test_a_session_mailbox_hands_over_in_order_and_wakes_its_reader_once():
    inbox = _Mailbox()
    inbox.put("a")
    assert inbox.get() == "a"  # no wait when something is there
    got = []
    reader = gevent.spawn(lambda: got.extend(inbox.get() for _ in range(3)))
    gevent.sleep(0.01)
    for item in ("b", "c", "d"):
        inbox.put(item)  # the first wakes the reader; the others wait in the deque
    with gevent.Timeout(5):
        reader.join()
    assert got == ["b", "c", "d"] and inbox._waiter is None


def test_jobs_one_at_a_time_cost_a_few_grabs_each_not_one_per_slot(server):
    """A worker with many slots, woken for one job at a time (a web app's usual load),
    sends a handful of GRABs per job, not one per free slot (each answered NO_JOB)."""
    from gevent.server import StreamServer

    from gearoffload.protocol import REQ, Decoder
    from gearoffload.protocol import PacketType as T

    grabs = [0]
    host, port = server.address.rsplit(":", 1)

    def relay(downstream, address):
        upstream = gevent.socket.create_connection((host, int(port)))
        decoder = Decoder(magic=REQ, text=False)

        def count(packet):
            if packet.type == T.GRAB_JOB_UNIQ:
                grabs[0] += 1

        def back():
            try:
                while data := upstream.recv(65536):
                    downstream.sendall(data)
            except OSError:
                pass
            downstream.close()

        reader = gevent.spawn(back)
        try:
            while data := downstream.recv(65536):
                decoder.dispatch(data, count, lambda line: None)
                upstream.sendall(data)
        except OSError:
            pass  # the worker or the server went away: the test is over
        finally:
            upstream.close()
            reader.kill()

    proxy = StreamServer(("127.0.0.1", 0), relay)
    proxy.start()
    worker = Worker(f"127.0.0.1:{proxy.server_port}", concurrency=50)
    worker.register("echo", lambda job: job.data)
    try:
        with working(worker), Client(server.address) as client:
            client.call("echo", b"warm-up", timeout=5)
            before = grabs[0]
            for i in range(20):
                assert client.call("echo", b"%d" % i, timeout=5) == b"%d" % i
            per_job = (grabs[0] - before) / 20
    finally:
        proxy.stop()
    assert per_job <= 4, f"{per_job} GRABs per job (one per slot would be 50)"
