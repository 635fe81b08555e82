"""gearoffload-server: a wire-compatible Gearman job server on gevent.

Layers: ``state`` (jobs, queues, workers; no I/O), ``admin`` (text protocol over the same
state), ``server`` (the gevent I/O shell), ``config`` (the CLI's frozen settings).

``state`` is compiled by ``setup.py`` (Cython, from ``state.py`` and ``state.pxd``) when
Cython is there: the state's work per job then takes about half the CPU.
``STATE_COMPILED`` tells which one runs. ``state.py`` is imported instead when the
compiled module is not built, or ``GEAROFFLOAD_PURE_PYTHON=1`` asks for the pure-Python
code, as it does for the codec (``gearoffload._compiled``; ``make`` rebuilds after an
edit, and the test suite refuses a stale build).
"""

from __future__ import annotations

from pathlib import Path

from gearoffload._compiled import use_sources

#: Whether ``gearoffload_server.state`` is the compiled module (see above).
STATE_COMPILED: bool = use_sources(__name__, Path(__file__).resolve().parent)["state"]
