"""Entry point of ``gearoffload-server`` (and ``python -m gearoffload_server``)."""

import select
import sys

if not hasattr(select, "epoll"):
    # The server's poll loop is epoll (Linux); the library runs wherever gevent does.
    print(f"gearoffload-server: needs Linux (its poll loop uses epoll), not {sys.platform}",
          file=sys.stderr)
    sys.exit(2)

from gevent import monkey  # noqa: E402

monkey.patch_all()  # entry points patch, first thing; library modules never do

import logging  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import signal  # noqa: E402

import gevent  # noqa: E402

from gearoffload.logfmt import make_formatter  # noqa: E402
from gearoffload.protocol import ACCELERATED  # noqa: E402

from . import STATE_COMPILED  # noqa: E402
from .config import ServerConfig, parse_args  # noqa: E402
from .server import GearmanServer  # noqa: E402
from .stores import StoreError  # noqa: E402

# gearmand's level names mapped onto the logging module's.
_LEVELS = {
    "FATAL": logging.CRITICAL, "ALERT": logging.CRITICAL, "CRITICAL": logging.CRITICAL,
    "ERROR": logging.ERROR, "WARNING": logging.WARNING, "NOTICE": logging.INFO,
    "INFO": logging.INFO, "DEBUG": logging.DEBUG,
}


def configure_logging(config: ServerConfig) -> None:
    handler: logging.Handler
    if config.log_file and config.log_file not in ("stderr", "-"):
        handler = logging.FileHandler(config.log_file)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(make_formatter(config.log_format))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(_LEVELS[config.verbose])


def raise_fd_limit() -> None:
    """Every connection is a file descriptor; the usual soft limit of 1024 is too low."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    raise_fd_limit()
    try:
        configure_logging(config)
    except OSError as exc:
        sys.stderr.write(f"gearoffload-server: cannot open log file: {exc}\n")
        return 2
    server = GearmanServer(config)
    try:
        server.start()  # binds the port, then opens the queue store and replays it
    except StoreError as exc:
        sys.stderr.write(f"gearoffload-server: {exc}\n")
        return 2
    except OSError as exc:
        sys.stderr.write(
            f"gearoffload-server: cannot listen on {config.host}:{config.port}: "
            f"{exc.strerror or exc}\n")
        return 2
    http = None
    if config.http_port:
        # Imported only when asked for: prometheus_client costs start-up time.
        from .http import HttpEndpoint

        http = HttpEndpoint(server.state, config.http_address,
                            config.metrics_max_functions)
        try:
            http.start()
        except OSError as exc:
            server.stop()
            host, port = config.http_address
            sys.stderr.write(f"gearoffload-server: cannot listen on {host}:{port} "
                             f"(--http-port): {exc.strerror or exc}\n")
            return 2
    gevent.signal_handler(signal.SIGTERM, server.shutdown)
    gevent.signal_handler(signal.SIGINT, server.stop)
    gevent.signal_handler(signal.SIGUSR1, server.stop_graceful)
    host, port = server.address[:2]
    logging.getLogger("gearoffload.server").info(
        "gearoffload-server %s listening on %s:%d (pid %d, %s codec, %s state)",
        config.version, host, port, os.getpid(),
        # Without a C compiler (or Cython) at install time the server runs slower, up to
        # about twice: say so where an operator looks first.
        "C" if ACCELERATED else "pure-Python", "compiled" if STATE_COMPILED else "pure-Python")
    if server.store is not None:
        logging.getLogger("gearoffload.server").info(
            "queue %s: %d background jobs restored, and %d kept results",
            server.store.describe(), server.restored, server.restored_results)
    if http is not None:
        logging.getLogger("gearoffload.server").info(
            "HTTP on http://%s:%d/ (status page, /metrics, /healthz)", *http.address)
    server.serve_forever()
    if http is not None:
        http.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
