"""``@offload``: run a plain function on a Gearman worker, as if it were called here.

Example (``myapp/tasks.py``)::

    from gearoffload import offload

    @offload(unique=True, timeout=30)           # or just @offload
    def render_report(month):
        ...
        return {"month": month, "rows": 1234}

    render_report("2026-11")                    # runs on a worker, waits, returns the value
    job = render_report.background("2026-11")   # an OffloadedJob at once; job.result() later
    render_report.local("2026-11")              # runs here, no job server involved

and the worker side is ``gearoffload-worker myapp.tasks`` (importing the module registers
every decorated function under its wire name in ``gearoffload.registry.registry``).

- The Gearman function name is ``module.qualname`` (``myapp.tasks.render_report``) unless
  ``name=`` is given.
- Arguments and results go through ``gearoffload.codec`` (JSON by default: str, bytes,
  numbers, lists, dicts).
- ``unique=True`` derives the unique key from a stable hash of the arguments, so that
  concurrent identical calls (from any number of processes) coalesce into one execution;
  ``unique=callable`` gets the call's ``*args, **kwargs`` and returns the key (str/bytes,
  hashed when longer than 64 bytes).
- ``fallback="local"`` runs the function here when no job server can be reached at
  submission time (default ``"raise"``: ``NoServersAvailable``). A job that was accepted
  and then lost is never re-run locally (it may have run on a worker already).
- A worker exception reaches the caller as ``JobException`` whose ``text`` is
  ``"TypeName: message"``.

Where the client comes from: a module-level default, configured once by
``gearoffload.configure(servers=..., timeout=..., fallback=..., secret_key=...,
format=...)`` or, if ``configure`` is never called, by the environment
(``GEAROFFLOAD_SERVERS`` — default ``127.0.0.1:4730`` —, ``GEAROFFLOAD_TIMEOUT``,
``GEAROFFLOAD_FALLBACK``, ``GEAROFFLOAD_SECRET_KEY``, ``GEAROFFLOAD_FORMAT``). One
``Client`` is made per OS thread (a gevent-patched process has one), lazily, at the first
call.

(This module is ``gearoffload.offloading``, not ``gearoffload.offload``: a submodule of that
name would replace the ``gearoffload.offload`` decorator on the package once imported.)
"""

from __future__ import annotations

import contextvars
import functools
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gevent import monkey

from .codec import FORMATS, Codec, stable_hash
from .errors import NoServersAvailable
from .registry import TaskRegistry
from .registry import registry as default_registry

__all__ = ["OffloadConfig", "OffloadedFunction", "OffloadedJob", "configure", "current_job",
           "get_client", "get_config", "offload", "progress", "registry_for"]

log = logging.getLogger("gearoffload.offloading")

_FALLBACKS = ("raise", "local")


def check_call_options(timeout: float | None, fallback: str | None) -> None:
    """Validate the per-call options shared by ``@offload`` and the Flask extension."""
    if fallback is not None and fallback not in _FALLBACKS:
        raise ValueError(f"fallback must be 'raise' or 'local', not {fallback!r}")
    if timeout is not None and not timeout > 0:
        raise ValueError("timeout must be a positive number of seconds")


@dataclass(frozen=True)
class OffloadConfig:
    """The offload layer's settings, validated once (``configure``, the environment, or
    the Flask config). Messages say what to change.

    Example::

        config = OffloadConfig.from_mapping({"GEAROFFLOAD_SERVERS": "127.0.0.1:4730"})
        assert config.servers == ("127.0.0.1:4730",)
    """

    servers: tuple[str, ...] = ("127.0.0.1:4730",)
    timeout: float | None = 60.0
    fallback: str = "raise"
    secret_key: str | None = field(default=None, repr=False)
    format: str = "json"
    connect_timeout: float = 2.0
    #: PEM files for TLS to the servers (``gearoffload.tls_context``); all None: plain TCP.
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None

    @property
    def tls(self) -> dict | None:
        """``Client(tls=...)`` for these settings."""
        from .tls import tls_files

        return tls_files(self.tls_ca, self.tls_cert, self.tls_key)

    def __post_init__(self) -> None:
        servers = self.servers
        if isinstance(servers, str):
            servers = tuple(s.strip() for s in servers.split(",") if s.strip())
        else:
            servers = tuple(str(s).strip() for s in servers if str(s).strip())
        if not servers:
            raise ValueError("GEAROFFLOAD_SERVERS is empty: give host:port[,host:port...], "
                             "e.g. 127.0.0.1:4730")
        from .connection import parse_address
        for server in servers:
            try:
                parse_address(server)
            except ValueError as exc:
                raise ValueError(f"GEAROFFLOAD_SERVERS: {exc}; expected host:port") from None
        object.__setattr__(self, "servers", servers)
        if self.timeout is not None and not self.timeout > 0:
            raise ValueError(f"GEAROFFLOAD_TIMEOUT must be a positive number of seconds "
                             f"(or None for no limit), not {self.timeout!r}")
        if not self.connect_timeout > 0:
            raise ValueError("the connect timeout must be a positive number of seconds")
        if self.fallback not in _FALLBACKS:
            raise ValueError(f"GEAROFFLOAD_FALLBACK must be 'raise' (fail with 503/"
                             f"NoServersAvailable) or 'local' (run in-process), not "
                             f"{self.fallback!r}")
        if self.format not in FORMATS:
            raise ValueError(f"GEAROFFLOAD_FORMAT must be one of {', '.join(FORMATS)}, "
                             f"not {self.format!r}")
        self.codec  # noqa: B018 - validates format/secret-key combinations now
        if self.tls is not None:
            from .tls import client_context, tls_error_text

            try:  # now, not at the first request
                client_context(self.tls)
            except (OSError, ValueError) as exc:
                raise ValueError(f"GEAROFFLOAD_TLS_CA/CERT/KEY: {tls_error_text(exc)}") \
                    from None

    @functools.cached_property
    def codec(self) -> Codec:
        return Codec(self.format, self.secret_key)

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> OffloadConfig:
        """Build from ``GEAROFFLOAD_*`` keys (``os.environ`` or ``app.config``)."""
        kwargs: dict[str, Any] = {}
        if mapping.get("GEAROFFLOAD_SERVERS"):
            kwargs["servers"] = mapping["GEAROFFLOAD_SERVERS"]
        for key, name in (("GEAROFFLOAD_TIMEOUT", "timeout"),
                          ("GEAROFFLOAD_CONNECT_TIMEOUT", "connect_timeout")):
            value = mapping.get(key)
            if value is None or value == "":
                continue
            if isinstance(value, str) and value.lower() == "none" and name == "timeout":
                kwargs[name] = None
                continue
            try:
                kwargs[name] = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"{key} must be a number of seconds, not {value!r}") from None
        if mapping.get("GEAROFFLOAD_FALLBACK"):
            kwargs["fallback"] = str(mapping["GEAROFFLOAD_FALLBACK"]).lower()
        if mapping.get("GEAROFFLOAD_SECRET_KEY"):
            kwargs["secret_key"] = mapping["GEAROFFLOAD_SECRET_KEY"]
        if mapping.get("GEAROFFLOAD_FORMAT"):
            kwargs["format"] = str(mapping["GEAROFFLOAD_FORMAT"]).lower()
        for name in ("ca", "cert", "key"):
            if mapping.get(f"GEAROFFLOAD_TLS_{name.upper()}"):
                kwargs[f"tls_{name}"] = str(mapping[f"GEAROFFLOAD_TLS_{name.upper()}"])
        return cls(**kwargs)

    def make_client(self) -> Any:
        from .client import Client
        return Client(list(self.servers), timeout=self.timeout,
                      connect_timeout=self.connect_timeout, tls=self.tls)


# -- the module-level default -----------------------------------------------------------

_config: OffloadConfig | None = None
_generation = 0
# The unpatched thread-local: one Client per OS thread (and so per gevent hub), shared by
# every greenlet of that thread, whether or not the process is monkey-patched.
_clients = monkey.get_original("threading", "local")()


def configure(**settings: Any) -> OffloadConfig:
    """Set the default settings of ``@offload`` (and drop clients made with the old ones).

    Keys: ``servers`` (``"host:port,..."`` or a list), ``timeout`` (seconds a call waits
    for its result, ``None`` = forever), ``fallback`` (``"raise"`` or ``"local"``),
    ``secret_key`` (enables signed pickle), ``format`` (``"json"``, ``"msgpack"``,
    ``"pickle"``), ``connect_timeout``, ``tls_ca``/``tls_cert``/``tls_key`` (PEM files:
    TLS to the servers, docs/tls.md). Keys not given keep their current value.

    Example::

        import gearoffload
        gearoffload.configure(servers="10.0.0.5:4730,10.0.0.6:4730", timeout=30)
    """
    global _config, _generation
    base = get_config()
    values = {name: getattr(base, name) for name in ("servers", "timeout", "fallback",
                                                      "secret_key", "format",
                                                      "connect_timeout", "tls_ca",
                                                      "tls_cert", "tls_key")}
    unknown = set(settings) - set(values)
    if unknown:
        raise TypeError(f"configure() got unknown settings {sorted(unknown)}; "
                        f"known: {sorted(values)}")
    values.update(settings)
    _config = OffloadConfig(**values)
    _generation += 1
    return _config


def get_config() -> OffloadConfig:
    """The current default settings (from ``configure`` or the environment)."""
    global _config
    if _config is None:
        _config = OffloadConfig.from_mapping(os.environ)
    return _config


def get_client() -> Any:
    """This thread's default ``Client`` (made at first use with ``get_config()``)."""
    client = getattr(_clients, "client", None)
    if client is None or _clients.generation != _generation:
        if client is not None:
            client.close()
        client = _clients.client = get_config().make_client()
        _clients.generation = _generation
    return client


# -- worker side helpers ------------------------------------------------------------------

_current_job: contextvars.ContextVar[Any] = contextvars.ContextVar("gearoffload_job",
                                                                    default=None)


def current_job() -> Any:
    """The ``WorkerJob`` being served by this greenlet, or ``None`` outside a worker."""
    return _current_job.get()


def progress(numerator: int, denominator: int) -> None:
    """Report progress from an offloaded function or view (WORK_STATUS); does nothing
    when the code runs locally.

    Example::

        @offload
        def crunch(items):
            for i, item in enumerate(items, 1):
                ...
                progress(i, len(items))
    """
    job = _current_job.get()
    if job is not None:
        job.send_status(numerator, denominator)


def run_as_task(job: Any, fn: Callable[[], Any]) -> Any:
    """Run ``fn()`` with ``job`` as ``current_job()`` (used by the worker-side runners)."""
    token = _current_job.set(job)
    try:
        return fn()
    finally:
        _current_job.reset(token)


# -- @offload -----------------------------------------------------------------------------

def unique_key(value: str | bytes) -> str | bytes:
    """A Gearman unique (≤ 64 bytes, no NUL) from a user's key: hashed when it does not fit."""
    raw = value.encode() if isinstance(value, str) else bytes(value)
    if len(raw) <= 64 and b"\0" not in raw and raw not in (b"", b"-"):
        return value
    return stable_hash(raw)


class OffloadedJob:
    """A call running on a worker: ``result()`` decodes the value; everything else
    (``handle``, ``status()``, ``updates()``, ``done``...) is the underlying ``Job``'s.

    Example::

        job = render_report.background("2026-11")
        ...
        report = job.result(timeout=60)
    """

    __slots__ = ("job", "codec")

    def __init__(self, job: Any, codec: Codec) -> None:
        self.job = job
        self.codec = codec

    def __repr__(self) -> str:
        return f"<OffloadedJob {self.job!r}>"

    def result(self, timeout: float | None = None) -> Any:
        """Wait for the worker and return the function's value (raises what ``Job.result``
        raises, ``JobException`` when the function raised)."""
        return self.codec.loads(self.job.result(timeout=timeout))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.job, name)


class OffloadedFunction:
    """A function whose calls run on Gearman workers; made by ``@offload``.

    Calling it submits a job and waits for the value; ``background()`` returns an
    ``OffloadedJob`` at once; ``local()`` calls the function here. ``name`` is its
    Gearman function name.
    """

    def __init__(self, fn: Callable[..., Any], name: str | None = None,
                 unique: bool | Callable[..., str | bytes] = False,
                 timeout: float | None = None, fallback: str | None = None,
                 priority: str = "normal", registry: TaskRegistry | None = None) -> None:
        check_call_options(timeout, fallback)
        self.fn = fn
        self.name = name or f"{fn.__module__}.{fn.__qualname__}"
        self.unique = unique
        self.timeout = timeout
        self.fallback = fallback
        self.priority = priority
        functools.update_wrapper(self, fn)
        (registry if registry is not None else default_registry).register(self.name, self.run_job)

    def __repr__(self) -> str:
        return f"<OffloadedFunction {self.name}>"

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        if obj is None:
            return self
        raise TypeError(f"@offload on the method {self.name}: offload plain module-level "
                        "functions (a worker cannot rebuild 'self')")

    def unique_for(self, args: tuple, kwargs: dict) -> str | bytes | None:
        """The unique key a call with these arguments gets (``None``: no coalescing)."""
        if not self.unique:
            return None
        if callable(self.unique):
            return unique_key(self.unique(*args, **kwargs))
        return stable_hash(self.name, list(args), kwargs)

    def background(self, *args: Any, **kwargs: Any) -> OffloadedJob:
        """Submit the call and return an ``OffloadedJob`` at once (no local fallback)."""
        return self._submit(args, kwargs, wait=True)

    def _submit(self, args: tuple, kwargs: dict, wait: bool) -> OffloadedJob:
        config = get_config()
        payload = config.codec.dumps([list(args), kwargs])
        job = get_client().submit(self.name, payload, unique=self.unique_for(args, kwargs),
                                  priority=self.priority, wait=wait)
        return OffloadedJob(job, config.codec)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        timeout = self.timeout if self.timeout is not None else get_config().timeout
        try:
            # wait=False: one wait, for the result (Client.call), not one per reply.
            return self._submit(args, kwargs, wait=False).result(timeout=timeout)
        except NoServersAvailable as exc:  # no server took the call (one that did: JobFailed)
            if (self.fallback or get_config().fallback) == "local":
                log.warning("%s: no job server reachable (%s); running locally", self.name, exc)
                return self.fn(*args, **kwargs)
            raise

    def local(self, *args: Any, **kwargs: Any) -> Any:
        """Call the function in this process."""
        return self.fn(*args, **kwargs)

    def run_job(self, job: Any) -> bytes:
        """The worker side: decode the arguments, call the function, encode its value."""
        codec = get_config().codec
        args, kwargs = codec.loads(job.data)
        return codec.dumps(run_as_task(job, lambda: self.fn(*args, **kwargs)))


def offload(fn: Callable[..., Any] | None = None, *, name: str | None = None,
            unique: bool | Callable[..., str | bytes] = False, timeout: float | None = None,
            fallback: str | None = None, priority: str = "normal",
            registry: TaskRegistry | None = None) -> Any:
    """Decorator: ``@offload`` or ``@offload(name=..., unique=..., timeout=...,
    fallback=..., priority=...)``; see the module docstring.

    Example::

        @offload(unique=True)
        def thumbnail(image: bytes, width: int) -> bytes:
            ...
    """
    def decorate(func: Callable[..., Any]) -> OffloadedFunction:
        return OffloadedFunction(func, name=name, unique=unique, timeout=timeout,
                                 fallback=fallback, priority=priority, registry=registry)

    return decorate(fn) if fn is not None else decorate


# -- what gearoffload-worker serves for an app ----------------------------------------

def registry_for(obj: Any, wsgi_function: str | None = None) -> TaskRegistry:
    """The tasks ``gearoffload-worker`` serves for ``obj`` when it is not a ``Worker`` or
    ``TaskRegistry``: a Flask app's offloaded views (``GearOffload``), every ``@offload``
    function imported so far, and, with ``wsgi_function``, the WSGI runner of
    ``OffloadMiddleware`` calling ``obj`` as a WSGI app.

    Example::

        registry_for(flask_app).names()          # ['myapp.views.report', ...]
        registry_for(wsgi_app, "gearoffload.wsgi")
    """
    registry = TaskRegistry()
    registry.update(default_registry)
    extensions = getattr(obj, "extensions", None)
    extension = extensions.get("gearoffload") if isinstance(extensions, dict) else None
    if extension is not None:
        registry.update(extension.registry)
    elif wsgi_function is None:
        raise TypeError(f"{type(obj).__name__} is not a Worker, a TaskRegistry or a Flask app "
                        "with GearOffload; to serve a WSGI app for OffloadMiddleware, add "
                        "--wsgi")
    if wsgi_function is not None:
        if not callable(obj):
            raise TypeError(f"--wsgi needs a WSGI application, not {type(obj).__name__}")
        from .wsgi import wsgi_runner
        registry.register(wsgi_function, wsgi_runner(obj, get_config().secret_key))
    if not len(registry):
        raise ValueError(f"{type(obj).__name__} has no offloaded views or functions (use "
                         "GearOffload(app) with @ext.offload, or --wsgi for a WSGI app)")
    return registry
