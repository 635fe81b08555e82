"""``gearoffload-worker``: serve a module's tasks with N processes × M greenlets.

::

    gearoffload-worker myapp.tasks --servers 127.0.0.1:4730,127.0.0.1:4731 \\
        --processes 4 --concurrency 20

With ``--tls-ca`` (and ``--tls-cert``/``--tls-key`` for mutual TLS), or the variables
``GEAROFFLOAD_TLS_CA/CERT/KEY``, the workers connect with TLS (docs/tls.md).

The parent imports the module (or ``module:attr``) to check it, then starts N children,
each a fresh interpreter that imports it again and runs a ``Worker`` with M greenlets (not
a plain fork: the children run the code as it is on disk when they start, which is what
a reload needs). A child that dies is restarted with back-off (and logged). On SIGTERM
(or SIGINT) the pool drains: every child stops grabbing, finishes its running jobs and
exits; then the parent exits. A second signal, or ``--drain-timeout``, kills what is left
(the servers requeue those jobs). On SIGHUP the pool reloads, as gunicorn does: it starts
fresh children (which import the code anew: a deploy is picked up), and once every one is
registered with the servers it drains the old ones (SIGTERM: their running jobs finish);
the pool serves throughout. If the new children cannot start (the new code does not
import), the reload is abandoned, logged, and the old children keep serving.

Where the tasks come from:

- ``module:attr`` — ``attr`` is a ``Worker`` (its tasks are served; its servers and
  concurrency are replaced by the command line) or a ``TaskRegistry``;
- ``module`` — the module's ``Worker`` or ``TaskRegistry`` if it has exactly one, else the
  default registry filled by ``@gearoffload.task``;
- ``module:attr`` naming anything else (a Flask app with ``GearOffload``) — its offloaded
  views and the ``@offload`` functions (``gearoffload.loading.registry_for``);
- ``--wsgi module:app`` — also serve ``app`` as a WSGI app for ``OffloadMiddleware``.

With ``--schedule``, one more process runs a ``gearoffload.schedule.Scheduler`` for the
periodic tasks served (restarted if it dies, stopped on SIGTERM, replaced on SIGHUP).

Processes are for CPU-bound tasks (one core each); greenlets for I/O-bound ones.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import TYPE_CHECKING

from .loading import load_registry
from .supervisor import PoolConfig, configure_logging, run_pool

if TYPE_CHECKING:  # imported lazily at run time: main() must monkey-patch first
    from .registry import TaskRegistry

__all__ = ["PoolConfig", "main", "parse_args", "run_pool"]

log = logging.getLogger("gearoffload.pool")


def parse_args(argv: list[str] | None = None) -> PoolConfig:
    parser = argparse.ArgumentParser(
        prog="gearoffload-worker",
        description="Serve the tasks of a Python module with N processes x M greenlets.",
        epilog="Signals: SIGTERM or SIGINT drain (running jobs finish) and exit; SIGHUP "
               "reloads: fresh processes import the tasks anew, then the old ones drain.")
    parser.add_argument("target", help="module to import (myapp.tasks) or module:attr, "
                        "attr being a Worker or a TaskRegistry")
    parser.add_argument("--servers", default="",
                        help="comma-separated host:port list (default: a Flask app's "
                             "GEAROFFLOAD_SERVERS, else $GEAROFFLOAD_SERVERS, else "
                             "127.0.0.1:4730)")
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
    parser.add_argument("--wsgi-function", default="",
                        help="function name the middleware uses (default: "
                             "gearoffload.wsgi:<the app's import name>, as the middleware's)")
    parser.add_argument("--schedule", action="store_true",
                        help="also run a scheduler for the periodic tasks (@offload(every=...)"
                             " or cron=) in one more process; any number may run")
    for name, what in (("ca", "CA certificates that sign the servers' certificates"),
                       ("cert", "this worker's certificate, for mutual TLS"),
                       ("key", "the private key of --tls-cert")):
        env = f"GEAROFFLOAD_TLS_{name.upper()}"
        parser.add_argument(f"--tls-{name}", default=os.environ.get(env), metavar="PEM",
                            help=f"connect with TLS: {what} (default: ${env})")
    args = parser.parse_args(argv)
    servers = args.servers or os.environ.get("GEAROFFLOAD_SERVERS") or "127.0.0.1:4730"
    # Checked as the offload settings are (one line, exit 2, saying what to write
    # instead), whether they come from the command line or the environment.
    refusal = _bad_servers(servers, "--servers" if args.servers else "GEAROFFLOAD_SERVERS")
    if refusal:
        sys.stderr.write(f"gearoffload-worker: {refusal}\n")
        raise SystemExit(2)
    try:
        return PoolConfig(
            target=args.target,
            servers=tuple(s.strip() for s in servers.split(",") if s.strip()),
            servers_given=bool(args.servers),
            processes=args.processes, concurrency=args.concurrency,
            drain_timeout=args.drain_timeout, client_id=args.client_id,
            log_level=args.log_level, log_format=args.log_format,
            wsgi_function=args.wsgi_function if args.wsgi else None,
            tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key,
            schedule=args.schedule)
    except ValueError as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits


def _bad_servers(servers: str, source: str) -> str | None:
    """Why ``servers`` (a ``host:port,...`` list from ``source``) cannot be used."""
    from .connection import parse_servers

    try:
        parse_servers(servers)
    except ValueError as exc:
        return f"{source}: {exc}"
    return None


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``gearoffload-worker``."""
    from gevent import monkey

    monkey.patch_all()  # entry point: patch first, so task code's blocking I/O cooperates
    from .core import offloader_in_use

    config = parse_args(argv)
    configure_logging(config)
    try:
        registry = load_registry(config.target, config.wsgi_function)
    except (ImportError, AttributeError, TypeError, ValueError) as exc:
        sys.stderr.write(f"gearoffload-worker: cannot load tasks from {config.target}: "
                         f"{exc}\n")
        return 2
    try:
        # The offload settings (GEAROFFLOAD_* or the Flask app's) are read here, once:
        # a bad one is one line and exit 2, not a traceback in every worker process.
        offloader_in_use()
    except ValueError as exc:
        sys.stderr.write(f"gearoffload-worker: {exc}\n")
        return 2
    if not config.servers_given:
        config = _app_servers(config)
    if config.schedule:
        from .schedule import periodic_tasks

        if not periodic_tasks(registry):
            sys.stderr.write(f"gearoffload-worker: --schedule: {config.target} has no "
                             "periodic tasks (@offload(every=...) or cron=)\n")
            return 2
    refusal = _unsealable(registry)
    if refusal:
        sys.stderr.write(f"gearoffload-worker: {refusal}\n")
        return 2
    return run_pool(config, registry)


def _unsealable(registry: TaskRegistry) -> str | None:
    """Why the pool must not start: it serves offloaded functions, views or a WSGI app,
    whose jobs are sealed, but has no key to check them (and unsigned jobs are not
    explicitly allowed): every job would be refused, or worse, run unchecked."""
    from .core import NO_KEY, offloader_in_use
    from .offloading import OffloadedFunction

    sealed = [task.name for task in registry
              if isinstance(getattr(task.fn, "__self__", None), OffloadedFunction)
              or getattr(task.fn, "gearoffload_sealed", False)
              or isinstance(getattr(getattr(task.fn, "func", None), "__self__", None),
                            _view_types())]
    if sealed and not offloader_in_use().seal.usable:
        return f"cannot serve {', '.join(sorted(sealed)[:3])}: {NO_KEY}"
    return None


def _view_types() -> tuple[type, ...]:
    """The Flask view class, when Flask is installed (its tasks are sealed too)."""
    try:
        from .flask import OffloadedView
    except ImportError:
        return ()
    return (OffloadedView,)


def _app_servers(config: PoolConfig) -> PoolConfig:
    """The servers of the app the pool serves (a Flask app's ``GEAROFFLOAD_SERVERS`` and
    TLS files), when the command line names none."""
    import dataclasses

    from .core import offloader_in_use  # a Flask app's settings, once load_registry ran

    app = offloader_in_use().config
    return dataclasses.replace(config, servers=app.servers,
                               tls_ca=config.tls_ca or app.tls_ca,
                               tls_cert=config.tls_cert or app.tls_cert,
                               tls_key=config.tls_key or app.tls_key)


if __name__ == "__main__":
    sys.exit(main())
