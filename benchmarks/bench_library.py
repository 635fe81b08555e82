"""Client + worker throughput through our server and through gearmand, in one run.

For each server: start it, start one worker process (``gearoffload.Worker`` with
``--worker-concurrency`` greenlets, task ``echo``), then drive it from this process with
``--concurrency`` greenlets sharing one ``gearoffload.Client`` (closed loop: each greenlet
runs a job with ``client.call()``, i.e. submits and waits for its result, then the next;
the web layer calls this way). Reports jobs/s, latency p50/p99,
and the CPU seconds per 1000 jobs spent by the client, the worker and the server, so one
can see which side is the bottleneck; then the ratio ours / gearmand.

Then, against the same server, the neutral C load generator (``gearload`` from
``../shared/bench``, built into /tmp when missing) with the same shape: one client
connection keeping ``--concurrency`` jobs in flight, 4 worker connections, the same
payload. Its jobs/s is what the server can do with a client and workers that cost almost
nothing; the ratio library / gearload says how far our client and worker fall short of
that (issue #3: "the library must not be the bottleneck").

Bounded: at most ``--jobs`` jobs and ``--time-limit`` seconds per server.

    .venv/bin/python benchmarks/bench_library.py
    .venv/bin/python benchmarks/bench_library.py --jobs 5000 --concurrency 50 --size 1024
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import gevent

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gearoffload import Client  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from run import build_gearload, find_bench_dir  # noqa: E402

WORKER = """
import sys
from gearoffload import Worker
worker = Worker(sys.argv[1], concurrency=int(sys.argv[2]))
worker.register("echo", lambda job: job.data)
worker.work()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"nothing listening on {port}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process, from /proc (Linux)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def start_server(kind: str, port: int) -> subprocess.Popen:
    if kind == "gearmand":
        command = [shutil.which("gearmand") or "/usr/sbin/gearmand", "--listen=127.0.0.1",
                   f"--port={port}", "--threads=1", "--log-file=none"]
    else:
        command = [sys.executable, "-m", "gearoffload_server", "--port", str(port)]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_for_port(port)
    return proc


def percentile(sorted_values: list[float], fraction: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * fraction))]


def run_one(kind: str, args: argparse.Namespace) -> dict:
    port = free_port()
    address = f"127.0.0.1:{port}"
    server = start_server(kind, port)
    worker = subprocess.Popen([sys.executable, "-c", WORKER, address,
                               str(args.worker_concurrency)], cwd=ROOT,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        payload = b"x" * args.size
        with Client(address, timeout=30) as client:
            # Warm up: connections, registration, the first jobs.
            for job in client.submit_many([("echo", payload)] * 200):
                job.result()
            latencies: list[float] = []
            remaining = [args.jobs]
            deadline = time.monotonic() + args.time_limit

            def loop() -> None:
                while remaining[0] > 0 and time.monotonic() < deadline:
                    remaining[0] -= 1
                    started = time.perf_counter()
                    result = client.call("echo", payload)
                    latencies.append(time.perf_counter() - started)
                    assert result == payload

            cpu_server, cpu_worker, cpu_client = (cpu_seconds(server.pid),
                                                  cpu_seconds(worker.pid), self_cpu())
            started = time.perf_counter()
            gevent.joinall([gevent.spawn(loop) for _ in range(args.concurrency)],
                           raise_error=True)
            elapsed = time.perf_counter() - started
            cpu_server = cpu_seconds(server.pid) - cpu_server
            cpu_worker = cpu_seconds(worker.pid) - cpu_worker
            cpu_client = self_cpu() - cpu_client
        latencies.sort()
        count = len(latencies)
        return {
            "server": kind, "jobs": count, "seconds": elapsed, "rate": count / elapsed,
            "p50": percentile(latencies, 0.50) * 1000, "p99": percentile(latencies, 0.99) * 1000,
            "cpu_client": cpu_client / count * 1e6, "cpu_worker": cpu_worker / count * 1e6,
            "cpu_server": cpu_server / count * 1e6,
        }
    finally:
        worker.terminate()
        worker.wait(10)
        server.terminate()
        server.wait(10)


def run_gearload(kind: str, gearload: Path, args: argparse.Namespace) -> dict:
    """The same server and load shape, driven by the C load generator."""
    port = free_port()
    server = start_server(kind, port)
    try:
        out = subprocess.run(
            [str(gearload), "throughput", "-p", str(port), "-c", "1",
             "-d", str(args.concurrency), "-w", "4", "-s", str(args.size),
             "-n", str(args.jobs), "-t", str(args.time_limit), "-S", str(server.pid)],
            capture_output=True, text=True, timeout=args.time_limit + 30)
        fields = dict(kv.split("=", 1) for kv in out.stdout.split() if "=" in kv)
        if fields.get("status") != "ok":
            raise RuntimeError(f"gearload failed: {out.stdout.strip()} {out.stderr.strip()}")
        return {
            "server": kind, "jobs": int(fields["done"]), "rate": float(fields["jobs_per_s"]),
            "p50": float(fields["p50_us"]) / 1000, "p99": float(fields["p99_us"]) / 1000,
            "cpu_client": float(fields["lg_us_per_job"]), "cpu_worker": float("nan"),
            "cpu_server": float(fields["srv_us_per_job"]),
        }
    finally:
        server.terminate()
        server.wait(10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=10000, help="jobs per server")
    parser.add_argument("--concurrency", type=int, default=100,
                        help="client greenlets (jobs in flight)")
    parser.add_argument("--worker-concurrency", type=int, default=100)
    parser.add_argument("--size", type=int, default=100, help="payload bytes")
    parser.add_argument("--time-limit", type=float, default=30.0, help="seconds per server")
    args = parser.parse_args(argv)
    kinds = ["gearoffload"]
    if shutil.which("gearmand") or os.path.exists("/usr/sbin/gearmand"):
        kinds.append("gearmand")
    else:
        print("gearmand not installed: measuring our server only")
    print(f"{args.jobs} jobs of {args.size} bytes, {args.concurrency} client greenlets, "
          f"1 worker process x {args.worker_concurrency} greenlets; {os.cpu_count()} CPUs")
    print(f"{'server (load)':<20} {'jobs':>6} {'jobs/s':>9} {'p50 ms':>8} {'p99 ms':>8}  "
          f"{'CPU µs per job: client':>22} {'worker':>7} {'server':>7}")
    bench = find_bench_dir()
    gearload = build_gearload(bench) if bench is not None else None
    results, loadgen = {}, {}

    def show(label: str, r: dict) -> None:
        print(f"{label:<20} {r['jobs']:>6} {r['rate']:>9.0f} {r['p50']:>8.2f} "
              f"{r['p99']:>8.2f}  {r['cpu_client']:>22.0f} {r['cpu_worker']:>7.0f} "
              f"{r['cpu_server']:>7.0f}")

    for kind in kinds:
        show(f"{kind} (library)", results.setdefault(kind, run_one(kind, args)))
        if gearload is not None:
            # gearload's "client" column is its whole process: clients and workers.
            show(f"{kind} (gearload)", loadgen.setdefault(kind, run_gearload(kind, gearload,
                                                                            args)))
    if gearload is None:
        print("gearload sources not found (../shared/bench): no load-generator comparison")
    if len(results) == 2:
        ours, theirs = results["gearoffload"], results["gearmand"]
        print(f"throughput ratio gearoffload/gearmand: {ours['rate'] / theirs['rate']:.2f}; "
              f"p50 ratio: {ours['p50'] / theirs['p50']:.2f}")
    for kind, lg in loadgen.items():
        lib = results[kind]
        print(f"through {kind}: library / gearload jobs/s = {lib['rate'] / lg['rate']:.2f}; "
              f"client+worker CPU per job {lib['cpu_client'] + lib['cpu_worker']:.0f} µs "
              f"against gearload's {lg['cpu_client']:.0f} µs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
