"""The modules compiled by Cython from their own source, and their fallbacks.

``gearoffload_server.state``, ``gearoffload.client``, ``gearoffload.connection`` and
``gearoffload.worker`` are compiled from their ``.py`` and ``.pxd``
(``gearoffload._compiled``). The rest of the suite runs on whichever is active, the
compiled modules wherever they were built (as in CI). Here: CI never runs without them
unnoticed, the pure-Python sources still pass their own tests, and a compiled module
built from other sources than the ``.py`` beside it is never used.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import gearoffload
from conftest import IN_CI, ROOT
from gearoffload_server import STATE_COMPILED

PROBE = """
import json, warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import gearoffload, gearoffload_server
    from gearoffload import client, connection, worker
    from gearoffload_server import state
print(json.dumps({
    "compiled": {"state": gearoffload_server.STATE_COMPILED, **gearoffload.COMPILED},
    "file": {"state": state.__file__, "client": client.__file__,
             "connection": connection.__file__, "worker": worker.__file__},
    "warnings": [str(w.message) for w in caught]}))
"""
MODULES = {"state": "gearoffload_server", "client": "gearoffload",
           "connection": "gearoffload", "worker": "gearoffload"}


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


def test_the_pure_python_sources_pass_their_tests():
    """The same code as .py (the source of the compiled modules): the state's tests, and
    the connection's, client's and worker's against both servers."""
    files = ["tests/test_state.py", "tests/test_store_state.py", "tests/test_stats.py",
             "tests/test_results_state.py",
             "tests/test_logfmt.py", "tests/test_connection.py", "tests/test_client.py",
             "tests/test_worker.py"]
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p",
                          "no:cacheprovider", *files], cwd=ROOT, capture_output=True,
                         text=True, timeout=600,
                         env={**os.environ, "GEAROFFLOAD_PURE_PYTHON": "1"})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and " skipped" not in run.stdout


@pytest.mark.parametrize("name", sorted(MODULES))
def test_a_build_of_other_sources_is_not_used(tmp_path, name):
    """A .py edited since the build: its compiled module would run the old code."""
    require_compiled(probe(ROOT, GEAROFFLOAD_PURE_PYTHON="0"))
    copy_packages(tmp_path)
    assert all(probe(tmp_path, GEAROFFLOAD_PURE_PYTHON="0")["compiled"].values())  # as built
    source = tmp_path / MODULES[name] / f"{name}.py"
    source.write_text(source.read_text() + "\n# edited after the build\n")
    result = probe(tmp_path, GEAROFFLOAD_PURE_PYTHON="0")
    assert result["compiled"] == {other: other != name for other in MODULES}
    assert result["file"][name] == str(source)
    assert [w for w in result["warnings"] if "built from other sources" in w] == [
        f"{MODULES[name]}.{name}: the compiled module was built from other sources than "
        f"{name}.py and {name}.pxd now; running {name}.py (rebuild: pip install -e .)"]


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


def test_the_pxd_files_are_package_data():
    """So that an installed package can check its build against its sources."""
    import configparser

    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    for package in set(MODULES.values()):
        assert config["options.package_data"][package].split() == ["*.pxd"]


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

