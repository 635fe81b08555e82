"""The text admin protocol (``docs/protocol.md`` §4), byte for byte as gearmand 1.1.20.

Reads and changes the same ``JobServerState`` as the binary protocol; output is computed
from that state, never kept in parallel. No I/O: replies go to ``peer.send``.

Example::

    >>> from gearoffload_server.state import JobServerState, ManualScheduler, Peer
    >>> from gearoffload_server.config import ServerConfig
    >>> state = JobServerState(ServerConfig(), ManualScheduler())
    >>> admin = AdminProtocol(state)
    >>> peer = state.connect(Peer(fd=5, address="127.0.0.1"))
    >>> admin.handle(peer, b"create function resize")
    >>> admin.handle(peer, b"status")
    >>> b"".join(peer.out)
    b'OK\\r\\nresize\\t0\\t0\\t0\\n.\\n'
"""

from __future__ import annotations

import base64
import ipaddress
import logging
import os
import re
import time
from collections.abc import Callable

from .history import Entry
from .state import DEAD, MAX_UNIQUE, QUEUED, RUNNING, SCHEDULED, JobServerState, Peer
from .status import jobs_named

MAX_WORDS = 5
#: Commands that change the server: only from loopback or ``--admin-allow`` networks.
MUTATING = frozenset((b"cancel", b"create", b"drop", b"maxqueue", b"shutdown", b"requeue",
                      b"delete"))
_SPACES = re.compile(b" +")
#: What a unique may not hold in ``result UNIQUE``: a line cannot carry spaces or line
#: ends, and control bytes would let a reply be forged in a log or a terminal.
_NOT_IN_UNIQUE = re.compile(rb"[\x00-\x20\x7f]")
_OK = b"OK\r\n"
_END = b".\n"
log = logging.getLogger("gearoffload.server")
#: At most one "admin command refused" log line per this many seconds: a peer on an
#: untrusted network must not be able to fill the log.
REFUSED_LOG_INTERVAL = 10.0


#: Separators of admin listings: a name or unique key holding one is escaped (``escape``).
_UNSAFE = re.compile(rb"[\t\n\r]")
_ESCAPES = {b"\t": b"\\t", b"\n": b"\\n", b"\r": b"\\r"}


def escape(value: bytes) -> bytes:
    r"""A unique key (or name) as it may appear in a listing: tab, LF and CR become
    ``\t``, ``\n``, ``\r``, so that no value can forge a row or end a listing early.
    Function names cannot hold them (refused); unique keys can, and are escaped.

    >>> escape(b"u\n.\n")
    b'u\\n.\\n'
    """
    if _UNSAFE.search(value) is None:
        return value
    return _UNSAFE.sub(lambda m: _ESCAPES[m.group()], value)


_STATE_NAMES = {QUEUED: b"queued", SCHEDULED: b"scheduled", RUNNING: b"running",
                DEAD: b"dead"}


def _history_line(e: Entry) -> bytes:
    """HANDLE FUNCTION UNIQUE OUTCOME SUBMITTED ENDED ATTEMPTS ERROR (base64, ``-``)."""
    error = e.error.encode()
    return b"%s\t%s\t%s\t%s\t%.3f\t%.3f\t%d\t%s\n" % (
        e.handle, escape(e.function), escape(e.unique), e.outcome.encode(), e.submitted,
        e.ended, e.attempts, base64.b64encode(error) if error else b"-")


def split_words(line: bytes) -> list[bytes]:
    """Split an admin line as gearmand does: on runs of spaces only (a tab is part of a
    word); a leading space gives an empty first word; trailing spaces are ignored."""
    words = _SPACES.split(line)
    while len(words) > 1 and not words[-1]:
        words.pop()
    return words


def _unknown(word: bytes) -> bytes:
    return b"ERR UNKNOWN_COMMAND Unknown+server+command" + word + b"\r\n"


def _incomplete(command: bytes) -> bytes:
    return (b"ERR INVALID_ARGUMENTS An+incomplete+set+of+arguments+was+sent+to+this+command+"
            + command + b"\r\n")


#: ``show history`` on a server with ``--history-max 0``: an answer, not an empty listing
#: (which would read as "nothing ended yet").
_HISTORY_OFF = (b"ERR HISTORY_DISABLED This+server+keeps+no+job+history+(--history-max+0)"
                b"\r\n")


def _atoi(text: bytes) -> int:
    match = re.match(rb"\s*([+-]?\d+)", text)
    return int(match.group(1)) if match else 0


def admitted(address_text: str, allow: tuple) -> bool:
    """Is ``address_text`` loopback or in one of the ``allow`` networks (``--admin-allow``)?
    The rule for changing the server: the admin port's mutating commands and the status
    page's buttons (``http.py``).

    >>> admitted("127.0.0.1", ()), admitted("10.1.2.3", ()), admitted("::ffff:127.0.0.1", ())
    (True, False, True)
    """
    try:
        address = ipaddress.ip_address(address_text.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # a dual-stack listener sees ::ffff:10.1.2.3
    if address.is_loopback:
        return True
    return any(address in net for net in allow if net.version == address.version)


class AdminProtocol:
    """Answers text admin lines from the state."""

    def __init__(self, state: JobServerState) -> None:
        self.state = state
        self.config = state.config
        self._refused = 0           # refusals since the last log line
        self._refused_log_at = 0.0
        self._commands: dict[bytes, Callable[[Peer, list[bytes]], bytes]] = {
            b"status": self._status,
            b"prioritystatus": self._priority_status,
            b"workers": self._workers,
            b"show": self._show,
            b"cancel": self._cancel,
            b"create": self._create,
            b"drop": self._drop,
            b"maxqueue": self._maxqueue,
            b"getpid": lambda peer, words: b"OK %d\n" % os.getpid(),
            b"verbose": lambda peer, words: b"OK %s\n" % self.config.verbose.encode(),
            b"version": lambda peer, words: b"OK %s\n" % self.config.version.encode(),
            b"shutdown": self._shutdown,
            b"requeue": self._requeue,
            b"delete": self._delete,
            b"result": self._result,
            b"find": self._find,
        }

    def _log_refusal(self, peer: Peer, name: bytes) -> None:
        self._refused += 1
        now = time.monotonic()
        if now >= self._refused_log_at:
            log.warning("%s fd=%d: admin %r refused (not loopback or --admin-allow); %d "
                        "refusal(s) (logged at most every %gs)", peer.address, peer.fd,
                        name.decode("latin-1"), self._refused, REFUSED_LOG_INTERVAL,
                        extra={"event": "admin.refused", "peer": peer.address,
                               "fd": peer.fd, "command": name.decode("latin-1")})
            self._refused = 0
            self._refused_log_at = now + REFUSED_LOG_INTERVAL

    def handle(self, peer: Peer, line: bytes) -> None:
        """Answer one admin line (without its line ending)."""
        words = split_words(line)
        if len(words) > MAX_WORDS:
            # gearmand closes the connection without a word; say what went wrong instead.
            peer.send(b"ERR INVALID_ARGUMENTS Too+many+arguments+(at+most+5+words)\r\n")
            return
        name = words[0].lower()
        command = self._commands.get(name)
        if command is None:
            peer.send(_unknown(words[0]))
        elif name in MUTATING and not self.may_change(peer) and not (
                name == b"shutdown" and not self.config.enable_shutdown):
            # (A disabled shutdown stays an unknown command for everyone, as in gearmand.)
            self._log_refusal(peer, name)
            peer.send(b"ERR PERMISSION_DENIED %s+is+only+allowed+from+loopback+or+"
                      b"--admin-allow+addresses\r\n" % name)
        else:
            peer.send(command(peer, words))

    def may_change(self, peer: Peer) -> bool:
        """May ``peer`` send mutating commands: loopback, or in an ``--admin-allow`` net."""
        return peer.loopback or admitted(peer.address, self.config.admin_allow)


    def _status(self, peer: Peer, words: list[bytes]) -> bytes:
        lines = [b"%s\t%d\t%d\t%d\n" % (f.name, f.total, f.running, len(f.workers))
                 for f in self.state.functions.values()]
        lines.append(_END)
        return b"".join(lines)

    def _priority_status(self, peer: Peer, words: list[bytes]) -> bytes:
        lines = [b"%s\t%d\t%d\t%d\t%d\n" % (f.name, f.queued[0], f.queued[1] + f.scheduled,
                                             f.queued[2], len(f.workers))
                 for f in self.state.functions.values()]
        lines.append(_END)
        return b"".join(lines)

    def _workers(self, peer: Peer, words: list[bytes]) -> bytes:
        lines = []
        for p in self.state.peers:
            names = b"".join(b" " + f.name for f in reversed(p.functions))
            lines.append(b"%d %s %s :%s\n" % (p.fd, p.address.encode(), p.client_id, names))
        lines.append(_END)
        return b"".join(lines)

    def _show(self, peer: Peer, words: list[bytes]) -> bytes:
        what = [w.lower() for w in words[1:]]
        if not what:
            return _unknown(words[0])
        if what == [b"jobs"]:
            lines = [b"%s\t%d\t%d\t%d\n" % (j.handle, j.retries, j.abandoned, j.background)
                     for j in self.state.jobs.values()]
        elif what == [b"unique", b"jobs"]:
            lines = [escape(j.unique) + b"\n" for j in self.state.jobs.values()]
        elif what == [b"dead", b"jobs"]:
            # Extension: dead letters (--retry-failed), HANDLE FUNCTION UNIQUE FAILURES.
            lines = [b"%s\t%s\t%s\t%d\n" % (j.handle, escape(j.function.name),
                                              escape(j.unique), j.failures)
                     for j in self.state.dead.values()]
        elif what[:2] == [b"dead", b"job"] and len(what) == 3:
            return self._dead_job(words[3])
        elif what == [b"retries"]:
            # Extension: FUNCTION SCHEDULED RETRIED DEAD per function (gearoffload top).
            dead: dict[bytes, int] = {}
            for job in self.state.dead.values():
                dead[job.function.name] = dead.get(job.function.name, 0) + 1
            names = dict.fromkeys([*self.state.functions, *dead])
            lines = []
            for name in names:
                func = self.state.functions.get(name)
                lines.append(b"%s\t%d\t%d\t%d\n" % (
                    escape(name), func.scheduled if func else 0, func.retried if func else 0,
                    dead.get(name, 0)))
        elif what[0] == b"history" and len(what) <= 2:
            # Extension: the job history, newest first (docs/protocol.md).
            history = self.state.history
            if history is None:
                return _HISTORY_OFF
            entries = history.recent(words[2] if len(words) > 2 else None)
            lines = [_history_line(e) for e in entries]
        else:
            return b"ERR UNKNOWN_SHOW_ARGUMENTS\r\n"
        lines.append(_END)
        return b"".join(lines)

    def _find(self, peer: Peer, words: list[bytes]) -> bytes:
        """Extension: ``find job KEY``: the history entries of the job whose handle or
        unique is KEY, oldest first, then a line for where it is now (``queued``,
        ``running``, ``scheduled``, ``dead``), if it is still there. With the history off
        (``--history-max 0``) only that line, if any: ``ERR HISTORY_DISABLED`` when the
        job is not there either (an empty answer would read as "no such job")."""
        if len(words) > 1 and words[1].lower() != b"job":
            return _unknown(words[0])
        if len(words) != 3:
            return (b"ERR INVALID_ARGUMENTS Usage:+find+job+HANDLE_OR_UNIQUE+(one+key)"
                    b"\r\n")
        key = words[2]
        state = self.state
        history = state.history
        lines = [_history_line(e) for e in (history.find(key) if history else [])]
        for job in jobs_named(state, key):
            where = _STATE_NAMES.get(job.state, b"?")
            lines.append(b"%s\t%s\t%s\t%s\t%.3f\t0\t%d\t-\n" % (
                job.handle, escape(job.function.name), escape(job.unique), where,
                job.submitted or job.since,
                job.failures + job.retries + (job.state != DEAD)))  # a dead one ran them all
        if history is None and not lines:
            return _HISTORY_OFF
        lines.append(_END)
        return b"".join(lines)

    def _requeue(self, peer: Peer, words: list[bytes]) -> bytes:
        """Extension: ``requeue dead job HANDLE`` runs a dead letter again."""
        if len(words) != 4 or [w.lower() for w in words[1:3]] != [b"dead", b"job"]:
            return _unknown(words[0])
        return _OK if self.state.requeue_dead(words[3]) else b"ERR UNKNOWN_JOB\r\n"

    def _dead_job(self, handle: bytes) -> bytes:
        """Extension: ``show dead job HANDLE`` answers one line, ``OK`` and six
        tab-separated fields: FUNCTION UNIQUE ATTEMPTS DIED DATA ERROR (the last two in
        base64, ``-`` when empty; DIED in Unix seconds, 0 when unknown: restored from a
        store written by an older version). docs/protocol.md, "Extension: dead letters"."""
        state = self.state
        job = state.dead.get(handle)
        if job is None:
            return b"ERR UNKNOWN_JOB\r\n"
        info = state.dead_info.get(handle)
        if info is not None:
            attempts, died, error = info.attempts, info.died, info.error.encode()
        else:  # stored by an older version: its kept result may still say why
            attempts, died, error = job.failures + job.retries, 0.0, b""
            kept = state.results.get(job.unique) if state.results is not None and \
                job.unique else None
            if kept is not None and kept.state == b"dead" and kept.data:
                error = kept.data
        return b"OK\t%s\t%s\t%d\t%.3f\t%s\t%s\n" % (
            escape(job.function.name), escape(job.unique), attempts, died,
            base64.b64encode(job.data) if job.data else b"-",
            base64.b64encode(error) if error else b"-")

    def _delete(self, peer: Peer, words: list[bytes]) -> bytes:
        """Extension: ``delete dead job HANDLE`` forgets a dead letter."""
        if len(words) != 4 or [w.lower() for w in words[1:3]] != [b"dead", b"job"]:
            return _unknown(words[0])
        return _OK if self.state.delete_dead(words[3]) else b"ERR UNKNOWN_JOB\r\n"

    def _result(self, peer: Peer, words: list[bytes]) -> bytes:
        """Extension: ``result UNIQUE`` answers ``OK STATE NUMERATOR DENOMINATOR EXPIRES
        DATA`` about the job with that unique: its live state and progress, or its kept
        outcome (``state.KeptResults``; the format is in docs/protocol.md)."""
        if len(words) != 2 or not words[1]:
            return _incomplete(b"result")
        unique = words[1]
        if len(unique) > MAX_UNIQUE or _NOT_IN_UNIQUE.search(unique):
            return (b"ERR INVALID_ARGUMENTS The+unique+must+be+1+to+64+bytes+without+spaces+"
                    b"or+control+characters\r\n")
        state = self.state
        if state.results is None:
            return (b"ERR RESULTS_DISABLED This+server+keeps+no+results+of+background+jobs+"
                    b"(--result-ttl+0)\r\n")
        name, numerator, denominator, kept = state.result_of(unique)
        if kept is None:
            return b"OK %s %d %d - -\n" % (name, numerator, denominator)
        expires_in = max(0.0, kept.expires - state.scheduler.now())
        if kept.data is None:
            data = b"!toolarge:%d" % kept.too_large
        elif not kept.data:
            data = b"!empty"  # base64 of nothing would be an empty word
        else:
            data = base64.b64encode(kept.data)
        return b"OK %s %d %d %.3f %s\n" % (name, numerator, denominator, expires_in, data)

    def _cancel(self, peer: Peer, words: list[bytes]) -> bytes:
        if len(words) < 3:
            return _unknown(words[0])
        if len(words) != 3 or words[1].lower() != b"job":
            return b"ERR UNKNOWN_ERROR\r\n"
        return _OK if self.state.cancel(words[2]) else b"ERR UNKNOWN_JOB\r\n"

    def _create(self, peer: Peer, words: list[bytes]) -> bytes:
        if len(words) != 3 or words[1].lower() != b"function":
            return _incomplete(b"create")
        if _UNSAFE.search(words[2]):
            return b"ERR INVALID_FUNCTION_NAME Function+name+must+not+contain+tabs\r\n"
        # gearmand drops two bytes of the name assuming "\r\n" (Q8); take it as written.
        self.state.function(words[2]).pinned = True  # kept without workers or jobs
        return _OK

    def _drop(self, peer: Peer, words: list[bytes]) -> bytes:
        if len(words) != 3 or words[1].lower() != b"function":
            return _incomplete(b"drop")
        wanted = words[2].lower()
        func = next((f for f in self.state.functions.values() if f.name.lower() == wanted), None)
        if func is None:
            return b"ERR function not found\r\n"
        if func.workers or func.running:
            return b"ERR there are still connected workers or executing clients\r\n"
        if func.total:
            # gearmand drops it anyway and orphans the queued jobs (Q9).
            return b"ERR there are still queued jobs\r\n"
        del self.state.functions[func.name]
        return _OK

    def _maxqueue(self, peer: Peer, words: list[bytes]) -> bytes:
        if len(words) < 2:
            return _incomplete(b"maxqueue")
        func = self.state.functions.get(words[1])
        numbers = [max(_atoi(w), 0) for w in words[2:]]
        if len(numbers) == 1:
            limits = numbers * 3
        else:
            limits = (numbers + [0, 0, 0])[:3]
        if func is not None:  # a limit on a function that does not exist is discarded
            func.limits = limits
            func.pinned = True  # a limit set by hand outlives its workers and jobs
        return _OK

    def _shutdown(self, peer: Peer, words: list[bytes]) -> bytes:
        if not self.config.enable_shutdown or self.state.on_shutdown is None:
            return _unknown(words[0])  # as gearmand >= 1.1.15 (docs/protocol.md §4.4)
        rest = [w.lower() for w in words[1:]]
        if rest not in ([], [b"graceful"]):
            return b"ERR UNKNOWN_ARGUMENTS Unknown+arguments+to+server+command\r\n"
        self.state.on_shutdown(bool(rest))
        return _OK
