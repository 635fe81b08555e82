"""``make demo``: a job server, a worker pool and the example app, in one command.

::

    python -m examples.flask_app.demo                  # server :4730, web :5000
    PORT=4731 WEB_PORT=8080 python -m examples.flask_app.demo
    python -m examples.flask_app.demo --no-children    # only the web app (bring your own)

Starts ``gearoffload-server`` and ``gearoffload-worker --wsgi examples.flask_app:app
--schedule`` (which also schedules the app's periodic task) as child processes on
127.0.0.1, serves the app with gevent's ``WSGIServer``, prints the URLs, and on Ctrl-C or
SIGTERM stops its children (by PID) and exits. On Linux, the demo gets SIGTERM when its
parent (``make``, a shell) dies, and its children when the demo dies, however it dies:
nothing is left holding the ports.
"""

from gevent import monkey

monkey.patch_all()  # entry point: first thing, before anything imports socket/threading

import argparse  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402
from gevent.pywsgi import WSGIServer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def die_with_parent() -> None:
    """Linux: have the kernel send this process SIGTERM when its parent dies
    (``prctl(PR_SET_PDEATHSIG)``). Also a ``preexec_fn``: it runs in the child between fork
    and exec, so a child of a demo that was SIGKILLed does not serve on for ever.
    Elsewhere (no ``prctl``): nothing, as before."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _load_prctl():
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# Looked up here, not in the preexec_fn: a forked child should only make the call.
_prctl = _load_prctl()


def wait_for_port(port: int, proc: subprocess.Popen | None, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"demo: {proc.args[2:4]} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"demo: nothing listening on 127.0.0.1:{port} after {timeout}s")


def stop(children: list[subprocess.Popen]) -> None:
    """SIGTERM each child we started (by PID), wait, SIGKILL what is left."""
    for proc in reversed(children):  # the workers first: they drain, then the server
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def wait_for_workers(address: str, timeout: float = 20.0) -> None:
    """Until the pool has registered (a view asked before then would answer 503 at once:
    no worker serves it)."""
    from gearoffload.admin import AdminClient
    from gearoffload.errors import GearmanError

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with AdminClient(address, timeout=2) as admin:
                if any(row.workers for row in admin.status()):
                    return
        except GearmanError:
            pass
        time.sleep(0.1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", 4730)),
                        help="job server port (default: $PORT or 4730)")
    parser.add_argument("--web-port", type=int,
                        default=int(os.environ.get("WEB_PORT", 5000)),
                        help="web app port (default: $WEB_PORT or 5000)")
    parser.add_argument("--status-port", type=int,
                        default=int(os.environ.get("STATUS_PORT", 9120)),
                        help="job server's status page and /metrics (default: $STATUS_PORT "
                             "or 9120; 0: off)")
    parser.add_argument("--processes", type=int, default=2, help="worker processes")
    parser.add_argument("--no-children", action="store_true",
                        help="serve the app only; server and workers run elsewhere")
    args = parser.parse_args(argv)
    parent = os.getppid()
    die_with_parent()
    if os.getppid() != parent:  # it died before the prctl: no signal will come
        return 1
    logging.basicConfig(level=logging.WARNING,
                        format="%(asctime)s web %(levelname)s %(name)s: %(message)s")
    address = f"127.0.0.1:{args.port}"
    os.environ.setdefault("GEAROFFLOAD_SERVERS", address)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    children: list[subprocess.Popen] = []
    try:
        if not args.no_children:
            server = subprocess.Popen([sys.executable, "-m", "gearoffload_server", "--port",
                                       str(args.port), "--http-port", str(args.status_port),
                                       "--verbose", "WARNING"], cwd=ROOT, env=env,
                                      preexec_fn=die_with_parent)
            children.append(server)
            wait_for_port(args.port, server)
            children.append(subprocess.Popen(
                [sys.executable, "-m", "gearoffload.pool", "--wsgi", "examples.flask_app:app",
                 "--servers", address, "--processes", str(args.processes),
                 "--concurrency", "20", "--log-level", "WARNING", "--schedule"],
                cwd=ROOT, env=env, preexec_fn=die_with_parent))
            wait_for_workers(address)

        sys.path.insert(0, ROOT)
        from examples.flask_app.webapp import app

        http = WSGIServer(("127.0.0.1", args.web_port), app, log=None)
        http.start()
        gevent.signal_handler(signal.SIGTERM, http.stop)
        gevent.signal_handler(signal.SIGINT, http.stop)
        base = f"http://127.0.0.1:{http.server_port}"
        print(f"gearoffload demo: job server {address}, workers: "
              f"{'elsewhere' if args.no_children else args.processes} processes", flush=True)
        for path, what in (("/", "index"), ("/primes/200000", "slow CPU-bound view"),
                           ("/stampede", "100 concurrent requests, one worker run"),
                           ("/report", "background job with a progress bar"),
                           ("/legacy/hello?name=you", "legacy WSGI app via the middleware"),
                           ("/offloaded-function/30", "an @offload function"),
                           ("/flaky", "a task that fails twice, retried by the server"),
                           ("/heartbeat", "a periodic task, once every 30 s")):
            print(f"  {base}{path:<28} {what}", flush=True)
        if args.status_port and not args.no_children:
            status = f"http://127.0.0.1:{args.status_port}"
            print(f"  {status}/{'':<27} job server status page (/metrics, /healthz)",
                  flush=True)
        print("Ctrl-C stops everything.", flush=True)
        http.serve_forever()
    finally:
        stop(children)
    print("gearoffload demo: stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
