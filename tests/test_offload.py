"""``@offload`` for plain functions against a real server, with workers in greenlets of this
process (and one real ``gearoffload-worker`` pool finding the functions by import)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date, datetime, timedelta, timezone

import gevent
import gevent.subprocess
import pytest

import gearoffload
from conftest import ROOT, free_port, gevent_time_limit, need_module, working
from gearoffload import Worker, offloading
from gearoffload.errors import JobException, JobFailed, NoServersAvailable
from gearoffload.registry import TaskRegistry

TEST_TIME_LIMIT = 30
TASKS = TaskRegistry()  # the test functions register here, not in the global registry
CALLS: list[tuple] = []


time_limit = gevent_time_limit(TEST_TIME_LIMIT)


@pytest.fixture(autouse=True)
def reset_config(monkeypatch) -> Iterator[None]:
    CALLS.clear()
    # Jobs are signed: the callers here and the workers (in-process or forked) share a key.
    monkeypatch.setenv("GEAROFFLOAD_SECRET_KEY", "offload-tests")
    offloading.configure_reset()
    yield
    offloading.configure_reset()


@contextmanager
def serving(address: str, concurrency: int = 20) -> Iterator[Worker]:
    with working(Worker(address, concurrency=concurrency, registry=TASKS)) as worker:
        yield worker


@gearoffload.offload(registry=TASKS)
def add(a, b=0):
    CALLS.append(("add", a, b))
    return a + b


@gearoffload.offload(unique=True, registry=TASKS)
def slow_square(x):
    CALLS.append(("slow_square", x))
    gevent.sleep(0.3)
    return {"x": x, "square": x * x, "raw": b"\x00\xff"}


@gearoffload.offload(name="custom-name", unique=lambda month: f"report:{month}",
                     registry=TASKS)
def report(month):
    CALLS.append(("report", month))
    gevent.sleep(0.2)
    return f"report {month}"


@gearoffload.offload(registry=TASKS)
def boom(text):
    raise RuntimeError(f"exploded on {text}")


@gearoffload.offload(registry=TASKS)
def steps(n):
    for i in range(1, n + 1):
        gearoffload.progress(i, n)
        gevent.sleep(0.02)
    return n


@gearoffload.offload(fallback="local", registry=TASKS)
def resilient(x):
    CALLS.append(("resilient", x))
    return x * 2


def test_call_runs_on_a_worker_and_returns_the_value(our_server):
    gearoffload.configure(servers=our_server.address)
    with serving(our_server.address) as worker:
        assert add(2, b=3) == 5
        assert slow_square(4) == {"x": 4, "square": 16, "raw": b"\x00\xff"}
        assert worker.jobs_done == 2
    assert add.name == "test_offload.add"
    assert report.name == "custom-name"
    assert sorted(TASKS.names()) == sorted(
        ["test_offload.add", "test_offload.slow_square", "custom-name", "test_offload.boom",
         "test_offload.steps", "test_offload.resilient"])


def test_background_returns_a_job_at_once_and_local_runs_here(our_server):
    gearoffload.configure(servers=our_server.address)
    job = add.background(20, 22)  # no worker yet: the job waits on the server
    assert job.id.startswith("bg-") and job.outcome().state == "queued"
    assert add.local(1, 1) == 2 and CALLS == [("add", 1, 1)]
    with serving(our_server.address):
        assert job.result(timeout=5) == 42
    assert ("add", 20, 22) in CALLS
    # Any process can read it by its id: here, a fresh handle on the same id.
    assert add.job(job.id).outcome().state == "done"


def test_unique_true_coalesces_identical_concurrent_calls(our_server):
    gearoffload.configure(servers=our_server.address)
    with serving(our_server.address):
        calls = [gevent.spawn(slow_square, 7) for _ in range(50)]
        calls += [gevent.spawn(slow_square, 8) for _ in range(10)]
        gevent.joinall(calls, raise_error=True)
    values = [g.value["square"] for g in calls]
    assert values == [49] * 50 + [64] * 10
    assert sorted(CALLS) == [("slow_square", 7), ("slow_square", 8)]
    assert slow_square.unique_for((7,), {}) == slow_square.unique_for((7,), {})
    assert slow_square.unique_for((7,), {}) != slow_square.unique_for((8,), {})


def test_unique_callable_chooses_the_key(our_server):
    gearoffload.configure(servers=our_server.address)
    with serving(our_server.address):
        assert report.unique_for(("2026-11",), {}) == "report:2026-11"
        calls = [gevent.spawn(report, "2026-11") for _ in range(5)]
        gevent.joinall(calls, raise_error=True)
    assert [g.value for g in calls] == ["report 2026-11"] * 5
    assert CALLS == [("report", "2026-11")]


def test_worker_exception_is_a_job_exception_and_the_worker_goes_on(our_server):
    gearoffload.configure(servers=our_server.address)
    with serving(our_server.address):
        with pytest.raises(JobException, match="RuntimeError: exploded on x") as caught:
            boom("x")
        # The worker's traceback travels with the text: where it failed, not only what.
        assert "Traceback (most recent call last)" in caught.value.text
        assert 'raise RuntimeError(f"exploded on {text}")' in caught.value.text
        # A payload that is not ours is refused (WORK_FAIL) without running anything,
        # and the worker goes on.
        client = offloading.get_client()
        for garbage in (b"\x00garbage", b"GO1.forged", b"GO0.0:0:p" + b"\0" * 40):
            with pytest.raises(JobFailed):  # refused: forged, or unsigned
                client.submit(add.name, garbage).result(5)
        assert add(1, 2) == 3


def test_progress_reaches_the_caller(our_server):
    gearoffload.configure(servers=our_server.address)
    with serving(our_server.address):
        job = steps.background(4)
        seen = set()
        while (outcome := job.outcome()).state != "done":
            seen.add((outcome.state, outcome.numerator, outcome.denominator))
            gevent.sleep(0.005)
        assert job.result() == 4
    running = {(n, d) for state, n, d in seen if state == "running"}
    assert running and running <= {(0, 0), (1, 4), (2, 4), (3, 4), (4, 4)}


def test_no_server_raises_or_falls_back_to_local_quickly():
    gearoffload.configure(servers=f"127.0.0.1:{free_port()}", connect_timeout=0.5)
    started = time.monotonic()
    with pytest.raises(NoServersAvailable):
        add(1, 2)
    assert resilient(21) == 42
    assert CALLS == [("resilient", 21)]
    assert time.monotonic() - started < 3
    gearoffload.configure(fallback="local", connect_timeout=0.3)
    assert add(1, 2) == 3 and CALLS[-1] == ("add", 1, 2)


def test_signed_pickle_carries_python_objects(our_server):
    gearoffload.configure(servers=our_server.address, format="pickle", secret_key="k" * 32)
    with serving(our_server.address):
        assert add([{1, 2}], [frozenset({3})]) == [{1, 2}, frozenset({3})]  # JSON cannot
        assert add((1, 2), (3,)) == (1, 2, 3)  # tuples stay tuples with pickle


def test_msgpack_format_when_installed(our_server):
    need_module("msgpack")
    gearoffload.configure(servers=our_server.address, format="msgpack")
    with serving(our_server.address):
        assert add(b"\x00", b"\xff") == b"\x00\xff"
        assert slow_square(3)["raw"] == b"\x00\xff"


def test_configuration_errors_say_what_to_do(monkeypatch):
    with pytest.raises(TypeError, match="known:"):
        gearoffload.configure(server="x")
    with pytest.raises(ValueError, match="'raise'.*'local'"):
        gearoffload.configure(fallback="maybe")
    with pytest.raises(ValueError, match="needs a secret key"):
        gearoffload.configure(format="pickle", secret_key=None)
    monkeypatch.setenv("GEAROFFLOAD_TIMEOUT", "soon")
    offloading.configure_reset()  # read the environment again
    with pytest.raises(ValueError, match="GEAROFFLOAD_TIMEOUT must be a number"):
        offloading.get_config()
    monkeypatch.setenv("GEAROFFLOAD_TIMEOUT", "5")
    monkeypatch.setenv("GEAROFFLOAD_SERVERS", "127.0.0.1:1234,127.0.0.1:1235")
    offloading.configure_reset()
    config = offloading.get_config()
    assert config.servers == ("127.0.0.1:1234", "127.0.0.1:1235") and config.timeout == 5.0
    # Set but empty means unset, as for the other variables: the default server.
    monkeypatch.setenv("GEAROFFLOAD_SERVERS", "")
    offloading.configure_reset()
    assert offloading.get_config().servers == ("127.0.0.1:4730",)
    for servers, advice in [("127.0.0.1:99999", "a port from 1 to 65535"),
                            ("http://127.0.0.1:47401", "drop the http://"),
                            ("127.0.0.1:47401;127.0.0.1:47402", "separate servers with commas")]:
        monkeypatch.setenv("GEAROFFLOAD_SERVERS", servers)
        offloading.configure_reset()
        with pytest.raises(ValueError, match=f"^GEAROFFLOAD_SERVERS: .*{advice}"):
            offloading.get_config()
        with pytest.raises(ValueError, match=advice):
            gearoffload.configure(servers=servers)
    monkeypatch.setenv("GEAROFFLOAD_SERVERS", "127.0.0.1:1234")
    offloading.configure_reset()
    with pytest.raises(TypeError, match="plain module-level"):
        class Thing:
            @gearoffload.offload(registry=TaskRegistry())
            def method(self):
                pass
        Thing().method()


POOL_TASKS = """
import os
import gearoffload

@gearoffload.offload
def whoami(greeting):
    return {"greeting": greeting, "pid": os.getpid()}
"""


def test_gearoffload_worker_finds_decorated_functions_by_import(our_server, tmp_path):
    (tmp_path / "offtasks.py").write_text(textwrap.dedent(POOL_TASKS))
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{tmp_path}")
    log = open(tmp_path / "pool.log", "wb")
    proc = gevent.subprocess.Popen(
        [sys.executable, "-m", "gearoffload.pool", "offtasks", "--servers",
         our_server.address, "--processes", "1"], cwd=tmp_path, stdout=log, stderr=log,
        env=env)
    try:
        sys.path.insert(0, str(tmp_path))
        import offtasks  # the web side imports the same module

        gearoffload.configure(servers=our_server.address)
        client = offloading.get_client()
        deadline = time.monotonic() + 20  # the pool forks, imports, registers
        while client.workers_for("offtasks.whoami") != 1 and time.monotonic() < deadline:
            gevent.sleep(0.1)
        value = offtasks.whoami("hello")
        assert value["greeting"] == "hello"
        assert value["pid"] != os.getpid()
        assert offtasks.whoami.name == "offtasks.whoami"
    finally:
        sys.path.remove(str(tmp_path))
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        log.close()
    assert "offtasks.whoami" in (tmp_path / "pool.log").read_text()


def test_a_call_no_server_accepted_falls_back_even_when_that_is_known_late(dropping_server):
    """A call waits once, for its result (``submit(wait=False)``), so "no server took it"
    can arrive while it waits: it must still count as unreachable (local fallback),
    never as a failed job."""
    gearoffload.configure(servers=dropping_server, connect_timeout=0.5, fallback="raise")
    with pytest.raises(NoServersAvailable):
        add(1, 2)
    gearoffload.configure(fallback="local")
    assert add(1, 2) == 3 and CALLS[-1] == ("add", 1, 2)


def test_a_worker_without_a_key_refuses_to_start(tmp_path, monkeypatch):
    (tmp_path / "keyless_tasks.py").write_text(
        "import gearoffload\n@gearoffload.offload\ndef f(x):\n    return x\n")
    monkeypatch.delenv("GEAROFFLOAD_SECRET_KEY")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    run = subprocess.run([sys.executable, "-m", "gearoffload.pool", "keyless_tasks",
                          "--servers", "127.0.0.1:1", "--processes", "1"], env=env,
                         cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "GEAROFFLOAD_SECRET_KEY" in run.stderr, run.stderr


# -- settings checked when the decorator runs; delay= and at= when a job is submitted ------

def declare(fn=lambda: None, **options):
    return gearoffload.offload(registry=TaskRegistry(), **options)(fn)


@pytest.mark.parametrize(("options", "error", "text"), [
    ({"priority": "urgent"}, ValueError, "priority= must be 'normal', 'high' or 'low', "
                                         "not 'urgent'"),
    ({"priority": 1}, TypeError, "priority= must be .* not int 1"),
    ({"jitter": "no", "retries": 2}, TypeError, "jitter= must be True or False, not str"),
    ({"backoff": 5}, ValueError, "backoff= apply to retries"),
    ({"retries": 3, "backoff": 60, "backoff_max": 10}, ValueError, "below backoff="),
    ({"timeout": "30"}, TypeError, "timeout= must be a number of seconds or a timedelta"),
    ({"timeout": 0}, ValueError, "timeout= must be positive"),
    ({"timeout": float("inf")}, ValueError, "timeout= must be a finite"),
    ({"fallback": "maybe"}, ValueError, "fallback= must be 'raise' or 'local'"),
    ({"unique": "key"}, TypeError, "unique= must be True, False or a callable"),
    ({"name": 42}, TypeError, "name= must be a non-empty str"),
    ({"every": "10"}, TypeError, "every= must be a number of seconds or a timedelta, not "
                                 "str '10'"),
])
def test_offload_settings_are_checked_when_the_decorator_runs(options, error, text):
    with pytest.raises(error, match=text):
        declare(**options)


def test_durations_are_seconds_or_timedeltas_everywhere():
    task = declare(timeout=timedelta(seconds=90), retries=2, backoff=timedelta(seconds=5))
    assert task.timeout == 90.0 and task.retry.backoff == 5.0
    assert declare(every=timedelta(minutes=1)).schedule.every == 60.0


@pytest.mark.parametrize(("when", "error", "text"), [
    ({"delay": "5"}, TypeError, "delay= must be a number of seconds or a timedelta, not "
                                "str '5'"),
    ({"delay": "abc"}, TypeError, "delay= must be a number of seconds"),
    ({"delay": True}, TypeError, "delay= must be a number of seconds .* not bool True"),
    ({"delay": float("nan")}, ValueError, "delay= must be a finite number of seconds"),
    ({"delay": float("inf")}, ValueError, "delay= must be a finite number of seconds"),
    ({"delay": -1}, ValueError, "delay= must be 0 or more"),
    ({"delay": 1e12}, ValueError, "delay= must be at most .* year 9999.* use at="),
    ({"at": "2030-01-01T00:00:00Z"}, TypeError, r"at= must be an aware datetime, not str "
                                                r".*datetime.fromisoformat"),
    ({"at": time.time() + 3}, TypeError, r"not float .*fromtimestamp\(t, timezone.utc\); "
                                         r"for seconds from now, use delay="),
    ({"at": date(2030, 1, 1)}, TypeError, "a date has no time of day"),
    ({"at": datetime(2030, 1, 1)}, ValueError, "naive one is ambiguous"),
    ({"delay": 1, "at": datetime.now().astimezone()}, TypeError,
     "not both"),
])
def test_bad_delay_or_at_is_refused_naming_the_argument(when, error, text):
    # No server is configured: the arguments are refused before anything is sent.
    gearoffload.configure(servers="127.0.0.1:1", connect_timeout=0.2)
    with pytest.raises(error, match=text):
        add.background(1, 2, **when)


def test_a_delayed_job_of_a_high_priority_function_is_refused_clearly():
    urgent = declare(priority="high", name="urgent.task")
    with pytest.raises(ValueError, match="priority='high': a delayed job .* normal priority"):
        urgent.background(delay=5)


def test_delay_and_at_forms_reach_the_server(our_server):
    """The accepted forms: seconds (int, float), a timedelta, an aware datetime; the job
    server holds each as a scheduled job (admin ``status`` counts it)."""
    from gearoffload.admin import AdminClient

    gearoffload.configure(servers=our_server.address)
    tomorrow = datetime.now(timezone.utc) + timedelta(days=1)
    for when in ({"delay": 3600}, {"delay": 0.5}, {"delay": timedelta(hours=2)},
                 {"at": tomorrow}, {"at": tomorrow.astimezone()}):
        assert add.background(1, 2, **when).id.startswith("bg-")
    with AdminClient(our_server.address) as admin:
        counts = {s.name: s.total for s in admin.status()}
    assert counts[add.name] == 5
