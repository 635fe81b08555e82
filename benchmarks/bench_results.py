#!/usr/bin/env python3
"""What keeping the results of background jobs costs the job server (``--result-ttl``).

    .venv/bin/python benchmarks/bench_results.py              # about 30 s
    .venv/bin/python benchmarks/bench_results.py --rounds 3   # medians of three
    .venv/bin/python benchmarks/bench_results.py --quick      # a smoke run, about 15 s

Two figures, each against a fresh server on a free loopback port, with the neutral load
generator ``gearload`` (C, see ``run.py``) as clients and workers:

1. server CPU per background job, ``--result-ttl 600`` (every outcome kept) against
   ``--result-ttl 0`` (none kept), with ``--queue memory`` and with the default sqlite
   store (a kept result is written in the batch that deletes its job's row):
   ``gearload background -u distinct`` submits N jobs (distinct uniques, so every outcome
   is kept), then its echo workers drain them; each WORK_COMPLETE is where a result is
   kept. The server's CPU comes from ``/proc/PID/stat`` (``gearload -S PID``), per phase;
   ``total`` is read by this script before and after the whole run.
2. memory per kept result: one server per result size (``--result-memory`` large enough
   that nothing is evicted) gets a first batch of B jobs (its queue's high-water mark),
   then K more; the growth of its ``VmRSS`` over those K x B results, per result, next to
   the same run against ``--result-ttl 0`` and to the server's own estimate of a result
   (``ENTRY_OVERHEAD`` + unique + data, what ``--result-memory`` counts).

Server CPU per job is the stable figure on a shared machine; wall-clock rates move with
whatever else runs. Every gearload run is bounded (``-t``, subprocess timeouts); only
processes this script started are stopped, by PID.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

from run import build_gearload, find_bench_dir, free_port, proc_cpu, proc_status, wait_listening  # noqa: E402

TTLS = (600, 0)


def start_server(tmp: Path, ttl: int, queue: str, memory: str = "64M") -> tuple:
    port = free_port()
    queue_arg = "memory" if queue == "memory" else f"sqlite://{tmp}/{port}.db"
    proc = subprocess.Popen(
        [sys.executable, "-m", "gearoffload_server", "--port", str(port), "--verbose",
         "WARNING", "--queue", queue_arg, "--result-ttl", str(ttl), "--result-memory",
         memory], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    try:
        wait_listening(proc, port)
    except BaseException:
        stop(proc)
        raise
    return proc, port


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()  # our own child, by PID
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def gearload_bg(gearload: Path, proc: subprocess.Popen, port: int, jobs: int, size: int,
                time_limit: float) -> dict[str, str]:
    out = subprocess.run(
        [str(gearload), "background", "-p", str(port), "-n", str(jobs), "-u", "distinct",
         "-c", "4", "-d", "64", "-w", "4", "-s", str(size), "-t", str(time_limit),
         "-S", str(proc.pid)], capture_output=True, text=True, timeout=2 * time_limit + 30)
    fields = dict(kv.split("=", 1) for kv in out.stdout.split() if "=" in kv)
    if fields.get("status") != "ok":
        raise SystemExit(f"bench_results: gearload: {out.stdout.strip()[-300:]} "
                         f"{out.stderr.strip()[-300:]}")
    return fields


def cpu_round(gearload: Path, tmp: Path, queue: str, ttl: int, jobs: int,
              time_limit: float) -> dict[str, float]:
    proc, port = start_server(tmp, ttl, queue)
    try:
        time.sleep(0.2)  # start-up CPU (imports) is not the jobs'
        before = proc_cpu(proc.pid)
        fields = gearload_bg(gearload, proc, port, jobs, 64, time_limit)
        time.sleep(0.3)  # the last completions (and their store batch) are processed
        total = proc_cpu(proc.pid) - before
    finally:
        stop(proc)
    return {"submit": float(fields["submit_srv_us_per_job"]),
            "drain": float(fields["drain_srv_us_per_job"]),
            "total": total / jobs * 1e6,
            "drain_rate": float(fields["drain_jobs_per_s"])}


def memory_run(gearload: Path, tmp: Path, ttl: int, size: int, batch: int, batches: int,
               time_limit: float) -> tuple[float, int]:
    """RSS growth per job over ``batches`` batches after a first (warm-up) batch, and
    the RSS at the end."""
    proc, port = start_server(tmp, ttl, "memory", memory="4G")
    try:
        gearload_bg(gearload, proc, port, batch, size, time_limit)
        time.sleep(0.3)
        first = proc_status(proc.pid, "VmRSS")
        for _ in range(batches):
            gearload_bg(gearload, proc, port, batch, size, time_limit)
        time.sleep(0.3)
        last = proc_status(proc.pid, "VmRSS")
    finally:
        stop(proc)
    return (last - first) / (batch * batches), last


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=30_000, help="jobs per CPU run")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--sizes", default="64,4096",
                        help="result sizes (bytes) for the memory figure")
    parser.add_argument("--results", type=int, default=40_000,
                        help="kept results per size for the memory figure (fewer for "
                             "sizes over 1 KiB: at most 64 MiB of data)")
    parser.add_argument("--queues", default="memory,sqlite")
    parser.add_argument("--quick", action="store_true", help="small counts, one round")
    parser.add_argument("--time-limit", type=float, default=60.0)
    args = parser.parse_args()
    if args.quick:
        args.jobs, args.results, args.rounds = 5_000, 8_000, 1
    bench = find_bench_dir()
    if bench is None:
        print("benchmark skipped: no gearload sources found")
        return 0
    gearload = build_gearload(bench)
    queues = [q for q in args.queues.split(",") if q]
    sizes = [int(s) for s in args.sizes.split(",") if s]
    for q in queues:
        if q not in ("memory", "sqlite"):
            parser.error(f"--queues: {q!r} is not memory or sqlite")

    cpu: dict[tuple[str, int], list[dict[str, float]]] = {}
    mem: dict[tuple[int, int], list[tuple[float, int]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-results-") as tmpdir:
        tmp = Path(tmpdir)
        print(f"1. server CPU per background job, gearload background -u distinct, "
              f"{args.jobs} x 64 B, 4 clients x 64 in flight, 4 workers", flush=True)
        for rnd in range(args.rounds):
            for queue in queues:
                for ttl in TTLS:  # interleaved, so noise hits both alike
                    row = cpu_round(gearload, tmp, queue, ttl, args.jobs, args.time_limit)
                    cpu.setdefault((queue, ttl), []).append(row)
                    print(f"   round {rnd + 1} {queue:6s} --result-ttl {ttl:<3d}  submit "
                          f"{row['submit']:5.1f}  drain {row['drain']:5.1f}  total "
                          f"{row['total']:5.1f} us/job  ({row['drain_rate']:,.0f} "
                          "drained/s)", flush=True)
        print("\n2. memory per kept result (--queue memory, RSS growth over the "
              "batches after the first)", flush=True)
        for rnd in range(args.rounds):
            for size in sizes:
                count = min(args.results, max(2_000, (64 << 20) // max(size, 1)))
                batch = max(1, count // 10)
                for ttl in TTLS:
                    per, rss = memory_run(gearload, tmp, ttl, size, batch, 10,
                                          args.time_limit)
                    mem.setdefault((size, ttl), []).append((per, rss))
                    print(f"   round {rnd + 1} {size:6d} B  --result-ttl {ttl:<3d}  "
                          f"{10 * batch} results: {per:7.0f} B each  (RSS {rss >> 20} MiB)",
                          flush=True)

    from gearoffload_server.state import ENTRY_OVERHEAD

    def med(values: list[float]) -> float:
        return statistics.median(values)

    n = f"median of {args.rounds}" if args.rounds > 1 else "one run"
    print(f"\nserver CPU per background job, us ({n}); kept - none = what keeping costs")
    print(f"   {'queue':8s}{'phase':8s}{'kept (600)':>12s}{'none (0)':>10s}{'added':>8s}")
    for queue in queues:
        kept, none = cpu[(queue, 600)], cpu[(queue, 0)]
        for phase in ("submit", "drain", "total"):
            a = med([r[phase] for r in kept])
            b = med([r[phase] for r in none])
            print(f"   {queue:8s}{phase:8s}{a:12.1f}{b:10.1f}{a - b:+8.1f}")
    unique_len = 33  # gearload's distinct uniques: "<run tag hex>-<16 hex digits>"
    print(f"\nmemory per kept result, bytes of server RSS ({n})")
    print(f"   {'size':>8s}{'kept (600)':>12s}{'none (0)':>10s}{'estimate':>10s}")
    for size in sizes:
        a = med([p for p, _ in mem[(size, 600)]])
        b = med([p for p, _ in mem[(size, 0)]])
        print(f"   {size:8d}{a:12.0f}{b:10.0f}{ENTRY_OVERHEAD + unique_len + size:10d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
