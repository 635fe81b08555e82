"""``make demo``'s script: server + worker pool + the example app, real processes and real
HTTP; then SIGINT stops everything it started; and ``make demo`` itself, signalled, leaves
nothing behind."""

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
from pathlib import Path

import pytest

from conftest import ROOT, free_port, need_tool, poll_until


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
        assert f"{base}/flaky " in (tmp_path / "demo.log").read_text()
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


def alive(pid: int) -> bool:
    """``pid`` runs (a zombie whose parent has not reaped it yet does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def descendants(pid: int) -> dict[int, str]:
    """``{pid: command line}`` of every live process below ``pid``, from /proc."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue  # gone meanwhile
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, todo = {}, [pid]
    while todo:
        parent = todo.pop()
        for child, its_parent in parents.items():
            if its_parent == parent and alive(child):
                try:
                    found[child] = Path(f"/proc/{child}/cmdline").read_bytes().replace(
                        b"\0", b" ").decode(errors="replace")
                except OSError:
                    continue
                todo.append(child)
    return found


def processes_with(marker: bytes) -> list[int]:
    """The PIDs whose environment holds ``marker`` (an entry such as ``NAME=value``)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                environ = Path(f"/proc/{entry}/environ").read_bytes()
            except OSError:  # gone meanwhile, or not ours to read
                continue
            if marker in environ.split(b"\0"):
                found.append(int(entry))
    return found


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["TERM", "KILL"])
def test_make_demo_leaves_nothing_when_make_is_signalled(tmp_path, sig):
    """``kill -TERM <make>``: make passes SIGTERM to the demo (the recipe execs it: no
    shell in between to die alone); ``kill -KILL <make>``: the demo gets SIGTERM from the
    kernel (PR_SET_PDEATHSIG). Either way the demo stops the server and the pool, and the
    no process of it is left within seconds."""
    make = need_tool("make", "make")
    port, web_port, status_port = free_port(), free_port(), free_port()
    env = dict(os.environ, PORT=str(port), WEB_PORT=str(web_port), STATUS_PORT=str(status_port),
               GEAROFFLOAD_DEMO_STATE=str(tmp_path), PYTHONPATH=str(ROOT),
               XDG_STATE_HOME=str(tmp_path), MAKEFLAGS="")
    env.pop("GEAROFFLOAD_SERVERS", None)
    log_path = tmp_path / "make.log"
    with open(log_path, "w") as log:
        # This interpreter's venv, and no reinstall: the stamp counts as up to date.
        proc = subprocess.Popen([make, "--no-print-directory", "-o", ".venv/.installed-stamp",
                                 "demo", f"PY={sys.executable}"], cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    seen: dict[int, str] = {}
    try:
        assert poll_until(lambda: "Ctrl-C stops everything" in log_path.read_text()
                          or proc.poll() is not None, 40), log_path.read_text()
        assert proc.poll() is None, log_path.read_text()
        seen = descendants(proc.pid)
        demo = [pid for pid, command in seen.items() if "examples.flask_app.demo" in command]
        assert len(demo) == 1, seen
        # The demo is make's own child: no shell in between.
        assert int(Path(f"/proc/{demo[0]}/stat").read_text().rsplit(")", 1)[1].split()[1]) \
            == proc.pid
        assert any("gearoffload_server" in command for command in seen.values()), seen
        assert any("gearoffload.pool" in command for command in seen.values()), seen
        marker = f"GEAROFFLOAD_DEMO_STATE={tmp_path}".encode()
        assert set(processes_with(marker)) >= set(seen), "the marker is inherited"
        started = time.monotonic()
        os.kill(proc.pid, sig)
        proc.wait(20)
        assert poll_until(lambda: not any(alive(pid) for pid in seen), 20), \
            ({pid: seen[pid] for pid in seen if alive(pid)}, log_path.read_text())
        # Nothing the demo started later than the snapshot is left either: no process
        # carries this test's state directory in its environment. (Not "the ports are
        # free": another test's server may take a freed port number at once.)
        assert poll_until(lambda: not processes_with(marker), 10), processes_with(marker)
        assert time.monotonic() - started < 30
    finally:
        for pid in seen:  # only what this test started, by PID
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    if sig == signal.SIGTERM:
        assert "gearoffload demo: stopped" in log_path.read_text()
