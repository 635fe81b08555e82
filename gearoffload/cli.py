"""The ``gearoffload`` command: look at job servers and submit jobs from a shell.

::

    gearoffload status                      # functions: total, running, workers
    gearoffload workers                     # connections that registered functions
    gearoffload jobs                        # every job the server holds
    gearoffload submit resize '{"id": 7}'   # run a job, print its result
    gearoffload top                         # live view; q quits
    gearoffload dead                        # dead letters: jobs that used up their retries
    gearoffload dead show H:web1:9          # its arguments, attempts, error and traceback
    gearoffload dead retry H:web1:9         # run it again (or: dead delete H:web1:9)
    gearoffload history [FUNCTION]          # how recent jobs ended, newest first
    gearoffload find bg-3f2a...             # one job's attempts, by handle or unique key
    gearoffload --servers h1:4730,h2:4730 submit report - --background --wait < in.json

``--servers`` defaults to ``$GEAROFFLOAD_SERVERS`` or ``127.0.0.1:4730``. Exit codes:
0 success; 1 the job failed, raised, timed out or was refused, or the server answered an
error; 2 bad usage or a server that cannot be reached (one line on stderr, never a
traceback); 130 interrupted.

Uses gevent sockets directly (``Client``, ``AdminClient``), so nothing is monkey-patched.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import IO, Any, NoReturn

from .errors import (
    GearmanError,
    JobException,
    JobFailed,
    JobTimeout,
    NoServersAvailable,
    ProtocolError,
    ServerError,
)

__all__ = ["main", "Progress", "format_table"]

PROG = "gearoffload"
DEFAULT_SERVERS = "127.0.0.1:4730"
#: Admin commands without --timeout give up after this long.
ADMIN_TIMEOUT = 10.0
#: How long a submission keeps retrying unreachable servers (at most --timeout).
CONNECT_WINDOW = 3.0
#: How often ``submit --background --wait`` asks for the job's status.
POLL_INTERVAL = 0.2


class _UsageError(Exception):
    """Bad usage found after parsing (exit 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        sys.exit(2)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Align ``rows`` under ``headers``: numbers to the right, text to the left.

    >>> print(format_table(["FUNCTION", "TOTAL"], [["resize", 12], ["ocr", 3]]))
    FUNCTION  TOTAL
    resize       12
    ocr           3
    """
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    numeric = [all(isinstance(row[i], int) for row in rows) and bool(rows)
               for i in range(len(headers))]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        parts = [c.rjust(w) if numeric[i] else c.ljust(w)
                 for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


class Progress:
    """A progress bar drawn from WORK_STATUS numbers on ``stream`` (stderr).

    On a terminal the bar is redrawn in place; otherwise each change is one line, so logs
    and pipes read well::

        [############------------------]  2/5  40%

    Drawn by hand, not with rich: importing rich.progress adds about 0.1 s to every
    start of the command (measured: min 195 -> 340 ms).
    """

    def __init__(self, stream: IO[str], width: int = 30) -> None:
        self.stream = stream
        self.width = width
        try:
            self.tty = stream.isatty()
        except (AttributeError, ValueError):
            self.tty = False
        self._last: tuple[int, int] | None = None
        self._open = False  # a bar is drawn on the current terminal line

    def update(self, numerator: int, denominator: int) -> None:
        if (numerator, denominator) == self._last:
            return
        self._last = (numerator, denominator)
        fraction = min(max(numerator / denominator, 0.0), 1.0) if denominator > 0 else 0.0
        filled = round(fraction * self.width)
        bar = "#" * filled + "-" * (self.width - filled)
        text = f"[{bar}] {numerator:>{len(str(denominator))}}/{denominator} " \
               f"{round(fraction * 100):3d}%"
        if self.tty:
            self.stream.write("\r" + text)
            self._open = True
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def finish(self) -> None:
        """End the bar's line (before anything else is written)."""
        if self._open:
            self.stream.write("\n")
            self.stream.flush()
            self._open = False


def _servers(args: argparse.Namespace) -> list[str]:
    from .connection import format_address, parse_servers

    try:
        return [format_address(a) for a in parse_servers(args.servers)]
    except ValueError as exc:
        where = getattr(args, "servers_from", "--servers")
        raise _UsageError(f"bad {where} {args.servers!r}: {exc}") from None


def _admin_each(args: argparse.Namespace,
                query: Callable[[Any], list]) -> tuple[list | None, int]:
    """Run ``query(admin)`` on every server: ([(server, row)...], exit code); ``None``
    instead of the list when no server answered."""
    from .admin import AdminClient, HistoryDisabled

    results: list[tuple[str, Any]] = []
    code = 0
    answered = 0
    timeout = args.timeout if args.timeout is not None else ADMIN_TIMEOUT
    for server in _servers(args):
        try:
            with AdminClient(server, timeout=timeout, tls=args.tls) as admin:
                results.extend((server, row) for row in query(admin))
            answered += 1
        except HistoryDisabled as exc:  # its text names the server
            _error(str(exc))
            code = max(code, 1)
        except ServerError as exc:
            _error(f"{server}: {exc}")
            code = max(code, 1)
        except (NoServersAvailable, JobTimeout, ProtocolError) as exc:
            _error(str(exc))
            code = 2
    return (results if answered else None), code


def _print_rows(args: argparse.Namespace, results: list[tuple[str, Any]] | None,
                headers: list[str], cells: Callable[[Any], list[Any]]) -> None:
    if results is None:  # no server answered: the errors said it all
        return
    if args.json:
        rows = [dict(asdict(row), server=server) for server, row in results]
        print(json.dumps(rows, indent=2, default=_json_bytes))
        return
    several = len(_servers(args)) > 1
    table = [([server] if several else []) + cells(row) for server, row in results]
    print(format_table((["SERVER"] if several else []) + headers, table))


def _json_bytes(value: Any) -> str:
    """Bytes in --json output (a dead letter's payload): text, undecodable bytes escaped."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return repr(value)


def cmd_status(args: argparse.Namespace) -> int:
    if args.priority:
        results, code = _admin_each(args, lambda admin: admin.priority_status())
        _print_rows(args, results, ["FUNCTION", "HIGH", "NORMAL", "LOW", "WORKERS"],
                    lambda r: [r.name, r.high, r.normal, r.low, r.workers])
    else:
        results, code = _admin_each(args, lambda admin: admin.status())
        _print_rows(args, results, ["FUNCTION", "TOTAL", "QUEUED", "RUNNING", "WORKERS"],
                    lambda r: [r.name, r.total, r.queued, r.running, r.workers])
    return code


def cmd_workers(args: argparse.Namespace) -> int:
    results, code = _admin_each(args, lambda admin: admin.workers())
    if not args.all and results is not None:
        results = [(server, w) for server, w in results if w.functions]
    _print_rows(args, results, ["FD", "ADDRESS", "CLIENT_ID", "FUNCTIONS"],
                lambda w: [w.fd, w.address, w.client_id or "-", " ".join(w.functions)])
    return code


def cmd_jobs(args: argparse.Namespace) -> int:
    results, code = _admin_each(args, lambda admin: admin.jobs())

    def yes(flag: bool) -> str:
        return "yes" if flag else "no"

    _print_rows(args, results, ["HANDLE", "RETRIES", "ABANDONED", "BACKGROUND"],
                lambda j: [j.handle, j.retries, yes(j.abandoned), yes(j.persisted)])
    return code


def cmd_dead(args: argparse.Namespace) -> int:
    """``dead [list]``, ``dead show H``, ``dead retry H``, ``dead delete H``."""
    if args.action == "list":
        if args.handle:
            raise _UsageError("dead list takes no handle")
        results, code = _admin_each(args, lambda admin: admin.dead_jobs())
        _print_rows(args, results, ["HANDLE", "FUNCTION", "UNIQUE", "FAILURES"],
                    lambda d: [d.handle, d.function, d.unique, d.attempts])
        return code
    if not args.handle:
        raise _UsageError(f"dead {args.action} needs the job's HANDLE (see: gearoffload dead)")
    return _on_dead_job(args, args.handle)


def _on_dead_job(args: argparse.Namespace, handle: str) -> int:
    """Act on the dead letter ``handle`` on the server that holds it. Handles are per
    server: when several servers hold one, ``show`` prints each, and ``retry`` and
    ``delete`` refuse to guess (name the server with ``--servers``)."""
    from .admin import AdminClient, AdminError

    timeout = args.timeout if args.timeout is not None else ADMIN_TIMEOUT
    unreachable = []
    holders = []
    for server in _servers(args):
        try:
            with AdminClient(server, timeout=timeout, tls=args.tls) as admin:
                holders.append((server, admin.dead_job(handle)))
        except AdminError as exc:
            if exc.code != "UNKNOWN_JOB":
                _error(f"{server}: {exc}")
                return 1
        except (NoServersAvailable, JobTimeout, ProtocolError) as exc:
            unreachable.append(str(exc))
    for text in unreachable:
        _error(text)
    if not holders:
        _error(f"no dead letter {handle!r} on {', '.join(_servers(args))}"
               + (" (some servers did not answer)" if unreachable else ""))
        return 2 if unreachable else 1
    if args.action == "show":
        if args.json:  # one object, or a list of them when several servers hold the handle
            shown = [_dead_job_fields(server, dead) for server, dead in holders]
            print(json.dumps(shown[0] if len(shown) == 1 else shown, indent=2,
                             default=repr))
            return 0
        for server, dead in holders:
            _print_dead_job(server, dead)
        return 0
    if len(holders) > 1:
        _error(f"{handle} is a dead letter on {len(holders)} servers "
               f"({', '.join(server for server, _ in holders)}): say which with "
               f"--servers HOST:PORT (gearoffload dead show {handle} prints each)")
        return 2
    server = holders[0][0]
    try:
        with AdminClient(server, timeout=timeout, tls=args.tls) as admin:
            if args.action == "retry":
                admin.requeue_dead(handle)
                print(f"{handle}: queued again on {server}")
            else:
                admin.delete_dead(handle)
                print(f"{handle}: deleted on {server}")
    except AdminError as exc:  # retried or deleted by someone else meanwhile
        _error(f"{server}: {exc}")
        return 1
    except (NoServersAvailable, JobTimeout, ProtocolError) as exc:
        _error(str(exc))
        return 2
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    """``history [FUNCTION]``: how recent jobs ended, newest first."""
    results, code = _admin_each(args, lambda admin: admin.history(args.function))
    if results is not None:
        results.sort(key=lambda row: row[1].ended, reverse=True)
        results = results[:args.limit]
    _print_history(args, results)
    return code


def cmd_find(args: argparse.Namespace) -> int:
    """``find KEY``: a job's history and where it is now, by handle or unique key (an
    ``@offload`` job's ``id`` is its unique key)."""
    results, code = _admin_each(args, lambda admin: admin.find_job(args.key))
    if results == [] and not code:
        _error(f"no job {args.key!r} in the history or the queues of "
               f"{', '.join(_servers(args))}")
        return 1
    _print_history(args, results)
    return code


def _print_history(args: argparse.Namespace, results: list[tuple[str, Any]] | None) -> None:
    def clock(t: float) -> str:
        return time.strftime("%H:%M:%S", time.localtime(t)) if t else "-"

    def last_line(text: str) -> str:  # a traceback's last line names the exception
        lines = [line for line in text.splitlines() if line.strip()]
        return lines[-1][:80] if lines else "-"

    _print_rows(args, results,
                ["ENDED", "FUNCTION", "HANDLE", "UNIQUE", "OUTCOME", "SECONDS", "ATTEMPTS",
                 "ERROR"],
                lambda e: [clock(e.ended), e.function, e.handle, e.unique or "-", e.outcome,
                           f"{e.duration:.3f}" if e.ended else "-", e.attempts,
                           last_line(e.error)])


def _dead_job_fields(server: str, dead: Any) -> dict[str, Any]:
    from .core import describe_job

    info = describe_job(dead.data)
    payload = info.pop("payload")
    fields = dict(asdict(dead), server=server, **info)
    fields["data"] = None if info["arguments"] is not None else \
        payload.decode("utf-8", "backslashreplace")
    return fields


def _print_dead_job(server: str, dead: Any) -> None:
    from .core import describe_job

    info = describe_job(dead.data)
    died = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(dead.died)) \
        if dead.died else "unknown (stored by an older version)"
    payload = info.pop("payload")
    arguments = info["arguments"]
    shown = json.dumps(arguments, default=repr)[:2000] if arguments is not None else \
        repr(payload[:200]) + (" ..." if len(payload) > 200 else "")
    retry = info["retry"]
    policy = (f"{retry['retries']} retries, backoff {retry['backoff']:g}s (at most "
              f"{retry['backoff_max']:g}s)") if retry else "the server's --retry-failed"
    print(f"handle:    {dead.handle} (on {server})\n"
          f"function:  {dead.function}\n"
          f"unique:    {dead.unique or '-'}\n"
          f"attempts:  {dead.attempts}\n"
          f"died:      {died}\n"
          f"retry:     {policy}")
    print(f"arguments: {shown}")
    print("error:")
    print("    " + "\n    ".join((dead.error or "(no exception text: WORK_FAIL)").splitlines()))


def cmd_submit(args: argparse.Namespace) -> int:
    from .client import Client

    data = sys.stdin.buffer.read() if args.data == "-" else os.fsencode(args.data)
    servers = _servers(args)
    connect = CONNECT_WINDOW if args.timeout is None else min(args.timeout, CONNECT_WINDOW)
    progress = Progress(sys.stderr)
    out = sys.stdout.buffer
    client = Client(servers, timeout=args.timeout, connect_timeout=connect, tls=args.tls)
    try:
        job = client.submit(args.function, data, unique=args.unique, priority=args.priority,
                            background=args.background)
        if args.background:
            print(job.handle if len(servers) == 1 else f"{job.handle} {job.server}",
                  flush=True)
            if args.wait:
                _poll_until_done(job, args.timeout, progress, args.quiet)
            return 0
        for update in job.updates():
            if update.kind == "status":
                if not args.quiet:
                    progress.update(update.numerator or 0, update.denominator or 0)
            elif update.kind == "data":
                progress.finish()
                out.write(update.data)
                out.flush()
            else:
                progress.finish()
                _error(f"warning from the worker: "
                       f"{update.data.decode('utf-8', 'replace').rstrip()}", prefix=False)
        result = job.result()
        progress.finish()
        out.write(result or b"")
        if result and out.isatty() and not result.endswith(b"\n"):
            out.write(b"\n")
        out.flush()
        return 0
    except JobException as exc:
        progress.finish()
        _error(f"{args.function} job raised: {exc.text}")
        return 1
    except JobFailed as exc:
        progress.finish()
        _error(f"{args.function} job failed: {exc}")
        return 1
    except JobTimeout as exc:
        progress.finish()
        _error(str(exc))
        return 1
    except ServerError as exc:
        progress.finish()
        _error(f"the server refused the job: {exc}")
        return 1
    finally:
        client.close()


def cmd_top(args: argparse.Namespace) -> int:
    from .top import run_top

    return run_top(_servers(args), interval=args.interval, once=args.once,
                   iterations=args.iterations, timeout=args.timeout, tls=args.tls)


def _poll_until_done(job: Any, timeout: float | None, progress: Progress,
                     quiet: bool) -> None:
    """Wait for a background job by polling GET_STATUS until the server forgets it."""
    deadline = None if timeout is None else time.monotonic() + timeout
    import gevent

    while True:
        status = job.status(timeout=timeout)
        if not status.known:
            progress.finish()
            return
        if status.denominator and not quiet:
            progress.update(status.numerator, status.denominator)
        if deadline is not None and time.monotonic() >= deadline:
            raise JobTimeout(f"{job.function} job {job.handle} still running after "
                             f"{timeout}s")
        gevent.sleep(POLL_INTERVAL)


def _error(message: str, prefix: bool = True) -> None:
    line = " ".join(message.split())  # always one line
    sys.stderr.write(f"{PROG}: {line}\n" if prefix else f"{line}\n")
    sys.stderr.flush()


def _timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def build_parser() -> argparse.ArgumentParser:
    from . import top

    common = _Parser(add_help=False)
    common.add_argument("--servers", default=argparse.SUPPRESS, metavar="HOST:PORT[,...]",
                        help="job servers (default: $GEAROFFLOAD_SERVERS or "
                             f"{DEFAULT_SERVERS})")
    for name, what in (("ca", "CA certificates that sign the servers' certificates"),
                       ("cert", "our certificate, for mutual TLS"),
                       ("key", "the private key of --tls-cert")):
        common.add_argument(f"--tls-{name}", default=argparse.SUPPRESS, metavar="PEM",
                            help=f"connect with TLS: {what} (default: "
                                 f"$GEAROFFLOAD_TLS_{name.upper()})")
    common.add_argument("--timeout", type=_timeout, default=argparse.SUPPRESS,
                        metavar="SECONDS",
                        help="give up after this long (default: admin commands "
                             f"{ADMIN_TIMEOUT:g}s, jobs wait for their result)")
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="log connection problems to stderr")

    parser = _Parser(prog=PROG, parents=[common],
                     description="Look at Gearman job servers and submit jobs.",
                     epilog="exit codes: 0 ok, 1 job failed/raised/timed out or server "
                            "error, 2 usage or connection error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("status", parents=[common], help="jobs and workers per function")
    p.add_argument("-p", "--priority", action="store_true",
                   help="waiting jobs per priority (prioritystatus)")
    p.add_argument("--json", action="store_true", help="JSON instead of a table")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("workers", parents=[common], help="connected workers and functions")
    p.add_argument("-a", "--all", action="store_true",
                   help="every connection, also clients without functions")
    p.add_argument("--json", action="store_true", help="JSON instead of a table")
    p.set_defaults(func=cmd_workers)

    p = sub.add_parser("jobs", parents=[common], help="every job the servers hold")
    p.add_argument("--json", action="store_true", help="JSON instead of a table")
    p.set_defaults(func=cmd_jobs)

    p = sub.add_parser("submit", parents=[common], help="submit a job",
                       description="Submit a job. In the foreground (the default) wait for "
                       "it, show WORK_STATUS progress on stderr and print the result on "
                       "stdout; with --background print the job handle.")
    p.add_argument("function", metavar="FUNCTION")
    p.add_argument("data", metavar="DATA", help="the job's data; - reads it from stdin")
    p.add_argument("--background", "-b", action="store_true", help="do not wait for a result")
    p.add_argument("--unique", "-u", default=None, metavar="U",
                   help="unique ID: concurrent jobs with the same one run once")
    p.add_argument("--priority", choices=["high", "normal", "low"], default="normal")
    p.add_argument("--wait", "-w", action="store_true",
                   help="wait until the job is done (the default in the foreground; with "
                        "--background, poll its status until the server is done with it)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("dead", parents=[common], help="dead letters: list, show, retry, delete",
                       description="Background jobs that used up their retries (@offload("
                       "retries=N), or the server's --retry-failed). Without arguments, list "
                       "them; 'show H' prints one with its arguments, attempts, error and "
                       "traceback; 'retry H' runs it again; 'delete H' forgets it.")
    p.add_argument("action", nargs="?", default="list",
                   choices=["list", "show", "retry", "delete"])
    p.add_argument("handle", nargs="?", metavar="HANDLE", help="the job handle (from the list)")
    p.add_argument("--json", action="store_true", help="JSON instead of text")
    p.set_defaults(func=cmd_dead)

    p = sub.add_parser("history", parents=[common], help="how recent jobs ended",
                       description="The job history of our job servers (gearoffload-server "
                       "--history-max): recently ended jobs, newest first, with outcome "
                       "(done, failed, dead, lost, timeout, cancelled; retrying or requeued "
                       "for an attempt that runs again), duration, attempts and the error's "
                       "last line (--json: all of it).")
    p.add_argument("function", nargs="?", metavar="FUNCTION", help="only this function")
    p.add_argument("--limit", type=top.count_argument, default=50, metavar="N",
                   help="show the newest N (default 50)")
    p.add_argument("--json", action="store_true", help="JSON instead of a table")
    p.set_defaults(func=cmd_history)

    p = sub.add_parser("find", parents=[common], help="a job's history, by handle or unique",
                       description="Every attempt of the job whose handle or unique key is "
                       "KEY (an @offload job's id is its unique key), oldest first, then "
                       "where it is now if it is still queued, scheduled, running or a dead "
                       "letter.")
    p.add_argument("key", metavar="KEY", help="a job handle or unique key")
    p.add_argument("--json", action="store_true", help="JSON instead of a table")
    p.set_defaults(func=cmd_find)

    p = sub.add_parser("top", parents=[common], help="live view of queues and workers",
                       description="A live, top-like view of every server's functions: "
                       "queued, running, workers and how fast those change. q or Ctrl-C "
                       "quits.")
    top.add_arguments(p)
    p.set_defaults(func=cmd_top)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit code (0, 1, 2 or 130)."""
    args = build_parser().parse_args(argv)
    args.servers_from = "--servers"
    if not hasattr(args, "servers"):
        args.servers = os.environ.get("GEAROFFLOAD_SERVERS") or DEFAULT_SERVERS
        args.servers_from = "$GEAROFFLOAD_SERVERS"
    if not hasattr(args, "timeout"):
        args.timeout = None
    from .tls import client_context, tls_error_text, tls_from_env

    try:  # once, so that a bad file is one line before anything is sent
        args.tls = client_context(tls_from_env(
            getattr(args, "tls_ca", None), getattr(args, "tls_cert", None),
            getattr(args, "tls_key", None)))
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        sys.stderr.write(f"{PROG}: error: cannot use the TLS files: {tls_error_text(exc)} "
                         "(see --help)\n")
        return 2
    logger = logging.getLogger("gearoffload")
    if getattr(args, "verbose", False):
        logging.basicConfig(level=logging.WARNING, format=f"{PROG}: %(name)s: %(message)s")
    else:
        # Connection retries are logged as warnings; the command reports the outcome in
        # one line instead (and without a handler Python would print them anyway).
        logger.addHandler(logging.NullHandler())
        logger.propagate = False
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="backslashreplace")  # type: ignore[union-attr]
        except (AttributeError, ValueError):
            pass
    try:
        return args.func(args)
    except _UsageError as exc:
        sys.stderr.write(f"{PROG}: error: {exc} (see --help)\n")
        return 2
    except (NoServersAvailable, ProtocolError, OSError) as exc:
        _error(str(exc))
        return 2
    except GearmanError as exc:
        _error(str(exc))
        return 1
    except ValueError as exc:  # e.g. a unique longer than 64 bytes
        sys.stderr.write(f"{PROG}: error: {exc} (see --help)\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
