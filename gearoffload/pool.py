"""``gearoffload-worker``: serve a module's tasks with N processes × M greenlets.

::

    gearoffload-worker myapp.tasks --servers 127.0.0.1:4730,127.0.0.1:4731 \\
        --processes 4 --concurrency 20

With ``--tls-ca`` (and ``--tls-cert``/``--tls-key`` for mutual TLS), or the variables
``GEAROFFLOAD_TLS_CA/CERT/KEY``, the workers connect with TLS (docs/tls.md).

The module (or ``module:attr``) is imported once in the parent, then N children are forked,
each running a ``Worker`` with M greenlets. A child that dies is restarted with back-off
(and logged). On SIGTERM (or SIGINT) the pool drains: every child stops grabbing, finishes
its running jobs and exits; then the parent exits. A second signal, or ``--drain-timeout``,
kills what is left (the servers requeue those jobs).

Where the tasks come from:

- ``module:attr`` — ``attr`` is a ``Worker`` (its tasks are served; its servers and
  concurrency are replaced by the command line) or a ``TaskRegistry``;
- ``module`` — the module's ``Worker`` or ``TaskRegistry`` if it has exactly one, else the
  default registry filled by ``@gearoffload.task``;
- ``module:attr`` naming anything else (a Flask app with ``GearOffload``) — its offloaded
  views and the ``@offload`` functions (``gearoffload.offloading.registry_for``);
- ``--wsgi module:app`` — also serve ``app`` as a WSGI app for ``OffloadMiddleware``.

Processes are for CPU-bound tasks (one core each); greenlets for I/O-bound ones.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .logfmt import LOG_FORMATS, make_formatter

if TYPE_CHECKING:  # imported lazily at run time: main() must monkey-patch first
    from .registry import TaskRegistry

__all__ = ["PoolConfig", "load_registry", "main", "parse_args", "run_pool"]

log = logging.getLogger("gearoffload.pool")

_RESTART_DELAY_START = 0.5
_RESTART_DELAY_MAX = 30.0
#: A child that ran this long is considered healthy: its restart delay starts over.
_HEALTHY_AFTER = 30.0


@dataclass(frozen=True)
class PoolConfig:
    """The pool's settings, validated once at the edge (the command line)."""

    target: str
    servers: tuple[str, ...]
    processes: int
    concurrency: int
    drain_timeout: float | None = 60.0
    client_id: str | None = None
    log_level: str = "INFO"
    log_format: str = "text"  # gearoffload.logfmt: text or json
    wsgi_function: str | None = None  # --wsgi: serve the target for OffloadMiddleware
    #: PEM files for TLS to the servers (``gearoffload.tls_context``); all None: plain TCP.
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None

    @property
    def tls(self) -> dict | None:
        """The workers' ``tls`` argument."""
        from .tls import tls_files

        return tls_files(self.tls_ca, self.tls_cert, self.tls_key)

    def __post_init__(self) -> None:
        if self.processes < 1:
            raise ValueError("--processes must be at least 1")
        if self.concurrency < 1:
            raise ValueError("--concurrency must be at least 1")
        if not self.servers:
            raise ValueError("--servers needs at least one host:port")
        if self.drain_timeout is not None and self.drain_timeout <= 0:
            raise ValueError("--drain-timeout must be positive")
        if self.log_format not in LOG_FORMATS:
            raise ValueError(f"--log-format must be one of {', '.join(LOG_FORMATS)}")
        if self.tls_key and not self.tls_cert:
            raise ValueError("--tls-key needs --tls-cert")
        if self.tls is not None:
            from .tls import client_context, tls_error_text

            try:  # once here, so that a bad file is one line at start, not N restarts
                client_context(self.tls)
            except OSError as exc:  # ssl.SSLError too
                raise ValueError(f"cannot load the TLS files: {tls_error_text(exc)}") from None


def parse_args(argv: list[str] | None = None) -> PoolConfig:
    parser = argparse.ArgumentParser(
        prog="gearoffload-worker",
        description="Serve the tasks of a Python module with N processes x M greenlets.")
    parser.add_argument("target", help="module to import (myapp.tasks) or module:attr, "
                        "attr being a Worker or a TaskRegistry")
    parser.add_argument("--servers", default=os.environ.get("GEAROFFLOAD_SERVERS",
                                                            "127.0.0.1:4730"),
                        help="comma-separated host:port list (default: $GEAROFFLOAD_SERVERS "
                             "or 127.0.0.1:4730)")
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1,
                        help="worker processes (default: the CPU count, %(default)s)")
    parser.add_argument("--concurrency", type=int, default=1,
                        help="jobs run at once per process, in greenlets (default: 1)")
    parser.add_argument("--drain-timeout", type=float, default=60.0,
                        help="seconds to let running jobs finish on SIGTERM (default: 60)")
    parser.add_argument("--client-id", default=None,
                        help="client id prefix shown by admin 'workers' "
                             "(default: hostname)")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("--log-format", default="text", type=str.lower, metavar="FORMAT",
                        help="text (default: one line, then key=value fields such as "
                             "handle, function, server) or json (one object per line)")
    parser.add_argument("--wsgi", action="store_true",
                        help="target is a WSGI app (module:app): run the requests that "
                             "OffloadMiddleware sends")
    parser.add_argument("--wsgi-function", default="gearoffload.wsgi",
                        help="function name the middleware uses (default: %(default)s)")
    for name, what in (("ca", "CA certificates that sign the servers' certificates"),
                       ("cert", "this worker's certificate, for mutual TLS"),
                       ("key", "the private key of --tls-cert")):
        env = f"GEAROFFLOAD_TLS_{name.upper()}"
        parser.add_argument(f"--tls-{name}", default=os.environ.get(env), metavar="PEM",
                            help=f"connect with TLS: {what} (default: ${env})")
    args = parser.parse_args(argv)
    try:
        return PoolConfig(
            target=args.target,
            servers=tuple(s.strip() for s in args.servers.split(",") if s.strip()),
            processes=args.processes, concurrency=args.concurrency,
            drain_timeout=args.drain_timeout, client_id=args.client_id,
            log_level=args.log_level, log_format=args.log_format,
            wsgi_function=args.wsgi_function if args.wsgi else None,
            tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key)
    except ValueError as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits


def load_registry(target: str, wsgi_function: str | None = None) -> TaskRegistry:
    """Import ``module`` or ``module:attr`` and return the ``TaskRegistry`` to serve.

    Example::

        >>> load_registry("examples.wordcount:worker").names()   # doctest: +SKIP
        ['wordcount', 'count_words']
    """
    from .registry import TaskRegistry
    from .registry import registry as default_registry
    from .worker import Worker

    module_name, _, attr = target.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: modules of the current directory
    module = importlib.import_module(module_name)
    if attr:
        obj: Any = module
        for part in attr.split("."):
            obj = getattr(obj, part)
        candidates = [obj]
    else:
        found = [v for v in vars(module).values() if isinstance(v, (Worker, TaskRegistry))
                 and v is not default_registry]
        candidates = found if len(found) == 1 else [default_registry]
    obj = candidates[0]
    if wsgi_function is not None or not isinstance(obj, (Worker, TaskRegistry)):
        from .offloading import registry_for  # layer 5: Flask apps, WSGI apps

        return registry_for(obj, wsgi_function)
    registry = obj.registry if isinstance(obj, Worker) else obj
    if not isinstance(registry, TaskRegistry):
        raise TypeError(f"{target} is a {type(obj).__name__}, not a Worker or TaskRegistry")
    if not len(registry):
        raise ValueError(f"{target} declares no tasks (use @gearoffload.task, or name a "
                         "Worker/TaskRegistry as module:attr)")
    return registry


def _child(config: PoolConfig, registry: TaskRegistry, index: int) -> int:
    """The body of one forked worker process."""
    import gevent

    from .worker import Worker

    parent = os.getppid()
    prefix = config.client_id or socket.gethostname()
    worker = Worker(list(config.servers), client_id=f"{prefix}-{index}-{os.getpid()}",
                    concurrency=config.concurrency, registry=registry, tls=config.tls)

    def drain() -> None:
        log.info("draining (%d jobs running)", worker.active_jobs)
        worker.stop(graceful=True, wait=False, timeout=config.drain_timeout)

    gevent.signal_handler(signal.SIGTERM, drain)
    gevent.signal_handler(signal.SIGINT, drain)

    def watch_parent() -> None:
        # An orphan (the parent was SIGKILLed) must not serve forever.
        while os.getppid() == parent:
            gevent.sleep(1.0)
        log.warning("parent %d is gone; draining", parent)
        drain()

    watcher = gevent.spawn(watch_parent)
    try:
        worker.work()
    finally:
        watcher.kill(block=False)
    log.info("exiting after %d jobs", worker.jobs_done)
    return 0


def run_pool(config: PoolConfig, registry: TaskRegistry) -> int:
    """Fork ``config.processes`` children, restart the ones that die, drain on SIGTERM."""
    import gevent

    children: dict[int, tuple[int, float]] = {}  # pid -> (slot index, start time)
    restart_at: dict[int, float] = {}  # slot index -> when to fork it again
    delays = dict.fromkeys(range(config.processes), _RESTART_DELAY_START)
    signals: list[int] = []

    # Plain Python handlers: they only record the signal. Forked children install their
    # own (gevent) handlers and must not inherit behaviour that talks about "children".
    def on_signal(signum: int, frame: object) -> None:
        signals.append(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def fork(index: int) -> None:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                code = _child(config, registry, index)
            except BaseException:
                log.exception("worker process crashed")
            finally:
                logging.shutdown()
                os._exit(code)
        children[pid] = (index, time.monotonic())
        log.info("started worker process %d (pid %d)", index, pid)

    # INFO, as every other line of a healthy start and stop (the default --log-level):
    # WARNING is for what an operator should look at.
    log.info("gearoffload-worker: %s on %s, %d processes x %d greenlets, tasks %s",
                config.target, ",".join(config.servers), config.processes,
                config.concurrency, ", ".join(registry.names()))
    for index in range(config.processes):
        fork(index)

    draining_since: float | None = None
    while children or (draining_since is None and restart_at):
        if signals:
            signum = signals.pop(0)
            if draining_since is None:
                draining_since = time.monotonic()
                restart_at.clear()
                log.info("signal %d: draining %d worker processes", signum, len(children))
                for pid in children:
                    _kill(pid, signal.SIGTERM)
            else:
                log.warning("second signal: killing worker processes")
                for pid in children:
                    _kill(pid, signal.SIGKILL)
        if (draining_since is not None and config.drain_timeout is not None
                and time.monotonic() - draining_since > config.drain_timeout + 5):
            log.warning("drain timeout: killing %d worker processes", len(children))
            for pid in children:
                _kill(pid, signal.SIGKILL)
            draining_since = float("inf")  # kill once
        _reap(children, restart_at, delays, draining_since is not None)
        now = time.monotonic()
        for index, when in list(restart_at.items()):
            if now >= when:
                del restart_at[index]
                fork(index)
        gevent.sleep(0.05)
    log.info("gearoffload-worker: all worker processes exited")
    return 0


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _reap(children: dict[int, tuple[int, float]], restart_at: dict[int, float],
          delays: dict[int, float], draining: bool) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            children.clear()
            return
        if pid == 0:
            return
        if pid not in children:
            continue
        index, started = children.pop(pid)
        if draining:
            log.info("worker process %d (pid %d) exited (%s)", index, pid, _describe(status))
            continue
        if time.monotonic() - started > _HEALTHY_AFTER:
            delays[index] = _RESTART_DELAY_START
        delay = delays[index]
        delays[index] = min(delay * 2, _RESTART_DELAY_MAX)
        restart_at[index] = time.monotonic() + delay
        log.error("worker process %d (pid %d) died (%s); restarting in %.1fs",
                  index, pid, _describe(status), delay)


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exit status {os.WEXITSTATUS(status)}"


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``gearoffload-worker``."""
    from gevent import monkey

    monkey.patch_all()  # entry point: patch first, so task code's blocking I/O cooperates

    config = parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(make_formatter(
        config.log_format, "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s",
        pid=True))
    logging.basicConfig(level=config.log_level, handlers=[handler])
    try:
        registry = load_registry(config.target, config.wsgi_function)
    except (ImportError, AttributeError, TypeError, ValueError) as exc:
        sys.stderr.write(f"gearoffload-worker: cannot load tasks from {config.target}: "
                         f"{exc}\n")
        return 2
    return run_pool(config, registry)


if __name__ == "__main__":
    sys.exit(main())
