"""Finding the tasks a process serves: ``load_registry("module")`` or
``load_registry("module:attr")`` for the commands (``gearoffload-worker``,
``python -m gearoffload.schedule``), and ``registry_for(app)`` for a Flask app's offloaded
views or a WSGI app behind ``OffloadMiddleware``.

Example::

    from gearoffload.loading import load_registry, registry_for

    registry = load_registry("myapp.tasks")     # every @offload / @task of the module
    worker = Worker("127.0.0.1:4730", registry=registry_for(flask_app))
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .registry import TaskRegistry

__all__ = ["load_registry", "registry_for"]


def load_registry(target: str, wsgi_function: str | None = None) -> TaskRegistry:
    """Import ``module`` or ``module:attr`` and return the ``TaskRegistry`` to serve.

    Example::

        >>> load_registry("examples.wordcount:worker").names()   # doctest: +SKIP
        ['wordcount', 'count_words']
    """
    from .registry import TaskRegistry
    from .registry import registry as default_registry
    from .worker import Worker

    module_name, _, attr = target.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: modules of the current directory
    module = importlib.import_module(module_name)
    if attr:
        obj: Any = module
        for part in attr.split("."):
            obj = getattr(obj, part)
        candidates = [obj]
    else:
        found = [v for v in vars(module).values() if isinstance(v, (Worker, TaskRegistry))
                 and v is not default_registry]
        candidates = found if len(found) == 1 else [default_registry]
    obj = candidates[0]
    if wsgi_function is not None or not isinstance(obj, (Worker, TaskRegistry)):
        return registry_for(obj, wsgi_function)
    registry = obj.registry if isinstance(obj, Worker) else obj
    if not isinstance(registry, TaskRegistry):
        raise TypeError(f"{target} is a {type(obj).__name__}, not a Worker or TaskRegistry")
    if not len(registry):
        raise ValueError(f"{target} declares no tasks (use @gearoffload.task, or name a "
                         "Worker/TaskRegistry as module:attr)")
    return registry


def registry_for(obj: Any, wsgi_function: str | None = None) -> TaskRegistry:
    """The tasks ``gearoffload-worker`` serves for ``obj`` when it is not a ``Worker`` or
    ``TaskRegistry``: a Flask app's offloaded views (``GearOffload``), every ``@offload``
    function imported so far, and, with ``wsgi_function``, the WSGI runner of
    ``OffloadMiddleware`` calling ``obj`` as a WSGI app. For a Flask app, this process's
    ``@offload`` functions then use the app's settings (a worker serves one app).

    Example::

        registry_for(flask_app).names()          # ['myapp.views.report', ...]
        registry_for(wsgi_app, "gearoffload.wsgi")
    """
    from .core import set_default
    from .registry import TaskRegistry
    from .registry import registry as default_registry

    registry = TaskRegistry()
    registry.update(default_registry)
    extensions = getattr(obj, "extensions", None)
    state = extensions.get("gearoffload") if isinstance(extensions, dict) else None
    if state is not None:
        registry.update(state.registry)
        set_default(state.offloader)  # this process serves that app
    elif wsgi_function is None:
        raise TypeError(f"{type(obj).__name__} is not a Worker, a TaskRegistry or a Flask app "
                        "with GearOffload; to serve a WSGI app for OffloadMiddleware, add "
                        "--wsgi")
    if wsgi_function is not None:
        if not callable(obj):
            raise TypeError(f"--wsgi needs a WSGI application, not {type(obj).__name__}")
        from .core import offloader_in_use
        from .wsgi import default_wsgi_function, wsgi_runner
        registry.register(wsgi_function or default_wsgi_function(obj),
                          wsgi_runner(obj, offloader_in_use(default_registry)))
    if not len(registry):
        raise ValueError(f"{type(obj).__name__} has no offloaded views or functions (use "
                         "GearOffload(app) with @ext.offload, or --wsgi for a WSGI app)")
    return registry
