"""Server configuration: parsed once at the edge (the CLI) into a frozen object.

Example::

    >>> from gearoffload_server.config import ServerConfig, parse_args
    >>> parse_args(["--port", "4731", "--job-retries", "3"]).port
    4731
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys
from dataclasses import dataclass, field

from gearoffload import __version__
from gearoffload.logfmt import LOG_FORMATS
from gearoffload.protocol import DEFAULT_MAX_PACKET_SIZE

LOG_LEVELS = ("FATAL", "ALERT", "CRITICAL", "ERROR", "WARNING", "NOTICE", "INFO", "DEBUG")
#: A handle must fit in 63 bytes (docs/protocol.md §3.1); leave room for ":" and a 20-digit counter.
MAX_HANDLE_PREFIX = 42


def default_handle_prefix() -> str:
    return "H:" + socket.gethostname()[: MAX_HANDLE_PREFIX - 2]


def default_queue(port: int) -> str:
    """The documented default store: ``$XDG_STATE_HOME/gearoffload/queue-PORT.db``
    (``~/.local/state/gearoffload/queue-PORT.db``), one file per port, so that a restart
    on the same port finds its jobs and two servers never share a file."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "state")
    return "sqlite://" + os.path.join(os.path.abspath(base), "gearoffload", f"queue-{port}.db")


#: The largest --result-max-size: a result is sent base64 in one admin line.
MAX_RESULT_SIZE = 8 << 20

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(ValueError):
    """A configuration value is invalid; the message says what to do."""


@dataclass(frozen=True)
class ServerConfig:
    """Everything the server's state and I/O shell need, validated."""

    host: str = "127.0.0.1"
    port: int = 4730
    job_retries: int = -1
    handle_prefix: str = field(default_factory=default_handle_prefix)
    max_packet_size: int = DEFAULT_MAX_PACKET_SIZE
    #: Sleeping workers woken per runnable job; 0 wakes all of them (gearmand's default).
    worker_wakeup: int = 1
    #: Bytes queued for a peer that does not read before it is disconnected.
    max_output_buffer: int = 64 * 1024 * 1024
    verbose: str = "INFO"
    log_file: str | None = None
    #: ``text`` (the classic line, plus ``key=value`` fields) or ``json`` (one object a line).
    log_format: str = "text"
    enable_shutdown: bool = False
    #: Where background jobs are kept (``stores``): ``memory``, ``sqlite://PATH``,
    #: ``redis://HOST:PORT/DB``; empty = ``default_queue(port)``.
    queue: str = ""
    #: On SIGTERM, how long running jobs may take to finish before the server exits.
    shutdown_timeout: float = 10.0
    #: A background job that fails (WORK_FAIL/WORK_EXCEPTION) runs again this many times
    #: before it becomes a dead letter; 0 = never retried, dropped as in gearmand.
    retry_failed: int = 0
    history_per_function: int = 100
    history_max: int = 10000
    #: Seconds before the first retry, doubled for each further one.
    retry_backoff: float = 1.0
    #: Networks (besides loopback) whose peers may send mutating admin commands.
    admin_allow: tuple[IPNetwork, ...] = ()
    #: Open connections beyond which new ones are closed at once.
    max_connections: int = 10000
    #: Seconds a connection may leave a packet half-sent, or stay silent with nothing in
    #: flight (Redis's ``timeout``); 0 = no limit.
    idle_timeout: float = 300.0
    #: Default maxqueue of every function (admin ``maxqueue`` overrides it); 0 = unlimited.
    max_queue: int = 0
    #: Foreground submissions one connection may wait on at once; 0 = unlimited.
    max_client_jobs: int = 10000
    #: PEM certificate chain: with it the Gearman port speaks TLS only.
    tls_cert: str | None = None
    #: PEM private key (default: the key is in ``tls_cert``).
    tls_key: str | None = None
    #: PEM CA bundle that client certificates are checked against.
    tls_ca: str | None = None
    #: Refuse connections without a client certificate signed by ``tls_ca``.
    tls_require_client_cert: bool = False
    #: Port of the read-only HTTP endpoint (/metrics, /healthz, status page); 0 = off.
    http_port: int = 0
    #: Address of the HTTP endpoint; empty = the same as ``host``.
    http_host: str = ""
    #: Seconds the outcome of a background job with a unique is kept for admin ``result``
    #: (``state.KeptResults``); 0 = keep none.
    result_ttl: float = 600.0
    #: A result larger than this is kept as ``done`` without its data (a size marker).
    result_max_size: int = 1 << 20
    #: Bytes all kept results may take; past it the oldest go first.
    result_memory: int = 64 << 20
    #: Functions with series of their own in /metrics (and rows in /status.json).
    metrics_max_functions: int = 1000
    #: Functions one connection may register with CAN_DO; 0 = unlimited.
    max_functions_per_connection: int = 1000
    version: str = __version__

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)

    @property
    def queue_url(self) -> str:
        from .stores import with_default_prefix

        return with_default_prefix(self.queue, self.port) if self.queue else \
            default_queue(self.port)

    def __post_init__(self) -> None:
        if not -1 <= self.job_retries <= 255:
            raise ConfigError(
                f"--job-retries must be between -1 (unlimited) and 255, not {self.job_retries}"
            )
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port must be between 0 and 65535, not {self.port}")
        if not self.handle_prefix or len(self.handle_prefix.encode()) > MAX_HANDLE_PREFIX:
            raise ConfigError(
                f"--job-handle-prefix must be 1 to {MAX_HANDLE_PREFIX} bytes long "
                "(handles are limited to 63 bytes)"
            )
        if any(c.isspace() for c in self.handle_prefix):
            raise ConfigError("--job-handle-prefix must not contain whitespace")
        if self.max_packet_size < 1024:
            raise ConfigError(
                f"--max-packet-size must be at least 1024 bytes, not {self.max_packet_size}"
            )
        if self.worker_wakeup < 0:
            raise ConfigError("--worker-wakeup must be 0 (wake all) or a positive number")
        if self.verbose not in LOG_LEVELS:
            raise ConfigError(f"--verbose must be one of {', '.join(LOG_LEVELS)}")
        if self.log_format not in LOG_FORMATS:
            raise ConfigError(f"--log-format must be one of {', '.join(LOG_FORMATS)}")
        if self.queue:
            from .stores import parse_queue_url

            try:
                parse_queue_url(self.queue)
            except ValueError as exc:
                raise ConfigError(f"--queue: {exc}") from None
        if not 0 <= self.history_max <= 10_000_000 or not 1 <= self.history_per_function:
            raise ConfigError("--history-max must be between 0 (off) and 10000000, "
                              "--history-per-function at least 1")
        if not 0 <= self.retry_failed <= 1000:
            raise ConfigError("--retry-failed must be between 0 (off) and 1000")
        if not 0 <= self.retry_backoff <= 86400:
            raise ConfigError("--retry-backoff must be between 0 and 86400 seconds")
        if not 0 <= self.shutdown_timeout <= 86400:
            raise ConfigError("--shutdown-timeout must be between 0 and 86400 seconds")
        if self.max_connections < 1:
            raise ConfigError("--max-connections must be at least 1")
        if not 0 <= self.idle_timeout <= 86400:
            raise ConfigError("--idle-timeout must be between 0 (off) and 86400 seconds")
        if self.max_queue < 0:
            raise ConfigError("--max-queue must be 0 (unlimited) or a positive number")
        if self.max_client_jobs < 0:
            raise ConfigError("--max-client-jobs must be 0 (unlimited) or a positive number")
        if not 0 <= self.http_port <= 65535:
            raise ConfigError(
                f"--http-port must be between 1 and 65535 (0 = off), not {self.http_port}")
        if not 0 <= self.result_ttl <= 30 * 86400:
            raise ConfigError("--result-ttl must be between 0 (keep no results) and "
                              "2592000 seconds (30 days)")
        if not 0 <= self.result_max_size <= MAX_RESULT_SIZE:
            # Base64 in one admin line: the admin client reads lines of up to 16 MiB.
            raise ConfigError("--result-max-size must be between 0 and 8M")
        if self.result_memory < 0:
            raise ConfigError("--result-memory must be 0 or a positive size")
        if self.result_ttl and self.result_max_size > self.result_memory:
            raise ConfigError(f"--result-max-size ({self.result_max_size}) must not exceed "
                              f"--result-memory ({self.result_memory})")
        if self.http_port and self.http_port == self.port and \
                self.http_address[0] == self.host:
            raise ConfigError("--http-port must differ from --port")
        if self.metrics_max_functions < 1:
            raise ConfigError("--metrics-max-functions must be at least 1")
        if self.max_functions_per_connection < 0:
            raise ConfigError("--max-functions-per-connection must be 0 (unlimited) or a "
                              "positive number")
        self._check_tls()

    @property
    def http_address(self) -> tuple[str, int]:
        """Where the HTTP endpoint listens: ``(--http-host or --host, --http-port)``."""
        return (self.http_host or self.host, self.http_port)

    def _check_tls(self) -> None:
        if not self.tls_cert:
            for value, flag in ((self.tls_key, "--tls-key"), (self.tls_ca, "--tls-ca"),
                                (self.tls_require_client_cert, "--tls-require-client-cert")):
                if value:
                    raise ConfigError(f"{flag} needs --tls-cert (the server's certificate)")
            return
        if self.tls_require_client_cert and not self.tls_ca:
            raise ConfigError("--tls-require-client-cert needs --tls-ca (the CA that signs "
                              "client certificates)")
        for path, flag in ((self.tls_cert, "--tls-cert"), (self.tls_key, "--tls-key"),
                           (self.tls_ca, "--tls-ca")):
            if path:
                try:
                    with open(path, "rb"):
                        pass
                except OSError as exc:
                    raise ConfigError(f"{flag}: cannot read {path}: "
                                      f"{exc.strerror or exc}") from None
        # Load them once here so that a wrong file (not PEM, key not matching the
        # certificate) is one line at start, not an error at the first connection.
        from .tls import server_context

        try:
            server_context(self.tls_cert, self.tls_key, self.tls_ca,
                           self.tls_require_client_cert)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise ConfigError(f"--tls-cert/--tls-key/--tls-ca: cannot load them: "
                              f"{getattr(exc, 'reason', None) or exc}") from None


def _size(text: str) -> int:
    """Parse a byte size such as ``65536``, ``64k``, ``8M`` or ``1G``."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    text = text.strip().lower().removesuffix("b")
    try:
        if text and text[-1] in units:
            return int(text[:-1]) * units[text[-1]]
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 65536, 64k or 8M)") from None


def _network(text: str) -> IPNetwork:
    """Parse an ``--admin-allow`` value: ``10.0.0.0/8``, ``192.0.2.7``, ``fd00::/8``."""
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not an address or network: {text!r} (try 10.0.0.0/8 or 192.0.2.7)") from None


class _OneLineParser(argparse.ArgumentParser):
    """Bad options give one line on stderr and exit code 2, not a usage dump."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _OneLineParser(
        prog="gearoffload-server",
        description="A Gearman job server (binary and text admin protocol) on gevent.",
    )
    p.add_argument("--host", "-L", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; use 0.0.0.0 to expose it)")
    p.add_argument("--port", "-p", type=int, default=4730, help="TCP port (default 4730)")
    p.add_argument("--job-retries", "-j", type=int, default=-1,
                   help="attempts before a job whose worker is lost fails; -1 = unlimited "
                        "(default), 0 = fail at the first loss")
    p.add_argument("--job-handle-prefix", default=None,
                   help="job handles become PREFIX:<n> (default H:<hostname>)")
    p.add_argument("--max-packet-size", type=_size, default=DEFAULT_MAX_PACKET_SIZE,
                   help="largest packet accepted, e.g. 64M (default 64M)")
    p.add_argument("--max-output-buffer", type=_size, default=64 << 20,
                   help="unread replies kept for a peer before it is disconnected (default 64M)")
    p.add_argument("--worker-wakeup", "-w", type=int, default=1,
                   help="sleeping workers woken per runnable job (default 1; 0 = all, "
                        "like gearmand's thundering herd)")
    p.add_argument("--verbose", "-v", default="INFO", type=str.upper,
                   help=f"log level, one of {' '.join(LOG_LEVELS)} (default INFO)")
    p.add_argument("--log-file", "-l", default=None, help="log to this file instead of stderr")
    p.add_argument("--log-format", default="text", type=str.lower, metavar="FORMAT",
                   help="text (default: one line, then key=value fields such as handle, "
                        "function, peer) or json (one JSON object per line)")
    p.add_argument("--queue", "-q", default="", metavar="URL",
                   help="where background jobs are kept across restarts: sqlite://PATH "
                        "(default sqlite://$XDG_STATE_HOME/gearoffload/queue-PORT.db, i.e. "
                        "~/.local/state/gearoffload/queue-PORT.db; sqlite:///abs/q.db is "
                        "absolute, sqlite://q.db relative; options ?synchronous=normal, "
                        "?max_size=512M), redis://HOST:PORT/DB (keys under ?prefix=NAME, default "
                        "gearoffload:PORT; needs gearoffload[redis]) or memory (no "
                        "persistence, like gearmand's default)")
    p.add_argument("--retry-failed", type=int, default=0, metavar="N",
                   help="run a background job that fails up to N more times, then keep it "
                        "as a dead letter (admin 'show dead jobs', 'requeue dead job H'); "
                        "default 0: failed jobs are dropped, as in gearmand")
    p.add_argument("--retry-backoff", type=float, default=1.0, metavar="SECONDS",
                   help="wait before the first retry, doubled for each further one "
                        "(default 1)")
    p.add_argument("--history-max", type=int, default=10000, metavar="N",
                   help="the job history (status page, admin 'show history') covers the "
                        "last N job endings, in memory only (default 10000; 0: no history)")
    p.add_argument("--history-per-function", type=int, default=100, metavar="N",
                   help="of those, keep at most N per function (default 100)")
    p.add_argument("--shutdown-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="on SIGTERM, how long running jobs may take to finish (default 10)")
    p.add_argument("--enable-shutdown", action="store_true",
                   help="accept the admin 'shutdown' command (from loopback or "
                        "--admin-allow addresses only)")
    p.add_argument("--admin-allow", type=_network, action="append", default=[],
                   metavar="CIDR",
                   help="also accept mutating admin commands (cancel, create, drop, maxqueue, "
                        "shutdown, requeue) from this network; repeatable (default: loopback "
                        "only; read-only commands are open to anyone who can connect)")
    p.add_argument("--max-connections", type=int, default=10000, metavar="N",
                   help="close new connections at once beyond N open ones (default 10000)")
    p.add_argument("--idle-timeout", type=float, default=300.0, metavar="SECONDS",
                   help="close a connection that leaves a packet or admin line half-sent "
                        "for this long, or sends nothing for this long while nothing of it "
                        "is in flight (no job it waits on or holds, not a sleeping worker), "
                        "like Redis's timeout (default 300; 0 = never)")
    p.add_argument("--max-queue", type=int, default=0, metavar="N",
                   help="default maxqueue of every function (admin 'maxqueue' overrides it); "
                        "0 = unlimited (default, as gearmand)")
    p.add_argument("--max-client-jobs", type=int, default=10000, metavar="N",
                   help="foreground jobs one connection may wait on at once; more get "
                        "ERROR QUEUE_ERROR (default 10000; 0 = unlimited)")
    p.add_argument("--tls-cert", default=None, metavar="PEM",
                   help="certificate chain (PEM): the Gearman port then speaks TLS only")
    p.add_argument("--tls-key", default=None, metavar="PEM",
                   help="private key (PEM) of --tls-cert (default: in the --tls-cert file)")
    p.add_argument("--tls-ca", default=None, metavar="PEM",
                   help="CA certificates (PEM) that client certificates are checked "
                        "against; without --tls-require-client-cert they are optional")
    p.add_argument("--tls-require-client-cert", action="store_true",
                   help="mutual TLS: refuse connections without a client certificate "
                        "signed by --tls-ca")
    p.add_argument("--http-port", type=int, default=0, metavar="PORT",
                   help="also serve read-only HTTP on this port: Prometheus /metrics, "
                        "/healthz and a live status page at / (default 0: off)")
    p.add_argument("--http-host", default="", metavar="ADDRESS",
                   help="address of the HTTP endpoint (default: the same as --host); do "
                        "not expose it publicly: it shows function names, unique keys and "
                        "exception texts")
    p.add_argument("--result-ttl", type=float, default=600.0, metavar="SECONDS",
                   help="keep the outcome (done, failed, dead) of each background job "
                        "with a unique for this long, for the admin command 'result "
                        "UNIQUE' (default 600; 0 = keep none, as gearmand)")
    p.add_argument("--result-max-size", type=_size, default=1 << 20, metavar="BYTES",
                   help="a larger result is kept without its data, as a marker with its "
                        "size (default 1M)")
    p.add_argument("--result-memory", type=_size, default=64 << 20, metavar="BYTES",
                   help="memory all kept results may take; past it the oldest are "
                        "dropped first (default 64M)")
    p.add_argument("--metrics-max-functions", type=int, default=1000, metavar="N",
                   help="functions with series of their own in /metrics and rows in "
                        "/status.json; beyond N the busiest are kept (default 1000)")
    p.add_argument("--max-functions-per-connection", type=int, default=1000, metavar="N",
                   help="functions one connection may register (CAN_DO); more get "
                        "ERROR TOO_MANY_FUNCTIONS (default 1000; 0 = unlimited)")
    p.add_argument("--version", "-V", action="version", version=f"gearoffload-server {__version__}")
    return p


def parse_args(argv: list[str] | None = None) -> ServerConfig:
    """Parse command-line arguments into a ``ServerConfig`` (exit 2 with one line on error)."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        return ServerConfig(
            host=ns.host,
            port=ns.port,
            job_retries=ns.job_retries,
            handle_prefix=ns.job_handle_prefix or default_handle_prefix(),
            max_packet_size=ns.max_packet_size,
            max_output_buffer=ns.max_output_buffer,
            worker_wakeup=ns.worker_wakeup,
            verbose=ns.verbose,
            log_file=ns.log_file,
            log_format=ns.log_format,
            enable_shutdown=ns.enable_shutdown,
            queue=ns.queue,
            shutdown_timeout=ns.shutdown_timeout,
            retry_failed=ns.retry_failed,
            retry_backoff=ns.retry_backoff,
            history_max=ns.history_max,
            history_per_function=ns.history_per_function,
            admin_allow=tuple(ns.admin_allow),
            max_connections=ns.max_connections,
            idle_timeout=ns.idle_timeout,
            max_queue=ns.max_queue,
            max_client_jobs=ns.max_client_jobs,
            tls_cert=ns.tls_cert,
            tls_key=ns.tls_key,
            tls_ca=ns.tls_ca,
            tls_require_client_cert=ns.tls_require_client_cert,
            http_port=ns.http_port,
            http_host=ns.http_host,
            result_ttl=ns.result_ttl,
            result_max_size=ns.result_max_size,
            result_memory=ns.result_memory,
            metrics_max_functions=ns.metrics_max_functions,
            max_functions_per_connection=ns.max_functions_per_connection,
        )
    except ConfigError as exc:
        parser.error(str(exc))
        raise  # unreachable: error() exits
