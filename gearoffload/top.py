"""``gearoffload top``: a live terminal view of one or more job servers.

Polls each server through the text admin protocol (``status``, ``workers``, ``version``),
so it works against gearmand too, and our servers' ``show retries`` for the SCHED
(delayed jobs and retries not yet due), RETRIED (failed attempts run again) and DEAD
(dead letters) columns (``-`` against gearmand), and redraws a full-screen frame every
``--interval`` seconds::

    gearoffload top                               # $GEAROFFLOAD_SERVERS or 127.0.0.1:4730
    gearoffload --servers h1:4730,h2:4730 top --interval 2
    gearoffload top --once                        # one plain frame, for scripts

Rates come from the difference of two successive samples: ``dQUEUED/s`` and
``dRUNNING/s`` are how fast those counts change, not completions per second (``status``
does not tell how many jobs finished in between). ``q`` or Ctrl-C quits and restores the
terminal.
"""

from __future__ import annotations

import argparse
import os
import select
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO

import gevent

from .admin import AdminClient, AdminError, FunctionStatus, WorkerInfo
from .errors import GearmanError
from .tls import TlsOption

__all__ = ["Sample", "Poller", "FunctionRow", "function_rows", "render", "run_top"]

# ANSI: alternate screen + hidden cursor on entry, the reverse on exit; home and clear.
# Six ANSI sequences instead of rich: importing rich.live, rich.table and rich.console
# made the command start slower: min 195 -> 352 ms, median 384 -> 455 ms (15 runs).
ENTER = "\x1b[?1049h\x1b[?25l"
LEAVE = "\x1b[?25h\x1b[?1049l"
HOME = "\x1b[H"
CLEAR_LINE = "\x1b[K"
CLEAR_BELOW = "\x1b[J"
HEADERS = ("FUNCTION", "QUEUED", "RUNNING", "WORKERS", "SCHED", "RETRIED", "DEAD",
           "dQUEUED/s", "dRUNNING/s")


@dataclass(frozen=True)
class Sample:
    """What one poll of one server saw; ``error`` is set (and the rest empty) when it is
    down."""

    server: str
    at: float
    version: str = ""
    functions: tuple[FunctionStatus, ...] = ()
    connections: tuple[WorkerInfo, ...] = ()
    error: str | None = None
    #: ``show retries`` per function: (scheduled, retried, dead letters); ``None`` when
    #: the server does not know the command (gearmand).
    retries: dict[str, tuple[int, int, int]] | None = None

    @property
    def up(self) -> bool:
        return self.error is None

    @property
    def workers(self) -> int:
        """Connections that registered at least one function."""
        return sum(1 for c in self.connections if c.functions)


class Poller:
    """Keeps one admin connection to a server and samples it; a failure gives a down
    ``Sample`` and the next poll reconnects.

    Example::

        poller = Poller("127.0.0.1:4730", timeout=2.0)
        sample = poller.poll()
        print(sample.up, [f.name for f in sample.functions])
    """

    def __init__(self, server: str, timeout: float, tls: TlsOption = None) -> None:
        self.server = server
        self.admin = AdminClient(server, timeout=timeout, tls=tls)
        self._version = ""  # asked once per connection: it does not change
        self._retries = True  # the server answers ``show retries`` (not gearmand)

    def poll(self) -> Sample:
        now = time.monotonic()
        try:
            if not self._version:
                self._version = self.admin.version()
            functions = tuple(self.admin.status())
            connections = tuple(self.admin.workers())
            retries = None
            if self._retries:
                try:
                    retries = self.admin.retries()
                except AdminError:
                    self._retries = False  # gearmand: those columns stay "-"
        except (GearmanError, OSError) as exc:
            self.admin.close()
            self._version = ""
            self._retries = True
            return Sample(self.server, now, error=" ".join(str(exc).split()) or
                          type(exc).__name__)
        return Sample(self.server, now, self._version, functions, connections, None, retries)

    def close(self) -> None:
        self.admin.close()


@dataclass(frozen=True)
class FunctionRow:
    """One line of the table; the rates are ``None`` until there are two samples."""

    name: str
    queued: int
    running: int
    workers: int
    queued_rate: float | None = None
    running_rate: float | None = None
    scheduled: int | None = None  # delayed jobs and retries not yet due
    retried: int | None = None    # failed attempts run again, since the server started
    dead: int | None = None       # dead letters


def function_rows(current: Sample, previous: Sample | None = None) -> list[FunctionRow]:
    """The table for ``current``, busiest first (queued, then running, then name);
    rates are the change since ``previous`` per second.

    >>> s1 = Sample("h", 0.0, functions=(FunctionStatus("a", 10, 2, 1),))
    >>> s2 = Sample("h", 2.0, functions=(FunctionStatus("a", 6, 2, 1),
    ...                                   FunctionStatus("b", 1, 0, 0)))
    >>> [(r.name, r.queued, r.queued_rate) for r in function_rows(s2, s1)]
    [('a', 4, -2.0), ('b', 1, 0.5)]
    """
    before: dict[str, FunctionStatus] = {}
    elapsed = 0.0
    if previous is not None and previous.up:
        before = {f.name: f for f in previous.functions}
        elapsed = current.at - previous.at
    rows = []
    extra = current.retries
    functions = list(current.functions)
    if extra:  # a function may be gone from ``status`` and still have dead letters
        listed = {f.name for f in functions}
        functions += [FunctionStatus(name, 0, 0, 0) for name in extra if name not in listed]
    for f in functions:
        queued_rate = running_rate = None
        if elapsed > 0:
            old = before.get(f.name)
            old_queued, old_running = (old.queued, old.running) if old else (0, 0)
            queued_rate = (f.queued - old_queued) / elapsed
            running_rate = (f.running - old_running) / elapsed
        scheduled = retried = dead = None
        if extra is not None:
            scheduled, retried, dead = extra.get(f.name, (0, 0, 0))
        rows.append(FunctionRow(f.name, f.queued, f.running, f.workers, queued_rate,
                                running_rate, scheduled, retried, dead))
    rows.sort(key=lambda r: (-r.queued, -r.running, r.name))
    return rows


def _rate(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:+.1f}" if value else "0"


def _count_cell(value: int | None) -> str:
    return "-" if value is None else str(value)


def _header(sample: Sample) -> str:
    if not sample.up:
        return f"{sample.server}  DOWN  {sample.error}"
    queued = sum(f.queued for f in sample.functions)
    running = sum(f.running for f in sample.functions)
    # Our own admin connection is one of the connections `workers` lists. Kept short:
    # it should fit 80 columns, and the table below names the functions.
    return (f"{sample.server}  up  {sample.version}  {len(sample.connections)} connections  "
            f"{sample.workers} workers  {queued} queued  {running} running")


def _table(rows: Sequence[FunctionRow]) -> list[str]:
    cells = [list(HEADERS)] + [
        [r.name, str(r.queued), str(r.running), str(r.workers), _count_cell(r.scheduled),
         _count_cell(r.retried), _count_cell(r.dead), _rate(r.queued_rate),
         _rate(r.running_rate)] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(HEADERS))]
    return ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                      for i, (c, w) in enumerate(zip(row, widths, strict=True))).rstrip()
            for row in cells]


def render(samples: Sequence[Sample], previous: dict[str, Sample], interval: float,
           size: os.terminal_size | None = None, live: bool = False) -> list[str]:
    """The lines of one frame. With ``size``, every line is cut to the width and each
    server's table is shortened so that the whole frame fits the height; ``live`` adds
    the key hint to the title.

    >>> lines = render([Sample("h:1", 0.0, error="cannot connect")], {}, 1.0)
    >>> lines[2]
    'h:1  DOWN  cannot connect'
    """
    stamp = time.strftime("%H:%M:%S")
    up = sum(1 for s in samples if s.up)
    title = f"gearoffload top  {stamp}  every {interval:g}s  {up}/{len(samples)} servers up"
    lines = [title + ("  (q to quit)" if live else ""), ""]
    tables = []
    for sample in samples:
        table = _table(function_rows(sample, previous.get(sample.server))) \
            if sample.up else []
        tables.append((sample, table))
    if size is not None:
        # Headers and blank lines first; what is left goes to the tables, evenly.
        fixed = len(lines) + sum(2 for _ in tables)
        room = max(size.lines - fixed - 1, 0)
        per_table = room // max(sum(1 for _, t in tables if t), 1)
    for sample, table in tables:
        lines.append(_header(sample))
        if size is not None and len(table) > per_table:
            hidden = len(table) - max(per_table - 1, 1)
            table = table[:max(per_table - 1, 1)] + [f"... {hidden} more functions"]
        lines.extend(table)
        lines.append("")
    if size is not None:
        lines = [line[:size.columns].rstrip() for line in lines[:size.lines]]
    return lines


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # gevent's hub passes it on to the main greenlet


class Terminal:
    """The live screen: alternate screen, hidden cursor and cbreak input while inside the
    ``with`` block; everything is restored on the way out, whatever ends it (SIGTERM and
    SIGHUP, e.g. a closed terminal window, end it like Ctrl-C instead of killing the
    process with the terminal still in cbreak mode)."""

    def __init__(self, out: IO[str], keys: IO[str] | None) -> None:
        self.out = out
        self.keys = keys  # None: stdin is not a terminal, no key reading
        self._saved: list | None = None
        self._handlers: dict[int, object] = {}

    def __enter__(self) -> Terminal:
        for signum in (signal.SIGTERM, signal.SIGHUP):
            try:
                self._handlers[signum] = signal.signal(signum, _interrupt)
            except ValueError:  # not the main thread: leave signals alone
                break
        if self.keys is not None:
            import termios
            import tty

            fd = self.keys.fileno()
            self._saved = termios.tcgetattr(fd)
            tty.setcbreak(fd)  # keys without Enter; Ctrl-C still raises SIGINT
        self.out.write(ENTER)
        self.out.flush()
        return self

    def __exit__(self, *exc: object) -> None:
        self.out.write(LEAVE)
        self.out.flush()
        if self._saved is not None and self.keys is not None:
            import termios

            termios.tcsetattr(self.keys.fileno(), termios.TCSADRAIN, self._saved)
            self._saved = None
        for signum, handler in self._handlers.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        self._handlers.clear()

    def draw(self, lines: list[str]) -> None:
        self.out.write(HOME + "".join(line + CLEAR_LINE + "\r\n" for line in lines[:-1])
                       + (lines[-1] + CLEAR_LINE if lines else "") + CLEAR_BELOW)
        self.out.flush()

    def wait_for_quit(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True when ``q`` was pressed meanwhile."""
        deadline = time.monotonic() + seconds
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            if self.keys is None:
                time.sleep(remaining)
                return False
            ready, _, _ = select.select([self.keys], [], [], remaining)
            if ready:
                key = os.read(self.keys.fileno(), 32)
                if not key or b"q" in key.lower():
                    return True


def _poll_all(pollers: Sequence[Poller]) -> list[Sample]:
    """Poll every server at once (the admin client uses gevent sockets), so one slow
    server delays the frame by its own timeout, not the sum of them."""
    greenlets = [gevent.spawn(p.poll) for p in pollers]
    gevent.joinall(greenlets)
    return [g.value for g in greenlets]


def run_top(servers: Sequence[str], interval: float = 1.0, once: bool = False,
            iterations: int | None = None, timeout: float | None = None,
            tls: TlsOption = None, out: IO[str] = sys.stdout, err: IO[str] = sys.stderr,
            keys: IO[str] | None = None) -> int:
    """Show the servers until ``q``/Ctrl-C (or ``iterations`` frames); return the exit
    code: 0, or 1 when ``once`` found no server reachable.

    Example::

        run_top(["127.0.0.1:4730"], once=True)   # prints one plain frame
    """
    timeout = timeout if timeout is not None else max(1.0, min(interval, 5.0))
    pollers = [Poller(s, timeout, tls) for s in servers]
    previous: dict[str, Sample] = {}
    try:
        if once:
            samples = _poll_all(pollers)
            size = shutil.get_terminal_size() if out.isatty() else None
            out.write("\n".join(render(samples, previous, interval, size)).rstrip("\n")
                      + "\n")
            out.flush()
            if not any(s.up for s in samples):
                err.write(f"gearoffload: no server reachable "
                          f"({'; '.join(s.error or '' for s in samples)})\n")
                return 1
            return 0
        if keys is None and sys.stdin.isatty():
            keys = sys.stdin
        frames = 0
        with Terminal(out, keys) as term:
            try:
                while True:
                    samples = _poll_all(pollers)
                    term.draw(render(samples, previous, interval,
                                     shutil.get_terminal_size(), live=True))
                    previous = {s.server: s for s in samples}
                    frames += 1
                    if iterations is not None and frames >= iterations:
                        return 0
                    if term.wait_for_quit(interval):
                        return 0
            except KeyboardInterrupt:
                return 0  # Ctrl-C is the other way to quit, not an error
    finally:
        for poller in pollers:
            poller.close()


def _interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0.05 <= value <= 3600:
        raise argparse.ArgumentTypeError("must be between 0.05 and 3600 seconds")
    return value


def count_argument(text: str) -> int:
    """An argparse type: a whole number of at least 1 (``--iterations``, ``--limit``)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``gearoffload top`` (the command registers the subcommand)."""
    parser.add_argument("-n", "--interval", type=_interval, default=1.0, metavar="SECONDS",
                        help="seconds between polls (default 1)")
    parser.add_argument("--once", action="store_true",
                        help="print one frame without terminal escapes and exit (exit 1 "
                             "when no server answers)")
    parser.add_argument("--iterations", type=count_argument, default=None, metavar="N",
                        help="stop after N frames")
