"""gearoffload: Gearman on gevent, and a web layer that offloads slow work to workers.

The public names are imported lazily, so that ``import gearoffload.protocol`` (the server
does) does not pull in the client side::

    from gearoffload import Client, Worker, task

``client``, ``connection`` and ``worker`` are compiled by ``setup.py`` (Cython, from
their own ``.py`` and the declarations in the ``.pxd`` beside each) when Cython is there:
a job then costs them about a third less CPU. ``COMPILED`` tells which ones run compiled; see
``gearoffload._compiled`` for when the ``.py`` runs instead.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from ._compiled import use_sources

__version__ = "0.1.0"

#: ``{"client": bool, "connection": bool, "worker": bool}``: which modules run compiled.
COMPILED: dict[str, bool] = use_sources(__name__, Path(__file__).resolve().parent)

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

__all__ = ["__version__", "COMPILED", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'gearoffload' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
