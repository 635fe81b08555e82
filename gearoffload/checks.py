"""Argument checks shared by ``@offload``, Flask views and ``Schedule``: one rule for
durations everywhere, so that ``every="10"`` and ``delay="5"`` are refused alike.

A duration is a real number of seconds (``int``, ``float``; not ``bool``, not ``str``) or
a ``timedelta``: a wrong type is a ``TypeError``, a value out of range (negative, NaN,
infinite, below a minimum) a ``ValueError``, each naming the argument. Pure: no I/O.

Example::

    >>> from datetime import timedelta
    >>> duration("delay", timedelta(minutes=2))
    120.0
    >>> duration("delay", "5")
    Traceback (most recent call last):
    ...
    TypeError: delay= must be a number of seconds or a timedelta, not str '5'
"""

from __future__ import annotations

import math
import numbers
from datetime import timedelta
from typing import Any

__all__ = ["duration", "flag", "names"]


def duration(name: str, value: Any, *, minimum: float = 0.0, exclusive: bool = False,
             maximum: float | None = None, unit: str = "") -> float:
    """``value`` in seconds, checked: finite, at least ``minimum`` (above it with
    ``exclusive``), at most ``maximum``. ``unit`` adds why the bound is what it is.

    Example::

        >>> duration("every", 0.5, minimum=1.0)
        Traceback (most recent call last):
        ...
        ValueError: every= must be at least 1 second, not 0.5
    """
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}= must be a number of seconds or a timedelta, not "
                        f"{type(value).__name__} {value!r}")
    else:
        seconds = float(value)
    if not math.isfinite(seconds):
        raise ValueError(f"{name}= must be a finite number of seconds, not {value!r}")
    if exclusive and not seconds > minimum:
        bound = "positive" if minimum == 0 else f"more than {_seconds(minimum)}"
        raise ValueError(f"{name}= must be {bound}{unit}, not {_shown(value)}")
    if not seconds >= minimum:
        bound = "0 or more" if minimum == 0 else f"at least {_seconds(minimum)}"
        raise ValueError(f"{name}= must be {bound}{unit}, not {_shown(value)}")
    if maximum is not None and seconds > maximum:
        raise ValueError(f"{name}= must be at most {_seconds(maximum)}{unit}, not "
                         f"{_shown(value)}")
    return seconds


def flag(name: str, value: Any) -> bool:
    """``value`` if it is a ``bool``; a ``TypeError`` otherwise (``jitter="no"`` is a
    non-empty string, which would read as true).

    Example::

        >>> flag("jitter", "no")
        Traceback (most recent call last):
        ...
        TypeError: jitter= must be True or False, not str 'no'
    """
    if not isinstance(value, bool):
        raise TypeError(f"{name}= must be True or False, not {type(value).__name__} "
                        f"{value!r}")
    return value


def names(name: str, value: Any) -> tuple[str, ...]:
    """A list of names (``vary=``, ``carry_g=``...) as a tuple; a lone string is refused
    (it would be read one character at a time).

    Example::

        >>> names("vary", ["Accept-Language"])
        ('Accept-Language',)
    """
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{name}= takes a list of names, not the string {value!r} (write "
                        f"[{value!r}])")
    try:
        items = tuple(value)
    except TypeError:
        raise TypeError(f"{name}= takes a list of names, not {type(value).__name__} "
                        f"{value!r}") from None
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"{name}= takes names (str), not {type(item).__name__} "
                            f"{item!r}")
    return items


def _seconds(value: float) -> str:
    return "1 second" if value == 1 else f"{value:g} seconds"


def _shown(value: Any) -> str:
    return str(value) if isinstance(value, timedelta) else repr(value)
