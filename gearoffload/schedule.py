"""The ``Scheduler`` that submits the due slots of periodic tasks (``@offload(every=...)``
or ``@offload(cron=..., tz=...)``; when a slot is due: ``periodic.Schedule``), so that each
runs once across the fleet, and its command ``python -m gearoffload.schedule``.

Example (``myapp/tasks.py``)::

    from datetime import timedelta
    from gearoffload import offload

    @offload(every=timedelta(minutes=5))
    def refresh_rates():
        ...

    @offload(cron="0 3 * * *", tz="Europe/Paris", missed="none")
    def nightly_cleanup():
        ...

and any number of schedulers, anywhere::

    gearoffload-worker myapp.tasks --schedule        # beside a worker pool
    python -m gearoffload.schedule myapp.tasks       # on its own (one per web host...)

How a slot runs once with no lock service: each due slot is submitted as a background job
whose unique key is ``once:`` + a stable hash of (task, slot). Every scheduler computes the
same key, so the client's consistent hash sends every copy to the same job server, which
coalesces the copies of a slot that is queued or running; a copy that comes after the
slot has finished finds its kept result and is acknowledged without running
(docs/protocol.md, "Extension: run-once uniques"); an acknowledged slot is durable (the
server's queue store). So the fleet's memory of what ran is the job servers' kept
results, and a scheduler never submits a slot older than their TTL
(``GEAROFFLOAD_RESULT_TTL``, the servers' ``--result-ttl``): it could not be deduplicated.

Missed slots (a scheduler down, late, or no job server reachable) follow ``missed=``:

- ``"last"`` (default): run only the latest slot that is due;
- ``"all"``: run every due slot still inside the look-back window (at most 100);
- ``"none"``: run a slot only within a short grace of its time (half the period, at most
  60 s).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from .periodic import Schedule, slot_key

if TYPE_CHECKING:
    from .core import Offloader
    from .offloading import OffloadedFunction
    from .registry import TaskRegistry

__all__ = ["Scheduler", "main", "periodic_tasks"]

log = logging.getLogger("gearoffload.schedule")


def periodic_tasks(registry: TaskRegistry | None = None) -> list[OffloadedFunction]:
    """The periodic ``@offload`` functions of ``registry`` (default: every one imported)."""
    from .offloading import OffloadedFunction
    from .registry import registry as default_registry

    found = []
    for task in registry if registry is not None else default_registry:
        fn = getattr(task.fn, "__self__", None)
        if isinstance(fn, OffloadedFunction) and fn.schedule is not None:
            found.append(fn)
    return found


class Scheduler:
    """Submits the due slots of periodic tasks, as run-once background jobs.

    ``run()`` loops until ``stop()`` (``start()`` runs it in a greenlet); ``tick()`` is
    one pass. A submission that fails (no job server reachable) is tried again at the
    next tick, under the task's ``missed`` policy; nothing a pass meets stops the loop.
    ``clock`` gives the Unix time (tests run a faster one); ``tick`` is the longest
    sleep between passes; ``lookback`` (default: the offloader's ``result_ttl``) is the
    age past which a slot is logged and not submitted; ``on_submit(task, slot)`` is
    called after each acknowledged submission.

    Example::

        from gearoffload.schedule import Scheduler, periodic_tasks
        import myapp.tasks  # noqa: F401 - registers the tasks

        Scheduler(periodic_tasks()).run()
    """

    def __init__(self, tasks: Iterable[OffloadedFunction], offloader: Offloader | None = None,
                 *, clock: Callable[[], float] = time.time, tick: float = 1.0,
                 lookback: float | None = None,
                 on_submit: Callable[[OffloadedFunction, float], None] | None = None) -> None:
        self.tasks = list(tasks)
        if not self.tasks:
            raise ValueError("no periodic tasks to schedule (@offload(every=...) or "
                             "@offload(cron=...))")
        if not tick > 0:
            raise ValueError("tick must be a positive number of seconds")
        self._offloader = offloader
        self.clock = clock
        self.tick_interval = tick
        self._lookback = lookback
        self.on_submit = on_submit
        self.last: dict[str, float] = {}  # task name -> latest slot handled
        self._failing: set[str] = set()
        self._stopped = False
        self._wake: Any = None

    @property
    def offloader(self) -> Offloader:
        if self._offloader is None:
            from .offloading import get_offloader

            self._offloader = get_offloader()
        return self._offloader

    @property
    def lookback(self) -> float:
        """How old a slot may be and still be submitted: the kept-result TTL."""
        if self._lookback is not None:
            return self._lookback
        return self.offloader.config.result_ttl

    def tick(self) -> int:
        """One pass: submit every task's due slots; returns how many were acknowledged."""
        submitted = 0
        for task in self.tasks:
            try:
                submitted += self._tick_task(task)
            except Exception:  # a bug in one task's pass must not stop the others
                log.exception("scheduling %s failed", task.name)
        return submitted

    def _tick_task(self, task: OffloadedFunction) -> int:
        schedule = task.schedule
        now = self.clock()
        last = self.last.get(task.name)
        slots, dropped = schedule.due(last, now, self.lookback)
        if dropped:
            log.warning("%s: %d slots older than %gs (the kept-result TTL) not run: a late "
                        "run could not be told from a repeated one", task.name, dropped,
                        self.lookback)
        if last is not None:
            skipped = schedule.count(max(last, now - self.lookback), now) - len(slots)
            if skipped > 0:
                log.info("%s: %d missed slots not run (missed=%r)", task.name, skipped,
                         schedule.missed)
        for submitted, slot in enumerate(slots):
            try:
                self.submit(task, slot)
            except Exception as exc:  # tried again at the next pass
                if task.name not in self._failing:
                    self._failing.add(task.name)
                    log.warning("%s: slot %s not submitted (%s); trying again", task.name,
                                _iso(slot), exc)
                return submitted
            self.last[task.name] = slot
            if task.name in self._failing:
                self._failing.discard(task.name)
                log.info("%s: submitting again", task.name)
            if self.on_submit is not None:
                self.on_submit(task, slot)
        # The slots the policy left out are handled too: the next pass starts after them.
        latest = schedule.slots(now - self.lookback if last is None else last, now, limit=1)
        if latest:
            self.last[task.name] = latest[0]
        return len(slots)

    def submit(self, task: OffloadedFunction, slot: float) -> None:
        """Submit ``task``'s run for ``slot`` (a run-once background job)."""
        offloader = self.offloader
        payload = offloader.config.codec.dumps([[], {}])
        offloader.start(task.name, payload, unique=slot_key(task.name, slot), once=True,
                        priority=task.priority, retry=task.retry)
        log.debug("%s: slot %s submitted", task.name, _iso(slot))

    def _sleep_time(self) -> float:
        now = self.clock()
        nearest = self.tick_interval
        for task in self.tasks:
            upcoming = task.schedule.slots(now, now + nearest, limit=1)
            if upcoming:
                nearest = min(nearest, upcoming[0] - now)
        return max(0.01, nearest)

    def run(self) -> None:
        """Pass after pass until ``stop()``."""
        from gevent.event import Event

        self._wake = Event()
        log.info("scheduling %s", ", ".join(f"{t.name} ({_describe(t.schedule)})"
                                            for t in self.tasks))
        while not self._stopped:
            self.tick()
            self._wake.wait(self._sleep_time())
        log.info("scheduler stopped")

    def start(self) -> Any:
        """Run in a new greenlet, which is returned."""
        import gevent

        return gevent.spawn(self.run)

    def stop(self) -> None:
        """End ``run()`` after the current pass."""
        self._stopped = True
        if self._wake is not None:
            self._wake.set()


def _iso(slot: float) -> str:
    return datetime.fromtimestamp(slot).astimezone().isoformat(timespec="seconds")


def _describe(schedule: Schedule) -> str:
    if schedule.every is not None:
        return f"every {timedelta(seconds=schedule.every)}, missed={schedule.missed}"
    return f"cron {schedule.cron!r} {schedule.tz or 'UTC'}, missed={schedule.missed}"


def main(argv: list[str] | None = None, clock: Callable[[], float] = time.time) -> int:
    """``python -m gearoffload.schedule MODULE...``: schedule the periodic tasks of the
    modules (or ``module:app`` Flask apps), with the settings of the environment
    (``GEAROFFLOAD_SERVERS``, ``GEAROFFLOAD_SECRET_KEY``, ``GEAROFFLOAD_RESULT_TTL``...)."""
    from gevent import monkey

    monkey.patch_all()  # entry point: patch first
    import signal

    import gevent

    from .loading import load_registry

    parser = argparse.ArgumentParser(
        prog="python -m gearoffload.schedule",
        description="Submit the due slots of periodic @offload tasks; run any number.")
    parser.add_argument("targets", nargs="+", metavar="MODULE",
                        help="module (myapp.tasks) or module:app to import")
    parser.add_argument("--tick", type=float, default=1.0,
                        help="longest sleep between passes, in seconds (default: 1)")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level,
                        format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")
    from .offloading import get_offloader

    tasks: dict[str, OffloadedFunction] = {}
    try:
        for target in args.targets:
            for task in periodic_tasks(load_registry(target)):
                tasks[task.name] = task
        # The settings (GEAROFFLOAD_* or a Flask app's) are read now: a bad one is one
        # line and exit 2 here, not a traceback at every pass.
        scheduler = Scheduler(tasks.values(), get_offloader(), clock=clock, tick=args.tick)
    except (ImportError, AttributeError, TypeError, ValueError) as exc:
        sys.stderr.write(f"gearoffload.schedule: {exc}\n")
        return 2
    gevent.signal_handler(signal.SIGTERM, scheduler.stop)
    gevent.signal_handler(signal.SIGINT, scheduler.stop)
    scheduler.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
