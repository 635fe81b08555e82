"""Modules compiled by Cython from their own ``.py`` source, and which of the two runs.

``setup.py`` compiles ``gearoffload/client.py``, ``connection.py`` and ``worker.py``, and
``gearoffload_server/state.py``, with the declarations in the ``.pxd`` beside each
(Cython's pure-Python mode) when Cython is there, and records a SHA-256 of each
``.py`` + ``.pxd`` pair in the package's ``_build.py``. Each package calls
``use_sources()`` when it is imported: a module whose sources changed since that build
(an edit before the next ``pip install -e .``) is imported from its ``.py``, with a
warning, so that stale compiled code never runs; every one of them is when
``GEAROFFLOAD_PURE_PYTHON=1``, as for the codec.

Example::

    import gearoffload
    print(gearoffload.COMPILED)   # {'client': True, 'connection': True, 'worker': True}
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import warnings
from collections.abc import Iterable
from pathlib import Path


def pure_python_requested() -> bool:
    """``GEAROFFLOAD_PURE_PYTHON`` is set (and not ``0``): run no compiled code."""
    return os.environ.get("GEAROFFLOAD_PURE_PYTHON", "") not in ("", "0")


def source_digest(directory: Path, stem: str) -> str:
    """SHA-256 of ``stem.py`` + ``stem.pxd`` (setup.py computes the same)."""
    return hashlib.sha256(b"".join(
        (directory / f"{stem}{suffix}").read_bytes() for suffix in (".py", ".pxd"))).hexdigest()


class _SourceFinder(importlib.abc.MetaPathFinder):
    """Imports the listed modules from their ``.py``, even with a compiled module beside it
    (the import system would otherwise take the extension first)."""

    def __init__(self, sources: dict[str, Path]) -> None:
        self.sources = sources

    def find_spec(self, fullname: str, path: object = None,
                  target: object = None) -> importlib.machinery.ModuleSpec | None:
        source = self.sources.get(fullname)
        return None if source is None else importlib.util.spec_from_file_location(fullname,
                                                                                  source)


def use_sources(package: str, directory: Path, stems: Iterable[str]) -> dict[str, bool]:
    """Decide, for each compiled module ``package.stem``, whether its build runs; those
    that do not are imported from their ``.py``. Returns ``{stem: compiled}``."""
    try:
        built: dict[str, str] = importlib.import_module(f"{package}._build").SOURCE_SHA256
    except ImportError:
        built = {}  # never built with Cython
    pure = pure_python_requested()
    compiled: dict[str, bool] = {}
    sources: dict[str, Path] = {}
    for stem in stems:
        name = f"{package}.{stem}"
        runs = (not pure and stem in built and any(
            (directory / f"{stem}{suffix}").exists()
            for suffix in importlib.machinery.EXTENSION_SUFFIXES))
        try:
            stale = runs and source_digest(directory, stem) != built[stem]
        except OSError:  # an install without the sources: there is nothing newer to run
            stale = False
        if stale:
            warnings.warn(f"{name}: the compiled module was built from other sources than "
                          f"{stem}.py and {stem}.pxd now; running {stem}.py (rebuild: "
                          "pip install -e .)", RuntimeWarning, stacklevel=3)
            runs = False
        compiled[stem] = runs
        if not runs:
            sources[name] = directory / f"{stem}.py"
    if sources:
        sys.meta_path.insert(0, _SourceFinder(sources))
    return compiled
