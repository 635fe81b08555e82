import hashlib
from pathlib import Path

from setuptools import Extension, setup

HERE = Path(__file__).resolve().parent

# The C codec is optional: without a compiler the package installs with the pure-Python
# codec (gearoffload.protocol.ACCELERATED tells which one is in use).
extensions = [Extension("gearoffload._codec", ["gearoffload/_codec.c"], optional=True)]

# Modules compiled by Cython from their own source (pure-Python mode: the declarations are
# in the .pxd beside each .py) when Cython is there (pyproject.toml asks for it): the
# server's job state, and the client's, its connection's and the worker's per-job paths.
# The .pxd files are the list: every module with one is compiled (gearoffload._compiled
# and the Makefile find them the same way). Each package's _build.py records which
# sources its build is of: the test suite refuses to run a build of other sources.
COMPILED = {package: sorted(path.stem for path in (HERE / package).glob("*.pxd"))
            for package in ("gearoffload", "gearoffload_server")}
try:
    from Cython.Build import cythonize
except ImportError:
    cythonize = None
if cythonize is not None:
    modules = []
    for package, stems in COMPILED.items():
        digests = {}
        for stem in stems:
            # The same digest as gearoffload._compiled.source_digest (not imported here:
            # the package is not importable during an isolated build).
            sources = [HERE / package / f"{stem}{suffix}" for suffix in (".py", ".pxd")]
            digests[stem] = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()
            modules.append(Extension(f"{package}.{stem}", [f"{package}/{stem}.py"],
                                     optional=True))
        (HERE / package / "_build.py").write_text(
            '"""Written by setup.py: the sources its compiled modules were built from."""\n'
            f"SOURCE_SHA256 = {digests!r}\n")
    extensions += cythonize(
        modules,
        # nonecheck: None where a typed object is expected raises AttributeError, as in
        # the .py, instead of reading a struct that is not there (a crash).
        compiler_directives={"language_level": 3, "annotation_typing": False,
                             "nonecheck": True},
        force=True,  # the .c files are regenerated with these directives, not kept
        quiet=True,
        nthreads=2,  # with setup.cfg's [build_ext] parallel: two at a time
    )

setup(ext_modules=extensions)
