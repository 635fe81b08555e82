"""Each fuzz harness's entry function on its seeds and a short plain random loop.

atheris is not needed: the harnesses import it only when it is installed.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

FUZZ = Path(__file__).resolve().parent.parent / "fuzz"


def _load(name: str):
    sys.path.insert(0, str(FUZZ))
    try:
        spec = importlib.util.spec_from_file_location(f"fuzz_{name}_harness", FUZZ / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(FUZZ))


@pytest.mark.parametrize("name", ["fuzz_decoder", "fuzz_admin"])
def test_harness_seeds_and_random_loop(name):
    harness = _load(name)
    for data in [b"", b"\0", b"\n" * 3, *harness.SEEDS]:
        harness.test_one_input(data)
    common = sys.modules["_common"]
    assert common.plain_loop(harness.test_one_input, harness.SEEDS, seconds=0, runs=300,
                             seed=6) == 300
