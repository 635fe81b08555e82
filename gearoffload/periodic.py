"""When a periodic task is due: ``Schedule`` (every N seconds, or a cron expression in a
timezone, with a policy for missed slots) and the run-once unique key of each slot. Pure
time arithmetic: no I/O, no clock of its own.

``@offload(every=...)`` and ``@offload(cron=..., tz=..., missed=...)`` build a ``Schedule``
(``offloading.py``); the ``Scheduler`` (``schedule.py``) asks it which slots are due and
submits them.

Example::

    from gearoffload.periodic import Schedule

    s = Schedule(every=60)
    assert s.slots(0, 180) == [60.0, 120.0, 180.0]
    assert s.due(60.0, 185.0, lookback=600) == ([180.0], 0)   # missed="last"
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from .checks import duration
from .codec import stable_hash

__all__ = ["CRON_ALIASES", "MAX_CATCH_UP", "MAX_GRACE", "MIN_EVERY", "MISSED", "Schedule",
           "check_cron", "slot_key", "slot_unique"]

MISSED = ("last", "all", "none")
#: The shortest ``every=``: a scheduler passes about once a second (its ``--tick``).
MIN_EVERY = 1.0
#: The ``cron=`` aliases accepted (croniter's, each five fields: ``@daily`` is
#: ``0 0 * * *``). ``@reboot`` has no slots and is refused.
CRON_ALIASES = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight",
                "@hourly")
#: At most this many missed slots of one task are submitted at once (``missed="all"``).
MAX_CATCH_UP = 100
#: ``missed="none"`` still runs a slot this late at most (and half a period at most).
MAX_GRACE = 60.0


@dataclass(frozen=True)
class Schedule:
    """When a periodic task is due: every ``every`` seconds (slots aligned on the Unix
    epoch, so every scheduler agrees on them) or by a ``cron`` expression in the timezone
    ``tz``; ``missed`` says what runs of the slots missed meanwhile.

    Example::

        s = Schedule(every=60)
        assert s.slots(0, 180) == [60.0, 120.0, 180.0]
        nightly = Schedule(cron="0 3 * * *", tz="Europe/Paris")
    """

    every: float | None = None
    cron: str | None = None
    tz: str | None = None
    missed: str = "last"

    def __post_init__(self) -> None:
        if (self.every is None) == (self.cron is None):
            raise TypeError("a periodic task needs every= or cron=, not both")
        if not isinstance(self.missed, str):
            raise TypeError(f"missed= must be 'last', 'all' or 'none', not "
                            f"{type(self.missed).__name__} {self.missed!r}")
        if self.missed not in MISSED:
            raise ValueError(f"missed= must be 'last', 'all' or 'none', not {self.missed!r}")
        if self.every is not None:
            # seconds as a float: slots are then floats whatever was given (a timedelta)
            object.__setattr__(self, "every", duration(
                "every", self.every, minimum=MIN_EVERY,
                unit=" (the schedulers pass about once a second)"))
            if self.tz is not None:
                raise TypeError("tz= goes with cron=; every= slots are aligned on the Unix "
                                "epoch (UTC)")
            return
        check_cron(self.cron)
        if self.tz is not None and not isinstance(self.tz, str):
            raise TypeError(f"tz= must be an IANA timezone name (str), not "
                            f"{type(self.tz).__name__} {self.tz!r}")
        self.zone  # noqa: B018 - a bad timezone name fails at decoration time

    @property
    def zone(self) -> Any:
        """The cron expression's timezone (``tz``, default UTC)."""
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            return ZoneInfo(self.tz or "UTC")
        except (ZoneInfoNotFoundError, ValueError, TypeError):
            raise ValueError(f"tz= is not a known timezone name: {self.tz!r} (e.g. "
                             "'Europe/Paris', 'UTC')") from None

    def grace(self, slot: float) -> float:
        """How late ``slot`` may still run with ``missed="none"``: half the time since the
        slot before it, at most a minute (so the latest slot is not always "on time")."""
        if self.every is not None:
            period = self.every
        else:
            before = self.slots(slot - 400 * 86400, slot - 0.001, limit=1)
            period = slot - before[0] if before else MAX_GRACE * 2
        return min(period / 2, MAX_GRACE)

    def slots(self, after: float, until: float, limit: int = MAX_CATCH_UP) -> list[float]:
        """The slots ``s`` with ``after < s <= until`` (Unix times), oldest first; only the
        latest ``limit`` of them."""
        found: list[float] = []
        if self.every is not None:
            k = math.floor(until / self.every)
            while len(found) < limit and k * self.every > after:
                found.append(round(k * self.every, 6))
                k -= 1
        else:
            from croniter import croniter

            # get_prev() excludes its start: a millisecond past ``until`` includes it.
            it = croniter(self.cron, datetime.fromtimestamp(until + 0.001, self.zone))
            while len(found) < limit:
                slot = it.get_prev(float)
                if slot <= after:
                    break
                found.append(slot)
        found.reverse()
        return found

    def count(self, after: float, until: float) -> int:
        """How many slots fall in ``(after, until]`` (cron: counted up to 1000)."""
        if self.every is not None:
            return max(0, math.floor(until / self.every) - math.floor(after / self.every))
        return len(self.slots(after, until, limit=1000))

    def due(self, last: float | None, now: float, lookback: float) -> tuple[list[float], int]:
        """The slots to submit now, after ``last`` (the latest slot already handled; None
        on a scheduler's first pass), by the ``missed`` policy, never older than
        ``lookback`` seconds; and how many due slots were dropped for being older.

        Example::

            >>> Schedule(every=10, missed="all").due(100.0, 135.0, 600)
            ([110.0, 120.0, 130.0], 0)
            >>> Schedule(every=10).due(100.0, 135.0, 600)
            ([130.0], 0)
            >>> Schedule(every=10).due(100.0, 735.0, 600)
            ([730.0], 3)
        """
        oldest = now - lookback
        start = oldest if last is None else max(last, oldest)
        dropped = 0
        if last is not None and last < oldest:
            dropped = self.count(last, oldest)
        slots = self.slots(start, now)
        if self.missed == "last":
            slots = slots[-1:]
        elif self.missed == "none":
            slots = [s for s in slots[-1:] if now - s <= self.grace(s)]
        return slots, dropped


def check_cron(cron: Any) -> None:
    """Refuse what ``cron=`` must not be: not a string, not five fields (a sixth field
    is read by croniter as *seconds*, so a Quartz-style ``"0 0 3 * * *"`` would run every
    second from 03:00:00 to 03:00:59), random (``R``) or hashed (``H``) fields (each
    scheduler would draw its own slots), or what croniter does not parse. The aliases
    of ``CRON_ALIASES`` stand for five fields.

    Example::

        >>> check_cron("0 3 * * *"); check_cron("@daily")
        >>> check_cron("0 0 3 * * *")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: cron= takes five fields (...), not 6 in '0 0 3 * * *': seconds ...
    """
    if not isinstance(cron, str):
        raise TypeError(f"cron= must be a cron expression (str), not {type(cron).__name__} "
                        f"{cron!r}")
    try:
        from croniter import croniter
    except ImportError:
        raise ImportError("cron= needs croniter: pip install 'gearoffload[schedule]'") \
            from None
    fields = cron.split()
    if cron.strip().startswith("@"):
        if cron.strip().lower() not in CRON_ALIASES:
            raise ValueError(f"cron= alias {cron!r} is not one of {', '.join(CRON_ALIASES)}")
    elif len(fields) != 5:
        raise ValueError(f"cron= takes five fields (minute hour day-of-month month "
                         f"day-of-week), not {len(fields)} in {cron!r}: seconds (Quartz "
                         f"style) and years are not supported")
    elif any(field[:1].lower() in ("r", "h") for field in fields):
        raise ValueError(f"cron= {cron!r}: random (R) and hashed (H) fields are not "
                         "supported: every scheduler must compute the same slots")
    if not croniter.is_valid(cron):
        raise ValueError(f"cron= is not a valid cron expression: {cron!r}")


def slot_unique(name: str, slot: float) -> str:
    """The unique key of ``name``'s run for ``slot``: the same in every process, at most 64
    bytes, starting with ``once:`` (what the job server's run-once rule looks for)."""
    return "once:" + stable_hash(slot_key(name, slot))


def slot_key(name: str, slot: float) -> str:
    """What ``slot_unique`` hashes, and the unique a ``Scheduler`` submits (``once=True``
    makes the offload layer's ``once:`` key of it)."""
    return f"{name}@{slot:.3f}"
