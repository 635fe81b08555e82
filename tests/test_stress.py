"""A short run of benchmarks/stress.py: random clients and workers, then a state audit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # 7 s of CPU-bound load: under CI=true, or --run-slow
def test_stress_five_seconds_leaves_server_consistent():
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "stress.py"), "--seconds", "5",
         "--actors", "16"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK: server consistent" in result.stdout


def test_idle_timeout_forgets_closed_and_talking_connections_early():
    """Regression (found by the stress run): with --idle-timeout (default 300 s) every
    connection stayed referenced for the whole timeout after it closed, so RSS grew with
    connection churn. The sweeper keeps no list of its own now (it walks the open
    connections at each tick): a closed connection is gone at once."""
    import gevent
    import gevent.socket

    from gearoffload_server.config import ServerConfig
    from gearoffload_server.server import GearmanServer

    srv = GearmanServer(ServerConfig(port=0, queue="memory", idle_timeout=4.0),
                        ("127.0.0.1", 0))
    srv.start()
    try:
        port = srv.address[1]
        socks = [gevent.socket.create_connection(("127.0.0.1", port)) for _ in range(30)]
        talker = gevent.socket.create_connection(("127.0.0.1", port))
        quiet = gevent.socket.create_connection(("127.0.0.1", port))
        talker.sendall(b"version\n")
        with gevent.Timeout(3):
            assert talker.recv(100).startswith(b"OK")
            while len(srv.connections) < 32:
                gevent.sleep(0.01)
        assert srv._sweeper is not None
        for s in socks:
            s.close()
        with gevent.Timeout(3):  # well before the 4 s timeout
            while len(srv.connections) > 2:
                gevent.sleep(0.05)
        talker.close()
        quiet.close()
    finally:
        srv.stop()
