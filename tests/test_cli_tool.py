"""The ``gearoffload`` command, run as a real subprocess against our server, with a real
``gearoffload.Worker`` serving jobs in another subprocess."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from conftest import ROOT, ServerProcess, free_port, missing, poll_until, stop_process
from gearoffload.admin import AdminClient
from gearoffload.cli import Progress, format_table

WORKER = r"""
import sys
import gevent
from gearoffload import Worker
from gearoffload.errors import JobFailed

worker = Worker(sys.argv[1], client_id="cli-worker")

@worker.task("cli_progress")
def progress(job):
    for i in range(1, 5):
        job.send_status(i, 4)
        gevent.sleep(0.02)
    return b"done:" + job.data

@worker.task("cli_upper")
def upper(job):
    job.send_data(b"partial;")
    return job.data.upper()

@worker.task("cli_fail")
def fail(job):
    raise JobFailed("no luck")

@worker.task("cli_raise")
def boom(job):
    raise ValueError("kaput")

worker.work()
"""
FUNCTIONS = ("cli_progress", "cli_upper", "cli_fail", "cli_raise")
PROGRESS_LINES = [
    "[########----------------------] 1/4  25%",
    "[###############---------------] 2/4  50%",
    "[######################--------] 3/4  75%",
    "[##############################] 4/4 100%",
]


@pytest.fixture(scope="module")
def served() -> Iterator[ServerProcess]:
    """Our server with a worker process registered for FUNCTIONS (shared by the module)."""
    server = ServerProcess("gearoffload").start()
    worker = subprocess.Popen([sys.executable, "-c", WORKER, server.address], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with AdminClient(server.address, timeout=5) as admin:
            deadline = time.monotonic() + 10
            while {f.name for f in admin.status() if f.workers} < set(FUNCTIONS):
                assert worker.poll() is None, "the worker process died"
                assert time.monotonic() < deadline, "the worker did not register"
                time.sleep(0.05)
        yield server
    finally:
        stop_process(worker, timeout=5)
        server.stop()


def run(*args: str, servers: str | None = None, env: dict | None = None,
        stdin: bytes | None = None, timeout: float = 15) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "gearoffload.cli"]
    if servers is not None:
        command += ["--servers", servers]
    environment = {k: v for k, v in os.environ.items() if k != "GEAROFFLOAD_SERVERS"}
    environment.update(env or {})
    result = subprocess.run([*command, *args], cwd=ROOT, input=stdin, capture_output=True,
                            timeout=timeout, env=environment)
    result.stdout_text = result.stdout.decode()
    result.stderr_text = result.stderr.decode()
    return result


def one_line(text: str) -> str:
    assert text.count("\n") == 1 and text.endswith("\n"), repr(text)
    assert "Traceback" not in text
    return text


def test_status_table(served):
    result = run("status", servers=served.address)
    assert result.returncode == 0, result.stderr_text
    lines = result.stdout_text.splitlines()
    assert lines[0].split() == ["FUNCTION", "TOTAL", "QUEUED", "RUNNING", "WORKERS"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert set(FUNCTIONS) <= set(rows)
    assert rows["cli_upper"].split()[1:] == ["0", "0", "0", "1"]
    # aligned: every number column ends at the same place as its header
    assert len({len(line) for line in lines if line.split()[0] in FUNCTIONS}) == 1
    assert len(lines[0]) == len(rows["cli_upper"])


def test_workers_table_and_all(served):
    result = run("workers", servers=served.address)
    assert result.returncode == 0, result.stderr_text
    header, *rows = result.stdout_text.splitlines()
    assert header.split() == ["FD", "ADDRESS", "CLIENT_ID", "FUNCTIONS"]
    assert len(rows) == 1
    fd, address, client_id, *functions = rows[0].split()
    assert fd.isdigit() and address == "127.0.0.1" and client_id == "cli-worker"
    assert sorted(functions) == sorted(FUNCTIONS)
    everyone = run("workers", "--all", servers=served.address)
    assert len(everyone.stdout_text.splitlines()) >= 3  # + the command's own connection


def test_submit_prints_the_result(served):
    result = run("submit", "cli_upper", "hello", servers=served.address)
    assert result.returncode == 0, result.stderr_text
    assert result.stdout == b"partial;HELLO"  # WORK_DATA first, then the result
    assert result.stderr == b""


def test_submit_wait_draws_progress_from_work_status(served):
    result = run("submit", "cli_progress", "x", "--wait", servers=served.address)
    assert result.returncode == 0, result.stderr_text
    assert result.stdout == b"done:x"
    assert result.stderr_text.splitlines() == PROGRESS_LINES
    quiet = run("submit", "cli_progress", "y", "--quiet", servers=served.address)
    assert (quiet.returncode, quiet.stdout, quiet.stderr) == (0, b"done:y", b"")


def test_submit_data_from_stdin_with_options(served):
    result = run("--timeout", "10", "submit", "cli_upper", "-", "--priority", "high",
                 "--unique", "cli-u1", servers=served.address, stdin=b"from stdin")
    assert result.returncode == 0, result.stderr_text
    assert result.stdout == b"partial;FROM STDIN"


def test_background_prints_the_handle_and_wait_polls(served):
    result = run("submit", "cli_progress", "bg", "--background", servers=served.address)
    assert result.returncode == 0, result.stderr_text
    assert result.stdout_text.startswith("H:") and result.stdout_text.count("\n") == 1
    waited = run("submit", "cli_progress", "bg", "--background", "--wait",
                 servers=served.address)
    assert waited.returncode == 0, waited.stderr_text
    assert waited.stdout_text.startswith("H:")
    for line in waited.stderr_text.splitlines():  # polled: a subset of the updates
        assert line in PROGRESS_LINES


def test_failing_job_exits_1(served):
    result = run("submit", "cli_fail", "x", servers=served.address)
    assert result.returncode == 1
    assert result.stdout == b""
    assert "cli_fail job failed" in one_line(result.stderr_text)


def test_raising_job_exits_1_with_its_text(served):
    result = run("submit", "cli_raise", "x", servers=served.address)
    assert result.returncode == 1
    assert "cli_raise job raised" in one_line(result.stderr_text)
    assert "kaput" in result.stderr_text


def test_job_timeout_exits_1_and_jobs_lists_the_job(served):
    result = run("--timeout", "0.5", "submit", "cli_nobody", "x", servers=served.address)
    assert result.returncode == 1
    assert "still running after 0.5s" in one_line(result.stderr_text)

    queued = run("submit", "cli_nobody", "y", "--background", "--unique", "cli-u2",
                 servers=served.address)
    handle = queued.stdout_text.strip()
    jobs = run("jobs", servers=served.address)
    assert jobs.returncode == 0, jobs.stderr_text
    header, *rows = jobs.stdout_text.splitlines()
    assert header.split() == ["HANDLE", "RETRIES", "ABANDONED", "BACKGROUND"]
    assert [handle, "0", "no", "yes"] in [row.split() for row in rows]

    as_json = json.loads(run("jobs", "--json", servers=served.address).stdout)
    assert {"handle": handle, "retries": 0, "abandoned": False, "persisted": True,
            "server": served.address} in as_json


def test_status_json_priority_and_env_servers(served):
    result = run("status", "--json", env={"GEAROFFLOAD_SERVERS": served.address})
    assert result.returncode == 0, result.stderr_text
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows["cli_upper"] == {"name": "cli_upper", "total": 0, "running": 0,
                                 "workers": 1, "server": served.address}
    prio = run("status", "--priority", servers=served.address)
    assert prio.stdout_text.splitlines()[0].split() == ["FUNCTION", "HIGH", "NORMAL", "LOW",
                                                        "WORKERS"]


def test_no_server_exits_2_with_one_line():
    address = f"127.0.0.1:{free_port()}"
    for args in (["status"], ["workers"], ["jobs"], ["--timeout", "1", "submit", "f", "x"]):
        started = time.monotonic()
        result = run(*args, servers=address)
        assert result.returncode == 2, (args, result.stderr_text)
        assert f"127.0.0.1:{address.split(':')[1]}" in one_line(result.stderr_text)
        assert result.stdout == b""
        assert time.monotonic() - started < 5


def test_one_server_down_of_two_still_shows_the_other(served):
    down = f"127.0.0.1:{free_port()}"
    result = run("status", servers=f"{served.address},{down}")
    assert result.returncode == 2
    assert "cannot connect to " + down in one_line(result.stderr_text)
    header, *rows = result.stdout_text.splitlines()
    assert header.split()[:2] == ["SERVER", "FUNCTION"]
    assert rows and all(row.startswith(served.address) for row in rows)


@pytest.mark.parametrize("args", [
    [],
    ["bogus"],
    ["submit", "only-a-function"],
    ["submit", "f", "x", "--priority", "urgent"],
    ["--timeout", "soon", "status"],
    ["--servers", "host:port", "status"],
    ["--servers", "127.0.0.1:99999", "status"],
    ["--servers", "http://127.0.0.1:47401", "workers"],
    ["--servers", "127.0.0.1:47401;127.0.0.1:47402", "jobs"],
    ["submit", "f", "x", "--unique", "u" * 65],
])
def test_usage_errors_exit_2_with_one_line(args):
    result = run(*args, servers=None)
    assert result.returncode == 2
    line = one_line(result.stderr_text)
    assert line.startswith("gearoffload") and ": error: " in line


def test_bad_servers_from_the_environment_exit_2_with_one_line():
    result = run("status", servers=None,
                 env={"GEAROFFLOAD_SERVERS": "127.0.0.1:47401;127.0.0.1:47402"})
    assert result.returncode == 2
    assert "separate servers with commas" in one_line(result.stderr_text)


def test_installed_script_runs():
    script = os.path.join(os.path.dirname(sys.executable), "gearoffload")
    if not os.path.exists(script):
        missing("console script not installed (pip install -e .)")
    result = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=15)
    assert result.returncode == 0 and "submit" in result.stdout


def test_silent_server_times_out_with_exit_2():
    with socket.socket() as silent:  # accepts connections (backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        started = time.monotonic()
        result = run("--timeout", "0.5", "status",
                     servers=f"127.0.0.1:{silent.getsockname()[1]}")
    assert result.returncode == 2
    assert "no reply to 'status'" in one_line(result.stderr_text)
    assert time.monotonic() - started < 5


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_redraws_in_place_on_a_terminal_and_ends_its_line():
    stream = FakeTerminal()
    bar = Progress(stream, width=10)
    bar.update(1, 4)
    bar.update(1, 4)  # unchanged: not redrawn
    bar.update(4, 4)
    bar.finish()
    assert stream.getvalue() == "\r[##--------] 1/4  25%\r[##########] 4/4 100%\n"
    piped = io.StringIO()
    Progress(piped, width=4).update(0, 0)  # no denominator yet
    assert piped.getvalue() == "[----] 0/0   0%\n"


def test_format_table_aligns_numbers_right():
    assert format_table(["NAME", "N"], [["a", 1], ["bbb", 100]]).splitlines() == [
        "NAME    N", "a       1", "bbb   100"]
    assert format_table(["NAME", "N"], []) == "NAME  N"


@pytest.fixture
def two_servers_with_a_dead_letter() -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """Two of our servers (the same --job-handle-prefix, as two servers on one host have
    by default), each with one dead letter: a cli_raise job retried once, then buried.
    Both dead letters have the handle H:test:1."""
    servers = [ServerProcess("gearoffload", ["--retry-failed", "1", "--retry-backoff", "0"])
               .start() for _ in range(2)]
    worker = subprocess.Popen([sys.executable, "-c", WORKER,
                               ",".join(s.address for s in servers)], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for server in servers:
            result = run("submit", "cli_raise", f"order on {server.port}", "--background",
                         servers=server.address)
            assert result.returncode == 0, result.stderr_text
            assert result.stdout_text.strip() == "H:test:1"
        for server in servers:
            with AdminClient(server.address, timeout=5) as admin:
                assert poll_until(lambda: admin.dead_jobs(), 15), "no dead letter"
        yield servers[0], servers[1]
    finally:
        stop_process(worker, timeout=5)
        for server in servers:
            server.stop()


def test_dead_letters_on_two_servers_json_show_and_an_ambiguous_handle(
        two_servers_with_a_dead_letter):
    a, b = two_servers_with_a_dead_letter
    both = f"{a.address},{b.address}"
    listed = run("dead", "--json", servers=both)
    assert listed.returncode == 0, listed.stderr_text
    rows = json.loads(listed.stdout_text)
    assert {(r["server"], r["handle"], r["function"]) for r in rows} == \
        {(a.address, "H:test:1", "cli_raise"), (b.address, "H:test:1", "cli_raise")}

    shown = json.loads(run("dead", "show", "H:test:1", "--json", servers=both).stdout_text)
    assert sorted(d["server"] for d in shown) == sorted([a.address, b.address])
    assert {d["data"] for d in shown} == {f"order on {a.port}", f"order on {b.port}"}
    assert all("ValueError: kaput" in d["error"] for d in shown)

    # retry and delete do not guess which server's H:test:1 is meant.
    for action in ("delete", "retry"):
        refused = run("dead", action, "H:test:1", servers=both)
        assert refused.returncode == 2
        assert "on 2 servers" in one_line(refused.stderr_text) and "--servers" in \
            refused.stderr_text
    with AdminClient(a.address) as admin:
        assert [d.handle for d in admin.dead_jobs()] == ["H:test:1"]

    deleted = run("dead", "delete", "H:test:1", servers=a.address)
    assert deleted.returncode == 0 and f"deleted on {a.address}" in deleted.stdout_text
    with AdminClient(a.address) as admin:
        assert admin.dead_jobs() == []
    # Now only b holds it: the two-server form finds it there.
    shown = run("dead", "show", "H:test:1", servers=both)
    assert shown.returncode == 0 and f"(on {b.address})" in shown.stdout_text


def test_history_and_find_show_each_attempt(two_servers_with_a_dead_letter):
    a, _ = two_servers_with_a_dead_letter
    table = run("history", "cli_raise", servers=a.address)
    assert table.returncode == 0, table.stderr_text
    lines = table.stdout_text.splitlines()
    assert lines[0].split() == ["ENDED", "FUNCTION", "HANDLE", "UNIQUE", "OUTCOME",
                                "SECONDS", "ATTEMPTS", "ERROR"]
    # newest first: buried on the second attempt, after a first that was retried
    assert [line.split()[4] for line in lines[1:]] == ["dead", "retrying"]
    assert all(line.rstrip().endswith("ValueError: kaput") for line in lines[1:])

    found = json.loads(run("find", "H:test:1", "--json", servers=a.address).stdout_text)
    assert [(e["outcome"], e["attempts"]) for e in found] == \
        [("retrying", 1), ("dead", 2), ("dead", 2)]  # its history, then where it is now
    assert found[-1]["ended"] == 0

    nothing = run("find", "no-such-job", servers=a.address)
    assert nothing.returncode == 1
    assert "no job 'no-such-job'" in one_line(nothing.stderr_text)
    assert run("history", "--limit", "0", servers=a.address).returncode == 2


def test_history_on_a_server_without_one_says_so_in_one_line():
    server = ServerProcess("gearoffload", ["--history-max", "0"]).start()
    try:
        for args in (["history"], ["find", "H:test:1"]):
            result = run(*args, servers=server.address)
            assert result.returncode == 1
            line = one_line(result.stderr_text)
            assert "--history-max 0" in line and line.count(server.address) == 1, line
    finally:
        server.stop()


def test_bad_servers_from_the_environment_are_named_as_such():
    result = run("status", env={"GEAROFFLOAD_SERVERS": "http://127.0.0.1:4730"})
    assert result.returncode == 2
    line = one_line(result.stderr_text)
    assert "bad $GEAROFFLOAD_SERVERS 'http://127.0.0.1:4730'" in line and "http://" in line
    flag = run("status", "--servers", "127.0.0.1:99999")
    assert flag.returncode == 2 and "bad --servers" in one_line(flag.stderr_text)
