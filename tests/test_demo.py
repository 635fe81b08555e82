"""``make demo``'s script: server + worker pool + the example app, real processes and real
HTTP; then SIGINT stops everything it started."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

from conftest import ROOT, free_port


def get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, response.read().decode()


def test_demo_serves_every_piece_and_stops_its_children_on_sigint(tmp_path):
    port, web_port, status_port = free_port(), free_port(), free_port()
    env = dict(os.environ, PORT=str(port), WEB_PORT=str(web_port), STATUS_PORT=str(status_port),
               GEAROFFLOAD_DEMO_STATE=str(tmp_path), PYTHONPATH=str(ROOT),
               XDG_STATE_HOME=str(tmp_path))  # the server's default queue file goes here
    env.pop("GEAROFFLOAD_SERVERS", None)
    log = open(tmp_path / "demo.log", "w+")
    demo = subprocess.Popen([sys.executable, "-m", "examples.flask_app.demo",
                             "--processes", "1"], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while "Ctrl-C stops everything" not in (tmp_path / "demo.log").read_text():
            assert demo.poll() is None and time.monotonic() < deadline, \
                (tmp_path / "demo.log").read_text()
            time.sleep(0.1)
        base = f"http://127.0.0.1:{web_port}"
        assert f"{base}/stampede" in (tmp_path / "demo.log").read_text()
        status, body = get(f"{base}/primes/1000")
        assert status == 200 and "168 primes up to 1000" in body
        worker_pid = int(re.search(r"by worker process (\d+)", body).group(1))
        assert worker_pid != demo.pid
        status, body = get(f"{base}/legacy/hello?name=test")
        assert status == 200 and body.startswith("Hello test from the legacy WSGI app")
        assert "run by a worker" in body
        status, body = get(f"{base}/offloaded-function/20")
        assert "fib(20) = 6765, computed by worker" in body
        # The flaky task fails twice; the job server retries it and the third run succeeds.
        request = urllib.request.Request(f"{base}/flaky/start", data=b"fail=0", method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            started = json.loads(response.read())
        deadline = time.monotonic() + 15
        while True:
            flaky = json.loads(get(f"{base}/flaky/{started['id']}?token={started['token']}")[1])
            if flaky["state"] in ("done", "failed", "dead") or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert (flaky["state"], flaky["runs"]) == ("done", 3), flaky
        # The pool's scheduler (--schedule) ran the heartbeat's latest slot at start.
        deadline = time.monotonic() + 10
        while "by worker" not in (body := get(f"{base}/heartbeat")[1]):
            assert time.monotonic() < deadline, body
            time.sleep(0.2)
        # The job server's status endpoint counts what the views just offloaded.
        assert f"http://127.0.0.1:{status_port}/" in (tmp_path / "demo.log").read_text()
        status, body = get(f"http://127.0.0.1:{status_port}/status.json")
        assert status == 200 and json.loads(body)["functions"], body
    finally:
        demo.send_signal(signal.SIGINT)
        code = demo.wait(20)
    assert code == 0
    assert "gearoffload demo: stopped" in (tmp_path / "demo.log").read_text()
    for p in (port, web_port, status_port):  # the children are gone with their sockets
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", p)) != 0
