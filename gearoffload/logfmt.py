"""Log formatters for the server and the worker pool: ``--log-format text|json``.

Log calls pass the facts an operator filters on as ``extra`` fields::

    log.warning("job %s of %s requeued", handle, name,
                extra={"event": "job.worker_lost", "handle": handle, "function": name,
                       "peer": "10.0.0.7", "fd": 12})

``text`` renders the usual line and appends ``key=value`` for each field present;
``json`` renders one JSON object per line::

    >>> import logging
    >>> record = logging.makeLogRecord({"name": "gearoffload.server", "levelname": "INFO",
    ...     "msg": "job %s requeued", "args": ("H:x:1",), "created": 0.0,
    ...     "handle": "H:x:1", "fd": 9})
    >>> JsonFormatter().format(record)
    '{"ts": "1970-01-01T00:00:00.000Z", "level": "INFO", "logger": "gearoffload.server", \
"msg": "job H:x:1 requeued", "handle": "H:x:1", "fd": 9}'

Entry points choose the formatter (``make_formatter``); library modules only log.
"""

from __future__ import annotations

import json
import logging
import time

__all__ = ["FIELDS", "LOG_FORMATS", "JsonFormatter", "TextFormatter", "make_formatter"]

#: The structured fields, in the order they are written. ``event`` is a short stable
#: name (``conn.protocol_error``, ``job.timeout``...) to filter on; ``msg`` stays prose.
FIELDS = ("event", "handle", "function", "unique", "peer", "fd", "server", "command")
LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _iso_utc(created: float) -> str:
    """``2026-11-28T14:53:57.123Z``: ISO 8601, UTC, milliseconds."""
    seconds = int(created)
    millis = int((created - seconds) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


def _fields(record: logging.LogRecord) -> list[tuple[str, object]]:
    return [(key, record.__dict__[key]) for key in FIELDS
            if record.__dict__.get(key) is not None]


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``level``, ``logger``, ``pid`` (with
    ``pid=True``, for the worker pool's several processes), ``msg``, the ``FIELDS``
    present, and ``exc`` (the traceback text) when the record carries an exception."""

    def __init__(self, pid: bool = False) -> None:
        super().__init__()
        self.pid = pid

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": _iso_utc(record.created),
            "level": record.levelname,
            "logger": record.name,
        }
        if self.pid:
            entry["pid"] = record.process
        entry["msg"] = record.getMessage()
        for key, value in _fields(record):
            # bytes (a handle straight from the state) must not break the line
            entry[key] = value.decode("utf-8", "replace") if isinstance(value, bytes) \
                else value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # default=str: an odd field value (an address tuple...) is written, not fatal
        return json.dumps(entry, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """The classic line (``fmt``) with `` key=value`` appended per field present; a
    value with spaces, quotes or ``=`` is JSON-quoted so the line stays parseable.

    >>> import logging
    >>> r = logging.makeLogRecord({"msg": "closed", "levelname": "INFO", "name": "s",
    ...                            "peer": "127.0.0.1", "fd": 7, "event": "conn.closed"})
    >>> TextFormatter("%(message)s").format(r)
    'closed event=conn.closed peer=127.0.0.1 fd=7'
    """

    def __init__(self, fmt: str = TEXT_FORMAT) -> None:
        super().__init__(fmt)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = _fields(record)
        if not fields:
            return line
        extra = " ".join(f"{key}={_quote(value)}" for key, value in fields)
        # The traceback (if any) stays last, after the fields of its first line.
        head, newline, rest = line.partition("\n")
        return f"{head} {extra}{newline}{rest}"


def _quote(value: object) -> str:
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    if not text or any(c in text for c in ' "=\t\n\r'):
        return json.dumps(text, ensure_ascii=False)
    return text


def make_formatter(kind: str, fmt: str = TEXT_FORMAT, pid: bool = False) -> logging.Formatter:
    """The formatter for ``--log-format kind``; ``fmt`` is the text layout, ``pid`` adds
    the process id to JSON objects.

    >>> type(make_formatter("json")).__name__
    'JsonFormatter'
    """
    if kind == "json":
        return JsonFormatter(pid)
    if kind == "text":
        return TextFormatter(fmt)
    raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, not {kind!r}")
