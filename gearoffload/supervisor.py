"""The worker pool: N forked processes, each a ``Worker`` with M greenlets, restarted with
back-off when they die and drained on SIGTERM. ``gearoffload-worker`` (``gearoffload.pool``)
is its command line.

Example::

    from gearoffload.registry import registry
    from gearoffload.supervisor import PoolConfig, run_pool

    run_pool(PoolConfig(target="myapp.tasks", servers=("127.0.0.1:4730",),
                        processes=2, concurrency=10), registry)
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .logfmt import LOG_FORMATS

if TYPE_CHECKING:  # imported lazily at run time: the command must monkey-patch first
    from .registry import TaskRegistry

__all__ = ["PoolConfig", "run_pool"]

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
    servers_given: bool = True  # False: a Flask app's GEAROFFLOAD_SERVERS may replace them
    #: PEM files for TLS to the servers (``gearoffload.tls_context``); all None: plain TCP.
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    #: --schedule: one more child process runs a ``Scheduler`` for the periodic tasks.
    schedule: bool = False

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
        from .connection import parse_servers
        try:  # here, not as a crash loop of every worker process
            parse_servers(list(self.servers))
        except ValueError as exc:
            raise ValueError(f"--servers: {exc}") from None
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


def _scheduler_child(config: PoolConfig, registry: TaskRegistry) -> int:
    """The body of the ``--schedule`` process: a ``Scheduler`` for the pool's periodic
    tasks, submitting to the pool's servers with the offload settings in use."""
    import dataclasses

    import gevent

    from .core import Offloader, offloader_in_use
    from .schedule import Scheduler, periodic_tasks

    settings = dataclasses.replace(offloader_in_use().config, servers=config.servers,
                                   tls_ca=config.tls_ca, tls_cert=config.tls_cert,
                                   tls_key=config.tls_key)
    scheduler = Scheduler(periodic_tasks(registry), Offloader(settings))
    gevent.signal_handler(signal.SIGTERM, scheduler.stop)
    gevent.signal_handler(signal.SIGINT, scheduler.stop)
    parent = os.getppid()

    def watch_parent() -> None:
        while os.getppid() == parent:
            gevent.sleep(1.0)
        log.warning("parent %d is gone; stopping the scheduler", parent)
        scheduler.stop()

    watcher = gevent.spawn(watch_parent)
    try:
        scheduler.run()
    finally:
        watcher.kill(block=False)
    return 0


def run_pool(config: PoolConfig, registry: TaskRegistry) -> int:
    """Fork ``config.processes`` children (and, with ``config.schedule``, a scheduler
    process), restart the ones that die, drain on SIGTERM."""
    import gevent

    children: dict[int, tuple[int, float]] = {}  # pid -> (slot index, start time)
    restart_at: dict[int, float] = {}  # slot index -> when to fork it again
    slots = config.processes + (1 if config.schedule else 0)  # the last one schedules
    delays = dict.fromkeys(range(slots), _RESTART_DELAY_START)
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
                if index == config.processes:
                    code = _scheduler_child(config, registry)
                else:
                    code = _child(config, registry, index)
            except BaseException:
                log.exception("worker process crashed")
            finally:
                logging.shutdown()
                os._exit(code)
        children[pid] = (index, time.monotonic())
        log.info("started %s process %d (pid %d)",
                 "scheduler" if index == config.processes else "worker", index, pid)

    # INFO, as every other line of a healthy start and stop (the default --log-level):
    # WARNING is for what an operator should look at.
    log.info("gearoffload-worker: %s on %s, %d processes x %d greenlets, tasks %s",
                config.target, ",".join(config.servers), config.processes,
                config.concurrency, ", ".join(registry.names()))
    for index in range(slots):
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
