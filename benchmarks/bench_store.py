#!/usr/bin/env python3
"""Durable background submissions: our sqlite store versus memory versus gearmand's libsqlite3.

    .venv/bin/python benchmarks/bench_store.py               # ~1 minute
    .venv/bin/python benchmarks/bench_store.py --jobs 100000 --rounds 3

Each configuration gets a fresh server on a free loopback port and a fresh database file in
a temporary directory, then the neutral load generator runs
``gearload background -u distinct`` against it: a submit phase (background submissions/s,
each acknowledged by JOB_CREATED — for a store, only once the job's row is committed) and a
drain phase (workers run every job; each completion deletes a row). Distinct uniques
because gearmand's sqlite queue keys rows by (function, unique) and would overwrite jobs
with an empty unique (docs/protocol.md Q11). Server CPU per job (``-S PID``) is the stable
figure on a shared box; jobs/s are wall clock.

Configurations, interleaved per round so machine noise hits all alike:

- ``ours memory``            ``--queue memory`` (no persistence)
- ``ours sqlite``            ``--queue sqlite://DB`` (WAL, synchronous=FULL: fsync per commit)
- ``ours sqlite normal``     ``?synchronous=normal`` (survives kill -9, not a power cut)
- ``ours redis``             ``--queue redis://...`` against a ``redis-server`` this script
                             starts on a free loopback port (no persistence: ``--save ''
                             --appendonly no``, so this is the round-trip cost, not fsync);
                             only when ``redis-server`` is on PATH
- ``gearmand libsqlite3``    ``-q libsqlite3 --libsqlite3-db=DB`` (one transaction per job;
                             it gets fewer jobs, see ``--gearmand-jobs``)
- ``gearmand builtin``       no persistence, for reference

Target (issue #5): >= 20,000 durable submissions/s with ``ours sqlite``.
Only processes this script started are stopped, by PID; every wait is bounded.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from run import build_gearload, find_bench_dir, free_port, wait_listening  # noqa: E402

TARGET_DURABLE_PER_S = 20_000


def configs(tmp: Path, gearmand: str | None,
            redis_port: int | None = None) -> list[tuple[str, list[str]]]:
    """(name, command with {port})."""
    ours = [sys.executable, "-m", "gearoffload_server", "--port", "{port}",
            "--verbose", "WARNING", "--queue"]
    result = [
        ("ours memory", [*ours, "memory"]),
        ("ours sqlite", [*ours, f"sqlite://{tmp}/ours.db"]),
        ("ours sqlite normal", [*ours, f"sqlite://{tmp}/ours-normal.db?synchronous=normal"]),
    ]
    if redis_port:  # a fresh key prefix per run: the server's port
        result.append(("ours redis",
                       [*ours, f"redis://127.0.0.1:{redis_port}/0?prefix=bench:{{port}}"]))
    if gearmand:
        base = [gearmand, "--listen=127.0.0.1", "--port={port}", "--threads=1",
                "--log-file=none"]
        result.append(("gearmand libsqlite3",
                       [*base, "-q", "libsqlite3", f"--libsqlite3-db={tmp}/gearmand.db"]))
        result.append(("gearmand builtin", base))
    return result


def run_one(gearload: Path, command: list[str], jobs: int, time_limit: float,
            clients: int, depth: int) -> dict[str, str]:
    port = free_port()
    proc = subprocess.Popen([c.replace("{port}", str(port)) for c in command],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    try:
        wait_listening(proc, port)
        out = subprocess.run(
            [str(gearload), "background", "-p", str(port), "-n", str(jobs), "-u", "distinct",
             "-c", str(clients), "-d", str(depth), "-t", str(time_limit), "-S", str(proc.pid)],
            capture_output=True, text=True, timeout=2 * time_limit + 30)
        fields = dict(kv.split("=", 1) for kv in out.stdout.split() if "=" in kv)
        if not fields:
            fields = {"status": "no output: " + out.stderr.strip()[:200]}
        return fields
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=50_000)
    parser.add_argument("--gearmand-jobs", type=int, default=3_000,
                        help="jobs for gearmand libsqlite3, which commits once per job "
                             "(default 3000)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--depth", type=int, default=64)
    parser.add_argument("--time-limit", type=float, default=60.0)
    parser.add_argument("--gearmand", default=shutil.which("gearmand") or (
        "/usr/sbin/gearmand" if os.access("/usr/sbin/gearmand", os.X_OK) else None))
    args = parser.parse_args()
    bench = find_bench_dir()
    if bench is None:
        print("benchmark skipped: no gearload sources found")
        return 0
    gearload = build_gearload(bench)
    results: dict[str, list[dict[str, str]]] = {}
    redis_binary = shutil.which("redis-server")
    redis_proc = None
    redis_port = None
    if redis_binary:
        redis_port = free_port()
        redis_proc = subprocess.Popen(
            [redis_binary, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--daemonize", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_listening(redis_proc, redis_port)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-store-") as tmpdir:
            tmp = Path(tmpdir)
            for rnd in range(args.rounds):
                for name, command in configs(tmp, args.gearmand, redis_port):
                    for f in tmp.iterdir():
                        f.unlink()  # a fresh database each run
                    jobs = args.gearmand_jobs if name == "gearmand libsqlite3" else args.jobs
                    fields = run_one(gearload, command, jobs, args.time_limit, args.clients,
                                     args.depth)
                    results.setdefault(name, []).append(fields)
                    print(f"round {rnd + 1} {name:20s} jobs={jobs} "
                          f"submit/s={fields.get('submit_jobs_per_s', '-')} "
                          f"drain/s={fields.get('drain_jobs_per_s', '-')} "
                          f"status={fields.get('status', '-')}", flush=True)
                    time.sleep(0.2)
    finally:
        if redis_proc is not None:
            redis_proc.terminate()  # our own child, by PID
            redis_proc.wait(10)

    def med(rows: list[dict[str, str]], key: str) -> str:
        values = [float(r[key]) for r in rows if key in r]
        return f"{statistics.median(values):,.0f}" if values else "-"

    def med1(rows: list[dict[str, str]], key: str) -> str:
        values = [float(r[key]) for r in rows if key in r]
        return f"{statistics.median(values):.1f}" if values else "-"

    print()
    header = (f"{'configuration':20s} {'submit/s':>10s} {'srv us/sub':>10s} {'p99 us':>8s} "
              f"{'drain/s':>9s} {'srv us/job':>10s} {'missing':>7s} {'dups':>5s}")
    print(header)
    print("-" * len(header))
    for name, rows in results.items():
        print(f"{name:20s} {med(rows, 'submit_jobs_per_s'):>10s} "
              f"{med1(rows, 'submit_srv_us_per_job'):>10s} {med(rows, 'submit_p99_us'):>8s} "
              f"{med(rows, 'drain_jobs_per_s'):>9s} {med1(rows, 'drain_srv_us_per_job'):>10s} "
              f"{rows[-1].get('missing', '-'):>7s} {rows[-1].get('dups', '-'):>5s}")
    durable = [float(r["submit_jobs_per_s"]) for r in results.get("ours sqlite", [])
               if "submit_jobs_per_s" in r]
    if durable:
        got = statistics.median(durable)
        verdict = "met" if got >= TARGET_DURABLE_PER_S else "NOT met"
        print(f"\ntarget >= {TARGET_DURABLE_PER_S:,} durable submissions/s "
              f"(ours sqlite, synchronous=FULL): {got:,.0f} -> {verdict}")
    bad = [n for n, rows in results.items() for r in rows if r.get("status") != "ok"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
