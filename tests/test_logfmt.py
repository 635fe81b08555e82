"""Structured logs (``--log-format text|json``): the formatters, a real server provoked into
connection and job events whose JSON lines carry the fields, the admin refusal and the
worker's task events, and bad values of the flag."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, ServerProcess, compiled_and_source, gevent_time_limit, working
from gearoffload import Client, Worker
from gearoffload.errors import JobFailed
from gearoffload.logfmt import JsonFormatter, TextFormatter, make_formatter
from gearoffload.protocol import PacketType as T
from gearoffload_server.admin import AdminProtocol
from gearoffload_server.config import ServerConfig
from gearoffload_server.state import JobServerState, ManualScheduler, Peer

time_limit = gevent_time_limit(40)
# The compiled modules, and their .py in this process (slow: under CI=true or --run-slow).
variant = compiled_and_source(slow=True)
ISO_MS_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def record(msg: str = "job %s requeued", args: tuple = ("H:x:1",), **extra) -> logging.LogRecord:
    return logging.makeLogRecord({"name": "gearoffload.server", "levelname": "WARNING",
                                  "levelno": logging.WARNING, "msg": msg, "args": args,
                                  **extra})


# -- the formatters -------------------------------------------------------------------

def test_json_has_the_base_keys_and_only_the_fields_present():
    entry = json.loads(JsonFormatter().format(record(
        event="job.worker_lost", handle="H:x:1", function="resize", peer="10.0.0.7", fd=12,
        unique=None)))
    assert ISO_MS_UTC.match(entry.pop("ts"))
    assert entry == {"level": "WARNING", "logger": "gearoffload.server",
                     "msg": "job H:x:1 requeued", "event": "job.worker_lost",
                     "handle": "H:x:1", "function": "resize", "peer": "10.0.0.7", "fd": 12}


def test_json_timestamp_is_utc_with_milliseconds():
    entry = json.loads(JsonFormatter().format(record(created=1_700_000_000.1234)))
    assert entry["ts"] == "2023-11-14T22:13:20.123Z"


def test_json_carries_the_exception_and_stays_one_line():
    try:
        raise ValueError("kaput\nsecond line")
    except ValueError:
        rec = record("boom\nwith a newline", (), exc_info=sys.exc_info(),
                     handle=b"H:\xffbytes")
    line = JsonFormatter().format(rec)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["msg"] == "boom\nwith a newline"
    assert entry["exc"].startswith("Traceback") and "ValueError: kaput" in entry["exc"]
    assert entry["handle"] == "H:\ufffdbytes"


def test_json_pid_for_the_worker_pool():
    assert "pid" not in json.loads(JsonFormatter().format(record()))
    assert isinstance(json.loads(JsonFormatter(pid=True).format(record()))["pid"], int)


def test_text_keeps_the_line_and_appends_fields():
    formatter = TextFormatter("%(levelname)s %(name)s: %(message)s")
    assert formatter.format(record()) == "WARNING gearoffload.server: job H:x:1 requeued"
    line = formatter.format(record(event="job.retry", handle="H:x:1", function="a b",
                                   unique=""))
    assert line == ('WARNING gearoffload.server: job H:x:1 requeued event=job.retry '
                    'handle=H:x:1 function="a b" unique=""')


def test_text_fields_come_before_the_traceback():
    try:
        raise ValueError("kaput")
    except ValueError:
        rec = record("boom", (), exc_info=sys.exc_info(), peer="127.0.0.1", fd=3)
    first, *rest = TextFormatter("%(message)s").format(rec).splitlines()
    assert first == "boom peer=127.0.0.1 fd=3"
    assert rest[0].startswith("Traceback") and rest[-1] == "ValueError: kaput"


def test_make_formatter_refuses_unknown_formats():
    with pytest.raises(ValueError, match="text, json"):
        make_formatter("xml")


# -- a real server --------------------------------------------------------------------

def events(path: Path) -> list[dict]:
    lines = path.read_text().splitlines()
    assert lines
    return [json.loads(line) for line in lines]  # every line is one JSON object


def first(entries: list[dict], event: str) -> dict:
    found = [e for e in entries if e.get("event") == event]
    assert found, f"no {event} in {[e.get('event') for e in entries]}"
    return found[0]


def test_server_json_log_carries_job_and_peer_fields(tmp_path):
    log_file = tmp_path / "server.log"
    server = ServerProcess("gearoffload", [
        "--log-format", "json", "--log-file", str(log_file), "--verbose", "DEBUG",
        "--retry-failed", "1", "--retry-backoff", "0"]).start()
    try:
        # 1. garbage from a raw socket: a protocol error, and the connection is closed
        with server.connect() as bad:
            bad.send_raw(b"\0GARBAGE\0\0\0\0\0")
            assert bad.is_closed()
        # 2. a worker disconnects while it holds a job: the job is requeued
        with server.connect() as client:
            client.send(T.SUBMIT_JOB_BG, b"log_lost", b"u-lost", b"x")
            [handle] = client.expect(T.JOB_CREATED)
        worker = server.connect()
        worker.send(T.CAN_DO, b"log_lost")
        worker.send(T.GRAB_JOB_UNIQ)
        assert worker.expect(T.JOB_ASSIGN_UNIQ)[0] == handle
        worker.close()
        # 3. CAN_DO_TIMEOUT runs out: a failed attempt, retried (--retry-failed 1)
        with server.connect() as slow:
            slow.send(T.CAN_DO_TIMEOUT, b"log_lost", b"1")
            slow.send(T.GRAB_JOB)
            assert slow.expect(T.JOB_ASSIGN)[0] == handle
            time.sleep(1.5)
        # 4. a background job fails twice with --retry-failed 1: a retry, then dead
        with server.connect() as client:
            client.send(T.SUBMIT_JOB_BG, b"log_fail", b"", b"x")
            [failing] = client.expect(T.JOB_CREATED)
        with server.connect() as failer:
            failer.send(T.CAN_DO, b"log_fail")
            for _ in range(2):
                deadline = time.monotonic() + 5
                while True:  # the retry is scheduled (backoff 0): grab until it is back
                    failer.send(T.GRAB_JOB)
                    packet = failer.recv()
                    if packet.type == T.JOB_ASSIGN or time.monotonic() > deadline:
                        break
                    time.sleep(0.05)
                assert packet.type == T.JOB_ASSIGN and packet.args[0] == failing
                failer.send(T.WORK_FAIL, failing)
            failer.send(T.ECHO_REQ, b"sync")
            failer.expect(T.ECHO_RES)
    finally:
        assert server.stop() == 0
    entries = events(log_file)
    for entry in entries:
        assert ISO_MS_UTC.match(entry["ts"])
        assert {"level", "logger", "msg"} <= entry.keys()

    error = first(entries, "conn.protocol_error")
    assert error["level"] == "WARNING" and error["peer"] == "127.0.0.1"
    assert isinstance(error["fd"], int) and "protocol error" in error["msg"]

    lost = first(entries, "job.worker_lost")
    assert lost["handle"] == handle.decode() and lost["function"] == "log_lost"
    assert lost["unique"] == "u-lost" and lost["peer"] == "127.0.0.1"
    assert isinstance(lost["fd"], int)

    timeout = first(entries, "job.timeout")
    assert timeout["handle"] == handle.decode() and timeout["function"] == "log_lost"

    retries = [e for e in entries if e.get("event") == "job.retry"]
    assert retries[0]["handle"] == handle.decode()  # the timed-out attempt (issue #17)
    retry = next(e for e in retries if e["function"] == "log_fail")
    dead = first(entries, "job.dead_letter")
    assert retry["handle"] == dead["handle"] == failing.decode()
    assert retry["function"] == dead["function"] == "log_fail"
    assert "unique" not in dead  # an empty unique is left out, not written as ""


def test_server_text_log_appends_fields():
    server = ServerProcess("gearoffload").start()
    try:
        with server.connect() as bad:
            bad.send_raw(b"\0GARBAGE\0\0\0\0\0")
            assert bad.is_closed()
    finally:
        server.stop()
    line = next(line for line in server.stderr_text().splitlines()
                if "protocol error" in line)
    assert re.search(r" WARNING gearoffload\.server: 127\.0\.0\.1 fd=\d+ protocol error: "
                     r".* event=conn\.protocol_error peer=127\.0\.0\.1 fd=\d+$", line), line


def test_refused_admin_command_is_logged_with_the_peer(caplog):
    state = JobServerState(ServerConfig(handle_prefix="H:t"), ManualScheduler())
    peer = state.connect(Peer(fd=7, address="10.1.2.3", loopback=False))
    admin = AdminProtocol(state)
    with caplog.at_level(logging.WARNING, logger="gearoffload.server"):
        for _ in range(50):  # a flood of refusals is one line per interval, not fifty
            admin.handle(peer, b"cancel job H:t:1")
    assert peer.take_output().count(b"PERMISSION_DENIED") == 50
    [rec] = [r for r in caplog.records if getattr(r, "event", None) == "admin.refused"]
    assert (rec.peer, rec.fd, rec.command) == ("10.1.2.3", 7, "cancel")


@pytest.mark.parametrize("command", [
    [sys.executable, "-m", "gearoffload_server", "--log-format", "bogus"],
    [sys.executable, "-m", "gearoffload.pool", "tests", "--log-format", "bogus"],
], ids=["server", "worker-pool"])
def test_bogus_log_format_exits_2(command):
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=20)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert "--log-format must be one of text, json" in last
    if "gearoffload_server" in command:
        assert result.stderr.count("\n") == 1


# -- the worker's task events -------------------------------------------------------

def test_worker_task_failure_carries_handle_function_server(our_server, caplog):
    worker = Worker(our_server.address)

    @worker.task("log_task_fails")
    def fails(job):
        raise JobFailed("no luck")

    with caplog.at_level(logging.INFO, logger="gearoffload.worker"), working(worker), \
            Client(our_server.address) as client:
        job = client.submit("log_task_fails", b"x", unique="u-1")
        with pytest.raises(JobFailed):
            job.result()
    [rec] = [r for r in caplog.records if getattr(r, "event", None) == "task.failed"]
    assert (rec.handle, rec.function, rec.unique, rec.server) == (
        job.handle, "log_task_fails", "u-1", our_server.address)
    assert json.loads(JsonFormatter().format(rec))["server"] == our_server.address
