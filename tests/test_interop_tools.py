"""Debian's `gearman` and `gearadmin` tools (libgearman 1.1.20) against the job servers.

Each test runs against our server and, since it costs little, against gearmand too, so the
expectations are what the real tools really print. Tools that are missing skip locally and
fail under CI=true (.ci/run installs them). Every subprocess has a timeout and is stopped
by its own PID.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from wire_helpers import status_table, wait_until

from conftest import need_tool, stop_process
from gearoffload.protocol import PacketType as T

pytestmark = pytest.mark.interop

TIMEOUT = 15


def gearman(server, *args: str, data: bytes | None = None) -> subprocess.CompletedProcess:
    tool = need_tool("gearman", "gearman-tools")
    return subprocess.run([tool, "-h", "127.0.0.1", "-p", str(server.port), *args],
                          input=data, capture_output=True, timeout=TIMEOUT)


def gearadmin(server, *args: str) -> subprocess.CompletedProcess:
    tool = need_tool("gearadmin", "gearman-tools")
    return subprocess.run([tool, "-h", "127.0.0.1", "-p", str(server.port), *args],
                          capture_output=True, timeout=TIMEOUT)


def admin_out(server, *args: str) -> bytes:
    result = gearadmin(server, *args)
    assert result.returncode == 0, result
    return result.stdout


@contextmanager
def gearman_worker(server, func: str, *command: str, count: int | None = None,
                   ) -> Iterator[subprocess.Popen]:
    """`gearman -w -f FUNC -- COMMAND`, registered before the block starts."""
    tool = need_tool("gearman", "gearman-tools")
    extra = ["-c", str(count)] if count else []
    proc = subprocess.Popen(
        [tool, "-h", "127.0.0.1", "-p", str(server.port), "-w", "-f", func, *extra,
         "--", *command],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        with server.connect() as admin:
            wait_until(lambda: status_table(admin).get(func.encode(), (0, 0, 0))[2] >= 1
                       or proc.poll() is not None, timeout=TIMEOUT)
        if count is None:  # a counted worker may already be done with its queued jobs
            assert proc.poll() is None, proc.stderr.read()
        yield proc
    finally:
        stop_process(proc, timeout=5)
        proc.stderr.close()


def test_worker_mode_and_client_mode(server):
    with gearman_worker(server, "upper", "tr", "a-z", "A-Z"):
        result = gearman(server, "-f", "upper", "hello world")
        assert result.returncode == 0, result
        assert result.stdout == b"HELLO WORLD"
        result = gearman(server, "-f", "upper", data=b"from stdin\0with nul")
        assert result.stdout == b"FROM STDIN\0WITH NUL"
        assert status_table_of(server)[b"upper"] == (0, 0, 1)
        workers = admin_out(server, "--workers").split(b"\n")
        assert any(re.fullmatch(rb"\d+ 127\.0\.0\.1 \S+ : upper", line) for line in workers)


def test_several_jobs_one_worker_process(server):
    with gearman_worker(server, "rev", "rev"):
        for word in ("abc", "gearman", "x"):
            result = gearman(server, "-f", "rev", word)
            assert result.stdout.strip() == word[::-1].encode()


def status_table_of(server) -> dict[bytes, tuple[int, ...]]:
    rows = {}
    out = admin_out(server, "--status")
    assert out.endswith(b".\n")
    for line in out[:-2].split(b"\n")[:-1]:
        name, *counts = line.split(b"\t")
        rows[name] = tuple(int(c) for c in counts)
    return rows


def test_background_job_runs_when_a_worker_comes(server, tmp_path: Path):
    out = tmp_path / "out"
    result = gearman(server, "-b", "-f", "bgf", "payload")
    assert result.returncode == 0 and result.stdout == b"", result
    assert status_table_of(server)[b"bgf"] == (1, 0, 0)
    jobs = admin_out(server, "--show-jobs").split(b"\n")
    assert re.fullmatch(rb"H:\S+\t0\t0\t1", jobs[0]) and jobs[1:] == [b".", b""]
    with gearman_worker(server, "bgf", "sh", "-c", f"cat > {out}", count=1) as proc:
        assert proc.wait(TIMEOUT) == 0  # -c 1: exits after its one job
    assert out.read_bytes() == b"payload"
    if server.kind == "gearmand":
        assert status_table_of(server)[b"bgf"] == (0, 0, 0)
    else:  # nor worker nor job left: forgotten (issue #17)
        assert b"bgf" not in status_table_of(server)


def test_unique_coalesces_background_jobs(server):
    for _ in range(2):
        assert gearman(server, "-b", "-u", "myuniq", "-f", "uf", "data").returncode == 0
    assert admin_out(server, "--show-unique-jobs") == b"myuniq\n.\n"
    assert status_table_of(server)[b"uf"] == (1, 0, 0)


def test_unique_coalesces_foreground_clients(server, tmp_path: Path):
    runs = tmp_path / "runs"
    tool = need_tool("gearman", "gearman-tools")
    clients = [subprocess.Popen([tool, "-h", "127.0.0.1", "-p", str(server.port), "-u", "same",
                                 "-f", "slow", f"data{i}"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE) for i in range(2)]
    try:
        with server.connect() as conn:
            def waiting() -> bool:
                conn.send(T.GET_STATUS_UNIQUE, b"same")
                return conn.expect(T.STATUS_RES_UNIQUE)[5] == b"2"

            wait_until(waiting, timeout=TIMEOUT)
        with gearman_worker(server, "slow", "sh", "-c", f"echo ran >> {runs}; tr a-z A-Z",
                            count=1) as worker:
            outputs = [c.communicate(timeout=TIMEOUT)[0] for c in clients]
            assert worker.wait(TIMEOUT) == 0
    finally:
        for c in clients:
            if c.poll() is None:
                c.kill()
                c.wait(5)
    first = outputs[0]
    assert first in (b"DATA0", b"DATA1")  # the data of whichever submission came first
    assert outputs == [first, first]
    assert runs.read_text() == "ran\n"  # one job, run once, for both clients


def test_priorities_high_and_low(server, tmp_path: Path):
    out = tmp_path / "order"
    for flag, data in (("-L", "low"), (None, "normal"), ("-I", "high")):
        args = ["-b", *([flag] if flag else []), "-f", "prio", data]
        assert gearman(server, *args).returncode == 0
    assert admin_out(server, "--priority-status") == b"prio\t1\t1\t1\t0\n.\n"
    with gearman_worker(server, "prio", "sh", "-c", f"cat >> {out}; echo >> {out}",
                        count=3) as proc:
        assert proc.wait(TIMEOUT) == 0
    assert out.read_text().split() == ["high", "normal", "low"]


def test_gearadmin_function_commands(server):
    assert admin_out(server, "--create-function", "newf") == b"OK\n"
    assert status_table_of(server)[b"newf"] == (0, 0, 0)
    assert b"newf\t0\t0\t0\t0\n" in admin_out(server, "--priority-status")
    assert admin_out(server, "--drop-function", "newf") == b"OK\n"
    assert b"newf" not in status_table_of(server)
    result = gearadmin(server, "--drop-function", "newf")
    assert result.stderr == b"Error: function not found\r\n"


def test_gearadmin_cancel_job(server):
    assert gearman(server, "-b", "-u", "tocancel", "-f", "cf", "x").returncode == 0
    jobs = admin_out(server, "--show-jobs").split(b"\n")
    handle = jobs[0].split(b"\t")[0].decode()
    assert admin_out(server, "--cancel-job", handle) == b"OK\n"
    result = gearadmin(server, "--cancel-job", "H:nope:12345")
    assert result.stderr == b"Error: UNKNOWN_JOB\r\n"


def test_gearadmin_values_and_listings(server):
    assert admin_out(server, "--getpid") == b"%d\n" % server.proc.pid
    assert re.fullmatch(rb"\S+\n", admin_out(server, "--server-version"))
    assert re.fullmatch(rb"(FATAL|ALERT|CRITICAL|ERROR|WARNING|NOTICE|INFO|DEBUG)\n",
                        admin_out(server, "--server-verbose"))
    with server.connect() as w:
        w.send(T.SET_CLIENT_ID, b"tool-test")
        w.send(T.CAN_DO, b"a")
        w.send(T.CAN_DO, b"b")
        w.send(T.ECHO_REQ, b"")
        w.expect(T.ECHO_RES)
        workers = admin_out(server, "--workers")
        assert re.search(rb"^\d+ 127\.0\.0\.1 tool-test : b a$", workers, re.M), workers
        assert workers.endswith(b".\n")
    assert admin_out(server, "--show-unique-jobs") == b".\n"
    assert admin_out(server, "--show-jobs") == b".\n"


def test_version_is_ours(our_server):
    from gearoffload import __version__

    assert admin_out(our_server, "--server-version") == __version__.encode() + b"\n"


def test_background_burst_drained_by_tool_worker(server, tmp_path: Path):
    out = tmp_path / "burst"
    count = 20
    for i in range(count):
        assert gearman(server, "-b", "-f", "burst", f"j{i}").returncode == 0
    start = time.monotonic()
    with gearman_worker(server, "burst", "sh", "-c", f"cat >> {out}; echo >> {out}",
                        count=count) as proc:
        assert proc.wait(TIMEOUT) == 0
    assert time.monotonic() - start < TIMEOUT
    assert out.read_text().split() == [f"j{i}" for i in range(count)]  # FIFO
