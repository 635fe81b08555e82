"""Task registries: how a module declares the functions a worker serves.

A ``TaskRegistry`` maps Gearman function names to callables. ``Worker`` keeps one, and
this module keeps a default one, filled by the ``task`` decorator (also exported as
``gearoffload.task``), which the ``gearoffload-worker`` pool serves when a module does not
name its own ``Worker`` or registry. A task receives a ``WorkerJob`` and returns
bytes/str (or ``None`` for an empty result), or raises.

Example (``myapp/tasks.py``, served by ``gearoffload-worker myapp.tasks``)::

    from gearoffload import task

    @task("upper")
    def upper(job):
        return job.data.upper()

    @task(timeout=30)          # the name defaults to the function's name: "slow_report"
    def slow_report(job):
        ...
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

__all__ = ["Task", "TaskRegistry", "registry", "task"]

TaskFunction = Callable[[Any], Any]


class Task(NamedTuple):
    """One registered function: its Gearman name, the callable, and an optional run-time
    limit in seconds (sent to the server as CAN_DO_TIMEOUT)."""

    name: str
    fn: TaskFunction
    timeout: float | None = None


class TaskRegistry:
    """A name → ``Task`` mapping with a decorator to fill it.

    Example::

        tasks = TaskRegistry()

        @tasks.task("reverse")
        def reverse(job):
            return job.data[::-1]

        worker = Worker("127.0.0.1:4730", registry=tasks)
    """

    def __init__(self) -> None:
        self._tasks: dict[str, Task] = {}

    def __repr__(self) -> str:
        return f"<TaskRegistry {sorted(self._tasks)}>"

    def __iter__(self) -> Iterator[Task]:
        return iter(list(self._tasks.values()))

    def __len__(self) -> int:
        return len(self._tasks)

    def __contains__(self, name: object) -> bool:
        return name in self._tasks

    def get(self, name: str) -> Task | None:
        return self._tasks.get(name)

    def names(self) -> list[str]:
        return list(self._tasks)

    def register(self, name: str, fn: TaskFunction, timeout: float | None = None) -> Task:
        """Register ``fn`` under ``name`` (replacing an earlier one of that name)."""
        if not name or "\0" in name:
            raise ValueError(f"bad task name {name!r}")
        if not callable(fn):
            raise TypeError(f"task {name!r} is not callable: {fn!r}")
        if timeout is not None and timeout <= 0:
            raise ValueError("timeout must be positive (or None for no limit)")
        entry = Task(name, fn, timeout)
        self._tasks[name] = entry
        return entry

    def unregister(self, name: str) -> None:
        self._tasks.pop(name, None)

    def update(self, other: TaskRegistry) -> None:
        """Copy every task of ``other`` into this registry."""
        for entry in other:
            self._tasks[entry.name] = entry

    def task(self, name: str | TaskFunction | None = None,
             timeout: float | None = None) -> Any:
        """Decorator: ``@tasks.task``, ``@tasks.task("name")``, ``@tasks.task(timeout=5)``.

        Returns the function unchanged, so it can still be called directly.
        """
        if callable(name):  # used bare: @task
            fn = name
            self.register(fn.__name__, fn)
            return fn

        def decorate(fn: TaskFunction) -> TaskFunction:
            self.register(name or fn.__name__, fn, timeout)
            return fn

        return decorate


#: The default registry, filled by ``gearoffload.task``.
registry = TaskRegistry()
task = registry.task
