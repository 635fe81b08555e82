"""The ``gearoffload-worker`` pool: real processes against real servers (ours and gearmand).

The pool is started as a subprocess on a tasks module written to a temporary directory;
the test talks to it only through a job server, signals and its log.
"""

from __future__ import annotations

import os
import signal
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import gevent
import gevent.subprocess
import pytest

from conftest import ROOT, gevent_time_limit, poll_until
from gearoffload import Client, TaskRegistry, Worker
from gearoffload.loading import load_registry
from gearoffload.pool import PoolConfig, parse_args

TEST_TIME_LIMIT = 40
SCRIPT = Path(sys.executable).parent / "gearoffload-worker"

TASKS = """
import os
import time

import gearoffload


@gearoffload.task("pid")
def pid(job):
    return str(os.getpid())


@gearoffload.task("nap")
def nap(job):
    time.sleep(float(job.data))  # the pool monkey-patched: this only blocks one greenlet
    return b"rested " + job.data
"""


time_limit = gevent_time_limit(TEST_TIME_LIMIT)


class Pool:
    """A ``gearoffload-worker`` process, stopped by its PID."""

    def __init__(self, tmp_path: Path, servers: str, *args: str, module: str = "pooltasks",
                 source: str = TASKS, env: dict[str, str] | None = None):
        (tmp_path / f"{module}.py").write_text(source)
        self.log_path = tmp_path / "pool.log"
        command = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m",
                                                          "gearoffload.pool"]
        env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
        with open(self.log_path, "wb") as log:
            self.proc = gevent.subprocess.Popen(
                [*command, module, "--servers", servers, *args],
                cwd=tmp_path, stdout=log, stderr=log, env=env)

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)  # the children notice and drain
            self.proc.wait(5)


@pytest.fixture
def pool_factory(tmp_path) -> Iterator:
    pools: list[Pool] = []

    def start(servers: str, *args: str, **options) -> Pool:
        pool = Pool(tmp_path, servers, *args, **options)
        pools.append(pool)
        return pool

    yield start
    for pool in pools:
        pool.stop()


def serving_pids(client: Client, want: int, timeout: float = 10) -> set[bytes]:
    """PIDs of the processes that answer ``pid`` jobs, until ``want`` distinct ones."""
    pids: set[bytes] = set()
    deadline = time.monotonic() + timeout
    while len(pids) < want and time.monotonic() < deadline:
        jobs = client.submit_many([("pid", b"")] * 20)
        pids.update(job.result(10) for job in jobs)
    return pids


def test_pool_serves_with_n_processes_and_drains_on_sigterm(server, pool_factory):
    pool = pool_factory(server.address, "--processes", "2", "--concurrency", "3")
    with Client(server.address) as client:
        pids = serving_pids(client, want=2)
        assert len(pids) == 2
        # Three naps in one process at once: greenlets, not one after the other.
        started = time.monotonic()
        naps = client.submit_many([("nap", b"0.5")] * 6)
        assert [j.result(10) for j in naps] == [b"rested 0.5"] * 6
        assert time.monotonic() - started < 1.4
        # SIGTERM while a job runs: it finishes, then the pool exits.
        running = client.submit("nap", b"1.5")
        deadline = time.monotonic() + 5
        while not running.status().running and time.monotonic() < deadline:
            gevent.sleep(0.05)
        pool.proc.send_signal(signal.SIGTERM)
        assert running.result(10) == b"rested 1.5"
        assert pool.proc.wait(10) == 0
        # Nothing serves any more: a new job stays queued.
        late = client.submit("pid", b"")
        gevent.sleep(0.3)
        status = late.status()
        assert status.known and not status.running
    log = pool.log()
    assert "draining" in log and "all worker processes exited" in log
    # A healthy start and stop logs nothing at WARNING or above (#15: the start-up line
    # was a WARNING).
    assert " INFO gearoffload.pool: gearoffload-worker: " in log
    assert not [line for line in log.splitlines() if " WARNING " in line or " ERROR " in line]
    for pid in pids:
        assert f"(pid {pid.decode()}) exited (exit status 0)" in log


def test_pool_restarts_a_child_that_dies(our_server, pool_factory):
    pool = pool_factory(our_server.address, "--processes", "2", "--concurrency", "2")
    with Client(our_server.address) as client:
        pids = serving_pids(client, want=2)
        assert len(pids) == 2
        victim = int(sorted(pids)[0])
        os.kill(victim, signal.SIGKILL)  # a child of the pool this test started
        deadline = time.monotonic() + 10
        while f"(pid {victim}) died" not in pool.log() and time.monotonic() < deadline:
            gevent.sleep(0.05)
        assert f"(pid {victim}) died (killed by signal 9); restarting in" in pool.log()
        new_pids = serving_pids(client, want=2)
        assert len(new_pids) == 2 and str(victim).encode() not in new_pids
        assert pool.proc.poll() is None


def test_pool_refuses_a_module_without_tasks(tmp_path):
    (tmp_path / "empty_tasks.py").write_text("x = 1\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    command = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "gearoffload.pool"]
    out = gevent.subprocess.run([*command, "empty_tasks:x"], cwd=tmp_path, env=env,
                                capture_output=True, timeout=20)
    assert out.returncode == 2
    assert b"cannot load tasks from empty_tasks:x" in out.stderr
    out = gevent.subprocess.run([*command, "no_such_module_here"], cwd=tmp_path, env=env,
                                capture_output=True, timeout=20)
    assert out.returncode == 2 and b"No module named" in out.stderr


def test_load_registry_finds_workers_and_registries(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "with_worker.py").write_text(textwrap.dedent("""
        from gearoffload import Worker
        worker = Worker("127.0.0.1:1")
        worker.register("a", lambda job: b"a")
    """))
    (tmp_path / "with_registry.py").write_text(textwrap.dedent("""
        from gearoffload import TaskRegistry
        tasks = TaskRegistry()
        other = TaskRegistry()
        tasks.register("b", lambda job: b"b")
        other.register("c", lambda job: b"c")
        empty = TaskRegistry()
    """))
    assert load_registry("with_worker").names() == ["a"]  # its only Worker
    assert load_registry("with_worker:worker").names() == ["a"]
    assert load_registry("with_registry:tasks").names() == ["b"]
    assert load_registry("with_registry:other").names() == ["c"]
    with pytest.raises(ValueError):
        load_registry("with_registry:empty")
    assert isinstance(load_registry("with_worker:worker"), TaskRegistry)
    assert isinstance(Worker("127.0.0.1:1").registry, TaskRegistry)


def test_pool_options_are_validated():
    config = parse_args(["m", "--servers", "a:1, b:2", "--processes", "3"])
    assert config == PoolConfig(target="m", servers=("a:1", "b:2"), processes=3,
                                concurrency=1)
    assert parse_args(["m"]).processes == (os.cpu_count() or 1)
    with pytest.raises(SystemExit):
        parse_args(["m", "--processes", "0"])
    with pytest.raises(SystemExit):
        parse_args(["m", "--concurrency", "-1"])


@pytest.mark.parametrize(("args", "env", "message"), [
    (["--servers", "127.0.0.1:99999"], "", "--servers: bad port in server address "
                                           "'127.0.0.1:99999'"),
    (["--servers", "http://127.0.0.1:47401"], "", "--servers: 'http://127.0.0.1:47401' is a "
                                                  "URL: drop the http://"),
    ([], "127.0.0.1:47401;127.0.0.1:47402", "GEAROFFLOAD_SERVERS: '127.0.0.1:47401;"
                                            "127.0.0.1:47402': separate servers with commas"),
])
def test_bad_servers_stop_the_pool_at_start_in_one_line(args, env, message):
    """Accepted before: the pool started and its workers retried the address for ever."""
    started = time.monotonic()
    out = gevent.subprocess.run(
        [sys.executable, "-m", "gearoffload.pool", "nosuchmodule", *args], cwd=ROOT,
        capture_output=True, text=True, timeout=30,
        env={**os.environ, "GEAROFFLOAD_SERVERS": env})
    assert out.returncode == 2, out.stderr
    assert out.stderr.count("\n") == 1 and out.stderr.startswith(
        f"gearoffload-worker: {message}"), out.stderr
    assert time.monotonic() - started < 20


def test_an_empty_servers_variable_means_the_default(monkeypatch):
    monkeypatch.setenv("GEAROFFLOAD_SERVERS", "")
    assert parse_args(["m"]).servers == ("127.0.0.1:4730",)


# -- SIGHUP: a graceful reload --------------------------------------------------------------

RELOADED = """
import os
import time

import gearoffload
from gearoffload import offload

VERSION = {version!r}


@gearoffload.task("version")
def version(job):
    return VERSION + " " + str(os.getpid())


@gearoffload.task("nap")
def nap(job):
    seconds, _, token = job.text.partition(" ")
    time.sleep(float(seconds))
    with open("runs.log", "a") as runs:  # one short append: lines never interleave
        runs.write(token + "\\n")
    return "rested " + token


@offload(every=1, missed="none")
def beat():
    with open("beats.log", "a") as beats:
        beats.write(VERSION + "\\n")
"""

RELOAD_ENV = {
    # v1 and v2 may be written within the same second: a .pyc checked by mtime could
    # hide the change (sizes differ too, but this is the test's subject).
    "PYTHONDONTWRITEBYTECODE": "1",
    "GEAROFFLOAD_SECRET_KEY": "reload-test-secret-0123456789abcdef",
}


def pool_children(pid: int) -> set[int]:
    """The live (not zombie) child processes of ``pid``, from /proc."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue  # gone meanwhile
        fields = stat.rsplit(")", 1)[1].split()  # after "(comm)", which may hold spaces
        if int(fields[1]) == pid and fields[0] != "Z":
            found.add(int(entry))
    return found


def versions(client: Client, want: int, timeout: float = 15) -> dict[int, str]:
    """``{pid: version}`` of the processes answering ``version``, until ``want`` of them."""
    seen: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    while len(seen) < want and time.monotonic() < deadline:
        for job in client.submit_many([("version", b"")] * 20):
            text, pid = job.result(10).decode().rsplit(" ", 1)
            seen[int(pid)] = text
    return seen


def wait_in_log(pool: Pool, text: str, timeout: float = 20, count: int = 1) -> None:
    assert poll_until(lambda: pool.log().count(text) >= count, timeout), pool.log()


def test_sighup_reloads_new_code_and_loses_no_job(server, pool_factory, tmp_path):
    """A running job finishes once in its old process; fresh processes import the task
    module as rewritten on disk; jobs submitted during the reload run once each."""
    pool = pool_factory(server.address, "--processes", "2", "--concurrency", "2",
                        module="reloadtasks", source=RELOADED.format(version="v1"),
                        env=RELOAD_ENV)
    with Client(server.address) as client:
        before = versions(client, want=2)
        assert set(before.values()) == {"v1"} and len(before) == 2, pool.log()
        assert set(before) == pool_children(pool.proc.pid)
        long = client.submit("nap", b"2.0 long")
        assert poll_until(lambda: long.status().running, 5)
        (tmp_path / "reloadtasks.py").write_text(RELOADED.format(version="v2 (deployed)"))
        pool.proc.send_signal(signal.SIGHUP)
        during = client.submit_many([("nap", f"0.05 during-{i}".encode()) for i in range(20)])
        wait_in_log(pool, "reloaded: 2 fresh processes serve")
        assert long.result(15) == b"rested long"
        assert sorted(job.result(15) for job in during) == sorted(
            f"rested during-{i}".encode() for i in range(20))
        after = versions(client, want=2)
        assert set(after.values()) == {"v2 (deployed)"} and len(after) == 2
        assert not set(after) & set(before)
        # The old processes drained and left; the new ones are all that is left.
        assert poll_until(lambda: pool_children(pool.proc.pid) == set(after), 10), pool.log()
    runs = (tmp_path / "runs.log").read_text().split()
    assert runs.count("long") == 1
    assert sorted(runs) == sorted(["long", *(f"during-{i}" for i in range(20))])
    for pid in before:  # logged once reaped, a moment after /proc shows them gone
        wait_in_log(pool, f"(pid {pid}) exited (exit status 0)", timeout=5)
    log = pool.log()
    assert pool.proc.poll() is None
    assert " INFO gearoffload.pool: SIGHUP: reloading reloadtasks: starting 2 fresh " in log
    assert not [line for line in log.splitlines() if " WARNING " in line or " ERROR " in line]


def test_sighup_during_a_reload_and_the_scheduler_is_replaced(our_server, pool_factory,
                                                              tmp_path):
    """Three SIGHUPs in a row: the pool ends with one fresh generation (and one scheduler)
    serving the newest code, a job running throughout finishes once, nothing is logged
    above INFO, and the periodic task keeps running."""
    pool = pool_factory(our_server.address, "--processes", "1", "--concurrency", "2",
                        "--schedule", module="reloadtasks",
                        source=RELOADED.format(version="v1"), env=RELOAD_ENV)
    with Client(our_server.address) as client:
        before = versions(client, want=1)
        assert set(before.values()) == {"v1"}
        assert poll_until(lambda: (tmp_path / "beats.log").exists(), 15), pool.log()
        children = pool_children(pool.proc.pid)
        assert len(children) == 2  # a worker and the scheduler
        long = client.submit("nap", b"2.5 long")
        assert poll_until(lambda: long.status().running, 5)
        (tmp_path / "reloadtasks.py").write_text(RELOADED.format(version="v2"))
        pool.proc.send_signal(signal.SIGHUP)
        gevent.sleep(0.2)
        pool.proc.send_signal(signal.SIGHUP)
        (tmp_path / "reloadtasks.py").write_text(RELOADED.format(version="v3 (last)"))
        pool.proc.send_signal(signal.SIGHUP)
        wait_in_log(pool, "reloaded: 2 fresh processes serve")
        assert long.result(15) == b"rested long"
        # Every process of the first two generations leaves: a worker and a scheduler.
        assert poll_until(lambda: len(pool_children(pool.proc.pid)) == 2
                          and not pool_children(pool.proc.pid) & children, 15), pool.log()
        assert set(versions(client, want=1).values()) == {"v3 (last)"}
        # The new scheduler submits the beats, run by the new worker.
        assert poll_until(lambda: (tmp_path / "beats.log").read_text().split()[-1:]
                          == ["(last)"], 10), (tmp_path / "beats.log").read_text()
    log = pool.log()
    assert pool.proc.poll() is None
    assert "SIGHUP during a reload: replacing its 2 new processes too" in log
    assert log.count("started scheduler process 1") >= 2
    assert (tmp_path / "runs.log").read_text().split() == ["long"]
    assert not [line for line in log.splitlines() if " WARNING " in line or " ERROR " in line]
    # SIGTERM still drains everything and exits 0.
    pool.proc.send_signal(signal.SIGTERM)
    assert pool.proc.wait(15) == 0


def test_a_reload_whose_code_does_not_import_keeps_the_old_processes(our_server,
                                                                     pool_factory, tmp_path):
    pool = pool_factory(our_server.address, "--processes", "1", module="reloadtasks",
                        source=RELOADED.format(version="v1"), env=RELOAD_ENV)
    with Client(our_server.address) as client:
        before = versions(client, want=1)
        (tmp_path / "reloadtasks.py").write_text("def broken(:\n")
        pool.proc.send_signal(signal.SIGHUP)
        wait_in_log(pool, "reload failed: ")
        assert versions(client, want=1) == before  # the old process still serves
        assert pool_children(pool.proc.pid) == set(before)
        # A fixed deploy reloads.
        (tmp_path / "reloadtasks.py").write_text(RELOADED.format(version="v2"))
        pool.proc.send_signal(signal.SIGHUP)
        wait_in_log(pool, "reloaded: 1 fresh processes serve")
        assert set(versions(client, want=1).values()) == {"v2"}
    log = pool.log()
    assert "cannot load tasks from reloadtasks: SyntaxError" in log
    assert "exited (exit status 2) before it served; the old processes keep serving" in log
    assert pool.proc.poll() is None
