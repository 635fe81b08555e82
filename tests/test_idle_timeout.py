"""The library against our server's own ``--idle-timeout`` (issue #17 item 6): peers idle
between whole packets are closed; the client and worker reopen their connections at once.

Its own file: it skips while the server closes only peers that never sent anything (the
server side of item 6), and ``test_compiled_build`` wants no skip in ``test_client.py``.
The same behaviour is tested against any server through a proxy in ``test_client.py``
(``test_idle_connections_closed_by_the_server_are_reopened_transparently``).
"""

from __future__ import annotations

import logging
import time

import gevent
import pytest

from conftest import gevent_time_limit, working
from gearoffload import Client, Worker

time_limit = gevent_time_limit(40)


def upper(job):
    return job.data.upper()


def slow(job):
    gevent.sleep(float(job.data))
    return b"slept"


def test_our_servers_idle_timeout_closes_idle_peers_and_the_library_carries_on(
        server_factory, caplog):
    """The same against our server's own --idle-timeout, once it closes peers idle
    between packets (#17 item 6, server side; skipped while it closes only silent ones).
    A caller waiting for a job longer than the timeout is never cut off."""
    caplog.set_level(logging.INFO, logger="gearoffload")
    server = server_factory("gearoffload", "--idle-timeout", "1")
    worker = Worker(server.address, concurrency=2)
    worker.register("upper", upper)
    worker.register("slow", slow)
    with working(worker), Client(server.address, timeout=10) as client:
        assert client.call("upper", b"a") == b"A"
        gevent.sleep(2.2)
        if not any("(idle)" in r.getMessage() for r in caplog.records):
            pytest.skip("this server closes only peers that never sent anything")
        started = time.monotonic()
        assert client.call("upper", b"b") == b"B"
        assert time.monotonic() - started < 0.5
        link = client._links[0]
        conn = link.conn
        assert client.call("slow", b"2.5") == b"slept"  # 2.5 s > the idle timeout
        assert link.conn is conn  # never cut off while waiting
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING
            and r.name.startswith("gearoffload.")
            and not r.name.startswith("gearoffload.server")] == []
