"""The command line of ``gearoffload-server``: argparse into a ``settings.ServerConfig``.

The settings themselves (the dataclass and its checks) live in ``settings.py``, which the
job state imports; this module is the CLI edge, and the only one that loads the TLS files
to check them before the server starts.

Example::

    >>> from gearoffload_server.config import ServerConfig, parse_args
    >>> parse_args(["--port", "4731", "--job-retries", "3"]).port
    4731
"""

from __future__ import annotations

import argparse
import ipaddress
import sys

from gearoffload import __version__
from gearoffload.protocol import DEFAULT_MAX_PACKET_SIZE

from .settings import (  # noqa: F401  (re-exported: the CLI's names predate settings.py)
    LOG_LEVELS,
    MAX_HANDLE_PREFIX,
    MAX_RESULT_SIZE,
    ConfigError,
    IPNetwork,
    ServerConfig,
    default_handle_prefix,
    default_queue,
)


def check_tls(config: ServerConfig) -> None:
    """Load the TLS files once, so that a wrong file (not PEM, key not matching the
    certificate) is one line at start, not an error at the first connection."""
    if not config.tls_cert:
        return
    from .tls import server_context

    try:
        server_context(config.tls_cert, config.tls_key, config.tls_ca,
                       config.tls_require_client_cert)
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
        description="A Gearman job server (binary and text admin protocol) on gevent. "
                    "Needs Linux: its poll loop is epoll.",
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
                   help="also serve HTTP on this port: Prometheus /metrics, /healthz and "
                        "a live status page at / whose dead-letter Retry/Delete buttons "
                        "work for loopback and --admin-allow viewers (default 0: off)")
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
        config = ServerConfig(
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
        check_tls(config)
        return config
    except ConfigError as exc:
        parser.error(str(exc))
        raise  # unreachable: error() exits
