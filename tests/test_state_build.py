"""The compiled job state (Cython, from ``state.py`` and ``state.pxd``) and its fallbacks.

The rest of the suite runs on whichever state is active, the compiled one wherever it
was built (as in CI). Here: CI never runs without it unnoticed, the pure-Python state
still passes the state's own tests, and a compiled module built from other sources than
the ``state.py`` beside it is never used.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import IN_CI, ROOT
from gearoffload_server import STATE_COMPILED

PROBE = """
import json, warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import gearoffload_server
    from gearoffload_server import state
print(json.dumps({"compiled": gearoffload_server.STATE_COMPILED, "file": state.__file__,
                  "warnings": [str(w.message) for w in caught]}))
"""


def probe(pythonpath: Path | str, **env: str) -> dict:
    environment = {**os.environ, "PYTHONPATH": str(pythonpath), **env}
    out = subprocess.run([sys.executable, "-c", PROBE], env=environment, cwd="/",
                         capture_output=True, text=True, timeout=60, check=True).stdout
    return json.loads(out)


def test_compiled_state_is_built():
    """CI must never run the suite on the pure-Python state without noticing."""
    result = probe(ROOT, GEAROFFLOAD_PURE_PYTHON="0")
    if not result["compiled"]:
        if IN_CI:
            pytest.fail(f"gearoffload_server.state is not compiled under CI: {result}")
        pytest.skip("gearoffload_server.state not compiled (no Cython at install)")
    assert result["file"].endswith((".so", ".pyd")) and not result["warnings"]
    pure = os.environ.get("GEAROFFLOAD_PURE_PYTHON", "") not in ("", "0")
    assert STATE_COMPILED is not pure  # this process: the one the suite runs on


def test_pure_python_env_runs_state_py():
    result = probe(ROOT, GEAROFFLOAD_PURE_PYTHON="1")
    assert result["compiled"] is False
    assert result["file"] == str(ROOT / "gearoffload_server" / "state.py")


def test_the_pure_python_state_passes_the_state_tests():
    """The same rules on state.py itself (the source of the compiled module)."""
    files = ["tests/test_state.py", "tests/test_store_state.py", "tests/test_stats.py",
             "tests/test_logfmt.py"]
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p",
                          "no:cacheprovider", *files], cwd=ROOT, capture_output=True,
                         text=True, timeout=300,
                         env={**os.environ, "GEAROFFLOAD_PURE_PYTHON": "1"})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and " skipped" not in run.stdout


def test_a_build_of_other_sources_is_not_used(tmp_path):
    """state.py edited since the build: its compiled module would run the old rules."""
    if not probe(ROOT, GEAROFFLOAD_PURE_PYTHON="0")["compiled"]:
        if IN_CI:
            pytest.fail("gearoffload_server.state is not compiled under CI")
        pytest.skip("needs the compiled state")
    for package in ("gearoffload", "gearoffload_server"):
        shutil.copytree(ROOT / package, tmp_path / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    assert probe(tmp_path, GEAROFFLOAD_PURE_PYTHON="0")["compiled"] is True  # as built
    state_py = tmp_path / "gearoffload_server" / "state.py"
    state_py.write_text(state_py.read_text() + "\n# edited after the build\n")
    result = probe(tmp_path, GEAROFFLOAD_PURE_PYTHON="0")
    assert result["compiled"] is False
    assert result["file"] == str(state_py)
    assert any("built from other sources" in w for w in result["warnings"])


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
