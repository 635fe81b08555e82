"""The state's metrics counters, latency histograms and recent failures: no sockets."""

from __future__ import annotations

import doctest

from test_state import Harness

from conftest import compiled_and_source
from gearoffload.protocol import PacketType as T
from gearoffload_server import metrics, stats, status, status_page
from gearoffload_server.stats import BUCKETS, LatencyHistogram

variant = compiled_and_source()  # the compiled state, and state.py


def test_doctests():
    for module in (stats, metrics, status, status_page):
        assert doctest.testmod(module).failed == 0, module.__name__


def test_histogram_buckets_are_le_and_cumulative():
    h = LatencyHistogram()
    for value in (0.0, 0.001, 0.0011, 5.0, 99999.0):
        h.observe(value)
    pairs = dict(h.cumulative())
    assert pairs["0.001"] == 2          # 0.0 and exactly 0.001 (le)
    assert pairs["0.0025"] == 3
    assert pairs["5.0"] == 4
    assert pairs["3600.0"] == 4
    assert pairs["+Inf"] == h.count() == 5
    assert len(pairs) == len(BUCKETS) + 1


def test_submit_coalesce_complete_fail_exception_counters():
    h = Harness()
    worker = h.worker(b"f")
    client = h.peer()
    h.send(client, T.OPTION_REQ, b"exceptions")
    h.send(client, T.SUBMIT_JOB, b"f", b"u1", b"a")        # H:t:1
    h.send(client, T.SUBMIT_JOB, b"f", b"u1", b"a")        # coalesced onto H:t:1
    h.send(client, T.SUBMIT_JOB_BG, b"f", b"u1", b"a")     # coalesced too
    h.send(client, T.SUBMIT_JOB, b"f", b"", b"b")          # H:t:2
    h.send(client, T.SUBMIT_JOB_HIGH, b"f", b"", b"c")     # H:t:3
    func = h.state.functions[b"f"]
    assert (func.submitted, func.coalesced) == (3, 2)
    h.send(worker, T.GRAB_JOB)                               # H:t:3 (high)
    h.clock.advance(0.2)
    h.send(worker, T.WORK_COMPLETE, b"H:t:3", b"ok")
    h.send(worker, T.GRAB_JOB)                               # H:t:1
    h.send(worker, T.WORK_EXCEPTION, b"H:t:1", b"ValueError: boom")
    h.send(worker, T.WORK_FAIL, b"H:t:1")                    # python-gearman's echo: ignored
    h.send(worker, T.GRAB_JOB)                               # H:t:2
    h.clock.advance(1.5)
    h.send(worker, T.WORK_FAIL, b"H:t:2")
    assert (func.completed, func.failed, func.exceptions) == (1, 2, 1)
    assert func.latency.count() == 3
    cumulative = dict(func.latency.cumulative())
    assert cumulative["0.1"] == 0 and cumulative["0.25"] == 2 and cumulative["2.5"] == 3
    assert abs(func.latency.sum - (0.2 + 0.2 + 1.7)) < 1e-6
    failures = list(h.state.failures)
    assert [(f.handle, f.what, f.detail) for f in failures] == [
        (b"H:t:1", "exception", "ValueError: boom"), (b"H:t:2", "fail", "")]
    assert failures[0].function == b"f" and failures[0].unique == b"u1"


def test_a_failures_detail_and_history_error_are_the_exception_and_the_tasks_frame():
    h = Harness()
    client, worker = h.peer(), h.worker(b"f")
    h.send(client, T.SUBMIT_JOB, b"f", b"u", b"x")
    h.send(worker, T.GRAB_JOB)
    framework = "".join(f'  File "/venv/lib/python3.11/site-packages/gearoffload/core.py", '
                        f'line {n}, in run_task\n    body()\n' for n in range(20))
    text = (b"KeyError: 'sku'\n\nTraceback (most recent call last):\n" + framework.encode() +
            b'  File "/srv/app/tasks.py", line 9, in charge\n    price = prices[sku]\n'
            b"            ~~~~~~^^^^^\nKeyError: 'sku'\n")
    h.send(worker, T.WORK_EXCEPTION, b"H:t:1", text)
    short = "KeyError: 'sku'\n  File \"/srv/app/tasks.py\", line 9, in charge\n" \
        "    price = prices[sku]"
    assert h.state.failures[-1].detail == short
    assert h.state.history.recent(b"f")[0].error == short


def test_lost_worker_timeout_and_dead_letter_are_recorded():
    h = Harness(job_retries=1, retry_failed=1, retry_backoff=1)
    client = h.peer()
    worker = h.peer()
    h.send(worker, T.CAN_DO_TIMEOUT, b"f", b"1000")
    h.send(client, T.SUBMIT_JOB, b"f", b"", b"x")            # H:t:1
    h.send(worker, T.GRAB_JOB)
    h.clock.advance(1.1)                                     # times out: a failed attempt
    func = h.state.functions[b"f"]
    assert func.failed == 1
    assert [f.what for f in h.state.failures] == ["timeout"]
    h.send(client, T.SUBMIT_JOB, b"f", b"", b"z")            # H:t:2
    lost = h.peer()
    h.send(lost, T.CAN_DO, b"f")
    h.send(lost, T.GRAB_JOB)
    h.state.disconnect(lost)                                 # fails (-j 1)
    assert [f.what for f in h.state.failures] == ["timeout", "lost worker"]
    assert func.failed == 2
    h.send(client, T.SUBMIT_JOB_BG, b"f", b"", b"y")         # H:t:3
    for _ in range(2):
        h.send(worker, T.GRAB_JOB)
        h.send(worker, T.WORK_FAIL, b"H:t:3")
        h.clock.advance(1.5)                                 # the retry falls due
    assert b"H:t:3" in h.state.dead
    assert [f.what for f in h.state.failures][-3:] == ["fail", "fail", "dead letter"]
    assert func.failed == 4


def test_recent_failures_are_bounded():
    h = Harness()
    worker = h.worker(b"f")
    client = h.peer()
    for n in range(1, stats.RECENT_FAILURES + 11):
        h.send(client, T.SUBMIT_JOB_BG, b"f", b"", b"x")
        h.send(worker, T.GRAB_JOB)
        h.send(worker, T.WORK_FAIL, b"H:t:%d" % n)
    assert len(h.state.failures) == stats.RECENT_FAILURES
    assert h.state.failures[-1].handle == b"H:t:%d" % (stats.RECENT_FAILURES + 10)
    assert h.state.functions[b"f"].failed == stats.RECENT_FAILURES + 10


def test_status_lists_the_oldest_running_jobs_first_and_caps_them(monkeypatch):
    monkeypatch.setattr(status, "MAX_RUNNING", 2)
    h = Harness()
    client = h.peer()
    for n in range(3):
        h.send(client, T.SUBMIT_JOB_BG, b"f", b"u%d" % n, b"x")
        h.clock.advance(1.0)
    workers = [h.worker(b"f") for _ in range(3)]
    for worker in reversed(workers):      # the newest worker takes the oldest job
        h.send(worker, T.GRAB_JOB)
    h.send(workers[0], T.WORK_STATUS, b"H:t:3", b"1", b"4")
    snap = status.snapshot(h.state)
    assert snap["running_total"] == 3 and snap["workers"] == 3
    assert [(r["handle"], r["age"]) for r in snap["running"]] == [("H:t:1", 3.0),
                                                                   ("H:t:2", 2.0)]
    assert snap["functions"][0]["running"] == 3


def test_the_dead_letters_help_names_per_job_retries_in_both_renderings():
    """/metrics's HELP for gearoffload_dead_letters: a job's own retries
    (@offload(retries=...)) come first, --retry-failed is only the default."""
    from prometheus_client.exposition import generate_latest
    from prometheus_client.registry import CollectorRegistry

    h = Harness()
    registry = CollectorRegistry()
    registry.register(metrics.StateCollector(h.state))
    help_line = ("# HELP gearoffload_dead_letters Background jobs kept as dead letters: "
                 "their retries (@offload(retries=...), else --retry-failed) used up.")
    assert help_line in metrics.render(h.state).decode().splitlines()
    assert help_line in generate_latest(registry).decode().splitlines()
