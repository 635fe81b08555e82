"""``OffloadMiddleware``: run chosen requests of any WSGI app on Gearman workers.

Web side::

    import re
    from gearoffload.wsgi import OffloadMiddleware

    app.wsgi_app = OffloadMiddleware(
        app.wsgi_app, servers=["127.0.0.1:4730"],
        routes=["/reports/", re.compile(r"^/export/\\d+$")],
        methods=("GET", "HEAD", "POST"))

Worker side: ``gearoffload-worker --wsgi myapp:app`` imports the same app and runs the
requests it is sent. A matching request is encoded — the environ's CGI keys and
``HTTP_*`` headers, and the body up to ``max_body`` bytes — as one job; the worker rebuilds
the environ, calls the app, and sends back status, headers and body, which this side
returns unchanged. Everything else passes through untouched. Inside the worker the environ
has ``"gearoffload.worker": True``, and the middleware passes such requests straight
through, so wrapping the very app the worker runs is safe.

For ``coalesce`` methods (default GET and HEAD) the job's unique key is a hash of the
method, ``SCRIPT_NAME + PATH_INFO``, the query string and the ``vary`` headers (default
``Host``): a stampede of identical cache misses runs the app once and every request gets
that response. Unsafe methods are never coalesced unless listed in ``coalesce``.

Errors: no job server → ``503`` (or the app runs here with ``fallback="local"``), no answer
within ``timeout`` → ``504``, the job failed or was lost → ``502``, the app raised on the
worker → ``500``; each logged with the job handle. A body over ``max_body`` → ``413``.
"""

from __future__ import annotations

import io
import logging
import re
import sys
from collections.abc import Callable, Iterable
from typing import Any

from gevent import monkey

from .codec import Codec, sign_payload, stable_hash, verify_payload
from .errors import JobException, JobFailed, JobTimeout, NoServersAvailable

__all__ = ["BodyTooLarge", "OffloadMiddleware", "build_environ", "encode_environ",
           "read_body", "wsgi_runner"]

log = logging.getLogger("gearoffload.wsgi")

#: The environ keys (besides HTTP_*) that travel with a request.
CGI_KEYS = frozenset((
    "REQUEST_METHOD", "SCRIPT_NAME", "PATH_INFO", "QUERY_STRING", "CONTENT_TYPE",
    "CONTENT_LENGTH", "SERVER_NAME", "SERVER_PORT", "SERVER_PROTOCOL", "REMOTE_ADDR",
    "REMOTE_PORT", "REMOTE_USER", "AUTH_TYPE", "REQUEST_URI", "RAW_URI", "wsgi.url_scheme",
))
_HOP_BY_HOP = frozenset(("connection", "keep-alive", "transfer-encoding", "te", "trailer",
                         "upgrade", "proxy-authenticate", "proxy-authorization"))
#: Requests and responses are str and bytes only: JSON carries them exactly, and the
#: worker never unpickles anything the job server hands it.
CODEC = Codec("json")
DEFAULT_MAX_BODY = 4 * 1024 * 1024

WSGIApp = Callable[[dict, Callable], Iterable[bytes]]


class BodyTooLarge(ValueError):
    """The request body is larger than the configured limit."""


def encode_environ(environ: dict[str, Any]) -> dict[str, str]:
    """The part of a WSGI environ that travels: CGI keys and ``HTTP_*`` headers."""
    return {key: value for key, value in environ.items()
            if isinstance(value, str) and (key in CGI_KEYS or key.startswith("HTTP_"))}


def read_body(environ: dict[str, Any], limit: int = DEFAULT_MAX_BODY) -> bytes:
    """Read the request body (``BodyTooLarge`` past ``limit`` bytes)."""
    text = environ.get("CONTENT_LENGTH") or ""
    stream = environ.get("wsgi.input")
    if stream is None:
        return b""
    if text.strip().isdigit():
        length = int(text)
        if length > limit:
            raise BodyTooLarge(f"request body of {length} bytes is over the {limit}-byte limit")
        return stream.read(length) if length else b""
    if environ.get("wsgi.input_terminated") or "chunked" in \
            environ.get("HTTP_TRANSFER_ENCODING", "").lower():
        data = stream.read(limit + 1)
        if len(data) > limit:
            raise BodyTooLarge(f"request body is over the {limit}-byte limit")
        return data
    return b""


def build_environ(cgi: dict[str, str], body: bytes) -> dict[str, Any]:
    """A WSGI environ on the worker from ``encode_environ`` output and the body."""
    environ: dict[str, Any] = dict(cgi)
    environ.pop("HTTP_TRANSFER_ENCODING", None)  # the body is complete now
    environ.setdefault("REQUEST_METHOD", "GET")
    environ.setdefault("SCRIPT_NAME", "")
    environ.setdefault("PATH_INFO", "/")
    environ.setdefault("QUERY_STRING", "")
    environ.setdefault("SERVER_NAME", "localhost")
    environ.setdefault("SERVER_PORT", "80")
    environ.setdefault("SERVER_PROTOCOL", "HTTP/1.1")
    if body or "CONTENT_LENGTH" in cgi:
        environ["CONTENT_LENGTH"] = str(len(body))
    environ.update({
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": cgi.get("wsgi.url_scheme", "http"),
        "wsgi.input": io.BytesIO(body),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": False,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
        "gearoffload.worker": True,
    })
    return environ


def response_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Headers without the hop-by-hop ones (the web side's server sets its own)."""
    return [(str(k), str(v)) for k, v in headers if k.lower() not in _HOP_BY_HOP]


def wsgi_runner(app: WSGIApp, secret_key: str | bytes | None = None) -> Callable[[Any], bytes]:
    """The worker-side task for ``OffloadMiddleware``: rebuild the environ, call ``app``,
    return status, headers and body. ``gearoffload-worker --wsgi module:app`` registers it
    (with the ``GEAROFFLOAD_SECRET_KEY`` of ``gearoffload.configure``/the environment).
    With ``secret_key``, only requests signed with it are run.

    Example::

        worker = Worker("127.0.0.1:4730")
        worker.register("gearoffload.wsgi", wsgi_runner(app))
    """
    def run(job: Any) -> bytes:
        data = CODEC.loads(verify_payload(secret_key, job.data))
        environ = build_environ(data["environ"], data["body"])
        started: list[Any] = []
        chunks: list[bytes] = []

        def start_response(status: str, headers: list, exc_info: Any = None) -> Callable:
            if exc_info is not None and started:
                raise exc_info[1].with_traceback(exc_info[2])
            started[:] = [status, headers]
            return chunks.append

        result = app(environ, start_response)
        try:
            for chunk in result:
                if chunk:
                    chunks.append(bytes(chunk))
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        if not started:
            raise RuntimeError("the WSGI app returned without calling start_response")
        return CODEC.dumps({"status": started[0], "headers": response_headers(started[1]),
                            "body": b"".join(chunks)})

    return run


def _plain(start_response: Callable, status: str, text: str,
           extra: tuple[tuple[str, str], ...] = ()) -> list[bytes]:
    body = (text + "\n").encode()
    start_response(status, [("Content-Type", "text/plain; charset=utf-8"),
                            ("Content-Length", str(len(body))), *extra])
    return [body]


class OffloadMiddleware:
    """WSGI middleware sending matching requests to Gearman workers (see the module doc).

    ``routes``: path prefixes (str) or compiled regexes, matched against
    ``SCRIPT_NAME + PATH_INFO``; ``methods``: the methods offloaded; ``coalesce``: the
    methods whose identical requests share one execution; ``vary``: the request headers
    that make two requests different for coalescing; ``function``: the Gearman function
    (``--wsgi-function`` on the worker); ``timeout``: seconds to wait for the worker;
    ``fallback="local"`` runs the app here when no server is reachable; ``client``: a
    ``Client`` to use instead of one made from ``servers``; ``secret_key``: sign every
    request (HMAC-SHA256) — give the workers the same ``GEAROFFLOAD_SECRET_KEY`` — so
    that they run only requests from a web process that has the key; ``tls``: as for
    ``Client`` (e.g. ``{"ca": "ca.pem", "cert": "web.pem", "key": "web.key"}``).

    Example::

        app.wsgi_app = OffloadMiddleware(app.wsgi_app, servers="127.0.0.1:4730",
                                         routes=["/reports/"], vary=("Host", "Cookie"))
    """

    def __init__(
        self,
        app: WSGIApp,
        servers: str | Iterable[str] = "127.0.0.1:4730",
        routes: Iterable[str | re.Pattern[str]] = ("/",),
        methods: Iterable[str] = ("GET", "HEAD", "POST"),
        coalesce: Iterable[str] = ("GET", "HEAD"),
        vary: Iterable[str] = ("Host",),
        function: str = "gearoffload.wsgi",
        timeout: float | None = 60.0,
        connect_timeout: float = 2.0,
        max_body: int = DEFAULT_MAX_BODY,
        fallback: str = "raise",
        client: Any = None,
        secret_key: str | bytes | None = None,
        tls: Any = None,
    ) -> None:
        from .tls import client_context

        self.app = app
        #: ``Client(tls=...)`` for the clients made here (see ``gearoffload.tls``).
        self.tls = client_context(tls)
        self.servers = [servers] if isinstance(servers, str) else list(servers)
        self.routes = tuple(routes)
        for route in self.routes:
            if not isinstance(route, (str, re.Pattern)):
                raise TypeError(f"routes are path prefixes (str) or re.compile() patterns, "
                                f"not {route!r}")
        self.methods = frozenset(m.upper() for m in methods)
        self.coalesce = frozenset(m.upper() for m in coalesce)
        self.vary = tuple("HTTP_" + h.upper().replace("-", "_") for h in vary)
        self.function = function
        if timeout is not None and not timeout > 0:
            raise ValueError("timeout must be a positive number of seconds or None")
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        if max_body < 0:
            raise ValueError("max_body must be >= 0 bytes")
        self.max_body = max_body
        if fallback not in ("raise", "local"):
            raise ValueError(f"fallback must be 'raise' (503) or 'local', not {fallback!r}")
        self.fallback = fallback
        self._client = client
        self.secret_key = secret_key
        self._local = monkey.get_original("threading", "local")()

    @property
    def client(self) -> Any:
        """The ``Client`` jobs go through (one per OS thread unless one was given)."""
        if self._client is not None:
            return self._client
        client = getattr(self._local, "client", None)
        if client is None:
            from .client import Client
            client = self._local.client = Client(self.servers, timeout=self.timeout,
                                                 connect_timeout=self.connect_timeout,
                                                 tls=self.tls)
        return client

    def matches(self, environ: dict[str, Any]) -> bool:
        """Whether this request is offloaded."""
        if environ.get("gearoffload.worker"):
            return False  # already on a worker: run it
        if environ.get("REQUEST_METHOD", "GET").upper() not in self.methods:
            return False
        path = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
        for route in self.routes:
            if isinstance(route, str):
                if path.startswith(route):
                    return True
            elif route.search(path):
                return True
        return False

    def unique_for(self, environ: dict[str, Any]) -> str | None:
        """The coalescing key for this request, or ``None`` (its method does not coalesce)."""
        method = environ.get("REQUEST_METHOD", "GET").upper()
        if method not in self.coalesce:
            return None
        path = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
        return stable_hash(method, path, environ.get("QUERY_STRING", ""),
                           [environ.get(key, "") for key in self.vary])

    def __call__(self, environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        if not self.matches(environ):
            return self.app(environ, start_response)
        try:
            body = read_body(environ, self.max_body)
        except BodyTooLarge as exc:
            return _plain(start_response, "413 Request Entity Too Large", str(exc))
        payload = CODEC.dumps({"environ": encode_environ(environ), "body": body})
        if self.secret_key:
            payload = sign_payload(self.secret_key, payload)
        path = environ.get("PATH_INFO", "")
        try:
            # One wait, for the answer (Client.call), not one for JOB_CREATED first.
            job = self.client.submit(self.function, payload, unique=self.unique_for(environ),
                                     wait=False)
        except NoServersAvailable as exc:
            return self._unreachable(exc, environ, start_response, body)
        try:
            answer = CODEC.loads(job.result(timeout=self.timeout))
        except JobTimeout:
            log.error("%s %s: job %s on %s: no answer within %ss",
                      environ.get("REQUEST_METHOD"), path, job.handle, job.server, self.timeout)
            return _plain(start_response, "504 Gateway Timeout", "The worker did not answer "
                          "in time.")
        except JobException as exc:
            log.error("%s %s: job %s on %s: the app raised on the worker: %s",
                      environ.get("REQUEST_METHOD"), path, job.handle, job.server, exc.text)
            return _plain(start_response, "500 Internal Server Error",
                          "Internal Server Error")
        except NoServersAvailable as exc:  # no server took the job, as at submit()
            return self._unreachable(exc, environ, start_response, body)
        except JobFailed as exc:
            log.error("%s %s: job %s on %s failed: %s", environ.get("REQUEST_METHOD"), path,
                      job.handle, job.server, exc)
            return _plain(start_response, "502 Bad Gateway", "The worker failed.")
        start_response(answer["status"], [tuple(h) for h in answer["headers"]])
        return [answer["body"]]

    def _unreachable(self, exc: NoServersAvailable, environ: dict,
                     start_response: Callable, body: bytes) -> Iterable[bytes]:
        """No server accepted the job: serve it here (``fallback="local"``) or 503."""
        path = environ.get("PATH_INFO", "")
        if self.fallback == "local":
            log.warning("%s %s: no job server (%s); running locally",
                        environ.get("REQUEST_METHOD"), path, exc)
            environ["wsgi.input"] = io.BytesIO(body)
            environ["CONTENT_LENGTH"] = str(len(body))
            return self.app(environ, start_response)
        log.error("%s %s: no job server reachable: %s", environ.get("REQUEST_METHOD"),
                  path, exc)
        return _plain(start_response, "503 Service Unavailable",
                      "No job server is reachable.", (("Retry-After", "5"),))
