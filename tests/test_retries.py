"""Retries declared with the task (``@offload(retries=...)``) and dead letters, end to end:
a real job server, a real ``gearoffload-worker`` pool, the ``gearoffload`` command.

The retry policy travels in the job (``gearoffload.retry``); the server's retry machinery
runs it; a job that used up its retries is a dead letter that ``gearoffload dead`` shows,
retries and deletes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from conftest import ServerProcess, poll_until, tasks_on_a_pool
from gearoffload import offloading
from gearoffload.admin import AdminClient, AdminError
from gearoffload.core import Seal, describe_job
from gearoffload.registry import TaskRegistry
from gearoffload.retry import RetryPolicy, retry_policy

SECRET = "retry-test-key"
CLI = Path(sys.executable).parent / "gearoffload"

# The tasks, imported by the test (to submit) and by the worker pool (to run). Each run
# appends "start <pid>" to a file, so the test counts runs and knows whom to kill.
TASKS = '''
import os
import time
from pathlib import Path

from gearoffload import offload

RUNS = Path(os.environ["RETRY_TEST_DIR"])


def _start(name):
    with open(RUNS / name, "a") as f:
        f.write(f"start {os.getpid()}\\n")
    return (RUNS / name).read_text().count("start")


@offload(name="retrytasks.flaky", retries=3, backoff=0.2, jitter=False)
def flaky(x):
    run = _start("flaky")
    if run == 1:
        time.sleep(60)          # killed here by the test
    if run in (2, 3):
        raise RuntimeError(f"flaky failure on run {run}")
    return x * 2


@offload(name="retrytasks.doomed", retries=2, backoff=0.1, jitter=False)
def doomed(order):
    run = _start("doomed")
    if not (RUNS / "fixed").exists():
        raise ValueError(f"cannot charge order {order} (run {run})")
    return "charged"
'''


@pytest.fixture
def stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple]:
    """Our server, a one-process worker pool on the tasks module, and the tasks imported
    here with the same settings."""
    runs = tmp_path / "runs"
    runs.mkdir()
    server = ServerProcess("gearoffload").start()
    with tasks_on_a_pool(tmp_path, monkeypatch, "retrytasks", textwrap.dedent(TASKS), server,
                         SECRET, {"RETRY_TEST_DIR": str(runs)}) as (retrytasks, env):
        yield server, retrytasks, runs, env


def test_on_gearmand_the_policy_is_stripped_and_a_failed_job_is_dropped(tmp_path, monkeypatch):
    """docs/offload.md: retries are our job server's. Through gearmand, a job declaring
    ``retries=2`` reaches the worker (which strips the ``GOR1`` line before it opens the
    seal, so it runs), fails once, and is dropped: no second run, nothing left queued."""
    runs = tmp_path / "runs"
    runs.mkdir()
    server = ServerProcess("gearmand").start()
    with tasks_on_a_pool(tmp_path, monkeypatch, "retrytasks", textwrap.dedent(TASKS), server,
                         SECRET, {"RETRY_TEST_DIR": str(runs)}) as (tasks, _):
        tasks.doomed.background(7)
        assert poll_until(lambda: len(starts(runs, "doomed")) == 1, 10), \
            (tmp_path / "pool.log").read_text()
        time.sleep(1.5)  # retries 0.1 s and 0.2 s later would have run by now
        assert len(starts(runs, "doomed")) == 1
        with AdminClient(server.address) as admin:
            counts = {s.name: s.total for s in admin.status()}
        assert counts.get("retrytasks.doomed", 0) == 0
    assert "cannot charge order 7" in (tmp_path / "pool.log").read_text()


def starts(runs: Path, name: str) -> list[int]:
    path = runs / name
    return [int(line.split()[1]) for line in path.read_text().splitlines()] \
        if path.exists() else []


def test_a_killed_worker_then_two_failures_then_success(stack):
    server, tasks, runs, _ = stack
    job = tasks.flaky.background(21)
    assert poll_until(lambda: len(starts(runs, "flaky")) == 1, 10)
    os.kill(starts(runs, "flaky")[0], signal.SIGKILL)  # a pool child this test started

    assert job.result(timeout=30) == 42
    # Run 1 was killed (the server requeued it: a lost worker), runs 2 and 3 raised and
    # were retried after the declared back-off, run 4 succeeded.
    assert len(starts(runs, "flaky")) == 4
    with AdminClient(server.address) as admin:
        assert admin.dead_jobs() == []
        # The history shows every attempt, found by the job's id (its unique key).
        history = admin.find_job(job.id)
    assert [(e.attempts, e.outcome) for e in history] == \
        [(1, "requeued"), (2, "retrying"), (3, "retrying"), (4, "done")], history
    assert "flaky failure on run 2" in history[1].error
    assert "flaky failure on run 3" in history[2].error
    assert {e.handle for e in history} == {history[0].handle}
    assert all(e.function == "retrytasks.flaky" and e.ended >= e.submitted > 0
               for e in history)


def test_a_task_that_always_fails_becomes_a_dead_letter_and_the_cli_retries_it(stack):
    server, tasks, runs, env = stack
    began = time.time()
    job = tasks.doomed.background(7)
    with AdminClient(server.address) as admin:
        assert poll_until(lambda: admin.dead_jobs(), 15), "no dead letter"
        [dead] = admin.dead_jobs()
        detail = admin.dead_job(dead.handle)
    # 1 run + 2 retries, then buried, with the worker's traceback.
    assert len(starts(runs, "doomed")) == 3
    assert job.outcome().state == "dead"
    assert dead.function == "retrytasks.doomed" and dead.attempts == 3
    assert detail.attempts == 3 and began <= detail.died <= time.time()
    assert "ValueError: cannot charge order 7 (run 3)" in detail.error
    assert "Traceback" in detail.error and "retrytasks.py" in detail.error
    assert describe_job(detail.data)["arguments"] == [[7], {}]

    def cli(*words: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(CLI), "--servers", server.address, *words],
                              capture_output=True, text=True, env=env, timeout=30)

    listed = cli("dead")
    assert listed.returncode == 0 and dead.handle in listed.stdout
    shown = cli("dead", "show", dead.handle)
    assert shown.returncode == 0, shown.stderr
    assert "attempts:  3" in shown.stdout and "arguments: [[7], {}]" in shown.stdout
    assert "2 retries, backoff 0.1s" in shown.stdout
    assert "ValueError: cannot charge order 7" in shown.stdout
    as_json = json.loads(cli("dead", "show", dead.handle, "--json").stdout)
    assert as_json["arguments"] == [[7], {}] and as_json["attempts"] == 3

    (runs / "fixed").touch()
    retried = cli("dead", "retry", dead.handle)
    assert retried.returncode == 0, retried.stderr
    assert job.result(timeout=15) == "charged"
    assert len(starts(runs, "doomed")) == 4
    with AdminClient(server.address) as admin:
        assert admin.dead_jobs() == []
    gone = cli("dead", "retry", dead.handle)
    assert gone.returncode == 1 and f"no dead letter '{dead.handle}'" in gone.stderr


def test_delete_forgets_a_dead_letter(stack):
    server, tasks, runs, env = stack
    tasks.doomed.background(8)
    with AdminClient(server.address) as admin:
        assert poll_until(lambda: admin.dead_jobs(), 15)
        [dead] = admin.dead_jobs()
    deleted = subprocess.run([str(CLI), "--servers", server.address, "dead", "delete",
                              dead.handle], capture_output=True, text=True, env=env,
                             timeout=30)
    assert deleted.returncode == 0, deleted.stderr
    with AdminClient(server.address) as admin:
        assert admin.dead_jobs() == []
        with pytest.raises(AdminError) as caught:
            admin.dead_job(dead.handle)
        assert caught.value.code == "UNKNOWN_JOB"


def test_the_policy_travels_in_front_of_the_seal_and_the_worker_strips_it():
    seal = Seal(SECRET)
    sealed = seal.close(b'[[1], {}]')
    policy = RetryPolicy(4, 0.5, 30.0, True)
    data = policy.wrap(sealed)
    assert data.startswith(b"GOR1 4 0.5 30 1\n")
    assert RetryPolicy.parse(data) == policy
    assert seal.open(RetryPolicy.strip(data)) == b'[[1], {}]'
    # Jitter: between half and all of the capped exponential delay.
    assert all(0.25 <= policy.delay(1) <= 0.5 for _ in range(50))
    assert all(15 <= policy.delay(9) <= 30 for _ in range(50))


@pytest.mark.parametrize("header", [
    b"GOR1 3 1 300\nrest",             # a word missing
    b"GOR1 3 1 300 1",                 # no line end
    b"GOR1 -1 1 300 1\nrest",          # out of bounds
    b"GOR1 3 1 1e9 1\nrest",
    b"GOR1 x 1 300 1\nrest",
    b"GOR1 " + b"9" * 100 + b"\nrest",  # longer than a header may be
])
def test_a_malformed_policy_is_ignored(header):
    assert RetryPolicy.parse(header) is None


@pytest.mark.parametrize("settings, error, message", [
    ({"retries": -1}, ValueError, "retries= must be between 0 and 1000"),
    ({"retries": 1.5}, TypeError, "retries= must be an int"),
    ({"retries": "3"}, TypeError, "retries= must be an int, not str '3'"),
    ({"retries": 2, "backoff": -1}, ValueError, "backoff= must be 0 or more"),
    ({"retries": 2, "backoff": float("nan")}, ValueError, "backoff= must be a finite"),
    ({"retries": 2, "backoff": 1e9}, ValueError, "backoff= must be at most 86400"),
    ({"retries": 2, "backoff_max": "60"}, TypeError, "backoff_max= must be a number of "
                                                     "seconds or a timedelta, not str"),
    ({"retries": 2, "jitter": "no"}, TypeError, "jitter= must be True or False"),
    ({"retries": 2, "backoff": 60, "backoff_max": 10}, ValueError,
     r"backoff_max= \(10 s\) is below backoff= \(60 s\)"),
    ({"backoff": 5}, ValueError, "backoff= apply to retries: give retries=N"),
    ({"retries": 0, "jitter": False}, ValueError, "jitter= apply to retries"),
])
def test_bad_retry_settings_are_refused_when_declared(settings, error, message):
    from gearoffload.flask import GearOffload

    with pytest.raises(error, match=message):
        retry_policy(**settings)
    with pytest.raises(error, match=message):
        offloading.offload(lambda: None, name="bad.retries", **settings)
    with pytest.raises(error, match=message):  # a background view: the same rules
        GearOffload().offload(lambda: None, background=True, **settings)


def test_retry_settings_take_timedeltas_and_defaults():
    assert retry_policy(2, backoff=timedelta(seconds=30), backoff_max=timedelta(hours=1)) \
        == RetryPolicy(2, 30.0, 3600.0, True)
    assert retry_policy(2) == RetryPolicy(2, 1.0, 300.0, True)
    assert offloading.offload(lambda: None, name="ok.retries", registry=TaskRegistry(),
                              retries=3, jitter=False).retry == RetryPolicy(3, 1.0, 300.0,
                                                                             False)


def test_retries_on_a_foreground_view_are_refused():
    from gearoffload.flask import GearOffload

    ext = GearOffload()
    with pytest.raises(TypeError, match="retries= needs background=True"):
        @ext.offload(retries=2)
        def view():
            return "x"


def test_the_server_follows_the_job_policy_over_its_own_flags():
    """In the state alone (manual clock): a job with ``GOR1 2 5 8 0`` is retried after 5
    and 8 s (capped), then buried with its error, while the server's own flags
    (``--retry-failed 0``) leave a job without a policy failed at once."""
    from test_results_state import run_one
    from test_state import Harness

    from gearoffload.protocol import PacketType as T

    h = Harness()
    client, worker = h.peer(), h.worker(b"f")
    h.send(client, T.SUBMIT_JOB_BG, b"f", b"plain", b"x")
    run_one(h, worker, (T.WORK_EXCEPTION, b"no policy"))
    assert not h.state.jobs and not h.state.dead  # failed, not retried: as before

    h.send(client, T.SUBMIT_JOB_BG, b"f", b"u", b"GOR1 2 5 8 0\nx")
    run_one(h, worker, (T.WORK_EXCEPTION, b"first"))
    h.clock.advance(4.9)
    h.send(worker, T.GRAB_JOB)
    assert h.received(worker)[-1][0] == T.NO_JOB  # not before its back-off
    h.clock.advance(0.1)
    run_one(h, worker, (T.WORK_EXCEPTION, b"second"))
    h.clock.advance(7.9)
    h.send(worker, T.GRAB_JOB)
    assert h.received(worker)[-1][0] == T.NO_JOB  # 5 * 2 = 10, capped at 8
    h.clock.advance(0.1)
    run_one(h, worker, (T.WORK_EXCEPTION, b"third"))
    [(handle, job)] = h.state.dead.items()
    info = h.state.dead_info[handle]
    assert (job.failures, info.attempts, info.error) == (3, 3, "third")
    assert h.state.functions[b"f"].retried == 2
    line = h.admin_text(b"show dead job " + handle)
    assert line.startswith(b"OK\tf\tu\t3\t") and line.endswith(b"\tdGhpcmQ=\n"), line
    assert h.admin_text(b"delete dead job " + handle) == b"OK\r\n"
    assert not h.state.dead and not h.state.dead_info
    assert h.admin_text(b"delete dead job " + handle) == b"ERR UNKNOWN_JOB\r\n"


def test_the_short_error_is_the_exception_and_the_tasks_frame_and_the_log_says_it_once(
        stack, tmp_path):
    """The history's (and find_job's) error of a failed attempt: the exception line and
    the task's own frame, not the worker framework's first frames. The pool's log prints
    each failed attempt's traceback once."""
    server, tasks, runs, _ = stack
    tasks.doomed.background(8)
    with AdminClient(server.address) as admin:
        assert poll_until(lambda: admin.dead_jobs(), 15), "no dead letter"
        history = admin.history("retrytasks.doomed")
    assert [e.outcome for e in history] == ["dead", "retrying", "retrying"]
    for entry, run in zip(history, (3, 2, 1), strict=True):
        lines = entry.error.splitlines()
        assert lines[0] == f"ValueError: cannot charge order 8 (run {run})", entry.error
        assert lines[1].strip().startswith('File "') and \
            lines[1].endswith(", in doomed") and "retrytasks.py" in lines[1], entry.error
        assert lines[2].strip().startswith("raise ValueError("), entry.error
        assert "gearoffload" not in entry.error, entry.error
    log = (tmp_path / "pool.log").read_text()
    assert log.count("ValueError: cannot charge order 8") == 3, log  # was 9: 3 per attempt
    assert log.count("Traceback (most recent call last)") == 3, log
    assert "TaskError" not in log, log
