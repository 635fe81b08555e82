"""Security limits (issue #6): who may change the server through the admin protocol, and
the per-server and per-connection limits that keep one peer from exhausting it.

The admin permission rule needs a non-loopback peer, which tests cannot be, so it is
tested on ``AdminProtocol`` with ``Peer`` objects built directly (no sockets, as in
test_state.py); the CLI validation and the loopback case use a real server process. Each
limit is tested against a real process with small values, on loopback only.
"""

from __future__ import annotations

import ipaddress
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT, RawConn
from gearoffload.protocol import REQ, Packet
from gearoffload.protocol import PacketType as T
from gearoffload_server.admin import AdminProtocol
from gearoffload_server.config import ServerConfig, parse_args
from gearoffload_server.state import JobServerState, ManualScheduler, Peer

MUTATING = ["cancel job H:t:1", "create function f", "drop function f", "maxqueue f 3",
            "maxqueue f", "requeue dead job H:t:1", "shutdown"]
READ_ONLY = ["status", "prioritystatus", "workers", "show jobs", "show unique jobs",
             "show dead jobs", "version", "getpid", "verbose", "result some-unique"]


def run_server(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gearoffload_server", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=10)


def admin_reply(peer_address: str, line: str, loopback: bool = False, **config) -> bytes:
    config.setdefault("handle_prefix", "H:t")
    config.setdefault("enable_shutdown", True)
    state = JobServerState(ServerConfig(**config), ManualScheduler())
    state.on_shutdown = lambda graceful: None
    peer = state.connect(Peer(fd=7, address=peer_address, loopback=loopback))
    AdminProtocol(state).handle(peer, line.encode())
    return peer.take_output()


# -- who may send mutating admin commands (unit level) -----------------------------------

@pytest.mark.parametrize("line", MUTATING)
def test_mutating_command_from_remote_is_refused(line):
    reply = admin_reply("10.1.2.3", line)
    word = line.split()[0].encode()
    assert reply == (b"ERR PERMISSION_DENIED " + word +
                     b"+is+only+allowed+from+loopback+or+--admin-allow+addresses\r\n")


def test_refused_command_changes_nothing():
    state = JobServerState(ServerConfig(handle_prefix="H:t"), ManualScheduler())
    admin = AdminProtocol(state)
    remote = state.connect(Peer(fd=7, address="10.1.2.3", loopback=False))
    admin.handle(remote, b"create function f")
    assert b"f" not in state.functions
    admin.handle(remote, b"maxqueue x 3")
    assert b"PERMISSION_DENIED" in remote.take_output()


@pytest.mark.parametrize("line", READ_ONLY)
def test_read_only_command_from_remote_is_answered(line):
    reply = admin_reply("10.1.2.3", line)
    assert reply.startswith(b"OK") or reply.endswith(b".\n"), reply
    assert not reply.startswith(b"ERR"), reply


@pytest.mark.parametrize("address, allowed", [
    ("10.1.2.3", True), ("10.255.0.1", True), ("192.0.2.7", True), ("192.0.2.8", False),
    ("11.0.0.1", False), ("::ffff:10.1.2.3", True), ("fd00::5", True), ("fe80::1", False),
])
def test_admin_allow_networks(address, allowed):
    networks = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("192.0.2.7/32"),
                ipaddress.ip_network("fd00::/8"))
    reply = admin_reply(address, "create function f", admin_allow=networks)
    assert (reply == b"OK\r\n") is allowed, reply


def test_loopback_peer_may_change_and_mapped_loopback_too():
    assert admin_reply("127.0.0.1", "create function f", loopback=True) == b"OK\r\n"
    assert admin_reply("::ffff:127.0.0.1", "create function f") == b"OK\r\n"


def test_disabled_shutdown_stays_unknown_for_remote_peers():
    reply = admin_reply("10.1.2.3", "shutdown", enable_shutdown=False)
    assert reply == b"ERR UNKNOWN_COMMAND Unknown+server+commandshutdown\r\n"


def test_admin_allow_parsed_into_networks():
    config = parse_args(["--admin-allow", "10.0.0.0/8", "--admin-allow", "192.0.2.7"])
    assert config.admin_allow == (ipaddress.ip_network("10.0.0.0/8"),
                                  ipaddress.ip_network("192.0.2.7/32"))
    assert parse_args([]).admin_allow == ()


# -- the limits at the state level -------------------------------------------------------

def test_max_queue_is_every_functions_default_and_maxqueue_overrides_it():
    state = JobServerState(ServerConfig(handle_prefix="H:t", max_queue=4), ManualScheduler())
    assert state.function(b"f").limits == [4, 4, 4]
    admin = AdminProtocol(state)
    peer = state.connect(Peer(fd=7, address="127.0.0.1"))
    admin.handle(peer, b"maxqueue f 9")
    assert state.functions[b"f"].limits == [9, 9, 9]


def test_waiting_count_follows_attachments():
    state = JobServerState(ServerConfig(handle_prefix="H:t", max_client_jobs=3),
                           ManualScheduler())
    client = state.connect(Peer(fd=7, address="127.0.0.1"))
    for unique in (b"a", b"a", b"b"):  # the coalesced one counts twice: two submissions
        state.handle(client, Packet(REQ, T.SUBMIT_JOB, (b"f", unique, b"x")))
    assert client.waiting == 3
    state.handle(client, Packet(REQ, T.SUBMIT_JOB, (b"f", b"c", b"x")))
    assert b"Too many jobs waiting" in client.take_output()
    handle = next(iter(state.jobs))
    AdminProtocol(state).handle(client, b"cancel job " + handle)
    assert client.waiting == 1


# -- real processes ------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--admin-allow", "10.0.0.300/8"], "not an address or network"),
    (["--admin-allow", "everyone"], "not an address or network"),
    (["--max-connections", "0"], "--max-connections must be at least 1"),
    (["--idle-timeout", "-1"], "--idle-timeout must be between 0 (off) and 86400"),
    (["--max-queue", "-5"], "--max-queue must be 0 (unlimited)"),
    (["--max-client-jobs", "x"], "argument --max-client-jobs: invalid int value"),
])
def test_bad_security_option_is_one_line_and_exit_2(args, message):
    result = run_server(*args)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


def test_loopback_admin_may_change_with_admin_allow_set(server_factory):
    server = server_factory("gearoffload", "--admin-allow", "10.0.0.0/8",
                            "--admin-allow", "fd00::/8")
    with server.connect() as c:
        assert c.admin("create function f") == b"OK\r\n"
        assert c.admin("maxqueue f 2") == b"OK\r\n"
        assert c.admin("drop function f") == b"OK\r\n"


def _echo(conn: RawConn) -> None:
    conn.send(T.ECHO_REQ, b"hi")
    assert conn.expect(T.ECHO_RES) == (b"hi",)


def _admitted(server) -> RawConn:
    """A connection the server has taken in (the start-up probe of ``ServerProcess`` may
    still hold a slot for a moment when the limit is small)."""
    deadline = time.monotonic() + 5
    while True:
        conn = server.connect()
        try:
            _echo(conn)
            return conn
        except (ConnectionError, OSError):
            conn.close()
            assert time.monotonic() < deadline, "never admitted"
            time.sleep(0.05)


def test_max_connections_refuses_beyond_the_limit_with_one_log_line(server_factory):
    server = server_factory("gearoffload", "--max-connections", "5")
    held = [_admitted(server) for _ in range(5)]
    refused = [server.connect() for _ in range(4)]
    for conn in refused:
        assert conn.is_closed(2.0)
        conn.close()
    held.pop().close()
    _admitted(server).close()  # the server notices the close; a newcomer gets the slot
    for conn in held:
        _echo(conn)  # those inside were never disturbed
        conn.close()
    server.stop()
    log = server.stderr_text()
    assert log.count("--max-connections") == 1, log  # one line for the whole burst


def test_idle_timeout_closes_idle_peers_but_not_a_sleeping_worker(server_factory):
    server = server_factory("gearoffload", "--idle-timeout", "1")
    started = time.monotonic()
    with server.connect() as silent, server.connect() as talker, \
            server.connect() as worker:
        _echo(talker)
        worker.send(T.CAN_DO, b"f")
        worker.send(T.PRE_SLEEP)
        assert silent.is_closed(4.0)
        assert time.monotonic() - started < 4.0
        # Spoke, then idle with nothing in flight: closed too (Redis's ``timeout``).
        assert talker.is_closed(2.0)
        with server.connect() as c:
            c.send(T.SUBMIT_JOB_BG, b"f", b"", b"x")
            c.expect(T.JOB_CREATED)
        worker.expect(T.NOOP)  # the sleeping worker is still connected
    server.stop()
    log = server.stderr_text()
    assert log.count("--idle-timeout") == 2, log


def test_idle_timeout_zero_keeps_silent_connections(server_factory):
    server = server_factory("gearoffload", "--idle-timeout", "0")
    with server.connect() as silent:
        assert not silent.is_closed(1.5)
        _echo(silent)


def test_max_queue_default_and_admin_override(server_factory):
    server = server_factory("gearoffload", "--max-queue", "2")
    with server.connect() as c:
        for n in (b"1", b"2"):
            c.send(T.SUBMIT_JOB_BG, b"f", b"", n)
            c.expect(T.JOB_CREATED)
        c.send(T.SUBMIT_JOB_BG, b"f", b"", b"3")
        assert c.expect(T.ERROR) == (b"QUEUE_ERROR", b"Job queue is full")
        assert c.admin("maxqueue f 3") == b"OK\r\n"
        c.send(T.SUBMIT_JOB_BG, b"f", b"", b"3")
        c.expect(T.JOB_CREATED)
        c.send(T.SUBMIT_JOB_BG, b"other", b"", b"x")  # every function gets the default
        c.expect(T.JOB_CREATED)
        _echo(c)  # an ERROR reply does not close the connection
    assert server.proc.poll() is None


def test_max_client_jobs_caps_waiting_foreground_jobs(server_factory):
    server = server_factory("gearoffload", "--max-client-jobs", "2")
    with server.connect() as client, server.connect() as other:
        handles = []
        for n in (b"1", b"2"):
            client.send(T.SUBMIT_JOB, b"f", b"", n)
            handles.append(client.expect(T.JOB_CREATED)[0])
        client.send(T.SUBMIT_JOB, b"f", b"", b"3")
        assert client.expect(T.ERROR) == (
            b"QUEUE_ERROR", b"Too many jobs waiting on this connection")
        client.send(T.SUBMIT_JOB_BG, b"f", b"", b"bg")  # background jobs are not waited on
        client.expect(T.JOB_CREATED)
        other.send(T.SUBMIT_JOB, b"f", b"", b"x")  # the cap is per connection
        other.expect(T.JOB_CREATED)
        with server.connect() as worker:  # one finishes: room for one more
            worker.send(T.CAN_DO, b"f")
            worker.send(T.GRAB_JOB)
            handle = worker.expect(T.JOB_ASSIGN)[0]
            assert handle == handles[0]
            worker.send(T.WORK_COMPLETE, handle, b"done")
            assert client.expect(T.WORK_COMPLETE) == (handle, b"done")
        client.send(T.SUBMIT_JOB, b"f", b"", b"4")
        client.expect(T.JOB_CREATED)
        _echo(client)
    assert server.proc.poll() is None


def test_refused_connection_is_closed_not_left_hanging(server_factory):
    server = server_factory("gearoffload", "--max-connections", "1")
    with _admitted(server):
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=3)
        try:
            sock.settimeout(3)
            try:
                assert sock.recv(1) == b""
            except ConnectionResetError:
                pass
        finally:
            sock.close()
