"""The offload core: what ``@offload`` functions, ``OffloadMiddleware`` and the Flask
extension share. The adapters above it only translate between their world (a function
call, a WSGI environ, a Flask request) and this module.

It holds:

- ``OffloadConfig``: the settings, from ``GEAROFFLOAD_*`` keys, validated once;
- ``Offloader``: one per configuration — the clients (one per OS thread), the seal on
  every job (signature with expiry, and the caller's deadline), foreground calls,
  background jobs and their outcomes (``gearoffload.results``), and eager mode;
- ``coalescing_key``: the unique key of a web request, safe by default;
- ``http_error``: one mapping from what went wrong to an HTTP status and message.

Example::

    offloader = Offloader(OffloadConfig(servers=("127.0.0.1:4730",), secret_key="k"))
    data = offloader.call("upper", b"hello", timeout=5)        # foreground, one wait
    ref = offloader.start("report", b"2026-11")                # background: a JobRef
    offloader.outcome(ref).state                               # "queued", ..., "done"

Background means a Gearman background job: once ``start`` has returned, the job is the job
server's (durable on a persistent queue, retried by its policy), and this process may exit.
"""

from __future__ import annotations

import contextvars
import fnmatch
import functools
import hashlib
import itertools
import logging
import secrets
import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple
from urllib.parse import parse_qsl, urlencode

from gevent import monkey

from .codec import FORMATS, Codec, PayloadError, stable_hash
from .errors import (
    GearmanError,
    JobException,
    JobFailed,
    JobLost,
    JobTimeout,
    NoServersAvailable,
    NoWorkers,
)
from .results import ENDED, MemoryResults, Outcome, ResultBackend, open_results
from .retry import RetryPolicy

__all__ = ["BodyTooLarge", "HttpError", "JobExpired", "JobNotFound", "JobRef", "NoWorkers",
           "OffloadConfig", "Offloader", "StaleJob", "coalescing_key", "current_job",
           "describe_job", "http_error",
           "progress", "run_as_task", "unique_key"]

log = logging.getLogger("gearoffload.core")

FALLBACKS = ("raise", "local")
_MB = 1024 * 1024
#: How long a seal is accepted when the job has no deadline of its own (background
#: jobs): long enough for a queue that backs up for a day, short enough that a captured
#: job cannot be replayed forever.
DEFAULT_SIGNATURE_MAX_AGE = 86400.0
#: A job is refused when its caller's deadline passed more than this long ago: the
#: clocks of web and worker hosts may differ a little (NTP keeps them within ms).
CLOCK_SKEW = 0.25


class StaleJob(JobFailed):
    """A worker refused a job: its caller's deadline has passed, or its seal expired."""


class JobNotFound(GearmanError):
    """No job has this id (never issued here, forged, or lost)."""


class JobExpired(GearmanError):
    """The job's outcome was kept for its TTL, and that time is over."""


# -- settings ---------------------------------------------------------------------------

@dataclass(frozen=True)
class OffloadConfig:
    """The offload settings, validated once (``configure``, the environment, or the Flask
    config). Messages say what to change.

    Example::

        config = OffloadConfig.from_mapping({"GEAROFFLOAD_SERVERS": "127.0.0.1:4730"})
        assert config.servers == ("127.0.0.1:4730",)
    """

    servers: tuple[str, ...] = ("127.0.0.1:4730",)
    timeout: float | None = 60.0
    fallback: str = "raise"
    #: Signs every job (and background ids); the newest key. ``old_secret_keys`` are still
    #: accepted (key rotation).
    secret_key: str | None = field(default=None, repr=False)
    old_secret_keys: tuple[str, ...] = field(default=(), repr=False)
    #: Jobs older than this (seconds since they were sealed) are refused by workers.
    signature_max_age: float = DEFAULT_SIGNATURE_MAX_AGE
    #: Closed networks only: send jobs unsigned and let workers run unsigned jobs.
    allow_unsigned: bool = False
    format: str = "json"
    connect_timeout: float = 2.0
    #: PEM files for TLS to the servers (``gearoffload.tls_context``); all None: plain TCP.
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    max_body: int = 4 * _MB
    #: Where background outcomes are read: ``server``, ``memory`` or ``redis://...``.
    results: str = "server"
    #: Seconds the outcome of a background job stays readable (Redis and memory backends;
    #: the job server's own ``--result-ttl`` for ``server``).
    result_ttl: float = 600.0
    #: Run everything in this process, synchronously (tests): no job server at all.
    eager: bool = False

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
        from .connection import parse_servers
        try:  # the messages say what to write instead
            parse_servers(servers)
        except ValueError as exc:
            raise ValueError(f"GEAROFFLOAD_SERVERS: {exc}") from None
        object.__setattr__(self, "servers", servers)
        if isinstance(self.old_secret_keys, str):
            object.__setattr__(self, "old_secret_keys", (self.old_secret_keys,))
        if self.timeout is not None and not self.timeout > 0:
            raise ValueError(f"GEAROFFLOAD_TIMEOUT must be a positive number of seconds "
                             f"(or None for no limit), not {self.timeout!r}")
        if not self.connect_timeout > 0:
            raise ValueError("the connect timeout must be a positive number of seconds")
        if self.fallback not in FALLBACKS:
            raise ValueError(f"GEAROFFLOAD_FALLBACK must be 'raise' (fail with 503/"
                             f"NoServersAvailable) or 'local' (run in-process), not "
                             f"{self.fallback!r}")
        if self.format not in FORMATS:
            raise ValueError(f"GEAROFFLOAD_FORMAT must be one of {', '.join(FORMATS)}, "
                             f"not {self.format!r}")
        if self.max_body < 0:
            raise ValueError("GEAROFFLOAD_MAX_BODY must be a number of bytes >= 0")
        if not self.result_ttl > 0:
            raise ValueError("GEAROFFLOAD_RESULT_TTL must be a positive number of seconds")
        if not self.signature_max_age > 0:
            raise ValueError("GEAROFFLOAD_SIGNATURE_MAX_AGE must be a positive number of "
                             "seconds")
        if not (self.results in ("server", "memory")
                or self.results.startswith(("redis://", "rediss://", "unix://"))):
            raise ValueError(f"GEAROFFLOAD_RESULTS must be 'server' (the job server keeps "
                             f"them), 'memory' (this process only) or a redis:// URL, not "
                             f"{self.results!r}")
        self.codec  # noqa: B018 - validates format/secret-key combinations now
        if self.tls is not None:
            from .tls import client_context, tls_error_text

            try:  # now, not at the first request
                client_context(self.tls)
            except (OSError, ValueError) as exc:
                raise ValueError(f"GEAROFFLOAD_TLS_CA/CERT/KEY: {tls_error_text(exc)}") \
                    from None

    def make_client(self) -> Any:
        """A new ``Client`` for these settings (``Offloader.client`` keeps one per thread)."""
        from .client import Client

        return Client(list(self.servers), timeout=self.timeout,
                      connect_timeout=self.connect_timeout, tls=self.tls)

    @functools.cached_property
    def codec(self) -> Codec:
        return Codec(self.format, self.secret_key)

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any],
                     fallback_secret: str | bytes | None = None) -> OffloadConfig:
        """Build from ``GEAROFFLOAD_*`` keys (``os.environ`` or ``app.config``).
        ``fallback_secret`` (Flask's ``SECRET_KEY``) signs jobs when
        ``GEAROFFLOAD_SECRET_KEY`` is not set."""
        kwargs: dict[str, Any] = {}
        servers = mapping.get("GEAROFFLOAD_SERVERS")
        if servers:
            kwargs["servers"] = servers if isinstance(servers, str) else ",".join(servers)
        numbers = (("GEAROFFLOAD_TIMEOUT", "timeout", float),
                   ("GEAROFFLOAD_CONNECT_TIMEOUT", "connect_timeout", float),
                   ("GEAROFFLOAD_MAX_BODY", "max_body", int),
                   ("GEAROFFLOAD_RESULT_TTL", "result_ttl", float),
                   ("GEAROFFLOAD_SIGNATURE_MAX_AGE", "signature_max_age", float))
        for key, name, kind in numbers:
            value = mapping.get(key)
            if value is None or value == "":
                continue
            if isinstance(value, str) and value.lower() == "none" and name == "timeout":
                kwargs[name] = None
                continue
            try:
                kwargs[name] = kind(value)
            except (TypeError, ValueError):
                raise ValueError(f"{key} must be a number, not {value!r}") from None
        for key, name in (("GEAROFFLOAD_FALLBACK", "fallback"),
                          ("GEAROFFLOAD_FORMAT", "format"), ("GEAROFFLOAD_RESULTS", "results")):
            if mapping.get(key):
                kwargs[name] = str(mapping[key]).strip()
        for key in ("fallback", "format"):
            if key in kwargs:
                kwargs[key] = kwargs[key].lower()
        secret = mapping.get("GEAROFFLOAD_SECRET_KEY") or fallback_secret
        if secret:
            kwargs["secret_key"] = secret.decode() if isinstance(secret, bytes) else str(secret)
        old = mapping.get("GEAROFFLOAD_OLD_SECRET_KEYS")
        if old:
            kwargs["old_secret_keys"] = tuple(
                k.strip() for k in (old.split(",") if isinstance(old, str) else old)
                if k and str(k).strip())
        for key, name in (("GEAROFFLOAD_EAGER", "eager"),
                          ("GEAROFFLOAD_ALLOW_UNSIGNED", "allow_unsigned")):
            if key in mapping:
                kwargs[name] = _flag(key, mapping[key])
        for name in ("ca", "cert", "key"):
            if mapping.get(f"GEAROFFLOAD_TLS_{name.upper()}"):
                kwargs[f"tls_{name}"] = str(mapping[f"GEAROFFLOAD_TLS_{name.upper()}"])
        return cls(**kwargs)


def _flag(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("", "0", "false", "no", "off"):
        return False
    raise ValueError(f"{key} must be true or false, not {value!r}")


# -- the request envelope ------------------------------------------------------------------

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
DEFAULT_MAX_BODY = 4 * _MB


class BodyTooLarge(ValueError):
    """The request body is larger than the configured limit."""


def encode_environ(environ: Mapping[str, Any]) -> dict[str, str]:
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


def build_environ(cgi: Mapping[str, str], body: bytes) -> dict[str, Any]:
    """A WSGI environ on the worker from ``encode_environ`` output and the body."""
    import io
    import sys

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


def request_payload(environ: Mapping[str, Any], body: bytes, **extra: Any) -> bytes:
    """A web request as job data: the environ's CGI keys and headers, the body, and the
    adapter's ``extra`` fields (the Flask view's carried ``g`` values...)."""
    return CODEC.dumps({"environ": encode_environ(environ), "body": body, **extra})


def request_from_payload(payload: bytes) -> tuple[dict[str, Any], dict[str, Any]]:
    """The worker's WSGI environ and the extra fields of a ``request_payload``."""
    data = CODEC.loads(payload)
    return build_environ(data.pop("environ"), data.pop("body")), data


def response_payload(status: int | str, headers: Iterable[tuple[str, str]],
                     body: bytes) -> bytes:
    """A response as a job result: status, headers (less hop-by-hop), body."""
    return CODEC.dumps({"status": status, "headers": response_headers(headers),
                        "body": body})


# -- the seal: signature with expiry, and the caller's deadline --------------------------

#: Every sealed job starts with one of these: signed, or unsigned (``allow_unsigned``).
_SIGNED, _UNSIGNED = b"GO1.", b"GO0."


NO_KEY = ("no secret key: set GEAROFFLOAD_SECRET_KEY (the same on the web side and the "
          "workers) so that jobs are signed, or GEAROFFLOAD_ALLOW_UNSIGNED=1 on a closed "
          "network")


class Seal:
    """Signs jobs (itsdangerous's HMAC-SHA256 ``Signer``, with key rotation) over a
    header that says when the job may first run and when its caller gives up, and checks
    them on the worker: forged, unsigned, expired and stale jobs are refused before
    anything runs. A job's age counts from when it may first run (its ``run_at``), so a
    job delayed by a week is not refused as old when it falls due.

    Example::

        seal = Seal("k")
        sealed = seal.close(b"payload", deadline=time.time() + 30)
        assert seal.open(sealed) == b"payload"
    """

    def __init__(self, secret_key: str | None, old_keys: Iterable[str] = (),
                 max_age: float = DEFAULT_SIGNATURE_MAX_AGE,
                 allow_unsigned: bool = False) -> None:
        self.max_age = max_age
        self.allow_unsigned = allow_unsigned
        self.signer = None
        if secret_key:
            from itsdangerous import Signer

            # itsdangerous signs with the last key and accepts any of them (rotation).
            self.signer = Signer([*old_keys, secret_key], salt="gearoffload.job",
                                 digest_method=hashlib.sha256)

    @property
    def usable(self) -> bool:
        """Whether jobs can be sealed here (a key, or unsigned jobs explicitly allowed)."""
        return self.signer is not None or self.allow_unsigned

    def close(self, payload: bytes, deadline: float | None = None,
              not_before: float | None = None) -> bytes:
        """Seal ``payload``; ``deadline``: when its caller gives up (Unix time);
        ``not_before``: when it may first run (a delayed job's ``run_at``)."""
        if not self.usable:
            raise ValueError(f"cannot send the job: {NO_KEY}")
        stamp = max(time.time(), not_before or 0.0)
        body = b"%.3f:%.3f:" % (stamp, deadline or 0.0) + payload
        if self.signer is None:
            return _UNSIGNED + body
        return _SIGNED + self.signer.sign(body)

    def open(self, sealed: bytes) -> bytes:
        """The payload; ``PayloadError`` (forged, unsigned, expired) or ``StaleJob``."""
        from itsdangerous import BadSignature

        head, body = sealed[:4], sealed[4:]
        if head == _SIGNED:
            if self.signer is None:
                raise PayloadError("refusing a signed job: this worker has no secret key "
                                   "(set the web side's GEAROFFLOAD_SECRET_KEY here too)")
            try:
                body = self.signer.unsign(body)
            except BadSignature:
                raise PayloadError("refusing a job with a bad signature (forged, or signed "
                                   "with a key this worker does not have)") from None
        elif head == _UNSIGNED:
            if not self.allow_unsigned:
                raise PayloadError(f"refusing an unsigned job: {NO_KEY}")
        else:
            raise PayloadError("refusing a job that is not a gearoffload job (no seal)")
        stamp, _, rest = body.partition(b":")
        limit, _, payload = rest.partition(b":")
        try:
            signed_at, deadline = float(stamp), float(limit)
        except ValueError:
            raise PayloadError("refusing a job with a malformed seal") from None
        now = time.time()
        if now - signed_at > self.max_age:
            raise PayloadError(f"refusing an expired job (due {now - signed_at:.0f} s ago, "
                               f"more than GEAROFFLOAD_SIGNATURE_MAX_AGE={self.max_age:g})")
        if deadline and now > deadline + CLOCK_SKEW:
            raise StaleJob(f"the caller gave up {now - deadline:.1f} s ago")
        return payload


def describe_job(data: bytes) -> dict[str, Any]:
    """What a gearoffload job's data says, for people (``gearoffload dead show``): its
    retry policy, whether it is signed (the signature is *not* checked here), when it was
    due, its caller's deadline, and its arguments when they decode (JSON or msgpack;
    otherwise ``payload`` holds the raw bytes). Never raises.

    Example::

        >>> seal = Seal("k")
        >>> info = describe_job(seal.close(Codec().dumps([[7], {}])))
        >>> info["signed"], info["arguments"]
        (True, [[7], {}])
    """
    info: dict[str, Any] = {"retry": None, "signed": None, "due": None, "deadline": None,
                            "arguments": None, "payload": data}
    policy = RetryPolicy.parse(data)
    if policy is not None:
        info["retry"] = policy._asdict()
    body = RetryPolicy.strip(data)
    head, body = body[:4], body[4:]
    if head not in (_SIGNED, _UNSIGNED):
        return info  # not a gearoffload job: only its bytes
    info["signed"] = head == _SIGNED
    if head == _SIGNED:
        body = body.rpartition(b".")[0]  # itsdangerous: value, ".", signature
    stamp, _, rest = body.partition(b":")
    limit, _, payload = rest.partition(b":")
    try:
        info["due"], info["deadline"] = float(stamp), float(limit) or None
    except ValueError:
        return info
    info["payload"] = payload
    try:
        info["arguments"] = CODEC.loads(payload)
    except Exception:  # pickle without its key, or not ours: the bytes say enough
        pass
    return info


# -- worker-side context ----------------------------------------------------------------

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


class TaskError(Exception):
    """Raised on the worker with the task's traceback as text: the worker sends that text
    (WORK_EXCEPTION), so the web side's log and exception show where it failed."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.job_text = text


class RemoteTraceback(Exception):
    """The worker's traceback, as the ``__cause__`` of the ``JobException`` raised on the
    web side (as ``concurrent.futures`` does), so that logs and error trackers show where
    the task failed."""

    def __str__(self) -> str:
        return "\n" + (self.args[0] if self.args else "")


def with_remote_traceback(exc: JobException) -> JobException:
    """``exc`` chained to its worker traceback (when the text carries one)."""
    if "Traceback (most recent call last)" in exc.text and exc.__cause__ is None:
        exc.__cause__ = RemoteTraceback(exc.text)
    return exc


def check_runtime() -> None:
    """Refuse, at start-up, a concurrency model the client cannot run under: it waits
    with gevent, which works in gevent-patched processes and in plain threads (each OS
    thread gets its own hub and client), but not beside eventlet's monkey-patching."""
    import sys

    eventlet = sys.modules.get("eventlet.patcher")
    if eventlet is not None and eventlet.is_monkey_patched("socket"):
        raise RuntimeError("gearoffload cannot run under eventlet (gunicorn -k eventlet): "
                           "use -k gevent, -k gthread or sync workers")


def traceback_text(exc: BaseException) -> str:
    """``Type: message`` followed by the traceback, as the web side shows it."""
    lines = traceback.format_exception(type(exc), exc, exc.__traceback__)
    return f"{type(exc).__name__}: {exc}\n\n" + "".join(lines)


# -- coalescing ---------------------------------------------------------------------------

#: Request headers that say who asks: a request with any of them is coalesced only with
#: requests that carry the same values, unless the response is declared public.
CREDENTIAL_HEADERS = ("HTTP_AUTHORIZATION", "HTTP_COOKIE", "HTTP_PROXY_AUTHORIZATION")


def unique_key(value: str | bytes) -> str | bytes:
    """A Gearman unique (≤ 64 bytes, no NUL) from a user's key: hashed when it does not fit."""
    raw = value.encode() if isinstance(value, str) else bytes(value)
    if len(raw) <= 64 and b"\0" not in raw and raw not in (b"", b"-"):
        return value
    return stable_hash(raw)


def filtered_query(query: str, ignore: Iterable[str]) -> str:
    """``query`` without the parameters whose names match a pattern of ``ignore``
    (``fnmatch``: ``"utm_*"``)."""
    patterns = tuple(ignore)
    if not patterns or not query:
        return query
    pairs = [(k, v) for k, v in parse_qsl(query, keep_blank_values=True)
             if not any(fnmatch.fnmatchcase(k, p) for p in patterns)]
    return urlencode(pairs)


def coalescing_key(environ: Mapping[str, Any], body: bytes, *, vary: Iterable[str] = (),
                   public: bool = False, ignore_query: Iterable[str] = (),
                   extra: Any = None) -> str:
    """The unique key of a web request: identical keys share one execution.

    It covers the method, path, query string (less ``ignore_query``), the body (every
    method that has one), the ``vary`` headers and ``extra``; and, unless ``public``,
    the request's credentials (``Authorization``, ``Cookie``): two users never share a
    response, which is the rule shared HTTP caches follow.

    Example::

        coalescing_key({"REQUEST_METHOD": "GET", "PATH_INFO": "/r"}, b"")
    """
    headers = ["HTTP_" + h.upper().replace("-", "_") for h in vary]
    who = None if public else [environ.get(h, "") for h in CREDENTIAL_HEADERS]
    return stable_hash(environ.get("REQUEST_METHOD", "GET").upper(),
                       environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", ""),
                       filtered_query(environ.get("QUERY_STRING", ""), ignore_query),
                       hashlib.sha256(body).hexdigest() if body else "",
                       [environ.get(h, "") for h in headers], who, extra)


class SingleFlight:
    """One run per key at a time in this process: callers of the same key while it runs
    wait for it and get its result (``fallback="local"`` keeps stampede protection).
    Waiters in the leader's thread wait cooperatively (greenlets); waiters in other OS
    threads (gthread workers) block their own thread only.

    Example::

        flights = SingleFlight()
        value = flights.run("key", expensive)
    """

    def __init__(self) -> None:
        self._lock = _real_lock()
        self._running: dict[Any, _Flight] = {}

    def run(self, key: Any, fn: Callable[[], Any]) -> Any:
        with self._lock:
            flight = self._running.get(key)
            leader = flight is None
            if leader:
                flight = self._running[key] = _Flight()
        if not leader:
            flight.wait()
            if flight.error is not None:
                raise flight.error
            return flight.value
        try:
            flight.value = fn()
            return flight.value
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            with self._lock:
                del self._running[key]
            flight.finish()


_real_lock = monkey.get_original("threading", "Lock")
_real_event = monkey.get_original("threading", "Event")
_real_ident = monkey.get_original("threading", "get_ident")


class _Flight:
    __slots__ = ("thread", "green", "threads", "value", "error")

    def __init__(self) -> None:
        from gevent.event import Event

        self.thread = _real_ident()
        self.green = Event()          # waiters in the leader's thread (its hub)
        self.threads = _real_event()  # waiters in other OS threads
        self.value: Any = None
        self.error: BaseException | None = None

    def wait(self) -> None:
        if _real_ident() == self.thread:
            self.green.wait()
        else:
            self.threads.wait()

    def finish(self) -> None:
        self.green.set()
        self.threads.set()


# -- errors → HTTP --------------------------------------------------------------------------

class HttpError(NamedTuple):
    """What a web adapter answers for an exception: status, title and message."""

    status: int
    title: str
    message: str
    retry_after: int | None = None


def http_error(exc: BaseException) -> HttpError:
    """The one mapping from what went wrong to an HTTP answer.

    Example::

        http_error(JobTimeout("no answer"))    # HttpError(504, "Gateway Timeout", ...)
    """
    from .admin import ResultsUnsupported

    if isinstance(exc, ResultsUnsupported):
        return HttpError(501, "Not Implemented",
                         "The job server keeps no results of background jobs (gearmand?): "
                         "set GEAROFFLOAD_RESULTS to a redis:// URL.")
    if isinstance(exc, NoWorkers):  # the function, not the servers' addresses
        return HttpError(503, "Service Unavailable",
                         f"No worker serves {exc.function!r} right now; try again shortly.", 5)
    if isinstance(exc, JobLost):
        return HttpError(503, "Service Unavailable",
                         "The job server went away while handling this request; try again.",
                         5)
    if isinstance(exc, NoServersAvailable):
        return HttpError(503, "Service Unavailable",
                         "No job server is reachable; try again shortly.", 5)
    if isinstance(exc, JobTimeout):
        return HttpError(504, "Gateway Timeout", "The worker did not answer in time.")
    if isinstance(exc, JobException):
        return HttpError(500, "Internal Server Error", "Internal Server Error")
    if isinstance(exc, JobNotFound):
        return HttpError(404, "Not Found", str(exc) or "Unknown job id.")
    if isinstance(exc, JobExpired):
        return HttpError(410, "Gone", str(exc) or "The job's result has expired.")
    if isinstance(exc, PayloadError):
        return HttpError(404, "Not Found", "Unknown job id.")
    if isinstance(exc, JobFailed):
        return HttpError(502, "Bad Gateway", "The worker failed.")
    return HttpError(500, "Internal Server Error", "Internal Server Error")


# -- background job ids ---------------------------------------------------------------------

class JobRef(NamedTuple):
    """A background job as its id names it: Gearman function and unique, the owner the
    app recorded (or None), and when it was submitted (Unix time)."""

    function: str
    unique: str
    owner: str | None
    created: float


# -- the offloader ---------------------------------------------------------------------------

_thread_local = monkey.get_original("threading", "local")


#: The priorities of a job (Gearman's three queues per function).
PRIORITIES = ("normal", "high", "low")


def check_call_options(timeout: Any, fallback: Any, priority: Any = "normal") -> float | None:
    """Validate the per-call options of ``@offload`` and of views when they are declared
    (``TypeError`` for a wrong type, ``ValueError`` for a bad value); returns the timeout
    in seconds (a ``timedelta`` is accepted, as for every duration).

    Example::

        >>> check_call_options(30, None, "high")
        30.0
    """
    from .checks import duration

    if fallback is not None and fallback not in FALLBACKS:
        raise ValueError(f"fallback= must be 'raise' or 'local', not {fallback!r}")
    if not isinstance(priority, str):
        raise TypeError(f"priority= must be 'normal', 'high' or 'low', not "
                        f"{type(priority).__name__} {priority!r}")
    if priority not in PRIORITIES:
        raise ValueError(f"priority= must be 'normal', 'high' or 'low', not {priority!r}")
    if timeout is None:
        return None
    return duration("timeout", timeout, exclusive=True, unit=" (None: GEAROFFLOAD_TIMEOUT)")


class Offloader:
    """One configuration's clients, seal, background jobs and outcomes.

    ``registry`` (a ``TaskRegistry``) is what eager mode runs in-process. ``results``
    overrides the backend named by ``config.results``.

    Example::

        offloader = Offloader(OffloadConfig(secret_key="k"))
        value = offloader.call("upper", offloader.seal.close(b"hi"), timeout=5)
    """

    def __init__(self, config: OffloadConfig, registry: Any = None,
                 results: ResultBackend | None = None) -> None:
        self.config = config
        self.registry = registry
        self.seal = Seal(config.secret_key, config.old_secret_keys, config.signature_max_age,
                         config.allow_unsigned)
        self._local = _thread_local()
        if results is None:
            if config.eager:
                results = MemoryResults(config.result_ttl)
            else:
                results = open_results(config.results, list(config.servers),
                                       config.result_ttl, config.tls, self._status_unique)
        self.results = results
        self._eager_handles = itertools.count(1)
        self._ids = None
        if config.secret_key:
            from itsdangerous import URLSafeTimedSerializer

            self._ids = URLSafeTimedSerializer([*config.old_secret_keys, config.secret_key],
                                               salt="gearoffload.job-id")

    # clients

    @property
    def client(self) -> Any:
        """This OS thread's ``Client`` (one per thread: a gevent hub is per thread)."""
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = self.config.make_client()
        return client

    def close(self) -> None:
        """Close this thread's client."""
        client = getattr(self._local, "client", None)
        if client is not None:
            client.close()
            self._local.client = None

    # foreground

    def check_workers(self, function: str) -> None:
        """Raise ``NoWorkers`` when every job server says that nobody serves
        ``function`` (``Client.workers_for``: cached, off the per-job path; unknown
        counts as served)."""
        if self.client.workers_for(function) == 0:
            raise NoWorkers(function, list(self.config.servers))

    def call(self, function: str, payload: bytes, *, unique: str | bytes | None = None,
             priority: str = "normal", timeout: float | None = None) -> bytes:
        """Run a foreground job and return its result bytes. ``payload`` is sealed here
        with the deadline ``timeout`` sets, so that a worker never starts it after its
        caller has given up.

        Raises ``NoWorkers``, ``NoServersAvailable``, ``JobTimeout``, ``JobException``
        (with the worker's traceback text) or ``JobFailed``.
        """
        if timeout is None:
            timeout = self.config.timeout
        deadline = time.time() + timeout if timeout else None
        sealed = self.seal.close(payload, deadline)
        if self.config.eager:
            return self._run_here(function, sealed, unique)
        self.check_workers(function)
        job = self.client.submit(function, sealed, unique=unique, priority=priority,
                                 wait=False)
        return job.result(timeout=timeout)

    # background

    def start(self, function: str, payload: bytes, *, unique: str | None = None,
              priority: str = "normal", owner: str | None = None,
              run_at: float | None = None, retry: RetryPolicy | None = None,
              once: bool = False) -> JobRef:
        """Submit a background job (``SUBMIT_JOB_BG``) and return its ``JobRef`` once the
        server has acknowledged it. ``unique`` coalesces it with identical background
        jobs; by default each job gets a random one. ``retry``: how the job server runs
        it again when it fails (``gearoffload.retry``; not in eager mode, which runs it
        once). ``once=True`` (with a ``unique``): our job server does not run it again
        while it keeps the result of an earlier run (a periodic task's slot,
        ``gearoffload.schedule``)."""
        # The prefix tells the worker that the job is a background one (it records the
        # outcome where the backend wants it) and "once:" asks the server's run-once rule
        # (docs/protocol.md); the rest is a random token or the coalescing key.
        if once and not unique:
            raise ValueError("once=True needs a unique key")
        unique = ("once:" if once else "bg-") + (
            stable_hash(unique) if unique else secrets.token_urlsafe(24))
        ref = JobRef(function, unique, owner, time.time())
        sealed = self.seal.close(payload, not_before=run_at)
        if self.config.eager:
            self._run_background_here(function, sealed, unique)
            return ref
        # No "does a worker serve it?" here: the server keeps a background job durably
        # until a worker comes (deploy order, a worker restart), so accepting it is right.
        if retry is not None:
            sealed = retry.wrap(sealed)
        self.client.submit(function, sealed, unique=unique, priority=priority,
                           background=True, run_at=run_at)
        return ref

    def outcome(self, ref: JobRef) -> Outcome:
        """What became of a background job; ``JobExpired`` when its outcome is gone."""
        outcome = self.results.read(ref.unique)
        if outcome.state == "unknown" and time.time() - ref.created > self.config.result_ttl:
            raise JobExpired(f"the job's outcome was kept for {self.config.result_ttl:g} s "
                             "and has expired")
        return outcome

    def job_id(self, ref: JobRef) -> str:
        """An id for URLs that cannot be guessed or forged (signed, timestamped)."""
        if self._ids is None:
            raise ValueError("background jobs need GEAROFFLOAD_SECRET_KEY (or the app's "
                             "SECRET_KEY): their ids are signed with it")
        return self._ids.dumps([ref.function, ref.unique, ref.owner])

    def read_id(self, job_id: str) -> JobRef:
        """The ``JobRef`` an id names; ``JobNotFound`` for a forged or garbage id."""
        from itsdangerous import BadData

        if self._ids is None or not isinstance(job_id, str) or len(job_id) > 1024:
            raise JobNotFound("Unknown job id.")
        try:
            (function, unique, owner), created = self._ids.loads(job_id, return_timestamp=True)
        except (BadData, ValueError, TypeError):
            raise JobNotFound("Unknown job id.") from None
        return JobRef(function, unique, owner, created.timestamp())

    def _status_unique(self, unique: str) -> tuple[bool, bool, int, int]:
        status = self.client.status_unique(unique)
        return status.known, status.running, status.numerator, status.denominator

    # eager mode: everything here, now

    def _task(self, function: str) -> Callable[[Any], Any]:
        entry = self.registry.get(function) if self.registry is not None else None
        if entry is None:
            raise NoWorkers(function)
        return entry.fn

    def _run_here(self, function: str, sealed: bytes, unique: Any) -> bytes:
        job = EagerJob(function, sealed, str(unique or ""), next(self._eager_handles))
        try:
            result = self._task(function)(job)
        except JobFailed:
            raise
        except Exception as exc:
            text = getattr(exc, "job_text", None) or f"{type(exc).__name__}: {exc}"
            raise JobException(text, job.handle) from exc
        return result.encode() if isinstance(result, str) else bytes(result or b"")

    def _run_background_here(self, function: str, sealed: bytes, unique: str) -> None:
        try:
            data = self._run_here(function, sealed, unique)
        except JobException as exc:
            self.results.write(unique, Outcome("failed", data=exc.text.encode()))
        except JobFailed as exc:
            self.results.write(unique, Outcome("failed", data=str(exc).encode()))
        else:
            self.results.write(unique, Outcome("done", data=data))

    # worker side

    def open_job(self, job: Any) -> bytes:
        """The payload of a job this worker was handed, or ``JobFailed`` (logged with the
        handle) for a forged, unsigned, expired or stale one: it never runs."""
        try:
            return self.seal.open(RetryPolicy.strip(job.data))
        except StaleJob as exc:
            log.warning("job %s of %s not run: %s", job.handle, job.function, exc)
            raise
        except PayloadError as exc:
            log.error("job %s of %s refused: %s", job.handle, job.function, exc)
            raise JobFailed(str(exc), job.handle) from None

    def record(self, job: Any, outcome: Outcome) -> None:
        """On the worker: write a background job's outcome when the backend wants it
        written (Redis); our job server keeps it by itself."""
        if self.results.writes_results and job.unique and outcome.state in ENDED:
            try:
                self.results.write(job.unique, outcome)
            except Exception:
                log.exception("job %s: could not write its outcome to %s", job.handle,
                              self.config.results)


class EagerJob:
    """The job an eagerly run task receives (``WorkerJob``'s interface, in-process)."""

    def __init__(self, function: str, data: bytes, unique: str, number: int) -> None:
        self.function = function
        self.data = data
        self.unique = unique
        self.handle = f"eager:{number}"
        self.server = "eager"
        self.status = (0, 0)

    def send_status(self, numerator: int, denominator: int) -> None:
        self.status = (int(numerator), int(denominator))

    def send_data(self, data: bytes | str) -> None:
        pass

    def send_warning(self, data: bytes | str) -> None:
        pass


#: Uniques of the background jobs the offload layer submits (``Offloader.start``).
BACKGROUND_PREFIXES = ("bg-", "once:")


def is_background(unique: str) -> bool:
    """Whether a job's unique says it is a background job of the offload layer."""
    return unique.startswith(BACKGROUND_PREFIXES)


def run_task(offloader: Offloader, job: Any, body: Callable[[bytes], bytes],
             background: bool) -> bytes:
    """The worker side of every offloaded task: open the seal, run ``body(payload)`` as
    the current job, turn an exception into its traceback text, and record a background
    outcome where the backend needs it."""
    try:
        payload = offloader.open_job(job)
    except JobFailed as exc:
        if background:  # the kept outcome says why: TaskError sends its text
            raise TaskError(f"{type(exc).__name__}: {exc}") from exc
        raise
    try:
        result = run_as_task(job, lambda: body(payload))
    except JobFailed as exc:
        if background:
            offloader.record(job, Outcome("failed", data=str(exc).encode()))
        raise
    except Exception as exc:
        text = traceback_text(exc)
        if background:
            offloader.record(job, Outcome("failed", data=text.encode()))
        raise TaskError(text) from exc
    if background:
        offloader.record(job, Outcome("done", data=result))
    return result


def outcome_fields(outcome: Outcome, traceback: bool = False) -> dict[str, Any]:
    """The JSON fields every status answer shares; the worker's ``traceback`` only when
    asked (it shows code paths: for a debug app, not for every user)."""
    body: dict[str, Any] = {"state": outcome.state,
                            "progress": {"numerator": outcome.numerator,
                                         "denominator": outcome.denominator}}
    if outcome.state in ("failed", "dead"):
        text = (outcome.data or b"").decode("utf-8", "replace")
        first = text.split("\n", 1)[0]
        if traceback:  # messages can carry what users must not see: debug apps only
            body["error"] = first or "the job failed"
            body["traceback"] = text
        else:
            kind = first.split(":", 1)[0] if ":" in first else ""
            body["error"] = f"the job failed ({kind})" if kind.isidentifier() else \
                "the job failed"
    if outcome.too_large:
        body["error"] = (f"the result ({outcome.too_large} bytes) was larger than the "
                         "result backend keeps")
    return body


# -- the offloader in use ----------------------------------------------------------------

_default: Offloader | None = None
#: The offloader of the Flask app (or other scope) whose context this code runs in.
_active: contextvars.ContextVar[Offloader | None] = contextvars.ContextVar(
    "gearoffload_offloader", default=None)


def offloader_in_use(registry: Any = None) -> Offloader:
    """The current app's offloader (``using``), else the process default, made from the
    environment at first use (eager mode then runs ``registry``'s tasks)."""
    offloader = _active.get()
    if offloader is not None:
        return offloader
    global _default
    if _default is None:
        import os

        _default = Offloader(OffloadConfig.from_mapping(os.environ), registry=registry)
    return _default


def using(offloader: Offloader | None) -> contextvars.Token:
    """Make ``offloader`` the one in use in this context (the Flask extension does it for
    its app, a worker pool for the app it serves); returns the token to reset."""
    return _active.set(offloader)


def set_default(offloader: Offloader | None) -> None:
    """Replace the process default (a worker pool serving one app uses the app's)."""
    global _default
    if _default is not None and _default is not offloader:
        _default.close()
    _default = offloader


def configure_default(registry: Any = None, **settings: Any) -> OffloadConfig:
    """A new process default from the current one with ``settings`` changed."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(OffloadConfig)}
    unknown = set(settings) - names
    if unknown:
        raise TypeError(f"configure() got unknown settings {sorted(unknown)}; "
                        f"known: {sorted(names)}")
    config = dataclasses.replace(offloader_in_use(registry).config, **settings)
    set_default(Offloader(config, registry=registry))
    return config


def configure_reset() -> None:
    """Forget the process default: the next use reads the environment again (tests)."""
    set_default(None)
