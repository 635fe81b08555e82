"""The worker pool: N processes, each a ``Worker`` with M greenlets, restarted with
back-off when they die, replaced by fresh ones on SIGHUP (a reload) and drained on SIGTERM.
``gearoffload-worker`` (``gearoffload.pool``) is its command line.

Example::

    from gearoffload.registry import registry
    from gearoffload.supervisor import PoolConfig, run_pool

    run_pool(PoolConfig(target="myapp.tasks", servers=("127.0.0.1:4730",),
                        processes=2, concurrency=10), registry)
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
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
#: A reload's new processes must all be registered within this, or the reload is abandoned.
_READY_TIMEOUT = 60.0
#: How long a reload's process waits for the servers to list its registrations.
_REGISTER_WAIT = 10.0
#: The parent's handled signals: SIGTERM/SIGINT drain and exit, SIGHUP reloads.
_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
#: The environment variable that hands a child its settings (``child_main``).
_CHILD_ENV = "GEAROFFLOAD_POOL_CHILD"


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


def configure_logging(config: PoolConfig) -> None:
    """The log format of the pool's parent and of every child it starts."""
    from .logfmt import make_formatter

    handler = logging.StreamHandler()
    handler.setFormatter(make_formatter(
        config.log_format, "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s",
        pid=True))
    logging.basicConfig(level=config.log_level, handlers=[handler])


def _child(config: PoolConfig, registry: TaskRegistry, index: int,
           ready: Callable[[], None] | None = None, parent: int | None = None) -> int:
    """The body of one worker process. ``ready`` (a reload's process) is called once the
    servers list this process's registrations: the old processes may leave then."""
    import gevent

    from .worker import Worker

    parent = os.getppid() if parent is None else parent
    prefix = config.client_id or socket.gethostname()
    client_id = f"{prefix}-{index}-{os.getpid()}"
    worker = Worker(list(config.servers), client_id=client_id,
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
    announcer = gevent.spawn(_announce, config, client_id, registry.names(), ready) \
        if ready is not None else None
    try:
        worker.work()
    finally:
        watcher.kill(block=False)
        if announcer is not None:
            announcer.kill(block=False)
    log.info("exiting after %d jobs", worker.jobs_done)
    return 0


def _announce(config: PoolConfig, client_id: str, names: list[str],
              ready: Callable[[], None]) -> None:
    """Call ``ready`` once every reachable server lists ``client_id`` with all of
    ``names`` (admin ``workers``): a job server answers a submission for a function no
    worker has registered at once (a web tier's 503), so a reload's old processes leave
    only after the new ones are registered, not merely started. A server that is down or
    refuses admin commands is not waited for, and nothing is waited for past
    ``_REGISTER_WAIT`` (the reload goes on: the old processes would not do better)."""
    import gevent

    from .admin import AdminClient
    from .errors import GearmanError

    wanted = set(names)
    deadline = time.monotonic() + _REGISTER_WAIT
    for server in config.servers:
        try:  # one admin connection per server, asked every 0.1 s: not one per question
            with AdminClient(server, timeout=2, tls=config.tls) as admin:
                while time.monotonic() < deadline and not any(
                        row.client_id == client_id and wanted <= set(row.functions)
                        for row in admin.workers()):
                    gevent.sleep(0.1)
        except (GearmanError, OSError):
            pass  # down, or refusing admin commands: not waited for
    ready()


def _scheduler_child(config: PoolConfig, registry: TaskRegistry,
                     ready: Callable[[], None] | None = None, parent: int | None = None) -> int:
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
    parent = os.getppid() if parent is None else parent

    def watch_parent() -> None:
        while os.getppid() == parent:
            gevent.sleep(1.0)
        log.warning("parent %d is gone; stopping the scheduler", parent)
        scheduler.stop()

    watcher = gevent.spawn(watch_parent)
    if ready is not None:
        # Two schedulers may overlap: every slot runs once however many submit it.
        ready()
    try:
        scheduler.run()
    finally:
        watcher.kill(block=False)
    return 0


def child_main(argv: list[str]) -> int:
    """A pool's child process (``python -m gearoffload._poolchild worker|scheduler SLOT``,
    started by ``run_pool``): imports the tasks itself, so that each child, and every
    child of a reload, runs the code as it is on disk now."""
    from gevent import monkey

    monkey.patch_all()  # first: the task code's blocking I/O must cooperate
    import json

    from .loading import load_registry

    kind, slot = argv[0], int(argv[1])
    spec = json.loads(os.environ.pop(_CHILD_ENV))  # not for the task code's own children
    sys.path[:] = spec["path"]  # the target is found where the parent found it
    config = PoolConfig(**{**spec["config"], "servers": tuple(spec["config"]["servers"])})
    configure_logging(config)
    ready = None
    ready_fd = spec.get("ready_fd")
    if ready_fd is not None:
        os.set_inheritable(ready_fd, False)  # the parent's pipe, not the tasks'

        def ready() -> None:
            try:
                os.write(ready_fd, f"{os.getpid()}\n".encode())
            except OSError:
                pass  # the parent is gone: watch_parent drains this process
            finally:
                os.close(ready_fd)

    try:
        registry = load_registry(config.target, config.wsgi_function)
    except Exception as exc:  # a broken deploy: one line; a reload then keeps the old code
        log.error("cannot load tasks from %s: %s: %s", config.target, type(exc).__name__, exc)
        return 2
    try:
        # The parent's PID from the spec, not getppid(): a parent that died while this
        # child imported the tasks is noticed too.
        if kind == "scheduler":
            return _scheduler_child(config, registry, ready, spec["parent"])
        return _child(config, registry, slot, ready, spec["parent"])
    except Exception:
        log.exception("%s process crashed", kind)
        return 1
    finally:
        logging.shutdown()


@dataclass
class _Child:
    slot: int
    generation: int
    started: float
    ready: bool = False
    retiring_since: float | None = None  # SIGTERMed then: draining, not restarted


def run_pool(config: PoolConfig, registry: TaskRegistry) -> int:
    """Start ``config.processes`` worker processes (and, with ``config.schedule``, a
    scheduler process), restart the ones that die, reload on SIGHUP, drain on SIGTERM.

    Each child is a fresh interpreter that imports ``config.target`` itself; ``registry``
    (the parent's import of it) only names the tasks in the start-up line.
    """
    return _Supervisor(config, registry).run()


class _Supervisor:
    """The parent's loop. Signals are only recorded by their handlers and acted on here.

    Generations: the processes started together, at start or by one SIGHUP. The serving
    generation's processes are restarted when they die. A reload starts a whole pending
    generation; once every one of its processes is registered, the older processes are
    SIGTERMed (they finish their running jobs, as on SIGTERM) and it serves. A pending
    process that exits first (a deploy that does not import) abandons the reload, and the
    old processes keep serving.
    """

    def __init__(self, config: PoolConfig, registry: TaskRegistry) -> None:
        self.config = config
        self.registry = registry
        self.children: dict[int, _Child] = {}
        self.restart_at: dict[int, float] = {}  # slot -> when to start it again
        self.slots = config.processes + (1 if config.schedule else 0)  # the last schedules
        self.delays = dict.fromkeys(range(self.slots), _RESTART_DELAY_START)
        self.signals: list[int] = []
        self.generation = 0  # the serving one
        self.next_generation = 1
        self.pending: int | None = None  # a reload's, until all its processes are ready
        self.reload_deadline = 0.0
        self.draining = False
        self.ready_r, self.ready_w = os.pipe()
        os.set_blocking(self.ready_r, False)
        self.ready_buffer = b""

    def run(self) -> int:
        import gevent

        # Plain Python handlers: they only record the signal, the loop acts on it.
        def on_signal(signum: int, frame: object) -> None:
            self.signals.append(signum)

        for signum in _SIGNALS:
            signal.signal(signum, on_signal)
        # INFO, as every other line of a healthy start and stop (the default --log-level):
        # WARNING is for what an operator should look at.
        config = self.config
        log.info("gearoffload-worker: %s on %s, %d processes x %d greenlets, tasks %s",
                 config.target, ",".join(config.servers), config.processes,
                 config.concurrency, ", ".join(self.registry.names()))
        for slot in range(self.slots):
            self.spawn(slot, self.generation)
        try:
            while self.children or (not self.draining and self.restart_at):
                self.read_ready()
                while self.signals:
                    self.on_signal(self.signals.pop(0))
                self.check_reload()
                self.check_drain_timeouts()
                self.reap()
                now = time.monotonic()
                for slot, when in list(self.restart_at.items()):
                    if now >= when:
                        del self.restart_at[slot]
                        self.spawn(slot, self.generation)
                gevent.sleep(0.05)
        finally:
            os.close(self.ready_r)
            os.close(self.ready_w)
        log.info("gearoffload-worker: all worker processes exited")
        return 0

    def kind(self, slot: int) -> str:
        return "scheduler" if slot == self.config.processes else "worker"

    def spawn(self, slot: int, generation: int, announce: bool = False) -> None:
        """Fork and exec a fresh interpreter for ``slot``: forking alone would hand the
        child the task code the parent imported at start, and a reload would serve it
        again. ``announce``: the child reports on the ready pipe once registered."""
        import json

        spec = {"config": dataclasses.asdict(self.config), "path": sys.path,
                "parent": os.getpid(), "ready_fd": self.ready_w if announce else None}
        env = dict(os.environ, **{_CHILD_ENV: json.dumps(spec)})
        # The parent's -X and -W options hold in its children too (as multiprocessing's
        # spawn passes them).
        argv = [sys.executable, *subprocess._args_from_interpreter_flags(), "-m",
                "gearoffload._poolchild", self.kind(slot), str(slot)]
        # Blocked across the fork: a signal that reached the child before its exec would
        # run the parent's handler there, which only records it: a SIGTERM from a reload
        # in the same pass was lost so, and that process served for ever.
        pid = -1
        signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        try:
            pid = os.fork()
            if pid == 0:
                try:
                    # SIGHUP ignored from the first instruction: a terminal's hangup reaches
                    # the whole process group, and reloading is the parent's business.
                    signal.signal(signal.SIGHUP, signal.SIG_IGN)
                    signal.signal(signal.SIGTERM, signal.SIG_DFL)
                    # Ignored until the child's own handler (a Ctrl-C reaches the whole
                    # group; the parent's SIGTERM follows): no KeyboardInterrupt traceback
                    # from the middle of an import.
                    signal.signal(signal.SIGINT, signal.SIG_IGN)
                    # A SIGTERM pending already ends the child here: it has no job yet.
                    signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
                    if announce:
                        os.set_inheritable(self.ready_w, True)
                    os.execve(sys.executable, argv, env)
                except BaseException as exc:
                    os.write(2, f"gearoffload-worker: cannot start {argv}: {exc}\n".encode())
                finally:
                    os._exit(127)
        finally:
            if pid != 0:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
        self.children[pid] = _Child(slot, generation, time.monotonic())
        log.info("started %s process %d (pid %d)", self.kind(slot), slot, pid)

    def read_ready(self) -> None:
        try:
            data = os.read(self.ready_r, 4096)
        except BlockingIOError:
            return
        *lines, self.ready_buffer = (self.ready_buffer + data).split(b"\n")
        for line in lines:
            child = self.children.get(int(line)) if line.strip().isdigit() else None
            if child is not None:
                child.ready = True

    def on_signal(self, signum: int) -> None:
        if signum == signal.SIGHUP:
            if self.draining:
                log.warning("SIGHUP while stopping: ignored")
            else:
                self.reload()
            return
        if not self.draining:
            self.draining = True
            self.restart_at.clear()
            self.pending = None
            log.info("signal %d: draining %d worker processes", signum, len(self.children))
            for pid, child in self.children.items():
                if child.retiring_since is None:
                    self.retire(pid, child)
        else:
            log.warning("second signal: killing worker processes")
            for pid in self.children:
                _kill(pid, signal.SIGKILL)

    def reload(self) -> None:
        if self.pending is not None:
            # The newest code wins: the processes of the unfinished reload are replaced
            # too (SIGTERMed: any job they took finishes); the old ones still serve.
            superseded = [(pid, child) for pid, child in self.children.items()
                          if child.generation == self.pending and child.retiring_since is None]
            log.info("SIGHUP during a reload: replacing its %d new processes too",
                     len(superseded))
            for pid, child in superseded:
                self.retire(pid, child)
        self.pending = self.next_generation
        self.next_generation += 1
        self.reload_deadline = time.monotonic() + _READY_TIMEOUT
        old = sum(1 for child in self.children.values() if child.retiring_since is None)
        log.info("SIGHUP: reloading %s: starting %d fresh processes; the %d old ones "
                 "drain once these serve", self.config.target, self.slots, old)
        for slot in range(self.slots):
            self.spawn(slot, self.pending, announce=True)

    def check_reload(self) -> None:
        if self.pending is None:
            return
        new = {pid: child for pid, child in self.children.items()
               if child.generation == self.pending}
        if len(new) == self.slots and all(child.ready for child in new.values()):
            old = [(pid, child) for pid, child in self.children.items()
                   if pid not in new and child.retiring_since is None]
            log.info("reloaded: %d fresh processes serve (pids %s); draining the %d old "
                     "ones", len(new), " ".join(map(str, sorted(new))), len(old))
            for pid, child in old:
                self.retire(pid, child)
            self.generation, self.pending = self.pending, None
            self.restart_at.clear()  # the retired slots are served by the new processes
            self.delays = dict.fromkeys(range(self.slots), _RESTART_DELAY_START)
        elif time.monotonic() > self.reload_deadline:
            self.abandon_reload(f"its processes are not ready after {_READY_TIMEOUT:.0f}s")

    def abandon_reload(self, why: str) -> None:
        log.error("reload failed: %s; the old processes keep serving", why)
        for pid, child in self.children.items():
            if child.generation == self.pending and child.retiring_since is None:
                self.retire(pid, child)
        self.pending = None

    def retire(self, pid: int, child: _Child) -> None:
        """SIGTERM: the process drains (finishes its running jobs) and exits."""
        child.retiring_since = time.monotonic()
        _kill(pid, signal.SIGTERM)

    def check_drain_timeouts(self) -> None:
        if self.config.drain_timeout is None:
            return
        limit = time.monotonic() - self.config.drain_timeout - 5
        late = [pid for pid, child in self.children.items()
                if child.retiring_since is not None and child.retiring_since < limit]
        if late:
            log.warning("drain timeout: killing %d worker processes", len(late))
            for pid in late:
                self.children[pid].retiring_since = float("inf")  # kill once
                _kill(pid, signal.SIGKILL)

    def reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                return
            if pid == 0:
                return
            child = self.children.pop(pid, None)
            if child is None:
                continue
            if child.retiring_since is not None or self.draining:
                log.info("worker process %d (pid %d) exited (%s)", child.slot, pid,
                         _describe(status))
            elif child.generation == self.pending:
                self.abandon_reload(f"{self.kind(child.slot)} process {child.slot} (pid {pid}) "
                                    f"exited ({_describe(status)}) before it served")
            else:
                self.restart(child, pid, status)

    def restart(self, child: _Child, pid: int, status: int) -> None:
        if time.monotonic() - child.started > _HEALTHY_AFTER:
            self.delays[child.slot] = _RESTART_DELAY_START
        delay = self.delays[child.slot]
        self.delays[child.slot] = min(delay * 2, _RESTART_DELAY_MAX)
        self.restart_at[child.slot] = time.monotonic() + delay
        log.error("worker process %d (pid %d) died (%s); restarting in %.1fs",
                  child.slot, pid, _describe(status), delay)


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exit status {os.WEXITSTATUS(status)}"
