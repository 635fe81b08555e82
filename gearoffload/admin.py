"""``AdminClient``: the text admin protocol of a Gearman job server, with typed replies.

Speaks the admin commands of ``docs/protocol.md`` §4 to one server (ours or gearmand)
over a gevent socket, one request at a time (greenlet-safe), and parses each reply into a
small frozen dataclass. Lines are framed by the shared codec (``Decoder(text=True)``);
nothing here parses packet bytes by hand. An ``ERR CODE text`` reply raises ``AdminError``
(a ``ServerError``) with the code and the text, ``+`` decoded to spaces.

Example::

    from gearoffload.admin import AdminClient

    with AdminClient("127.0.0.1:4730", timeout=5) as admin:
        for f in admin.status():
            print(f.name, f.queued, f.running, f.workers)   # resize 12 2 2
        print(admin.version())                              # '1.1.20+ds' or ours
        admin.maxqueue("resize", 1000)                      # at most 1000 jobs
        admin.cancel_job("H:host:42")                       # AdminError if unknown
        kept = admin.result("report-7")                     # a background job's outcome
        print(kept.state, kept.data)                        # done b'...'

Names and handles are ``str``; bytes that are not UTF-8 are kept as surrogate escapes,
so a name read from ``status()`` can be passed back to ``drop_function()`` unchanged.
Closing is optional but polite; a lost connection is reopened by the next call.
"""

from __future__ import annotations

import base64
import binascii
import re
import socket as _stdlib_socket
import time
from dataclasses import dataclass

from gevent import socket, ssl
from gevent.lock import RLock

from .connection import Address, format_address, parse_address
from .errors import GearmanError, JobTimeout, NoServersAvailable, ProtocolError, ServerError
from .protocol import MAX_LINE_SIZE, Decoder
from .tls import TlsOption, client_context, tls_error_text, wrap_client

__all__ = [
    "AdminClient",
    "AdminError",
    "FunctionStatus",
    "PriorityStatus",
    "WorkerInfo",
    "JobInfo",
    "DeadJob",
    "HistoryEntry",
    "KeptResult",
    "ResultsUnsupported",
    "HistoryDisabled",
]

RECV_SIZE = 64 * 1024
#: Admin replies are lines; a ``workers`` line of a worker with thousands of functions is
#: long, so the client accepts much longer lines than a server does.
MAX_REPLY_LINE = 16 * 1024 * 1024
#: ``ERR`` codes after which the server closes the connection: the client drops it too,
#: so that the next command reconnects instead of failing on the closed socket.
_CLOSING_ERRORS = frozenset({"LINE_TOO_LONG"})
_ENCODING = "utf-8"
_ERRORS = "surrogateescape"
#: What ``result`` refuses to send (the server refuses it too): a unique in an admin line
#: cannot hold spaces or line ends, and the server takes no control bytes.
_NOT_IN_UNIQUE = re.compile(rb"[\x00-\x20\x7f]")
MAX_UNIQUE = 64
RESULT_STATES = frozenset(("queued", "running", "done", "failed", "dead", "unknown"))


def _text(raw: bytes) -> str:
    return raw.decode(_ENCODING, _ERRORS)


def _int(raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise ProtocolError(f"expected a number in an admin reply, got {raw!r}") from None


class AdminError(ServerError):
    """The server answered an admin command with ``ERR <CODE> <text>``.

    ``code`` is the code word (``UNKNOWN_JOB``, ``UNKNOWN_COMMAND``...) and ``text`` the
    rest with ``+`` decoded to spaces; ``command`` is the line that was sent. gearmand
    answers some errors without a code (``ERR function not found``): then ``code`` is
    ``""`` and ``text`` holds the whole message.

    Example::

        try:
            admin.cancel_job("H:nope:1")
        except AdminError as exc:
            print(exc.code)          # UNKNOWN_JOB
    """

    def __init__(self, code: str, text: str, command: str = "") -> None:
        super().__init__(code, text)
        self.command = command
        message = f"{code}: {text}" if code and text else (code or text or "ERR")
        self.args = (f"{message} (admin command {command!r})" if command else message,)

    @classmethod
    def from_line(cls, line: str, command: str = "") -> AdminError:
        """Parse an ``ERR ...`` reply line (without its line ending).

        >>> e = AdminError.from_line("ERR UNKNOWN_COMMAND Unknown+server+commandfoo")
        >>> e.code, e.text
        ('UNKNOWN_COMMAND', 'Unknown server commandfoo')
        >>> e = AdminError.from_line("ERR function not found")
        >>> e.code, e.text
        ('', 'function not found')
        """
        rest = line[4:] if line.startswith("ERR ") else line[3:]
        code, _, text = rest.partition(" ")
        if code and code.replace("_", "").isalnum() and code.upper() == code:
            return cls(code, text.replace("+", " "), command)
        return cls("", rest.replace("+", " "), command)  # gearmand's code-less errors


class HistoryDisabled(AdminError):
    """The job server keeps no job history: it runs with ``--history-max 0`` (it answered
    ``ERR HISTORY_DISABLED``). ``history()`` raises it, and ``find_job()`` when the job
    is not queued, running, scheduled or dead either (else it returns that line alone).

    Example::

        try:
            entries = admin.history()
        except HistoryDisabled as exc:
            print(exc)   # ... keeps no job history: it runs with --history-max 0 ...
    """

    def __init__(self, code: str, text: str, command: str = "", server: str = "") -> None:
        super().__init__(code, text, command)
        where = f"the job server at {server}" if server else "the job server"
        self.args = (f"{where} keeps no job history: it runs with --history-max 0; start "
                     f"it with --history-max N to keep the last N endings (admin command "
                     f"{command!r})",)


class ResultsUnsupported(AdminError):
    """The job server keeps no results of background jobs: gearmand (or a gearoffload
    server older than the ``result`` command) answered ``ERR UNKNOWN_COMMAND``, or ours
    runs with ``--result-ttl 0`` (``ERR RESULTS_DISABLED``). Configure a Redis result
    backend instead, or start gearoffload-server with a ``--result-ttl``.

    Example::

        try:
            kept = admin.result("report-7")
        except ResultsUnsupported as exc:
            print(exc)   # ... does not keep results of background jobs (gearmand?) ...
    """

    def __init__(self, code: str, text: str, command: str = "", server: str = "") -> None:
        super().__init__(code, text, command)
        where = f"the job server at {server}" if server else "the job server"
        if code == "RESULTS_DISABLED":
            why = "keeps no results of background jobs: it runs with --result-ttl 0"
            fix = ("start gearoffload-server with --result-ttl SECONDS, or configure a "
                   "Redis result backend")
        else:
            why = ("does not keep results of background jobs: it does not know the admin "
                   "command 'result' (gearmand, or an older gearoffload-server?)")
            fix = "configure a Redis result backend, or use gearoffload-server"
        self.args = (f"{where} {why}; {fix} (server said: {code} {text})",)


@dataclass(frozen=True)
class KeptResult:
    """What the admin command ``result UNIQUE`` tells of a job (docs/protocol.md,
    "Extension: kept results of background jobs").

    ``state``: ``queued`` (also scheduled, or waiting for a retry), ``running``, ``done``,
    ``failed``, ``dead`` (a dead letter) or ``unknown`` (never seen, expired or evicted).
    ``numerator``/``denominator``: the job's last ``WORK_STATUS``. ``expires_in``: seconds
    until a kept outcome is forgotten (``None`` for a live or unknown job). ``data``: the
    WORK_COMPLETE data of ``done``, the exception text of ``failed``/``dead`` (``b""``
    for none), ``None`` for the other states or when the result was too large to keep;
    ``too_large`` is then its size in bytes (else ``None``).

    Example::

        >>> kept = KeptResult.parse("OK done 3 3 599.500 NDI=")
        >>> kept.state, kept.numerator, kept.expires_in, kept.data, kept.too_large
        ('done', 3, 599.5, b'42', None)
        >>> KeptResult.parse("OK running 4 10 - -").finished
        False
    """

    state: str
    numerator: int
    denominator: int
    expires_in: float | None
    data: bytes | None
    too_large: int | None

    @property
    def finished(self) -> bool:
        """The job has ended: ``done``, ``failed`` or ``dead``."""
        return self.state in ("done", "failed", "dead")

    @classmethod
    def parse(cls, line: str) -> KeptResult:
        """Parse a ``result`` reply line (``ProtocolError`` when it is not one)."""
        words = line.split(" ")
        if len(words) != 6 or words[0] != "OK" or words[1] not in RESULT_STATES:
            raise ProtocolError(f"unexpected reply to 'result': {line!r}")
        _, state, numerator, denominator, expires, data = words
        too_large = None
        if expires == "-":
            expires_in = None
        else:
            try:
                expires_in = float(expires)
            except ValueError:
                raise ProtocolError(f"unexpected expiry in a 'result' reply: {line!r}") from None
        if data == "-":
            value = None
        elif data == "!empty":
            value = b""
        elif data.startswith("!toolarge:"):
            value, too_large = None, _int(data[len("!toolarge:"):])
        else:
            try:
                value = base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError):
                raise ProtocolError(f"bad base64 in a 'result' reply: {line[:200]!r}") from None
        return cls(state, _int(numerator), _int(denominator), expires_in, value, too_large)


@dataclass(frozen=True)
class FunctionStatus:
    """One line of ``status``: ``total`` jobs (queued + running), ``running`` ones, and
    ``workers`` registrations (the same worker registering twice counts twice)."""

    name: str
    total: int
    running: int
    workers: int

    @property
    def queued(self) -> int:
        """Jobs waiting for a worker (``total - running``)."""
        return self.total - self.running


@dataclass(frozen=True)
class PriorityStatus:
    """One line of ``prioritystatus``: jobs *waiting* in each priority queue (running jobs
    are not counted) and the number of worker registrations."""

    name: str
    high: int
    normal: int
    low: int
    workers: int


@dataclass(frozen=True)
class WorkerInfo:
    """One line of ``workers``: one per connection (clients and admin connections too,
    with no functions). ``fd`` is the server-side socket number, ``client_id`` ``None``
    when the peer set none, ``functions`` most recently registered first."""

    fd: int
    address: str
    client_id: str | None
    functions: tuple[str, ...]


@dataclass(frozen=True)
class JobInfo:
    """One line of ``show jobs``: ``retries`` (requeues), ``abandoned`` (cancelled or
    its clients left), ``persisted`` (a background job)."""

    handle: str
    retries: int
    abandoned: bool
    persisted: bool


@dataclass(frozen=True)
class DeadJob:
    """A dead letter: a background job that used up its retries (``show dead jobs``;
    ``AdminClient.dead_job`` fills in ``attempts``, ``died``, ``data`` and ``error``).

    ``unique`` and ``function`` are as the server escapes them (``\\t``, ``\\n``).
    ``data`` is the job's payload as submitted (a gearoffload job: its retry line and
    seal, then the encoded arguments; ``gearoffload.core.describe_job`` reads it).
    ``error`` is the last exception text, the worker's traceback included; ``died`` the
    Unix time it was buried, 0 when unknown (stored by an older server version).
    """

    handle: str
    function: str
    unique: str
    attempts: int
    died: float = 0.0
    data: bytes = b""
    error: str = ""


@dataclass(frozen=True)
class HistoryEntry:
    """One ending in the server's job history (``show history``, ``find job``), or, from
    ``find_job``, where a job still is now (``outcome`` ``queued``, ``running``,
    ``scheduled`` or ``dead``; ``ended`` 0).

    ``outcome``: ``done``, ``failed``, ``dead``, ``lost``, ``timeout``, ``cancelled``, or
    a failed attempt that runs again: ``retrying`` (a failure), ``requeued`` (its worker
    was lost). ``attempts`` counts this one: 3 for the third run. ``submitted`` and
    ``ended`` are Unix times; ``error`` the first lines of the error, if any.
    """

    handle: str
    function: str
    unique: str
    outcome: str
    submitted: float
    ended: float
    attempts: int
    error: str = ""

    @property
    def duration(self) -> float:
        """Seconds from submission to this ending (0 for a job not ended)."""
        return max(self.ended - self.submitted, 0.0) if self.ended else 0.0


class AdminClient:
    """A connection to one server's text admin port (the Gearman port itself).

    ``server`` is ``"host:port"`` (``"host"`` means port 4730) or ``(host, port)``;
    ``timeout`` bounds connecting and every reply, in seconds (``None``: wait forever).
    Raises ``NoServersAvailable`` when the server cannot be reached or the connection
    is lost, ``JobTimeout`` when a reply does not come in time, ``AdminError`` on an
    ``ERR`` reply, ``ProtocolError`` on a reply that is not admin text. ``tls``: as for
    ``Client`` (``None``, ``True``, an ``ssl.SSLContext`` or ``tls_context()``'s arguments).

    Example::

        admin = AdminClient("127.0.0.1:4730")
        busy = [f.name for f in admin.status() if f.queued > 100]
        admin.close()
    """

    def __init__(self, server: str | Address = "127.0.0.1:4730",
                 timeout: float | None = 10.0, tls: TlsOption = None) -> None:
        self.address: Address = parse_address(server)
        self.tls = client_context(tls)
        self.name = format_address(self.address)
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._decoder = Decoder(text=True, max_line_size=MAX_REPLY_LINE)
        self._lines: list[str] = []
        self._deadline: float | None = None
        self._lock = RLock()

    def __repr__(self) -> str:
        return f"<AdminClient {self.name} {'open' if self._sock else 'closed'}>"

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection (idempotent); the next command reconnects."""
        sock, self._sock = self._sock, None
        self._decoder = Decoder(text=True, max_line_size=MAX_REPLY_LINE)
        self._lines.clear()
        if sock is not None:
            sock.close()

    # -- the commands -----------------------------------------------------------------

    def status(self) -> list[FunctionStatus]:
        """``status``: every function the server knows, sorted by name.

        >>> admin.status()                                       # doctest: +SKIP
        [FunctionStatus(name='resize', total=3, running=1, workers=2)]
        """
        rows = []
        for line in self._listing("status"):
            name, total, running, workers = self._fields(line, 4, "status")
            rows.append(FunctionStatus(name, _int(total), _int(running), _int(workers)))
        return sorted(rows, key=lambda r: r.name)

    def priority_status(self) -> list[PriorityStatus]:
        """``prioritystatus``: waiting jobs per priority for every function, by name.

        >>> admin.priority_status()                              # doctest: +SKIP
        [PriorityStatus(name='resize', high=0, normal=2, low=0, workers=2)]
        """
        rows = []
        for line in self._listing("prioritystatus"):
            name, high, normal, low, workers = self._fields(line, 5, "prioritystatus")
            rows.append(PriorityStatus(name, _int(high), _int(normal), _int(low),
                                       _int(workers)))
        return sorted(rows, key=lambda r: r.name)

    def workers(self) -> list[WorkerInfo]:
        """``workers``: one entry per connection, in the server's order.

        >>> [w for w in admin.workers() if w.functions]          # doctest: +SKIP
        [WorkerInfo(fd=37, address='127.0.0.1', client_id='w-1', functions=('resize',))]
        """
        rows = []
        for line in self._listing("workers"):
            # "FD IP CLIENT_ID :" then " FUNC" per registration (docs/protocol.md §4.3).
            parts = line.split(" ", 3)
            if len(parts) < 4 or not parts[3].startswith(":"):
                raise ProtocolError(f"unexpected 'workers' line {line!r}")
            fd, address, client_id, functions = parts
            rows.append(WorkerInfo(_int(fd), address, None if client_id == "-" else client_id,
                                   tuple(f for f in functions[1:].split(" ") if f)))
        return rows

    def jobs(self) -> list[JobInfo]:
        """``show jobs``: every job the server holds (queued or running).

        >>> admin.jobs()                                         # doctest: +SKIP
        [JobInfo(handle='H:host:7', retries=0, abandoned=False, persisted=True)]
        """
        rows = []
        for line in self._listing("show jobs"):
            handle, retries, abandoned, persisted = self._fields(line, 4, "show jobs")
            rows.append(JobInfo(handle, _int(retries), abandoned == "1", persisted == "1"))
        return rows

    def unique_jobs(self) -> list[str]:
        """``show unique jobs``: the unique ID of every job (``""`` for jobs without one).

        >>> admin.unique_jobs()                                  # doctest: +SKIP
        ['report-2024-06', '']
        """
        return self._listing("show unique jobs", tabbed=False)

    def dead_jobs(self) -> list[DeadJob]:
        """``show dead jobs`` (a gearoffload extension): the dead letters, oldest first;
        ``attempts`` there counts failed attempts only.

        >>> admin.dead_jobs()                                    # doctest: +SKIP
        [DeadJob(handle='H:web1:9', function='app.tasks.charge', unique='bg-...', attempts=4)]
        """
        rows = []
        for line in self._listing("show dead jobs"):
            handle, function, unique, failures = self._fields(line, 4, "show dead jobs")
            rows.append(DeadJob(handle, function, unique, _int(failures)))
        return rows

    def dead_job(self, handle: str) -> DeadJob:
        """``show dead job HANDLE``: one dead letter with its payload and last error
        (``AdminError`` with code ``UNKNOWN_JOB`` when there is no such dead letter).

        Example::

            dead = admin.dead_job("H:web1:9")
            print(dead.attempts, dead.error)     # the worker's traceback
        """
        command = f"show dead job {handle}"
        line_bytes = self._line("show dead job", handle)
        with self._lock:
            self._send(line_bytes)
            line = self._read_line(command)
        if not line.startswith("OK\t"):
            raise self._unexpected(line, command)
        fields = line.split("\t")
        if len(fields) != 7:
            raise ProtocolError(f"unexpected reply to {command!r}: {line[:200]!r}")
        _, function, unique, attempts, died, data, error = fields
        try:
            payload = b"" if data == "-" else base64.b64decode(data, validate=True)
            text = b"" if error == "-" else base64.b64decode(error, validate=True)
            when = float(died)
        except (binascii.Error, ValueError):
            raise ProtocolError(f"unexpected reply to {command!r}: {line[:200]!r}") from None
        return DeadJob(handle, function, unique, _int(attempts), when, payload,
                       text.decode("utf-8", "replace"))

    def requeue_dead(self, handle: str) -> None:
        """``requeue dead job HANDLE``: run a dead letter again, its retries renewed."""
        self._ok("requeue dead job", handle)

    def delete_dead(self, handle: str) -> None:
        """``delete dead job HANDLE``: forget a dead letter (its kept result stays)."""
        self._ok("delete dead job", handle)

    def retries(self) -> dict[str, tuple[int, int, int]]:
        """``show retries`` (a gearoffload extension; gearmand answers ``AdminError``):
        per function, (scheduled jobs: delayed or waiting to retry, failed attempts
        retried since the server started, dead letters).

        >>> admin.retries()                                      # doctest: +SKIP
        {'app.tasks.charge': (2, 17, 1)}
        """
        out = {}
        for line in self._listing("show retries"):
            name, scheduled, retried, dead = self._fields(line, 4, "show retries")
            out[name] = (_int(scheduled), _int(retried), _int(dead))
        return out

    def history(self, function: str | None = None) -> list[HistoryEntry]:
        """``show history [FUNCTION]`` (a gearoffload extension): recently ended jobs,
        newest first, of one function or all; failed attempts that run again too.
        Raises ``HistoryDisabled`` when the server keeps no history (``--history-max 0``).

        >>> [(e.outcome, e.attempts) for e in admin.history("app.tasks.charge")]  # doctest: +SKIP
        [('done', 3), ('retrying', 2), ('retrying', 1)]
        """
        command = "show history"
        if function is not None:
            command = self._line(command, function).decode(_ENCODING, _ERRORS).strip()
        return [self._history_entry(line, "show history")
                for line in self._history_listing(command)]

    def find_job(self, key: str) -> list[HistoryEntry]:
        """``find job KEY``: the history of the job whose handle or unique key is
        ``key``, oldest first, then where it is now if it is still queued, running,
        scheduled or a dead letter. Empty when the server knows nothing of it; with the
        history off (``--history-max 0``) only where it is now, ``HistoryDisabled`` when
        it is nowhere. ``ValueError`` for a key that is not one word.

        Example::

            for e in admin.find_job("order-42"):
                print(e.attempts, e.outcome, e.error)
        """
        command = self._line("find job", key).decode(_ENCODING, _ERRORS).strip()
        return [self._history_entry(line, "find job")
                for line in self._history_listing(command)]

    def _history_listing(self, command: str) -> list[str]:
        try:
            return self._listing(command)
        except AdminError as exc:
            if exc.code == "HISTORY_DISABLED":
                raise HistoryDisabled(exc.code, exc.text, command, self.name) from None
            raise

    @staticmethod
    def _history_entry(line: str, command: str) -> HistoryEntry:
        fields = line.split("\t")
        if len(fields) != 8:
            raise ProtocolError(f"unexpected {command!r} line {line[:200]!r}")
        handle, function, unique, outcome, submitted, ended, attempts, error = fields
        try:
            text = "" if error == "-" else base64.b64decode(error, validate=True).decode(
                "utf-8", "replace")
            return HistoryEntry(handle, function, unique, outcome, float(submitted),
                                float(ended), _int(attempts), text)
        except (binascii.Error, ValueError):
            raise ProtocolError(f"unexpected {command!r} line {line[:200]!r}") from None

    def version(self) -> str:
        """``version``: the server's version string, e.g. ``'1.1.20+ds'``."""
        return self._value("version")

    def getpid(self) -> int:
        """``getpid``: the server's process id."""
        return _int(self._value("getpid"))

    def verbose(self) -> str:
        """``verbose``: the server's log level name, e.g. ``'ERROR'``."""
        return self._value("verbose")

    def cancel_job(self, handle: str) -> None:
        """``cancel job HANDLE``: fail the job for its waiting clients and drop it
        (``AdminError`` with code ``UNKNOWN_JOB`` when the server does not know it).

        A job that is already running keeps running on its worker (docs/protocol.md §3.16).
        """
        self._ok("cancel job", handle)

    def create_function(self, name: str) -> None:
        """``create function NAME``: make an empty function known (e.g. for ``maxqueue``).

        The line is sent with ``\\r\\n``, so gearmand's two-byte truncation
        (docs/protocol.md §4.3) takes the ``\\r\\n`` and not the end of the name.
        """
        self._ok("create function", name)

    def drop_function(self, name: str) -> None:
        """``drop function NAME``: forget a function without workers or jobs.

        Raises ``AdminError`` when it is unknown or still in use (gearmand sends these
        errors without a code: ``exc.code == ""``, the reason is in ``exc.text``).
        """
        self._ok("drop function", name)

    def maxqueue(self, function: str, *limits: int) -> None:
        """``maxqueue``: limit how many jobs ``function`` may hold (0 = unlimited).

        No limit given removes the limits; one applies to every priority; three are
        high, normal and low. A limit on a function the server does not know yet is
        discarded by the server (create it first with ``create_function``).

        Example::

            admin.maxqueue("resize", 1000)        # every priority
            admin.maxqueue("resize", 10, 100, 0)  # high 10, normal 100, low unlimited
            admin.maxqueue("resize")              # unlimited again
        """
        if len(limits) not in (0, 1, 3):
            raise ValueError("maxqueue takes no limit, one limit, or three (high normal low)")
        if any(not isinstance(n, int) or isinstance(n, bool) for n in limits):
            raise TypeError("maxqueue limits must be integers")
        self._ok("maxqueue", function, *(str(n) for n in limits))

    def result(self, unique: str | bytes) -> KeptResult:
        """``result UNIQUE`` (a gearoffload extension): the state, progress and kept
        outcome of the background job with this unique, from any process.

        ``unique`` is 1 to 64 bytes without spaces or control characters (``ValueError``
        otherwise; a ``str`` is sent UTF-8). Raises ``ResultsUnsupported`` when the server
        keeps no results (gearmand; ours with ``--result-ttl 0``).

        Example::

            kept = admin.result("report-7")
            if kept.state == "done":
                report = json.loads(kept.data)     # kept.data is None if too_large
            elif kept.state == "unknown":
                ...                                # never submitted, or expired
        """
        raw = unique.encode(_ENCODING, _ERRORS) if isinstance(unique, str) else bytes(unique)
        if not raw or len(raw) > MAX_UNIQUE or _NOT_IN_UNIQUE.search(raw):
            raise ValueError(f"a unique must be 1 to {MAX_UNIQUE} bytes without spaces or "
                             f"control characters, not {unique!r}")
        command = "result " + _text(raw)
        with self._lock:
            self._send(b"result " + raw + b"\r\n")
            line = self._read_line(command)
        if line.startswith("OK "):
            return KeptResult.parse(line)
        if line.startswith("ERR "):
            error = self._error(line, command)
            if error.code in ("UNKNOWN_COMMAND", "RESULTS_DISABLED"):
                raise ResultsUnsupported(error.code, error.text, command, self.name)
            raise error
        raise self._unexpected(line, command)

    # -- plumbing ---------------------------------------------------------------------

    @staticmethod
    def _fields(line: str, count: int, command: str) -> list[str]:
        # Tab-separated, name first; split from the right so a name may hold a tab.
        fields = line.rsplit("\t", count - 1)
        if len(fields) != count:
            raise ProtocolError(f"unexpected {command!r} line {line!r}")
        return fields

    @staticmethod
    def _line(command: str, *args: str) -> bytes:
        """The line to send; ``ValueError`` for an argument that is not a word or a line
        the server would refuse as too long (it would also close the connection)."""
        for arg in args:
            if not arg or any(c in arg for c in " \t\r\n\0"):
                raise ValueError(f"admin arguments must be non-empty words, not {arg!r}")
        line = " ".join((command, *args)).encode(_ENCODING, _ERRORS)
        if len(line) > MAX_LINE_SIZE:
            raise ValueError(f"admin command {line[:40].decode(_ENCODING, _ERRORS)!r}... is "
                             f"{len(line)} bytes long; a server takes lines of at most "
                             f"{MAX_LINE_SIZE} bytes")
        return line + b"\r\n"

    def _error(self, line: str, command: str) -> AdminError:
        """The ``AdminError`` of an ``ERR`` reply; drops the connection when the server
        closes it after that error, so that the next command reconnects."""
        error = AdminError.from_line(line, command)
        if error.code in _CLOSING_ERRORS:
            self.close()
        return error

    def _listing(self, command: str, tabbed: bool = True) -> list[str]:
        """Send a listing command; return its lines (without the closing ``.``)."""
        with self._lock:
            self._send(self._line(command))
            lines = []
            while True:
                line = self._read_line(command)
                if line == ".":
                    if self._lines or self._decoder.buffered:
                        # More came after the end: a name or unique key holding a line
                        # break ended the listing early (a server that does not refuse
                        # or escape them). Rows may be forged or hidden: trust none.
                        self.close()
                        raise ProtocolError(f"data after the end of the {command!r} "
                                            "listing (a name with a line break?)")
                    return lines
                # An error comes instead of the listing, as its first and only line. A
                # function or handle starting with "ERR " still has tabs in its line.
                if not lines and (line == "ERR" or line.startswith("ERR ")) and (
                        not tabbed or "\t" not in line):
                    raise self._error(line, command)
                lines.append(line)

    def _value(self, command: str) -> str:
        """Send a command answered ``OK <value>``; return the value."""
        with self._lock:
            self._send(self._line(command))
            line = self._read_line(command)
        if line.startswith("OK "):
            return line[3:]
        raise self._unexpected(line, command)

    def _ok(self, command: str, *args: str) -> None:
        """Send a command answered ``OK``."""
        line_bytes = self._line(command, *args)
        sent = line_bytes[:-2].decode(_ENCODING, _ERRORS)
        with self._lock:
            self._send(line_bytes)
            line = self._read_line(sent)
        if line != "OK":
            raise self._unexpected(line, sent)

    def _unexpected(self, line: str, command: str) -> GearmanError:
        if line == "ERR" or line.startswith("ERR "):
            return self._error(line, command)
        self.close()  # we no longer know where the replies are
        return ProtocolError(f"unexpected reply to {command!r}: {line!r}")

    def _connect(self) -> socket.socket:
        if self._sock is not None:
            return self._sock
        try:
            sock = socket.create_connection(self.address, timeout=self.timeout)
        except OSError as exc:
            reason = exc.strerror or exc.__class__.__name__
            raise NoServersAvailable(f"cannot connect to {self.name}: {reason}") from None
        sock.setsockopt(_stdlib_socket.IPPROTO_TCP, _stdlib_socket.TCP_NODELAY, 1)
        if self.tls is not None:
            try:
                sock = wrap_client(self.tls, sock, self.address[0])
            except OSError as exc:  # ssl.SSLError, a reset, a timeout
                sock.close()
                raise NoServersAvailable(f"cannot connect to {self.name}: TLS handshake "
                                         f"failed: {tls_error_text(exc)}") from None
        self._sock = sock
        return sock

    def _send(self, data: bytes) -> None:
        sock = self._connect()
        self._deadline = None if self.timeout is None else time.monotonic() + self.timeout
        try:
            sock.settimeout(self.timeout)
            sock.sendall(data)
        except OSError as exc:
            self.close()
            raise self._lost(exc) from None

    def _lost(self, exc: OSError) -> NoServersAvailable:
        if isinstance(exc, ssl.SSLError):
            # Under TLS 1.3 a server refuses our certificate (or its absence) only after
            # the handshake: we learn it at our first write or read.
            return NoServersAvailable(
                f"connection to {self.name} lost: TLS: {tls_error_text(exc)} (a server "
                "with --tls-require-client-cert refuses peers without a certificate signed "
                "by its CA)")
        return NoServersAvailable(f"connection to {self.name} lost: {exc}")

    def _read_line(self, command: str) -> str:
        """The next reply line, framed by the codec; reads from the socket as needed."""
        while not self._lines:
            sock = self._sock
            if sock is None:
                raise NoServersAvailable(f"connection to {self.name} lost")
            remaining = None
            if self._deadline is not None:
                remaining = max(0.001, self._deadline - time.monotonic())
            try:
                sock.settimeout(remaining)
                data = sock.recv(RECV_SIZE)
            except (TimeoutError, ssl.SSLError) as exc:
                # gevent's SSL sockets time out with an SSLError, not a TimeoutError.
                if not (isinstance(exc, TimeoutError) or "timed out" in str(exc)):
                    self.close()
                    raise self._lost(exc) from None
                self.close()  # the reply may still come: this connection is out of step
                raise JobTimeout(f"no reply to {command!r} from {self.name} within "
                                 f"{self.timeout}s") from None
            except OSError as exc:
                self.close()
                raise NoServersAvailable(f"connection to {self.name} lost: {exc}") from None
            if not data:
                self.close()
                raise NoServersAvailable(f"{self.name} closed the connection")
            try:
                for item in self._decoder.feed(data):
                    if not isinstance(item, bytes):
                        raise ProtocolError(f"binary {item.name} packet in an admin reply")
                    self._lines.append(_text(item))
            except ProtocolError:
                self.close()
                raise
        return self._lines.pop(0)
