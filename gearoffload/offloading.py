"""``@offload``: run a plain function on a Gearman worker, as if it were called here.

Example (``myapp/tasks.py``)::

    from gearoffload import offload

    @offload(unique=True, timeout=30)           # or just @offload
    def render_report(month):
        ...
        return {"month": month, "rows": 1234}

    render_report("2026-11")                    # runs on a worker, waits, returns the value
    job = render_report.background("2026-11")   # a Gearman background job: job.id at once
    job.outcome().state                         # "queued", "running", "done"... from any process
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
  submission time (default ``"raise"``: ``NoServersAvailable``), one run per unique key at a
  time in this process. A job that was accepted and then lost is never re-run locally (it
  may have run on a worker already).
- ``background()`` submits a Gearman background job: it survives this process exiting, and
  its outcome is read through the result backend (``GEAROFFLOAD_RESULTS``) from any process.
- ``every=`` or ``cron=`` (with ``tz=``, ``missed=``) make a periodic task, run once per
  slot across the fleet by any number of schedulers (``gearoffload.schedule``).
- With ``GEAROFFLOAD_SECRET_KEY`` every job is signed and expires; workers refuse forged,
  unsigned and expired jobs, and jobs whose caller has given up (its timeout passed).
- A worker exception reaches the caller as ``JobException`` whose ``text`` is
  ``"TypeName: message"`` followed by the worker's traceback.

Where the settings come from: inside a Flask app context, the app's ``GearOffload``;
elsewhere a module-level default, configured once by
``gearoffload.configure(servers=..., timeout=..., fallback=..., secret_key=...,
format=...)`` or, if ``configure`` is never called, by the environment
(``GEAROFFLOAD_SERVERS`` — default ``127.0.0.1:4730`` —, ``GEAROFFLOAD_TIMEOUT``,
``GEAROFFLOAD_FALLBACK``, ``GEAROFFLOAD_SECRET_KEY``, ``GEAROFFLOAD_FORMAT``,
``GEAROFFLOAD_RESULTS``, ``GEAROFFLOAD_EAGER``; see ``gearoffload.core.OffloadConfig``). One
``Client`` is made per OS thread, lazily, at the first call.

(This module is ``gearoffload.offloading``, not ``gearoffload.offload``: a submodule of that
name would replace the ``gearoffload.offload`` decorator on the package once imported.)
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from datetime import date, datetime, timedelta, timezone
from typing import Any

from .checks import duration
from .codec import Codec, stable_hash
from .core import (
    JobRef,
    OffloadConfig,
    Offloader,
    SingleFlight,
    check_call_options,
    configure_default,
    configure_reset,
    current_job,
    is_background,
    offloader_in_use,
    progress,
    run_as_task,
    run_task,
    unique_key,
    using,
)
from .errors import NoServersAvailable
from .registry import TaskRegistry
from .registry import registry as default_registry
from .results import Outcome
from .retry import retry_policy

__all__ = ["OffloadConfig", "OffloadedFunction", "OffloadedJob", "configure",
           "configure_reset", "current_job", "get_client", "get_config", "get_offloader",
           "offload", "progress", "run_as_task", "using"]

log = logging.getLogger("gearoffload.offloading")


# -- settings: the offloader in use (gearoffload.core) ---------------------------------------

def configure(**settings: Any) -> OffloadConfig:
    """Set the default settings of ``@offload`` outside any app (and drop clients made
    with the old ones). Keys are ``OffloadConfig``'s fields (``servers``, ``timeout``,
    ``fallback``, ``secret_key``, ``format``, ``results``, ``eager``, ...); keys not
    given keep their current value.

    Example::

        import gearoffload
        gearoffload.configure(servers="10.0.0.5:4730,10.0.0.6:4730", timeout=30)
    """
    return configure_default(default_registry, **settings)


def get_offloader() -> Offloader:
    """The offloader in use here: the current app's, else the process default (made from
    the environment at first use)."""
    return offloader_in_use(default_registry)


def get_config() -> OffloadConfig:
    """The settings in use here (see ``get_offloader``)."""
    return get_offloader().config


def get_client() -> Any:
    """This thread's ``Client`` of the offloader in use."""
    return get_offloader().client


# -- @offload -----------------------------------------------------------------------------

class OffloadedJob:
    """A background job of an offloaded function: ``id`` names it in every process;
    ``outcome()`` says what became of it; ``result()`` waits for the value.

    Example::

        job = render_report.background("2026-11")
        ...
        report = job.result(timeout=60)
    """

    __slots__ = ("ref", "offloader", "codec")

    def __init__(self, ref: JobRef, offloader: Offloader, codec: Codec) -> None:
        self.ref = ref
        self.offloader = offloader
        self.codec = codec

    def __repr__(self) -> str:
        return f"<OffloadedJob {self.ref.function} {self.ref.unique}>"

    @property
    def id(self) -> str:
        """The job's unique key on the job server: what ``OffloadedFunction.job(id)``
        takes back, and what the admin command ``find job`` (``AdminClient.find_job``)
        looks up in the server's history."""
        return self.ref.unique

    def outcome(self) -> Outcome:
        """The job's state, progress and result or error, from the result backend."""
        return self.offloader.outcome(self.ref)

    def result(self, timeout: float | None = None, poll: float = 0.2) -> Any:
        """Wait for the job to end and return the function's value; ``JobException`` (with
        the worker's traceback) when it failed, ``JobTimeout`` after ``timeout``."""
        import time

        from .errors import JobException, JobTimeout

        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            outcome = self.outcome()
            if outcome.state == "done":
                if outcome.too_large:
                    raise JobException(f"the result ({outcome.too_large} bytes) was larger "
                                       "than the result backend keeps")
                return self.codec.loads(outcome.data or b"")
            if outcome.state in ("failed", "dead"):
                raise JobException((outcome.data or b"").decode("utf-8", "replace"))
            if deadline is not None and time.monotonic() >= deadline:
                raise JobTimeout(f"job {self.id} is still {outcome.state} after {timeout}s")
            _sleep(poll)


def _sleep(seconds: float) -> None:
    """Sleep cooperatively under gevent, plainly elsewhere."""
    import gevent

    gevent.sleep(seconds)


class OffloadedFunction:
    """A function whose calls run on Gearman workers; made by ``@offload``.

    Calling it submits a job and waits for the value; ``background()`` submits a Gearman
    background job and returns an ``OffloadedJob`` at once; ``local()`` calls the
    function here. ``name`` is its Gearman function name; ``schedule`` its
    ``gearoffload.periodic.Schedule`` when it is periodic, else None.
    """

    def __init__(self, fn: Callable[..., Any], name: str | None = None,
                 unique: bool | Callable[..., str | bytes] = False,
                 timeout: float | None = None, fallback: str | None = None,
                 priority: str = "normal", registry: TaskRegistry | None = None,
                 retries: int = 0, backoff: float | timedelta | None = None,
                 backoff_max: float | timedelta | None = None, jitter: bool | None = None,
                 every: float | timedelta | None = None, cron: str | None = None,
                 tz: str | None = None, missed: str = "last") -> None:
        if not callable(fn):
            raise TypeError(f"@offload decorates a function, not {type(fn).__name__} {fn!r}")
        if name is not None and (not isinstance(name, str) or not name):
            raise TypeError(f"name= must be a non-empty str, not {name!r}")
        if not (isinstance(unique, bool) or callable(unique)):
            raise TypeError(f"unique= must be True, False or a callable that returns the "
                            f"key, not {type(unique).__name__} {unique!r}")
        timeout = check_call_options(timeout, fallback, priority)
        self.retry = retry_policy(retries, backoff, backoff_max, jitter)
        self.schedule = _schedule(fn, every, cron, tz, missed, unique)
        self.fn = fn
        self.name = name or f"{fn.__module__}.{fn.__qualname__}"
        self.unique = unique
        self.timeout = timeout
        self.fallback = fallback
        self.priority = priority
        self._flights = SingleFlight()
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

    def background(self, *args: Any, delay: float | timedelta | None = None,
                   at: datetime | None = None, **kwargs: Any) -> OffloadedJob:
        """Submit the call as a Gearman background job and return an ``OffloadedJob`` once
        the server has it (it then survives this process). ``delay`` (seconds, or a
        ``timedelta``; finite, >= 0) or ``at`` (an aware ``datetime``) run it later; a
        delayed job runs at normal priority (Gearman's ``SUBMIT_JOB_EPOCH`` has no other).
        No local fallback.

        Example::

            job = render_report.background("2026-11", delay=timedelta(minutes=5))
            job = render_report.background("2026-12", at=datetime(2026, 12, 1, 3,
                                                                  tzinfo=timezone.utc))
        """
        run_at = _run_at(delay, at)
        if run_at is not None and self.priority != "normal":
            raise ValueError(f"{self.name} has priority={self.priority!r}: a delayed job "
                             "(delay= or at=) always runs at normal priority (Gearman's "
                             "SUBMIT_JOB_EPOCH has no other)")
        offloader = get_offloader()
        unique = self.unique_for(args, kwargs)
        ref = offloader.start(self.name, offloader.config.codec.dumps([list(args), kwargs]),
                              unique=str(unique) if unique else None, priority=self.priority,
                              run_at=run_at, retry=self.retry)
        return OffloadedJob(ref, offloader, offloader.config.codec)

    def job(self, job_id: str) -> OffloadedJob:
        """The background job ``job_id`` (an ``OffloadedJob.id``) names, from any process."""
        offloader = get_offloader()
        import time

        return OffloadedJob(JobRef(self.name, job_id, None, time.time()), offloader,
                            offloader.config.codec)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        offloader = get_offloader()
        config = offloader.config
        timeout = self.timeout if self.timeout is not None else config.timeout
        unique = self.unique_for(args, kwargs)
        try:
            raw = offloader.call(self.name, config.codec.dumps([list(args), kwargs]),
                                 unique=unique, priority=self.priority, timeout=timeout)
        except NoServersAvailable as exc:  # no server took the call (one that did: JobFailed)
            if (self.fallback or config.fallback) != "local":
                raise
            log.warning("%s: no job server reachable (%s); running locally", self.name, exc)
            if unique is None:
                return self.fn(*args, **kwargs)
            return self._flights.run(unique, lambda: self.fn(*args, **kwargs))
        return config.codec.loads(raw)

    def local(self, *args: Any, **kwargs: Any) -> Any:
        """Call the function in this process."""
        return self.fn(*args, **kwargs)

    def run_job(self, job: Any) -> bytes:
        """The worker side: open the seal, decode the arguments, call the function, encode
        its value."""
        offloader = get_offloader()
        codec = offloader.config.codec

        def body(payload: bytes) -> bytes:
            args, kwargs = codec.loads(payload)[:2]
            return codec.dumps(self.fn(*args, **kwargs))

        return run_task(offloader, job, body, background=is_background(job.unique))


def _schedule(fn: Callable[..., Any], every: float | timedelta | None, cron: str | None,
              tz: str | None, missed: str, unique: Any) -> Any:
    """The ``Schedule`` of a periodic function (``gearoffload.periodic``), or None."""
    if every is None and cron is None:
        if tz is not None or missed != "last":
            raise TypeError("tz= and missed= are for periodic tasks: add every= or cron=")
        return None
    import inspect

    from .periodic import Schedule

    name = getattr(fn, "__qualname__", repr(fn))
    if unique:
        raise TypeError(f"{name}: unique= does not apply to a periodic task (each slot has "
                        "its own unique key)")
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        params = []
    needed = [p.name for p in params if p.default is p.empty
              and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if needed:
        raise TypeError(f"{name}: a periodic task is called with no arguments, but it needs "
                        f"{', '.join(needed)}")
    return Schedule(every=every, cron=cron, tz=tz, missed=missed)


#: The latest a delayed job may be due: the end of the year 9999, the last time a
#: ``datetime`` (so ``at=``) can name. The job server takes any 64-bit epoch.
MAX_DUE = datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone.utc).timestamp()


def _run_at(delay: Any, at: Any) -> float | None:
    """The Unix time a delayed job is due, from ``delay`` (seconds or a ``timedelta``:
    finite, >= 0) or ``at`` (an aware ``datetime``); ``TypeError``/``ValueError`` naming
    the argument otherwise."""
    import time

    if delay is not None and at is not None:
        raise TypeError("give delay= or at=, not both")
    if at is not None:
        if not isinstance(at, datetime):
            raise TypeError(f"at= must be an aware datetime, not {type(at).__name__} "
                            f"{at!r}{_at_hint(at)}")
        if at.tzinfo is None or at.utcoffset() is None:
            raise ValueError("at= must be an aware datetime (say its timezone, e.g. "
                             "datetime(..., tzinfo=timezone.utc)); a naive one is ambiguous")
        return at.timestamp()
    if delay is not None:
        now = time.time()
        seconds = duration("delay", delay)
        if now + seconds > MAX_DUE:
            raise ValueError(f"delay= must be at most {MAX_DUE - now:.0f} seconds (due by "
                             f"the end of the year 9999), not {delay!r}; for a point in "
                             "time, use at=")
        return now + seconds
    return None


def _at_hint(at: Any) -> str:
    """What to write instead of a value that is not a ``datetime``."""
    import numbers

    if isinstance(at, str):
        return " (parse it: datetime.fromisoformat(text), with its timezone)"
    if isinstance(at, date):
        return " (a date has no time of day: datetime(y, m, d, tzinfo=timezone.utc))"
    if isinstance(at, numbers.Real) and not isinstance(at, bool):
        return (" (a Unix time is datetime.fromtimestamp(t, timezone.utc); for seconds "
                "from now, use delay=)")
    return ""


def offload(fn: Callable[..., Any] | None = None, *, name: str | None = None,
            unique: bool | Callable[..., str | bytes] = False, timeout: float | None = None,
            fallback: str | None = None, priority: str = "normal",
            registry: TaskRegistry | None = None, retries: int = 0,
            backoff: float | timedelta | None = None,
            backoff_max: float | timedelta | None = None, jitter: bool | None = None,
            every: float | timedelta | None = None, cron: str | None = None,
            tz: str | None = None, missed: str = "last") -> Any:
    """Decorator: ``@offload`` or ``@offload(name=..., unique=..., timeout=...,
    fallback=..., priority=..., retries=..., every=...)``; see the module docstring.

    Every setting is checked here, when the decorator runs: ``TypeError`` for a wrong
    type (``priority=1``, ``jitter="no"``, ``every="10"``), ``ValueError`` for a bad value
    (``priority="urgent"``, ``backoff_max`` below ``backoff``). Durations (``timeout``,
    ``backoff``, ``backoff_max``, ``every``) are seconds or a ``timedelta``.

    ``retries``: how often our job server runs a failed *background* job again (a direct
    call reports the failure to its caller at once), waiting ``backoff`` seconds (default
    1) doubled per retry, at most ``backoff_max`` (default 300), a random part of it with
    ``jitter`` (default True); then the job is a dead letter (``gearoffload dead``).
    ``backoff``, ``backoff_max`` and ``jitter`` need ``retries``. With ``retries=0``
    (the default) a failing background job ends ``failed``. gearmand ignores the policy.

    ``every`` (a ``timedelta`` or seconds, at least 1 second) or ``cron`` (five fields,
    or an alias such as ``"@daily"``; with ``tz``, an IANA name; UTC when not given;
    needs ``croniter``) makes a periodic task of a function that takes no
    arguments: schedulers (``gearoffload-worker --schedule``, ``python -m
    gearoffload.schedule``) run it once per slot across the fleet; ``missed`` (``"last"``,
    ``"all"`` or ``"none"``) says what runs of the slots missed during an outage
    (``gearoffload.periodic``).

    Example::

        @offload(unique=True)
        def thumbnail(image: bytes, width: int) -> bytes:
            ...

        @offload(retries=5, backoff=2, backoff_max=600)
        def charge(order_id: int) -> None:
            ...                                  # charge.background(42)

        @offload(cron="*/5 * * * *", tz="Europe/Paris", missed="none")
        def refresh_rates() -> None:
            ...
    """
    def decorate(func: Callable[..., Any]) -> OffloadedFunction:
        return OffloadedFunction(func, name=name, unique=unique, timeout=timeout,
                                 fallback=fallback, priority=priority, registry=registry,
                                 retries=retries, backoff=backoff, backoff_max=backoff_max,
                                 jitter=jitter, every=every, cron=cron, tz=tz, missed=missed)

    return decorate(fn) if fn is not None else decorate

