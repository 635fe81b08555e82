"""The job history: a bounded record of recently ended job attempts, in memory only.

One entry per ending (done, failed, dead, lost, timeout, cancelled) and per failed
attempt that is to run again (``retrying``, ``requeued``), so a job that failed twice
then succeeded shows its three attempts. Bounds: the last ``max_total`` endings of the
server, and of those at most ``per_function`` per function. Nothing is written to disk.

    >>> h = JobHistory(per_function=2, max_total=3)
    >>> for n in range(3):
    ...     h.record(b"H:%d" % n, b"f", b"u%d" % n, "done", 10.0, 11.0 + n, 1, "")
    >>> [e.handle for e in h.recent(b"f")]
    [b'H:2', b'H:1']
    >>> [e.outcome for e in h.find(b"u2")]
    ['done']
"""

from __future__ import annotations

import re
from collections import deque
from typing import NamedTuple

#: The error text kept per entry (``short_error``): at most this many lines and characters.
ERROR_LINES = 5
ERROR_CHARS = 1000


class Entry(NamedTuple):
    """One ended attempt of a job."""

    handle: bytes
    function: bytes
    unique: bytes
    outcome: str      # done failed dead lost timeout cancelled retrying requeued
    submitted: float  # epoch seconds
    ended: float
    attempts: int     # failed attempts + lost-worker requeues + 1
    error: str

    @property
    def duration(self) -> float:
        """Seconds from submission to this ending."""
        return max(self.ended - self.submitted, 0.0)

    def as_dict(self) -> dict[str, object]:
        """JSON-ready (``/history.json``)."""
        return {"handle": self.handle.decode(errors="replace"),
                "function": self.function.decode(errors="replace"),
                "unique": self.unique.decode(errors="replace"),
                "outcome": self.outcome, "submitted": self.submitted, "ended": self.ended,
                "duration": round(self.duration, 6), "attempts": self.attempts,
                "error": self.error}


_FRAME = re.compile(r'^\s*File "([^"\n]*)", line \d+')
#: Frames that are not the application's code: the worker framework (gearoffload's own
#: package), the standard library, installed packages.
_NOT_USER = re.compile(r"[/\\](?:gearoffload|site-packages|dist-packages|"
                       r"lib[/\\]python[\d.]+)[/\\]")


def short_error(text: str) -> str:
    """The error text worth keeping per entry: for a Python traceback, the exception
    line(s), then the innermost frame of the application's code (not gearoffload's, the
    standard library's or an installed package's) and the innermost frame of all, where
    it was raised, when that is another one; the first frames of a worker's traceback
    are always the framework's. Other text: its first lines (``first_lines``). At most
    ``ERROR_LINES`` lines and ``ERROR_CHARS`` characters.

    >>> tb = ('RuntimeError: no stock\\n\\nTraceback (most recent call last):\\n'
    ...       '  File "/venv/gearoffload/core.py", line 994, in run_task\\n'
    ...       '    result = run_as_task(job, lambda: body(payload))\\n'
    ...       '  File "/srv/app/tasks.py", line 12, in charge\\n'
    ...       '    raise RuntimeError("no stock")\\n'
    ...       'RuntimeError: no stock\\n')
    >>> print(short_error(tb))
    RuntimeError: no stock
      File "/srv/app/tasks.py", line 12, in charge
        raise RuntimeError("no stock")
    """
    if not text:
        return ""
    lines = text.rstrip("\n").split("\n")
    frames: list[tuple[int, int]] = []  # (first line, end) of each frame, outermost first
    i = 0
    while i < len(lines):
        match = _FRAME.match(lines[i])
        if match is None:
            i += 1
            continue
        indent = len(lines[i]) - len(lines[i].lstrip())
        end = i + 1
        # Its source line, and the ^^^ markers Python 3.11+ puts under it.
        while end < len(lines) and lines[end].strip() and \
                len(lines[end]) - len(lines[end].lstrip()) > indent:
            end += 1
        frames.append((i, end))
        i = end
    if not frames:
        return first_lines(text)
    last_end = frames[-1][1]
    exception = [line for line in lines[last_end:] if line.strip()] or [lines[0]]
    if len(exception) > 2:
        exception = exception[:2] + ["…"]
    shown = [frames[-1]]
    for frame in reversed(frames):
        if not _NOT_USER.search(_FRAME.match(lines[frame[0]])[1]):
            if frame is not frames[-1]:
                shown.insert(0, frame)
            break
    kept: list[str] = []
    for first, end in reversed(shown):  # innermost first, after the exception
        block = [line for line in lines[first:end] if line.strip().strip("^~")]
        if len(exception) + len(kept) + len(block) > ERROR_LINES and kept:
            break
        kept = block + kept
    short = "\n".join(exception + kept)
    return short if len(short) <= ERROR_CHARS else short[:ERROR_CHARS] + "…"


def first_lines(text: str) -> str:
    """The first ``ERROR_LINES`` lines of ``text``, at most ``ERROR_CHARS`` characters.

    >>> first_lines("a\\nb\\nc\\nd\\ne\\nf")
    'a\\nb\\nc\\nd\\ne\\n…'
    """
    if not text:
        return ""
    lines = text.split("\n", ERROR_LINES)
    if len(lines) > ERROR_LINES:
        lines[ERROR_LINES] = "…"
    text = "\n".join(lines)
    return text if len(text) <= ERROR_CHARS else text[:ERROR_CHARS] + "…"


class JobHistory:
    """Recent endings, per function (newest first when read) and in all.

    ``max_total`` bounds the memory: the history covers the last ``max_total``
    recorded endings, and keeps at most ``per_function`` of each function's.
    """

    def __init__(self, per_function: int = 100, max_total: int = 10000) -> None:
        self.per_function = per_function
        self.max_total = max_total
        self.by_function: dict[bytes, deque[tuple]] = {}
        #: Every recorded entry, oldest first; some may already have left their
        #: function's deque (its own bound), the slot still counts to ``max_total``.
        self._order: deque[tuple] = deque()

    def __len__(self) -> int:
        return sum(len(d) for d in self.by_function.values())

    def record(self, handle: bytes, function: bytes, unique: bytes, outcome: str,
               submitted: float, ended: float, attempts: int, error: str) -> None:
        """Add one entry."""
        self.add((handle, function, unique, outcome, submitted, ended, attempts, error))

    def add(self, entry: tuple) -> None:
        """Add one entry given as the fields of ``Entry`` in a plain tuple: the hot path
        (WORK_COMPLETE, once per job) builds it in the compiled state, where a tuple
        costs a fraction of a named tuple's Python-level ``__new__``."""
        entries = self.by_function.get(entry[1])
        if entries is None:
            entries = self.by_function[entry[1]] = deque(maxlen=self.per_function)
        entries.append(entry)
        order = self._order
        order.append(entry)
        if len(order) > self.max_total:
            oldest = order.popleft()
            entries = self.by_function[oldest[1]]
            if entries and entries[0] is oldest:
                entries.popleft()
                if not entries:
                    del self.by_function[oldest[1]]

    def recent(self, function: bytes | None = None, limit: int = 0) -> list[Entry]:
        """Entries of ``function`` (or of all functions), newest first."""
        if function is not None:
            rows = list(reversed(self.by_function.get(function, ())))
        else:
            rows = sorted((e for d in self.by_function.values() for e in d),
                          key=lambda e: e[5], reverse=True)
        return [Entry._make(e) for e in (rows[:limit] if limit else rows)]

    def find(self, key: bytes) -> list[Entry]:
        """Entries whose handle or unique is ``key``, oldest first."""
        if not key:
            return []
        return [Entry._make(e) for e in sorted(
            (e for d in self.by_function.values() for e in d if e[0] == key or e[2] == key),
            key=lambda e: e[5])]

    def functions(self) -> list[bytes]:
        """Functions with entries, sorted."""
        return sorted(self.by_function)
