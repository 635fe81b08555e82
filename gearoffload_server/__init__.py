"""gearoffload-server: a wire-compatible Gearman job server on gevent.

Layers: ``state`` (jobs, queues, workers; no I/O), ``admin`` (text protocol over the same
state), ``server`` (the gevent I/O shell), ``config`` (the CLI's frozen settings).

``state`` is compiled by ``setup.py`` (Cython, from ``state.py`` and ``state.pxd``) when
Cython is there: the state's work per job then takes about half the CPU.
``STATE_COMPILED`` tells which one runs. ``state.py`` is loaded instead when the compiled
module is not built, was built from other sources (an edit since the last
``pip install -e .``: with a warning), or ``GEAROFFLOAD_PURE_PYTHON=1`` asks for the
pure-Python code, as it does for the codec.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
import warnings
from pathlib import Path


def _load_state() -> bool:
    """Put ``gearoffload_server.state`` in place; True if it is the compiled one."""
    here = Path(__file__).resolve().parent
    name = f"{__name__}.state"
    if os.environ.get("GEAROFFLOAD_PURE_PYTHON", "") in ("", "0"):
        try:
            from ._state_build import SOURCE_SHA256
        except ImportError:
            SOURCE_SHA256 = None  # never built with Cython
        if SOURCE_SHA256 is not None:
            sources = b"".join((here / f).read_bytes() for f in ("state.py", "state.pxd"))
            if hashlib.sha256(sources).hexdigest() == SOURCE_SHA256:
                module = importlib.import_module(name)  # the extension, if it was built
                return not module.__file__.endswith(".py")
            warnings.warn(f"{name}: the compiled module was built from other sources than "
                          "state.py and state.pxd now; running state.py (rebuild: "
                          "pip install -e .)", RuntimeWarning, stacklevel=2)
    # state.py itself, even where a compiled module sits beside it.
    spec = importlib.util.spec_from_file_location(name, here / "state.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    globals()["state"] = module  # as the import system sets a package's submodule
    return False


#: Whether ``gearoffload_server.state`` is the compiled module (see above).
STATE_COMPILED: bool = _load_state()
