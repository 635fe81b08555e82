"""Two servers with queue stores, clients and workers on both; one server is killed and
restarted while jobs flow: no caller sees an error, no acknowledged job is lost."""

from __future__ import annotations

import signal
from collections import Counter

import gevent
from gevent.event import Event

from conftest import ServerProcess, gevent_time_limit
from gearoffload import Client, Worker

time_limit = gevent_time_limit(90)


def stored_server(db, port: int | None = None) -> ServerProcess:
    server = ServerProcess("gearoffload", ["--queue", f"sqlite://{db}"])
    if port is not None:
        server.port = port
    return server.start()


def test_kill_and_restart_one_of_two_servers_while_jobs_flow(tmp_path):
    first = stored_server(tmp_path / "first.db")
    second = stored_server(tmp_path / "second.db")
    restarted: ServerProcess | None = None
    servers = [first.address, second.address]
    executed: Counter[bytes] = Counter()

    def work(job):
        executed[job.data] += 1
        gevent.sleep(0.02)
        return job.data

    # Slower than the submitters, so that the killed server holds a backlog.
    worker = Worker(servers, concurrency=8)
    worker.register("work", work)
    worker_greenlet = gevent.spawn(worker.work)
    errors: list[BaseException] = []
    answered: list[bytes] = []
    acknowledged: list[bytes] = []
    stop = Event()

    def foreground(index: int, client: Client) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            data = b"fg-%d-%d" % (index, n)
            unique = data.decode() if n % 2 else None  # hashed and round-robin jobs
            try:
                assert client.submit("work", data, unique=unique).result(30) == data
                answered.append(data)
            except BaseException as exc:  # noqa: B036 - the test reports every failure
                errors.append(exc)
                return

    def background(client: Client) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            data = b"bg-%d" % n
            try:
                client.submit("work", data, unique=data.decode(), background=True)
                acknowledged.append(data)  # JOB_CREATED came: it must run
            except BaseException as exc:  # noqa: B036
                errors.append(exc)
                return
            gevent.sleep(0.002)

    try:
        with Client(servers, timeout=30) as client:
            greenlets = [gevent.spawn(foreground, i, client) for i in range(10)]
            greenlets.append(gevent.spawn(background, client))
            gevent.sleep(0.8)
            first.stop(signal.SIGKILL)
            acked_before_kill = len(acknowledged)
            gevent.sleep(0.5)
            restarted = stored_server(tmp_path / "first.db", port=first.port)
            gevent.sleep(1.5)
            stop.set()
            gevent.joinall(greenlets, timeout=30)
            assert not errors, errors[:3]
            assert acked_before_kill > 20 and len(acknowledged) > acked_before_kill + 20
            assert len(answered) > 100
            # Every acknowledged background job runs, on whichever server held it; the
            # ones the killed server held come back from its store after the restart.
            deadline = gevent.get_hub().loop.now() + 30
            while gevent.get_hub().loop.now() < deadline:
                if all(data in executed for data in acknowledged):
                    break
                gevent.sleep(0.1)
            missing = [d for d in acknowledged if d not in executed]
            assert not missing, f"{len(missing)} acknowledged jobs never ran: {missing[:5]}"
            assert all(executed[data] >= 1 for data in answered)
        restarted.stop()
        log = restarted.stderr_text()
        restored = int(log.split(" background jobs restored")[0].rsplit(" ", 1)[-1])
        assert restored > 0, log  # the restart really replayed acknowledged jobs
    finally:
        worker.stop(graceful=False)
        worker_greenlet.join(5)
        for server in (first, second, restarted):
            if server is not None:
                server.stop()
