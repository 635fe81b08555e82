"""End to end over real HTTP: a gevent WSGIServer in this process serving a Flask app, a
real gearoffload-server process, and a real ``gearoffload-worker`` pool (2 processes)
running the app's views. Requests are raw HTTP/1.0 over gevent sockets."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import gevent
import gevent.subprocess
import pytest
from gevent import socket
from gevent.pywsgi import WSGIServer

from conftest import ROOT, ServerProcess, free_port, gevent_time_limit

TEST_TIME_LIMIT = 40
TESTS = Path(__file__).resolve().parent


time_limit = gevent_time_limit(TEST_TIME_LIMIT)


def http(port: int, method: str, path: str, body: bytes = b"",
         timeout: float = 20.0) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.0 request; (status, headers, body)."""
    with gevent.Timeout(timeout), socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(f"{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    head, _, payload = b"".join(chunks).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, payload


class Stack:
    """Server process + worker pool process + the app on a WSGIServer here."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.server = ServerProcess("gearoffload").start()
        env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{TESTS}", E2E_STATE_DIR=str(tmp),
                   GEAROFFLOAD_SERVERS=self.server.address)
        self.pool_log = open(tmp / "pool.log", "wb")
        self.pool = gevent.subprocess.Popen(
            [sys.executable, "-m", "gearoffload.pool", "webapp_e2e:app", "--servers",
             self.server.address, "--processes", "2", "--concurrency", "10"],
            cwd=tmp, env=env, stdout=self.pool_log, stderr=self.pool_log)
        os.environ["E2E_STATE_DIR"] = str(tmp)
        sys.path.insert(0, str(TESTS))
        import webapp_e2e

        webapp_e2e.STATE_DIR = str(tmp)
        self.app = webapp_e2e.create_app(self.server.address)
        self.http = WSGIServer(("127.0.0.1", 0), self.app, log=None, backlog=2048)
        self.http.start()
        self.port = self.http.server_port
        self.wait_for_workers()

    def wait_for_workers(self) -> None:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with self.server.connect() as conn:
                status = conn.admin("status").decode()
            if any(line.endswith("\t2") for line in status.splitlines()
                   if "trivial" in line):
                return
            gevent.sleep(0.1)
        raise AssertionError(f"the pool did not register: {self.log()}")

    def log(self) -> str:
        return (self.tmp / "pool.log").read_text()

    def runs(self, name: str) -> int:
        path = self.tmp / f"{name}.runs"
        return len(path.read_text().splitlines()) if path.exists() else 0

    def stop(self) -> None:
        self.http.stop(timeout=1)
        if self.pool.poll() is None:
            self.pool.send_signal(signal.SIGTERM)
            try:
                self.pool.wait(10)
            except gevent.subprocess.TimeoutExpired:
                self.pool.kill()
                self.pool.wait(5)
        self.pool_log.close()
        self.server.stop()
        sys.path.remove(str(TESTS))


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    stack = Stack(tmp_path_factory.mktemp("e2e"))
    yield stack
    stack.stop()


def test_500_identical_concurrent_gets_run_the_view_once(stack):
    started = time.monotonic()
    requests = [gevent.spawn(http, stack.port, "GET", "/stampede?q=1") for _ in range(500)]
    gevent.joinall(requests, raise_error=True)
    elapsed = time.monotonic() - started
    statuses = [g.value[0] for g in requests]
    bodies = {g.value[2] for g in requests}
    assert statuses == [200] * 500
    assert bodies == {b'{"page":"expensive","q":"1","runs":1}\n'}
    assert stack.runs("stampede") == 1
    assert elapsed < 15


def test_background_view_202_poll_result(stack):
    status, headers, body = http(stack.port, "POST", "/report/5")
    assert status == 202
    location = headers["Location"]
    assert json.loads(body)["status_url"] == location
    states = []
    for _ in range(200):
        status, headers, body = http(stack.port, "GET", location)
        assert status == 200
        report = json.loads(body)
        states.append(report["state"])
        if report["state"] in ("done", "failed"):
            break
        gevent.sleep(0.05)
    assert report["state"] == "done", report
    assert report["progress"] == {"numerator": 5, "denominator": 5}
    assert report["result"]["steps"] == 5 and report["result"]["pid"] != os.getpid()
    assert "running" in states
    status, _, body = http(stack.port, "GET", report["result_url"])
    assert status == 200 and json.loads(body)["steps"] == 5


def test_worker_crash_mid_request_is_requeued_and_completes(stack):
    started = time.monotonic()
    status, _, body = http(stack.port, "GET", "/crash")
    assert (status, body) == (200, b"survived, attempt 2")
    assert stack.runs("crash") == 2
    assert time.monotonic() - started < 10
    for _ in range(50):  # the pool notices the death on its next reap
        if "died (exit status 3)" in stack.log():
            break
        gevent.sleep(0.1)
    assert "died (exit status 3)" in stack.log()


def test_no_server_is_503_over_http(stack):
    import webapp_e2e

    app = webapp_e2e.create_app(f"127.0.0.1:{free_port()}")
    http_server = WSGIServer(("127.0.0.1", 0), app, log=None)
    http_server.start()
    try:
        started = time.monotonic()
        status, headers, _ = http(http_server.server_port, "GET", "/trivial")
        assert status == 503 and headers["Retry-After"] == "5"
        assert time.monotonic() - started < 5
    finally:
        http_server.stop(timeout=1)


def test_flask_gearoffload_worker_command_runs_the_pool(tmp_path, monkeypatch):
    """`flask gearoffload worker` execs gearoffload-worker on this app with its servers."""
    server = ServerProcess("gearoffload").start()
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{TESTS}", FLASK_APP="webapp_e2e",
               GEAROFFLOAD_SERVERS=server.address, E2E_STATE_DIR=str(tmp_path))
    log = open(tmp_path / "cli.log", "wb")
    proc = gevent.subprocess.Popen(
        [sys.executable, "-m", "flask", "gearoffload", "worker", "--processes", "1"],
        cwd=tmp_path, env=env, stdout=log, stderr=log)
    monkeypatch.syspath_prepend(str(TESTS))
    try:
        deadline = time.monotonic() + 25
        while time.monotonic() < deadline and proc.poll() is None:
            with server.connect() as conn:
                status = conn.admin("status").decode()
            if "webapp_e2e.create_app.<locals>.trivial\t0\t0\t1" in status:
                break
            gevent.sleep(0.1)
        assert "webapp_e2e.create_app.<locals>.trivial\t0\t0\t1" in status, \
            (tmp_path / "cli.log").read_text()
        import webapp_e2e

        app = webapp_e2e.create_app(server.address)
        assert app.test_client().get("/trivial").text == "ok"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        log.close()
        server.stop()
    assert "webapp_e2e:app on " + server.address in (tmp_path / "cli.log").read_text()
