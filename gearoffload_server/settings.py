"""The server's settings: a frozen, validated dataclass, with no command line behind it.

The job state and the I/O shell read these; ``config.py`` builds them from the CLI
(argparse), and tests or embedders build them directly. Nothing here imports argparse or
the TLS module, so the compiled job state does not pull either in.

Example::

    >>> from gearoffload_server.settings import ServerConfig
    >>> ServerConfig(port=4731, job_retries=3).job_retries
    3
"""

from __future__ import annotations

import ipaddress
import os
import socket
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
    #: The job history (``history.JobHistory``): the last N job endings, in memory; 0 = off.
    history_max: int = 10000
    #: Of those, at most N per function.
    history_per_function: int = 100
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
    #: Port of the HTTP endpoint (/metrics, /healthz, status page and its two dead-letter
    #: buttons); 0 = off.
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
