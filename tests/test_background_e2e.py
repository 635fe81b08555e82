"""Background work that survives (issue #14), over real HTTP: gunicorn with 4 worker
processes (gevent, gthread and sync workers), waitress (threads) and uWSGI (processes
and threads); a real ``gearoffload-server`` on the sqlite store, and a real
``gearoffload-worker`` pool serving ``webapp_e2e:app``.

Every poll goes through a new connection, so the gunicorn processes that answer differ
from the one that accepted the job: the state must come from the shared result backend
(our job server's kept results), not from any web process's memory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import gevent
import pytest
from test_web_e2e import http

from conftest import (
    IN_CI,
    ROOT,
    ServerProcess,
    free_port,
    gevent_time_limit,
    need_module,
    stop_process,
    wait_for_port,
)

TESTS = Path(__file__).resolve().parent
time_limit = gevent_time_limit(90)


class Web:
    """The server, the worker pool and gunicorn, each a real process."""

    def __init__(self, tmp: Path, web_server: str,
                 web_env: dict[str, str] | None = None) -> None:
        self.tmp = tmp
        self.web_server = web_server
        self.restarting = False
        self.db = tmp / "queue.db"
        self.server = ServerProcess("gearoffload", ["--queue", f"sqlite://{self.db}"]).start()
        self.env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{TESTS}",
                        E2E_STATE_DIR=str(tmp), GEAROFFLOAD_SERVERS=self.server.address)
        self.logs = open(tmp / "processes.log", "ab")
        # No --servers: the pool must read the app's GEAROFFLOAD_SERVERS.
        self.pool = self._spawn([sys.executable, "-m", "gearoffload.pool", "webapp_e2e:app",
                                 "--processes", "2", "--concurrency", "10"])
        self.port = free_port()
        self.web = self._spawn(self.web_command(web_server), web_env)
        wait_for_port(self.port, self.web, timeout=30)
        self.wait_for_workers()

    def web_command(self, web_server: str) -> list[str]:
        """gunicorn -w 4 with a worker class, waitress (threads), or uWSGI (4 processes,
        2 threads each)."""
        bind = f"127.0.0.1:{self.port}"
        if web_server.startswith("gunicorn-"):
            need_module("gunicorn")
            worker_class = web_server.split("-", 1)[1]
            threads = ["--threads", "4"] if worker_class == "gthread" else []
            return [sys.executable, "-m", "gunicorn", "-w", "4", "-k", worker_class,
                    *threads, "-b", bind, "--graceful-timeout", "5", "webapp_e2e:app"]
        if web_server == "waitress":
            need_module("waitress")
            return [sys.executable, "-m", "waitress", "--listen", bind, "--threads", "8",
                    "webapp_e2e:app"]
        uwsgi = Path(sys.executable).with_name("uwsgi")
        if not uwsgi.exists():
            message = "uwsgi not installed (pip install -e '.[test,flask]')"
            if IN_CI:
                pytest.fail(message)
            pytest.skip(message)
        return [str(uwsgi), "--http-socket", bind, "--master", "--processes", "4",
                "--threads", "2", "--module", "webapp_e2e:app", "--die-on-term",
                "--disable-logging"]

    def _spawn(self, command: list[str],
               env: dict[str, str] | None = None) -> subprocess.Popen:
        return subprocess.Popen(command, cwd=self.tmp, env={**self.env, **(env or {})},
                                stdout=self.logs, stderr=self.logs)

    def wait_for_workers(self) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with self.server.connect() as conn:
                status = conn.admin("status").decode()
            if any(line.endswith("\t2") for line in status.splitlines() if "report" in line):
                return
            gevent.sleep(0.1)
        raise AssertionError(f"the pool did not register: {self.log()}")

    def log(self) -> str:
        return (self.tmp / "processes.log").read_text(errors="replace")[-4000:]

    def submit(self, path: str) -> str:
        status, headers, body = http(self.port, "POST", path)
        assert status == 202, (status, body, self.log())
        return headers["Location"]

    def poll(self, location: str, timeout: float = 30.0) -> tuple[dict, set[str], set[str]]:
        """Poll until the job ends; (last status, states seen, gunicorn pids seen)."""
        states, pids = set(), set()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code, headers, body = http(self.port, "GET", location)
            status = json.loads(body)
            if code == 503 and self.restarting:  # honest while the job server is down
                gevent.sleep(0.1)
                continue
            assert code == 200, (code, status)
            states.add(status["state"])
            pids.add(headers.get("X-Served-By", "?"))
            if status["state"] in ("done", "failed", "dead"):
                return status, states, pids
            gevent.sleep(0.05)
        raise AssertionError(f"{location} did not end: {status}")

    def restart_server(self, sig: int = signal.SIGKILL) -> None:
        self.restarting = True
        stop_process(self.server.proc, sig, 10)
        restarted = ServerProcess("gearoffload", ["--queue", f"sqlite://{self.db}"])
        restarted.port = self.server.port
        self.server = restarted.start()

    def stop(self) -> None:
        for proc in (self.web, self.pool):
            if proc.poll() is None:
                stop_process(proc, signal.SIGTERM, 15)
        self.server.stop()
        self.logs.close()


@pytest.fixture(scope="module", params=["gunicorn-gevent", "gunicorn-gthread",
                                        "gunicorn-sync", "waitress", "uwsgi"])
def web(request, tmp_path_factory) -> Iterator[Web]:
    stack = Web(tmp_path_factory.mktemp(f"bg-{request.param}"), request.param)
    yield stack
    stack.stop()


def test_fifty_background_jobs_polled_through_any_process(web):
    locations = [web.submit("/report/2") for _ in range(50)]
    assert len(set(locations)) == 50
    results = gevent.joinall([gevent.spawn(web.poll, loc) for loc in locations],
                             raise_error=True)
    pids: set[str] = set()
    for greenlet in results:
        status, states, seen = greenlet.value
        assert states <= {"queued", "running", "done"}, states  # never 404, never lost
        assert status["state"] == "done" and status["result"]["steps"] == 2
        assert status["progress"] == {"numerator": 2, "denominator": 2}
        pids |= seen
    if web.web_server != "waitress":  # one process with threads
        assert len(pids) > 1  # the polls were answered by several web processes


def test_a_graceful_reload_mid_job_still_ends_done(web):
    location = web.submit("/report/10")  # ten steps of 0.1 s
    gevent.sleep(0.3)
    if web.web_server == "waitress":  # one process, no reload signal: restart it
        stop_process(web.web, signal.SIGTERM, 10)
        web.web = web._spawn(web.web_command("waitress"))
        wait_for_port(web.port, web.web, timeout=30)
    else:
        web.web.send_signal(signal.SIGHUP)  # new web processes; the job is the server's
    status, _, _ = web.poll(location)
    assert status["state"] == "done" and status["result"]["steps"] == 10


def test_the_submitting_process_may_exit_right_after_the_202(web):
    # Another web process, sharing no memory and no files with gunicorn's, submits and exits.
    script = ("import webapp_e2e; r = webapp_e2e.app.test_client().post('/report/3'); "
              "assert r.status_code == 202, r.status_code; print(r.headers['Location'])")
    out = subprocess.run([sys.executable, "-c", script], env=web.env, cwd=web.tmp,
                         capture_output=True, timeout=30, check=True)
    location = out.stdout.decode().strip().splitlines()[-1]
    status, _, _ = web.poll(location)
    assert status["state"] == "done" and status["result"]["steps"] == 3


def test_acknowledged_jobs_survive_a_kill_9_of_the_job_server(web):
    locations = [web.submit("/report/2") for _ in range(20)]  # each 202 = acknowledged
    web.restart_server(signal.SIGKILL)
    for greenlet in gevent.joinall([gevent.spawn(web.poll, loc, 45) for loc in locations],
                                   raise_error=True):
        status, _, _ = greenlet.value
        assert status["state"] == "done" and status["result"]["steps"] == 2


def test_a_background_view_that_fails_twice_is_retried_by_the_job_server(web):
    token = f"t{time.monotonic_ns()}"
    status, states, _ = web.poll(web.submit(f"/flaky/{token}"))
    assert status["state"] == "done" and status["result"] == {"runs": 3}, status
    assert states <= {"queued", "running", "done"}, states  # never "failed" in between
    assert (web.tmp / f"flaky-{token}.runs").read_text().count("\n") == 3


def test_bad_ids_big_results_and_unencodable_answers_get_json_errors(web):
    for bad in ("garbage", "x" * 1500, "WyJhIiwiYiIsbnVsbF0.AAAAAA.forgedsignature0000"):
        code, _, body = http(web.port, "GET", f"/_offload/jobs/{bad}")
        assert code == 404 and json.loads(body)["error"], (bad, body)
    # Over the server's --result-max-size (1 MiB by default): done, but not kept.
    status, _, _ = web.poll(web.submit(f"/big/{2 * 1024 * 1024}"))
    assert status["state"] == "done" and "larger than" in status["error"]
    code, _, body = http(web.port, "GET", status["id"].join(["/_offload/jobs/", "/result"]))
    assert code == 502 and "larger than" in json.loads(body)["error"]
    status, _, _ = web.poll(web.submit("/unencodable"))
    assert status["state"] == "failed" and "TypeError" in status["error"]
    # Nothing went down: the same stack still serves.
    assert http(web.port, "GET", "/trivial")[2] == b"ok"
    status, _, _ = web.poll(web.submit("/report/1"))
    assert status["state"] == "done"
