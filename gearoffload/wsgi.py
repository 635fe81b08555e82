"""``OffloadMiddleware``: run chosen requests of any WSGI app on Gearman workers.

Web side::

    import re
    from gearoffload.wsgi import OffloadMiddleware

    app.wsgi_app = OffloadMiddleware(
        app.wsgi_app, servers=["127.0.0.1:4730"], secret_key="...",
        routes=["/reports/", re.compile(r"^/export/\\d+$")],
        methods=("GET", "HEAD", "POST"))

Worker side: ``gearoffload-worker --wsgi myapp:app`` imports the same app and runs the
requests it is sent (give it the same ``GEAROFFLOAD_SECRET_KEY``). A matching request is
encoded — the environ's CGI keys and ``HTTP_*`` headers, and the body up to ``max_body``
bytes — as one signed job that expires when the request's ``timeout`` does; the worker
rebuilds the environ, calls the app, and sends back status, headers and body, which this
side returns unchanged. Everything else passes through untouched. Inside the worker the
environ has ``"gearoffload.worker": True``, and the middleware passes such requests
straight through, so wrapping the very app the worker runs is safe.

The Gearman function is ``gearoffload.wsgi:<app>`` (``default_wsgi_function``), distinct per
app, so that two apps on one job server never answer for each other.

Coalescing (``coalesce`` methods, default GET and HEAD): identical requests share one run.
"Identical" covers the method, path, query string, body, the ``vary`` headers (default
``Host``) and — unless ``public=True`` — the credentials (``Cookie``, ``Authorization``):
one user never gets another user's page (``gearoffload.core.coalescing_key``).

Errors: no job server → ``503`` (or the app runs here with ``fallback="local"``), no worker
serves the function → ``503`` at once, no answer within ``timeout`` → ``504``, the job failed
→ ``502``, the app raised on the worker → ``500``; each logged with the job handle and, for
``500``, the worker's traceback. A body over ``max_body`` → ``413``.
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Callable, Iterable
from typing import Any

from .core import (
    CODEC,
    DEFAULT_MAX_BODY,
    BodyTooLarge,
    OffloadConfig,
    Offloader,
    SingleFlight,
    build_environ,
    coalescing_key,
    encode_environ,
    http_error,
    read_body,
    request_from_payload,
    request_payload,
    response_headers,
    response_payload,
    run_task,
)
from .errors import GearmanError, JobException, NoServersAvailable

__all__ = ["BodyTooLarge", "OffloadMiddleware", "build_environ", "default_wsgi_function",
           "encode_environ", "read_body", "response_headers", "wsgi_runner"]

log = logging.getLogger("gearoffload.wsgi")

WSGIApp = Callable[[dict, Callable], Iterable[bytes]]


def default_wsgi_function(app: Any) -> str:
    """The Gearman function ``OffloadMiddleware`` uses for ``app`` unless told otherwise:
    distinct per app. A bound ``wsgi_app`` method names its Flask app.

    Example::

        default_wsgi_function(flask_app)     # 'gearoffload.wsgi:myapp'
    """
    owner = getattr(app, "__self__", app)
    name = getattr(owner, "import_name", None)
    if not isinstance(name, str):
        module = getattr(owner, "__module__", None) or type(owner).__module__
        qualname = getattr(owner, "__qualname__", None) or type(owner).__qualname__
        name = f"{module}.{qualname}"
    return f"gearoffload.wsgi:{name}"


def wsgi_runner(app: WSGIApp, offloader: Offloader) -> Callable[[Any], bytes]:
    """The worker-side task for ``OffloadMiddleware``: open the job's seal, rebuild the
    environ, call ``app``, return status, headers and body. ``gearoffload-worker --wsgi
    module:app`` registers it.

    Example::

        worker = Worker("127.0.0.1:4730")
        worker.register(default_wsgi_function(app), wsgi_runner(app, Offloader(config)))
    """
    def body(payload: bytes) -> bytes:
        environ, _ = request_from_payload(payload)
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
        return response_payload(started[0], started[1], b"".join(chunks))

    def run(job: Any) -> bytes:
        return run_task(offloader, job, body, background=False)

    run.gearoffload_sealed = True  # type: ignore[attr-defined] - the pool's key check
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
    methods whose identical requests share one execution; ``vary``: request headers that
    make two requests different; ``public``: the responses do not depend on who asks, so
    requests with different credentials may share one; ``ignore_query``: query parameters
    (``fnmatch`` patterns such as ``"utm_*"``) that do not change the response;
    ``function``: the Gearman function (default ``default_wsgi_function(app)``);
    ``timeout``: seconds to wait for the worker; ``fallback="local"`` runs the app here
    when no server is reachable; ``secret_key``: signs every job (default
    ``$GEAROFFLOAD_SECRET_KEY``; required unless ``allow_unsigned=True``, for closed
    networks); ``config``: an ``OffloadConfig``
    instead of these keyword settings.

    Example::

        app.wsgi_app = OffloadMiddleware(app.wsgi_app, servers="127.0.0.1:4730",
                                         secret_key=os.environ["GEAROFFLOAD_SECRET_KEY"],
                                         routes=["/reports/"], ignore_query=["utm_*"])
    """

    def __init__(
        self,
        app: WSGIApp,
        servers: str | Iterable[str] = "127.0.0.1:4730",
        routes: Iterable[str | re.Pattern[str]] = ("/",),
        methods: Iterable[str] = ("GET", "HEAD", "POST"),
        coalesce: Iterable[str] = ("GET", "HEAD"),
        vary: Iterable[str] = ("Host",),
        public: bool = False,
        ignore_query: Iterable[str] = (),
        function: str | None = None,
        timeout: float | None = 60.0,
        connect_timeout: float = 2.0,
        max_body: int = DEFAULT_MAX_BODY,
        fallback: str = "raise",
        secret_key: str | None = None,
        allow_unsigned: bool = False,
        tls: dict | None = None,
        config: OffloadConfig | None = None,
    ) -> None:
        self.app = app
        if config is None:
            import os

            tls = tls or {}
            # As the workers do: the key may come from the environment.
            secret_key = secret_key or os.environ.get("GEAROFFLOAD_SECRET_KEY") or None
            config = OffloadConfig(
                servers=servers if isinstance(servers, str) else tuple(servers),
                timeout=timeout, connect_timeout=connect_timeout, max_body=max_body,
                fallback=fallback, secret_key=secret_key, allow_unsigned=allow_unsigned,
                tls_ca=tls.get("ca"), tls_cert=tls.get("cert"), tls_key=tls.get("key"))
        if not config.secret_key and not config.allow_unsigned:
            raise ValueError("OffloadMiddleware needs secret_key= (the workers' "
                             "GEAROFFLOAD_SECRET_KEY): without it anyone who can reach the "
                             "job server could make a worker run any request; "
                             "allow_unsigned=True only on a closed network")
        self.config = config
        self.offloader = Offloader(config)
        self.routes = tuple(routes)
        for route in self.routes:
            if not isinstance(route, (str, re.Pattern)):
                raise TypeError(f"routes are path prefixes (str) or re.compile() patterns, "
                                f"not {route!r}")
        self.methods = frozenset(m.upper() for m in methods)
        self.coalesce = frozenset(m.upper() for m in coalesce)
        self.vary = tuple(vary)
        self.public = public
        self.ignore_query = tuple(ignore_query)
        self.function = function or default_wsgi_function(app)
        self._flights = SingleFlight()

    @property
    def client(self) -> Any:
        """This thread's ``Client``."""
        return self.offloader.client

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

    def unique_for(self, environ: dict[str, Any], body: bytes = b"") -> str | None:
        """The coalescing key for this request, or ``None`` (its method does not coalesce)."""
        if environ.get("REQUEST_METHOD", "GET").upper() not in self.coalesce:
            return None
        return coalescing_key(environ, body, vary=self.vary, public=self.public,
                              ignore_query=self.ignore_query, extra=self.function)

    def __call__(self, environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        if not self.matches(environ):
            return self.app(environ, start_response)
        try:
            body = read_body(environ, self.config.max_body)
        except BodyTooLarge as exc:
            return _plain(start_response, "413 Request Entity Too Large", str(exc))
        unique = self.unique_for(environ, body)
        method, path = environ.get("REQUEST_METHOD"), environ.get("PATH_INFO", "")
        try:
            raw = self.offloader.call(self.function, request_payload(environ, body),
                                      unique=unique, timeout=self.config.timeout)
        except NoServersAvailable as exc:
            if self.config.fallback == "local":
                log.warning("%s %s: no job server (%s); running locally", method, path, exc)
                return self._run_here(environ, start_response, body, unique)
            return self._error(exc, environ, start_response)
        except GearmanError as exc:
            return self._error(exc, environ, start_response)
        answer = CODEC.loads(raw)
        start_response(answer["status"], [tuple(h) for h in answer["headers"]])
        return [answer["body"]]

    def _run_here(self, environ: dict, start_response: Callable, body: bytes,
                  unique: str | None) -> Iterable[bytes]:
        """``fallback="local"``: run the app here, once per coalescing key at a time."""
        def run() -> tuple[list, bytes]:
            started: list[Any] = []
            local = dict(environ, **{"wsgi.input": io.BytesIO(body),
                                     "CONTENT_LENGTH": str(len(body))})

            def collect(status: str, headers: list, exc_info: Any = None) -> Callable:
                started[:] = [status, headers]
                return lambda chunk: None

            result = self.app(local, collect)
            try:
                data = b"".join(result)
            finally:
                getattr(result, "close", lambda: None)()
            return started, data

        started, data = run() if unique is None else self._flights.run(unique, run)
        start_response(started[0], started[1])
        return [data]

    def _error(self, exc: GearmanError, environ: dict,
               start_response: Callable) -> Iterable[bytes]:
        answer = http_error(exc)
        method, path = environ.get("REQUEST_METHOD"), environ.get("PATH_INFO", "")
        if isinstance(exc, JobException):
            log.error("%s %s (%s): the app raised on the worker:\n%s", method, path,
                      self.function, exc.text)
        else:
            log.error("%s %s (%s): %s: %s", method, path, self.function,
                      type(exc).__name__, exc)
        extra = (("Retry-After", str(answer.retry_after)),) if answer.retry_after else ()
        return _plain(start_response, f"{answer.status} {answer.title}", answer.message, extra)
