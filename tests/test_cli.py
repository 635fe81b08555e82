"""The gearoffload-server command: options, errors, signals."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT, ServerProcess, free_port
from gearoffload.protocol import ACCELERATED
from gearoffload.protocol import PacketType as T
from gearoffload_server import STATE_COMPILED


def run_server(*args: str, timeout: float = 10) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gearoffload_server", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("args, message", [
    (["--no-such-option"], "unrecognized arguments: --no-such-option"),
    (["--port", "abc"], "argument --port/-p: invalid int value"),
    (["--job-retries", "300"], "--job-retries must be between -1 (unlimited) and 255"),
    (["--verbose", "LOUD"], "--verbose must be one of"),
    (["--max-packet-size", "lots"], "not a size"),
    (["--job-handle-prefix", "x" * 60], "--job-handle-prefix must be 1 to 42 bytes"),
])
def test_bad_option_is_one_line_and_exit_2(args, message):
    result = run_server(*args)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


def test_busy_port_is_one_line_and_exit_2():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_server("--port", str(port))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr


def test_unwritable_log_file_is_one_line_and_exit_2():
    result = run_server("--port", str(free_port()), "--log-file", "/nonexistent/dir/log")
    assert result.returncode == 2 and "cannot open log file" in result.stderr


def test_without_epoll_the_server_says_it_needs_linux_and_exits_2():
    """The poll loop is epoll: elsewhere (macOS, the BSDs) one clear line, not a
    traceback. Simulated by removing select.epoll before the entry point runs."""
    code = ("import select, runpy; del select.epoll; "
            "runpy.run_module('gearoffload_server', run_name='__main__', alter_sys=True)")
    result = subprocess.run([sys.executable, "-c", code, "--port", str(free_port())],
                            cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert result.stderr.startswith("gearoffload-server: needs Linux (its poll loop uses "
                                    "epoll)") and result.stderr.count("\n") == 1, result.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_stop_cleanly(sig):
    server = ServerProcess("gearoffload").start()
    with server.connect() as c:
        c.send(T.ECHO_REQ, b"x")
        c.expect(T.ECHO_RES)
        started = time.monotonic()
        assert server.stop(sig) == 0
        assert time.monotonic() - started < 5
    assert "Traceback" not in server.stderr_text()


def test_sigusr1_stops_accepting_and_exits_when_no_jobs_remain():
    server = ServerProcess("gearoffload").start()
    worker = server.connect()
    client = server.connect()
    worker.send(T.CAN_DO, b"f")
    client.send(T.SUBMIT_JOB, b"f", b"", b"last job")
    client.expect(T.JOB_CREATED)
    server.proc.send_signal(signal.SIGUSR1)
    time.sleep(0.3)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=1).close()
    assert server.proc.poll() is None  # still running: a job remains
    worker.send(T.GRAB_JOB)
    handle = worker.expect(T.JOB_ASSIGN)[0]
    worker.send(T.WORK_COMPLETE, handle, b"done")
    assert client.expect(T.WORK_COMPLETE) == (handle, b"done")
    assert server.proc.wait(5) == 0
    worker.close()
    client.close()


def test_log_file_gets_the_log(tmp_path):
    log = tmp_path / "server.log"
    server = ServerProcess("gearoffload", ["--log-file", str(log)]).start()
    with server.connect() as c:
        c.send_raw(b"\0BAD" + b"\0" * 8)
        assert c.is_closed()
    server.stop()
    text = log.read_text()
    assert "listening on 127.0.0.1" in text and "protocol error: bad magic" in text
    # The codec and state in use are named (C and compiled wherever they were built, as
    # in CI).
    assert (f"{'C' if ACCELERATED else 'pure-Python'} codec, "
            f"{'compiled' if STATE_COMPILED else 'pure-Python'} state)") in text
