"""``gearoffload.flask``: run Flask view bodies on Gearman workers.

Example (``myapp.py``)::

    from flask import Flask, abort, g, session
    from gearoffload.flask import GearOffload, progress

    app = Flask(__name__)
    app.config["SECRET_KEY"] = "..."                # signs jobs and job ids
    app.config["GEAROFFLOAD_SERVERS"] = "127.0.0.1:4730"
    ext = GearOffload(app, job_owner=lambda request: session.get("user_id"))

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

Workers: ``gearoffload-worker myapp:app`` (or ``flask gearoffload worker``); both read the
app's ``GEAROFFLOAD_*`` config. The decorator goes *below* ``@app.route`` (above it, the
route would register the plain view: ``GearOffload`` refuses that at start-up).

How a request travels: the web side encodes the WSGI environ (method, path, query,
headers — so cookies —, remote address), the raw body (up to ``GEAROFFLOAD_MAX_BODY``
bytes, else 413) and the ``g`` values the view declares (``carry_g``) into one job, signed
and sealed with the request's deadline (``gearoffload.core``). The worker checks the seal,
rebuilds the request, runs the view body in app and request contexts, and sends the
response back; ``abort(404)`` and other HTTP exceptions are raised again on the web side, so
the app's error handlers render them. ``before_request``/``after_request`` hooks run on the
web side only; changes to ``session`` made on the worker come back as ``Set-Cookie``.

Coalescing (``unique=True``): requests share one run only when they would get the same
answer — same method, path, query (less ``ignore_query``), body, view arguments, ``vary``
headers and, unless ``public=True``, the same credentials (cookies, ``Authorization``).
``unique=`` may also be a callable of the view arguments that returns the key.

Background views (``background=True``) submit a Gearman background job and answer 202 with
a status URL. The job then belongs to the job server (durable with a persistent queue); its
state, progress and result are read from the result backend (``GEAROFFLOAD_RESULTS``:
``server`` by default, or ``redis://...``) by whichever web process serves the poll. Ids are
signed: they cannot be guessed or forged. ``job_owner(request)`` records who submitted a
job, and only that owner may read it (or decide with ``can_read(job, request)``).

Errors: no job server → ``503`` (or the view runs here with ``GEAROFFLOAD_FALLBACK =
"local"``, one run per coalescing key); no worker serves the view → ``503`` at once; no
answer within the timeout → ``504`` (and the job is not started after that); the job failed
→ ``502``; the view raised on the worker → the ``JobException`` (chained to the worker's
traceback) is raised here, so the app's 500 handling and error trackers see it.

Eager mode (``GEAROFFLOAD_EAGER = True``, or ``TESTING`` unless ``GEAROFFLOAD_EAGER`` says
otherwise): views, functions and background jobs run in this process, synchronously,
through the same encoding; the status endpoint works. Tests need no job server.

Configuration (validated by ``init_app``, with messages that say what to do): see
``gearoffload.core.OffloadConfig``, plus ``GEAROFFLOAD_URL_PREFIX`` (of the status
blueprint, default ``/_offload``).
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable, Iterable, Mapping
from datetime import timedelta
from typing import Any
from urllib.parse import urlencode

from flask import Blueprint, Flask, current_app, g, jsonify, request, session, url_for
from flask.wrappers import Response
from werkzeug.datastructures import MultiDict
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge, default_exceptions
from werkzeug.test import stream_encode_multipart

from .checks import flag, names
from .core import (
    CODEC,
    BodyTooLarge,
    JobNotFound,
    JobRef,
    OffloadConfig,
    Offloader,
    SingleFlight,
    check_call_options,
    check_runtime,
    coalescing_key,
    http_error,
    is_background,
    progress,
    request_from_payload,
    request_payload,
    run_task,
    unique_key,
    using,
    with_remote_traceback,
)
from .core import outcome_fields as _outcome_fields
from .errors import GearmanError, JobException, JobLost, NoServersAvailable, NoWorkers
from .registry import TaskRegistry
from .retry import retry_policy

__all__ = ["GearOffload", "OffloadedView", "offload", "progress"]

log = logging.getLogger("gearoffload.flask")

#: Views decorated with the module-level ``offload`` (bound to whichever app serves them).
_unbound_views: list[OffloadedView] = []


class OffloadedView:
    """A view whose body runs on a worker; made by ``ext.offload`` or ``offload``.

    Calling it (Flask does, with the URL's arguments) submits the request and returns the
    worker's response. ``name`` is its Gearman function name; ``view`` the original.
    """

    def __init__(self, view: Callable[..., Any], name: str | None = None,
                 unique: bool | str | Callable[..., str | bytes] = False,
                 background: bool = False, timeout: float | None = None,
                 fallback: str | None = None, vary: Iterable[str] = (),
                 public: bool = False, ignore_query: Iterable[str] = (),
                 carry_g: Iterable[str] = (), priority: str = "normal",
                 retries: int = 0, backoff: float | timedelta | None = None,
                 backoff_max: float | timedelta | None = None,
                 jitter: bool | None = None) -> None:
        if isinstance(view, OffloadedView):
            raise TypeError(f"{view.name} is offloaded twice")
        # The same checks as @offload's (TypeError: wrong type; ValueError: bad value),
        # when the decorator runs rather than at the first request.
        timeout = check_call_options(timeout, fallback, priority)
        if name is not None and (not isinstance(name, str) or not name):
            raise TypeError(f"name= must be a non-empty str, not {name!r}")
        if not (isinstance(unique, (bool, str)) or callable(unique)):
            raise TypeError(f"unique= must be True, False, a key (str) or a callable of the "
                            f"view arguments, not {type(unique).__name__} {unique!r}")
        background = flag("background", background)
        public = flag("public", public)
        vary, ignore_query = names("vary", vary), names("ignore_query", ignore_query)
        carry_g = names("carry_g", carry_g)
        self.retry = retry_policy(retries, backoff, backoff_max, jitter)
        if self.retry is not None and not background:
            raise TypeError(f"{view.__module__}.{view.__qualname__}: retries= needs "
                            "background=True (a waiting browser gets the failure at once)")
        self.view = view
        self.name = name or f"{view.__module__}.{view.__qualname__}"
        self.unique = unique
        self.background = background
        self.timeout = timeout
        self.fallback = fallback
        self.vary = tuple(vary)
        self.public = public
        self.ignore_query = tuple(ignore_query)
        self.carry_g = tuple(carry_g)
        self.priority = priority
        self._flights = SingleFlight()
        functools.update_wrapper(self, view)

    def __repr__(self) -> str:
        return f"<OffloadedView {self.name}>"

    # web side

    def unique_for(self, view_args: Mapping[str, Any], body: bytes = b"") -> str | None:
        """The coalescing key of the current request (``None`` unless ``unique``); see
        ``gearoffload.core.coalescing_key``. A callable ``unique`` gets the view
        arguments and returns the key (it then decides alone what makes requests equal);
        a string is the key itself."""
        if not self.unique:
            return None
        if callable(self.unique):
            return str(unique_key(self.unique(**view_args)))
        if isinstance(self.unique, str):
            return str(unique_key(self.unique))
        return coalescing_key(request.environ, body, vary=self.vary, public=self.public,
                              ignore_query=self.ignore_query,
                              extra=[self.name, sorted((k, repr(v))
                                                       for k, v in view_args.items())])

    def __call__(self, **view_args: Any) -> Any:
        state = _state()
        config = state.offloader.config
        try:
            body = _request_body(config.max_body)  # first: it may fix CONTENT_TYPE/LENGTH
        except BodyTooLarge as exc:
            raise RequestEntityTooLarge(str(exc)) from None
        carried = {key: getattr(g, key) for key in self.carry_g if key in g}
        payload = request_payload(request.environ, body, g=carried,
                                  background=self.background)
        unique = self.unique_for(view_args, body)
        try:
            if self.background:
                ref = state.offloader.start(self.name, payload, unique=unique,
                                            priority=self.priority, owner=state.owner(),
                                            retry=self.retry)
                return state.accepted(self, ref)
            timeout = self.timeout if self.timeout is not None else config.timeout
            raw = state.offloader.call(self.name, payload, unique=unique,
                                       priority=self.priority, timeout=timeout)
        except NoServersAvailable as exc:
            fallback = self.fallback or config.fallback
            if fallback == "local" and not self.background:
                log.warning("%s %s: no job server reachable (%s); running %s here",
                            request.method, request.path, exc, self.name)
                if unique is None:
                    return self.view(**view_args)
                return self._flights.run(unique, lambda: current_app.make_response(
                    self.view(**view_args)))
            raise _http_exception(exc, self.name) from None
        except JobException as exc:
            log.error("%s %s (%s): job %s raised on the worker:\n%s", request.method,
                      request.path, self.name, exc.handle, exc.text)
            raise with_remote_traceback(exc) from exc.__cause__
        except GearmanError as exc:
            raise _http_exception(exc, self.name) from None
        return _to_response(CODEC.loads(raw))

    # worker side

    def run_job(self, app: Flask, job: Any) -> bytes:
        """Open the seal, rebuild the request, run the view body in app and request
        contexts, and return the encoded response."""
        offloader = app.extensions["gearoffload"].offloader
        return run_task(offloader, job, functools.partial(self._respond, app),
                        background=is_background(job.unique))

    def _respond(self, app: Flask, payload: bytes) -> bytes:
        environ, extra = request_from_payload(payload)
        with app.request_context(environ):
            for key, value in (extra.get("g") or {}).items():
                setattr(g, key, value)
            if extra.get("background"):
                progress(0, 0)  # "running" for the status page
            try:
                if request.routing_exception is not None:
                    raise request.routing_exception
                view = app.ensure_sync(self.view)  # async views too
                try:
                    rv = view(**(request.view_args or {}))
                except AttributeError as exc:
                    raise _explain_g(exc, self) from exc
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


def _explain_g(exc: AttributeError, view: OffloadedView) -> BaseException:
    """An ``AttributeError`` on ``g`` says why the value is missing on the worker."""
    if getattr(exc, "obj", None) is g._get_current_object() and getattr(exc, "name", None):
        name = exc.name
        return AttributeError(
            f"g.{name} is not set on the worker: before_request hooks run on the web side "
            f"only. Declare it to travel with the request: @ext.offload(carry_g="
            f"[{name!r}]) on {view.name}")
    return exc


def _http_exception(exc: GearmanError, function: str) -> HTTPException:
    answer = http_error(exc)
    log.error("%s %s (%s): %s: %s", request.method, request.path, function,
              type(exc).__name__, exc)
    error = default_exceptions[answer.status](answer.message)
    if answer.retry_after:
        error.retry_after = answer.retry_after  # type: ignore[attr-defined]
    return error


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


def offload(view: Callable[..., Any] | None = None, **options: Any) -> Any:
    """Offload a view of whichever app serves it (blueprints, app factories): like
    ``GearOffload.offload`` without naming the extension. The app needs ``GearOffload``.

    Example::

        bp = Blueprint("reports", __name__)

        @bp.get("/report/<month>")
        @offload(unique=True)
        def report(month): ...
    """
    def decorate(fn: Callable[..., Any]) -> OffloadedView:
        offloaded = OffloadedView(fn, **options)
        _unbound_views.append(offloaded)
        return offloaded

    return decorate(view) if view is not None else decorate


# -- the extension --------------------------------------------------------------------------

def _eager(config: Mapping[str, Any]) -> bool:
    """Eager mode: ``GEAROFFLOAD_EAGER``, else ``TESTING``."""
    from .core import _flag

    if "GEAROFFLOAD_EAGER" in config:
        return _flag("GEAROFFLOAD_EAGER", config["GEAROFFLOAD_EAGER"])
    return bool(config.get("TESTING"))


class _AppState:
    """What the extension keeps per app: its offloader, its views, its access rules."""

    def __init__(self, ext: GearOffload, app: Flask, offloader: Offloader,
                 url_prefix: str) -> None:
        self.ext = ext
        self.app = app
        self._offloader = offloader
        self.url_prefix = url_prefix

    @property
    def offloader(self) -> Offloader:
        """The app's offloader; eager mode follows ``TESTING``/``GEAROFFLOAD_EAGER`` even
        when a test sets them after ``init_app`` (the usual fixture does)."""
        offloader = self._offloader
        if _eager(self.app.config) != offloader.config.eager:
            import dataclasses

            from .registry import registry as default_registry

            config = dataclasses.replace(offloader.config, eager=not offloader.config.eager)
            offloader = self._offloader = Offloader(config, results=self.ext.results)
            if config.eager:
                offloader.registry = _LiveRegistry(self, default_registry)
            using(offloader)
        return offloader

    @property
    def config(self) -> OffloadConfig:
        return self.offloader.config

    @property
    def registry(self) -> TaskRegistry:
        """The tasks a worker serves for this app: every offloaded view."""
        registry = TaskRegistry()
        for view in [*self.ext.views, *_unbound_views]:
            registry.register(view.name, functools.partial(view.run_job, self.app))
        return registry

    def owner(self) -> str | None:
        """Who submits the current request (``job_owner``), as the digest recorded in
        its job id: ids travel in URLs and logs, so they carry no user id in clear."""
        job_owner = self.ext.job_owner
        if job_owner is None:
            return None
        value = job_owner(request)
        return None if value is None else self.ext.owner_digest(value)

    def accepted(self, view: OffloadedView, ref: JobRef) -> Response:
        """202 with the job's status URL."""
        job_id = self.offloader.job_id(ref)
        url = url_for("gearoffload.job_status", job_id=job_id)
        response = jsonify({"id": job_id, "state": "queued", "status_url": url})
        response.status_code = 202
        response.headers["Location"] = url
        response.headers["Retry-After"] = "1"
        log.info("background view %s: job %s accepted", view.name, ref.unique)
        return response

    def readable(self, job_id: str) -> JobRef:
        """The job an id names, if the current request may read it (404 otherwise: a
        job another user owns is not admitted to exist)."""
        ref = self.offloader.read_id(job_id)
        can_read = self.ext.can_read
        allowed = can_read(ref, request) if can_read is not None else (
            ref.owner is None or ref.owner == self.owner())
        if not allowed:
            raise JobNotFound("Unknown job id.")
        return ref


def _state() -> _AppState:
    state = current_app.extensions.get("gearoffload")
    if state is None:
        raise RuntimeError("this app has offloaded views but no GearOffload: call "
                           "GearOffload(app) or ext.init_app(app)")
    return state


def _unavailable(exc: GearmanError) -> HTTPException:
    """The app-wide answer to ``NoServersAvailable``, ``NoWorkers`` and
    ``JobLost`` raised by a view: 503 with ``Retry-After``, logged once."""
    return _http_exception(exc, request.endpoint or "-")


def _json_error(exc: GearmanError) -> Response:
    answer = http_error(exc)
    response = jsonify({"error": answer.message, "status": answer.status})
    response.status_code = answer.status
    response.headers["Cache-Control"] = "no-store"
    return response


def _job_status(job_id: str) -> Response:
    state = _state()
    try:
        ref = state.readable(job_id)
        outcome = state.offloader.outcome(ref)
    except GearmanError as exc:
        return _json_error(exc)
    if outcome.state == "unknown":
        return _json_error(JobNotFound("Unknown job id (never run here, or lost)."))
    body: dict[str, Any] = {"id": job_id,
                            **_outcome_fields(outcome, traceback=current_app.debug)}
    if outcome.state == "done" and outcome.data is not None:
        answer = CODEC.loads(outcome.data)
        body["result_url"] = url_for("gearoffload.job_result", job_id=job_id)
        if "abort" in answer:
            body["status_code"] = answer["abort"]
        else:
            body["status_code"] = answer["status"]
            headers = {k.lower(): v for k, v in answer["headers"]}
            kind = headers.get("content-type", "")
            if kind.startswith("application/json"):
                body["result"] = json.loads(answer["body"])
            elif kind.startswith("text/") and len(answer["body"]) <= 65536:
                body["result"] = answer["body"].decode("utf-8", "replace")
    response = jsonify(body)
    if outcome.state in ("queued", "running"):
        response.headers["Retry-After"] = "1"
    response.headers["Cache-Control"] = "no-store"
    return response


def _job_result(job_id: str) -> Response:
    state = _state()
    try:
        outcome = state.offloader.outcome(state.readable(job_id))
    except GearmanError as exc:
        return _json_error(exc)
    if outcome.state == "unknown":
        return _json_error(JobNotFound("Unknown job id (never run here, or lost)."))
    if outcome.state != "done" or outcome.data is None:
        response = jsonify({"id": job_id,
                            **_outcome_fields(outcome, traceback=current_app.debug)})
        # failed: the job's own error; done without data: the result was not kept
        # (too large); still queued or running: not yet.
        response.status_code = 500 if outcome.state in ("failed", "dead") else (
            502 if outcome.state == "done" else 409)
        if response.status_code == 409:
            response.headers["Retry-After"] = "1"
        return response
    return _to_response(CODEC.loads(outcome.data))


class GearOffload:
    """The Flask extension: ``GearOffload(app)`` or ``ext = GearOffload();
    ext.init_app(app)``. See the module docstring.

    ``job_owner(request)``: who submits a background job (e.g. the user id), recorded in
    its signed id; by default only requests with the same owner may read the job.
    ``can_read(job, request)``: decide yourself (``job`` is a ``JobRef``: ``function``,
    ``unique``, ``owner``, ``created``). ``results``: a ``ResultBackend`` instead of
    ``GEAROFFLOAD_RESULTS``. ``init_app`` changes nothing process-wide: inside the app's
    contexts, ``@offload`` functions use the app's settings.

    Example::

        ext = GearOffload(app, job_owner=lambda request: session.get("user_id"))

        @app.get("/slow")
        @ext.offload
        def slow():
            return "done on a worker"
    """

    def __init__(self, app: Flask | None = None, *,
                 job_owner: Callable[[Any], Any] | None = None,
                 can_read: Callable[[JobRef, Any], bool] | None = None,
                 results: Any = None) -> None:
        self.views: list[OffloadedView] = []
        self.job_owner = job_owner
        self.can_read = can_read
        self.results = results
        self._apps: list[Flask] = []
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Validate the app's ``GEAROFFLOAD_*`` config, register the status blueprint and
        the ``flask gearoffload worker`` command."""
        check_runtime()
        mapping = {**app.config, "GEAROFFLOAD_EAGER": _eager(app.config)}
        try:
            config = OffloadConfig.from_mapping(mapping, app.config.get("SECRET_KEY"))
        except ValueError as exc:
            raise ValueError(f"gearoffload: bad Flask config: {exc}") from None
        prefix = str(app.config.get("GEAROFFLOAD_URL_PREFIX") or "/_offload").rstrip("/")
        if not prefix.startswith("/"):
            raise ValueError(f"gearoffload: bad Flask config: GEAROFFLOAD_URL_PREFIX must "
                             f"start with '/', not {prefix!r}")
        if not config.secret_key and not config.allow_unsigned:
            raise ValueError(
                "gearoffload: set GEAROFFLOAD_SECRET_KEY (or the app's SECRET_KEY): jobs "
                "are signed so that only this web tier can make workers run a view; on a "
                "closed network, GEAROFFLOAD_ALLOW_UNSIGNED = True opts out")
        state = _AppState(self, app, Offloader(config, results=self.results), prefix)
        app.extensions["gearoffload"] = state
        if config.eager:
            from .registry import registry as default_registry

            state.offloader.registry = _LiveRegistry(state, default_registry)
        self._apps.append(app)
        self._check_order(app)
        blueprint = Blueprint("gearoffload", __name__, url_prefix=prefix)
        blueprint.add_url_rule("/jobs/<job_id>", "job_status", _job_status)
        blueprint.add_url_rule("/jobs/<job_id>/result", "job_result", _job_result)
        app.register_blueprint(blueprint)
        app.cli.add_command(_cli_group())
        # An @offload call in a plain view (``report.background(...)``) with every job server
        # down gets the 503 an offloaded view gets, not a 500; the app's own handler for
        # these errors, registered before, is kept.
        handlers = app.error_handler_spec.get(None, {}).get(None, {})  # read only
        for unavailable in (NoServersAvailable, NoWorkers, JobLost):
            if not any(cls in handlers for cls in unavailable.__mro__):  # incl. Exception
                app.register_error_handler(unavailable, _unavailable)

        from flask import appcontext_popped, appcontext_pushed

        def push(sender: Flask, **_: Any) -> None:
            using(state.offloader)  # (reads the app's eager flag now)

        def pop(sender: Flask, **_: Any) -> None:
            using(None)

        appcontext_pushed.connect(push, app, weak=False)
        appcontext_popped.connect(pop, app, weak=False)

    def owner_digest(self, value: Any) -> str:
        """What a ``JobRef.owner`` holds for the owner ``value`` (a keyed digest): compare
        with it in a ``can_read`` hook.

        Example::

            ext = GearOffload(app, can_read=lambda job, request:
                              job.owner == ext.owner_digest(session.get("user_id")))
        """
        import hashlib
        import hmac

        key = (current_app.extensions["gearoffload"].offloader.config.secret_key or "")
        mac = hmac.new(key.encode(), b"gearoffload.owner\0" + str(value).encode(),
                       hashlib.sha256)
        return mac.hexdigest()[:32]

    def job_unique(self, job_id: str, app: Flask | None = None) -> str:
        """The unique key, on the job server, of the background job ``job_id`` names (the
        ``id`` of a 202 answer, the last part of its status URL): what an operator gives
        ``gearoffload find`` (the admin command ``find job``, ``AdminClient.find_job``)
        to read the job's history. The id's signature is checked with the app's key
        (``app``: the current app, else the first one ``init_app`` saw); ``JobNotFound``
        for a forged or garbage id. ``flask gearoffload job ID`` prints it too.

        Example::

            unique = ext.job_unique(job_id)              # 'bg-...'
            with AdminClient("127.0.0.1:4730") as admin:
                history = admin.find_job(unique)
        """
        from flask import has_app_context

        if app is None:
            if has_app_context():
                app = current_app._get_current_object()
            elif self._apps:
                app = self._apps[0]
            else:
                raise RuntimeError("job_unique needs an app: call init_app first")
        return app.extensions["gearoffload"].offloader.read_id(job_id).unique

    def _check_order(self, app: Flask, fn: Callable[..., Any] | None = None) -> None:
        """``@ext.offload`` above ``@app.route`` registers the plain view: refuse it."""
        registered = set(app.view_functions.values())
        for view in ([fn] if fn is not None else [v.view for v in self.views]):
            if view in registered:
                raise TypeError(
                    f"{view.__module__}.{view.__qualname__}: @ext.offload must go below "
                    "@app.route (above it, the route serves the view here, not on a "
                    "worker)")

    def offload(self, view: Callable[..., Any] | None = None, *, name: str | None = None,
                unique: bool | str | Callable[..., str | bytes] = False,
                background: bool = False, timeout: float | None = None,
                fallback: str | None = None, vary: Iterable[str] = (),
                public: bool = False, ignore_query: Iterable[str] = (),
                carry_g: Iterable[str] = (), priority: str = "normal", retries: int = 0,
                backoff: float | timedelta | None = None,
                backoff_max: float | timedelta | None = None,
                jitter: bool | None = None) -> Any:
        """Decorator for a view (below ``@app.route``): its body runs on a worker.

        ``unique=True`` coalesces identical requests (see the module docstring: the
        credentials count unless ``public=True``; ``ignore_query`` lists query parameters,
        ``fnmatch`` patterns, that do not change the answer), or ``unique=callable`` gets
        the view arguments and returns the key; ``background=True`` answers 202 with a
        status URL; ``carry_g`` names ``g`` attributes set by ``before_request`` that the
        view needs on the worker (JSON values); ``timeout`` (seconds) overrides
        ``GEAROFFLOAD_TIMEOUT``; ``fallback`` overrides ``GEAROFFLOAD_FALLBACK``; ``name``
        the Gearman function name (default ``module.qualname``). ``retries``,
        ``backoff``, ``backoff_max``, ``jitter`` (background views only): as for
        ``gearoffload.offload``. Every setting is checked when the decorator runs
        (``TypeError`` for a wrong type, ``ValueError`` for a bad value), as for
        ``gearoffload.offload``.

        Example::

            @app.get("/page/<int:n>")
            @ext.offload(unique=True, ignore_query=["utm_*"], timeout=10)
            def page(n): ...

            @app.post("/invoices/<int:n>/send")
            @ext.offload(background=True, retries=3, backoff=5)
            def send_invoice(n): ...
        """
        def decorate(fn: Callable[..., Any]) -> OffloadedView:
            for app in self._apps:
                self._check_order(app, fn)
            offloaded = OffloadedView(fn, name=name, unique=unique, background=background,
                                      timeout=timeout, fallback=fallback, vary=vary,
                                      public=public, ignore_query=ignore_query,
                                      carry_g=carry_g, priority=priority,
                                      retries=retries, backoff=backoff,
                                      backoff_max=backoff_max, jitter=jitter)
            self.views.append(offloaded)
            return offloaded

        return decorate(view) if view is not None else decorate


class _LiveRegistry:
    """Eager mode's tasks: the app's views and the ``@offload`` functions, looked up at
    call time (views may be declared after ``init_app``)."""

    def __init__(self, state: _AppState, functions: TaskRegistry) -> None:
        self.state = state
        self.functions = functions

    def get(self, name: str) -> Any:
        return self.state.registry.get(name) or self.functions.get(name)


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
        args = [sys.executable, "-m", "gearoffload.pool", f"{app.import_name}:{names[0]}"]
        os.execv(sys.executable, [*args, *pool_args])

    @group.command("job")
    @click.argument("job_id")
    def job(job_id: str) -> None:
        """Show what a background job id names: its function and its unique key on the
        job server (give that to 'gearoffload find')."""
        from datetime import datetime

        try:
            ref = _state().offloader.read_id(job_id)
        except JobNotFound:
            raise click.ClickException("unknown job id (forged, truncated, or signed with "
                                       "another secret key)") from None
        submitted = datetime.fromtimestamp(ref.created).astimezone()
        click.echo(f"function   {ref.function}\nunique     {ref.unique}\n"
                   f"submitted  {submitted.isoformat(timespec='seconds')}\n"
                   f"owner      {ref.owner or '-'}")

    return group
