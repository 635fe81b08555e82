"""The server shell: a gevent ``StreamServer`` that runs the lifecycle, nothing else.

Four other modules do the work; this one wires them and owns the order of events:

- ``transport.py``: a connection per socket, plain or TLS (a filter on the plain one),
  all read by one poll loop, behind one interface;
- ``state.py``: the job state (the protocol), fed packet by packet, writing replies into
  each ``Peer.out``;
- ``commit.py``: the store's group commits and the replies that wait for them;
- ``admin.py``: the text admin protocol on the same port.

The lifecycle, one hook per step, in gevent's manner (``BaseServer``):

- ``init_socket()`` binds the port, and only that;
- ``init_store()`` opens the queue store and replays it (after the bind, so a server that
  cannot listen neither creates nor locks a queue file);
- ``start()`` runs both, then accepts; ``serve_forever()`` starts and waits;
- ``stop_graceful()`` (SIGUSR1) stops accepting and stops once no job is left;
  ``shutdown()`` (SIGTERM) drains running jobs for ``--shutdown-timeout``, then stops;
- ``stop()`` disconnects everyone, writes and closes the store, and ends ``serve_forever``.

``flush()`` is the one hot-path hook: after every poll round (and every timer) it hands each
peer with new output to its connection, unless that peer is held for a commit.

Example::

    from gearoffload_server.settings import ServerConfig
    from gearoffload_server.server import GearmanServer

    server = GearmanServer(ServerConfig(port=4730))
    server.serve_forever()          # or server.start() ... server.stop()
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable

import gevent
from gevent.server import StreamServer

from .admin import AdminProtocol
from .commit import GroupCommit
from .settings import ServerConfig
from .state import JobServerState, Peer
from .stores import open_store
from .tls import server_context
from .transport import Connection, Poller, accept

log = logging.getLogger("gearoffload.server")

#: At most one "refused (--max-connections)" log line per this many seconds.
REFUSED_LOG_INTERVAL = 10.0
#: The --idle-timeout sweep yields to the poll loop after this many connections.
SWEEP_CHUNK = 1000


class LoopScheduler:
    """The state's ``Scheduler`` on the gevent loop; flushes output after each timer."""

    def __init__(self, after: Callable[[], None]) -> None:
        self._loop = gevent.get_hub().loop
        self._after = after

    #: The builtin itself, not a method calling it: the state reads the clock on every
    #: submission and result (job latency, issue #6), and a Python frame costs more.
    now = staticmethod(time.time)

    def call_later(self, delay: float, callback: Callable[[], None]) -> _LoopTimer:
        return _LoopTimer(self._loop, delay, callback, self._after)


class _LoopTimer:
    __slots__ = ("_watcher",)

    def __init__(self, loop, delay: float, callback: Callable[[], None],
                 after: Callable[[], None]) -> None:
        def fire() -> None:
            self.cancel()
            try:
                callback()
            except Exception:
                log.exception("timer callback failed")
            after()

        self._watcher = loop.timer(max(delay, 0.0))
        self._watcher.start(fire)

    def cancel(self) -> None:
        self._watcher.stop()
        self._watcher.close()


class GearmanServer(StreamServer):
    """A Gearman job server: binary protocol and text admin protocol on one port.

    Lifecycle as gevent's servers: ``start()``, ``serve_forever()``, ``stop()``;
    ``stop_graceful()`` stops accepting and stops once no job is left.
    """

    def __init__(self, config: ServerConfig, listener: object = None) -> None:
        super().__init__(listener or (config.host, config.port), backlog=1024)
        self.config = config
        #: ``None`` for ``--queue memory``: then nothing below costs anything extra.
        #: Opened by ``init_store()``, once the port is bound.
        self.store = None
        #: The group committer of ``store`` (``commit.py``); ``None`` without a store.
        self.commit: GroupCommit | None = None
        #: Peer -> the store batch its replies wait for (``commit.py``); empty without a
        #: store. Connections read it to hold a peer's output.
        self.held: dict[Peer, object] = {}
        self.state = JobServerState(config, LoopScheduler(self.flush))
        #: Background jobs replayed from the store at start-up.
        self.restored = 0
        #: Kept results of background jobs read back from the store at start-up.
        self.restored_results = 0
        self.state.on_shutdown = self._admin_shutdown
        self.admin = AdminProtocol(self.state)
        #: Every live connection, by the ``Peer`` it owns (``transport.Connection``).
        self.connections: dict[Peer, Connection] = {}
        self.poller = Poller(self.flush)
        self._graceful: gevent.Greenlet | None = None
        self._shutting_down = False
        self._sweeper: gevent.Greenlet | None = None
        self._refused = 0          # connections refused since the last log line
        self._refused_log_at = 0.0
        #: Built once: every accepted socket is wrapped with it (``TlsConnection``).
        self.tls_context = server_context(
            config.tls_cert, config.tls_key, config.tls_ca,
            config.tls_require_client_cert) if config.tls else None

    # -- start -----------------------------------------------------------------------------

    def init_socket(self) -> None:
        """Bind the port (gevent's hook); nothing else."""
        super().init_socket()
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)

    def init_store(self) -> None:
        """Open the queue store and replay its jobs and kept results; once only. A store
        that cannot be opened gives the port back and raises (``StoreError``)."""
        if self.store is not None or self._shutting_down:
            return
        try:
            store = open_store(self.config.queue_url)
        except Exception:  # StoreError: cannot open it; do not keep the port
            self.socket.close()
            raise
        if store is None:
            return
        self.store = self.state.store = store
        self.held = store.held
        self.commit = GroupCommit(store, self.state, self.connections,
                                  self.config.max_output_buffer)
        self.restored = self.state.restore(store.load(), store.last_handle)
        if self.state.results is not None:
            self.restored_results = self.state.restore_results(
                store.load_results(time.time()))

    def start(self) -> None:
        """Bind, open the store, accept (``serve_forever()`` calls this)."""
        self.init_socket()
        self.init_store()
        super().start()

    # -- serve -----------------------------------------------------------------------------

    def handle(self, sock: socket.socket, address: tuple) -> None:
        if len(self.connections) >= self.config.max_connections:
            self._refuse()
            sock.close()
            return
        conn = accept(self, sock, address)
        if conn is None:
            return
        self.connections[conn.peer] = conn  # counts for --max-connections from now on
        if self.config.idle_timeout and self._sweeper is None:
            self._sweeper = gevent.spawn(self._sweep_idle)
        conn.serve()

    def flush(self) -> None:
        """Send every peer its output now; drop peers that stopped reading. Peers held for
        a commit wait: ``commit.py`` sends their output once their jobs are durable."""
        limit = self.config.max_output_buffer
        connections = self.connections
        commit = self.commit
        held = self.held
        if commit is not None:
            commit.after_round()
        for peer in self.state.take_dirty():
            if held and peer in held:
                continue
            conn = connections.get(peer)
            if conn is None:
                continue  # gone this round; nothing more is written to it
            # What waits for EPOLLOUT counts too: a slow reader that takes a little now
            # and then must not grow its backlog without bound (issue #17).
            backlog = conn.backlog
            if peer.out_bytes > limit or (
                    backlog is not None and peer.out_bytes + len(backlog) > limit):
                conn.abort(f"more than {limit} bytes of replies unread")
            else:
                conn.wake()

    def _refuse(self) -> None:
        """A connection over ``--max-connections``: counted, logged once per interval."""
        self._refused += 1
        now = time.monotonic()
        if now >= self._refused_log_at:
            log.warning("%d open connections (--max-connections): refused %d new "
                        "connection(s) (logged at most every %gs)", len(self.connections),
                        self._refused, REFUSED_LOG_INTERVAL,
                        extra={"event": "conn.refused"})
            self._refused = 0
            self._refused_log_at = now + REFUSED_LOG_INTERVAL

    def _sweep_idle(self) -> None:
        """--idle-timeout, with the semantics of Redis's ``timeout``: close a connection
        that has a packet or admin line half-sent for longer than the timeout (a byte at a
        time never completes one), or that has sent nothing for that long while nothing of
        it is in flight (``Connection.check_idle``). One greenlet for all connections, waking
        every quarter of the timeout (at most 5 s); the poll loop's only cost is counting
        the bytes it reads. A sweep yields to the loop every ``SWEEP_CHUNK`` connections."""
        timeout = self.config.idle_timeout
        tick = min(max(timeout / 4, 0.05), 5.0)
        try:
            while self.connections:
                gevent.sleep(tick)
                now = time.monotonic()
                for i, conn in enumerate(list(self.connections.values())):
                    if i and not i % SWEEP_CHUNK:
                        gevent.sleep(0)
                    if not conn.closing and conn.joined:
                        conn.check_idle(now, timeout)
        finally:
            self._sweeper = None

    # -- drain and stop --------------------------------------------------------------------

    def stop_graceful(self) -> None:
        """Stop accepting connections; stop the server once no job remains (SIGUSR1)."""
        if self._graceful is None:
            log.warning("graceful shutdown: no new connections; waiting for %d jobs",
                        len(self.state.jobs))
            # Not close(): that would also end serve_forever() at once.
            self.stop_accepting()
            self.socket.close()
            self._graceful = gevent.spawn(self._stop_when_idle)

    def _stop_when_idle(self) -> None:
        while self.state.jobs:
            gevent.sleep(0.1)
        self.stop()

    def shutdown(self) -> None:
        """SIGTERM: stop accepting, hand out no new job (grabs get NO_JOB), let running
        jobs finish for up to ``--shutdown-timeout`` seconds, write the store, stop.
        Queued background jobs are in the store already; a restart replays them."""
        if self._shutting_down is not False:
            return
        self._shutting_down = True
        state = self.state
        running = sum(f.running for f in state.functions.values())
        log.warning("shutting down: %d running jobs may finish within %gs", running,
                    self.config.shutdown_timeout)
        if self._graceful is None:
            self.stop_accepting()
            self.socket.close()
        state.draining = True
        deadline = time.monotonic() + self.config.shutdown_timeout
        while running and time.monotonic() < deadline:
            gevent.sleep(0.05)
            running = sum(f.running for f in state.functions.values())
        if running:
            log.warning("%d jobs still running at shutdown; they are requeued at restart "
                        "if stored", running)
        self.stop()

    def stop(self, timeout: float | None = None) -> None:
        """Disconnect everyone, write and close the store, stop serving."""
        if self._sweeper is not None:
            self._sweeper.kill(block=False)
        for conn in list(self.connections.values()):
            conn.abort("server stopping", logging.INFO)
            conn.close("")
        # Before super().stop(): once that returns, serve_forever() returns and the
        # process may exit before this greenlet runs again.
        self._shutting_down = True  # no init_store() after this
        if self.commit is not None:
            self.commit.close()
        super().stop(timeout if timeout is not None else 1.0)

    def _admin_shutdown(self, graceful: bool) -> None:
        # Let the OK reach the admin before the server goes.
        gevent.spawn_later(0.05, self.stop_graceful if graceful else self.stop)
