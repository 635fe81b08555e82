"""``gearoffload top``: the frame's figures after a known workload (against our server and
gearmand), down servers, and a live run in a pseudo-terminal (keys, Ctrl-C, terminal
restored). Every wait is bounded."""

from __future__ import annotations

import fcntl
import os
import select
import signal
import struct
import subprocess
import sys
import termios
import time

import pytest

from conftest import ROOT, ServerProcess, free_port
from gearoffload.admin import FunctionStatus, WorkerInfo
from gearoffload.protocol import PacketType as T
from gearoffload.top import ENTER, LEAVE, Sample, function_rows, render

CLI = [sys.executable, "-m", "gearoffload.cli"]


def top(*args: str, timeout: float = 20) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "GEAROFFLOAD_SERVERS"}
    return subprocess.run([*CLI, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


def table(output: str) -> dict[str, list[str]]:
    """FUNCTION -> the other columns, from a --once frame."""
    rows = {}
    for line in output.splitlines():
        cells = line.split()
        if len(cells) == 9 and cells[0] != "FUNCTION":
            rows[cells[0]] = cells[1:]
    return rows


def load(server: ServerProcess):
    """5 jobs queued for a function nobody serves, 3 for one that two workers serve (one
    of them holds a job), and a function with a worker and no job. Returns the open
    connections: closing them would change the figures."""
    client = server.connect()
    for _ in range(5):
        client.send(T.SUBMIT_JOB_BG, b"top_queued", b"", b"x")
        client.expect(T.JOB_CREATED)
    for _ in range(3):
        client.send(T.SUBMIT_JOB_BG, b"top_busy", b"", b"x")
        client.expect(T.JOB_CREATED)
    busy = server.connect()
    busy.send(T.CAN_DO, b"top_busy")
    busy.send(T.CAN_DO, b"top_idle")
    busy.send(T.GRAB_JOB)
    assert busy.expect(T.JOB_ASSIGN)[1] == b"top_busy"
    idle = server.connect()
    idle.send(T.CAN_DO, b"top_busy")
    idle.send(T.ECHO_REQ, b"sync")  # CAN_DO has no reply: make sure it was applied
    idle.expect(T.ECHO_RES)
    return [client, busy, idle]


def test_once_shows_queued_running_and_workers(server):
    conns = load(server)
    try:
        result = top("--servers", server.address, "top", "--once")
    finally:
        for c in conns:
            c.close()
    assert result.returncode == 0, result.stderr
    assert "\x1b" not in result.stdout  # plain text for scripts
    rows = table(result.stdout)
    # SCHED RETRIED DEAD: ours answers ``show retries``; gearmand does not ("-").
    extra = ["0", "0", "0"] if server.kind == "gearoffload" else ["-", "-", "-"]
    assert rows["top_queued"] == ["5", "0", "0", *extra, "-", "-"]
    assert rows["top_busy"] == ["2", "1", "2", *extra, "-", "-"]
    assert rows["top_idle"] == ["0", "0", "1", *extra, "-", "-"]
    names = [line.split()[0] for line in result.stdout.splitlines()
             if line.startswith("top_")]
    assert names == ["top_queued", "top_busy", "top_idle"]  # by queued jobs
    header = next(line for line in result.stdout.splitlines()
                  if line.startswith(server.address))
    assert " up " in header and " 2 workers " in header
    assert " 7 queued " in header and header.endswith(" 1 running")


def test_down_server_is_shown_and_others_still_are(our_server):
    down = f"127.0.0.1:{free_port()}"
    result = top("--servers", f"{our_server.address},{down}", "top", "--once")
    assert result.returncode == 0, result.stderr
    assert f"{our_server.address}  up" in result.stdout
    assert f"{down}  DOWN  cannot connect" in result.stdout
    assert "1/2 servers up" in result.stdout


def test_no_server_reachable_exits_1_with_one_line():
    down = f"127.0.0.1:{free_port()}"
    result = top("--servers", down, "top", "--once")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("gearoffload: no server reachable")
    assert f"{down}  DOWN" in result.stdout


def test_bad_interval_is_a_usage_error():
    result = top("top", "--interval", "0", "--once")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1


# -- the frame, without a server ------------------------------------------------------

def test_rates_come_from_successive_samples():
    first = Sample("h:1", 10.0, functions=(FunctionStatus("f", 10, 2, 1),))
    second = Sample("h:1", 12.0, functions=(FunctionStatus("f", 4, 3, 1),))
    [row] = function_rows(second, first)
    assert (row.queued, row.running) == (1, 3)
    assert row.queued_rate == pytest.approx(-3.5) and row.running_rate == pytest.approx(0.5)
    assert function_rows(second, Sample("h:1", 11.0, error="down"))[0].queued_rate is None


def test_retries_dead_letters_and_scheduled_columns():
    sample = Sample("h:1", 0.0, "1.0", (FunctionStatus("f", 1, 0, 1),), (),
                    retries={"f": (2, 7, 0), "gone": (0, 3, 4)})
    rows = {r.name: r for r in function_rows(sample)}
    assert (rows["f"].scheduled, rows["f"].retried, rows["f"].dead) == (2, 7, 0)
    # A function with dead letters only (no longer in ``status``) still has its row.
    assert (rows["gone"].queued, rows["gone"].retried, rows["gone"].dead) == (0, 3, 4)
    lines = render([sample], {}, 1.0)
    header = next(line for line in lines if line.startswith("FUNCTION"))
    assert header.split()[4:7] == ["SCHED", "RETRIED", "DEAD"]
    assert next(line for line in lines if line.startswith("gone")).split()[1:7] == \
        ["0", "0", "0", "0", "3", "4"]
    # Against gearmand (no ``show retries``) the columns say "-".
    plain = Sample("h:1", 0.0, "1.0", (FunctionStatus("f", 1, 0, 1),))
    assert function_rows(plain)[0].dead is None
    assert next(line for line in render([plain], {}, 1.0)
                if line.startswith("f ")).split()[4:7] == ["-", "-", "-"]


def test_frame_fits_the_terminal():
    functions = tuple(FunctionStatus(f"function_with_a_long_name_{i:03d}", i, 0, 1)
                      for i in range(100))
    sample = Sample("h:1", 0.0, "1.0", functions, (WorkerInfo(5, "127.0.0.1", None, ()),))
    lines = render([sample], {}, 1.0, os.terminal_size((30, 12)))
    assert len(lines) <= 12
    assert all(len(line) <= 30 for line in lines)
    assert any("more functions" in line for line in lines)
    assert lines[4].startswith("function_with_a_long_name_099")  # the busiest stay


# -- live, in a pseudo-terminal -------------------------------------------------------

class PtyRun:
    """``gearoffload top`` on a pseudo-terminal of 100 x 30, as a user would run it."""

    def __init__(self, *args: str) -> None:
        import pty

        pid, fd = pty.fork()
        if pid == 0:  # the child: only exec (the test process's gevent hub is not safe)
            try:
                os.chdir(ROOT)
                env = {k: v for k, v in os.environ.items()
                       if k not in ("GEAROFFLOAD_SERVERS", "COLUMNS", "LINES")}
                os.execve(sys.executable, [*CLI, *args], env)
            finally:
                os._exit(127)
        self.pid, self.fd = pid, fd
        self.code: int | None = None  # set once reaped
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
        self.output = b""

    def read_until(self, predicate, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while not predicate(self.output):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            ready, _, _ = select.select([self.fd], [], [], remaining)
            if ready:
                try:
                    chunk = os.read(self.fd, 65536)
                except OSError:  # EIO: the child closed the terminal
                    return predicate(self.output)
                if not chunk:
                    return predicate(self.output)
                self.output += chunk
        return True

    def wait(self, timeout: float = 10.0) -> int | None:
        """The exit code, or None if it still runs after ``timeout``."""
        deadline = time.monotonic() + timeout
        while self.code is None and time.monotonic() < deadline:
            self.read_until(lambda out: False, 0.05)  # keep draining the terminal
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.code = os.waitstatus_to_exitcode(status)
        return self.code

    def canonical(self) -> bool:
        """Is the terminal in its usual line mode (not cbreak)?"""
        return bool(termios.tcgetattr(self.fd)[3] & termios.ICANON)

    def close(self) -> None:
        """Kill the child (by its PID) if a failed test left it running; close the pty."""
        if self.code is None:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        os.close(self.fd)


@pytest.fixture
def busy_server(our_server):
    conns = load(our_server)
    yield our_server
    for c in conns:
        c.close()


@pytest.mark.parametrize("key", [b"q", b"\x03", signal.SIGTERM],
                         ids=["q", "ctrl-c", "sigterm"])
def test_live_view_redraws_then_quits_and_restores_the_terminal(busy_server, key):
    run = PtyRun("--servers", busy_server.address, "top", "--interval", "0.2")
    try:
        assert run.canonical()
        # Three frames: the second and third have rates (two samples).
        assert run.read_until(lambda out: out.count(b"\x1b[H") >= 3), run.output
        assert not run.canonical()  # cbreak while it runs: q works without Enter
        if isinstance(key, bytes):
            os.write(run.fd, key)
        else:
            os.kill(run.pid, key)
        code = run.wait()
        assert code == 0, run.output[-2000:]
        text = run.output.decode(errors="replace")
        assert text.startswith(ENTER)
        assert LEAVE in text.rsplit("\x1b[H", 1)[-1]  # the last thing: leave the screen
        assert "top_queued" in text and "dQUEUED/s" in text and "(q to quit)" in text
        assert "Traceback" not in text
        assert run.canonical()
    finally:
        run.close()


def test_iterations_stops_by_itself(our_server):
    run = PtyRun("--servers", our_server.address, "top", "--interval", "0.1",
                 "--iterations", "3")
    try:
        assert run.wait() == 0
        assert run.output.count(b"\x1b[H") == 3
        assert run.output.endswith(LEAVE.encode())
    finally:
        run.close()
