import hashlib
from pathlib import Path

from setuptools import Extension, setup

HERE = Path(__file__).resolve().parent

# The C codec is optional: without a compiler the package installs with the pure-Python
# codec (gearoffload.protocol.ACCELERATED tells which one is in use).
extensions = [Extension("gearoffload._codec", ["gearoffload/_codec.c"], optional=True)]

# The server's job state is compiled from its own source, state.py, with the declarations
# in state.pxd (Cython's pure-Python mode), when Cython is there (pyproject.toml asks for
# it). _state_build.py records which sources the build is of: gearoffload_server loads
# state.py instead of a compiled module that no longer matches it (see its __init__).
try:
    from Cython.Build import cythonize
except ImportError:
    cythonize = None
if cythonize is not None:
    sources = [HERE / "gearoffload_server" / name for name in ("state.py", "state.pxd")]
    digest = hashlib.sha256(b"".join(path.read_bytes() for path in sources)).hexdigest()
    (HERE / "gearoffload_server" / "_state_build.py").write_text(
        '"""Written by setup.py: the sources the compiled state module was built from."""\n'
        f'SOURCE_SHA256 = "{digest}"\n')
    extensions += cythonize(
        [Extension("gearoffload_server.state", ["gearoffload_server/state.py"],
                   optional=True)],
        # nonecheck: None where a typed object is expected raises AttributeError, as in
        # state.py, instead of reading a struct that is not there (a crash).
        compiler_directives={"language_level": 3, "annotation_typing": False,
                             "nonecheck": True},
        force=True,  # state.c is regenerated with these directives, not kept from before
        quiet=True,
    )

setup(ext_modules=extensions)
