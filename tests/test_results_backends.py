"""Result backends of background jobs (issue #14): Redis beside gearmand (which keeps no
results), and a clear answer where the job server keeps none. Real gearmand, redis-server
and job server processes; a Worker serving the tasks in a greenlet of this process; every
outcome read through a second ``Offloader`` that shares nothing with the first but the
services."""

from __future__ import annotations

from collections.abc import Iterator

import gevent
import pytest
from test_store import RedisServer

import gearoffload
from conftest import ServerProcess, gevent_time_limit, need_module, need_tool, working
from gearoffload import Worker
from gearoffload.core import OffloadConfig, Offloader, http_error
from gearoffload.registry import TaskRegistry
from gearoffload.results import Outcome, RedisResults

TASKS = TaskRegistry()
time_limit = gevent_time_limit(40)


@gearoffload.offload(registry=TASKS)
def slow_sum(values):
    for i in range(1, 4):
        gearoffload.progress(i, 3)
        gevent.sleep(0.15)
    return sum(values)


@gearoffload.offload(registry=TASKS)
def fails(text):
    raise ValueError(f"no good: {text}")


@pytest.fixture
def redis_url() -> Iterator[str]:
    need_module("redis")
    server = RedisServer(need_tool("redis-server", "redis-server")).start()
    yield f"redis://127.0.0.1:{server.port}/0"
    server.stop()


@pytest.fixture
def gearmand() -> Iterator[ServerProcess]:
    server = ServerProcess("gearmand").start()
    yield server
    server.stop()


def wait_end(job, timeout: float = 10.0) -> list[Outcome]:
    seen = []
    for _ in range(int(timeout / 0.02)):
        outcome = job.outcome()
        seen.append(outcome)
        if outcome.state in ("done", "failed", "dead"):
            return seen
        gevent.sleep(0.02)
    raise AssertionError(f"the job did not end: {seen[-1]}")


def test_redis_results_beside_gearmand(gearmand, redis_url):
    gearoffload.configure(servers=gearmand.address, results=redis_url, secret_key="k")
    try:
        with working(Worker(gearmand.address, concurrency=4, registry=TASKS)):
            job = slow_sum.background([1, 2, 3])
            seen = wait_end(job)
            assert seen[-1].state == "done" and job.result() == 6
            # Progress while it ran came from gearmand's GET_STATUS_UNIQUE.
            assert any(o.state == "running" and o.denominator == 3 for o in seen)
            failed = fails.background("x")
            assert wait_end(failed)[-1].state == "failed"
        # Another offloader, sharing nothing but the services, reads the same outcomes.
        reader = Offloader(OffloadConfig(servers=gearmand.address, results=redis_url,
                                         secret_key="k"))
        assert reader.results.read(job.id).state == "done"
        text = reader.results.read(failed.id).data.decode()
        assert text.startswith("ValueError: no good: x") and "Traceback" in text
        assert reader.results.read("bg-never-submitted").state == "unknown"
    finally:
        gearoffload.offloading.configure_reset()


def test_redis_outcomes_expire(redis_url):
    results = RedisResults(redis_url, ttl=1)
    results.write("bg-a", Outcome("done", data=b"1"))
    assert results.read("bg-a").data == b"1"
    gevent.sleep(2.1)
    assert results.read("bg-a").state == "unknown"


def test_the_server_backend_beside_gearmand_says_what_to_do(gearmand):
    from gearoffload.admin import ResultsUnsupported

    offloader = Offloader(OffloadConfig(servers=gearmand.address, secret_key="k"))
    with pytest.raises(ResultsUnsupported, match="Redis result backend") as caught:
        offloader.results.read("bg-anything")
    answer = http_error(caught.value)
    assert answer.status == 501 and "GEAROFFLOAD_RESULTS" in answer.message


def test_server_results_survive_a_worker_that_never_comes(our_server):
    offloader = Offloader(OffloadConfig(servers=our_server.address, secret_key="k"))
    ref = offloader.start("nobody.serves.this", b"x")
    assert offloader.outcome(ref).state == "queued"  # kept by the server, no worker yet
