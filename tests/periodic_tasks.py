"""Periodic tasks for tests/test_schedule.py: each run appends its unique (one per slot)
to the file ``$PERIODIC_LOG``, so the test counts runs per slot."""

from __future__ import annotations

import os
from datetime import timedelta

from gearoffload import offload
from gearoffload.offloading import current_job


@offload(every=timedelta(seconds=5), missed="all")
def tick() -> None:
    # One short write in append mode: lines from concurrent runs never interleave.
    with open(os.environ["PERIODIC_LOG"], "a") as log:
        log.write(current_job().unique + "\n")


@offload
def stamp(tag: str) -> None:
    """A delayed job: records when it ran."""
    import time

    with open(os.environ["PERIODIC_LOG"], "a") as log:
        log.write(f"{tag} {time.time():.3f}\n")
