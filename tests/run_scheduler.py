"""A scheduler process on a compressed clock, for tests/test_schedule.py:
``python run_scheduler.py T0 SPEED MODULE... [--tick S]`` runs ``gearoffload.schedule``'s
command with a clock that starts at the Unix time T0 and runs SPEED times faster."""

from __future__ import annotations

import sys
import time

from gearoffload.schedule import main

if __name__ == "__main__":
    start, speed = float(sys.argv[1]), float(sys.argv[2])
    sys.exit(main(sys.argv[3:], clock=lambda: start + (time.time() - start) * speed))
