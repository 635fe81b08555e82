"""Shared fixtures: real server processes on free loopback ports, and a raw protocol peer.

``server`` is parameterised over our server and Debian's gearmand, so a test that uses it
proves it tests real Gearman behaviour. ``our_server`` is for our own choices (quirks we
fix, limits, admin extensions). Tools that are missing skip locally and fail under CI=true.
"""

from __future__ import annotations

import importlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, NoReturn

import gevent
import pytest

from gearoffload._compiled import (
    _SourceFinder,
    compiled_modules,
    pure_python_requested,
    stale_builds,
)
from gearoffload.protocol import RES, Decoder, Packet, encode_request

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
ROOT = Path(__file__).resolve().parent.parent
#: Our server keeps background jobs in $XDG_STATE_HOME/gearoffload/queue-PORT.db by
#: default. Each ServerProcess gets its own XDG_STATE_HOME under this run's directory, so
#: no test replays jobs left by another test (or run) that happened to use the same port;
#: start() again on the same ServerProcess (same port, same directory) does replay them.
_STATE_ROOT = tempfile.TemporaryDirectory(prefix="gearoffload-tests-")


def missing(message: str) -> NoReturn:
    """Something a test needs is not there: a skip locally, a failure under CI=true
    (where ``.ci/run`` and ``make test`` install everything), so that CI never passes
    without running a test unnoticed."""
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message, allow_module_level=True)  # need_module() may run at import


def need_tool(name: str, package: str) -> str:
    """The path of a tool, or a skip (a failure under CI=true, where .ci/run installs it)."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")
    if path:
        return path
    missing(f"{name} not installed (Debian package {package}; .ci/run installs it)")


def need_module(name: str):
    """Import a module of the ``test``/``flask`` extras, or skip (a failure under CI=true,
    where ``make test`` installs them)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        missing(f"{name} not installed (pip install -e '.[test,flask]')")


def poll_until(predicate, timeout: float = 5.0) -> bool:
    """Poll ``predicate`` on gevent (other greenlets run meanwhile) until it is true;
    False after ``timeout`` seconds (use it as ``assert poll_until(...)``)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        gevent.sleep(0.02)
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"nothing listening on port {port} after {timeout}s")


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM,
                 timeout: float = 10.0) -> int:
    """Stop a child we started (by its PID): ``sig``, then SIGKILL after ``timeout``."""
    if proc.poll() is not None:
        return proc.returncode
    proc.send_signal(sig)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


class ServerProcess:
    """A job server started as a subprocess; stopped by its PID only."""

    def __init__(self, kind: str, args: list[str] | None = None) -> None:
        self.kind = kind
        self.port = free_port()
        self.args = list(args or [])
        self.proc: subprocess.Popen | None = None
        self._log: IO[bytes] | None = None
        self.state_home = tempfile.mkdtemp(dir=_STATE_ROOT.name)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        if self.kind == "gearmand":
            return [need_tool("gearmand", "gearman-job-server"), "--listen=127.0.0.1",
                    f"--port={self.port}", "--threads=1", "--log-file=none", *self.args]
        # Persistence is opt-in for tests (a test that wants a store passes its --queue).
        queue = [] if any(a.startswith(("--queue", "-q")) for a in self.args) else [
            "--queue", "memory"]
        return [sys.executable, "-m", "gearoffload_server", "--port", str(self.port),
                "--job-handle-prefix", "H:test", *queue, *self.args]

    def start(self) -> ServerProcess:
        # A file, not a pipe: nothing reads the log while the server runs, and a full pipe
        # (64 KiB of log lines, e.g. from many protocol errors) would block the server.
        self._log = tempfile.TemporaryFile()
        env = {**os.environ, "XDG_STATE_HOME": self.state_home}
        self.proc = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL,
                                     stderr=self._log, cwd=ROOT, env=env)
        wait_for_port(self.port, self.proc)
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.proc is None:
            return 0
        return stop_process(self.proc, sig, timeout)

    def stderr_text(self) -> str:
        """The server's log so far (complete after stop())."""
        if self._log is None:
            return ""
        # pread: the server writes through the same open file, so seeking would move
        # its write position too (its next lines could overwrite the start).
        fd = self._log.fileno()
        chunks, offset = [], 0
        while chunk := os.pread(fd, 1 << 20, offset):
            chunks.append(chunk)
            offset += len(chunk)
        return b"".join(chunks).decode(errors="replace")

    def connect(self, timeout: float = 5.0) -> RawConn:
        return RawConn(self.port, timeout)


class RawConn:
    """A blocking raw-socket Gearman peer for protocol tests (uses the shared codec)."""

    def __init__(self, port: int, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.decoder = Decoder(text=True)
        self.pending: list[Packet | bytes] = []

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawConn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, ptype: int, *args: bytes) -> None:
        self.sock.sendall(encode_request(ptype, *args))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self, timeout: float | None) -> bool:
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(1 << 20)
        except TimeoutError:
            return False
        if not data:
            raise ConnectionError("server closed the connection")
        self.pending.extend(self.decoder.feed(data))
        return True

    def recv(self, timeout: float = 5.0) -> Packet:
        """The next binary packet."""
        deadline = time.monotonic() + timeout
        while not self.pending:
            if not self._fill(max(0.001, deadline - time.monotonic())):
                raise TimeoutError(f"no packet within {timeout:.1f}s")
        item = self.pending.pop(0)
        assert isinstance(item, Packet), f"expected a packet, got text {item!r}"
        assert item.magic == RES
        return item

    def expect(self, ptype: int, timeout: float = 5.0) -> tuple[bytes, ...]:
        packet = self.recv(timeout)
        assert packet.type == ptype, f"expected type {ptype}, got {packet}"
        return packet.args

    def expect_nothing(self, wait: float = 0.3) -> None:
        if not self.pending:
            self._fill(wait)
        assert not self.pending, f"unexpected {self.pending}"

    def is_closed(self, wait: float = 2.0) -> bool:
        """True when the server closes the connection within ``wait`` seconds."""
        try:
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                self._fill(max(0.001, deadline - time.monotonic()))
        except (ConnectionError, OSError):
            return True
        return False

    def admin_raw(self, line: bytes, timeout: float = 5.0) -> bytes:
        """Send one admin line; return the raw reply (a listing up to '.\\n', or one line)."""
        self.sock.sendall(line)
        buf = b""
        self.sock.settimeout(timeout)
        while True:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("server closed the connection")
            buf += chunk
            if buf.startswith((b"OK", b"ERR")) and buf.endswith(b"\n"):
                return buf
            if buf == b".\n" or buf.endswith(b"\n.\n"):
                return buf

    def admin(self, command: str) -> bytes:
        return self.admin_raw(command.encode() + b"\r\n")


def gevent_time_limit(seconds: float):
    """An autouse fixture that fails a test running over ``seconds``; in a test module:
    ``time_limit = gevent_time_limit(40)``. Every wait in gevent-based tests is
    cooperative, so the timeout fires even where a socket read would hang."""

    @pytest.fixture(autouse=True)
    def time_limit() -> Iterator[None]:
        timer = gevent.Timeout(seconds, AssertionError(f"test ran over {seconds}s"))
        timer.start()
        yield
        timer.close()

    return time_limit


# -- the compiled modules' pure-Python sources, in this process -------------------------

#: ``{"package.stem": its .py}``: the modules compiled by Cython from their own .py, each
#: with a .pxd beside it (``gearoffload._compiled``).
COMPILED_MODULES = compiled_modules(ROOT)


def pytest_sessionstart(session: pytest.Session) -> None:
    """A compiled module built from other sources than the .py beside it would test old
    code: refuse to start (``make test`` rebuilds first)."""
    stale = [] if pure_python_requested() else stale_builds(ROOT)
    if stale:
        pytest.exit(f"{', '.join(stale)}: built from other sources than the .py and .pxd "
                    "now; rebuild (make .venv/.installed-stamp, or pip install -e .), or run "
                    "the .py with GEAROFFLOAD_PURE_PYTHON=1", returncode=4)


def _built_module_runs() -> bool:
    import gearoffload
    import gearoffload_server

    return gearoffload_server.STATE_COMPILED or any(gearoffload.COMPILED.values())


_sources: dict[str, object] = {}


def source_modules() -> dict[str, object]:
    """The compiled modules imported again from their ``.py``, as one set (the client's
    ``Connection`` is the pure one too), without replacing the ones the rest of the suite
    imported: ``{"gearoffload.client": module, ...}``."""
    if _sources:
        return _sources
    saved = {name: sys.modules.pop(name, None) for name in COMPILED_MODULES}
    parents = {name: sys.modules[name.rpartition(".")[0]] for name in COMPILED_MODULES}
    missing_attribute = object()
    attributes = {name: vars(parents[name]).get(name.rpartition(".")[2], missing_attribute)
                  for name in COMPILED_MODULES}
    finder = _SourceFinder(COMPILED_MODULES)
    sys.meta_path.insert(0, finder)
    try:
        for name in COMPILED_MODULES:  # the client's import of .connection: the .py too
            _sources[name] = importlib.import_module(name)
    finally:
        sys.meta_path.remove(finder)
        for name in COMPILED_MODULES:
            if saved[name] is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = saved[name]
            if attributes[name] is missing_attribute:
                delattr(parents[name], name.rpartition(".")[2])
            else:
                setattr(parents[name], name.rpartition(".")[2], attributes[name])
    return _sources


def _use_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    """Point every name a test module bound to a compiled module (or to one of its
    classes and functions) at the same name in the ``.py``; subprocesses (servers,
    workers) run their pure-Python code too."""
    sources = source_modules()
    monkeypatch.setenv("GEAROFFLOAD_PURE_PYTHON", "1")
    tests = str(ROOT / "tests")
    for module in list(sys.modules.values()):
        if not (getattr(module, "__file__", None) or "").startswith(tests):
            continue
        for name, value in list(vars(module).items()):
            origin = value.__name__ if isinstance(value, type(sys)) else getattr(
                value, "__module__", None)
            if origin in sources and not isinstance(value, str):
                replacement = sources[origin] if isinstance(value, type(sys)) else getattr(
                    sources[origin], getattr(value, "__name__", name), None)
                if replacement is not None:
                    monkeypatch.setattr(module, name, replacement)


def compiled_and_source(slow: bool = False):
    """An autouse fixture that runs every test of a module twice: on the modules as
    built (compiled in CI) and on their ``.py`` sources, loaded again in this process
    (ids ``built`` and ``py``). In a test module: ``variant = compiled_and_source()``.
    ``slow=True`` marks the ``py`` runs slow (they run under CI=true, or with
    ``--run-slow``). Without a compiled module there is only the ``py`` run."""
    params = ["built", pytest.param("py", marks=[pytest.mark.slow] if slow else [])
              ] if _built_module_runs() else ["py"]

    @pytest.fixture(autouse=True, params=params)
    def variant(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
        if request.param == "py" and _built_module_runs():
            _use_sources(monkeypatch)
        return request.param

    return variant


# -- slow cases: always under CI=true, locally with --run-slow -------------------------

def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true",
                     help="also run the tests marked slow (CI=true always runs them)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if IN_CI or config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: runs under CI=true, or with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@contextmanager
def working(worker) -> Iterator:
    """Run ``worker.work()`` in a greenlet for the ``with`` block, once it has registered
    its tasks (``start_worker``); stop it after."""
    greenlet = start_worker(worker)
    try:
        yield worker
    finally:
        worker.stop(graceful=False)
        greenlet.join(5)
        assert greenlet.dead


def start_worker(worker, timeout: float = 10.0) -> gevent.Greenlet:
    """Spawn ``worker.work()`` and wait until every server that answers lists each of its
    tasks with a worker: callers that ask who serves a function (``Client.workers_for``,
    the web layer's fast 503) would otherwise be told "nobody" in the instant before.
    Forgets the process's cached listings after."""
    from gearoffload import census
    from gearoffload.admin import AdminClient
    from gearoffload.errors import GearmanError

    greenlet = gevent.spawn(worker.work)
    names = set(worker.registry.names())
    deadline = time.monotonic() + timeout
    for address in worker.addresses:
        while names and time.monotonic() < deadline and not greenlet.dead:
            try:
                with AdminClient(address, timeout=2, tls=worker.tls) as admin:
                    served = {row.name for row in admin.status() if row.workers}
            except (GearmanError, OSError):
                break  # a server that is down or refuses admin: nothing to wait for
            if names <= served:
                break
            gevent.sleep(0.01)
    census.forget()
    return greenlet


@contextmanager
def tasks_on_a_pool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, module: str,
                    source: str, server: ServerProcess, secret: str,
                    env: dict[str, str]) -> Iterator[tuple[object, dict[str, str]]]:
    """A tasks module written from ``source`` into ``tmp_path``, served by a real
    one-process ``gearoffload-worker`` pool and imported here with the same settings (to
    submit). ``env`` is added to both. Yields ``(module, the pool's environment)`` once the
    pool serves every task of the module; stops the pool and ``server`` after."""
    from gearoffload import offloading
    from gearoffload.admin import AdminClient

    (tmp_path / f"{module}.py").write_text(source)
    pool_env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}",
                    GEAROFFLOAD_SECRET_KEY=secret, GEAROFFLOAD_SERVERS=server.address, **env)
    pool_bin = Path(sys.executable).parent / "gearoffload-worker"
    command = [str(pool_bin)] if pool_bin.exists() else [sys.executable, "-m",
                                                         "gearoffload.pool"]
    log = open(tmp_path / "pool.log", "wb")
    pool = subprocess.Popen([*command, module, "--processes", "1", "--concurrency", "1"],
                            cwd=tmp_path, stdout=log, stderr=log, env=pool_env)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    sys.modules.pop(module, None)
    tasks = importlib.import_module(module)
    offloading.configure(servers=[server.address], secret_key=secret, timeout=10)
    try:
        names = {task.name for task in vars(tasks).values()
                 if isinstance(task, offloading.OffloadedFunction)}
        with AdminClient(server.address) as admin:
            assert poll_until(lambda: names <= {s.name for s in admin.status() if s.workers},
                              15), (tmp_path / "pool.log").read_text()
        yield tasks, pool_env
    finally:
        offloading.configure_reset()
        sys.modules.pop(module, None)
        stop_process(pool, signal.SIGKILL)
        log.close()
        server.stop()


@pytest.fixture(params=["gearoffload", "gearmand"])
def server(request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    """Each test runs once against our server and once against gearmand."""
    proc = ServerProcess(request.param).start()
    yield proc
    proc.stop()


@pytest.fixture
def our_server() -> Iterator[ServerProcess]:
    proc = ServerProcess("gearoffload").start()
    yield proc
    proc.stop()


@pytest.fixture
def server_factory() -> Iterator:
    """Start servers with extra arguments: ``server_factory("gearoffload", "-j", "2")``."""
    started: list[ServerProcess] = []

    def start(kind: str = "gearoffload", *args: str) -> ServerProcess:
        proc = ServerProcess(kind, list(args)).start()
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture
def dropping_server() -> Iterator[str]:
    """``host:port`` of a port that accepts connections and drops each at its first bytes:
    up for TCP, yet no job is ever accepted there (in this process, on gevent)."""
    from gevent.server import StreamServer

    def drop(sock, address) -> None:
        sock.recv(65536)
        sock.close()

    server = StreamServer(("127.0.0.1", 0), drop)
    server.start()
    yield f"127.0.0.1:{server.server_port}"
    server.stop()
