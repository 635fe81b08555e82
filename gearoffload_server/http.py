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
without copying it first, which is safe because nothing else runs meanwhile.

Example::

    from gearoffload_server.http import HttpEndpoint
    endpoint = HttpEndpoint(server.state, ("127.0.0.1", 9120))
    endpoint.start()          # raises OSError if the port is taken
    ...
    endpoint.stop()
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable

from gevent.pool import Pool
from gevent.pywsgi import WSGIServer

from .metrics import CONTENT_TYPE_LATEST, exposition, metrics_registry
from .state import JobServerState
from .status import snapshot
from .status_page import CONTENT_SECURITY_POLICY, PAGE

log = logging.getLogger("gearoffload.http")

#: Requests served at once; more wait for a slot (a scraper cannot take the server over).
MAX_REQUESTS = 32

StartResponse = Callable[[str, list[tuple[str, str]]], object]
_COMMON = [("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff")]


class ObservabilityApp:
    """WSGI app: ``/metrics``, ``/healthz``, ``/status.json`` and the status page ``/``."""

    def __init__(self, state: JobServerState) -> None:
        self.state = state
        self.registry = metrics_registry(state)
        self.started = state.scheduler.now()
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
        body = json.dumps(snapshot(self.state, self.started), separators=(",", ":"))
        return "200 OK", "application/json", body.encode(), []

    def _metrics(self) -> tuple[str, str, bytes, list]:
        return "200 OK", CONTENT_TYPE_LATEST, exposition(self.registry), []

    def _healthz(self) -> tuple[str, str, bytes, list]:
        if self.state.draining:
            return "503 Service Unavailable", "text/plain", b"draining\n", []
        return "200 OK", "text/plain", b"ok\n", []


class HttpEndpoint:
    """``ObservabilityApp`` on gevent's ``WSGIServer``, started and stopped with the job
    server. Access lines are not logged (a scraper every few seconds would drown the
    log); errors go to the ``gearoffload.http`` logger."""

    def __init__(self, state: JobServerState, address: tuple[str, int]) -> None:
        self.app = ObservabilityApp(state)
        # SERVER_NAME given: else pywsgi's start() resolves the address with getfqdn(),
        # which yields to the hub (a DNS lookup, possibly slow) while the Gearman port is
        # already serving and before __main__ has installed its signal handlers.
        self.server = WSGIServer(address, self.app, log=None, error_log=_ErrorLog(),
                                 spawn=Pool(MAX_REQUESTS),
                                 environ={"SERVER_NAME": address[0] or "localhost"})

    @property
    def address(self) -> tuple[str, int]:
        return self.server.address[:2]

    def start(self) -> None:
        """Bind and serve in the background (raises ``OSError`` if the port is busy)."""
        self.server.start()

    def stop(self, timeout: float = 1.0) -> None:
        self.server.stop(timeout)


class _ErrorLog:
    """pywsgi writes tracebacks and bad-request notes to a file-like object."""

    def write(self, text: str) -> None:
        text = text.rstrip()
        if text:
            log.warning("%s", text)

    def flush(self) -> None:
        pass
