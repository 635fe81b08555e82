"""The HTTP endpoint (--http-port) of a real server process: /metrics after a known
workload, /healthz (also while draining), /status.json, 404/405, and bad or busy ports."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import ROOT, RawConn, ServerProcess, free_port
from gearoffload.protocol import PacketType as T


class HttpServer(ServerProcess):
    """Our server with ``--http-port``; ``start()`` also waits for the HTTP port."""

    def __init__(self, *args: str) -> None:
        self.http_port = free_port()
        super().__init__("gearoffload", ["--http-port", str(self.http_port), *args])

    def start(self) -> HttpServer:
        super().start()
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.http_port), timeout=0.2).close()
                return self
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(
                        "the HTTP port never opened:\n" + self.stderr_text()) from None
                time.sleep(0.02)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def get(self, path: str, method: str = "GET") -> tuple[int, dict, bytes]:
        request = urllib.request.Request(self.url + path, method=method)
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()

    def metrics(self) -> dict[tuple[str, tuple], float]:
        """Every sample by (name, sorted labels)."""
        status, headers, body = self.get("/metrics")
        assert status == 200 and headers["Content-Type"].startswith("text/plain")
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(body.decode())
                for s in family.samples}


@pytest.fixture
def http_server() -> Iterator[HttpServer]:
    proc = HttpServer().start()
    yield proc
    proc.stop()


class Workload:
    """A known workload, over raw connections so that every count is certain:

    - ``upper``: 3 jobs created (one foreground submitted twice with the same unique: 1
      coalesced), then 1 completed, 1 WORK_FAIL, 1 WORK_EXCEPTION ``boom``;
    - ``idle``: no worker; 1 high, 3 normal, 2 low background jobs queued;
    - ``slow``: one job running on a worker that reported WORK_STATUS 3/10.
    """

    def __init__(self, server: ServerProcess) -> None:
        self.conns: list[RawConn] = []
        client = self.client = self._conn(server)
        client.send(T.SUBMIT_JOB, b"upper", b"u1", b"a")
        (h1,) = client.expect(T.JOB_CREATED)
        client.send(T.SUBMIT_JOB, b"upper", b"u1", b"a")
        assert client.expect(T.JOB_CREATED) == (h1,)
        for data in (b"b", b"c"):
            client.send(T.SUBMIT_JOB_BG, b"upper", b"", data)
            client.expect(T.JOB_CREATED)
        worker = self._conn(server)
        worker.send(T.CAN_DO, b"upper")
        for answer in ("complete", "fail", "exception"):
            worker.send(T.GRAB_JOB)
            handle = worker.expect(T.JOB_ASSIGN)[0]
            if answer == "complete":
                worker.send(T.WORK_COMPLETE, handle, b"A")
                client.expect(T.WORK_COMPLETE)
                client.expect(T.WORK_COMPLETE)  # attached twice: told twice
            elif answer == "fail":
                worker.send(T.WORK_FAIL, handle)
            else:
                worker.send(T.WORK_EXCEPTION, handle, b"boom <b>&")
        self.exception_handle = handle
        for ptype, count in ((T.SUBMIT_JOB_HIGH_BG, 1), (T.SUBMIT_JOB_BG, 3),
                             (T.SUBMIT_JOB_LOW_BG, 2)):
            for _ in range(count):
                client.send(ptype, b"idle", b"", b"x")
                client.expect(T.JOB_CREATED)
        client.send(T.SUBMIT_JOB_BG, b"slow", b"report-7", b"x")
        (self.slow_handle,) = client.expect(T.JOB_CREATED)
        self.slow_worker = slow = self._conn(server)
        slow.send(T.CAN_DO, b"slow")
        slow.send(T.GRAB_JOB)
        assert slow.expect(T.JOB_ASSIGN)[0] == self.slow_handle
        slow.send(T.WORK_STATUS, self.slow_handle, b"3", b"10")
        client.send(T.ECHO_REQ, b"sync")  # everything above has been applied
        client.expect(T.ECHO_RES)
        worker.send(T.ECHO_REQ, b"sync")
        worker.expect(T.ECHO_RES)
        slow.send(T.ECHO_REQ, b"sync")
        slow.expect(T.ECHO_RES)

    def _conn(self, server: ServerProcess) -> RawConn:
        conn = server.connect()
        self.conns.append(conn)
        return conn

    def close(self) -> None:
        for conn in self.conns:
            conn.close()


def test_metrics_after_a_known_workload(http_server):
    work = Workload(http_server)
    try:
        m = http_server.metrics()
    finally:
        work.close()

    def value(name: str, **labels: str) -> float:
        return m[(name, tuple(sorted(labels.items())))]

    assert value("gearoffload_jobs_submitted_total", function="upper") == 3
    assert value("gearoffload_submissions_coalesced_total", function="upper") == 1
    assert value("gearoffload_jobs_completed_total", function="upper") == 1
    assert value("gearoffload_jobs_failed_total", function="upper") == 2
    assert value("gearoffload_jobs_exceptions_total", function="upper") == 1
    assert value("gearoffload_job_duration_seconds_count", function="upper") == 3
    assert value("gearoffload_job_duration_seconds_bucket", function="upper", le="+Inf") == 3
    assert value("gearoffload_job_duration_seconds_sum", function="upper") < 5
    assert value("gearoffload_queue_depth", function="idle", priority="high") == 1
    assert value("gearoffload_queue_depth", function="idle", priority="normal") == 3
    assert value("gearoffload_queue_depth", function="idle", priority="low") == 2
    assert value("gearoffload_workers", function="idle") == 0
    assert value("gearoffload_jobs_submitted_total", function="idle") == 6
    assert value("gearoffload_jobs_running", function="slow") == 1
    assert value("gearoffload_workers", function="slow") == 1
    assert value("gearoffload_workers", function="upper") == 1
    assert value("gearoffload_connections") == 3
    assert value("gearoffload_draining") == 0
    assert ("gearoffload_server_info", (("version", _version()),)) in m


def _version() -> str:
    from gearoffload import __version__
    return __version__


def test_status_json_shows_functions_running_jobs_and_failures(http_server):
    work = Workload(http_server)
    try:
        status, headers, body = http_server.get("/status.json")
    finally:
        work.close()
    assert status == 200 and headers["Content-Type"] == "application/json"
    data = json.loads(body)
    functions = {f["name"]: f for f in data["functions"]}
    assert functions["idle"]["queued"] == {"high": 1, "normal": 3, "low": 2}
    assert functions["upper"]["completed"] == 1 and functions["upper"]["failed"] == 2
    assert data["totals"] == {"submitted": 10, "coalesced": 1, "completed": 1, "failed": 2}
    [running] = data["running"]
    assert running["handle"] == work.slow_handle.decode()
    assert (running["function"], running["unique"]) == ("slow", "report-7")
    assert (running["numerator"], running["denominator"]) == (3, 10)
    assert 0 <= running["age"] < 30
    assert [f["what"] for f in data["failures"]] == ["exception", "fail"]  # newest first
    assert data["failures"][0]["detail"] == "boom <b>&"
    assert data["failures"][0]["handle"] == work.exception_handle.decode()
    assert data["connections"] == 3 and data["workers"] == 2


def test_healthz_page_headers_404_and_405(http_server):
    assert http_server.get("/healthz")[::2] == (200, b"ok\n")
    status, headers, body = http_server.get("/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert b"status.json" in body and b"http://" not in body and b"https://" not in body
    assert "script-src 'sha256-" in headers["Content-Security-Policy"]
    assert http_server.get("/nope")[0] == 404
    assert http_server.get("/metrics/../admin")[0] == 404
    assert http_server.get("/metrics", method="POST")[0] == 405
    assert http_server.get("/healthz", method="DELETE")[0] == 405
    assert http_server.get("/healthz", method="HEAD")[::2] == (200, b"")


def test_healthz_is_503_while_draining():
    server = HttpServer("--shutdown-timeout", "20").start()
    try:
        with server.connect() as client, server.connect() as worker:
            client.send(T.SUBMIT_JOB, b"f", b"", b"x")
            (handle,) = client.expect(T.JOB_CREATED)
            worker.send(T.CAN_DO, b"f")
            worker.send(T.GRAB_JOB)
            worker.expect(T.JOB_ASSIGN)
            server.proc.send_signal(signal.SIGTERM)  # drains: waits for the running job
            deadline = time.monotonic() + 5
            while server.get("/healthz")[0] != 503:
                assert time.monotonic() < deadline, "healthz never said draining"
                time.sleep(0.05)
            assert server.get("/healthz")[2] == b"draining\n"
            worker.send(T.WORK_COMPLETE, handle, b"done")
            client.expect(T.WORK_COMPLETE)
        assert server.proc.wait(10) == 0
    finally:
        server.stop()


def _run_server(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gearoffload_server", "--port", str(free_port()),
         "--queue", "memory", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("value", ["70000", "-1", "http", ""])
def test_bad_http_port_is_one_line_and_exit_2(value):
    result = _run_server("--http-port", value)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--http-port" in lines[0], result.stderr


def test_http_port_equal_to_the_gearman_port_is_refused():
    port = str(free_port())
    result = subprocess.run(
        [sys.executable, "-m", "gearoffload_server", "--port", port, "--http-port", port,
         "--queue", "memory"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "--http-port must differ from --port" in result.stderr


def test_busy_http_port_is_one_line_and_exit_2():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = _run_server("--http-port", str(port))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"cannot listen on 127.0.0.1:{port} (--http-port)" in lines[0]
