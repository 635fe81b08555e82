"""The job history on its own (``gearoffload_server.history``): bounds and search."""

from __future__ import annotations

import json

from gearoffload.core import traceback_text
from gearoffload_server.history import (
    ERROR_CHARS,
    ERROR_LINES,
    JobHistory,
    first_lines,
    short_error,
)


def add(h: JobHistory, n: int, function: bytes = b"f", outcome: str = "done",
        unique: bytes = b"") -> None:
    h.record(b"H:%d" % n, function, unique or b"u%d" % n, outcome, 100.0, 100.0 + n, 1, "")


def test_bounded_per_function_newest_first():
    h = JobHistory(per_function=3, max_total=100)
    for n in range(10):
        add(h, n)
    assert [e.handle for e in h.recent(b"f")] == [b"H:9", b"H:8", b"H:7"]
    assert len(h) == 3
    assert [e.handle for e in h.recent(b"f", limit=2)] == [b"H:9", b"H:8"]


def test_bounded_in_all_the_oldest_go_first_whatever_their_function():
    h = JobHistory(per_function=100, max_total=5)
    for n in range(4):
        add(h, n, b"a")
    for n in range(4, 8):
        add(h, n, b"b")
    assert len(h) == 5
    assert [e.handle for e in h.recent(b"a")] == [b"H:3"]
    assert [e.handle for e in h.recent(b"b")] == [b"H:7", b"H:6", b"H:5", b"H:4"]
    assert [e.handle for e in h.recent()] == [b"H:7", b"H:6", b"H:5", b"H:4", b"H:3"]
    # A function whose every entry went is forgotten.
    for n in range(8, 13):
        add(h, n, b"b")
    assert h.functions() == [b"b"] and len(h) == 5


def test_memory_stays_bounded_when_one_function_is_busy():
    h = JobHistory(per_function=2, max_total=10)
    for n in range(10_000):
        add(h, n, b"busy")
    add(h, 10_000, b"quiet")
    assert len(h) == 3 and len(h._order) <= 10
    assert [e.handle for e in h.recent()] == [b"H:10000", b"H:9999", b"H:9998"]


def test_search_by_handle_or_unique_oldest_first():
    h = JobHistory()
    h.record(b"H:1", b"f", b"order-42", "retrying", 10.0, 11.0, 1, "boom")
    h.record(b"H:1", b"f", b"order-42", "retrying", 10.0, 12.0, 2, "boom")
    h.record(b"H:1", b"f", b"order-42", "done", 10.0, 13.5, 3, "")
    add(h, 7)
    by_unique = h.find(b"order-42")
    assert [(e.outcome, e.attempts) for e in by_unique] == [
        ("retrying", 1), ("retrying", 2), ("done", 3)]
    assert h.find(b"H:1") == by_unique
    assert by_unique[-1].duration == 3.5
    assert [e.handle for e in h.find(b"u7")] == [b"H:7"]
    assert h.find(b"nothing") == [] and h.find(b"") == []
    assert by_unique[0].as_dict()["unique"] == "order-42"


def test_error_text_keeps_its_first_lines_truncated():
    trace = "\n".join(f"line {i}" for i in range(50))
    kept = first_lines(trace)
    assert kept.count("\n") == ERROR_LINES and kept.endswith("…")
    assert kept.startswith("line 0\nline 1")
    assert len(first_lines("x" * 100_000)) == ERROR_CHARS + 1
    assert first_lines("") == ""


def _charge(order: int) -> None:
    raise RuntimeError(f"no stock for order {order}")


def _parse(text: str) -> object:
    return json.loads(text)


def _text_of(call) -> str:
    """The text a gearoffload worker sends for an exception (core.traceback_text)."""
    try:
        call()
    except Exception as exc:
        return traceback_text(exc)
    raise AssertionError("no exception")


def test_short_error_is_the_exception_line_and_the_users_frame():
    text = _text_of(lambda: _charge(7))
    assert text.splitlines()[2] == "Traceback (most recent call last):"  # the framework's
    short = short_error(text).splitlines()
    assert short[0] == "RuntimeError: no stock for order 7"
    assert short[1].endswith(", in _charge") and "test_history.py" in short[1]
    assert short[2].strip() == 'raise RuntimeError(f"no stock for order {order}")'
    assert len(short) == 3


def test_short_error_of_a_library_exception_shows_the_users_frame_and_where_it_broke():
    short = short_error(_text_of(lambda: _parse("{bad"))).splitlines()
    assert short[0].startswith("json.decoder.JSONDecodeError: Expecting property name")
    assert short[1].endswith(", in _parse") and short[2].strip() == "return json.loads(text)"
    assert "json" in short[3] and len(short) <= ERROR_LINES


def test_short_error_of_a_chained_exception_is_the_last_one_raised():
    def chained():
        try:
            _charge(1)
        except RuntimeError as exc:
            raise KeyError("order 1") from exc

    short = short_error(_text_of(chained)).splitlines()
    assert short[0] == "KeyError: 'order 1'" and short[1].endswith(", in chained")


def test_short_error_of_other_text_is_its_first_lines():
    assert short_error("") == ""
    assert short_error("ValueError: boom") == "ValueError: boom"
    assert short_error("a\nb\nc\nd\ne\nf\ng") == first_lines("a\nb\nc\nd\ne\nf\ng")
    huge = 'Traceback (most recent call last):\n  File "a.py", line 1, in f\n    x()\n' + \
        "E: " + "x" * 5000
    assert len(short_error(huge)) == ERROR_CHARS + 1
    many = 'Traceback (most recent call last):\n  File "a.py", line 1, in f\n    x()\n' + \
        "E: one\ntwo\nthree\nfour"
    assert short_error(many).splitlines() == ["E: one", "two", "…", '  File "a.py", line 1, '
                                              "in f", "    x()"]


def test_doctests():
    import doctest

    from gearoffload_server import history
    assert doctest.testmod(history).failed == 0
