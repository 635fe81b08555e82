"""Shared driver for the fuzz harnesses: atheris when installed, else a random loop.

``main(test_one_input, seeds)`` runs ``test_one_input(bytes)`` until a time or run limit:

- with atheris (``pip install atheris``, not a test dependency), every libFuzzer flag
  works, e.g. ``-max_total_time=60``, ``-runs=100000``, a corpus directory;
- without it, the same two flags are understood and inputs are random bytes and random
  mutations (flips, inserts, deletes, splices) of ``seeds``; a crash prints the input as
  a Python literal and exits with 1.
"""

from __future__ import annotations

import contextlib
import os
import random
import sys
import time
from collections.abc import Callable, Sequence

try:
    import atheris
except ImportError:  # the plain loop below
    atheris = None


def instrumented() -> contextlib.AbstractContextManager:
    """Wrap the imports of the code under test: atheris instruments them for coverage."""
    return atheris.instrument_imports() if atheris is not None else contextlib.nullcontext()


def _flag(argv: Sequence[str], name: str, default: int) -> int:
    for arg in argv:
        if arg.startswith(f"-{name}="):
            return int(arg.split("=", 1)[1])
    return default


def mutate(rng: random.Random, data: bytes, seeds: Sequence[bytes]) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        op = rng.randrange(5)
        pos = rng.randint(0, len(buf))
        if op == 0 and buf:
            buf[min(pos, len(buf) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1:
            buf[pos:pos] = rng.randbytes(rng.randint(1, 8))
        elif op == 2:
            del buf[pos:pos + rng.randint(1, 8)]
        elif op == 3 and seeds:
            buf[pos:pos] = rng.choice(seeds)
        else:
            buf[pos:pos] = rng.choice([b"\0", b"\n", b"\r\n", b" ", b"\0REQ", b"\0RES",
                                       b"\xff\xff\xff\xff", b"\0\0\0\x2a"])
    return bytes(buf[:4096])


def plain_loop(test_one_input: Callable[[bytes], None], seeds: Sequence[bytes],
               seconds: int, runs: int, seed: int | None = None) -> int:
    """Random inputs for ``seconds`` (0: no limit) or ``runs`` inputs (-1: no limit)."""
    seed = int.from_bytes(os.urandom(4), "big") if seed is None else seed
    rng = random.Random(seed)
    deadline = time.monotonic() + (seconds if seconds > 0 else 10 ** 9)
    if seconds <= 0 and runs < 0:
        runs = 100_000  # never unbounded
    corpus = list(seeds) or [b""]
    done = 0
    while time.monotonic() < deadline and (runs < 0 or done < runs):
        if rng.random() < 0.2:
            data = rng.randbytes(rng.randint(0, 200))
        else:
            data = mutate(rng, rng.choice(corpus), seeds)
        try:
            test_one_input(data)
        except Exception:
            print(f"crash (seed {seed}) on input {data!r}", file=sys.stderr)
            raise
        if len(corpus) < 1000 and rng.random() < 0.05:
            corpus.append(data)
        done += 1
    print(f"plain loop: {done} inputs in {seconds}s budget, seed {seed}, no crash")
    return done


def main(test_one_input: Callable[[bytes], None], seeds: Sequence[bytes]) -> None:
    argv = sys.argv
    if atheris is not None and "--plain" not in argv:
        atheris.Setup(argv, test_one_input)
        atheris.Fuzz()
        return
    if atheris is None:
        print("atheris not installed: running the plain random loop", file=sys.stderr)
    plain_loop(test_one_input, seeds, _flag(argv, "max_total_time", 60), _flag(argv, "runs", -1))
