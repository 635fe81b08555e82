"""Modules compiled by Cython from their own ``.py`` source, and which of the two runs.

A module is compiled when a ``.pxd`` sits beside its ``.py``: that is the one list of
compiled modules (``setup.py``, the Makefile and this module all find them that way).
``setup.py`` compiles each ``.py`` with the declarations of its ``.pxd`` (Cython's
pure-Python mode) when Cython is there, and records a SHA-256 of each ``.py`` + ``.pxd``
pair in the package's ``_build.py``. At import, a built module runs unless
``GEAROFFLOAD_PURE_PYTHON=1`` asks for the ``.py``, as for the codec.

Whether a build is of the sources beside it is checked exactly where sources change, not
at every import (hashing them cost about 0.4 ms, and loading ``hashlib`` several more):
``make`` rebuilds after any edit of a ``.py`` or ``.pxd`` (its stamp depends on them), and
the test suite refuses to start on a stale build (``stale_builds()``, called by
``tests/conftest.py``). At import, a cheaper guard: a build older than its ``.py`` or
``.pxd`` (a ``git pull`` without ``make``) is not run; the ``.py`` is, with a warning.
Three ``stat`` calls per module, about 5 µs each.

Example::

    import gearoffload
    print(gearoffload.COMPILED)   # {'client': True, 'connection': True, 'worker': True}
"""

from __future__ import annotations

import importlib
import importlib.machinery
import os
import sys
from pathlib import Path

#: The packages whose modules may be compiled.
PACKAGES = ("gearoffload", "gearoffload_server")


def pure_python_requested() -> bool:
    """``GEAROFFLOAD_PURE_PYTHON`` is set (and not ``0``): run no compiled code."""
    return os.environ.get("GEAROFFLOAD_PURE_PYTHON", "") not in ("", "0")


def source_digest(directory: Path, stem: str) -> str:
    """SHA-256 of ``stem.py`` + ``stem.pxd`` (setup.py computes the same)."""
    import hashlib

    return hashlib.sha256(b"".join(
        (directory / f"{stem}{suffix}").read_bytes() for suffix in (".py", ".pxd"))).hexdigest()


def _built(package: str) -> dict[str, str]:
    """``{stem: digest}`` of the package's last build with Cython (empty: never built)."""
    try:
        return importlib.import_module(f"{package}._build").SOURCE_SHA256
    except ImportError:
        return {}


def compiled_stems(package: str, directory: Path) -> list[str]:
    """The package's modules compiled from a ``.py`` + ``.pxd`` pair: those with a
    ``.pxd``, and those its build recorded (an install may lack the ``.pxd`` files)."""
    names = os.listdir(directory)
    return sorted({name[:-4] for name in names if name.endswith(".pxd")} | set(_built(package)))


def compiled_modules(root: Path) -> dict[str, Path]:
    """``{"package.stem": path of its .py}`` for every compiled module under ``root``
    (the directory holding both packages)."""
    return {f"{package}.{stem}": root / package / f"{stem}.py"
            for package in PACKAGES for stem in compiled_stems(package, root / package)}


def stale_builds(root: Path) -> list[str]:
    """The compiled modules under ``root`` whose build is of other sources than the
    ``.py`` and ``.pxd`` beside them now (an edit since the last ``pip install -e .``)."""
    stale = []
    for package in PACKAGES:
        built = _built(package)
        for stem, digest in built.items():
            try:
                if source_digest(root / package, stem) != digest:
                    stale.append(f"{package}.{stem}")
            except OSError:  # an install without the sources: nothing newer to run
                pass
    return stale


def _older_than_sources(directory: Path, extension: str, stem: str) -> bool:
    try:
        built = os.stat(directory / extension).st_mtime
        return any(os.stat(directory / f"{stem}{suffix}").st_mtime > built
                   for suffix in (".py", ".pxd"))
    except OSError:  # an install without the sources: nothing newer to run
        return False


class _SourceFinder:
    """Imports the listed modules from their ``.py``, even with a compiled module beside it
    (the import system would otherwise take the extension first). A meta path finder."""

    def __init__(self, sources: dict[str, Path]) -> None:
        self.sources = sources

    def find_spec(self, fullname: str, path: object = None,
                  target: object = None) -> importlib.machinery.ModuleSpec | None:
        import importlib.util

        source = self.sources.get(fullname)
        return None if source is None else importlib.util.spec_from_file_location(fullname,
                                                                                  source)


def use_sources(package: str, directory: Path) -> dict[str, bool]:
    """Decide, for each compiled module ``package.stem``, whether its build runs; those
    that do not are imported from their ``.py``. Returns ``{stem: compiled}``."""
    built = _built(package)
    names = set(os.listdir(directory))
    pure = pure_python_requested()
    compiled: dict[str, bool] = {}
    sources: dict[str, Path] = {}
    for stem in compiled_stems(package, directory):
        extension = next((stem + suffix for suffix in importlib.machinery.EXTENSION_SUFFIXES
                          if stem + suffix in names), None)
        runs = extension is not None and not pure and stem in built
        if runs and _older_than_sources(directory, extension, stem):
            runs = False
            import warnings

            warnings.warn(f"{package}.{stem}: its compiled build is older than {stem}.py or "
                          f"{stem}.pxd (sources changed since the last build); running the "
                          "slower .py. Rebuild: make .venv/.installed-stamp, or pip install "
                          "-e .", RuntimeWarning, stacklevel=3)
        compiled[stem] = runs
        if extension and not runs:  # else the import system finds the .py on its own
            sources[f"{package}.{stem}"] = directory / f"{stem}.py"
    if sources:
        sys.meta_path.insert(0, _SourceFinder(sources))
    return compiled
