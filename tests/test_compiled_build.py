"""The modules compiled by Cython from their own source, and their fallbacks.

``gearoffload_server.state``, ``gearoffload.client``, ``gearoffload.connection`` and
``gearoffload.worker`` are compiled from their ``.py`` and ``.pxd``
(``gearoffload._compiled``). The rest of the suite runs on whichever is active, the
compiled modules wherever they were built (as in CI). Here: CI never runs without them
unnoticed, the pure-Python sources still pass their own tests (their test modules run
each test on both, ``conftest.compiled_and_source``), and a compiled module built from
other sources than the ``.py`` beside it never runs the suite.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import gearoffload
from conftest import COMPILED_MODULES, IN_CI, ROOT
from gearoffload_server import STATE_COMPILED

PROBE = """
import importlib, json, warnings
from pathlib import Path
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import gearoffload, gearoffload_server
    from gearoffload._compiled import compiled_modules, stale_builds
    root = Path(gearoffload.__file__).parent.parent
    names = compiled_modules(root)
    modules = {name: importlib.import_module(name) for name in names}
print(json.dumps({
    "compiled": {"state": gearoffload_server.STATE_COMPILED, **gearoffload.COMPILED},
    "file": {name.rpartition(".")[2]: module.__file__ for name, module in modules.items()},
    "stale": stale_builds(root),
    "warnings": [str(w.message) for w in caught]}))
"""
#: ``{stem: package}`` of every compiled module: each .py with a .pxd beside it.
MODULES = {name.rpartition(".")[2]: name.rpartition(".")[0] for name in COMPILED_MODULES}


def probe(pythonpath: Path | str, **env: str) -> dict:
    environment = {**os.environ, "PYTHONPATH": str(pythonpath), **env}
    out = subprocess.run([sys.executable, "-c", PROBE], env=environment, cwd="/",
                         capture_output=True, text=True, timeout=60, check=True).stdout
    return json.loads(out)


def copy_packages(destination: Path, *leave_out: str) -> None:
    """Both packages, as built (compiled modules included), without ``leave_out``."""
    for package in ("gearoffload", "gearoffload_server"):
        shutil.copytree(ROOT / package, destination / package,
                        ignore=shutil.ignore_patterns("__pycache__", *leave_out))


def require_compiled(result: dict) -> None:
    missing = [name for name, compiled in result["compiled"].items() if not compiled]
    if missing:
        if IN_CI:
            pytest.fail(f"not compiled under CI: {missing}: {result}")
        pytest.skip(f"not compiled (no Cython at install): {missing}")


def test_the_compiled_modules_are_built():
    """CI must never run the suite on the pure-Python modules without noticing."""
    result = probe(ROOT, GEAROFFLOAD_PURE_PYTHON="0")
    require_compiled(result)
    assert all(path.endswith((".so", ".pyd")) for path in result["file"].values()), result
    assert not result["warnings"]
    pure = os.environ.get("GEAROFFLOAD_PURE_PYTHON", "") not in ("", "0")
    # This process, the one the suite runs on.
    assert STATE_COMPILED is not pure
    assert gearoffload.COMPILED == {"client": not pure, "connection": not pure,
                                    "worker": not pure}


def test_pure_python_env_runs_the_sources():
    result = probe(ROOT, GEAROFFLOAD_PURE_PYTHON="1")
    assert not any(result["compiled"].values()), result
    assert result["file"] == {name: str(ROOT / package / f"{name}.py")
                              for name, package in MODULES.items()}


def test_the_py_variant_of_the_tests_runs_the_sources():
    """The state's, connection's, client's and worker's tests run twice in this process
    (``conftest.compiled_and_source``): the ``py`` run on modules imported from the
    ``.py``, as one set, without replacing the modules the rest of the suite runs on."""
    import gearoffload.client
    import gearoffload_server.state
    from conftest import source_modules

    sources = source_modules()
    assert sorted(sources) == sorted(COMPILED_MODULES)
    for name, module in sources.items():
        assert module.__file__ == str(ROOT.joinpath(*name.split(".")).with_suffix(".py"))
        assert sys.modules.get(name) is not module
        assert getattr(sys.modules[name.rpartition('.')[0]], name.rpartition('.')[2],
                       None) is not module
    assert sources["gearoffload.client"].Connection is sources[
        "gearoffload.connection"].Connection
    assert gearoffload.client is sys.modules["gearoffload.client"]
    assert gearoffload_server.state is sys.modules["gearoffload_server.state"]
    if STATE_COMPILED:
        assert gearoffload_server.state.__file__.endswith((".so", ".pyd"))


def test_the_pxd_files_are_the_one_list_of_compiled_modules():
    """setup.py, the Makefile, the packages and the tests all take the modules with a
    .pxd beside them; the build recorded each of them."""
    assert MODULES == {"client": "gearoffload", "connection": "gearoffload",
                       "worker": "gearoffload", "state": "gearoffload_server"}
    assert set(gearoffload.COMPILED) == {s for s, p in MODULES.items() if p == "gearoffload"}
    make = subprocess.run(["make", "-s", "-pn", "lint"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    line = next(line for line in make.stdout.splitlines()
                if line.startswith("COMPILED_SOURCES :="))
    assert sorted(line.split(":=")[1].split()) == sorted(
        f"{package}/{stem}{suffix}" for stem, package in MODULES.items()
        for suffix in (".py", ".pxd"))
    result = probe(ROOT, GEAROFFLOAD_PURE_PYTHON="0")
    require_compiled(result)
    for package in set(MODULES.values()):
        built = __import__(f"{package}._build", fromlist=["SOURCE_SHA256"]).SOURCE_SHA256
        assert sorted(built) == sorted(s for s, p in MODULES.items() if p == package)


def test_import_hashes_nothing():
    """Whether a build is of its sources is checked at build and test time, not at
    every import (hashlib alone costs milliseconds to load)."""
    code = "import sys, gearoffload, gearoffload_server; print('hashlib' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True,
                         text=True, timeout=60, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.stdout == "False\n"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_a_build_of_other_sources_is_found_stale(tmp_path, name):
    """A .py edited since the build: its compiled module would run the old code, so
    stale_builds() names it and the test suite refuses to start on it; an import (a
    ``git pull`` without ``make``) runs the newer .py instead, with a warning."""
    require_compiled(probe(ROOT, GEAROFFLOAD_PURE_PYTHON="0"))
    copy_packages(tmp_path)
    assert probe(tmp_path, GEAROFFLOAD_PURE_PYTHON="0")["stale"] == []  # as built
    source = tmp_path / MODULES[name] / f"{name}.py"
    source.write_text(source.read_text() + "\n# edited after the build\n")
    result = probe(tmp_path, GEAROFFLOAD_PURE_PYTHON="0")
    assert result["stale"] == [f"{MODULES[name]}.{name}"]
    assert result["compiled"][name] is False and result["file"][name].endswith(".py")
    assert [w for w in result["warnings"] if "compiled build is older than" in w] == [
        f"{MODULES[name]}.{name}: its compiled build is older than {name}.py or {name}.pxd "
        "(sources changed since the last build); running the slower .py. Rebuild: make "
        ".venv/.installed-stamp, or pip install -e ."]


def test_the_suite_refuses_a_stale_build(tmp_path):
    """conftest's session start: a stale build stops pytest before any test runs, with
    what to do; GEAROFFLOAD_PURE_PYTHON=1 runs the .py and needs no build."""
    require_compiled(probe(ROOT, GEAROFFLOAD_PURE_PYTHON="0"))
    copy_packages(tmp_path)
    shutil.copytree(ROOT / "tests", tmp_path / "tests",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    source = tmp_path / "gearoffload_server" / "state.py"
    source.write_text(source.read_text() + "\n# edited after the build\n")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
               "tests/test_logfmt.py", "-k", "json_timestamp"]
    environment = {**os.environ, "PYTHONPATH": str(tmp_path)}
    stale = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True,
                           timeout=120, env={**environment, "GEAROFFLOAD_PURE_PYTHON": "0"})
    assert stale.returncode == 4, stale.stdout[-2000:] + stale.stderr[-2000:]
    assert "gearoffload_server.state: built from other sources" in stale.stdout + stale.stderr
    pure = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env={**environment, "GEAROFFLOAD_PURE_PYTHON": "1"})
    assert pure.returncode == 0 and " passed" in pure.stdout, pure.stdout[-2000:]


def test_none_where_a_typed_object_is_expected_raises_instead_of_crashing():
    """The compiled methods type their arguments (``Job job``); a None that slips
    through must be an AttributeError, as in state.py (a bug costs one connection, see
    the poll loop), not a read of a struct that is not there. In a subprocess, so that a
    crash fails this test instead of the suite."""
    code = """
from gearoffload_server.config import ServerConfig
from gearoffload_server.state import JobServerState, ManualScheduler
state = JobServerState(ServerConfig(handle_prefix="H:t"), ManualScheduler())
for call in (lambda: state._remove(None), lambda: state._assign(None, None, 9),
             lambda: state._enqueue(None), lambda: state._work(None, None)):
    try:
        call()
    except AttributeError as exc:
        print("AttributeError", exc)
"""
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, f"rc={run.returncode}: {run.stderr[-2000:]}"
    assert run.stdout.count("AttributeError 'NoneType' object has no attribute") == 4


def test_an_install_without_the_pxd_files_runs_the_compiled_modules(tmp_path):
    """A wheel built before setup.cfg listed the .pxd files as package data had none, and
    ``import gearoffload`` failed reading them. Without them nothing can be stale."""
    require_compiled(probe(ROOT, GEAROFFLOAD_PURE_PYTHON="0"))
    copy_packages(tmp_path, "*.pxd")
    result = probe(tmp_path, GEAROFFLOAD_PURE_PYTHON="0")
    assert all(result["compiled"].values()) and not result["warnings"], result
    assert result["stale"] == []


def test_the_pxd_files_and_py_typed_are_package_data():
    """The .pxd files list an installed package's compiled modules; py.typed tells type
    checkers that both packages are annotated (PEP 561)."""
    import configparser

    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    for package in ("gearoffload", "gearoffload_server"):
        assert config["options.package_data"][package].split(", ") == ["*.pxd", "py.typed"]
        assert (ROOT / package / "py.typed").is_file()


def test_public_classes_take_other_attributes_as_the_py_classes_do():
    """Compiled classes refuse attributes they do not declare; Client, Worker and
    Connection declare a ``__dict__``, so code that tags them (as one may a plain Python
    object) runs the same compiled or not."""
    from gearoffload.connection import Connection

    client = gearoffload.Client("127.0.0.1:1")
    worker = gearoffload.Worker("127.0.0.1:1")
    conn = Connection(("127.0.0.1", 1), lambda packet: None)
    for thing in (client, worker, conn):
        thing.tag = "mine"
        assert thing.tag == "mine"



# -- the .pxd declarations against the .py classes --------------------------------------

def pxd_classes(text: str) -> dict[str, set[str]]:
    """``{class: attribute names}`` declared by ``cdef class`` blocks of a .pxd."""
    classes: dict[str, set[str]] = {}
    current: set[str] | None = None
    for line in text.splitlines():
        line = line.split("#", 1)[0].rstrip()
        if match := re.match(r"cdef class (\w+)\s*:$", line):
            current = classes.setdefault(match.group(1), set())
        elif line and not line[0].isspace():
            current = None
        elif current is not None and (
                match := re.match(r"\s+cdef (?:public |readonly )?\w+ ([\w, ]+)$", line)):
            current.update(name.strip() for name in match.group(1).split(","))
    return classes


def py_classes(text: str) -> dict[str, tuple[set[str] | None, set[str], set[str]]]:
    """``{class: (__slots__ or None, attributes set in __init__, set elsewhere)}``."""

    def on_self(node: ast.AST):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                and node.value.id == "self":
            yield node.attr
        elif isinstance(node, (ast.Tuple, ast.List)):
            for element in node.elts:
                yield from on_self(element)

    classes = {}
    for cls in ast.parse(text).body:
        if not isinstance(cls, ast.ClassDef):
            continue
        slots, init, elsewhere = None, set(), set()
        for item in cls.body:
            if isinstance(item, ast.Assign) and any(
                    isinstance(t, ast.Name) and t.id == "__slots__" for t in item.targets):
                slots = set(ast.literal_eval(item.value))
            elif isinstance(item, ast.FunctionDef):
                for node in ast.walk(item):
                    if isinstance(node, ast.Assign):
                        found = [a for t in node.targets for a in on_self(t)]
                    elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
                        found = list(on_self(node.target))
                    else:
                        continue
                    (init if item.name == "__init__" else elsewhere).update(found)
        classes[cls.name] = (slots, init, elsewhere)
    return classes


def field_mismatches(pxd_text: str, py_text: str) -> list[str]:
    """Each way a compiled class's fields differ between its .pxd and its .py."""
    problems = []
    py = py_classes(py_text)
    for name, declared in pxd_classes(pxd_text).items():
        if name not in py:
            problems.append(f"{name}: in the .pxd, not in the .py")
            continue
        fields = declared - {"__weakref__", "__dict__"}
        slots, init, elsewhere = py[name]
        if init != fields:
            problems.append(f"{name}: __init__ sets {sorted(init - fields)} not declared, "
                            f"the .pxd declares {sorted(fields - init)} never set in __init__")
        if elsewhere - fields:
            problems.append(f"{name}: methods set {sorted(elsewhere - fields)} not declared")
        if slots is not None and slots != fields:
            problems.append(f"{name}: __slots__ differ from the .pxd by {sorted(slots ^ fields)}")
    return problems


@pytest.mark.parametrize("name", sorted(MODULES))
def test_each_compiled_class_declares_the_fields_its_py_class_sets(name):
    """A field is written three times: in ``__init__``, in ``__slots__`` and in the
    .pxd. One missing from the .pxd is refused by the compiled class at run time (only
    where that code runs); one missing from ``__init__`` is None compiled and an
    AttributeError in the .py. Checked here for every cdef class."""
    source = ROOT / MODULES[name] / f"{name}.py"
    pxd = source.with_suffix(".pxd")
    assert pxd_classes(pxd.read_text()), f"no cdef class found in {pxd}"
    assert field_mismatches(pxd.read_text(), source.read_text()) == []


def test_the_field_check_finds_each_kind_of_mismatch():
    pxd = "cdef class A:\n    cdef public object x, y  # two\n    cdef object __weakref__\n"
    good = ("class A:\n    __slots__ = ('x', 'y')\n"
            "    def __init__(self):\n        self.x, self.y = 1, 2\n")
    assert field_mismatches(pxd, good) == []
    assert field_mismatches(pxd, good.replace("self.x, self.y = 1, 2", "self.x = 1")) == [
        "A: __init__ sets [] not declared, the .pxd declares ['y'] never set in __init__"]
    assert field_mismatches(pxd, good.replace("'y'", "'z'")) == [
        "A: __slots__ differ from the .pxd by ['y', 'z']"]
    late = good + "    def go(self):\n        self.z += 1\n"
    assert field_mismatches(pxd, late) == ["A: methods set ['z'] not declared"]
    assert field_mismatches(pxd + "cdef class B:\n    cdef public object q\n", good) == [
        "B: in the .pxd, not in the .py"]
