"""gearoffload: Gearman on gevent, and a web layer that offloads slow work to workers.

The public names are imported lazily, so that ``import gearoffload.protocol`` (the server
does) does not pull in the client side::

    from gearoffload import Client, Worker, task
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "Client": "gearoffload.client",
    "Job": "gearoffload.client",
    "JobStatus": "gearoffload.client",
    "JobUpdate": "gearoffload.client",
    "Worker": "gearoffload.worker",
    "WorkerJob": "gearoffload.worker",
    "TaskRegistry": "gearoffload.registry",
    "task": "gearoffload.registry",
    "offload": "gearoffload.offloading",
    "configure": "gearoffload.offloading",
    "progress": "gearoffload.offloading",
    "OffloadMiddleware": "gearoffload.wsgi",
    "AdminClient": "gearoffload.admin",
    "tls_context": "gearoffload.tls",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'gearoffload' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
