"""A short run of benchmarks/stress.py: random clients and workers, then a state audit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_stress_five_seconds_leaves_server_consistent():
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "stress.py"), "--seconds", "5",
         "--actors", "16"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK: server consistent" in result.stdout
