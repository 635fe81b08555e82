"""The HTTP endpoint beside the Gearman port (``--http-port``): read-only but for the
status page's two dead-letter buttons.

``ObservabilityApp`` is a small WSGI app over the job state:

- ``/metrics``: Prometheus text format (``metrics.py``);
- ``/healthz``: ``200 ok`` while serving, ``503 draining`` once SIGTERM started the
  shutdown (for load balancers and Kubernetes probes);
- ``/``: the live status page (``status_page.py``), fed by ``/status.json``
  (``status.py``) and ``/history.json`` (the job history, the dead letters, and with
  ``?q=KEY`` a search by handle or unique key).

GET and HEAD, except the status page's two buttons: ``POST /dead/retry`` and ``POST
/dead/delete`` (a JSON body ``{"handle": ...}``) run or forget a dead letter. They are
refused (403) unless the viewer's address is loopback or admitted by ``--admin-allow``
(the rule of the admin port's mutating commands, ``admin.admitted``) and the request
comes from the page itself: its ``Origin`` (or, without one, its ``Referer``) is this
endpoint's own, and it carries the ``X-Gearoffload-Action`` header, which a cross-site
form cannot send and a cross-site script cannot send without a CORS preflight that is
never granted. Other methods get 405 (with ``Allow``). Nothing else here changes the
server. It reveals function names, handles,
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
from urllib.parse import parse_qs, urlsplit

import gevent
from gevent.lock import BoundedSemaphore
from gevent.pywsgi import WSGIHandler, WSGIServer

from .admin import admitted
from .metrics import CONTENT_TYPE_LATEST, MAX_FUNCTIONS, render
from .state import JobServerState
from .status import history_snapshot, snapshot
from .status_page import CONTENT_SECURITY_POLICY, PAGE

log = logging.getLogger("gearoffload.http")

#: Scrapes (/metrics, /status.json) built at once; more wait for a slot.
MAX_SCRAPES = 4
#: The largest body a status page button sends.
MAX_ACTION_BODY = 4096
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
        #: The status page's buttons (POST): handle -> done.
        self._actions: dict[str, Callable[[bytes], bool]] = {
            "/dead/retry": state.requeue_dead,
            "/dead/delete": state.delete_dead,
        }

    def __call__(self, environ: dict, start_response: StartResponse) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO") or "/"
        route = self._routes.get(path)
        if path in self._actions:
            if method == "POST":
                status, ctype, body, extra = self._act(environ, self._actions[path])
            else:
                status, ctype, body, extra = ("405 Method Not Allowed", "text/plain",
                                              b"a status page button: POST only\n",
                                              [("Allow", "POST")])
        elif route is None and path != "/history.json":
            status, ctype, body, extra = "404 Not Found", "text/plain", b"not found\n", []
        elif method not in ("GET", "HEAD"):
            status, ctype, body, extra = ("405 Method Not Allowed", "text/plain",
                                          b"read-only: GET or HEAD\n", [("Allow", "GET, HEAD")])
        elif route is None:
            status, ctype, body, extra = self._history(environ)
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

    def _history(self, environ: dict) -> tuple[str, str, bytes, list]:
        query = parse_qs(environ.get("QUERY_STRING", ""))
        key = query.get("q", [""])[0].strip().encode()[:256]
        with_data = admitted(environ.get("REMOTE_ADDR", ""), self.state.config.admin_allow)
        with self._scrapes:
            body = json.dumps(history_snapshot(self.state, key, with_data=with_data),
                              separators=(",", ":"))
        return "200 OK", "application/json", body.encode(), []

    def _act(self, environ: dict, action: Callable[[bytes], bool]
             ) -> tuple[str, str, bytes, list]:
        """A status page button: admitted viewer, same origin, then the action."""
        refused = self._refusal(environ)
        if refused:
            log.warning("status page %s from %s refused: %s", environ.get("PATH_INFO"),
                        environ.get("REMOTE_ADDR"), refused,
                        extra={"event": "http.refused", "peer": environ.get("REMOTE_ADDR")})
            return "403 Forbidden", "text/plain", b"refused: " + refused.encode() + b"\n", []
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = -1
        if not 0 < length <= MAX_ACTION_BODY:
            return "400 Bad Request", "text/plain", b"a JSON body {\"handle\": ...}\n", []
        try:
            handle = json.loads(environ["wsgi.input"].read(length))["handle"]
            if not isinstance(handle, str) or not handle:
                raise ValueError
        except (ValueError, KeyError, TypeError):
            return "400 Bad Request", "text/plain", b"a JSON body {\"handle\": ...}\n", []
        if not action(handle.encode()):
            return "404 Not Found", "text/plain", b"no such dead letter\n", []
        log.info("status page %s %s by %s", environ.get("PATH_INFO"), handle,
                 environ.get("REMOTE_ADDR"), extra={"event": "http.dead_letter",
                                                    "handle": handle})
        return "200 OK", "application/json", b'{"ok":true}', []

    def _refusal(self, environ: dict) -> str:
        """Why a button's POST is refused (the caller says "refused: "), or ``""``."""
        if not admitted(environ.get("REMOTE_ADDR", ""), self.state.config.admin_allow):
            return ("only loopback or --admin-allow addresses may retry or "
                    "delete dead letters")
        host = environ.get("HTTP_HOST", "")
        origin = environ.get("HTTP_ORIGIN")
        if origin is None:
            referer = environ.get("HTTP_REFERER")
            if referer is None:
                return "no Origin or Referer (a request from the status page has one)"
            parts = urlsplit(referer)
            origin = f"{parts.scheme}://{parts.netloc}"
        if not host or origin not in (f"http://{host}", f"https://{host}"):
            return f"cross-origin request (Origin {origin[:100]!r}, Host {host[:100]!r})"
        if environ.get("HTTP_X_GEAROFFLOAD_ACTION") != "1":
            return "the X-Gearoffload-Action header is missing"
        return ""

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
