"""The read-only HTTP endpoint beside the Gearman port (``--http-port``).

``ObservabilityApp`` is a small WSGI app over the job state:

- ``/metrics``: Prometheus text format (``metrics.py``);
- ``/healthz``: ``200 ok`` while serving, ``503 draining`` once SIGTERM started the
  shutdown (for load balancers and Kubernetes probes);
- ``/``: the live status page (``status_page.py``), fed by ``/status.json``
  (``status.py``).

Only GET and HEAD; nothing here changes the server. It reveals function names, handles,
unique keys and exception texts, so keep it on loopback or a private network (the
default address is ``--host``, itself 127.0.0.1 by default).

``HttpEndpoint`` serves the app with gevent's ``WSGIServer`` in the job server's process;
requests are handled between two rounds of the Gearman poll loop and read the state
without copying it first. ``/metrics`` and ``/status.json`` are built a chunk of
functions at a time and yield to the loop between chunks, so that a scrape never holds
the Gearman side for more than a few milliseconds, whatever the number of functions
(issue #17); they export at most ``--metrics-max-functions`` functions each.

Idle peers cannot take the port: every read and write has a timeout
(``READ_TIMEOUT``), and beyond ``MAX_CONNECTIONS`` open connections a newcomer evicts
the oldest one that is not in the middle of a request (waiting for its request line,
headers or next keep-alive request).

Example::

    from gearoffload_server.http import HttpEndpoint
    endpoint = HttpEndpoint(server.state, ("127.0.0.1", 9120))
    endpoint.start()          # raises OSError if the port is taken
    ...
    endpoint.stop()
"""

from __future__ import annotations

import functools
import json
import logging
import socket
from collections.abc import Callable, Iterable

import gevent
from gevent.lock import BoundedSemaphore
from gevent.pywsgi import WSGIHandler, WSGIServer

from .metrics import CONTENT_TYPE_LATEST, MAX_FUNCTIONS, render
from .state import JobServerState
from .status import snapshot
from .status_page import CONTENT_SECURITY_POLICY, PAGE

log = logging.getLogger("gearoffload.http")

#: Scrapes (/metrics, /status.json) built at once; more wait for a slot.
MAX_SCRAPES = 4
#: Open HTTP connections; beyond it a newcomer evicts the oldest idle one.
MAX_CONNECTIONS = 256
#: Seconds any read or write on an HTTP connection may block.
READ_TIMEOUT = 10.0

StartResponse = Callable[[str, list[tuple[str, str]]], object]
_COMMON = [("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff")]


class ObservabilityApp:
    """WSGI app: ``/metrics``, ``/healthz``, ``/status.json`` and the status page ``/``."""

    def __init__(self, state: JobServerState, max_functions: int = MAX_FUNCTIONS) -> None:
        self.state = state
        self.max_functions = max_functions
        self.started = state.scheduler.now()
        self._scrapes = BoundedSemaphore(MAX_SCRAPES)
        #: Between chunks of a scrape: let the Gearman poll loop run.
        self._pause = functools.partial(gevent.sleep, 0)
        self._routes: dict[str, Callable[[], tuple[str, str, bytes, list]]] = {
            "/": self._page,
            "/status.json": self._status,
            "/metrics": self._metrics,
            "/healthz": self._healthz,
        }

    def __call__(self, environ: dict, start_response: StartResponse) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        route = self._routes.get(environ.get("PATH_INFO") or "/")
        if route is None:
            status, ctype, body, extra = "404 Not Found", "text/plain", b"not found\n", []
        elif method not in ("GET", "HEAD"):
            status, ctype, body, extra = ("405 Method Not Allowed", "text/plain",
                                          b"read-only: GET or HEAD\n", [("Allow", "GET, HEAD")])
        else:
            status, ctype, body, extra = route()
        headers = [("Content-Type", ctype), ("Content-Length", str(len(body))),
                   *_COMMON, *extra]
        start_response(status, headers)
        return [b""] if method == "HEAD" else [body]

    def _page(self) -> tuple[str, str, bytes, list]:
        return ("200 OK", "text/html; charset=utf-8", PAGE,
                [("Content-Security-Policy", CONTENT_SECURITY_POLICY),
                 ("X-Frame-Options", "DENY"), ("Referrer-Policy", "no-referrer")])

    def _status(self) -> tuple[str, str, bytes, list]:
        with self._scrapes:
            data = snapshot(self.state, self.started, max_functions=self.max_functions,
                            pause=self._pause)
            self._pause()
            body = json.dumps(data, separators=(",", ":"))
        return "200 OK", "application/json", body.encode(), []

    def _metrics(self) -> tuple[str, str, bytes, list]:
        with self._scrapes:
            body = render(self.state, self.max_functions, self._pause)
        return "200 OK", CONTENT_TYPE_LATEST, body, []

    def _healthz(self) -> tuple[str, str, bytes, list]:
        if self.state.draining:
            return "503 Service Unavailable", "text/plain", b"draining\n", []
        return "200 OK", "text/plain", b"ok\n", []


class HttpEndpoint:
    """``ObservabilityApp`` on gevent's ``WSGIServer``, started and stopped with the job
    server. Access lines are not logged (a scraper every few seconds would drown the
    log); errors go to the ``gearoffload.http`` logger."""

    def __init__(self, state: JobServerState, address: tuple[str, int],
                 max_functions: int = MAX_FUNCTIONS) -> None:
        self.app = ObservabilityApp(state, max_functions)
        # SERVER_NAME given: else pywsgi's start() resolves the address with getfqdn(),
        # which yields to the hub (a DNS lookup, possibly slow) while the Gearman port is
        # already serving and before __main__ has installed its signal handlers.
        self.server = _BoundedWSGIServer(address, self.app, log=None, error_log=_ErrorLog(),
                                         handler_class=_Handler,
                                         environ={"SERVER_NAME": address[0] or "localhost"})

    @property
    def address(self) -> tuple[str, int]:
        return self.server.address[:2]

    def start(self) -> None:
        """Bind and serve in the background (raises ``OSError`` if the port is busy)."""
        self.server.start()

    def stop(self, timeout: float = 1.0) -> None:
        self.server.stop(timeout)


class _BoundedWSGIServer(WSGIServer):
    """``WSGIServer`` whose idle peers cannot exhaust it: reads and writes time out after
    ``READ_TIMEOUT``, and past ``MAX_CONNECTIONS`` a newcomer evicts the oldest
    connection not inside a request (a newcomer is refused only when every connection is
    busy answering). A greenlet per connection, no pool to fill."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        #: Open connections, oldest first -> whether a request is being answered.
        self.open: dict[socket.socket, bool] = {}

    def handle(self, sock: socket.socket, address: tuple) -> None:
        sock.settimeout(READ_TIMEOUT)
        if len(self.open) >= MAX_CONNECTIONS and not self._evict_idle():
            sock.close()
            return
        self.open[sock] = False
        try:
            super().handle(sock, address)
        finally:
            self.open.pop(sock, None)

    def _evict_idle(self) -> bool:
        for other, busy in self.open.items():
            if not busy:
                del self.open[other]
                try:
                    other.shutdown(socket.SHUT_RDWR)  # its handler reads EOF and ends
                except OSError:
                    pass
                return True
        return False


class _Handler(WSGIHandler):
    """Marks its connection busy while a request is answered (not evictable then)."""

    def handle_one_response(self):
        server, sock = self.server, self.socket
        if sock in server.open:
            server.open[sock] = True
        try:
            return super().handle_one_response()
        finally:
            if sock in server.open:
                server.open[sock] = False


class _ErrorLog:
    """pywsgi writes tracebacks and bad-request notes to a file-like object."""

    def write(self, text: str) -> None:
        text = text.rstrip()
        if text:
            log.warning("%s", text)

    def flush(self) -> None:
        pass
