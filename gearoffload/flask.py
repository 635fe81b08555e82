"""``gearoffload.flask``: run Flask view bodies on Gearman workers.

Example (``myapp.py``)::

    from flask import Flask, abort
    from gearoffload.flask import GearOffload, progress

    app = Flask(__name__)
    app.config["GEAROFFLOAD_SERVERS"] = "127.0.0.1:4730"
    ext = GearOffload(app)

    @app.get("/report/<month>")
    @ext.offload(unique=True)               # a stampede of identical requests runs it once
    def report(month):
        if month == "1999-01":
            abort(404)
        return {"month": month, "rows": expensive(month)}

    @app.post("/import")
    @ext.offload(background=True)           # 202 + Location: /_offload/jobs/<id>
    def bulk_import():
        rows = request.get_json()
        for i, row in enumerate(rows, 1):
            load(row)
            progress(i, len(rows))
        return {"imported": len(rows)}

Workers: ``gearoffload-worker myapp:app --servers 127.0.0.1:4730`` (or ``flask gearoffload
worker``). The decorator goes *below* ``@app.route``.

How a request travels: the web side encodes the WSGI environ (method, path, query,
headers — so cookies —, remote address) and the raw body (form, JSON, uploaded files; up to
``GEAROFFLOAD_MAX_BODY`` bytes, else 413) into one job. The worker rebuilds the environ,
pushes an app and a request context, calls the view body with the URL's arguments, turns
what it returns into a response with ``app.make_response`` (str, bytes, dict, list,
tuples with status/headers, ``Response``, ``redirect``) and sends status, headers and body
back; ``abort(404)`` and other HTTP exceptions are raised again on the web side, so the
app's error handlers render them. ``before_request``/``after_request`` hooks run on the web
side only; changes to ``session`` made on the worker are sent back as ``Set-Cookie``.

Errors: no job server → ``503`` (or the view runs here with ``GEAROFFLOAD_FALLBACK =
"local"``); no answer within the timeout → ``504``; the job failed or was lost → ``502``;
the view raised on the worker → the ``JobException`` is raised on the web side, so the app's
normal 500 handling applies. Each is logged with the job handle.

Configuration (validated by ``init_app``, with messages that say what to do):
``GEAROFFLOAD_SERVERS`` (``"host:port,..."``, default ``127.0.0.1:4730``),
``GEAROFFLOAD_TIMEOUT`` (seconds, default 60), ``GEAROFFLOAD_FALLBACK`` (``"raise"`` or
``"local"``), ``GEAROFFLOAD_SECRET_KEY`` (requests to workers are HMAC-signed and checked;
enables signed pickle for ``@offload`` functions),
``GEAROFFLOAD_FORMAT``, ``GEAROFFLOAD_MAX_BODY`` (bytes, default 4 MiB),
``GEAROFFLOAD_RESULT_TTL`` (seconds a background result is kept, default 600),
``GEAROFFLOAD_URL_PREFIX`` (of the status blueprint, default ``/_offload``),
``GEAROFFLOAD_TLS_CA``, ``GEAROFFLOAD_TLS_CERT``, ``GEAROFFLOAD_TLS_KEY`` (PEM files: TLS,
or mutual TLS, to the job servers; see docs/tls.md).

Background results live in the memory of the web process that accepted the request (a
watcher greenlet follows the job and keeps its response for the TTL). With several web
processes, the status URL must reach the same process (sticky sessions), or pass a shared
``result_store`` — see ``ResultStore``.
"""

from __future__ import annotations

import functools
import logging
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import gevent
from flask import Blueprint, Flask, current_app, jsonify, request, session, url_for
from flask.wrappers import Response
from gevent import monkey
from werkzeug.datastructures import MultiDict
from werkzeug.exceptions import (
    BadGateway,
    GatewayTimeout,
    HTTPException,
    NotFound,
    RequestEntityTooLarge,
    ServiceUnavailable,
    default_exceptions,
)
from werkzeug.test import stream_encode_multipart

from .codec import sign_payload, stable_hash, verify_payload
from .errors import JobException, JobFailed, JobTimeout, NoServersAvailable
from .offloading import OffloadConfig, check_call_options, progress, run_as_task
from .offloading import configure as configure_default
from .registry import TaskRegistry
from .wsgi import CODEC, BodyTooLarge, build_environ, encode_environ

__all__ = ["GearOffload", "MemoryResultStore", "OffloadedView", "ResultStore",
           "FlaskOffloadConfig", "offload", "progress"]

log = logging.getLogger("gearoffload.flask")

_MB = 1024 * 1024


@dataclass(frozen=True)
class FlaskOffloadConfig:
    """The extension's settings, parsed once from ``app.config`` by ``init_app``.

    Example::

        config = FlaskOffloadConfig.from_mapping({"GEAROFFLOAD_TIMEOUT": 10})
        assert config.offload.timeout == 10
    """

    offload: OffloadConfig
    max_body: int = 4 * _MB
    result_ttl: float = 600.0
    url_prefix: str = "/_offload"

    def __post_init__(self) -> None:
        if self.max_body < 0:
            raise ValueError("GEAROFFLOAD_MAX_BODY must be a number of bytes >= 0")
        if not self.result_ttl > 0:
            raise ValueError("GEAROFFLOAD_RESULT_TTL must be a positive number of seconds")
        if not self.url_prefix.startswith("/"):
            raise ValueError(f"GEAROFFLOAD_URL_PREFIX must start with '/', not "
                             f"{self.url_prefix!r}")

    @classmethod
    def from_mapping(cls, config: Mapping[str, Any]) -> FlaskOffloadConfig:
        servers = config.get("GEAROFFLOAD_SERVERS")
        mapping = dict(config)
        if servers is not None and not isinstance(servers, str):
            mapping["GEAROFFLOAD_SERVERS"] = ",".join(servers)
        kwargs: dict[str, Any] = {}
        for key, name, kind in (("GEAROFFLOAD_MAX_BODY", "max_body", int),
                                ("GEAROFFLOAD_RESULT_TTL", "result_ttl", float)):
            value = config.get(key)
            if value is None:
                continue
            try:
                kwargs[name] = kind(value)
            except (TypeError, ValueError):
                raise ValueError(f"{key} must be a number, not {value!r}") from None
        if config.get("GEAROFFLOAD_URL_PREFIX"):
            kwargs["url_prefix"] = str(config["GEAROFFLOAD_URL_PREFIX"]).rstrip("/") or "/"
        return cls(offload=OffloadConfig.from_mapping(mapping), **kwargs)


# -- background results -------------------------------------------------------------------

class _Entry:
    """One background view job as the web side follows it."""

    __slots__ = ("state", "numerator", "denominator", "response", "error", "handle",
                 "created", "expires")

    def __init__(self, handle: str | None, ttl: float) -> None:
        self.state = "queued"
        self.numerator = 0
        self.denominator = 0
        self.response: dict[str, Any] | None = None
        self.error: str | None = None
        self.handle = handle
        self.created = time.time()
        self.expires = time.monotonic() + ttl


class ResultStore:
    """Where background jobs' states and results are kept, by token. Subclass it for a
    store shared by several web processes (the entries are small dicts of str/bytes)."""

    def put(self, token: str, entry: _Entry) -> None:
        raise NotImplementedError

    def get(self, token: str) -> _Entry | None:
        raise NotImplementedError


class MemoryResultStore(ResultStore):
    """The default store: a dict in this process, expired entries dropped as it goes.

    ``max_entries`` bounds memory: past it the oldest entries go first.
    """

    def __init__(self, max_entries: int = 10_000) -> None:
        self.entries: dict[str, _Entry] = {}
        self.max_entries = max_entries
        self._next_sweep = 0.0

    def put(self, token: str, entry: _Entry) -> None:
        if token in self.entries:  # a progress update: nothing else to do
            self.entries[token] = entry
            return
        if time.monotonic() >= self._next_sweep:  # at most one sweep a second
            self._expire()
            self._next_sweep = time.monotonic() + 1.0
        self.entries[token] = entry
        while len(self.entries) > self.max_entries:
            self.entries.pop(next(iter(self.entries)))

    def get(self, token: str) -> _Entry | None:
        entry = self.entries.get(token)
        if entry is not None and entry.expires < time.monotonic():
            del self.entries[token]
            return None
        return entry

    def _expire(self) -> None:
        now = time.monotonic()
        for token in [t for t, e in self.entries.items() if e.expires < now]:
            del self.entries[token]


# -- the view decorator -------------------------------------------------------------------

#: Views decorated with the module-level ``offload`` (bound to whichever app serves them).
_unbound_views: list[OffloadedView] = []


class OffloadedView:
    """A view whose body runs on a worker; made by ``ext.offload`` or ``offload``.

    Calling it (Flask does, with the URL's arguments) submits the request and returns the
    worker's response. ``name`` is its Gearman function name; ``view`` the original.
    """

    def __init__(self, view: Callable[..., Any], name: str | None = None,
                 unique: bool = False, background: bool = False,
                 timeout: float | None = None, fallback: str | None = None,
                 vary: Iterable[str] = (), priority: str = "normal") -> None:
        check_call_options(timeout, fallback)
        self.view = view
        self.name = name or f"{view.__module__}.{view.__qualname__}"
        self.unique = unique
        self.background = background
        self.timeout = timeout
        self.fallback = fallback
        self.vary = tuple(vary)
        self.priority = priority
        functools.update_wrapper(self, view)

    def __repr__(self) -> str:
        return f"<OffloadedView {self.name}>"

    # web side

    def unique_for(self, view_args: Mapping[str, Any]) -> str | None:
        """The coalescing key of the current request (``None`` unless ``unique=True``):
        method, path, query string, the view's arguments and the ``vary`` headers."""
        if not self.unique:
            return None
        return stable_hash(request.method, request.script_root + request.path,
                           request.query_string, sorted((k, repr(v))
                                                        for k, v in view_args.items()),
                           [request.headers.get(h, "") for h in self.vary])

    def __call__(self, **view_args: Any) -> Any:
        state = _state()
        settings = state.config
        try:
            body = _request_body(settings.max_body)  # first: it may fix CONTENT_TYPE/LENGTH
        except BodyTooLarge as exc:
            raise RequestEntityTooLarge(str(exc)) from None
        payload = CODEC.dumps({"environ": encode_environ(request.environ), "body": body,
                               "background": self.background})
        if settings.offload.secret_key:
            payload = sign_payload(settings.offload.secret_key, payload)
        fallback = self.fallback or settings.offload.fallback
        try:
            # A view that waits for its answer waits once (Client.call): not for
            # JOB_CREATED first. Background views need the handle for their status URL.
            job = state.client.submit(self.name, payload, unique=self.unique_for(view_args),
                                      priority=self.priority, wait=self.background)
        except NoServersAvailable as exc:
            return self._unreachable(exc, fallback, view_args)
        if self.background:
            return state.follow(self, job)
        timeout = self.timeout if self.timeout is not None else settings.offload.timeout
        try:
            raw = job.result(timeout=timeout)
        except JobTimeout:
            log.error("%s %s: job %s on %s (%s): no answer within %ss", request.method,
                      request.path, job.handle, job.server, self.name, timeout)
            raise GatewayTimeout("The worker did not answer in time.") from None
        except JobException as exc:
            log.error("%s %s: job %s on %s (%s): the view raised on the worker: %s",
                      request.method, request.path, job.handle, job.server, self.name,
                      exc.text)
            raise
        except NoServersAvailable as exc:  # no server took the job, as at submit()
            return self._unreachable(exc, fallback, view_args)
        except JobFailed as exc:
            log.error("%s %s: job %s on %s (%s) failed: %s", request.method, request.path,
                      job.handle, job.server, self.name, exc)
            raise BadGateway("The worker failed.") from None
        return _to_response(CODEC.loads(raw))

    def _unreachable(self, exc: NoServersAvailable, fallback: str,
                     view_args: Mapping[str, Any]) -> Any:
        """No server accepted the job: run the view here (``fallback="local"``) or 503."""
        if fallback == "local" and not self.background:
            log.warning("%s %s: no job server reachable (%s); running %s here",
                        request.method, request.path, exc, self.name)
            return self.view(**view_args)
        log.error("%s %s: no job server reachable for %s: %s", request.method,
                  request.path, self.name, exc)
        raise ServiceUnavailable("No job server is reachable; try again shortly.",
                                 retry_after=5) from None

    # worker side

    def run_job(self, app: Flask, job: Any) -> bytes:
        """Rebuild the request, run the view body in app and request contexts, and
        return the encoded response."""
        secret_key = app.extensions["gearoffload"].config.offload.secret_key
        data = CODEC.loads(verify_payload(secret_key, job.data))
        environ = build_environ(data["environ"], data["body"])
        with app.request_context(environ):
            if data.get("background"):
                job.send_status(0, 0)  # "running" for the status page
            try:
                if request.routing_exception is not None:
                    raise request.routing_exception
                view = app.ensure_sync(self.view)  # async views too
                rv = run_as_task(job, lambda: view(**(request.view_args or {})))
                response = app.make_response(rv)
            except HTTPException as exc:
                if exc.response is None and exc.code is not None and exc.code >= 400:
                    return CODEC.dumps({"abort": exc.code, "description": exc.description})
                response = exc.get_response()
            if session.modified:  # e.g. a flash() or login on the worker: send it back
                app.session_interface.save_session(app, session, response)
            response.direct_passthrough = False
            return CODEC.dumps({"status": response.status_code,
                                "headers": [[k, v] for k, v in response.headers.items()
                                            if k.lower() != "content-length"],
                                "body": response.get_data()})


def _request_body(limit: int) -> bytes:
    """The raw body, or the body re-encoded when the web side already parsed the form."""
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge(f"request body of {request.content_length} bytes is over the "
                           f"{limit}-byte limit (GEAROFFLOAD_MAX_BODY)")
    if "form" not in request.__dict__:  # not parsed yet: the stream is intact
        body = request.get_data(cache=True)  # cached: a local fallback can still read it
        if len(body) > limit:
            raise BodyTooLarge(f"request body is over the {limit}-byte limit "
                               "(GEAROFFLOAD_MAX_BODY)")
        return body
    # A before_request hook read request.form: the stream is spent, so encode it again.
    if request.mimetype == "multipart/form-data":
        fields: MultiDict = MultiDict(request.form.items(multi=True))
        for key, storage in request.files.items(multi=True):
            storage.stream.seek(0)
            fields.add(key, storage)
        stream, length, boundary = stream_encode_multipart(fields, use_tempfile=False)
        request.environ["CONTENT_TYPE"] = f"multipart/form-data; boundary={boundary}"
        body = stream.read()
    elif request.mimetype == "application/x-www-form-urlencoded":
        body = urlencode(list(request.form.items(multi=True))).encode()
    else:
        body = request.get_data(cache=True)
    request.environ["CONTENT_LENGTH"] = str(len(body))
    if len(body) > limit:
        raise BodyTooLarge(f"request body is over the {limit}-byte limit (GEAROFFLOAD_MAX_BODY)")
    return body


def _to_response(answer: dict[str, Any]) -> Response:
    if "abort" in answer:
        code, description = answer["abort"], answer.get("description")
        exc_class = default_exceptions.get(code)
        if exc_class is not None:
            raise exc_class(description)
        return Response(description or "", status=code)
    return Response(answer["body"], status=answer["status"],
                    headers=[tuple(h) for h in answer["headers"]])


def offload(view: Callable[..., Any] | None = None, *, name: str | None = None,
            unique: bool = False, background: bool = False, timeout: float | None = None,
            fallback: str | None = None, vary: Iterable[str] = (),
            priority: str = "normal") -> Any:
    """Offload a view of whichever app serves it (blueprints, app factories): like
    ``GearOffload.offload`` without naming the extension. The app needs ``GearOffload``.

    Example::

        bp = Blueprint("reports", __name__)

        @bp.get("/report/<month>")
        @offload(unique=True)
        def report(month): ...
    """
    def decorate(fn: Callable[..., Any]) -> OffloadedView:
        offloaded = OffloadedView(fn, name=name, unique=unique, background=background,
                                  timeout=timeout, fallback=fallback, vary=vary,
                                  priority=priority)
        _unbound_views.append(offloaded)
        return offloaded

    return decorate(view) if view is not None else decorate


# -- the extension --------------------------------------------------------------------------

class _AppState:
    """What the extension keeps per app: config, clients, background results."""

    def __init__(self, ext: GearOffload, app: Flask, config: FlaskOffloadConfig,
                 store: ResultStore) -> None:
        self.ext = ext
        self.app = app
        self.config = config
        self.store = store
        self._local = monkey.get_original("threading", "local")()

    @property
    def client(self) -> Any:
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = self.config.offload.make_client()
        return client

    @property
    def registry(self) -> TaskRegistry:
        """The tasks a worker serves for this app: every offloaded view."""
        registry = TaskRegistry()
        for view in [*self.ext.views, *_unbound_views]:
            registry.register(view.name, functools.partial(view.run_job, self.app))
        return registry

    def follow(self, view: OffloadedView, job: Any) -> Response:
        """Keep a background job's progress and result; answer 202 with its status URL."""
        token = secrets.token_urlsafe(18)
        ttl = self.config.result_ttl
        entry = _Entry(job.handle, ttl)
        self.store.put(token, entry)
        timeout = view.timeout if view.timeout is not None else self.config.offload.timeout
        gevent.spawn(self._watch, token, entry, job, timeout, view.name)
        url = url_for("gearoffload.job_status", token=token)
        response = jsonify({"id": token, "state": "queued", "status_url": url})
        response.status_code = 202
        response.headers["Location"] = url
        response.headers["Retry-After"] = "1"
        log.info("background view %s: job %s, status %s", view.name, job.handle, url)
        return response

    def _watch(self, token: str, entry: _Entry, job: Any, timeout: float | None,
               name: str) -> None:
        try:
            for update in job.updates(timeout=timeout):
                if update.kind == "status":
                    entry.state = "running"
                    entry.numerator = update.numerator or 0
                    entry.denominator = update.denominator or 0
                    self.store.put(token, entry)
            answer = CODEC.loads(job.result(timeout=1))
            entry.response = answer
            entry.state = "done"
            if "abort" not in answer and entry.denominator:
                entry.numerator = entry.denominator
        except JobException as exc:
            log.error("background view %s: job %s raised on the worker: %s", name,
                      job.handle, exc.text)
            entry.state, entry.error = "failed", "the view raised on the worker"
        except JobTimeout:
            log.error("background view %s: job %s: no result within %ss", name, job.handle,
                      timeout)
            entry.state, entry.error = "failed", "timeout"
        except Exception as exc:
            log.error("background view %s: job %s failed: %s", name, job.handle, exc)
            entry.state, entry.error = "failed", "the worker failed"
        entry.expires = time.monotonic() + self.config.result_ttl
        self.store.put(token, entry)


def _state() -> _AppState:
    state = current_app.extensions.get("gearoffload")
    if state is None:
        raise RuntimeError("this app has offloaded views but no GearOffload: call "
                           "GearOffload(app) or ext.init_app(app)")
    return state


def _entry_or_404(token: str) -> _Entry:
    entry = _state().store.get(token)
    if entry is None:
        raise NotFound("Unknown or expired job id.")
    return entry


def _job_status(token: str) -> Response:
    entry = _entry_or_404(token)
    body: dict[str, Any] = {
        "id": token, "state": entry.state,
        "progress": {"numerator": entry.numerator, "denominator": entry.denominator},
    }
    if entry.error:
        body["error"] = entry.error
    answer = entry.response
    if answer is not None:
        body["result_url"] = url_for("gearoffload.job_result", token=token)
        if "abort" in answer:
            body["status_code"] = answer["abort"]
        else:
            body["status_code"] = answer["status"]
            headers = {k.lower(): v for k, v in answer["headers"]}
            kind = headers.get("content-type", "")
            if kind.startswith("application/json"):
                import json
                body["result"] = json.loads(answer["body"])
            elif kind.startswith("text/") and len(answer["body"]) <= 65536:
                body["result"] = answer["body"].decode("utf-8", "replace")
    response = jsonify(body)
    if entry.state in ("queued", "running"):
        response.headers["Retry-After"] = "1"
    response.headers["Cache-Control"] = "no-store"
    return response


def _job_result(token: str) -> Response:
    entry = _entry_or_404(token)
    if entry.response is None:
        response = jsonify({"id": token, "state": entry.state, "error": entry.error})
        response.status_code = 500 if entry.state == "failed" else 409
        return response
    return _to_response(entry.response)


class GearOffload:
    """The Flask extension: ``GearOffload(app)`` or ``ext = GearOffload();
    ext.init_app(app)``. See the module docstring.

    ``result_store``: where background results are kept (default: this process's memory).
    ``configure_default``: also make the app's servers and codec the default of
    ``gearoffload.offload`` functions (default ``True``).

    Example::

        ext = GearOffload(app)

        @app.get("/slow")
        @ext.offload
        def slow():
            return "done on a worker"
    """

    def __init__(self, app: Flask | None = None, result_store: ResultStore | None = None,
                 configure_default: bool = True) -> None:
        self.views: list[OffloadedView] = []
        self.result_store = result_store
        self.configure_default = configure_default
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Validate the app's ``GEAROFFLOAD_*`` config, register the status blueprint and
        the ``flask gearoffload worker`` command."""
        try:
            config = FlaskOffloadConfig.from_mapping(app.config)
        except ValueError as exc:
            raise ValueError(f"gearoffload: bad Flask config: {exc}") from None
        store = self.result_store if self.result_store is not None else MemoryResultStore()
        app.extensions["gearoffload"] = _AppState(self, app, config, store)
        blueprint = Blueprint("gearoffload", __name__, url_prefix=config.url_prefix)
        blueprint.add_url_rule("/jobs/<token>", "job_status", _job_status)
        blueprint.add_url_rule("/jobs/<token>/result", "job_result", _job_result)
        app.register_blueprint(blueprint)
        app.cli.add_command(_cli_group())
        if self.configure_default:
            offload_config = config.offload
            configure_default(servers=offload_config.servers, timeout=offload_config.timeout,
                              fallback=offload_config.fallback,
                              secret_key=offload_config.secret_key,
                              format=offload_config.format,
                              connect_timeout=offload_config.connect_timeout,
                              tls_ca=offload_config.tls_ca, tls_cert=offload_config.tls_cert,
                              tls_key=offload_config.tls_key)

    def offload(self, view: Callable[..., Any] | None = None, *, name: str | None = None,
                unique: bool = False, background: bool = False, timeout: float | None = None,
                fallback: str | None = None, vary: Iterable[str] = (),
                priority: str = "normal") -> Any:
        """Decorator for a view (below ``@app.route``): its body runs on a worker.

        ``unique=True`` coalesces identical requests (method, path, query, view
        arguments, and the ``vary`` headers) into one execution — only for views whose
        response does not depend on who asks; ``background=True`` answers 202 with a
        status URL; ``timeout`` (seconds) overrides ``GEAROFFLOAD_TIMEOUT``; ``fallback``
        overrides ``GEAROFFLOAD_FALLBACK``; ``name`` the Gearman function name
        (default ``module.qualname``).

        Example::

            @app.get("/page/<int:n>")
            @ext.offload(unique=True, timeout=10)
            def page(n): ...
        """
        def decorate(fn: Callable[..., Any]) -> OffloadedView:
            offloaded = OffloadedView(fn, name=name, unique=unique, background=background,
                                      timeout=timeout, fallback=fallback, vary=vary,
                                      priority=priority)
            self.views.append(offloaded)
            return offloaded

        return decorate(view) if view is not None else decorate


def _cli_group() -> Any:
    import click
    from flask.cli import AppGroup

    group = AppGroup("gearoffload", help="gearoffload: run workers for this app's views.")

    @group.command("worker", context_settings={"ignore_unknown_options": True})
    @click.argument("pool_args", nargs=-1, type=click.UNPROCESSED)
    def worker(pool_args: tuple[str, ...]) -> None:
        """Run gearoffload-worker for this app (extra options go to it, e.g.
        --processes 4)."""
        import os
        import sys

        app = current_app._get_current_object()
        module = sys.modules.get(app.import_name)
        names = [n for n, v in vars(module).items() if v is app] if module else []
        if not names:
            raise click.ClickException(
                f"cannot find the app object in module {app.import_name!r} (an app "
                "factory?): run gearoffload-worker module:app yourself")
        servers = ",".join(_state().config.offload.servers)
        args = [sys.executable, "-m", "gearoffload.pool", f"{app.import_name}:{names[0]}"]
        if not any(a.startswith("--servers") for a in pool_args):
            args += ["--servers", servers]
        offload_config = _state().config.offload
        for name in ("ca", "cert", "key"):  # the app's GEAROFFLOAD_TLS_* unless given
            value = getattr(offload_config, f"tls_{name}")
            if value and not any(a.startswith(f"--tls-{name}") for a in pool_args):
                args += [f"--tls-{name}", value]
        os.execv(sys.executable, [*args, *pool_args])

    return group

